//! Term search over code titles and inclusion terms: BM25 with stemming, clinical abbreviations
//! and a nudge towards the code a title marks as the default ("NOS").

use std::collections::{HashMap, HashSet};

use rust_stemmers::{Algorithm, Stemmer};
use serde::{Deserialize, Serialize};

use crate::abbreviations::{ABBREVIATIONS, SYNONYMS};
use crate::cm::{CmCodeSet, CmKind};
use crate::notes::NoteKind;
use crate::pcs::PcsCodeSet;
use crate::CodeSystem;

const K1: f32 = 1.2;
const B: f32 = 0.75;
const INCLUSION_WEIGHT: f32 = 0.6;
const SYNONYM_WEIGHT: f32 = 0.5;
/// Candidates re-ranked with the NOS default rule.
const RERANK_DEPTH: usize = 300;
const NOS_BOOST: f32 = 1.15;

const STOPWORDS: &[&str] = &[
    "a", "an", "and", "as", "at", "by", "for", "in", "is", "of", "on", "or", "the", "to", "nos",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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
    docs: Vec<DocRef>,
    avg_len: f32,
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

    /// Query terms with weights: abbreviations expanded, synonyms added at a lower weight.
    fn query_terms(&self, query: &str) -> Vec<(String, f32)> {
        let mut expanded = String::new();
        for word in query
            .split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
        {
            let lower = word.to_lowercase();
            let replacement = ABBREVIATIONS
                .iter()
                .find(|(a, _)| *a == lower)
                .map(|(_, e)| *e);
            expanded.push_str(replacement.unwrap_or(&lower));
            expanded.push(' ');
        }
        let mut weighted: Vec<(String, f32)> = Vec::new();
        let mut add =
            |term: String, weight: f32| match weighted.iter_mut().find(|(t, _)| *t == term) {
                Some((_, w)) => *w = w.max(weight),
                None => weighted.push((term, weight)),
            };
        for word in expanded.split_whitespace() {
            for term in self.terms(word) {
                add(term, 1.0);
            }
            for (a, b) in SYNONYMS {
                let partner = if word == *a {
                    Some(*b)
                } else if word == *b {
                    Some(*a)
                } else {
                    None
                };
                if let Some(partner) = partner {
                    for term in self.terms(partner) {
                        add(term, SYNONYM_WEIGHT);
                    }
                }
            }
        }
        weighted
    }
}

struct IndexBuilder {
    analyzer: Analyzer,
    index: SearchIndex,
}

impl IndexBuilder {
    fn add(&mut self, doc: DocRef, fields: &[(&str, f32)]) {
        let id = u32::try_from(self.index.docs.len()).unwrap_or(u32::MAX);
        let mut tf: HashMap<u32, f32> = HashMap::new();
        let mut len = 0.0;
        for (text, weight) in fields {
            for term in self.analyzer.terms(text) {
                let next = u32::try_from(self.index.terms.len()).unwrap_or(u32::MAX);
                let term_id = *self.index.terms.entry(term).or_insert(next);
                if term_id as usize == self.index.postings.len() {
                    self.index.postings.push(Vec::new());
                }
                *tf.entry(term_id).or_default() += weight;
                len += weight;
            }
        }
        for (term_id, freq) in tf {
            self.index.postings[term_id as usize].push((id, freq));
        }
        self.index.docs.push(doc);
        self.index.doc_len.push(len);
    }
}

impl SearchIndex {
    pub fn build(cm: &CmCodeSet, pcs: &PcsCodeSet) -> Self {
        let mut builder = IndexBuilder {
            analyzer: Analyzer::new(),
            index: SearchIndex {
                terms: HashMap::new(),
                postings: Vec::new(),
                doc_len: Vec::new(),
                docs: Vec::new(),
                avg_len: 0.0,
            },
        };
        for (i, entry) in cm.entries.iter().enumerate() {
            if matches!(entry.kind, CmKind::Chapter | CmKind::Block) {
                continue;
            }
            let mut fields = vec![(entry.description.as_str(), 1.0)];
            fields.extend(
                entry
                    .notes
                    .iter()
                    .filter(|n| matches!(n.kind, NoteKind::InclusionTerm | NoteKind::Includes))
                    .map(|n| (n.text.as_str(), INCLUSION_WEIGHT)),
            );
            builder.add(DocRef::Cm(i as u32), &fields);
        }
        for (i, entry) in pcs.codes.iter().enumerate() {
            builder.add(DocRef::Pcs(i as u32), &[(entry.title.as_str(), 1.0)]);
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
        let query_terms = analyzer.query_terms(query);
        let n = self.docs.len() as f32;
        let mut scores = vec![0.0f32; self.docs.len()];
        for (term, weight) in &query_terms {
            let Some(&term_id) = self.terms.get(term) else {
                continue;
            };
            let postings = &self.postings[term_id as usize];
            let df = postings.len() as f32;
            let idf = (1.0 + (n - df + 0.5) / (df + 0.5)).ln();
            for &(doc, tf) in postings {
                let norm = 1.0 - B + B * self.doc_len[doc as usize] / self.avg_len;
                scores[doc as usize] += weight * idf * tf * (K1 + 1.0) / (tf + K1 * norm);
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
        let mut ranked: Vec<RankedDoc> = scores
            .iter()
            .enumerate()
            .filter(|(_, s)| **s > 0.0)
            .map(|(i, s)| RankedDoc {
                doc: self.docs[i],
                score: *s,
            })
            .filter(|r| keep(r.doc))
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
        let query_set: HashSet<&str> = query_terms.iter().map(|(t, _)| t.as_str()).collect();
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
        let terms = analyzer.query_terms("T2DM with CKD");
        let words: Vec<&str> = terms.iter().map(|(t, _)| t.as_str()).collect();
        assert!(words.contains(&"diabet") && words.contains(&"2") && words.contains(&"kidney"));
        let renal = terms.iter().find(|(t, _)| t == "renal").unwrap();
        assert_eq!(renal.1, SYNONYM_WEIGHT);
    }
}
