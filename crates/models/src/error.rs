use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Io(#[from] std::io::Error),

    #[error(transparent)]
    Asset(#[from] medcoder_assets::AssetError),

    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("chat template: {0}")]
    Template(String),

    #[error("{0}")]
    Unsupported(String),

    /// Candle's message is part of this one (not a separate cause), so it is printed once.
    #[error("{context}: {cause}")]
    Candle {
        context: String,
        cause: candle_core::Error,
    },
}

/// Adds what was being done to a candle error.
pub(crate) trait CandleContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T, ModelError>;
}

impl<T> CandleContext<T> for Result<T, candle_core::Error> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T, ModelError> {
        self.map_err(|cause| ModelError::Candle {
            context: context(),
            cause,
        })
    }
}
