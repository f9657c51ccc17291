use std::path::{Path, PathBuf};

use crate::AssetError;

/// The folder that holds medcoder's fetched assets and caches: `$MEDCODER_HOME`, by default
/// `~/.cache/medcoder`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MedcoderHome {
    root: PathBuf,
}

impl MedcoderHome {
    pub const ENV: &'static str = "MEDCODER_HOME";

    /// `$MEDCODER_HOME` when set and non-empty, else `~/.cache/medcoder`.
    pub fn from_env() -> Result<Self, AssetError> {
        match std::env::var_os(Self::ENV) {
            Some(dir) if !dir.is_empty() => Ok(Self::at(PathBuf::from(dir))),
            _ => {
                let home = home::home_dir().ok_or(AssetError::NoHomeDir)?;
                Ok(Self::at(home.join(".cache").join("medcoder")))
            }
        }
    }

    pub fn at(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where one asset is unpacked: `<home>/assets/<id>`.
    pub fn asset_dir(&self, asset_id: &str) -> PathBuf {
        self.root.join("assets").join(asset_id)
    }

    /// Derived caches (parsed code sets, indexes); safe to delete at any time.
    pub fn cache_dir(&self) -> PathBuf {
        self.root.join("cache")
    }

    /// A file of an installed asset, or a clear error telling how to install it.
    pub fn asset_file(&self, asset_id: &str, relative: &str) -> Result<PathBuf, AssetError> {
        let dir = self.asset_dir(asset_id);
        if !crate::fetch::is_installed(&dir) {
            return Err(AssetError::NotInstalled {
                asset: asset_id.to_string(),
                home: self.root.clone(),
            });
        }
        Ok(dir.join(relative))
    }
}
