#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Io(#[from] std::io::Error),

    #[error(transparent)]
    Store(#[from] medcoder_store::StoreError),

    #[error(transparent)]
    Model(#[from] medcoder_models::ModelError),

    #[error("{0}")]
    Tensor(#[from] candle_core::Error),

    #[error("{path}: {message}")]
    Config { path: String, message: String },

    #[error("example {doc_id}: {message}")]
    Example { doc_id: String, message: String },

    #[error("{0}")]
    Data(String),

    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: String, message: String },

    #[error("the loss became {loss} at step {step}: training stopped; the last good checkpoint is kept ({checkpoint}). Lower the learning rate or check the data, then resume")]
    NonFiniteLoss {
        step: usize,
        loss: f64,
        checkpoint: String,
    },

    #[error("{0}")]
    Run(String),

    #[error("{path}: {message}")]
    Plot { path: String, message: String },
}
