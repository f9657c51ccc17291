//! Training: datasets into token ids (prompt and chat templates, explicit truncation), and
//! fine-tuning on them: LoRA, QLoRA and full fine-tuning with AdamW, evaluation, checkpoints
//! that resume to the same curve, and adapters in PEFT's format.

pub mod atomic;
pub mod checkpoint;
pub mod config;
pub mod data;
mod error;
pub mod export;
pub mod lmstudio;
pub mod merge;
pub mod metrics;
pub mod optim;
mod plot;
mod prompt;
mod tokenize;
pub mod trainable;
pub mod trainer;

pub use config::TrainConfig;
pub use error::TrainError;
pub use plot::{plot_loss_curves, write_plot, FONT_FAMILY};
pub use prompt::{CodeList, PromptTemplate};
pub use tokenize::{
    coding_prompt_text, tokenize_dataset, LengthStats, TokenizeOptions, TokenizeReport, Truncation,
};
pub use trainer::{TrainEvent, TrainSummary, Trainer};
