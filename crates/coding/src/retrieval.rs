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

use crate::eval::average_precision;
use crate::lexical::{Lexicon, Ranked};
use crate::prediction::{CodeDescriber, CodeKind, CodedItem, NotePrediction};
use crate::rerank::{Reranker, Signals};
use crate::text::Analyzer;
use crate::CodingError;

mod centroids;
mod semantic;

use crate::evidence::{best_sentence, NoteSentences};
use centroids::Centroids;
use medcoder_models::SentenceEmbedder;
use semantic::{embed_notes, embedder_name, SemanticIndex, SemanticMatch};

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
    /// Whether diagnoses and procedures are ranked by the reranker fusing the vote with the
    /// lexical match against code descriptions (kept only where it raised leave-one-out MAP).
    pub reranked: [bool; 2],
    /// Decision thresholds on the confidence: diagnoses, procedures.
    pub thresholds: [f32; 2],
    /// Leave-one-out MAP and micro-F1 on the fitted notes at the chosen settings.
    pub loo_map: [f64; 2],
    pub loo_micro_f1: [f64; 2],
}

/// Diagnoses' and procedures' rankings.
type PerKind = [Ranked; 2];

/// One kind's candidate codes with their signals, each code once, in the order first met.
#[derive(Debug, Default)]
struct CandidateSet<'a> {
    list: Vec<(&'a str, Signals)>,
    at: HashMap<&'a str, usize>,
}

impl<'a> CandidateSet<'a> {
    /// The code's signals, made by `new` when the code is new.
    fn entry(&mut self, code: &'a str, new: impl FnOnce() -> Signals) -> &mut Signals {
        let Self { list, at } = self;
        let i = *at.entry(code).or_insert_with(|| {
            list.push((code, new()));
            list.len() - 1
        });
        &mut list[i].1
    }
}

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
    rerankers: [Option<Reranker>; 2],
    /// Sentence embeddings of the fitted notes and codes' descriptions, when fitted with an
    /// embedder.
    #[serde(default)]
    semantic: Option<SemanticIndex>,
    /// Per kind: every code id of that kind.
    #[serde(skip)]
    codes_of_kind: [Vec<u32>; 2],
    /// Per kind: the most frequent code ids, most frequent first (the rankings' tail).
    #[serde(skip)]
    frequent: [Vec<u32>; 2],
    #[serde(skip)]
    /// Per kind: code id by name.
    code_index: [HashMap<String, u32>; 2],
    #[serde(skip)]
    centroids: Centroids,
    #[serde(skip)]
    postings: Vec<Vec<(u32, f32)>>,
}

/// Bumped whenever what the index holds or how it scores changes, so that caches of an older
/// build are refitted rather than misread.
const INDEX_FORMAT: u32 = 6;

/// Codes in a ranking (the tail filled with frequent codes).
const RANKING_LENGTH: usize = 50;
/// Candidates taken from the closest code centroids, per kind.
const CENTROID_CANDIDATES: usize = 30;
/// Candidates taken from the code descriptions closest to a sentence of the note, per kind.
const DESCRIPTION_CANDIDATES: usize = 30;
/// Fitted notes voting by sentence-embedding similarity, and the softmax temperature of
/// their cosines (embedding cosines between notes crowd into a narrow band).
const SEMANTIC_NEIGHBOURS: usize = 20;
const SEMANTIC_TEMPERATURE: f32 = 0.05;

/// What the retrieval engine is fitted with besides the notes.
#[derive(Clone, Copy, Default)]
pub struct FitAids<'a> {
    /// The ICD index's lexical matches (the code sets installed).
    pub lexicon: Option<&'a dyn Lexicon>,
    /// A sentence embedder and the code descriptions it embeds.
    pub embedder: Option<(&'a SentenceEmbedder, &'a CodeDescriber<'a>)>,
}

impl std::fmt::Debug for FitAids<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.signature())
    }
}

impl FitAids<'_> {
    /// What a fitted index depends on besides the notes, for its fingerprint.
    fn signature(&self) -> String {
        let mut signature = String::new();
        if self.lexicon.is_some() {
            signature.push_str("+lexical");
        }
        if let Some((embedder, _)) = self.embedder {
            signature.push_str(&format!("+{}", embedder_name(embedder)));
        }
        signature
    }
}

