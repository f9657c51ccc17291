//! The `retrieval` engine: codes of the most similar labelled notes, and of the places in
//! them that say the same thing. Notes become TF-IDF vectors (stemmed words and word pairs,
//! sublinear term frequency, L2-normalised); a new note's `k` nearest labelled notes vote for
//! their codes with weight `similarity^power`. Each candidate code also gets its kernel ridge
//! score over all fitted notes (module `ridge`), the closest code centroids, the lexical match against the code sets' descriptions, the votes of annotated
//! mention windows close to the note's sentences (module `mentions`) and, with an embedder, the
//! semantic signals (module `semantic`); a logistic reranker per kind fuses them into the
//! confidence. `k`, `power`, the rerankers and the decision thresholds are calibrated by
//! leave-one-out on the notes the index is fitted on (never on the notes it is evaluated on).
//! The ranking is extended with the most frequent codes so that ranked metrics see a full
//! list. Evidence: the note's sentence that best matches the code's description, else the
//! sentence that matched one of its annotated mentions.

use foldhash::{HashMap, HashMapExt};
use std::time::Instant;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::assertion::assertion_in_note;
use crate::lexical::{Lexicon, Ranked};
use crate::prediction::{CodeDescriber, CodeKind, CodedItem, EvidenceSpan, NotePrediction};
use crate::rerank::{Reranker, Signals};
use crate::text::Analyzer;
use crate::CodingError;

mod calibration;
mod candidate_signals;
mod centroids;
mod mentions;
mod ridge;
mod semantic;

use crate::evidence::{best_sentence, NoteSentences};
use centroids::Centroids;
use medcoder_models::SentenceEmbedder;
pub use mentions::GoldMention;
use mentions::{mention_sentences, MentionIndex, MentionMatch, MentionWindow};
use ridge::WordRidge;
use semantic::{embed_notes, embedder_name, SemanticIndex, SemanticMatch};

/// A note with its gold codes, to fit the index on.
#[derive(Debug, Clone)]
pub struct LabelledNote {
    pub id: String,
    pub text: String,
    pub diagnoses: Vec<String>,
    pub procedures: Vec<String>,
    /// Where the annotations place gold codes in the text (empty when the dataset has none).
    pub mentions: Vec<GoldMention>,
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

    /// The code's signals when it is already a candidate or when `admit` (a new candidate is
    /// made by `new`); `None` otherwise.
    fn entry_if(
        &mut self,
        code: &'a str,
        admit: bool,
        new: impl FnOnce() -> Signals,
    ) -> Option<&mut Signals> {
        if admit {
            return Some(self.entry(code, new));
        }
        let i = *self.at.get(code)?;
        Some(&mut self.list[i].1)
    }
}

/// What a note matched besides its neighbours, each where the index and the caller have it:
/// code descriptions (lexically), sentence embeddings, annotated mention windows.
#[derive(Clone, Copy)]
struct NoteMatches<'a, 'm> {
    lexical: Option<&'a PerKind>,
    semantic: Option<&'m SemanticMatch>,
    mentions: Option<&'m MentionMatch>,
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
    /// The fitted notes' annotated mention windows (empty without annotations).
    #[serde(default)]
    mentions: MentionIndex,
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
    /// Kernel ridge regression of the codes on the fitted notes (none above its size limit).
    #[serde(skip)]
    ridge: Option<WordRidge>,
}

