//! The `retrieval` engine: codes of the most similar labelled notes. Notes become TF-IDF
//! vectors (stemmed words and word pairs, sublinear term frequency, L2-normalised); a new note's
//! `k` nearest labelled notes vote for their codes with weight `similarity^power`; a code's
//! confidence is its share of the vote. `k`, `power` and the decision thresholds are
//! calibrated by leave-one-out on the notes the index is fitted on (never on the notes it is
//! evaluated on). The ranking is extended with the most frequent codes so that ranked metrics
//! see a full list. Evidence: the note's sentence that best matches the code's description.

use std::collections::HashMap;
use std::time::Instant;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::lexical::{Lexicon, Ranked};
use crate::prediction::{CodeDescriber, CodeKind, CodedItem, EvidenceSpan, NotePrediction};
use crate::text::{sentences, Analyzer};
use crate::CodingError;

/// A note with its gold codes, to fit the index on.
#[derive(Debug, Clone)]
pub struct LabelledNote {
    pub id: String,
    pub text: String,
    pub diagnoses: Vec<String>,
    pub procedures: Vec<String>,
}

/// What leave-one-out chose, and the scores it saw.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Calibration {
    pub neighbours: usize,
    pub power: f32,
    /// Weight of the lexical match against code descriptions, per kind (0 without a lexicon).
    pub lexical_weights: [f32; 2],
    /// Decision thresholds on the confidence: diagnoses, procedures.
    pub thresholds: [f32; 2],
    /// Leave-one-out MAP and micro-F1 on the fitted notes at the chosen settings.
    pub loo_map: [f64; 2],
    pub loo_micro_f1: [f64; 2],
}

/// Diagnoses' and procedures' rankings.
type PerKind = [Ranked; 2];

/// A sparse, L2-normalised term vector: (term id, weight), sorted by term id.
type SparseVec = Vec<(u32, f32)>;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RetrievalIndex {
    /// What the index was fitted on, in words.
    pub fitted_on: String,
    /// Hash of the fitted notes' ids, texts and codes: a cache is reused only for the same data.
    pub fingerprint: String,
    pub calibration: Calibration,
    vocabulary: HashMap<String, u32>,
    idf: Vec<f32>,
    docs: Vec<SparseVec>,
    /// Per note, per kind: indexes into `codes`.
    doc_codes: Vec<[Vec<u32>; 2]>,
    codes: Vec<(String, CodeKind)>,
    /// Share of the fitted notes carrying each code.
    prior: Vec<f32>,
    /// Per kind: code ids, most frequent first (the rankings' tail).
    frequent: [Vec<u32>; 2],
    #[serde(skip)]
    postings: Vec<Vec<(u32, f32)>>,
}

/// Codes in a ranking (the tail filled with frequent codes).
const RANKING_LENGTH: usize = 50;

impl RetrievalIndex {
    /// Hash of what [`Self::fit`] would be fitted on.
    pub fn fingerprint_of(notes: &[LabelledNote]) -> String {
        let mut hash = Sha256::new();
        for note in notes {
            for part in [&note.id, &note.text] {
                hash.update(part.as_bytes());
                hash.update([0]);
            }
            for code in note.diagnoses.iter().chain(&note.procedures) {
                hash.update(code.as_bytes());
                hash.update([1]);
            }
        }
        hex::encode(hash.finalize())
    }

