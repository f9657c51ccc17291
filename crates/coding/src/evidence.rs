//! Evidence for an assigned code: the note's sentence sharing the most (weighted) stems with
//! the code's description, and the assertion read around the first word it shares. The
//! note's words are stemmed once, for its terms and for every code's evidence.

use std::ops::Range;

use crate::assertion::{assertion_of, Assertion};
use crate::prediction::EvidenceSpan;
use crate::text::{sentences, Analyzer, Span, StemmedWords};

/// A note's sentences, each with its words' stems and the range of its words in the note.
pub(crate) struct NoteSentences<'a> {
    words: &'a StemmedWords,
    sentences: Vec<(Span, Vec<&'a str>, Range<usize>)>,
}

impl<'a> NoteSentences<'a> {
    /// The sentence at `index`, in note order.
    pub fn span(&self, index: usize) -> Option<&Span> {
        self.sentences.get(index).map(|(span, _, _)| span)
    }

    /// Each sentence's terms (as [`Analyzer::terms`] makes them of its text), in note order.
    pub fn terms(&self) -> impl Iterator<Item = Vec<String>> + '_ {
        self.sentences
            .iter()
            .map(|(_, _, range)| self.words.terms_in(range.clone()))
    }

    pub fn new(text: &str, words: &'a StemmedWords) -> Self {
        let sentences = sentences(text)
            .into_iter()
            .map(|sentence| {
                let range = words.within(sentence.start, sentence.end);
                let stems = words.stems_in(range.clone()).collect();
                (sentence, stems, range)
            })
            .collect();
        Self { words, sentences }
    }
}

/// The sentence sharing the most stems with `description` (each stem weighted by
/// `weight`, e.g. its idf), and the assertion read around the first word it shares.
pub(crate) fn best_sentence(
    analyzer: &Analyzer,
    description: &str,
    note: &NoteSentences<'_>,
    weight: impl Fn(&str) -> f32,
) -> Option<(EvidenceSpan, Assertion)> {
    let wanted = analyzer.stems(description);
    let (score, (span, _, range)) = note
        .sentences
        .iter()
        .map(|sentence| {
            let stems = &sentence.1;
            let score: f32 = wanted
                .iter()
                .filter(|w| stems.contains(&w.as_str()))
                .map(|w| weight(w))
                .sum();
            (score, sentence)
        })
        .max_by(|a, b| a.0.total_cmp(&b.0))?;
    if score <= 0.0 {
        return None;
    }
    let mention = note.words.stems[range.clone()]
        .iter()
        .position(|stem| stem.as_ref().is_some_and(|s| wanted.contains(s)))
        .unwrap_or(0);
    Some((
        EvidenceSpan {
            start: span.start,
            end: span.end,
            text: span.text.clone(),
        },
        assertion_of(&span.text, mention),
    ))
}
