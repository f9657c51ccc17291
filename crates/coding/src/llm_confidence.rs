//! The `llm` engine's confidence in a code: the probability its model gave to writing that
//! code where it did, read from the log-probabilities the generation loop records for each
//! token (under the constrained decoder's mask, so the probability is among the answers the
//! grammar allows).
//!
//! The answer is rebuilt from each token's text, as the constrained decoder read it, so every
//! token covers a known range of characters. A code's tokens are those that overlap it or the
//! separator before it: the separator is where the model chose another code over ending the
//! answer, and for the first code, the token that starts it is also the choice of writing a
//! code at all. A token that ends one code and starts the separator (`9,`) counts for both.
//! The token after a code that could have gone on (`R51` → `R51.9`) is not counted: it also
//! decides whether the answer goes on, which is not about this code.
//!
//! A code written again in the same answer keeps the confidence of its first writing: a small
//! model that loops (`0SR9019, 0SR9019, …`) grows surer of each repeat, given the ones before,
//! which says nothing new about the note.

use medcoder_infer::Generation;

use crate::constrained::AnswerGrammar;
use crate::prediction::CodeKind;

/// A code the model wrote, with the probability it gave to writing it there, in (0, 1].
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ScoredCode {
    pub code: String,
    pub kind: CodeKind,
    pub confidence: f32,
}

/// The codes of a constrained generation in the order written (each once, as first written),
/// each with `exp(Σ log-prob)` over its tokens. `token_texts` are the texts the constrained decoder
/// read (`None` for a token that has none); the answer ends at the first stop token. An
/// answer cut by the token limit gives its whole codes.
pub(crate) fn scored_codes(
    grammar: &AnswerGrammar,
    token_texts: &[Option<Vec<char>>],
    stop_token_ids: &[u32],
    generation: &Generation,
) -> Vec<ScoredCode> {
    let mut text = String::new();
    // Token i covers the characters [ends[i - 1], ends[i]) of `text`.
    let mut ends = Vec::with_capacity(generation.token_ids.len());
    let mut length = 0;
    for &id in &generation.token_ids {
        if stop_token_ids.contains(&id) {
            break;
        }
        let Some(piece) = token_texts.get(id as usize).and_then(|t| t.as_deref()) else {
            break;
        };
        text.extend(piece);
        length += piece.len();
        ends.push(length);
    }
    let mut scored: Vec<ScoredCode> = Vec::new();
    for span in grammar.code_spans(&text) {
        if scored.iter().any(|s| s.code == span.code) {
            continue;
        }
        let mut log_prob = 0.0f64;
        let mut start = 0;
        for (&end, &token_log_prob) in ends.iter().zip(&generation.token_logprobs) {
            if start < span.end && end > span.lead {
                log_prob += f64::from(token_log_prob);
            }
            start = end;
        }
        scored.push(ScoredCode {
            code: span.code,
            kind: span.kind,
            confidence: probability(log_prob),
        });
    }
    scored
}

