//! Words and sentences of a note with their character offsets (evidence spans point into the
//! note as the caller gave it), and the stemmed terms retrieval compares notes by.

use std::cell::RefCell;
use std::collections::HashMap;

use rust_stemmers::{Algorithm, Stemmer};

/// A span of the note: `[start, end)` in characters (not bytes), and its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    pub start: usize,
    pub end: usize,
    pub text: String,
}

/// Words too common in clinical prose to tell notes apart.
const STOPWORDS: &[&str] = &[
    "a", "an", "and", "are", "as", "at", "be", "been", "but", "by", "for", "from", "had", "has",
    "have", "he", "her", "his", "in", "into", "is", "it", "its", "of", "on", "or", "she", "that",
    "the", "their", "there", "this", "to", "was", "were", "which", "who", "with", "after",
    "before", "during", "patient", "year", "years", "old", "also", "than", "then", "we", "our",
    "not", "no", "day", "days",
];

/// Words whose stems a thread keeps before it starts again.
const MAX_STEMS: usize = 1 << 16;

thread_local! {
    static STEMS: RefCell<HashMap<String, Option<String>>> = RefCell::default();
}

/// Turns text into the terms notes are compared by: lower-cased, stemmed words of two or more
/// characters without stopwords, plus adjacent-word pairs (`left_right`).
pub struct Analyzer {
    stemmer: Stemmer,
}

impl std::fmt::Debug for Analyzer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Analyzer(english stems, word pairs)")
    }
}

impl Default for Analyzer {
    fn default() -> Self {
        Self {
            stemmer: Stemmer::create(Algorithm::English),
        }
    }
}

/// A text's words with their offsets and stems (`None` for stop words and one-character
/// words): a note is read once for its terms and its evidence.
#[derive(Debug, Clone)]
pub struct StemmedWords {
    pub words: Vec<Span>,
    pub stems: Vec<Option<String>>,
}

impl StemmedWords {
    /// The stems of the words in `range`, in order.
    pub fn stems_in(&self, range: std::ops::Range<usize>) -> impl Iterator<Item = &str> {
        self.stems[range].iter().filter_map(|s| s.as_deref())
    }

    /// The terms of the words in `range` (a sentence's, or all): their stems, then each pair
    /// of neighbouring stems (`left_right`), as [`Analyzer::terms`] makes them.
    pub fn terms_in(&self, range: std::ops::Range<usize>) -> Vec<String> {
        let stems: Vec<&str> = self.stems_in(range).collect();
        let mut terms: Vec<String> = Vec::with_capacity(2 * stems.len());
        terms.extend(stems.iter().map(|s| s.to_string()));
        terms.extend(stems.windows(2).map(|pair| {
            let mut term = String::with_capacity(pair[0].len() + 1 + pair[1].len());
            term.push_str(pair[0]);
            term.push('_');
            term.push_str(pair[1]);
            term
        }));
        terms
    }

    /// The words that lie within `[start, end)` (characters), as a range of word indexes.
    pub fn within(&self, start: usize, end: usize) -> std::ops::Range<usize> {
        let first = self.words.partition_point(|w| w.start < start);
        let last = first + self.words[first..].partition_point(|w| w.end <= end);
        first..last
    }
}

impl Analyzer {
    pub fn terms(&self, text: &str) -> Vec<String> {
        Self::terms_of(&self.stemmed_words(text))
    }

    /// The stems of a text's words, then each pair of neighbouring stems.
    pub fn terms_of(words: &StemmedWords) -> Vec<String> {
        words.terms_in(0..words.stems.len())
    }

    /// Stemmed content words only (for matching against code descriptions).
    pub fn stems(&self, text: &str) -> Vec<String> {
        self.stemmed_words(text)
            .stems
            .into_iter()
            .flatten()
            .collect()
    }

    pub fn stemmed_words(&self, text: &str) -> StemmedWords {
        let words = words(text);
        let stems = words.iter().map(|w| self.stem(&w.text)).collect();
        StemmedWords { words, stems }
    }

    /// A word's stem; `None` for a stop word or a one-character word. Each thread keeps the
    /// stems of the words it has seen (a clinical vocabulary repeats from note to note).
    fn stem(&self, word: &str) -> Option<String> {
        STEMS.with_borrow_mut(|stems| {
            if let Some(stem) = stems.get(word) {
                return stem.clone();
            }
            let lower = word.to_lowercase();
            let stem = (lower.chars().count() >= 2 && !STOPWORDS.contains(&lower.as_str()))
                .then(|| self.stemmer.stem(&lower).into_owned());
            if stems.len() >= MAX_STEMS {
                stems.clear();
            }
            stems.insert(word.to_string(), stem.clone());
            stem
        })
    }
}

