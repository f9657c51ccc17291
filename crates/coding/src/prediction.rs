//! What an engine returns for one note, as `medcoder code` writes it (one JSON object per note)
//! and `medcoder eval` reads it back.

use std::collections::HashMap;
use std::io::BufRead;
use std::path::Path;
use std::sync::RwLock;

use medcoder_icd::IcdKnowledge;
use serde::{Deserialize, Serialize};

use crate::assertion::Assertion;
use crate::CodingError;

/// A quoted piece of the note supporting a code: `[start, end)` in characters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EvidenceSpan {
    pub start: usize,
    pub end: usize,
    pub text: String,
}

/// One code of a note's ranking.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CodedItem {
    pub code: String,
    /// 1-based position in the ranking.
    pub rank: usize,
    /// The engine's calibrated score in [0, 1].
    pub confidence: f32,
    /// Above the engine's decision threshold: the codes a coder is handed. The whole ranking
    /// is kept for ranked metrics (MAP, top-k).
    pub assigned: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub billable: Option<bool>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub evidence: Vec<EvidenceSpan>,
    /// Present, negated, uncertain or family history, read around the evidence's mention.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assertion: Option<Assertion>,
}

/// An engine's answer for one note.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NotePrediction {
    pub id: String,
    /// ICD-10-CM, ranked.
    pub diagnoses: Vec<CodedItem>,
    /// ICD-10-PCS, ranked.
    pub procedures: Vec<CodedItem>,
    /// Coding-guideline problems with the assigned codes (headers, missing 7th characters,
    /// Excludes1 pairs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    pub engine: String,
    /// What produced it (engine settings and the data it was fitted on).
    pub model: String,
    /// The code sets' editions the codes were described and checked against (absent when
    /// they were not installed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code_sets: Option<String>,
    pub elapsed_ms: f64,
}

impl NotePrediction {
    pub fn ranking(&self, kind: CodeKind) -> &[CodedItem] {
        match kind {
            CodeKind::Diagnosis => &self.diagnoses,
            CodeKind::Procedure => &self.procedures,
        }
    }
}

/// A code's description and billable flag where the code set knows it.
pub type CodeDescriber<'a> = dyn Fn(&str, CodeKind) -> Option<(String, bool)> + Sync + 'a;

/// A code's description and billable flag, `None` where the code sets do not know it.
type Described = Option<(String, bool)>;

/// Codes remembered by [`DescriptionCache`] at most (every CM and PCS code would be ~170k).
const DESCRIPTIONS_REMEMBERED: usize = 50_000;

/// Descriptions already looked up, by code as the engine wrote it. An engine's rankings repeat
/// the same few thousand codes, and a look-up parses the code and searches both code sets
/// (more for a code they lack, which is answered with a nearest-code hint).
#[derive(Debug, Default)]
pub(crate) struct DescriptionCache {
    known: RwLock<HashMap<Box<str>, Described>>,
}

impl DescriptionCache {
    pub fn describe(&self, kb: &IcdKnowledge, code: &str) -> Described {
        let known = self.known.read().unwrap_or_else(|e| e.into_inner());
        if let Some(found) = known.get(code) {
            return found.clone();
        }
        drop(known);
        let found = kb.describe(code).ok();
        let mut known = self.known.write().unwrap_or_else(|e| e.into_inner());
        if known.len() < DESCRIPTIONS_REMEMBERED {
            known.insert(code.into(), found.clone());
        }
        found
    }
}

#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum CodeKind {
    Diagnosis,
    Procedure,
}

impl CodeKind {
    pub const BOTH: [CodeKind; 2] = [CodeKind::Diagnosis, CodeKind::Procedure];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Diagnosis => "diagnosis",
            Self::Procedure => "procedure",
        }
    }
}

/// Predictions from a JSONL file; a malformed line is an error naming the file and line.
pub fn read_predictions(path: &Path) -> Result<Vec<NotePrediction>, CodingError> {
    let file = fs_err::File::open(path)?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let prediction = serde_json::from_str(&line).map_err(|e| CodingError::Input {
            what: format!("{} line {}", path.display(), i + 1),
            why: e.to_string(),
        })?;
        out.push(prediction);
    }
    Ok(out)
}
