//! When generation ends, and which text may be streamed before it does.
//!
//! A stop string can span several tokens, so [`StopChecker`] holds back any text that could be
//! the start of one: streamed text never contains a stop string or a piece of one, and the
//! final text ends before the stop string.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::error::{InferError, Result};

/// Why generation ended, spelled as OpenAI's `finish_reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// A stop token (EOS) or a stop string: `"stop"`. [`StopReason`] says which.
    Stop,
    /// `max_new_tokens` were generated: `"length"`.
    Length,
    /// The caller gave up (client gone, shutdown): `"cancelled"`, which OpenAI does not have.
    Cancelled,
}

/// What ended generation with [`FinishReason::Stop`], as vLLM's `stop_reason`: the stop token's
/// id or the stop string, serialised bare (`2`, `"</codes>"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StopReason {
    TokenId(u32),
    String(String),
}

/// When to stop generating.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StopConditions {
    /// Generated tokens at most, stop tokens included.
    pub max_new_tokens: usize,
    /// Tokens that end generation (EOS, `<|im_end|>`); their text is not part of the output.
    #[serde(default)]
    pub stop_token_ids: HashSet<u32>,
    /// Strings that end generation; the output ends right before the first one.
    #[serde(default)]
    pub stop_strings: Vec<String>,
}

impl StopConditions {
    pub fn new(max_new_tokens: usize) -> Self {
        Self {
            max_new_tokens,
            stop_token_ids: HashSet::new(),
            stop_strings: Vec::new(),
        }
    }

    pub fn with_stop_token(mut self, token_id: u32) -> Self {
        self.stop_token_ids.insert(token_id);
        self
    }

    pub fn with_stop_string(mut self, stop: impl Into<String>) -> Self {
        self.stop_strings.push(stop.into());
        self
    }

    pub fn validate(&self) -> Result<()> {
        if self.max_new_tokens == 0 {
            return Err(InferError::invalid("max_new_tokens", "0 generates nothing"));
        }
        if self.stop_strings.iter().any(String::is_empty) {
            return Err(InferError::invalid(
                "stop",
                "an empty stop string would stop at once",
            ));
        }
        Ok(())
    }
}

/// What one generated token released.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StopStep {
    /// Text that may be streamed now: it never contains a stop string or the start of one.
    pub text: String,
    /// Set when generation must end with this token.
    pub finish: Option<FinishReason>,
}

/// Follows one sequence's output, token by token, against its [`StopConditions`].
///
/// The generation loop, per sampled token:
/// ```text
/// let piece = if checker.is_stop_token(id) { String::new() } else { decoder.push(&tok, id)? };
/// let step = checker.push(id, &piece);
/// stream(step.text);
/// if step.finish.is_some() { break }
/// ```
/// and at the end, `checker.text()` is the output without the stop string.
#[derive(Debug, Clone)]
pub struct StopChecker {
    conditions: StopConditions,
    /// Bytes of the longest stop string: no longer suffix needs to be held back.
    longest_stop: usize,
    num_tokens: usize,
    /// Released so far.
    text: String,
    /// Received but not released: could be the start of a stop string.
    held: String,
    finish: Option<FinishReason>,
    stop_reason: Option<StopReason>,
}

impl StopChecker {
    pub fn new(conditions: StopConditions) -> Result<Self> {
        conditions.validate()?;
        let longest_stop = conditions
            .stop_strings
            .iter()
            .map(String::len)
            .max()
            .unwrap_or(0);
        Ok(Self {
            conditions,
            longest_stop,
            num_tokens: 0,
            text: String::new(),
            held: String::new(),
            finish: None,
            stop_reason: None,
        })
    }

    pub fn conditions(&self) -> &StopConditions {
        &self.conditions
    }

    /// Whether `token_id` ends generation; its text need not be decoded.
    pub fn is_stop_token(&self, token_id: u32) -> bool {
        self.conditions.stop_token_ids.contains(&token_id)
    }