/// Runs of letters and digits, with offsets.
pub fn words(text: &str) -> Vec<Span> {
    let mut out = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (i, c) in text.chars().enumerate() {
        if c.is_alphanumeric() {
            current.get_or_insert_with(|| (i, String::new())).1.push(c);
        } else if let Some((start, word)) = current.take() {
            out.push(Span {
                start,
                end: i,
                text: word,
            });
        }
    }
    if let Some((start, word)) = current {
        let end = start + word.chars().count();
        out.push(Span {
            start,
            end,
            text: word,
        });
    }
    out
}

/// Sentences: split after `.`, `!`, `?` or `;` followed by white space, and at line breaks;
/// trimmed, empty ones dropped.
pub fn sentences(text: &str) -> Vec<Span> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut start = 0;
    let push = |s: usize, e: usize, out: &mut Vec<Span>| {
        let (mut s, mut e) = (s, e);
        while s < e && chars[s].is_whitespace() {
            s += 1;
        }
        while e > s && chars[e - 1].is_whitespace() {
            e -= 1;
        }
        if e > s {
            out.push(Span {
                start: s,
                end: e,
                text: chars[s..e].iter().collect(),
            });
        }
    };
    for i in 0..chars.len() {
        let boundary = chars[i] == '\n'
            || (matches!(chars[i], '.' | '!' | '?' | ';')
                && chars.get(i + 1).is_none_or(|c| c.is_whitespace()));
        if boundary {
            push(start, i + 1, &mut out);
            start = i + 1;
        }
    }
    push(start, chars.len(), &mut out);
    out
}

/// Where a quote from the note (as a model repeats it: case and line breaks may differ)
/// stands in it; `None` when it is not there. Runs of white space match any run of white
/// space; surrounding quote marks and ellipses are ignored.
pub fn find_quote(note: &str, quote: &str) -> Option<Span> {
    let quote = quote
        .trim()
        .trim_matches(|c: char| "\"'“”‘’`…".contains(c) || c.is_whitespace())
        .trim_end_matches("...")
        .trim_start_matches("...")
        .trim();
    let (wanted, _) = folded(quote);
    if wanted.is_empty() {
        return None;
    }
    let (haystack, offsets) = folded(note);
    let at = haystack
        .windows(wanted.len())
        .position(|window| window == wanted.as_slice())?;
    let start = offsets[at];
    let end = offsets[at + wanted.len() - 1] + 1;
    Some(Span {
        start,
        end,
        text: note.chars().skip(start).take(end - start).collect(),
    })
}

/// `text` lower-cased one character for one, white space runs as one space; and the
/// character offset in `text` of each character kept.
fn folded(text: &str) -> (Vec<char>, Vec<usize>) {
    let mut chars = Vec::new();
    let mut offsets = Vec::new();
    for (i, c) in text.chars().enumerate() {
        if c.is_whitespace() {
            if chars.last().is_some_and(|last| *last == ' ') {
                continue;
            }
            chars.push(' ');
        } else {
            chars.push(c.to_lowercase().next().unwrap_or(c));
        }
        offsets.push(i);
    }
    (chars, offsets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_are_in_characters_and_point_at_the_text() {
        let note = "Émile, 64, had type 2 diabetes.\nNo fever; chest pain.";
        let chars: Vec<char> = note.chars().collect();
        for span in sentences(note).iter().chain(&words(note)) {
            let text: String = chars[span.start..span.end].iter().collect();
            assert_eq!(text, span.text);
        }
        let s: Vec<String> = sentences(note).into_iter().map(|s| s.text).collect();
        assert_eq!(
            s,
            [
                "Émile, 64, had type 2 diabetes.",
                "No fever;",
                "chest pain."
            ]
        );
        let quoted = find_quote(note, "\"TYPE 2   diabetes.\nno fever...\"").unwrap();
        assert_eq!(quoted.text, "type 2 diabetes.\nNo fever");
        assert_eq!(
            chars[quoted.start..quoted.end].iter().collect::<String>(),
            quoted.text
        );
        assert!(find_quote(note, "type 1 diabetes").is_none());
        assert!(find_quote(note, " \"\" ").is_none());
        let terms = Analyzer::default().terms("The patient had diabetes mellitus");
        assert_eq!(terms, ["diabet", "mellitus", "diabet_mellitus"]);
    }

    #[test]
    fn a_sentence_has_the_words_and_stems_it_would_have_alone() {
        let analyzer = Analyzer::default();
        let note = "Émile, 64, had type 2 diabetes.\nNo fever; chest pain. Renal colic!";
        let words = analyzer.stemmed_words(note);
        for sentence in sentences(note) {
            let range = words.within(sentence.start, sentence.end);
            let alone = analyzer.stemmed_words(&sentence.text);
            let texts: Vec<&str> = words.words[range.clone()]
                .iter()
                .map(|w| w.text.as_str())
                .collect();
            let alone_texts: Vec<&str> = alone.words.iter().map(|w| w.text.as_str()).collect();
            assert_eq!(texts, alone_texts);
            assert_eq!(words.stems[range], alone.stems[..]);
        }
    }
}
