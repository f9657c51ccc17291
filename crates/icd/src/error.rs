use std::path::PathBuf;

/// Errors of the ICD knowledge base: bad codes (why a code is not usable) and bad sources.
#[derive(Debug, thiserror::Error)]
pub enum IcdError {
    #[error(transparent)]
    Code(#[from] CodeError),

    #[error(transparent)]
    Io(#[from] std::io::Error),

    #[error(transparent)]
    Asset(#[from] medcoder_assets::AssetError),

    #[error("{path}: invalid XML: {message}")]
    Xml { path: PathBuf, message: String },

    #[error("{path}: line {line}: {message}")]
    Source {
        path: PathBuf,
        line: u64,
        message: String,
    },

    #[error("{path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },

    #[error("{path}: cannot write cache: {message}")]
    Cache { path: PathBuf, message: String },
}

/// Why a string is not a usable ICD-10 code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodeError {
    #[error("empty code")]
    Empty,

    #[error("`{input}`: {why}")]
    Malformed { input: String, why: String },

    #[error("{code}: not an ICD-10-{system} code{hint}")]
    Unknown {
        code: String,
        system: &'static str,
        hint: String,
    },

    #[error("{code}: header code, not billable: use one of its {children} more specific codes, e.g. {examples}")]
    NotBillable {
        code: String,
        children: usize,
        examples: String,
    },

    #[error("{code}: missing 7th character: add one of {options}")]
    MissingSeventhCharacter { code: String, options: String },

    #[error("`{input}`: missing placeholder X: did you mean {suggestion}?")]
    MissingPlaceholder { input: String, suggestion: String },
}