impl RetrievalIndex {
    /// Hash of what [`Self::fit`] would be fitted on (the aids: the calibration depends on
    /// them).
    pub fn fingerprint_of(notes: &[LabelledNote], aids: &FitAids<'_>) -> String {
        let mut hash = Sha256::new();
        hash.update(INDEX_FORMAT.to_le_bytes());
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
        hash.update(aids.signature().as_bytes());
        hex::encode(hash.finalize())
    }

    pub fn fit(
        notes: &[LabelledNote],
        fitted_on: String,
        aids: FitAids<'_>,
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
            fingerprint: Self::fingerprint_of(notes, &aids),
            calibration: Calibration {
                neighbours: 10,
                power: 1.0,
                reranked: [false; 2],
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
            rerankers: [None, None],
            semantic: None,
            codes_of_kind: Default::default(),
            frequent: Default::default(),
            code_index: Default::default(),
            centroids: Centroids::default(),
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
        index.derive_tables();
        let lexical: Option<Vec<PerKind>> = aids
            .lexicon
            .map(|l| notes.par_iter().map(|n| l.candidates(&n.text)).collect());
        let semantic = match aids.embedder {
            Some((embedder, describe)) => {
                let texts: Vec<&str> = notes.iter().map(|n| n.text.as_str()).collect();
                let embedded = embed_notes(embedder, &texts)?;
                let descriptions: Vec<Option<String>> = index
                    .codes
                    .iter()
                    .map(|(code, kind)| describe(code, *kind).map(|(d, _)| d))
                    .collect();
                let semantic = SemanticIndex::build(embedder, &embedded, &descriptions)?;
                let matches: Vec<SemanticMatch> =
                    embedded.iter().map(|n| semantic.match_note(n)).collect();
                index.semantic = Some(semantic);
                Some(matches)
            }
            None => None,
        };
        index.calibrate(lexical.as_deref(), semantic.as_deref());
        Ok(index)
    }

    /// Read back from JSON (what [`Self::derive_tables`] builds is rebuilt).
    pub fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        let mut index: Self = serde_json::from_str(text)?;
        index.derive_tables();
        if let Some(semantic) = &mut index.semantic {
            semantic.derive_tables();
        }
        Ok(index)
    }

    pub fn to_json(&self) -> Result<String, serde_json::Error> {
        serde_json::to_string(self)
    }

    /// Everything that follows from the notes' vectors, codes and priors: codes by kind and
    /// by frequency, code ids by name, code centroids, postings.
    fn derive_tables(&mut self) {
        self.codes_of_kind = [0, 1].map(|kind| {
            (0..self.codes.len() as u32)
                .filter(|&c| self.codes[c as usize].1 == CodeKind::BOTH[kind])
                .collect()
        });
        self.frequent = self.codes_of_kind.clone().map(|mut list| {
            list.sort_by(|a, b| {
                self.prior[*b as usize]
                    .total_cmp(&self.prior[*a as usize])
                    .then(a.cmp(b))
            });
            list.truncate(RANKING_LENGTH);
            list
        });
        self.centroids = Centroids::new(
            self.idf.len(),
            self.codes.len(),
            self.docs
                .iter()
                .zip(&self.doc_codes)
                .map(|(vector, per_kind)| (vector, per_kind.iter().flatten().copied())),
        );
        self.code_index = [0, 1].map(|kind| {
            self.codes_of_kind[kind]
                .iter()
                .map(|&c| (self.codes[c as usize].0.clone(), c))
                .collect()
        });
        let mut postings = vec![Vec::new(); self.idf.len()];
        for (d, vector) in self.docs.iter().enumerate() {
            for &(term, weight) in vector {
                postings[term as usize].push((d as u32, weight));
            }
        }
        self.postings = postings;
    }

