//! The retrieval engine's semantic signals, from a sentence embedder (the `minilm-l6` asset,
//! all-MiniLM-L6-v2, run in candle): a note's sentences are embedded once; the note's
//! embedding is their length-weighted mean; the fitted notes closest to it by cosine vote for
//! their codes; and every fitted code's description, embedded when the index is fitted, is
//! matched against the note's sentences (its best sentence's cosine). These find the notes and
//! codes that say the same thing in other words, which the TF-IDF and lexical signals miss.

use std::collections::BTreeMap;

use medcoder_models::row_dots::{dots_with, row_dots};
use medcoder_models::SentenceEmbedder;
use serde::{Deserialize, Serialize};

use super::mentions::MentionMatch;
use crate::text::sentences;
use crate::CodingError;

/// Cosines of a note's embedding: to every fitted note, and per code id its description's
/// best match among the note's sentences (0 for codes without a description).
#[derive(Debug, Clone, Default)]
pub(crate) struct SemanticMatch {
    pub notes: Vec<f32>,
    pub descriptions: Vec<f32>,
    /// The codes whose annotated mention sentences are closest to the note's sentences.
    pub mentions: MentionMatch,
}

/// An annotated mention's sentence among a fitted note's embedded sentences.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MentionSentence {
    pub note: usize,
    pub sentence: usize,
    pub code: u32,
}

/// Mention sentences each sentence of a note votes with (each for every code annotated in
/// it), and the power of the cosine that weighs the vote (embedding cosines crowd into a
/// narrow band).
const MENTION_SENTENCES_PER_SENTENCE: usize = 5;
const MENTION_COSINE_POWER: i32 = 4;

/// What is kept of the fitted notes and codes (saved with the index).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SemanticIndex {
    /// The embedder's name and source, so that a cache built with another one is refitted.
    pub embedder: String,
    pub dimension: usize,
    /// Fitted notes' embeddings, one row of `dimension` each.
    notes: Vec<f32>,
    /// Per code id: its description's embedding (zeros where the code set has none).
    descriptions: Vec<f32>,
    /// The fitted notes' sentences that hold an annotated mention, each once: embeddings
    /// (rows), and per row the note and the codes mentioned in it.
    #[serde(default)]
    mention_rows: Vec<f32>,
    #[serde(default)]
    mention_of: Vec<(u32, Vec<u32>)>,
}

/// A note's sentences' embeddings (rows) and its own embedding.
pub(crate) struct EmbeddedNote {
    sentences: Vec<f32>,
    note: Vec<f32>,
}

/// The embedder's identity as the index records it.
pub(crate) fn embedder_name(embedder: &SentenceEmbedder) -> String {
    format!(
        "{} from {}",
        if embedder.is_static() {
            "static token embeddings"
        } else {
            "sentence embeddings"
        },
        embedder.source().display()
    )
}

fn embedding_error(e: impl std::fmt::Display) -> CodingError {
    CodingError::Invalid(format!("sentence embeddings: {e}"))
}

/// Embeds the notes' sentences in one call (the embedder batches by length).
pub(crate) fn embed_notes(
    embedder: &SentenceEmbedder,
    texts: &[&str],
) -> Result<Vec<EmbeddedNote>, CodingError> {
    let split: Vec<Vec<String>> = texts
        .iter()
        .map(|text| sentences(text).into_iter().map(|s| s.text).collect())
        .collect();
    let all: Vec<&str> = split.iter().flatten().map(String::as_str).collect();
    let mut vectors = embedder.embed(&all).map_err(embedding_error)?.into_iter();
    let dim = embedder.dimension();
    Ok(split
        .iter()
        .map(|note| {
            let mut rows = Vec::with_capacity(note.len() * dim);
            let mut mean = vec![0f32; dim];
            for sentence in note {
                let v = vectors.next().unwrap_or_else(|| vec![0.0; dim]);
                let weight = sentence.chars().count() as f32;
                mean.iter_mut().zip(&v).for_each(|(m, x)| *m += weight * x);
                rows.extend(v);
            }
            normalize(&mut mean);
            EmbeddedNote {
                sentences: rows,
                note: mean,
            }
        })
        .collect())
}

fn normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
}

