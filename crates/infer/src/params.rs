//! What a request or config asks of sampling: [`SamplingParams`] and its validation.

use serde::{Deserialize, Serialize};

use crate::error::{InferError, Result};

/// How to pick tokens. The default is greedy decoding with no penalties.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingParams {
    /// Divides the logits before the softmax; 0 means greedy (argmax, ties to the lowest id).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (ties to the lowest ids); `None` keeps all.
    pub top_k: Option<usize>,
    /// Keep the fewest most likely tokens whose probabilities, renormalised after top-k, add
    /// up to at least `top_p`; 1 keeps all.
    pub top_p: f32,
    /// Keep tokens at least `min_p` times as likely as the most likely one; 0 keeps all.
    pub min_p: f32,
    /// HF's `repetition_penalty`: the logit of every token seen in the prompt or the output is
    /// divided by it when positive and multiplied by it when negative, once per distinct token.
    /// 1 is off; above 1 discourages repeats.
    pub repetition_penalty: f32,
    /// Apply the repetition penalty only over the last this many tokens of prompt + output
    /// (llama.cpp's `repeat_last_n`); `None` looks at all of them.
    pub repetition_window: Option<usize>,
    /// OpenAI's: subtracted from a token's logit once per time it occurs in the output so far
    /// (the prompt does not count, as in vLLM). In [-2, 2].
    pub frequency_penalty: f32,
    /// OpenAI's: subtracted once from the logit of every token that occurs in the output so far.
    /// In [-2, 2].
    pub presence_penalty: f32,
    /// Seed of the random draws; `None` draws a seed, which [`crate::Sampler::seed`] reports
    /// so that a run can be repeated (with the same `rand` version).
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            repetition_window: None,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: None,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding, no penalties: the default.
    pub fn greedy() -> Self {
        Self::default()
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// Checks every field's range; the error names the field as it is spelled in a request.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(InferError::invalid(
                "temperature",
                format!("{} is not >= 0", self.temperature),
            ));
        }
        if self.top_k == Some(0) {
            return Err(InferError::invalid(
                "top_k",
                "0 keeps no token; leave it out to keep all tokens",
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(InferError::invalid(
                "top_p",
                format!("{} is not in (0, 1]", self.top_p),
            ));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(InferError::invalid(
                "min_p",
                format!("{} is not in [0, 1]", self.min_p),
            ));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            let message = format!("{} is not > 0 (1 is off)", self.repetition_penalty);
            return Err(InferError::invalid("repetition_penalty", message));
        }
        if self.repetition_window == Some(0) {
            let message = "0 looks at no token; leave it out to look at all tokens";
            return Err(InferError::invalid("repetition_window", message));
        }
        for (name, value) in [
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
        ] {
            if !(-2.0..=2.0).contains(&value) {
                return Err(InferError::invalid(
                    name,
                    format!("{value} is not in [-2, 2]"),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_params_are_greedy_and_valid() {
        let params = SamplingParams::default();
        assert!(params.is_greedy());
        assert_eq!(params, SamplingParams::greedy());
        params.validate().unwrap();
    }

    #[test]
    fn out_of_range_params_name_the_field() {
        type Spoil = fn(&mut SamplingParams);
        let cases: [(&str, Spoil); 10] = [
            ("temperature", |p| p.temperature = -0.1),
            ("temperature", |p| p.temperature = f32::NAN),
            ("top_k", |p| p.top_k = Some(0)),
            ("top_p", |p| p.top_p = 0.0),
            ("top_p", |p| p.top_p = 1.5),
            ("min_p", |p| p.min_p = -0.1),
            ("repetition_penalty", |p| p.repetition_penalty = 0.0),
            ("repetition_window", |p| p.repetition_window = Some(0)),
            ("frequency_penalty", |p| p.frequency_penalty = 2.5),
            ("presence_penalty", |p| p.presence_penalty = f32::NAN),
        ];
        for (field, spoil) in cases {
            let mut params = SamplingParams::default();
            spoil(&mut params);
            match params.validate() {
                Err(InferError::InvalidParameter { name, .. }) => assert_eq!(name, field),
                other => panic!("{field}: expected an invalid parameter error, got {other:?}"),
            }
        }
    }

    #[test]
    fn params_deserialize_with_defaults_and_reject_unknown_fields() {
        let params: SamplingParams =
            serde_json::from_str(r#"{"temperature": 0.7, "top_p": 0.9}"#).unwrap();
        assert_eq!(params.temperature, 0.7);
        assert_eq!(params.top_p, 0.9);
        assert_eq!(params.repetition_penalty, 1.0);
        assert_eq!(params.top_k, None);
        assert!(serde_json::from_str::<SamplingParams>(r#"{"temprature": 0.7}"#).is_err());
    }
}