/// `exp(log_prob)` as a confidence: in (0, 1] even when it underflows f32.
fn probability(log_prob: f64) -> f32 {
    (log_prob.exp() as f32).clamp(f32::MIN_POSITIVE, 1.0)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use medcoder_infer::FinishReason;

    use super::*;
    use crate::constrained::CodeTrie;

    const EOS: u32 = 100;

    fn grammar(completion: &str) -> AnswerGrammar {
        let trie = CodeTrie::new([
            ("E11.9", CodeKind::Diagnosis),
            ("E11.65", CodeKind::Diagnosis),
            ("I10", CodeKind::Diagnosis),
            ("0DTJ4ZZ", CodeKind::Procedure),
        ]);
        AnswerGrammar::new(completion, ", ", Arc::new(trie))
    }

    /// Token texts: a token's id is its place in `vocab`.
    fn texts(vocab: &[&str]) -> Vec<Option<Vec<char>>> {
        vocab.iter().map(|t| Some(t.chars().collect())).collect()
    }

    fn generation(token_ids: &[u32], token_logprobs: &[f32]) -> Generation {
        Generation {
            text: String::new(),
            token_ids: token_ids.to_vec(),
            token_logprobs: token_logprobs.to_vec(),
            finish_reason: FinishReason::Stop,
            prompt_tokens: 0,
            prefill_seconds: 0.0,
            decode_seconds: 0.0,
            seed: 0,
        }
    }

    fn scores(found: &[ScoredCode]) -> Vec<(&str, f32)> {
        found
            .iter()
            .map(|s| (s.code.as_str(), s.confidence))
            .collect()
    }

    fn assert_close(found: &[ScoredCode], expected: &[(&str, f64)]) {
        assert_eq!(found.len(), expected.len(), "{:?}", scores(found));
        for (scored, (code, log_prob)) in found.iter().zip(expected) {
            assert_eq!(scored.code, *code);
            let want = log_prob.exp() as f32;
            assert!(
                (scored.confidence - want).abs() < 1e-6,
                "{code}: {} vs {want}",
                scored.confidence
            );
        }
    }

    #[test]
    fn a_code_is_as_likely_as_its_tokens_and_the_separator_before_it() {
        let vocab = texts(&["E11", ".9", ", ", "I", "10", "0DTJ4ZZ"]);
        let g = generation(
            &[0, 1, 2, 3, 4, 2, 5, EOS],
            &[-0.1, -0.2, -0.3, -0.4, -0.5, -0.6, -0.7, -0.8],
        );
        let found = scored_codes(&grammar("{codes}"), &vocab, &[EOS], &g);
        assert_close(&found, &[("E11.9", -0.3), ("I10", -1.2), ("0DTJ4ZZ", -1.3)]);
        assert_eq!(found[2].kind, CodeKind::Procedure);
    }

    #[test]
    fn a_token_across_a_code_and_its_separator_counts_for_both_codes() {
        let vocab = texts(&["E11.9,", " I10"]);
        let g = generation(&[0, 1, EOS], &[-0.25, -0.5, -1.0]);
        let found = scored_codes(&grammar("{codes}"), &vocab, &[EOS], &g);
        assert_close(&found, &[("E11.9", -0.25), ("I10", -0.75)]);
    }

    #[test]
    fn the_prefix_and_suffix_are_not_a_codes_tokens() {
        let vocab = texts(&["Codes", ":", " E11", ".9", "\n"]);
        let g = generation(
            &[0, 1, 2, 3, 4, EOS],
            &[-3.0, -2.0, -0.5, -0.25, -4.0, -5.0],
        );
        let found = scored_codes(&grammar("Codes: {codes}\n"), &vocab, &[EOS], &g);
        assert_close(&found, &[("E11.9", -0.75)]);
    }

    #[test]
    fn a_stop_token_with_text_ends_the_answer_and_a_cut_code_is_dropped() {
        // A stop token whose text is `<eos>` (the decoder never reads it) ends the answer.
        let vocab = texts(&["I10", ", ", "E11", ".6", "<eos>"]);
        let stop = 4;
        let g = generation(&[0, stop], &[-0.5, -0.1]);
        let found = scored_codes(&grammar("{codes}"), &vocab, &[stop], &g);
        assert_close(&found, &[("I10", -0.5)]);
        // Cut by the token limit inside E11.65: the whole codes only.
        let g = generation(&[0, 1, 2, 3], &[-0.5, -0.1, -0.2, -0.3]);
        let found = scored_codes(&grammar("{codes}"), &vocab, &[stop], &g);
        assert_close(&found, &[("I10", -0.5)]);
    }

    #[test]
    fn a_code_written_again_keeps_its_first_confidence() {
        let vocab = texts(&["I10", ", "]);
        let g = generation(
            &[0, 1, 0, 1, 0, EOS],
            &[-0.5, -0.1, -0.01, -0.1, -0.001, 0.0],
        );
        let found = scored_codes(&grammar("{codes}"), &vocab, &[EOS], &g);
        assert_close(&found, &[("I10", -0.5)]);
    }

    #[test]
    fn confidence_stays_in_0_to_1() {
        let vocab = texts(&["I10", ", ", "E11.9"]);
        let g = generation(&[0, 1, 2, EOS], &[0.0, -200.0, -300.0, 0.0]);
        let found = scored_codes(&grammar("{codes}"), &vocab, &[EOS], &g);
        assert_eq!(scores(&found), [("I10", 1.0), ("E11.9", f32::MIN_POSITIVE)]);
    }
}
