//! The retrieval engine's semantic signals, from a sentence embedder (the `minilm-l6` asset,
//! all-MiniLM-L6-v2, run in candle): a note's sentences are embedded once; the note's
//! embedding is their length-weighted mean; the fitted notes closest to it by cosine vote for
//! their codes; and every fitted code's description, embedded when the index is fitted, is
//! matched against the note's sentences (its best sentence's cosine). These find the notes and
//! codes that say the same thing in other words, which the TF-IDF and lexical signals miss.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use medcoder_models::quantized_rows::QuantizedRows;
use medcoder_models::row_dots::{dot, dots_with};
use medcoder_models::SentenceEmbedder;
use serde::{Deserialize, Serialize};

use super::mentions::MentionMatch;
use crate::text::sentences;
use crate::CodingError;

/// Cosines of a note's embedding: to every fitted note, and per kind the code ids whose
/// descriptions best match one of the note's sentences (any other code's:
/// [`SemanticIndex::description_cosine`]).
#[derive(Debug, Clone, Default)]
pub(crate) struct SemanticMatch {
    pub notes: Vec<f32>,
    /// Per kind: (code id, its description's best cosine with a sentence), best first (ties
    /// to the lower id), as many as asked for.
    pub closest_descriptions: [Vec<(u32, f32)>; 2],
    /// The note's sentences' embeddings (rows).
    sentences: Vec<f32>,
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
    /// `descriptions` and `mention_rows` rounded to integers, for a first pass that rules
    /// out most rows before the exact products (built on first use).
    #[serde(skip)]
    quantized: OnceLock<[QuantizedRows; 2]>,
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
            quantized: OnceLock::new(),
        })
    }

    /// The note's cosines to every fitted note, per kind the `keep` codes (of
    /// `codes_of_kind`) whose descriptions are closest to one of its sentences, and the votes
    /// of the mention sentences closest to its sentences (`skip`: a fitted note's left out).
    ///
    /// Sentences × descriptions and sentences × mention sentences are millions of products a
    /// note; a first pass in integers bounds each one, and only the rows that can still be
    /// among the closest are computed exactly, so the answer is the `f32` pass's to the bit.
    pub fn match_note(
        &self,
        note: &EmbeddedNote,
        skip: Option<usize>,
        codes_of_kind: &[Vec<u32>; 2],
        keep: usize,
    ) -> SemanticMatch {
        let dim = self.dimension;
        if dim == 0 || note.note.len() != dim {
            return SemanticMatch::default();
        }
        let to_notes = dots_with(&self.notes, &note.note);
        let [descriptions, mention_rows] = self.quantized.get_or_init(|| {
            [
                QuantizedRows::new(&self.descriptions, dim),
                QuantizedRows::new(&self.mention_rows, dim),
            ]
        });
        let sentences = QuantizedRows::new(&note.sentences, dim);
        let (mut approx, mut bound) = (Vec::new(), Vec::new());
        let mut m = SemanticMatch {
            notes: to_notes,
            sentences: note.sentences.clone(),
            ..SemanticMatch::default()
        };
        // [sentences, codes] → per code the best sentence's bounds
        descriptions.dots_with_bounds(&sentences, &mut approx, &mut bound);
        let codes = descriptions.rows();
        let (mut low, mut high) = (vec![0f32; codes], vec![0f32; codes]);
        if sentences.rows() > 0 {
            low.fill(f32::NEG_INFINITY);
            high.fill(f32::NEG_INFINITY);
            for (a, b) in approx
                .chunks_exact(codes.max(1))
                .zip(bound.chunks_exact(codes.max(1)))
            {
                for c in 0..codes {
                    low[c] = low[c].max(a[c] - b[c]);
                    high[c] = high[c].max(a[c] + b[c]);
                }
            }
        }
        for (kind, of_kind) in codes_of_kind.iter().enumerate() {
            let cosine = |code: u32| self.description_cosine(&m, code);
            let candidates = survivors(of_kind, keep, &low, &high);
            let mut closest: Vec<(u32, f32)> = candidates.map(|c| (c, cosine(c))).collect();
            closest.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            closest.truncate(keep);
            m.closest_descriptions[kind] = closest;
        }
        if !self.mention_of.is_empty() && sentences.rows() > 0 {
            mention_rows.dots_with_bounds(&sentences, &mut approx, &mut bound);
            m.mentions = self.mention_votes(&note.sentences, (&approx, &bound), skip);
        }
        m
    }

    /// The best cosine of a code's description with one of the note's sentences (0 for a code
    /// without a description, or a note without sentences).
    pub fn description_cosine(&self, m: &SemanticMatch, code: u32) -> f32 {
        let dim = self.dimension;
        let Some(row) = self
            .descriptions
            .get(code as usize * dim..(code as usize + 1) * dim)
        else {
            return 0.0;
        };
        if dim == 0 || m.sentences.is_empty() {
            return 0.0;
        }
        m.sentences
            .chunks_exact(dim)
            .map(|sentence| dot(row, sentence))
            .fold(f32::NEG_INFINITY, f32::max)
    }

    /// Each sentence's closest mention sentences vote for their codes with a power of their
    /// cosine. `(approx, bound)`: [sentence, mention row] products of the integer pass, each
    /// within its bound of the exact one; only rows that can be among a sentence's closest
    /// are computed exactly.
    fn mention_votes(
        &self,
        sentences: &[f32],
        (approx, bound): (&[f32], &[f32]),
        skip: Option<usize>,
    ) -> MentionMatch {
        let dim = self.dimension;
        let rows = self.mention_of.len();
        let eligible = |r: usize| Some(self.mention_of[r].0 as usize) != skip;
        let mut found = MentionMatch::default();
        for (s, sentence) in sentences.chunks_exact(dim).enumerate() {
            let (a, b) = (
                &approx[s * rows..(s + 1) * rows],
                &bound[s * rows..(s + 1) * rows],
            );
            // No row below the K-th best lower bound can be among the K closest.
            let floor = kth_largest(
                (0..rows).filter(|&r| eligible(r)).map(|r| a[r] - b[r]),
                MENTION_SENTENCES_PER_SENTENCE,
            );
            let exact = (0..rows)
                .filter(|&r| a[r] + b[r] >= floor && a[r] + b[r] > 0.0 && eligible(r))
                .map(|r| (r, dot(&self.mention_rows[r * dim..(r + 1) * dim], sentence)));
            for (r, cosine) in closest_rows(exact) {
                self.vote(&mut found, s, r, cosine);
            }
        }
        found
    }

    /// Sentence `s` votes, by its cosine with mention row `r`, for the codes of that row.
    fn vote(&self, found: &mut MentionMatch, s: usize, r: usize, cosine: f32) {
        for &code in &self.mention_of[r].1 {
            let score = found.entry(code).or_default();
            score.votes += cosine.powi(MENTION_COSINE_POWER);
            if cosine > score.best {
                score.best = cosine;
                score.sentence = s;
            }
        }
    }

    /// Embeds and matches one note.
    pub fn match_text(
        &self,
        embedder: &SentenceEmbedder,
        text: &str,
        codes_of_kind: &[Vec<u32>; 2],
        keep: usize,
    ) -> Result<SemanticMatch, CodingError> {
        let embedded = embed_notes(embedder, &[text])?;
        Ok(embedded
            .first()
            .map(|note| self.match_note(note, None, codes_of_kind, keep))
            .unwrap_or_default())
    }
}