impl SemanticIndex {
    /// From the fitted notes (already embedded) and each code id's description.
    pub fn build(
        embedder: &SentenceEmbedder,
        notes: &[EmbeddedNote],
        descriptions: &[Option<String>],
        mentions: &[MentionSentence],
    ) -> Result<Self, CodingError> {
        let dim = embedder.dimension();
        let described: Vec<(usize, &str)> = descriptions
            .iter()
            .enumerate()
            .filter_map(|(i, d)| d.as_deref().map(|d| (i, d)))
            .collect();
        let texts: Vec<&str> = described.iter().map(|(_, d)| *d).collect();
        let vectors = embedder.embed(&texts).map_err(embedding_error)?;
        let mut table = vec![0f32; descriptions.len() * dim];
        for ((code, _), v) in described.iter().zip(vectors) {
            table[code * dim..(code + 1) * dim].copy_from_slice(&v);
        }
        // One row per (note, sentence), however many codes are mentioned in it.
        let mut by_sentence: BTreeMap<(usize, usize), Vec<u32>> = BTreeMap::new();
        for m in mentions {
            let codes = by_sentence.entry((m.note, m.sentence)).or_default();
            if !codes.contains(&m.code) {
                codes.push(m.code);
            }
        }
        let mut mention_rows = Vec::with_capacity(by_sentence.len() * dim);
        let mut mention_of = Vec::with_capacity(by_sentence.len());
        for ((note, sentence), codes) in by_sentence {
            let rows = &notes[note].sentences;
            if let Some(row) = rows.get(sentence * dim..(sentence + 1) * dim) {
                mention_rows.extend_from_slice(row);
                mention_of.push((note as u32, codes));
            }
        }
        Ok(Self {
            embedder: embedder_name(embedder),
            dimension: dim,
            notes: notes.iter().flat_map(|n| n.note.iter().copied()).collect(),
            descriptions: table,
            mention_rows,
            mention_of,
        })
    }

    /// The note's cosines to every fitted note and every code's description, and the votes of
    /// the mention sentences closest to its sentences (`skip`: a fitted note's left out).
    pub fn match_note(&self, note: &EmbeddedNote, skip: Option<usize>) -> SemanticMatch {
        let dim = self.dimension;
        if dim == 0 || note.note.len() != dim {
            return SemanticMatch::default();
        }
        let to_notes = dots_with(&self.notes, &note.note);
        let codes = self.descriptions.len() / dim;
        let mut cosines = Vec::new();
        // [sentences, codes] → best sentence per code
        row_dots(&self.descriptions, &note.sentences, dim, &mut cosines);
        let to_descriptions = if note.sentences.is_empty() {
            vec![0.0; codes]
        } else {
            let mut best = vec![f32::NEG_INFINITY; codes];
            for sentence in cosines.chunks_exact(codes.max(1)) {
                best.iter_mut()
                    .zip(sentence)
                    .for_each(|(b, c)| *b = b.max(*c));
            }
            best
        };
        let mentions = if self.mention_of.is_empty() || note.sentences.is_empty() {
            MentionMatch::default()
        } else {
            row_dots(&self.mention_rows, &note.sentences, dim, &mut cosines);
            self.mention_votes(&cosines, skip)
        };
        SemanticMatch {
            notes: to_notes,
            descriptions: to_descriptions,
            mentions,
        }
    }

    /// Each sentence's closest mention sentences (cosines: [sentence, mention row], row-major)
    /// vote for their codes with a power of their cosine.
    fn mention_votes(&self, cosines: &[f32], skip: Option<usize>) -> MentionMatch {
        let mut found = MentionMatch::default();
        for (s, sentence) in cosines.chunks_exact(self.mention_of.len()).enumerate() {
            let rows = closest_rows(sentence, |r| Some(self.mention_of[r].0 as usize) != skip);
            for &r in &rows {
                let cosine = sentence[r];
                for &code in &self.mention_of[r].1 {
                    let score = found.entry(code).or_default();
                    score.votes += cosine.powi(MENTION_COSINE_POWER);
                    if cosine > score.best {
                        score.best = cosine;
                        score.sentence = s;
                    }
                }
            }
        }
        found
    }

    /// Embeds and matches one note.
    pub fn match_text(
        &self,
        embedder: &SentenceEmbedder,
        text: &str,
    ) -> Result<SemanticMatch, CodingError> {
        let embedded = embed_notes(embedder, &[text])?;
        Ok(embedded
            .first()
            .map(|note| self.match_note(note, None))
            .unwrap_or_default())
    }
}

