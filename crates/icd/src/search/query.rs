//! Queries: a free text read into weighted, stemmed terms (abbreviations expanded, synonyms
//! and procedure words added) and the PCS tables it points into.

use rust_stemmers::{Algorithm, Stemmer};

use super::{PROCEDURE_WORD_WEIGHT, STOPWORDS, SYNONYM_WEIGHT};
use crate::abbreviations::{ABBREVIATIONS, SYNONYMS};
use crate::procedures::ProcedureVocabulary;

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
    pub(super) fn query_terms(&self, query: &str, procedures: &ProcedureVocabulary) -> ParsedQuery {
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
pub(super) struct ParsedQuery {
    pub terms: Vec<(String, f32)>,
    pub pcs_tables: Vec<String>,
}

impl ParsedQuery {
    fn add(&mut self, term: String, weight: f32) {
        match self.terms.iter_mut().find(|(t, _)| *t == term) {
            Some((_, w)) => *w = w.max(weight),
            None => self.terms.push((term, weight)),
        }
    }
}
