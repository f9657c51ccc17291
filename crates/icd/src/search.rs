//! Term search over code titles and inclusion terms: BM25 with stemming, clinical abbreviations
//! and a nudge towards the code a title marks as the default ("NOS").

use std::collections::{HashMap, HashSet};

use rust_stemmers::{Algorithm, Stemmer};
use serde::{Deserialize, Serialize};

use crate::abbreviations::{ABBREVIATIONS, SYNONYMS};
use crate::cm::{CmCodeSet, CmKind};
use crate::notes::NoteKind;
use crate::pcs::PcsCodeSet;
use crate::procedures::ProcedureVocabulary;
use crate::CodeSystem;

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

/// Lower-case words of a text, stop words dropped, each stemmed.
pub(crate) struct Analyzer {
    stemmer: Stemmer,
}

impl Analyzer {
    pub(crate) fn new() -> Self {
        Self {
            stemmer: Stemmer::create(Algorithm::English),
        }
    }

    pub(crate) fn terms(&self, text: &str) -> Vec<String> {
        text.split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
            .map(str::to_lowercase)
            .filter(|w| !STOPWORDS.contains(&w.as_str()))
            .map(|w| self.stemmer.stem(&w).into_owned())
            .collect()
    }

    /// Query terms with weights: abbreviations expanded, synonyms added at a lower weight,
    /// procedure words read into PCS title words; plus the PCS tables the query points into.
    fn query_terms(&self, query: &str, procedures: &ProcedureVocabulary) -> ParsedQuery {
        let mut expanded = String::new();
        for word in query
            .split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
        {
            let lower = word.to_lowercase();
            let replacement = ABBREVIATIONS
                .iter()
                .find(|(a, _)| *a == lower)
                .map(|(_, e)| *e)
                .or_else(|| procedures.abbreviation(&lower));
            expanded.push_str(replacement.unwrap_or(&lower));
            expanded.push(' ');
        }
        let mut parsed = ParsedQuery::default();
        for word in expanded
            .split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
        {
            for term in self.terms(word) {
                parsed.add(term, 1.0);
            }
            for (a, b) in SYNONYMS {
                let partner = if word == *a {
                    Some(*b)
                } else if word == *b {
                    Some(*a)
                } else {
                    None
                };
                for term in partner.map(|p| self.terms(p)).unwrap_or_default() {
                    parsed.add(term, SYNONYM_WEIGHT);
                }
            }
            if let Some(meaning) = procedures.meaning_of(word) {
                for term in meaning.words.iter().flat_map(|w| self.terms(w)) {
                    parsed.add(term, PROCEDURE_WORD_WEIGHT);
                }
                parsed.pcs_tables.extend(meaning.code_prefixes);
            }
        }
        parsed
    }
}

#[derive(Debug, Default)]
struct ParsedQuery {
    terms: Vec<(String, f32)>,
    pcs_tables: Vec<String>,
}

impl ParsedQuery {
    fn add(&mut self, term: String, weight: f32) {
        match self.terms.iter_mut().find(|(t, _)| *t == term) {
            Some((_, w)) => *w = w.max(weight),
            None => self.terms.push((term, weight)),
        }
    }
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