/// The [`MENTION_SENTENCES_PER_SENTENCE`] rows of highest positive cosine that `eligible`
/// lets through, best first (ties to the lower row), in one pass: a row is compared with the
/// worst kept so far, and most are not kept.
fn closest_rows(cosines: &[f32], eligible: impl Fn(usize) -> bool) -> Vec<usize> {
    const K: usize = MENTION_SENTENCES_PER_SENTENCE;
    let mut kept: Vec<usize> = Vec::with_capacity(K + 1);
    for (r, &cosine) in cosines.iter().enumerate() {
        // Rows come in increasing order, so a tie with the worst kept loses to it.
        let beats_worst = kept.len() < K || kept.last().is_some_and(|&w| cosine > cosines[w]);
        if cosine > 0.0 && beats_worst && eligible(r) {
            let at = kept.partition_point(|&k| cosines[k] >= cosine);
            kept.insert(at, r);
            kept.truncate(K);
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use medcoder_assets::MedcoderHome;

    fn minilm() -> Option<SentenceEmbedder> {
        let dir = MedcoderHome::from_env().ok()?.asset_dir("minilm-l6");
        if !dir.join("model.safetensors").is_file() {
            eprintln!(
                "skipped: the minilm-l6 asset is not installed (run `medcoder assets fetch`)"
            );
            return None;
        }
        Some(SentenceEmbedder::load(&dir, &Device::Cpu).unwrap())
    }

    #[test]
    fn notes_and_descriptions_are_matched_by_meaning_not_words() {
        let Some(embedder) = minilm() else { return };
        let fitted = [
            "Known type 2 diabetes mellitus on metformin. Glucose was high.",
            "Community acquired pneumonia of the right lower lobe treated with antibiotics.",
        ];
        let embedded = embed_notes(&embedder, &fitted).unwrap();
        let descriptions = [
            Some("Type 2 diabetes mellitus without complications".to_string()),
            Some("Pneumonia, unspecified organism".to_string()),
            None,
        ];
        // Each note's first sentence annotated with its code.
        let mentions = [0, 1].map(|note| MentionSentence {
            note,
            sentence: 0,
            code: note as u32,
        });
        let index = SemanticIndex::build(&embedder, &embedded, &descriptions, &mentions).unwrap();
        // Shares no content word with the second note or the pneumonia description.
        let query = "Fever and a productive cough. The chest film showed a lung infection.";
        let m = index.match_text(&embedder, query).unwrap();
        assert_eq!(m.notes.len(), 2);
        assert!(m.notes[1] > m.notes[0] + 0.1, "{:?}", m.notes);
        assert_eq!(m.descriptions.len(), 3);
        assert!(
            m.descriptions[1] > m.descriptions[0] + 0.1,
            "{:?}",
            m.descriptions
        );
        assert_eq!(m.descriptions[2], 0.0);
        // The annotated pneumonia sentence is closer to the query's sentences than the
        // diabetes one; left out with its note, it votes no more.
        assert!(
            m.mentions[&1].best > m.mentions[&0].best + 0.1,
            "{:?}",
            m.mentions
        );
        let embedded_query = embed_notes(&embedder, &[query]).unwrap();
        let without_note_1 = index.match_note(&embedded_query[0], Some(1)).mentions;
        assert_eq!(without_note_1.keys().collect::<Vec<_>>(), [&0]);
        // Read back from JSON, the index matches the same.
        let back: SemanticIndex =
            serde_json::from_str(&serde_json::to_string(&index).unwrap()).unwrap();
        assert_eq!(back.match_text(&embedder, query).unwrap().notes, m.notes);
    }

    #[test]
    fn closest_rows_are_the_best_positive_eligible_ones_ties_to_the_lower_row() {
        let cosines = [0.5, -0.2, 0.9, 0.5, 0.0, 0.7, 0.5, 0.9, 0.1, 0.3];
        let all = closest_rows(&cosines, |_| true);
        assert_eq!(all, [2, 7, 5, 0, 3]);
        // The sort this replaces: by cosine descending, then row ascending.
        let mut sorted: Vec<usize> = (0..cosines.len()).filter(|&r| cosines[r] > 0.0).collect();
        sorted.sort_by(|&a, &b| cosines[b].total_cmp(&cosines[a]).then(a.cmp(&b)));
        assert_eq!(all, sorted[..MENTION_SENTENCES_PER_SENTENCE]);
        assert_eq!(
            closest_rows(&cosines, |r| r != 7 && r != 0),
            [2, 5, 3, 6, 9]
        );
        assert_eq!(closest_rows(&[-1.0, 0.0], |_| true), Vec::<usize>::new());
        assert_eq!(closest_rows(&[0.2, 0.4], |_| true), [1, 0]);
    }
}
