#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Io(#[from] std::io::Error),

    #[error(transparent)]
    Store(#[from] medcoder_store::StoreError),

    #[error(transparent)]
    Model(#[from] medcoder_models::ModelError),

    #[error("{path}: {message}")]
    Config { path: String, message: String },

    #[error("example {doc_id}: {message}")]
    Example { doc_id: String, message: String },
}
