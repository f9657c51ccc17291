//! Mention matching: where the fitted notes' annotations say a gold code is mentioned
//! (CodiEsp's evidence spans), the words around that place are kept as a *mention window* of
//! the code. A new note's sentences are compared with every window (TF-IDF cosine); each
//! sentence's closest windows vote for their codes. This localises what the whole-note
//! neighbours only see diluted in a long note: "an enlarged right testicle" matches the
//! window a training note annotated with N44.8, whatever else either note says.
//!
//! CodiEsp annotated the Spanish original; the English translation is not aligned with it
//! sentence by sentence, so a span is placed in the translation by its relative position
//! (measured: for 91 % of the annotations whose Spanish words of six letters or more also
//! occur in the English text, such a word lies in the placed sentence or its neighbours).
//! The window's margin absorbs part of that drift.

use foldhash::{HashMap, HashMapExt};

use serde::{Deserialize, Serialize};

use super::semantic::MentionSentence;
use super::{LabelledNote, SparseVec};
use crate::prediction::CodeKind;
use crate::text::sentences;

/// Per annotated mention of the fitted notes: the sentence of its note it starts in.
pub(super) fn mention_sentences(
    notes: &[LabelledNote],
    code_ids: &HashMap<(String, CodeKind), u32>,
) -> Vec<MentionSentence> {
    let mut found = Vec::new();
    for (d, note) in notes.iter().enumerate() {
        if note.mentions.is_empty() {
            continue;
        }
        let spans = sentences(&note.text);
        for m in &note.mentions {
            let Some(&code) = code_ids.get(&(m.code.clone(), m.kind)) else {
                continue;
            };
            let sentence = spans
                .iter()
                .position(|s| m.start < s.end)
                .unwrap_or(spans.len().saturating_sub(1));
            found.push(MentionSentence {
                note: d,
                sentence,
                code,
            });
        }
    }
    found
}

/// Characters kept on each side of a placed mention.
pub(crate) const WINDOW_MARGIN: usize = 40;
/// Windows each sentence of a note votes with.
const WINDOWS_PER_SENTENCE: usize = 50;

/// Where a note mentions one of its gold codes: `[start, end)` in characters of the note's
/// text (exact when annotated on that text, placed by relative position when annotated on
/// another language's text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoldMention {
    pub kind: CodeKind,
    pub code: String,
    pub start: usize,
    pub end: usize,
}

impl GoldMention {
    /// A span annotated on a text of `source_chars` characters placed in a text of
    /// `target_chars` characters (the same text when the two lengths are equal); `None` for
    /// an empty or out-of-range span.
    pub fn placed(
        kind: CodeKind,
        code: String,
        (start, end): (u64, u64),
        source_chars: u64,
        target_chars: usize,
    ) -> Option<Self> {
        if end <= start || end > source_chars {
            return None;
        }
        let scale = target_chars as f64 / source_chars as f64;
        let at = |offset: u64| ((offset as f64 * scale).round() as usize).min(target_chars);
        Some(Self {
            kind,
            code,
            start: at(start),
            end: at(end).max(at(start) + 1).min(target_chars),
        })
    }

    /// The window of `text` (its characters) around the mention.
    pub(crate) fn window<'t>(&self, chars: &'t [char]) -> &'t [char] {
        let start = self.start.saturating_sub(WINDOW_MARGIN).min(chars.len());
        let end = (self.end + WINDOW_MARGIN).min(chars.len()).max(start);
        &chars[start..end]
    }
}

/// One window: the fitted note it comes from, the code id it supports and its vector.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct MentionWindow {
    pub note: u32,
    pub code: u32,
    pub vector: SparseVec,
}

/// The windows of the fitted notes, with postings for fast cosines.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct MentionIndex {
    windows: Vec<MentionWindow>,
    #[serde(skip)]
    postings: HashMap<u32, Vec<(u32, f32)>>,
}

/// What a note's sentences found, per code id.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct MentionScore {
    /// Summed squared cosines of the windows that voted for the code.
    pub votes: f32,
    /// The best cosine of one of its windows with one sentence, and that sentence's index.
    pub best: f32,
    pub sentence: usize,
}

