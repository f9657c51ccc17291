//! Coding: a note in, ranked and validated ICD-10 codes out, with evidence; and the evaluation
//! of those predictions against gold codes (micro/macro F1, MAP, top-k, by level and chapter).

pub mod assertion;
pub mod codiesp_tsv;
pub mod constrained;
pub mod engine;
pub mod eval;
mod evidence;
pub mod fhir;
pub mod guidelines;
pub mod lexical;
pub mod llm;
mod llm_confidence;
mod llm_continuous;
pub mod model_answer;
pub mod openai;
pub mod pdf;
pub mod prediction;
pub mod registry;
mod registry_lock;
mod rerank;
pub mod retrieval;
pub mod text;

pub use engine::{Coder, ContinuousNotes, EngineConfig, EngineKind};
pub use llm_continuous::{Answered, ContinuousCoding, Refused};
pub use prediction::{CodeKind, CodedItem, EvidenceSpan, NotePrediction};

#[derive(Debug, thiserror::Error)]
pub enum CodingError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("{what}: {why}")]
    Input { what: String, why: String },
    #[error(transparent)]
    Store(#[from] medcoder_store::StoreError),
    #[error("{0}")]
    Invalid(String),
    /// Writing an output file (atomically) or a plot failed.
    #[error(transparent)]
    Output(#[from] medcoder_train::TrainError),
    /// A remote model endpoint that could not be reached or gave no usable answer.
    #[error("{url}: {why}")]
    Endpoint { url: String, why: String },
    /// Coding stopped because its caller went away (a server's client disconnected).
    #[error("note {0}: cancelled")]
    Cancelled(String),
}