/// The [`MENTION_SENTENCES_PER_SENTENCE`] rows of highest positive cosine among `rows`
/// ((row, cosine) in increasing row order), best first (ties to the lower row).
fn closest_rows(rows: impl Iterator<Item = (usize, f32)>) -> Vec<(usize, f32)> {
    best_k(
        rows.filter(|&(_, cosine)| cosine > 0.0),
        MENTION_SENTENCES_PER_SENTENCE,
        |&(_, cosine)| cosine,
    )
}

/// The `k`-th largest of `values` (−∞ when there are fewer).
fn kth_largest(values: impl Iterator<Item = f32>, k: usize) -> f32 {
    if k == 0 {
        return f32::NEG_INFINITY;
    }
    let top = best_k(values, k, |&v| v);
    top.get(k - 1).copied().unwrap_or(f32::NEG_INFINITY)
}

/// The `k` items of highest `value`, best first (ties to the earlier item), in one pass: an
/// item is compared with the worst kept so far, and most are not kept.
fn best_k<T>(items: impl Iterator<Item = T>, k: usize, value: impl Fn(&T) -> f32) -> Vec<T> {
    let mut kept: Vec<T> = Vec::with_capacity(k + 1);
    for item in items {
        let v = value(&item);
        // Items come in order, so a tie with the worst kept loses to it.
        if kept.len() < k || kept.last().is_some_and(|w| v > value(w)) {
            let at = kept.partition_point(|kept| value(kept) >= v);
            kept.insert(at, item);
            kept.truncate(k);
        }
    }
    kept
}

