//! medcoder's data store: one embedded DuckDB file holding imported corpora (MIMIC-III/IV,
//! CodiEsp, instruction JSONL), their documents, gold codes, evidence, patient-level splits
//! and tokenized examples. This is the only crate that speaks SQL.

mod catalog;
mod codiesp;
mod csv_input;
mod db;
mod documents;
mod error;
pub mod floor;
mod instructions;
mod mimic;
mod splits;
mod stats;
pub mod synthetic;
mod tokens;

pub use codiesp::{import_codiesp, CodiespOptions, Language};
pub use db::{Dataset, DatasetKind, Store};
pub use documents::{Document, DocumentEvidence, Evidence};
pub use error::StoreError;
pub use instructions::{import_instructions, InstructionFormat, InstructionOptions};
pub use mimic::{import_mimic, IcdNineHandling, MimicOptions, MimicVersion};
pub use splits::{Split, SplitRatios};
pub use stats::{DatabaseStats, DatasetStats};
pub use tokens::{CodingExample, ConversationExample, TokenRow};

/// What an import did, for the user.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ImportReport {
    pub dataset: String,
    /// Raw tables imported in this run, with their row counts.
    pub tables_imported: Vec<(String, u64)>,
    /// Raw tables that were there already (skipped; `--drop` imports them again).
    pub tables_skipped: Vec<String>,
    pub documents: u64,
    pub documents_with_text: u64,
    pub diagnosis_codes: u64,
    pub procedure_codes: u64,
    /// Gold codes by validation status against the ICD knowledge base.
    pub code_status: Vec<(String, u64)>,
    pub splits: Vec<(String, u64)>,
    pub notes: Vec<String>,
}