/// Bumped whenever what the index holds or how it scores changes, so that caches of an older
/// build are refitted rather than misread.
const INDEX_FORMAT: u32 = 10;

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
/// Candidates taken from the codes the mention windows vote for most, per kind.
const MENTION_CANDIDATES: usize = 30;
/// Per kind, the codes with the highest kernel ridge scores that join the candidates.
const RIDGE_CANDIDATES: usize = 30;

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
            for m in &note.mentions {
                hash.update(format!("{:?} {} {} {}", m.kind, m.code, m.start, m.end).as_bytes());
                hash.update([2]);
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
            mentions: MentionIndex::default(),
            codes_of_kind: Default::default(),
            frequent: Default::default(),
            code_index: Default::default(),
            centroids: Centroids::default(),
            postings: Vec::new(),
            ridge: None,
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
        for (code, &id) in &code_ids {
            index.codes[id as usize] = code.clone();
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
                let mentions = mention_sentences(notes, &code_ids);
                let semantic = SemanticIndex::build(embedder, &embedded, &descriptions, &mentions)?;
                let matches: Vec<SemanticMatch> = embedded
                    .par_iter()
                    .enumerate()
                    .map(|(d, n)| {
                        semantic.match_note(
                            n,
                            Some(d),
                            &index.codes_of_kind,
                            DESCRIPTION_CANDIDATES,
                        )
                    })
                    .collect();
                index.semantic = Some(semantic);
                Some(matches)
            }
            None => None,
        };
        index.mentions = index.mention_windows(notes, &code_ids, &analyzer);
        let mentions: Option<Vec<MentionMatch>> = (!index.mentions.is_empty()).then(|| {
            notes
                .par_iter()
                .enumerate()
                .map(|(d, note)| {
                    let words = analyzer.stemmed_words(&note.text);
                    index.match_mentions(&NoteSentences::new(&note.text, &words), Some(d))
                })
                .collect()
        });
        index.calibrate(lexical.as_deref(), semantic.as_deref(), mentions.as_deref());
        Ok(index)
    }

    /// Read back from JSON (what [`Self::derive_tables`] builds is rebuilt).
    pub fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        let mut index: Self = serde_json::from_str(text)?;
        if let Some(r) = index
            .rerankers
            .iter()
            .flatten()
            .find(|r| !r.fits_this_build())
        {
            return Err(serde::de::Error::custom(format!(
                "its reranker weighs {} features, this build computes {}: refit",
                r.features(),
                crate::rerank::FEATURES
            )));
        }
        index.derive_tables();
        index.mentions.derive_tables();
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
        self.ridge = self.word_ridge();
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

    /// The windows around the fitted notes' annotated mentions of their own gold codes.
    fn mention_windows(
        &self,
        notes: &[LabelledNote],
        code_ids: &HashMap<(String, CodeKind), u32>,
        analyzer: &Analyzer,
    ) -> MentionIndex {
        let windows = notes
            .par_iter()
            .enumerate()
            .flat_map_iter(|(d, note)| {
                let chars: Vec<char> = note.text.chars().collect();
                note.mentions
                    .iter()
                    .filter_map(|m| {
                        let code = *code_ids.get(&(m.code.clone(), m.kind))?;
                        let window: String = m.window(&chars).iter().collect();
                        let vector = self.vectorize(&analyzer.terms(&window));
                        (!vector.is_empty()).then_some(MentionWindow {
                            note: d as u32,
                            code,
                            vector,
                        })
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        MentionIndex::new(windows)
    }

    /// The note's sentences matched against the mention windows (`skip`: a fitted note left
    /// out); a match names its sentence by its index in `sentences`.
    fn match_mentions(&self, sentences: &NoteSentences<'_>, skip: Option<usize>) -> MentionMatch {
        let vectors: Vec<SparseVec> = sentences.terms().map(|t| self.vectorize(&t)).collect();
        self.mentions.match_sentences(&vectors, skip)
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
    /// note's other matches; `skip`: a fitted note left out, for leave-one-out), in the order
    /// the codes were first met (voted, closest centroids, lexical, semantic, mention matches).
    fn candidates<'a>(
        &'a self,
        query: &SparseVec,
        sims: &[f32],
        (k, power): (usize, f32),
        skip: Option<usize>,
        matches: NoteMatches<'a, '_>,
    ) -> [Vec<(&'a str, Signals)>; 2] {
        let NoteMatches {
            lexical,
            semantic,
            mentions,
        } = matches;
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
        let ridge_weights = self.ridge_weights(query, skip);
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
            if let Some(weights) = &ridge_weights {
                self.add_ridge_signals(&mut signals, kind, weights, &training);
            }
            if let (Some(m), Some(neighbours)) = (semantic, &semantic_votes) {
                self.add_semantic_signals(&mut signals, kind, m, neighbours, &training);
            }
            if let Some(found) = mentions {
                self.add_mention_signals(&mut signals, kind, found, &training, |s| &mut s.mention);
            }
            if let Some(m) = semantic.filter(|m| !m.mentions.is_empty()) {
                self.add_mention_signals(&mut signals, kind, &m.mentions, &training, |s| {
                    &mut s.mention_semantic
                });
            }
            signals.list
        })
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
            (Some(index), Some(embedder)) if self.rerankers.iter().any(Option::is_some) => Some(
                index.match_text(embedder, text, &self.codes_of_kind, DESCRIPTION_CANDIDATES)?,
            ),
            _ => None,
        };
        let sentences = NoteSentences::new(text, &words);
        let mentions = (!self.mentions.is_empty() && self.rerankers.iter().any(Option::is_some))
            .then(|| self.match_mentions(&sentences, None));
        let candidates = self.candidates(
            &query,
            &sims,
            (c.neighbours, c.power),
            None,
            NoteMatches {
                lexical: lexical.as_ref(),
                semantic: semantic.as_ref(),
                mentions: mentions.as_ref(),
            },
        );
        let votes = self.rank(candidates, &self.rerankers);
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
                    }
                    .or_else(|| {
                        // No description words in the note: the sentence that matched an
                        // annotated mention of the code best.
                        let code_id = self.code_index[kind].get(code.as_str())?;
                        let score = mentions
                            .as_ref()
                            .and_then(|m| m.get(code_id))
                            .or_else(|| semantic.as_ref()?.mentions.get(code_id))?;
                        let sentence = sentences.span(score.sentence).filter(|_| assigned)?;
                        Some((
                            EvidenceSpan {
                                start: sentence.start,
                                end: sentence.end,
                                text: sentence.text.clone(),
                            },
                            assertion_in_note(text, sentence.start),
                        ))
                    });
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
                    (Some(index), None) if c.reranked.iter().all(|r| !r) => format!(
                        ", {} fitted, unused: leave-one-out kept no reranker",
                        index.embedder
                    ),
                    (Some(index), None) => format!(
                        ", {} fitted but no embedder at hand: unused",
                        index.embedder
                    ),
                    _ => String::new(),
                },
                self.fitted_on
            ),
            elapsed_ms: started.elapsed().as_secs_f64() * 1e3,
            code_sets: None,
        })
    }
}

#[cfg(test)]
mod tests;
