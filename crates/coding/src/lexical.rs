//! Lexical matching of a note against the ICD-10 code descriptions: each sentence is a query
//! to the knowledge base's search index (#2: BM25 over descriptions, inclusion terms and
//! abbreviations); a code's score is the sum over sentences of its hits' scores relative to
//! each sentence's best. This finds codes no training note carries.

use foldhash::HashMap;

use medcoder_icd::{CodeSystem, IcdKnowledge, SearchFilter};

use crate::text::sentences;

/// Hits kept per clause and code set.
const HITS_PER_CLAUSE: usize = 5;
/// Candidates kept per kind.
const CANDIDATES: usize = 60;

/// Codes with scores, best first.
pub type Ranked = Vec<(String, f32)>;

/// Codes a note's words point at, per kind (diagnoses, procedures): (code, score in [0, 1]),
/// best first.
pub trait Lexicon: Sync {
    fn candidates(&self, text: &str) -> [Ranked; 2];
}

impl Lexicon for IcdKnowledge {
    fn candidates(&self, text: &str) -> [Ranked; 2] {
        // One search per clause over both code sets; each set's best hits kept.
        let mut scores: [HashMap<&str, f32>; 2] = Default::default();
        let filter = SearchFilter {
            system: None,
            billable_only: false,
        };
        for sentence in sentences(text) {
            for clause in clauses(&sentence.text) {
                let hits = self.search_codes(clause, 4 * HITS_PER_CLAUSE, filter);
                for (kind, system) in [CodeSystem::Cm, CodeSystem::Pcs].into_iter().enumerate() {
                    let mut mine = hits
                        .iter()
                        .filter(|(_, s, _)| *s == system)
                        .take(HITS_PER_CLAUSE)
                        .peekable();
                    let Some(best) = mine.peek().map(|h| h.2).filter(|s| *s > 0.0) else {
                        continue;
                    };
                    for &(code, _, score) in mine {
                        *scores[kind].entry(code).or_default() += score / best;
                    }
                }
            }
        }
        scores.map(|scores| {
            let max = scores.values().copied().fold(0.0f32, f32::max);
            let mut ranked: Vec<(String, f32)> = scores
                .into_iter()
                .map(|(code, s)| (code.to_string(), if max > 0.0 { s / max } else { 0.0 }))
                .collect();
            ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            ranked.truncate(CANDIDATES);
            ranked
        })
    }
}

/// A sentence cut at commas, semicolons, colons, brackets and ` and `: shorter queries match
/// one finding each instead of whatever code shares the most words with a whole sentence.
fn clauses(sentence: &str) -> Vec<&str> {
    sentence
        .split([',', ';', ':', '(', ')'])
        .flat_map(|part| part.split(" and "))
        .map(str::trim)
        .filter(|c| c.split_whitespace().count() >= 1 && c.len() >= 4)
        .collect()
}