    /// Sorted by term id before the norm is summed, so that a note's vector is the same to the
    /// last bit from run to run (a hash map's order is not).
    fn vectorize(&self, terms: &[String]) -> SparseVec {
        let mut ids: Vec<u32> = terms
            .iter()
            .filter_map(|term| self.vocabulary.get(term).copied())
            .collect();
        ids.sort_unstable();
        let mut vector: SparseVec = Vec::new();
        for chunk in ids.chunk_by(|a, b| a == b) {
            let tf = chunk.len() as f32;
            vector.push((chunk[0], (1.0 + tf.ln()) * self.idf[chunk[0] as usize]));
        }
        let norm = vector.iter().map(|(_, w)| w * w).sum::<f32>().sqrt();
        if norm > 0.0 {
            vector.iter_mut().for_each(|(_, w)| *w /= norm);
        }
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

    /// Per kind: every candidate code's signals (the `k` nearest notes' vote shares and the
    /// lexical matches; `skip`: a fitted note left out, for leave-one-out), in the order the
    /// codes were first met (voted, closest centroids, lexical matches).
    fn candidates<'a>(
        &'a self,
        query: &SparseVec,
        sims: &[f32],
        (k, power): (usize, f32),
        skip: Option<usize>,
        lexical: Option<&'a PerKind>,
        semantic: Option<&SemanticMatch>,
    ) -> [Vec<(&'a str, Signals)>; 2] {
        let mut order: Vec<usize> = (0..sims.len()).filter(|&d| Some(d) != skip).collect();
        let k = k.min(order.len());
        let neighbours = if k == 0 {
            &[][..]
        } else {
            order.select_nth_unstable_by(k - 1, |&a, &b| sims[b].total_cmp(&sims[a]));
            &order[..k]
        };
        let weights: Vec<f32> = neighbours
            .iter()
            .map(|&d| sims[d].max(0.0).powf(power))
            .collect();
        let total: f32 = weights.iter().sum::<f32>().max(1e-12);
        let n = self.docs.len() as f32;
        let own =
            |code: u32, kind: usize| skip.is_some_and(|d| self.doc_codes[d][kind].contains(&code));
        let training = |code: u32, kind: usize| {
            let training = self.prior[code as usize] * n - f32::from(u8::from(own(code, kind)));
            Signals {
                training_notes: training.max(0.0),
                ..Signals::default()
            }
        };
        let dots = self.centroids.dots(query);
        let semantic_votes = semantic.map(|m| self.semantic_neighbours(&m.notes, skip));
        std::array::from_fn(|kind| {
            let mut signals = CandidateSet::default();
            let mut voted: HashMap<u32, f32> = HashMap::new();
            for (&d, &w) in neighbours.iter().zip(&weights) {
                for &code in &self.doc_codes[d][kind] {
                    *voted.entry(code).or_default() += w / total;
                }
            }
            let mut voted: Vec<(u32, f32)> = voted.into_iter().collect();
            voted.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            for (rank, (code, share)) in voted.into_iter().enumerate() {
                let entry = signals.entry(&self.codes[code as usize].0, || training(code, kind));
                entry.knn = share;
                entry.knn_rank = rank + 1;
            }
            for (rank, (code, sim)) in self
                .centroid_ranking(&dots, kind, skip)
                .into_iter()
                .enumerate()
            {
                let entry = signals.entry(&self.codes[code as usize].0, || training(code, kind));
                entry.centroid = sim;
                entry.centroid_rank = rank + 1;
            }
            if let Some(lexical) = lexical {
                for (rank, (code, score)) in lexical[kind].iter().enumerate() {
                    let entry = signals.entry(code, || match self.code_index[kind].get(code) {
                        Some(&c) => training(c, kind),
                        None => Signals::default(),
                    });
                    entry.lexical = *score;
                    entry.lexical_rank = rank + 1;
                }
            }
            if let (Some(m), Some(neighbours)) = (semantic, &semantic_votes) {
                self.add_semantic_signals(&mut signals, kind, m, neighbours, &training);
            }
            signals.list
        })
    }

    /// The fitted notes closest by sentence embeddings (`skip` left out), with softmax weights.
    fn semantic_neighbours(&self, cosines: &[f32], skip: Option<usize>) -> Vec<(usize, f32)> {
        let mut order: Vec<usize> = (0..cosines.len()).filter(|&d| Some(d) != skip).collect();
        let k = SEMANTIC_NEIGHBOURS.min(order.len());
        if k == 0 {
            return Vec::new();
        }
        order.select_nth_unstable_by(k - 1, |&a, &b| cosines[b].total_cmp(&cosines[a]));
        order.truncate(k);
        let best = order.iter().map(|&d| cosines[d]).fold(f32::MIN, f32::max);
        let weights: Vec<f32> = order
            .iter()
            .map(|&d| ((cosines[d] - best) / SEMANTIC_TEMPERATURE).exp())
            .collect();
        let total: f32 = weights.iter().sum::<f32>().max(1e-12);
        order
            .into_iter()
            .zip(weights)
            .map(|(d, w)| (d, w / total))
            .collect()
    }

    /// The embedding neighbours' vote and the description matches of one kind: new candidates
    /// from both, and every candidate's description cosine.
    fn add_semantic_signals<'a>(
        &'a self,
        signals: &mut CandidateSet<'a>,
        kind: usize,
        m: &SemanticMatch,
        neighbours: &[(usize, f32)],
        training: &impl Fn(u32, usize) -> Signals,
    ) {
        let mut voted: HashMap<u32, f32> = HashMap::new();
        for &(d, w) in neighbours {
            for &code in &self.doc_codes[d][kind] {
                *voted.entry(code).or_default() += w;
            }
        }
        let mut voted: Vec<(u32, f32)> = voted.into_iter().collect();
        voted.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        for (rank, (code, share)) in voted.into_iter().enumerate() {
            let entry = signals.entry(&self.codes[code as usize].0, || training(code, kind));
            entry.semantic_knn = share;
            entry.semantic_knn_rank = rank + 1;
        }
        let cosine = |code: u32| m.descriptions.get(code as usize).copied().unwrap_or(0.0);
        let mut closest: Vec<u32> = self.codes_of_kind[kind].clone();
        let keep = DESCRIPTION_CANDIDATES.min(closest.len());
        if keep > 0 {
            closest.select_nth_unstable_by(keep - 1, |&a, &b| {
                cosine(b).total_cmp(&cosine(a)).then(a.cmp(&b))
            });
            closest.truncate(keep);
            closest.sort_by(|&a, &b| cosine(b).total_cmp(&cosine(a)).then(a.cmp(&b)));
        }
        for (rank, &code) in closest.iter().enumerate() {
            let entry = signals.entry(&self.codes[code as usize].0, || training(code, kind));
            entry.description_rank = rank + 1;
        }
        for (code, s) in &mut signals.list {
            if let Some(&c) = self.code_index[kind].get(*code) {
                s.description = cosine(c);
            }
        }
    }

