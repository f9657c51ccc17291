//! Training: turning datasets into token ids (prompt templates, chat templates, explicit
//! truncation) now; the SFT / preference / RL loops come with the training issue.

mod error;
mod prompt;
mod tokenize;

pub use error::TrainError;
pub use prompt::{CodeList, PromptTemplate};
pub use tokenize::{tokenize_dataset, LengthStats, TokenizeOptions, TokenizeReport, Truncation};
