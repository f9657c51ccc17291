use std::path::PathBuf;

/// Errors of the store: bad input files (named with file, line and column) and database errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Io(#[from] std::io::Error),

    #[error("{path}: {message}")]
    Input { path: PathBuf, message: String },

    #[error("{path}: line {line}: {message}")]
    InputLine {
        path: PathBuf,
        line: u64,
        message: String,
    },

    #[error("{path}: missing column(s) {missing} (the header has: {found})")]
    MissingColumns {
        path: PathBuf,
        missing: String,
        found: String,
    },

    #[error("{path}: not found{hint}")]
    MissingFile { path: PathBuf, hint: String },

    #[error("{context}: {source}")]
    Db {
        context: String,
        #[source]
        source: duckdb::Error,
    },

    #[error("dataset `{0}` not found in the database (see `medcoder db stats`)")]
    UnknownDataset(String),

    #[error("dataset `{0}` already exists: pass --drop to import it again")]
    DatasetExists(String),

    #[error("{0}")]
    Invalid(String),
}

/// Attach what was being done to a DuckDB error.
pub(crate) trait DbContext<T> {
    fn db(self, context: impl FnOnce() -> String) -> Result<T, StoreError>;
}

impl<T> DbContext<T> for Result<T, duckdb::Error> {
    fn db(self, context: impl FnOnce() -> String) -> Result<T, StoreError> {
        self.map_err(|source| StoreError::Db {
            context: context(),
            source,
        })
    }
}