    /// The codes of `kind` whose centroids are closest to the query (`dots`: its dot product
    /// with each centroid): (code id, cosine), best first (`skip`: the fitted note left out of
    /// the centroids it is in).
    fn centroid_ranking(&self, dots: &[f32], kind: usize, skip: Option<usize>) -> Vec<(u32, f32)> {
        let mut ranked: Vec<(u32, f32)> = self.codes_of_kind[kind]
            .iter()
            .filter_map(|&code| {
                let mut dot = dots[code as usize];
                let mut norm2 = self.centroids.norm2(code);
                if skip.is_some_and(|d| self.doc_codes[d][kind].contains(&code)) {
                    // Leave the note out: s − v with ‖v‖ = 1.
                    norm2 += 1.0 - 2.0 * dot;
                    dot -= 1.0;
                }
                (norm2 > 1e-6).then(|| (code, dot / norm2.sqrt()))
            })
            .collect();
        let keep = CENTROID_CANDIDATES.min(ranked.len());
        if keep == 0 {
            return Vec::new();
        }
        ranked.select_nth_unstable_by(keep - 1, |a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        ranked.truncate(keep);
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        ranked
    }

    /// Per kind: (code, confidence) ranked, the tail filled with frequent codes. Confidence is
    /// the reranker's probability where one was fitted, else the vote share.
    fn rank(
        &self,
        candidates: [Vec<(&str, Signals)>; 2],
        rerankers: &[Option<Reranker>; 2],
    ) -> PerKind {
        let mut kind = 0;
        candidates.map(|list| {
            let reranker = rerankers[kind].as_ref();
            let mut ranked: Vec<(&str, f32)> = list
                .into_iter()
                .map(|(code, s)| {
                    let score = match reranker {
                        Some(model) => model.probability(&s),
                        None => s.knn,
                    };
                    // Ties go to the more frequent code.
                    (code, score + 1e-6 * s.training_notes.min(100.0))
                })
                .filter(|(_, score)| *score > 0.0)
                .collect();
            ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(b.0)));
            ranked.truncate(RANKING_LENGTH);
            let mut ranked: Ranked = ranked
                .into_iter()
                .map(|(code, score)| (code.to_string(), score))
                .collect();
            for &code in &self.frequent[kind] {
                if ranked.len() >= RANKING_LENGTH {
                    break;
                }
                let name = &self.codes[code as usize].0;
                if !ranked.iter().any(|(c, _)| c == name) {
                    ranked.push((name.clone(), 0.0));
                }
            }
            ranked.iter_mut().for_each(|(_, c)| *c = c.clamp(0.0, 1.0));
            kind += 1;
            ranked
        })
    }

    /// Leave-one-out over the fitted notes: the (k, power) with the best summed MAP of the
    /// vote alone; then a reranker per kind (vote, code centroids, lexical matches when a
    /// lexicon is given) kept where it raises MAP; then
    /// per kind the threshold with the best micro-F1.
    fn calibrate(&mut self, lexical: Option<&[PerKind]>, semantic: Option<&[SemanticMatch]>) {
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
        let candidates = |settings: (usize, f32), with_lexical: bool| {
            (0..self.docs.len())
                .into_par_iter()
                .map(|d| {
                    let lex = lexical.filter(|_| with_lexical).map(|l| &l[d]);
                    let sem = semantic.filter(|_| with_lexical).map(|s| &s[d]);
                    self.candidates(&self.docs[d], &sims[d], settings, Some(d), lex, sem)
                })
                .collect::<Vec<_>>()
        };
        let maps_of = |ranked: &[PerKind]| {
            [0, 1].map(|kind| {
                mean_average_precision(ranked.iter().zip(&gold).map(|(v, g)| (&v[kind], &g[kind])))
            })
        };
        let none: [Option<Reranker>; 2] = [None, None];
        // (summed MAP, k, power, MAPs)
        type Best = (f64, usize, f32, [f64; 2]);
        let mut best: Option<Best> = None;
        for k in [5, 8, 12, 20, 30, 50] {
            for power in [1.0f32, 2.0, 3.0, 5.0] {
                let ranked: Vec<PerKind> = candidates((k, power), false)
                    .into_iter()
                    .map(|c| self.rank(c, &none))
                    .collect();
                let maps = maps_of(&ranked);
                if best.as_ref().is_none_or(|b| maps[0] + maps[1] > b.0) {
                    best = Some((maps[0] + maps[1], k, power, maps));
                }
            }
        }
        let Some((_, k, power, mut maps)) = best else {
            return;
        };
        let mut rerankers: [Option<Reranker>; 2] = [None, None];
        let mut final_candidates = candidates((k, power), false);
        {
            let with_lexical = candidates((k, power), true);
            let fitted: [Option<Reranker>; 2] = [0, 1].map(|kind| {
                let examples: Vec<(Signals, bool)> = with_lexical
                    .iter()
                    .zip(&gold)
                    .flat_map(|(c, g)| {
                        c[kind]
                            .iter()
                            .map(|(code, s)| (*s, g[kind].contains(code)))
                            .collect::<Vec<_>>()
                    })
                    .collect();
                Reranker::fit(&examples)
            });
            let ranked: Vec<PerKind> = with_lexical
                .iter()
                .map(|c| self.rank(c.clone(), &fitted))
                .collect();
            let reranked_maps = maps_of(&ranked);
            for kind in 0..2 {
                if fitted[kind].is_some() && reranked_maps[kind] > maps[kind] {
                    maps[kind] = reranked_maps[kind];
                    rerankers[kind] = fitted[kind].clone();
                }
            }
            if rerankers.iter().any(Option::is_some) {
                final_candidates = with_lexical;
            }
        }
        let votes: Vec<PerKind> = final_candidates
            .into_iter()
            .map(|c| self.rank(c, &rerankers))
            .collect();
        let mut thresholds = [0.5f32; 2];
        let mut f1s = [0.0f64; 2];
        for kind in 0..2 {
            for step in 1..40 {
                let t = step as f32 * 0.025;
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
            reranked: [rerankers[0].is_some(), rerankers[1].is_some()],
            thresholds,
            loo_map: maps,
            loo_micro_f1: f1s,
        };
        self.rerankers = rerankers;
    }

    /// Code one note. `describe` gives a code's description and billable flag where the code
    /// set knows it; descriptions also pick the evidence sentence.
    pub fn predict(
        &self,
        id: &str,
        text: &str,
        describe: &CodeDescriber<'_>,
        lexicon: Option<&dyn Lexicon>,
        embedder: Option<&SentenceEmbedder>,
    ) -> Result<NotePrediction, CodingError> {
        let started = Instant::now();
        let analyzer = Analyzer::default();
        let words = analyzer.stemmed_words(text);
        let query = self.vectorize(&Analyzer::terms_of(&words));
        let sims = self.similarities(&query);
        let c = &self.calibration;
        let lexical = lexicon
            .filter(|_| self.rerankers.iter().any(Option::is_some))
            .map(|l| l.candidates(text));
        let semantic = match (&self.semantic, embedder) {
            (Some(index), Some(embedder)) if self.rerankers.iter().any(Option::is_some) => {
                Some(index.match_text(embedder, text)?)
            }
            _ => None,
        };
        let votes = self.rank(
            self.candidates(
                &query,
                &sims,
                (c.neighbours, c.power),
                None,
                lexical.as_ref(),
                semantic.as_ref(),
            ),
            &self.rerankers,
        );
        let sentences = NoteSentences::new(text, &words);
        let items = |kind: usize| -> Vec<CodedItem> {
            votes[kind]
                .iter()
                .enumerate()
                .map(|(i, (code, confidence))| {
                    let confidence = *confidence;
                    let code_kind = CodeKind::BOTH[kind];
                    let described = describe(code, code_kind);
                    let assigned = confidence >= c.thresholds[kind];
                    let found = match (&described, assigned) {
                        (Some((description, _)), true) => {
                            best_sentence(&analyzer, description, &sentences, |stem| {
                                self.vocabulary
                                    .get(stem)
                                    .map_or(1.0, |&id| self.idf[id as usize])
                            })
                        }
                        _ => None,
                    };
                    let (evidence, assertion) = match found {
                        Some((span, assertion)) => (vec![span], Some(assertion)),
                        None => (Vec::new(), None),
                    };
                    CodedItem {
                        code: code.clone(),
                        rank: i + 1,
                        confidence,
                        assigned,
                        description: described.as_ref().map(|(d, _)| d.clone()),
                        billable: described.map(|(_, b)| b),
                        evidence,
                        assertion,
                    }
                })
                .collect()
        };
        Ok(NotePrediction {
            id: id.to_string(),
            diagnoses: items(0),
            procedures: items(1),
            warnings: Vec::new(),
            engine: "retrieval".into(),
            model: format!(
                "retrieval: tf-idf kNN (k {}, power {}), ICD lexical reranking {:?}{}{}, fitted on {}",
                c.neighbours,
                c.power,
                c.reranked,
                if lexical.is_none() && c.reranked.iter().any(|r| *r) {
                    ", no code set at hand: unused"
                } else {
                    ""
                },
                match (&self.semantic, &semantic) {
                    (Some(index), Some(_)) => format!(", {}", index.embedder),
                    (Some(_), None) => ", sentence embeddings fitted but no embedder at hand: unused".into(),
                    _ => String::new(),
                },
                self.fitted_on
            ),
            elapsed_ms: started.elapsed().as_secs_f64() * 1e3,
            code_sets: None,
        })
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
    let aps: Vec<f64> = pairs
        .filter(|(_, gold)| !gold.is_empty())
        .map(|(ranking, gold)| average_precision(ranking.iter().map(|(c, _)| c), gold))
        .collect();
    aps.iter().sum::<f64>() / aps.len().max(1) as f64
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
        let index = RetrievalIndex::fit(&notes, "test".into(), FitAids::default()).unwrap();
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
        let p = index.predict("x", text, &describe, None, None).unwrap();
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
            back.predict("x", text, &describe, None, None)
                .unwrap()
                .diagnoses,
            p.diagnoses
        );
    }
}
