//! Models: tokenizers and chat templates now; the candle model families (llama, qwen2, qwen3,
//! gemma3), HF checkpoint and GGUF loading come with the models issue and live here too.

mod chat_template;
mod error;
mod tokenizer;

pub use chat_template::{ChatMessage, ChatTemplate};
pub use error::ModelError;
pub use tokenizer::ModelTokenizer;
