//! The ICD-10-CM and ICD-10-PCS code sets as a library: validated codes (`IcdCode`),
//! descriptions, billable flags, hierarchy, instructional notes (Excludes1 and friends),
//! 7th-character expansion, PCS axes and term search. Every other medcoder crate asks it
//! whether a code is real.

mod abbreviations;
mod cache;
pub mod cm;
mod code;
mod error;
mod kb;
pub mod notes;
pub mod pcs;
mod pcs_tables;
mod procedures;
pub mod search;

pub use code::{CodeSystem, IcdCode};
pub use error::{CodeError, IcdError};
pub use kb::{
    pcs_tables_path, CodeInfo, CodeSummary, Excludes1Conflict, IcdKnowledge, IcdSources,
    InheritedNote, SearchHit, SeventhCharacter, ValidCode,
};
pub use pcs_tables::{parse_pcs_tables, PcsTables};
pub use search::SearchFilter;
