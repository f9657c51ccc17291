//! Term search over code titles and inclusion terms: BM25 with stemming, clinical abbreviations
//! and a nudge towards the code a title marks as the default ("NOS").

use std::collections::{HashMap, HashSet};
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use crate::cm::{CmCodeSet, CmKind};
use crate::notes::NoteKind;
use crate::pcs::PcsCodeSet;
use crate::procedures::ProcedureVocabulary;
use crate::CodeSystem;

mod derived;
mod evaluate;
mod query;
mod scratch;

use derived::Derived;
use evaluate::Pruning;
use query::Analyzer;
use scratch::Scratch;

const K1: f32 = 1.2;
const B: f32 = 0.75;
const INCLUSION_WEIGHT: f32 = 0.9;
const PROCEDURE_WORD_WEIGHT: f32 = 0.8;
/// Factor for PCS codes in a table that the PCS index names for a query word.
const INDEX_TABLE_BOOST: f32 = 1.3;
const SYNONYM_WEIGHT: f32 = 0.5;
/// Candidates re-ranked with the NOS default rule.
const RERANK_DEPTH: usize = 300;
const NOS_BOOST: f32 = 1.15;
/// How much of a text's score depends on the query covering its essential words.
const COVERAGE_WEIGHT: f32 = 0.5;
/// Score of a PCS code that the PCS index names for a query word but no query word matches.
const INDEX_ONLY_SCORE: f32 = 6.0;
/// Codes of one PCS table raised to [`INDEX_ONLY_SCORE`] at most.
const MAX_TABLE_CODES: usize = 2000;

const STOPWORDS: &[&str] = &[
    "a", "an", "and", "as", "at", "by", "for", "in", "is", "of", "on", "or", "the", "to", "nos",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DocRef {
    Cm(u32),
    Pcs(u32),
}

/// An inverted index over every CM code (categories and below) and every PCS code.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SearchIndex {
    terms: HashMap<String, u32>,
    /// Per term: (document, weighted term frequency).
    postings: Vec<Vec<(u32, f32)>>,
    doc_len: Vec<f32>,
    /// Each indexed text and the code it belongs to; a code has one text for its title and
    /// one per inclusion term, so a short inclusion term is not drowned by a long title.
    docs: Vec<DocRef>,
    /// Score factor of each text (inclusion terms count a little less than titles).
    doc_weight: Vec<f32>,
    /// Distinct essential terms of each text: outside parentheses (the classification's
    /// nonessential modifiers) and other than "unspecified".
    doc_essential: Vec<u16>,
    avg_len: f32,
    procedures: ProcedureVocabulary,
    /// What searches read that follows from the above (and the code set it was built from).
    #[serde(skip)]
    derived: OnceLock<Derived>,
}

/// Which codes a search returns.
#[derive(Debug, Clone, Copy, Default)]
pub struct SearchFilter {
    pub system: Option<CodeSystem>,
    pub billable_only: bool,
}

#[derive(Debug, Clone)]
pub struct RankedDoc {
    pub doc: DocRef,
    pub score: f32,
}

struct IndexBuilder {
    analyzer: Analyzer,
    index: SearchIndex,
}

impl IndexBuilder {
    fn add(&mut self, doc: DocRef, text: &str, weight: f32) {
        let id = u32::try_from(self.index.docs.len()).unwrap_or(u32::MAX);
        let mut tf: HashMap<u32, f32> = HashMap::new();
        for term in self.analyzer.terms(text) {
            let next = u32::try_from(self.index.terms.len()).unwrap_or(u32::MAX);
            let term_id = *self.index.terms.entry(term).or_insert(next);
            if term_id as usize == self.index.postings.len() {
                self.index.postings.push(Vec::new());
            }
            // Binary term frequency: titles are short, and a word said twice
            // ("Pneumonia due to Streptococcus pneumoniae") is not more relevant.
            tf.insert(term_id, 1.0);
        }
        for (term_id, freq) in tf {
            self.index.postings[term_id as usize].push((id, freq));
        }
        let essential: HashSet<String> = self
            .analyzer
            .terms(&essential_text(text))
            .into_iter()
            .collect();
        self.index.docs.push(doc);
        self.index.doc_weight.push(weight);
        self.index
            .doc_essential
            .push(u16::try_from(essential.len()).unwrap_or(u16::MAX));
        // Nonessential modifiers do not make a text longer for length normalization.
        self.index.doc_len.push(essential.len().max(1) as f32);
    }
}