    /// Feeds one generated token and the new text it decoded to (empty while an incremental
    /// decoder waits for the rest of a character, and for stop tokens). After generation has
    /// finished it changes nothing and returns the finish reason again.
    pub fn push(&mut self, token_id: u32, piece: &str) -> StopStep {
        if let Some(finish) = self.finish {
            return StopStep {
                text: String::new(),
                finish: Some(finish),
            };
        }
        self.num_tokens += 1;
        if self.is_stop_token(token_id) {
            return self.finish_with(FinishReason::Stop, Some(StopReason::TokenId(token_id)));
        }
        self.held.push_str(piece);
        if let Some((at, index)) = self.first_stop_string() {
            self.held.truncate(at);
            let stop = StopReason::String(self.conditions.stop_strings[index].clone());
            return self.finish_with(FinishReason::Stop, Some(stop));
        }
        if self.num_tokens >= self.conditions.max_new_tokens {
            return self.finish_with(FinishReason::Length, None);
        }
        let release = self.held.len() - self.held_back_len();
        let text: String = self.held.drain(..release).collect();
        self.text.push_str(&text);
        StopStep { text, finish: None }
    }

    /// Ends generation for a reason of the caller's, releasing the text held back (it did not
    /// turn out to be a stop string).
    pub fn cancel(&mut self) -> StopStep {
        match self.finish {
            Some(finish) => StopStep {
                text: String::new(),
                finish: Some(finish),
            },
            None => self.finish_with(FinishReason::Cancelled, None),
        }
    }

    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finish
    }

    pub fn stop_reason(&self) -> Option<&StopReason> {
        self.stop_reason.as_ref()
    }

    /// Tokens pushed before generation finished, the stop token included.
    pub fn num_tokens(&self) -> usize {
        self.num_tokens
    }

    /// The text released so far; once finished, the whole output without the stop string.
    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn into_text(self) -> String {
        self.text
    }

    fn finish_with(&mut self, finish: FinishReason, stop_reason: Option<StopReason>) -> StopStep {
        let text = std::mem::take(&mut self.held);
        self.text.push_str(&text);
        self.finish = Some(finish);
        self.stop_reason = stop_reason;
        StopStep {
            text,
            finish: Some(finish),
        }
    }

    /// Byte offset in `held` and index of the stop string that starts first (ties to the one
    /// listed first). Only `held` is searched: released text never holds the start of one.
    fn first_stop_string(&self) -> Option<(usize, usize)> {
        let held = &self.held;
        let stops = &self.conditions.stop_strings;
        stops
            .iter()
            .enumerate()
            .filter_map(|(i, stop)| Some((held.find(stop.as_str())?, i)))
            .min()
    }

    /// Bytes at the end of `held` that are the start of some stop string: the longest such
    /// suffix. `held` holds no whole stop string here, so only proper prefixes match.
    fn held_back_len(&self) -> usize {
        let held = &self.held;
        let first = held
            .len()
            .saturating_sub(self.longest_stop.saturating_sub(1));
        (first..held.len())
            .filter(|&start| held.is_char_boundary(start))
            .find(|&start| {
                let suffix = &held[start..];
                self.conditions
                    .stop_strings
                    .iter()
                    .any(|stop| stop.starts_with(suffix))
            })
            .map_or(0, |start| held.len() - start)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn checker(conditions: StopConditions) -> StopChecker {
        StopChecker::new(conditions).unwrap()
    }

    /// Pushes `pieces` as tokens 100, 101, ... and returns what each step released.
    fn feed(checker: &mut StopChecker, pieces: &[&str]) -> Vec<StopStep> {
        let ids = 100u32..;
        pieces
            .iter()
            .zip(ids)
            .map(|(piece, id)| checker.push(id, piece))
            .collect()
    }

    fn released(steps: &[StopStep]) -> Vec<&str> {
        steps.iter().map(|s| s.text.as_str()).collect()
    }

    #[test]
    fn stop_token_ends_without_its_text() {
        let mut checker = checker(StopConditions::new(10).with_stop_token(2));
        assert!(checker.is_stop_token(2) && !checker.is_stop_token(3));
        assert_eq!(
            checker.push(5, "I10"),
            StopStep {
                text: "I10".into(),
                finish: None
            }
        );
        let step = checker.push(2, "</s>");
        assert_eq!(
            step,
            StopStep {
                text: String::new(),
                finish: Some(FinishReason::Stop)
            }
        );
        assert_eq!(checker.stop_reason(), Some(&StopReason::TokenId(2)));
        assert_eq!(checker.num_tokens(), 2);
        assert_eq!(checker.text(), "I10");
    }

    #[test]
    fn stop_string_split_across_pieces() {
        let mut checker = checker(StopConditions::new(10).with_stop_string("</c>"));
        let steps = feed(&mut checker, &["A0", "1.1<", "/", "c>", "more"]);
        assert_eq!(released(&steps), vec!["A0", "1.1", "", "", ""]);
        assert_eq!(steps[3].finish, Some(FinishReason::Stop));
        assert_eq!(
            checker.stop_reason(),
            Some(&StopReason::String("</c>".into()))
        );
        assert_eq!(checker.num_tokens(), 4);
        assert_eq!(checker.into_text(), "A01.1");
    }

    #[test]
    fn held_back_text_is_released_when_it_is_not_a_stop() {
        let mut checker = checker(StopConditions::new(10).with_stop_string("\n\n"));
        let steps = feed(&mut checker, &["a\n", "b\n", "\nc"]);
        assert_eq!(released(&steps), vec!["a", "\nb", ""]);
        assert_eq!(checker.text(), "a\nb");
    }

    #[test]
    fn stop_string_inside_one_piece_drops_what_follows() {
        let mut checker = checker(StopConditions::new(10).with_stop_string("###"));
        let steps = feed(&mut checker, &["E11.9 ### Z99"]);
        assert_eq!(
            steps[0],
            StopStep {
                text: "E11.9 ".into(),
                finish: Some(FinishReason::Stop)
            }
        );
    }

    #[test]
    fn the_stop_string_starting_first_wins() {
        let conditions = StopConditions::new(10)
            .with_stop_string("bc")
            .with_stop_string("abcd");
        let mut first_started = checker(conditions.clone());
        feed(&mut first_started, &["xab", "cd"]);
        assert_eq!(first_started.text(), "x");
        assert_eq!(
            first_started.stop_reason(),
            Some(&StopReason::String("abcd".into()))
        );
        // Only complete stop strings count: "bc" is whole before "abcd" is.
        let mut first_completed = checker(conditions);
        feed(&mut first_completed, &["xab", "c", "d"]);
        assert_eq!(first_completed.text(), "xa");
        assert_eq!(
            first_completed.stop_reason(),
            Some(&StopReason::String("bc".into()))
        );
    }

    #[test]
    fn length_releases_the_held_text() {
        let mut checker = checker(StopConditions::new(2).with_stop_string("</c>"));
        let steps = feed(&mut checker, &["A0", "1.1</", "c>"]);
        assert_eq!(released(&steps), vec!["A0", "1.1</", ""]);
        assert_eq!(steps[1].finish, Some(FinishReason::Length));
        assert_eq!(steps[2].finish, Some(FinishReason::Length));
        assert_eq!(checker.stop_reason(), None);
        assert_eq!(checker.num_tokens(), 2);
        assert_eq!(checker.text(), "A01.1</");
    }

    #[test]
    fn a_stop_on_the_last_allowed_token_is_a_stop() {
        let mut checker = checker(StopConditions::new(2).with_stop_string("\n"));
        let steps = feed(&mut checker, &["a", "b\nc"]);
        assert_eq!(steps[1].finish, Some(FinishReason::Stop));
        assert_eq!(checker.text(), "ab");
    }

    #[test]
    fn cancel_releases_the_held_text_once() {
        let mut checker = checker(StopConditions::new(10).with_stop_string("</c>"));
        feed(&mut checker, &["x</"]);
        assert_eq!(checker.text(), "x");
        let step = checker.cancel();
        assert_eq!(
            step,
            StopStep {
                text: "</".into(),
                finish: Some(FinishReason::Cancelled)
            }
        );
        assert_eq!(checker.cancel().text, "");
        assert_eq!(
            checker.push(1, "more").finish,
            Some(FinishReason::Cancelled)
        );
        assert_eq!(checker.text(), "x</");
    }

    #[test]
    fn multibyte_stop_strings_hold_back_whole_characters() {
        let mut checker = checker(StopConditions::new(10).with_stop_string("é!"));
        let steps = feed(&mut checker, &["caf", "é", "?", "né", "!"]);
        assert_eq!(released(&steps), vec!["caf", "", "é?", "n", ""]);
        assert_eq!(checker.text(), "café?n");
    }

    #[test]
    fn conditions_are_validated() {
        assert!(matches!(
            StopChecker::new(StopConditions::new(0)),
            Err(InferError::InvalidParameter {
                name: "max_new_tokens",
                ..
            })
        ));
        assert!(matches!(
            StopChecker::new(StopConditions::new(5).with_stop_string("")),
            Err(InferError::InvalidParameter { name: "stop", .. })
        ));
    }

    #[test]
    fn finish_reasons_serialise_as_openai_names() {
        let names = [
            (FinishReason::Stop, "\"stop\""),
            (FinishReason::Length, "\"length\""),
            (FinishReason::Cancelled, "\"cancelled\""),
        ];
        for (reason, json) in names {
            assert_eq!(serde_json::to_string(&reason).unwrap(), json);
            assert_eq!(serde_json::from_str::<FinishReason>(json).unwrap(), reason);
        }
        let token = StopReason::TokenId(2);
        assert_eq!(serde_json::to_string(&token).unwrap(), "2");
        let string = StopReason::String("</c>".into());
        assert_eq!(serde_json::to_string(&string).unwrap(), "\"</c>\"");
        assert_eq!(
            serde_json::from_str::<StopReason>("\"</c>\"").unwrap(),
            string
        );
    }

    #[test]
    fn conditions_deserialise_with_empty_defaults() {
        let conditions: StopConditions =
            serde_json::from_str(r#"{"max_new_tokens": 64, "stop_strings": ["\n\n"]}"#).unwrap();
        assert_eq!(conditions, StopConditions::new(64).with_stop_string("\n\n"));
    }

    /// Text over a small alphabet, so that stop strings occur often.
    fn pieces() -> impl Strategy<Value = Vec<String>> {
        prop::collection::vec("[ab\né]{0,4}", 0..30)
    }

    proptest! {
        #[test]
        fn streamed_text_is_the_output_and_never_holds_a_stop_string(
            pieces in pieces(),
            stops in prop::collection::vec("[ab\né]{1,3}", 1..3),
        ) {
            let mut conditions = StopConditions::new(1000);
            conditions.stop_strings = stops.clone();
            let mut checker = checker(conditions);
            let mut streamed = String::new();
            for (id, piece) in (0u32..).zip(&pieces) {
                let step = checker.push(id, piece);
                streamed.push_str(&step.text);
                // A released piece plus what was released before never shows a stop string.
                prop_assert!(stops.iter().all(|s| !streamed.contains(s.as_str())));
                if step.finish.is_some() {
                    break;
                }
            }
            if checker.finish_reason().is_none() {
                streamed.push_str(&checker.cancel().text);
            }
            let full: String = pieces.concat();
            prop_assert_eq!(&streamed, checker.text());
            prop_assert!(full.starts_with(&streamed));
            match checker.stop_reason() {
                Some(StopReason::String(stop)) => {
                    prop_assert!(full[streamed.len()..].starts_with(stop.as_str()));
                }
                _ => prop_assert_eq!(&streamed, &full),
            }
        }
    }
}
