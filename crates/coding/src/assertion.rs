//! Whether a finding is asserted, negated, uncertain or about a relative, from the words
//! around its mention in the evidence sentence (NegEx-style cue windows): a negation or
//! uncertainty cue counts within the six words before the mention, with no `but`/`although`
//! in between; a family cue anywhere in the sentence.

use serde::{Deserialize, Serialize};

use crate::text::{sentences, words};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Assertion {
    Present,
    Negated,
    Uncertain,
    FamilyHistory,
}

/// Words before a mention that a cue reaches across.
const WINDOW: usize = 6;

const NEGATION: &[&[&str]] = &[
    &["no"],
    &["not"],
    &["without"],
    &["denies"],
    &["denied"],
    &["negative", "for"],
    &["ruled", "out"],
    &["absence", "of"],
    &["free", "of"],
    &["neither"],
    &["nor"],
];

const UNCERTAINTY: &[&[&str]] = &[
    &["possible"],
    &["possibly"],
    &["probable"],
    &["probably"],
    &["suspected"],
    &["suspicion", "of"],
    &["suspect"],
    &["rule", "out"],
    &["likely"],
    &["may"],
    &["might"],
    &["questionable"],
    &["differential", "diagnosis"],
];

const FAMILY: &[&[&str]] = &[
    &["family", "history"],
    &["mother"],
    &["father"],
    &["sister"],
    &["brother"],
    &["maternal"],
    &["paternal"],
    &["grandmother"],
    &["grandfather"],
];

/// Words that end a cue's reach.
const BREAKS: &[&str] = &["but", "although", "however", "though", "yet"];

/// The assertion of the finding whose mention starts at word `mention` of `sentence`.
pub fn assertion_of(sentence: &str, mention: usize) -> Assertion {
    let tokens: Vec<String> = words(sentence)
        .into_iter()
        .map(|w| w.text.to_lowercase())
        .collect();
    let cue_at = |cues: &[&[&str]], i: usize| {
        cues.iter().any(|cue| {
            cue.iter()
                .enumerate()
                .all(|(j, w)| tokens.get(i + j).is_some_and(|t| t == w))
        })
    };
    if (0..tokens.len()).any(|i| cue_at(FAMILY, i)) {
        return Assertion::FamilyHistory;
    }
    let mention = mention.min(tokens.len());
    let mut start = mention.saturating_sub(WINDOW);
    if let Some(b) = (start..mention)
        .rev()
        .find(|&i| BREAKS.contains(&tokens[i].as_str()))
    {
        start = b + 1;
    }
    if (start..mention).any(|i| cue_at(NEGATION, i)) {
        Assertion::Negated
    } else if (start..mention).any(|i| cue_at(UNCERTAINTY, i)) {
        Assertion::Uncertain
    } else {
        Assertion::Present
    }
}

/// The assertion of a mention starting at character `start` of `note`, read in its sentence.
pub fn assertion_in_note(note: &str, start: usize) -> Assertion {
    let Some(sentence) = sentences(note)
        .into_iter()
        .find(|s| s.start <= start && start < s.end)
    else {
        return Assertion::Present;
    };
    let mention = words(&sentence.text)
        .iter()
        .position(|w| sentence.start + w.start >= start)
        .unwrap_or(0);
    assertion_of(&sentence.text, mention)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(sentence: &str, word: &str) -> Assertion {
        let i = words(sentence)
            .iter()
            .position(|w| w.text.eq_ignore_ascii_case(word))
            .unwrap_or_default();
        assertion_of(sentence, i)
    }

    #[test]
    fn a_mention_is_read_in_its_sentence_of_the_note() {
        let note = "Type 2 diabetes. She denies chest pain.";
        assert_eq!(assertion_in_note(note, 0), Assertion::Present);
        assert_eq!(assertion_in_note(note, 28), Assertion::Negated);
    }

    #[test]
    fn cues_reach_the_mention_after_them_within_the_window() {
        assert_eq!(
            at("The patient denies chest pain.", "chest"),
            Assertion::Negated
        );
        assert_eq!(
            at("Pneumonia was diagnosed; no fever.", "pneumonia"),
            Assertion::Present
        );
        assert_eq!(
            at("Pneumonia was diagnosed; no fever.", "fever"),
            Assertion::Negated
        );
        assert_eq!(
            at("No fever but marked dyspnea.", "dyspnea"),
            Assertion::Present
        );
        assert_eq!(
            at("Suspected pulmonary embolism.", "pulmonary"),
            Assertion::Uncertain
        );
        assert_eq!(
            at("Her mother had breast cancer.", "breast"),
            Assertion::FamilyHistory
        );
        assert_eq!(
            at("No signs of infection were found on the long and careful examination of the wound.", "wound"),
            Assertion::Present
        );
    }
}