impl SearchIndex {
    pub fn build(cm: &CmCodeSet, pcs: &PcsCodeSet, procedures: ProcedureVocabulary) -> Self {
        let mut builder = IndexBuilder {
            analyzer: Analyzer::new(),
            index: SearchIndex {
                terms: HashMap::new(),
                postings: Vec::new(),
                doc_len: Vec::new(),
                docs: Vec::new(),
                doc_weight: Vec::new(),
                doc_essential: Vec::new(),
                avg_len: 0.0,
                procedures,
                derived: OnceLock::new(),
            },
        };
        for (i, entry) in cm.entries.iter().enumerate() {
            if matches!(entry.kind, CmKind::Chapter | CmKind::Block) {
                continue;
            }
            let doc = DocRef::Cm(i as u32);
            builder.add(doc, &entry.description, 1.0);
            let inclusion_terms = entry
                .notes
                .iter()
                .filter(|n| matches!(n.kind, NoteKind::InclusionTerm | NoteKind::Includes));
            for note in inclusion_terms {
                builder.add(doc, &note.text, INCLUSION_WEIGHT);
            }
        }
        for (i, entry) in pcs.codes.iter().enumerate() {
            builder.add(DocRef::Pcs(i as u32), &entry.title, 1.0);
        }
        let mut index = builder.index;
        let total: f32 = index.doc_len.iter().sum();
        index.avg_len = total / index.doc_len.len().max(1) as f32;
        for postings in &mut index.postings {
            postings.sort_by_key(|(doc, _)| *doc);
        }
        index
    }

    pub fn doc_count(&self) -> usize {
        self.docs.len()
    }

    /// Builds what searches read beyond the index itself (a fraction of a second), so that
    /// the first search does not wait for it.
    pub fn prepare(&self, cm: &CmCodeSet, pcs: &PcsCodeSet) {
        self.derived.get_or_init(|| Derived::new(self, cm, pcs));
    }

    /// The best `limit` documents for a free-text query.
    pub fn search(
        &self,
        query: &str,
        limit: usize,
        filter: SearchFilter,
        cm: &CmCodeSet,
        pcs: &PcsCodeSet,
    ) -> Vec<RankedDoc> {
        self.search_with(query, limit, filter, (cm, pcs), Pruning::On)
    }

    fn search_with(
        &self,
        query: &str,
        limit: usize,
        filter: SearchFilter,
        (cm, pcs): (&CmCodeSet, &PcsCodeSet),
        pruning: Pruning,
    ) -> Vec<RankedDoc> {
        let derived = self.derived.get_or_init(|| Derived::new(self, cm, pcs));
        let mut scratch = Scratch::take(self.docs.len(), cm.entries.len(), pcs.codes.len());
        let ranked = evaluate::search(
            self,
            derived,
            &mut scratch,
            query,
            limit,
            filter,
            (cm, pcs),
            pruning,
        );
        scratch.give_back();
        ranked
    }
}

/// Phrases that say a title is the unqualified default, not what it is about.
const DEFAULT_PHRASES: &[&str] = &[
    "unspecified organism",
    "site not specified",
    "not elsewhere classified",
    "not otherwise specified",
    "unspecified",
    "nos",
];

/// The words a query must say for a text to be fully covered: without nonessential
/// modifiers in parentheses and without default phrases ("unspecified organism").
fn essential_text(text: &str) -> String {
    let mut essential = format!(
        " {} ",
        without_parentheses(text).to_lowercase().replace(',', " ")
    );
    for phrase in DEFAULT_PHRASES {
        essential = essential.replace(&format!(" {phrase} "), " ");
    }
    essential
}

/// The text without its parenthesized nonessential modifiers.
fn without_parentheses(text: &str) -> String {
    let mut depth = 0usize;
    text.chars()
        .filter(|c| {
            match c {
                '(' | '[' => depth += 1,
                ')' | ']' => depth = depth.saturating_sub(1),
                _ => return depth == 0,
            }
            false
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_phrases_are_not_essential() {
        let analyzer = Analyzer::new();
        assert_eq!(
            analyzer.terms(&essential_text("Pneumonia, unspecified organism")),
            ["pneumonia"]
        );
        assert_eq!(
            analyzer.terms(&essential_text(
                "Urinary tract infection, site not specified"
            )),
            ["urinari", "tract", "infect"]
        );
        assert_eq!(
            analyzer.terms(&essential_text("Hypertension (arterial) (benign)")),
            ["hypertens"]
        );
    }

    #[test]
    fn nonessential_modifiers_are_dropped() {
        assert_eq!(
            without_parentheses("Essential (primary) hypertension"),
            "Essential  hypertension"
        );
        assert_eq!(
            without_parentheses("hypertension (arterial) (benign)"),
            "hypertension  "
        );
    }

    #[test]
    fn analyzer_stems_and_drops_stop_words() {
        let analyzer = Analyzer::new();
        assert_eq!(
            analyzer.terms("Diabetic neuropathy of the foot"),
            ["diabet", "neuropathi", "foot"]
        );
        assert_eq!(analyzer.terms("diabetes"), ["diabet"]);
    }

    #[test]
    fn query_expands_abbreviations_and_synonyms() {
        let analyzer = Analyzer::new();
        let terms = analyzer
            .query_terms("T2DM with CKD", &ProcedureVocabulary::default(), 0)
            .terms;
        let words: Vec<&str> = terms.iter().map(|(t, _)| t.as_str()).collect();
        assert!(words.contains(&"diabet") && words.contains(&"2") && words.contains(&"kidney"));
        let renal = terms.iter().find(|(t, _)| t == "renal").unwrap();
        assert_eq!(renal.1, SYNONYM_WEIGHT);
    }
}