    pub fn fit(
        notes: &[LabelledNote],
        fitted_on: String,
        lexicon: Option<&dyn Lexicon>,
    ) -> Result<Self, CodingError> {
        if notes.len() < 2 {
            return Err(CodingError::Invalid(format!(
                "the retrieval engine needs at least 2 labelled notes with text to fit on; {fitted_on} has {}",
                notes.len()
            )));
        }
        let analyzer = Analyzer::default();
        let term_lists: Vec<Vec<String>> =
            notes.par_iter().map(|n| analyzer.terms(&n.text)).collect();
        let mut vocabulary: HashMap<String, u32> = HashMap::new();
        let mut df: Vec<u32> = Vec::new();
        for terms in &term_lists {
            let mut seen: Vec<u32> = terms
                .iter()
                .map(|t| {
                    let next = vocabulary.len() as u32;
                    *vocabulary.entry(t.clone()).or_insert(next)
                })
                .collect();
            seen.sort_unstable();
            seen.dedup();
            df.resize(vocabulary.len(), 0);
            for id in seen {
                df[id as usize] += 1;
            }
        }
        let n = notes.len() as f32;
        let idf: Vec<f32> = df
            .iter()
            .map(|&d| ((1.0 + n) / (1.0 + d as f32)).ln() + 1.0)
            .collect();
        let mut index = Self {
            fitted_on,
            fingerprint: Self::fingerprint_of(notes),
            calibration: Calibration {
                neighbours: 10,
                power: 1.0,
                lexical_weights: [0.0; 2],
                thresholds: [0.5, 0.5],
                loo_map: [0.0; 2],
                loo_micro_f1: [0.0; 2],
            },
            vocabulary,
            idf,
            docs: Vec::new(),
            doc_codes: Vec::new(),
            codes: Vec::new(),
            prior: Vec::new(),
            frequent: Default::default(),
            postings: Vec::new(),
        };
        index.docs = term_lists.iter().map(|t| index.vectorize(t)).collect();
        let mut code_ids: HashMap<(String, CodeKind), u32> = HashMap::new();
        for note in notes {
            let mut per_kind: [Vec<u32>; 2] = Default::default();
            for (slot, (kind, list)) in per_kind.iter_mut().zip([
                (CodeKind::Diagnosis, &note.diagnoses),
                (CodeKind::Procedure, &note.procedures),
            ]) {
                for code in list {
                    let next = code_ids.len() as u32;
                    let id = *code_ids.entry((code.clone(), kind)).or_insert(next);
                    if !slot.contains(&id) {
                        slot.push(id);
                    }
                }
            }
            index.doc_codes.push(per_kind);
        }
        index.codes = vec![(String::new(), CodeKind::Diagnosis); code_ids.len()];
        for (code, id) in code_ids {
            index.codes[id as usize] = code;
        }
        index.prior = vec![0.0; index.codes.len()];
        for per_kind in &index.doc_codes {
            for id in per_kind.iter().flatten() {
                index.prior[*id as usize] += 1.0 / n;
            }
        }
        for (kind, list) in index.frequent.iter_mut().enumerate() {
            *list = (0..index.codes.len() as u32)
                .filter(|&c| index.codes[c as usize].1 == CodeKind::BOTH[kind])
                .collect();
            list.sort_by(|a, b| {
                index.prior[*b as usize]
                    .total_cmp(&index.prior[*a as usize])
                    .then(a.cmp(b))
            });
            list.truncate(RANKING_LENGTH);
        }
        index.build_postings();
        let lexical: Option<Vec<PerKind>> =
            lexicon.map(|l| notes.par_iter().map(|n| l.candidates(&n.text)).collect());
        index.calibrate(lexical.as_deref());
        Ok(index)
    }

