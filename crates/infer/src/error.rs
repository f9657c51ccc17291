/// Errors of the `infer` crate.
#[derive(Debug, thiserror::Error)]
pub enum InferError {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    #[error(transparent)]
    Model(#[from] medcoder_models::ModelError),

    /// A sampling or stop parameter is out of range; `name` is the field as it is spelled in
    /// the request or config.
    #[error("invalid {name}: {message}")]
    InvalidParameter { name: &'static str, message: String },

    /// The model (or a logits processor) produced NaN or +inf. Processors may only lower
    /// logits, down to -inf, or set finite values.
    #[error("logit of token {token_id} is {value}; logits must be finite or -inf")]
    InvalidLogit { token_id: u32, value: f32 },

    #[error("the logits vector is empty")]
    EmptyLogits,

    /// Every logit is -inf after penalties and logits processors: no token may follow. A
    /// constrained decoder that wants to end the output instead adds `FallbackToEos` last.
    #[error("no token is allowed: every logit is -inf after penalties and logits processors")]
    NoTokenAllowed,

    /// A JSON schema keyword that constrained decoding does not support.
    #[error("JSON schema keyword `{keyword}` is not supported: {message}")]
    UnsupportedSchema { keyword: String, message: String },

    #[error("invalid JSON schema: {0}")]
    InvalidSchema(String),

    #[error("decode: {0}")]
    Decode(String),
}

pub type Result<T, E = InferError> = std::result::Result<T, E>;

impl InferError {
    pub(crate) fn invalid(name: &'static str, message: impl Into<String>) -> Self {
        Self::InvalidParameter {
            name,
            message: message.into(),
        }
    }
}
