//! Models: the candle model families (llama, qwen2, qwen3, gemma3) built on one shared
//! transformer, loaded from HF checkpoints or GGUF files, with tokenizers and chat templates.

pub mod autograd;
pub mod bert;
mod chat_template;
mod cpu_train_kernels;
mod cpu_train_weights;
mod error;
pub mod families;
mod frozen;
pub mod gguf_export;
pub mod gguf_tokenizer;
pub mod gguf_tokenizer_export;
pub mod hf_config;
pub mod hf_tokenizer_export;
pub mod layers;
pub mod loader;
pub mod lora;
pub mod lora_train_cpu;
pub mod nf4;
pub mod parameters;
pub mod qmatmul_cpu;
pub mod quantized_rows;
pub mod recompute;
pub mod row_dots;
pub mod sentence_embedder;
mod tokenizer;
pub mod transformer;
pub mod weights;
mod word_token_cache;

pub use chat_template::{ChatMessage, ChatTemplate};
pub use error::ModelError;
pub use gguf_tokenizer::{GgufVocab, GgufVocabModel, TokenType};
pub use loader::{default_dtype, load_model, DeviceSpec, Family, LoadedModel};
pub use sentence_embedder::SentenceEmbedder;
pub use tokenizer::ModelTokenizer;
pub use transformer::{CausalLm, ForwardOptions, KvCache, Spec};