    /// The best `limit` documents for a free-text query.
    pub fn search(
        &self,
        query: &str,
        limit: usize,
        filter: SearchFilter,
        cm: &CmCodeSet,
        pcs: &PcsCodeSet,
    ) -> Vec<RankedDoc> {
        let analyzer = Analyzer::new();
        let query = analyzer.query_terms(query, &self.procedures);
        let n = self.docs.len() as f32;
        let mut scores = vec![0.0f32; self.docs.len()];
        let mut matched = vec![0u16; self.docs.len()];
        let mut matched_weight = vec![0.0f32; self.docs.len()];
        let query_weight: f32 = query
            .terms
            .iter()
            .map(|(_, w)| *w)
            .filter(|w| *w >= 1.0)
            .sum();
        for (term, weight) in &query.terms {
            let Some(&term_id) = self.terms.get(term) else {
                continue;
            };
            let postings = &self.postings[term_id as usize];
            let df = postings.len() as f32;
            let idf = (1.0 + (n - df + 0.5) / (df + 0.5)).ln();
            for &(doc, tf) in postings {
                let norm = 1.0 - B + B * self.doc_len[doc as usize] / self.avg_len;
                scores[doc as usize] += weight * idf * tf * (K1 + 1.0) / (tf + K1 * norm);
                matched[doc as usize] += 1;
                matched_weight[doc as usize] += weight;
            }
        }
        let keep = |doc: DocRef| -> bool {
            match doc {
                DocRef::Cm(i) => {
                    filter.system.is_none_or(|s| s == CodeSystem::Cm)
                        && (!filter.billable_only || cm.entry(i).billable)
                }
                DocRef::Pcs(_) => filter.system.is_none_or(|s| s == CodeSystem::Pcs),
            }
        };
        // A code scores as its best text: its title or one of its inclusion terms. Dense per
        // code set (scores are positive: 0 marks an untouched code), with the touched codes
        // listed, so that no hash map is built per query.
        let mut best_cm = vec![0f32; cm.entries.len()];
        let mut best_pcs = vec![0f32; pcs.codes.len()];
        let mut touched: Vec<DocRef> = Vec::new();
        let mut raise = |doc: DocRef, score: f32| {
            if !keep(doc) {
                return;
            }
            let slot = match doc {
                DocRef::Cm(i) => &mut best_cm[i as usize],
                DocRef::Pcs(i) => &mut best_pcs[i as usize],
            };
            if *slot == 0.0 {
                touched.push(doc);
            }
            *slot = slot.max(score);
        };
        for (i, score) in scores.iter().enumerate().filter(|(_, s)| **s > 0.0) {
            // Texts that the query covers whole rank first: "pneumonia" is J18.9 "Pneumonia,
            // unspecified organism" before J13 "Pneumonia due to Streptococcus pneumoniae".
            let essential = f32::from(self.doc_essential[i].max(1));
            let coverage = (f32::from(matched[i]) / essential).min(1.0);
            // And codes that answer the whole query rank before codes that answer part of it.
            let answered = (matched_weight[i] / query_weight.max(1.0)).min(1.0);
            let weighted = score
                * self.doc_weight[i]
                * (1.0 - COVERAGE_WEIGHT + COVERAGE_WEIGHT * coverage)
                * (1.0 - COVERAGE_WEIGHT + COVERAGE_WEIGHT * answered);
            raise(self.docs[i], weighted);
        }
        for table in &query.pcs_tables {
            let start = pcs
                .codes
                .partition_point(|e| e.code.as_str() < table.as_str());
            for offset in 0..pcs.with_prefix(table).len().min(2000) {
                raise(DocRef::Pcs((start + offset) as u32), INDEX_ONLY_SCORE);
            }
        }
        let in_query_table = |code: &str| {
            query
                .pcs_tables
                .iter()
                .any(|t| code.starts_with(t.as_str()))
        };
        let mut ranked: Vec<RankedDoc> = touched
            .into_iter()
            .map(|doc| match doc {
                DocRef::Cm(i) => RankedDoc {
                    doc,
                    score: best_cm[i as usize],
                },
                DocRef::Pcs(i) if in_query_table(&pcs.codes[i as usize].code) => RankedDoc {
                    doc,
                    score: best_pcs[i as usize] * INDEX_TABLE_BOOST,
                },
                DocRef::Pcs(i) => RankedDoc {
                    doc,
                    score: best_pcs[i as usize],
                },
            })
            .collect();
        let by_score = |a: &RankedDoc, b: &RankedDoc| {
            b.score
                .total_cmp(&a.score)
                .then_with(|| doc_code(a.doc, cm, pcs).cmp(doc_code(b.doc, cm, pcs)))
        };
        let depth = RERANK_DEPTH.max(limit).min(ranked.len());
        if depth < ranked.len() {
            ranked.select_nth_unstable_by(depth, by_score);
            ranked.truncate(depth);
        }
        let query_set: HashSet<&str> = query.terms.iter().map(|(t, _)| t.as_str()).collect();
        for hit in &mut ranked {
            if let DocRef::Cm(i) = hit.doc {
                if is_nos_default(cm, i, &query_set, &analyzer) {
                    hit.score *= NOS_BOOST;
                }
            }
        }
        ranked.sort_by(by_score);
        ranked.truncate(limit);
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

fn doc_code<'a>(doc: DocRef, cm: &'a CmCodeSet, pcs: &'a PcsCodeSet) -> &'a str {
    match doc {
        DocRef::Cm(i) => &cm.entry(i).code,
        DocRef::Pcs(i) => &pcs.codes[i as usize].code,
    }
}

/// Whether the code, or a code above it, lists a "… NOS" term made only of query words: the
/// classification's own statement that this is where the unqualified condition goes
/// (e.g. E11 includes "diabetes NOS": diabetes of unstated type is coded as type 2).
fn is_nos_default(cm: &CmCodeSet, index: u32, query: &HashSet<&str>, analyzer: &Analyzer) -> bool {
    std::iter::once(index).chain(cm.ancestors(index)).any(|i| {
        cm.entry(i)
            .notes
            .iter()
            .filter(|n| matches!(n.kind, NoteKind::InclusionTerm | NoteKind::Includes))
            .filter(|n| n.text.split_whitespace().any(|w| w == "NOS"))
            .any(|n| {
                let terms = analyzer.terms(&n.text);
                !terms.is_empty() && terms.iter().all(|t| query.contains(t.as_str()))
            })
    })
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
            .query_terms("T2DM with CKD", &ProcedureVocabulary::default())
            .terms;
        let words: Vec<&str> = terms.iter().map(|(t, _)| t.as_str()).collect();
        assert!(words.contains(&"diabet") && words.contains(&"2") && words.contains(&"kidney"));
        let renal = terms.iter().find(|(t, _)| t == "renal").unwrap();
        assert_eq!(renal.1, SYNONYM_WEIGHT);
    }
}