    /// Read back from JSON (the postings are rebuilt).
    pub fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        let mut index: Self = serde_json::from_str(text)?;
        index.build_postings();
        Ok(index)
    }

    pub fn to_json(&self) -> Result<String, serde_json::Error> {
        serde_json::to_string(self)
    }

    pub fn notes(&self) -> usize {
        self.docs.len()
    }

    fn build_postings(&mut self) {
        let mut postings = vec![Vec::new(); self.idf.len()];
        for (d, vector) in self.docs.iter().enumerate() {
            for &(term, weight) in vector {
                postings[term as usize].push((d as u32, weight));
            }
        }
        self.postings = postings;
    }

    fn vectorize(&self, terms: &[String]) -> SparseVec {
        let mut counts: HashMap<u32, f32> = HashMap::new();
        for term in terms {
            if let Some(&id) = self.vocabulary.get(term) {
                *counts.entry(id).or_default() += 1.0;
            }
        }
        let mut vector: SparseVec = counts
            .into_iter()
            .map(|(id, tf)| (id, (1.0 + tf.ln()) * self.idf[id as usize]))
            .collect();
        let norm = vector.iter().map(|(_, w)| w * w).sum::<f32>().sqrt();
        if norm > 0.0 {
            vector.iter_mut().for_each(|(_, w)| *w /= norm);
        }
        vector.sort_unstable_by_key(|(id, _)| *id);
        vector
    }

    /// Cosine similarity to every fitted note.
    fn similarities(&self, query: &SparseVec) -> Vec<f32> {
        let mut sims = vec![0f32; self.docs.len()];
        for &(term, weight) in query {
            for &(doc, w) in &self.postings[term as usize] {
                sims[doc as usize] += weight * w;
            }
        }
        sims
    }

    /// Per kind: (code, confidence) ranked: the `k` nearest notes' vote shares plus the
    /// weighted lexical scores (`skip`: a fitted note left out, for leave-one-out), the tail
    /// filled with frequent codes.
    fn vote(
        &self,
        sims: &[f32],
        (k, power, weights): (usize, f32, [f32; 2]),
        skip: Option<usize>,
        lexical: Option<&[Ranked; 2]>,
    ) -> [Ranked; 2] {
        let mut order: Vec<usize> = (0..sims.len()).filter(|&d| Some(d) != skip).collect();
        let k = k.min(order.len());
        let neighbours = if k == 0 {
            &[][..]
        } else {
            order.select_nth_unstable_by(k - 1, |&a, &b| sims[b].total_cmp(&sims[a]));
            &order[..k]
        };
        let weights_of: Vec<f32> = neighbours
            .iter()
            .map(|&d| sims[d].max(0.0).powf(power))
            .collect();
        let total: f32 = weights_of.iter().sum::<f32>().max(1e-12);
        let mut out: [Ranked; 2] = Default::default();
        for (kind, ranking) in out.iter_mut().enumerate() {
            let mut votes: HashMap<&str, (f32, f32)> = HashMap::new();
            for (&d, &w) in neighbours.iter().zip(&weights_of) {
                for &code in &self.doc_codes[d][kind] {
                    let code = code as usize;
                    let entry = votes
                        .entry(self.codes[code].0.as_str())
                        .or_insert((0.0, self.prior[code]));
                    entry.0 += w / total;
                }
            }
            if let Some(lexical) = lexical.filter(|_| weights[kind] > 0.0) {
                for (code, score) in &lexical[kind] {
                    votes.entry(code.as_str()).or_insert((0.0, 0.0)).0 += weights[kind] * score;
                }
            }
            // Ties go to the more frequent code.
            let mut ranked: Vec<(&str, f32, f32)> =
                votes.into_iter().map(|(c, (v, p))| (c, v, p)).collect();
            ranked.sort_by(|a, b| {
                (b.1 + 1e-4 * b.2)
                    .total_cmp(&(a.1 + 1e-4 * a.2))
                    .then_with(|| a.0.cmp(b.0))
            });
            ranked.truncate(RANKING_LENGTH);
            let mut list: Ranked = ranked
                .iter()
                .map(|(c, v, _)| (c.to_string(), v.min(1.0)))
                .collect();
            for &code in &self.frequent[kind] {
                if list.len() >= RANKING_LENGTH {
                    break;
                }
                let name = &self.codes[code as usize].0;
                if !list.iter().any(|(c, _)| c == name) {
                    list.push((name.clone(), 0.0));
                }
            }
            *ranking = list;
        }
        out
    }

    /// Leave-one-out over the fitted notes: the (k, power, lexical weights) with the best
    /// summed MAP, then per kind the threshold with the best micro-F1.
    fn calibrate(&mut self, lexical: Option<&[PerKind]>) {
        let sims: Vec<Vec<f32>> = self.docs.par_iter().map(|v| self.similarities(v)).collect();
        let gold: Vec<[Vec<&str>; 2]> = self
            .doc_codes
            .iter()
            .map(|kinds| {
                kinds.clone().map(|ids| {
                    ids.iter()
                        .map(|&c| self.codes[c as usize].0.as_str())
                        .collect()
                })
            })
            .collect();
        let loo = |settings: (usize, f32, [f32; 2])| -> Vec<[Ranked; 2]> {
            (0..self.docs.len())
                .into_par_iter()
                .map(|d| self.vote(&sims[d], settings, Some(d), lexical.map(|l| &l[d])))
                .collect()
        };
        let lexical_grid: &[f32] = if lexical.is_some() {
            &[0.0, 0.05, 0.1, 0.2, 0.4, 0.8]
        } else {
            &[0.0]
        };
        // (summed MAP, k, power, lexical weights, MAPs)
        type Best = (f64, usize, f32, [f32; 2], [f64; 2]);
        let mut best: Option<Best> = None;
        for k in [5, 8, 12, 20, 30, 50] {
            for power in [1.0f32, 2.0, 3.0, 5.0] {
                // The lexical weight of one kind does not change the other's ranking: pick
                // each kind's best on its own.
                let mut weights = [0f32; 2];
                let mut maps = [f64::MIN; 2];
                for &w in lexical_grid {
                    let votes = loo((k, power, [w, w]));
                    for kind in 0..2 {
                        let map = mean_average_precision(
                            votes.iter().zip(&gold).map(|(v, g)| (&v[kind], &g[kind])),
                        );
                        if map > maps[kind] {
                            maps[kind] = map;
                            weights[kind] = w;
                        }
                    }
                }
                let score = maps[0] + maps[1];
                if best.as_ref().is_none_or(|b| score > b.0) {
                    best = Some((score, k, power, weights, maps));
                }
            }
        }
        let Some((_, k, power, weights, maps)) = best else {
            return;
        };
        let votes = loo((k, power, weights));
        let mut thresholds = [0.5f32; 2];
        let mut f1s = [0.0f64; 2];
        for kind in 0..2 {
            for step in 1..20 {
                let t = step as f32 * 0.05;
                let (mut tp, mut fp, mut fn_) = (0usize, 0usize, 0usize);
                for (v, g) in votes.iter().zip(&gold) {
                    let chosen: Vec<&str> = v[kind]
                        .iter()
                        .filter(|(_, c)| *c >= t)
                        .map(|(code, _)| code.as_str())
                        .collect();
                    let hits = chosen.iter().filter(|c| g[kind].contains(c)).count();
                    tp += hits;
                    fp += chosen.len() - hits;
                    fn_ += g[kind].len() - hits;
                }
                let f1 = f1_score(tp, fp, fn_);
                if f1 > f1s[kind] {
                    f1s[kind] = f1;
                    thresholds[kind] = t;
                }
            }
        }
        self.calibration = Calibration {
            neighbours: k,
            power,
            lexical_weights: weights,
            thresholds,
            loo_map: maps,
            loo_micro_f1: f1s,
        };
    }

    /// Code one note. `describe` gives a code's description and billable flag where the code
    /// set knows it; descriptions also pick the evidence sentence.
    pub fn predict(
        &self,
        id: &str,
        text: &str,
        describe: &CodeDescriber<'_>,
        lexicon: Option<&dyn Lexicon>,
    ) -> NotePrediction {
        let started = Instant::now();
        let analyzer = Analyzer::default();
        let query = self.vectorize(&analyzer.terms(text));
        let sims = self.similarities(&query);
        let c = &self.calibration;
        let lexical = lexicon
            .filter(|_| c.lexical_weights.iter().any(|w| *w > 0.0))
            .map(|l| l.candidates(text));
        let votes = self.vote(
            &sims,
            (c.neighbours, c.power, c.lexical_weights),
            None,
            lexical.as_ref(),
        );
        let sentence_stems: Vec<(crate::text::Span, Vec<String>)> = sentences(text)
            .into_iter()
            .map(|s| {
                let stems = analyzer.stems(&s.text);
                (s, stems)
            })
            .collect();
        let items = |kind: usize| -> Vec<CodedItem> {
            votes[kind]
                .iter()
                .enumerate()
                .map(|(i, (code, confidence))| {
                    let confidence = *confidence;
                    let code_kind = CodeKind::BOTH[kind];
                    let described = describe(code, code_kind);
                    let assigned = confidence >= c.thresholds[kind];
                    let evidence = match (&described, assigned) {
                        (Some((description, _)), true) => {
                            self.best_sentence(&analyzer, description, &sentence_stems)
                        }
                        _ => Vec::new(),
                    };
                    CodedItem {
                        code: code.clone(),
                        rank: i + 1,
                        confidence,
                        assigned,
                        description: described.as_ref().map(|(d, _)| d.clone()),
                        billable: described.map(|(_, b)| b),
                        evidence,
                    }
                })
                .collect()
        };
        NotePrediction {
            id: id.to_string(),
            diagnoses: items(0),
            procedures: items(1),
            engine: "retrieval".into(),
            model: format!(
                "retrieval: tf-idf kNN (k {}, power {}) + ICD lexical (weights {:?}{}), fitted on {}",
                c.neighbours,
                c.power,
                c.lexical_weights,
                if lexical.is_none() && c.lexical_weights.iter().any(|w| *w > 0.0) {
                    ", no code set at hand: unused"
                } else {
                    ""
                },
                self.fitted_on
            ),
            elapsed_ms: started.elapsed().as_secs_f64() * 1e3,
        }
    }

    /// The sentence sharing the most (idf-weighted) stems with `description`.
    fn best_sentence(
        &self,
        analyzer: &Analyzer,
        description: &str,
        sentences: &[(crate::text::Span, Vec<String>)],
    ) -> Vec<EvidenceSpan> {
        let wanted = analyzer.stems(description);
        let weight = |stem: &String| {
            self.vocabulary
                .get(stem)
                .map_or(1.0, |&id| self.idf[id as usize])
        };
        let best = sentences
            .iter()
            .map(|(span, stems)| {
                let score: f32 = wanted
                    .iter()
                    .filter(|w| stems.contains(w))
                    .map(weight)
                    .sum();
                (score, span)
            })
            .max_by(|a, b| a.0.total_cmp(&b.0));
        match best {
            Some((score, span)) if score > 0.0 => vec![EvidenceSpan {
                start: span.start,
                end: span.end,
                text: span.text.clone(),
            }],
            _ => Vec::new(),
        }
    }
}