/// Per code id: its score, for the codes some window voted for.
pub(crate) type MentionMatch = HashMap<u32, MentionScore>;

impl MentionIndex {
    pub fn new(windows: Vec<MentionWindow>) -> Self {
        let mut index = Self {
            windows,
            postings: HashMap::new(),
        };
        index.derive_tables();
        index
    }

    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }

    pub fn derive_tables(&mut self) {
        self.postings.clear();
        for (w, window) in self.windows.iter().enumerate() {
            for &(term, weight) in &window.vector {
                self.postings
                    .entry(term)
                    .or_default()
                    .push((w as u32, weight));
            }
        }
    }

    /// Each sentence's closest windows (not those of the fitted note `skip`) vote for their
    /// codes with their squared cosine.
    pub fn match_sentences(&self, sentences: &[SparseVec], skip: Option<usize>) -> MentionMatch {
        let mut found = MentionMatch::new();
        let mut sims = vec![0f32; self.windows.len()];
        let mut touched: Vec<u32> = Vec::new();
        for (s, sentence) in sentences.iter().enumerate() {
            for &(term, q) in sentence {
                for &(w, weight) in self.postings.get(&term).map_or(&[][..], Vec::as_slice) {
                    if sims[w as usize] == 0.0 {
                        touched.push(w);
                    }
                    sims[w as usize] += q * weight;
                }
            }
            touched.retain(|&w| {
                Some(self.windows[w as usize].note as usize) != skip && sims[w as usize] > 0.0
            });
            let keep = WINDOWS_PER_SENTENCE.min(touched.len());
            if keep > 0 {
                touched.select_nth_unstable_by(keep - 1, |&a, &b| {
                    sims[b as usize]
                        .total_cmp(&sims[a as usize])
                        .then(a.cmp(&b))
                });
                for &w in &touched[..keep] {
                    let sim = sims[w as usize];
                    let score = found.entry(self.windows[w as usize].code).or_default();
                    score.votes += sim * sim;
                    if sim > score.best {
                        score.best = sim;
                        score.sentence = s;
                    }
                }
            }
            sims.fill(0.0);
            touched.clear();
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_span_is_placed_by_its_relative_position() {
        let m = GoldMention::placed(CodeKind::Diagnosis, "I10".into(), (50, 60), 100, 200).unwrap();
        assert_eq!((m.start, m.end), (100, 120));
        let same = GoldMention::placed(CodeKind::Diagnosis, "I10".into(), (5, 9), 30, 30).unwrap();
        assert_eq!((same.start, same.end), (5, 9));
        assert!(GoldMention::placed(CodeKind::Diagnosis, "I10".into(), (5, 40), 30, 30).is_none());
        assert!(GoldMention::placed(CodeKind::Diagnosis, "I10".into(), (5, 5), 30, 30).is_none());
        let chars: Vec<char> = "x".repeat(300).chars().collect();
        assert_eq!(m.window(&chars).len(), 20 + 2 * WINDOW_MARGIN);
    }

    #[test]
    fn sentences_vote_for_the_codes_of_their_closest_windows_but_not_their_own_notes() {
        let window = |note: u32, code: u32, vector: SparseVec| MentionWindow { note, code, vector };
        let index = MentionIndex::new(vec![
            window(0, 7, vec![(1, 1.0)]),
            window(1, 7, vec![(1, 0.6), (2, 0.8)]),
            window(2, 9, vec![(3, 1.0)]),
        ]);
        let sentences = vec![vec![(1, 1.0)], vec![(3, 0.6), (4, 0.8)]];
        let found = index.match_sentences(&sentences, None);
        assert_eq!(found.len(), 2);
        let seven = found[&7];
        assert!((seven.votes - (1.0 + 0.36)).abs() < 1e-6, "{seven:?}");
        assert_eq!((seven.best, seven.sentence), (1.0, 0));
        assert_eq!(found[&9].sentence, 1);
        let without_note_0 = index.match_sentences(&sentences, Some(0));
        assert!((without_note_0[&7].votes - 0.36).abs() < 1e-6);
        assert!(!index.match_sentences(&sentences, Some(2)).contains_key(&9));
    }
}
