//! Generation on the `models` crate's model files: KV cache, sampling, stop conditions,
//! streaming, and logit processors (where constrained decoding plugs in).

mod continuous;
mod detokenize;
mod error;
mod generate;
mod json;
mod kernels;
mod logprobs;
mod params;
mod processors;
mod sampling;
mod stop;

pub use continuous::{BatchFailure, ContinuousBatch, Finished};
pub use detokenize::{Decode, IncrementalDecoder};
pub use error::{InferError, Result};
pub use generate::{
    generate, generate_batch, generate_batch_with, prefill, stream_into, GenerateRequest,
    Generation, PREFILL_CHUNK,
};
pub use json::{JsonSchema, JsonSchemaProcessor, JsonState, TokenTrie};
pub use logprobs::{log_prob_of, log_softmax_top};
pub use params::SamplingParams;
pub use processors::{BanTokens, FallbackToEos, LogitsProcessor, LogitsProcessorList};
pub use sampling::Sampler;
pub use stop::{FinishReason, StopChecker, StopConditions, StopReason, StopStep};