/// The codes of `of_kind` that can be among the `keep` of highest exact value, given each
/// code's lower and upper bound: those whose upper bound reaches the `keep`-th best lower one.
fn survivors<'a>(
    of_kind: &'a [u32],
    keep: usize,
    low: &'a [f32],
    high: &'a [f32],
) -> impl Iterator<Item = u32> + 'a {
    let bound = |c: u32, table: &[f32]| table.get(c as usize).copied().unwrap_or(0.0);
    let floor = if keep == 0 {
        f32::INFINITY
    } else {
        kth_largest(of_kind.iter().map(|&c| bound(c, low)), keep)
    };
    of_kind
        .iter()
        .copied()
        .filter(move |&c| bound(c, high) >= floor)
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
        // Codes 0 and 1 of one kind, code 2 of the other.
        let kinds = [vec![0, 1], vec![2]];
        // Shares no content word with the second note or the pneumonia description.
        let query = "Fever and a productive cough. The chest film showed a lung infection.";
        let m = index.match_text(&embedder, query, &kinds, 2).unwrap();
        assert_eq!(m.notes.len(), 2);
        assert!(m.notes[1] > m.notes[0] + 0.1, "{:?}", m.notes);
        let closest = &m.closest_descriptions[0];
        assert_eq!(closest.iter().map(|c| c.0).collect::<Vec<_>>(), [1, 0]);
        assert!(closest[0].1 > closest[1].1 + 0.1, "{closest:?}");
        assert_eq!(index.description_cosine(&m, 1), closest[0].1);
        assert_eq!(m.closest_descriptions[1], [(2, 0.0)]);
        assert_eq!(index.description_cosine(&m, 2), 0.0);
        assert_eq!(index.description_cosine(&m, 7), 0.0);
        // The annotated pneumonia sentence is closer to the query's sentences than the
        // diabetes one; left out with its note, it votes no more.
        assert!(
            m.mentions[&1].best > m.mentions[&0].best + 0.1,
            "{:?}",
            m.mentions
        );
        let embedded_query = embed_notes(&embedder, &[query]).unwrap();
        let without_note_1 = index
            .match_note(&embedded_query[0], Some(1), &kinds, 2)
            .mentions;
        assert_eq!(without_note_1.keys().collect::<Vec<_>>(), [&0]);
        // Read back from JSON, the index matches the same.
        let back: SemanticIndex =
            serde_json::from_str(&serde_json::to_string(&index).unwrap()).unwrap();
        assert_eq!(
            back.match_text(&embedder, query, &kinds, 2).unwrap().notes,
            m.notes
        );
    }

    #[test]
    fn closest_rows_are_the_best_positive_ones_ties_to_the_lower_row() {
        let cosines = [0.5, -0.2, 0.9, 0.5, 0.0, 0.7, 0.5, 0.9, 0.1, 0.3];
        let rows = |skip: &[usize]| {
            closest_rows(
                cosines
                    .iter()
                    .enumerate()
                    .filter(|(r, _)| !skip.contains(r))
                    .map(|(r, &c)| (r, c)),
            )
            .into_iter()
            .map(|(r, _)| r)
            .collect::<Vec<_>>()
        };
        let all = rows(&[]);
        assert_eq!(all, [2, 7, 5, 0, 3]);
        // The sort this replaces: by cosine descending, then row ascending.
        let mut sorted: Vec<usize> = (0..cosines.len()).filter(|&r| cosines[r] > 0.0).collect();
        sorted.sort_by(|&a, &b| cosines[b].total_cmp(&cosines[a]).then(a.cmp(&b)));
        assert_eq!(all, sorted[..MENTION_SENTENCES_PER_SENTENCE]);
        assert_eq!(rows(&[7, 0]), [2, 5, 3, 6, 9]);
        assert!(closest_rows([(0, -1.0), (1, 0.0)].into_iter()).is_empty());
        assert_eq!(
            closest_rows([(0, 0.2), (1, 0.4)].into_iter()),
            [(1, 0.4), (0, 0.2)]
        );
    }

    #[test]
    fn the_pruned_match_is_the_full_f32_one() {
        use medcoder_models::row_dots::row_dots;
        let dim = 40;
        let mut state = 7u32;
        let mut vectors = |n: usize| -> Vec<f32> {
            let mut v: Vec<f32> = (0..n * dim)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 17;
                    state ^= state << 5;
                    (state % 2001) as f32 / 1000.0 - 1.0
                })
                .collect();
            // Close rows: near-ties that only the exact pass tells apart.
            for row in v.chunks_exact_mut(dim) {
                row[0] += 3.0;
                normalize(row);
            }
            v
        };
        let (codes, rows) = (50, 60);
        let index = SemanticIndex {
            embedder: "test".into(),
            dimension: dim,
            notes: vectors(3),
            descriptions: vectors(codes),
            mention_rows: vectors(rows),
            mention_of: (0..rows)
                .map(|r| ((r % 3) as u32, vec![(r % 7) as u32]))
                .collect(),
            quantized: OnceLock::new(),
        };
        let note = EmbeddedNote {
            sentences: vectors(6),
            note: vectors(1),
        };
        let kinds = [(0..30).collect::<Vec<u32>>(), (30..50).collect()];
        let m = index.match_note(&note, Some(1), &kinds, 4);
        let mut cosines = Vec::new();
        row_dots(&index.descriptions, &note.sentences, dim, &mut cosines);
        let best: Vec<f32> = (0..codes)
            .map(|c| {
                (0..6)
                    .map(|s| cosines[s * codes + c])
                    .fold(f32::NEG_INFINITY, f32::max)
            })
            .collect();
        for (kind, of_kind) in kinds.iter().enumerate() {
            let mut want: Vec<(u32, f32)> =
                of_kind.iter().map(|&c| (c, best[c as usize])).collect();
            want.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            want.truncate(4);
            assert_eq!(m.closest_descriptions[kind], want);
        }
        row_dots(&index.mention_rows, &note.sentences, dim, &mut cosines);
        let mut want = MentionMatch::default();
        for (s, sentence) in cosines.chunks_exact(rows).enumerate() {
            let eligible = sentence
                .iter()
                .enumerate()
                .filter(|(r, _)| index.mention_of[*r].0 != 1)
                .map(|(r, &c)| (r, c));
            for (r, cosine) in closest_rows(eligible) {
                index.vote(&mut want, s, r, cosine);
            }
        }
        assert!(!want.is_empty());
        let sorted = |found: &MentionMatch| {
            let mut all: Vec<String> = found.iter().map(|e| format!("{e:?}")).collect();
            all.sort();
            all
        };
        assert_eq!(sorted(&m.mentions), sorted(&want));
    }

    #[test]
    fn survivors_hold_every_code_that_can_make_the_best() {
        assert_eq!(kth_largest([3.0, 1.0, 2.0].into_iter(), 2), 2.0);
        assert_eq!(kth_largest([3.0].into_iter(), 2), f32::NEG_INFINITY);
        // Exact values 0.9, 0.5, 0.45, 0.1 known to ±0.1 (code 2's to ±0.01): the best two
        // are 0 and 1; code 2 (high 0.46) can still beat code 1 (low 0.4), code 3 cannot.
        let low = [0.8, 0.4, 0.44, 0.0];
        let high = [1.0, 0.6, 0.46, 0.2];
        let codes = [0, 1, 2, 3];
        assert_eq!(
            survivors(&codes, 2, &low, &high).collect::<Vec<_>>(),
            [0, 1, 2]
        );
        assert_eq!(survivors(&codes, 0, &low, &high).count(), 0);
        assert_eq!(survivors(&codes, 9, &low, &high).count(), 4);
    }
}