fn f1_score(tp: usize, fp: usize, fn_: usize) -> f64 {
    if tp == 0 {
        return 0.0;
    }
    2.0 * tp as f64 / (2 * tp + fp + fn_) as f64
}

/// MAP over notes with at least one gold code (a note without prediction scores 0).
fn mean_average_precision<'a>(pairs: impl Iterator<Item = (&'a Ranked, &'a Vec<&'a str>)>) -> f64 {
    let (mut sum, mut n) = (0.0, 0usize);
    for (ranking, gold) in pairs {
        if gold.is_empty() {
            continue;
        }
        n += 1;
        let mut hits = 0usize;
        let mut ap = 0.0;
        for (i, (code, _)) in ranking.iter().enumerate() {
            if gold.contains(&code.as_str()) {
                hits += 1;
                ap += hits as f64 / (i + 1) as f64;
            }
        }
        sum += ap / gold.len() as f64;
    }
    if n == 0 {
        0.0
    } else {
        sum / n as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(id: &str, text: &str, dx: &[&str]) -> LabelledNote {
        LabelledNote {
            id: id.into(),
            text: text.into(),
            diagnoses: dx.iter().map(|s| s.to_string()).collect(),
            procedures: Vec::new(),
        }
    }

    #[test]
    fn similar_notes_lend_their_codes_and_evidence_points_into_the_note() {
        let mut notes = Vec::new();
        for i in 0..6 {
            notes.push(note(
                &format!("d{i}"),
                &format!("Type 2 diabetes mellitus with poor glycemic control, visit {i}."),
                &["E11.9"],
            ));
            notes.push(note(
                &format!("p{i}"),
                &format!("Community acquired pneumonia of the right lower lobe, case {i}."),
                &["J18.9"],
            ));
        }
        let index = RetrievalIndex::fit(&notes, "test".into(), None).unwrap();
        assert!(
            index.calibration.loo_map[0] > 0.99,
            "{:?}",
            index.calibration
        );
        let text = "Known diabetes mellitus type 2. Glycemic control was poor.";
        let describe = |code: &str, _: CodeKind| {
            (code == "E11.9").then(|| {
                (
                    "Type 2 diabetes mellitus without complications".into(),
                    true,
                )
            })
        };
        let p = index.predict("x", text, &describe, None);
        assert_eq!(p.diagnoses[0].code, "E11.9");
        assert!(p.diagnoses[0].assigned);
        let ev = &p.diagnoses[0].evidence[0];
        let quoted: String = text
            .chars()
            .skip(ev.start)
            .take(ev.end - ev.start)
            .collect();
        assert_eq!(quoted, ev.text);
        assert!(ev.text.contains("diabetes"));
        assert!(!p.diagnoses.iter().skip(1).any(|c| c.assigned));
        let back = RetrievalIndex::from_json(&index.to_json().unwrap()).unwrap();
        assert_eq!(
            back.predict("x", text, &describe, None).diagnoses,
            p.diagnoses
        );
    }
}
