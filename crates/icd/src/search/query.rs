//! Queries: a free text read into weighted, stemmed terms (abbreviations expanded, synonyms
//! and procedure words added) and the PCS tables it points into.

use std::cell::RefCell;
use std::collections::HashMap;

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
    /// `owner` names the index whose procedure vocabulary this is: each thread keeps the
    /// words it has read for one index (a clinical vocabulary repeats from note to note).
    pub(super) fn query_terms(
        &self,
        query: &str,
        procedures: &ProcedureVocabulary,
        owner: u64,
    ) -> ParsedQuery {
        READINGS.with_borrow_mut(|readings| {
            if readings.owner != owner || readings.words.len() > MAX_READINGS {
                readings.words.clear();
                readings.owner = owner;
            }
            let mut parsed = ParsedQuery::default();
            for word in query
                .split(|c: char| !c.is_alphanumeric())
                .filter(|w| !w.is_empty())
            {
                if !readings.words.contains_key(word) {
                    let reading = self.read_word(word, procedures);
                    readings.words.insert(word.to_string(), reading);
                }
                if let Some(reading) = readings.words.get(word) {
                    for (term, weight) in &reading.terms {
                        parsed.add(term, *weight);
                    }
                    parsed.pcs_tables.extend(reading.pcs_tables.iter().cloned());
                }
            }
            parsed
        })
    }

    /// What one word of a query adds to it, in the order it adds it.
    fn read_word(&self, word: &str, procedures: &ProcedureVocabulary) -> WordReading {
        let lower = word.to_lowercase();
        let expanded = ABBREVIATIONS
            .iter()
            .find(|(a, _)| *a == lower)
            .map(|(_, e)| *e)
            .or_else(|| procedures.abbreviation(&lower))
            .unwrap_or(&lower);
        let mut reading = WordReading::default();
        for word in expanded
            .split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
        {
            for term in self.terms(word) {
                reading.terms.push((term, 1.0));
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
                    reading.terms.push((term, SYNONYM_WEIGHT));
                }
            }
            if let Some(meaning) = procedures.meaning_of(word) {
                for term in meaning.words.iter().flat_map(|w| self.terms(w)) {
                    reading.terms.push((term, PROCEDURE_WORD_WEIGHT));
                }
                reading.pcs_tables.extend(meaning.code_prefixes);
            }
        }
        reading
    }
}

/// What one word of a query adds to it: its terms with their weights (its own, after
/// abbreviation expansion, then its synonyms', then its procedure reading's), and the PCS
/// tables it points into. Each word's reading follows from the word and the procedure
/// vocabulary alone, and a query's is its words' in order.
#[derive(Debug, Default)]
struct WordReading {
    terms: Vec<(String, f32)>,
    pcs_tables: Vec<String>,
}

/// The words a thread has read, for the index `owner`.
#[derive(Debug, Default)]
struct Readings {
    owner: u64,
    words: HashMap<String, WordReading>,
}

/// Words kept per thread before the readings are dropped and started again.
const MAX_READINGS: usize = 1 << 16;

thread_local! {
    static READINGS: RefCell<Readings> = RefCell::default();
}

#[derive(Debug, Default)]
pub(super) struct ParsedQuery {
    pub terms: Vec<(String, f32)>,
    pub pcs_tables: Vec<String>,
}

impl ParsedQuery {
    fn add(&mut self, term: &str, weight: f32) {
        match self.terms.iter_mut().find(|(t, _)| t == term) {
            Some((_, w)) => *w = w.max(weight),
            None => self.terms.push((term.to_string(), weight)),
        }
    }
}
