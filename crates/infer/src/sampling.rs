//! Choosing the next token from the last position's logits.
//!
//! The order is HF `generate`'s (llama.cpp's differs only in where temperature goes):
//! repetition penalty → frequency and presence penalties → logits processors → greedy argmax
//! when the temperature is 0, else temperature → top-k → top-p → min-p → softmax → draw.
//!
//! Everything works on `&mut [f32]` (the caller takes the last position with
//! `to_vec1::<f32>()`), in place or in buffers the [`Sampler`] keeps between calls, because it
//! runs once per generated token over vocabularies of 150k-260k entries.
//!
//! The parameters are in `params.rs`, the logits processors in `processors.rs`, the loops over
//! the vocabulary in `kernels.rs`, and the log-probabilities reported beside a token in
//! `logprobs.rs`.

use std::fmt;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{InferError, Result};
use crate::kernels::{
    argmax, collect_top_k, exp_nonpositive, find_cumulative, nucleus_len, sum_f64, Candidate,
    MIN_EXP_ARG,
};
use crate::logprobs::scaled_log_prob;
use crate::params::SamplingParams;
use crate::processors::{LogitsProcessor, LogitsProcessorList};

/// Picks tokens for one sequence: owns the seeded RNG, the logits processors and the buffers
/// reused at every step.
pub struct Sampler {
    params: SamplingParams,
    seed: u64,
    rng: StdRng,
    prompt_len: usize,
    processors: LogitsProcessorList,
    candidates: Vec<Candidate>,
    weights: Vec<f32>,
    token_scratch: Vec<u32>,
}

impl fmt::Debug for Sampler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sampler")
            .field("params", &self.params)
            .field("seed", &self.seed)
            .field("prompt_len", &self.prompt_len)
            .field("processors", &self.processors)
            .finish_non_exhaustive()
    }
}

impl Sampler {
    /// `prompt_len` is how many leading tokens of the `history` given to [`Sampler::sample`]
    /// are prompt: the repetition penalty looks at them, the frequency and presence penalties
    /// and the logits processors only see what comes after.
    pub fn new(params: SamplingParams, prompt_len: usize) -> Result<Self> {
        params.validate()?;
        let seed = params.seed.unwrap_or_else(rand::random::<u64>);
        tracing::debug!(seed, "sampler seeded");
        Ok(Self {
            rng: StdRng::seed_from_u64(seed),
            seed,
            params,
            prompt_len,
            processors: LogitsProcessorList::new(),
            candidates: Vec::new(),
            weights: Vec::new(),
            token_scratch: Vec::new(),
        })
    }

    /// Adds a processor after those already there; they run in the order they were added.
    pub fn with_processor(mut self, processor: impl LogitsProcessor + 'static) -> Self {
        self.processors.push(processor);
        self
    }

    pub fn processors_mut(&mut self) -> &mut LogitsProcessorList {
        &mut self.processors
    }

    /// The seed actually used: the requested one, or the one drawn when none was requested.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    pub fn prompt_len(&self) -> usize {
        self.prompt_len
    }

    /// Picks the next token. `history` is the prompt followed by the tokens generated so far.
    ///
    /// On return `logits` holds the values after penalties and processors (temperature is
    /// not written back), ready for [`crate::log_softmax_top`]. Errors:
    /// [`InferError::EmptyLogits`], [`InferError::InvalidLogit`] for NaN or +inf, and
    /// [`InferError::NoTokenAllowed`] when every logit is -inf, which a constrained decoder can
    /// turn into EOS with [`crate::FallbackToEos`].
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> Result<u32> {
        if logits.is_empty() {
            return Err(InferError::EmptyLogits);
        }
        let generated = history.get(self.prompt_len..).unwrap_or_default();
        self.apply_penalties(logits, history, generated);
        self.processors.process(generated, logits);
        let (argmax, max) = argmax(logits)?;
        let inv_temperature = 1.0 / self.params.temperature;
        // A temperature so small that 1/t overflows is greedy for all purposes.
        if self.params.is_greedy() || !inv_temperature.is_finite() {
            return Ok(argmax);
        }
        let pool = self.filter(logits, max, inv_temperature);
        self.draw(pool)
    }

    /// [`Sampler::sample`], with the picked token's log-probability under the distribution it
    /// was picked from: the log-softmax of the logits after penalties and processors (a
    /// constrained decoder's mask included), divided by the temperature. Top-k, top-p and
    /// min-p are left out (they only cut the tail, and would make the value depend on them);
    /// greedy picking is read at temperature 1, since its own distribution (all mass on the
    /// argmax) would say 0 for every token. Costs one log-sum-exp over the vocabulary.
    pub fn sample_with_log_prob(
        &mut self,
        logits: &mut [f32],
        history: &[u32],
    ) -> Result<(u32, f32)> {
        let id = self.sample(logits, history)?;
        let inv_temperature = 1.0 / self.params.temperature;
        let scale = if self.params.is_greedy() || !inv_temperature.is_finite() {
            1.0
        } else {
            inv_temperature
        };
        // A picked token has a finite logit, so there is always a value.
        let log_prob = scaled_log_prob(logits, id, scale).unwrap_or(f32::NEG_INFINITY);
        Ok((id, log_prob))
    }

    fn apply_penalties(&mut self, logits: &mut [f32], history: &[u32], generated: &[u32]) {
        let params = &self.params;
        let seen = &mut self.token_scratch;
        let penalty = params.repetition_penalty;
        if penalty != 1.0 {
            let window = match params.repetition_window {
                Some(n) => &history[history.len().saturating_sub(n)..],
                None => history,
            };
            seen.clear();
            seen.extend_from_slice(window);
            seen.sort_unstable();
            seen.dedup();
            // Ids past the vocabulary cannot be penalised; they are skipped, not an error.
            for &id in seen.iter() {
                if let Some(logit) = logits.get_mut(id as usize) {
                    *logit = if *logit < 0.0 {
                        *logit * penalty
                    } else {
                        *logit / penalty
                    };
                }
            }
        }
        let (frequency, presence) = (params.frequency_penalty, params.presence_penalty);
        if frequency != 0.0 || presence != 0.0 {
            seen.clear();
            seen.extend_from_slice(generated);
            seen.sort_unstable();
            for run in seen.chunk_by(|a, b| a == b) {
                if let Some(logit) = logits.get_mut(run[0] as usize) {
                    *logit -= run.len() as f32 * frequency + presence;
                }
            }
        }
    }

    /// Leaves the tokens that survive temperature, top-k, top-p and min-p, with their weights,
    /// in the buffer named by the returned [`Pool`]. All three filters keep a prefix of the
    /// tokens sorted most likely first, so the result is the shortest of the three prefixes;
    /// only top-p needs an ordering, and only of its nucleus.
    fn filter(&mut self, logits: &[f32], max: f32, inv_temperature: f32) -> Pool {
        let (top_p, min_p) = (self.params.top_p, self.params.min_p);
        let weight = |logit: f32| exp_nonpositive((logit - max) * inv_temperature);
        let candidates = &mut self.candidates;
        candidates.clear();
        let total_weight = if let Some(k) = self.params.top_k.filter(|&k| k < logits.len()) {
            // No weight outside the k best is needed, so they are chosen on logits first.
            // Top-p renormalises over the top-k tokens, so min-p cannot cut before it.
            let min_x = if min_p > 0.0 && top_p >= 1.0 {
                min_p.ln()
            } else {
                MIN_EXP_ARG
            };
            // A little below the cut: the exact test is on the weights, below.
            let floor = max + (min_x.max(MIN_EXP_ARG) - 1e-3) / inv_temperature;
            collect_top_k(logits, k, floor, candidates);
            for candidate in candidates.iter_mut() {
                candidate.weight = weight(candidate.weight);
            }
            candidates.retain(|c| c.weight > 0.0);
            candidates.iter().map(|c| f64::from(c.weight)).sum()
        } else {
            // Every token is weighed (a weight of 0 is a -inf logit or one too unlikely to
            // ever be drawn), in a loop that vectorises.
            let weights = &mut self.weights;
            // Resized, not cleared: every entry is overwritten.
            weights.resize(logits.len(), 0.0);
            for (w, &logit) in weights.iter_mut().zip(logits) {
                *w = weight(logit);
            }
            if top_p >= 1.0 {
                if min_p > 0.0 {
                    weights
                        .iter_mut()
                        .for_each(|w| *w = if *w >= min_p { *w } else { 0.0 });
                }
                return Pool::Weights;
            }
            let total_weight = sum_f64(weights);
            // Tokens lighter than (1 - top_p) * total / n weigh less than (1 - top_p) * total
            // together, so the heavier ones reach top_p first: the nucleus has none of them.
            // Halved for rounding; this is what keeps the nucleus search small.
            let too_light = (1.0 - f64::from(top_p)) * total_weight / logits.len() as f64 / 2.0;
            let keep_from = min_p.max(too_light as f32).max(f32::MIN_POSITIVE);
            for (id, &weight) in weights.iter().enumerate() {
                if weight >= keep_from {
                    candidates.push(Candidate {
                        id: id as u32,
                        weight,
                    });
                }
            }
            // Top-p's mass is over the whole vocabulary, pruned tokens included.
            total_weight
        };

        if top_p < 1.0 {
            let keep = nucleus_len(candidates, f64::from(top_p) * total_weight);
            candidates.truncate(keep);
        }
        if min_p > 0.0 {
            candidates.retain(|c| c.weight >= min_p);
        }
        Pool::Candidates
    }

    fn draw(&mut self, pool: Pool) -> Result<u32> {
        let id = match pool {
            Pool::Weights => {
                let weights = &self.weights;
                let target = self.rng.random::<f64>() * sum_f64(weights);
                // Only rounding leaves the target past the end.
                find_cumulative(weights, target).or_else(|| weights.iter().rposition(|&w| w > 0.0))
            }
            Pool::Candidates => {
                let candidates = &self.candidates;
                let total: f64 = candidates.iter().map(|c| f64::from(c.weight)).sum();
                let target = self.rng.random::<f64>() * total;
                let mut cumulative = 0.0;
                let found = candidates.iter().position(|c| {
                    cumulative += f64::from(c.weight);
                    target < cumulative
                });
                found.or(candidates.len().checked_sub(1))
            }
        };
        // The most likely token always survives filtering, so there is always one.
        let id = id.ok_or(InferError::NoTokenAllowed)?;
        Ok(match pool {
            Pool::Weights => id as u32,
            Pool::Candidates => self.candidates[id].id,
        })
    }
}

/// Which of the [`Sampler`]'s buffers holds the tokens left to draw from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pool {
    /// `weights[id]` for every token, 0 for those filtered out: when no filter needs an order.
    Weights,
    /// `candidates`, weights > 0.
    Candidates,
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;
    use crate::processors::{BanTokens, FallbackToEos};

    const NEG_INF: f32 = f32::NEG_INFINITY;

    fn sampler(params: SamplingParams) -> Sampler {
        Sampler::new(params, 0).unwrap()
    }

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            seed: Some(7),
            ..SamplingParams::default()
        }
    }

    /// Logits whose softmax is `probs`.
    fn logits_of(probs: &[f32]) -> Vec<f32> {
        probs.iter().map(|p| p.ln()).collect()
    }

    /// The ids that survive temperature, top-k, top-p and min-p, without drawing.
    fn kept(params: SamplingParams, logits: &[f32]) -> BTreeSet<u32> {
        let mut sampler = sampler(params);
        let (_, max) = argmax(logits).unwrap();
        let inv_temperature = 1.0 / sampler.params.temperature;
        match sampler.filter(logits, max, inv_temperature) {
            Pool::Candidates => sampler.candidates.iter().map(|c| c.id).collect(),
            Pool::Weights => (0u32..)
                .zip(&sampler.weights)
                .filter(|(_, &w)| w > 0.0)
                .map(|(id, _)| id)
                .collect(),
        }
    }

    fn draws(sampler: &mut Sampler, logits: &[f32], n: usize) -> Vec<u32> {
        (0..n)
            .map(|_| sampler.sample(&mut logits.to_vec(), &[]).unwrap())
            .collect()
    }

    #[test]
    fn greedy_picks_the_argmax_and_ties_go_to_the_lowest_id() {
        let mut greedy = sampler(SamplingParams::greedy());
        assert_eq!(greedy.sample(&mut [0.1, 2.0, -1.0, 1.9], &[]).unwrap(), 1);
        assert_eq!(
            greedy.sample(&mut [NEG_INF, 3.0, 1.0, 3.0], &[]).unwrap(),
            1
        );
        assert_eq!(
            greedy.sample(&mut [NEG_INF, NEG_INF, -5.0], &[]).unwrap(),
            2
        );
    }

    #[test]
    fn bad_logits_are_errors() {
        let mut greedy = sampler(SamplingParams::greedy());
        assert!(matches!(
            greedy.sample(&mut [], &[]),
            Err(InferError::EmptyLogits)
        ));
        assert!(matches!(
            greedy.sample(&mut [0.0, f32::NAN], &[]),
            Err(InferError::InvalidLogit { token_id: 1, .. })
        ));
        assert!(matches!(
            greedy.sample(&mut [0.0, f32::INFINITY], &[]),
            Err(InferError::InvalidLogit { token_id: 1, .. })
        ));
        let mut random = sampler(params(1.0));
        assert!(matches!(
            random.sample(&mut [NEG_INF, NEG_INF], &[]),
            Err(InferError::NoTokenAllowed)
        ));
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_differs_across_seeds() {
        let logits = vec![0.0; 100];
        let first = draws(&mut sampler(params(1.0)), &logits, 50);
        let again = draws(&mut sampler(params(1.0)), &logits, 50);
        let other_seed = SamplingParams {
            seed: Some(8),
            ..params(1.0)
        };
        let other = draws(&mut sampler(other_seed), &logits, 50);
        assert_eq!(first, again);
        assert_ne!(first, other);
        assert!(
            first.iter().collect::<BTreeSet<_>>().len() > 20,
            "{first:?}"
        );
    }

    #[test]
    fn a_drawn_seed_is_reported_and_repeats_the_run() {
        let logits = vec![0.0; 100];
        let unseeded = SamplingParams {
            seed: None,
            ..params(1.0)
        };
        let mut first = sampler(unseeded.clone());
        let first_draws = draws(&mut first, &logits, 30);
        let reseeded = SamplingParams {
            seed: Some(first.seed()),
            ..unseeded
        };
        assert_eq!(draws(&mut sampler(reseeded), &logits, 30), first_draws);
    }

    #[test]
    fn sampling_follows_the_distribution() {
        let logits = logits_of(&[0.7, 0.2, 0.1]);
        let drawn = draws(&mut sampler(params(1.0)), &logits, 10_000);
        let share = |id| drawn.iter().filter(|&&d| d == id).count() as f64 / 10_000.0;
        assert!((share(0) - 0.7).abs() < 0.03, "{}", share(0));
        assert!((share(1) - 0.2).abs() < 0.03, "{}", share(1));
        assert!((share(2) - 0.1).abs() < 0.03, "{}", share(2));
    }

    #[test]
    fn top_k_keeps_the_k_most_likely_with_ties_to_the_lowest_ids() {
        let logits = [1.0, 3.0, 2.0, 3.0, 0.0];
        let top_2 = SamplingParams {
            top_k: Some(2),
            ..params(1.0)
        };
        assert_eq!(kept(top_2.clone(), &logits), BTreeSet::from([1, 3]));
        let top_3 = SamplingParams {
            top_k: Some(3),
            ..params(1.0)
        };
        assert_eq!(kept(top_3, &logits), BTreeSet::from([1, 2, 3]));
        let drawn = draws(&mut sampler(top_2), &logits, 200);
        assert!(drawn.iter().all(|id| [1, 3].contains(id)));
    }

    #[test]
    fn top_p_keeps_the_minimal_nucleus() {
        let logits = logits_of(&[0.05, 0.5, 0.15, 0.3]);
        let with_top_p = |top_p| {
            kept(
                SamplingParams {
                    top_p,
                    ..params(1.0)
                },
                &logits,
            )
        };
        assert_eq!(with_top_p(0.4), BTreeSet::from([1]));
        assert_eq!(with_top_p(0.75), BTreeSet::from([1, 3]));
        assert_eq!(with_top_p(0.9), BTreeSet::from([1, 2, 3]));
        assert_eq!(with_top_p(1.0), BTreeSet::from([0, 1, 2, 3]));
    }

    #[test]
    fn top_p_large_nucleus_is_exact() {
        // 1000 equally likely tokens: half the mass is the 500 lowest ids.
        let logits = vec![0.0; 1000];
        let half = kept(
            SamplingParams {
                top_p: 0.4995,
                ..params(1.0)
            },
            &logits,
        );
        assert_eq!(half, (0..500).collect());
    }

    #[test]
    fn top_p_renormalises_over_top_k_like_hf() {
        let logits = logits_of(&[0.4, 0.3, 0.2, 0.1]);
        // Alone: 0.4 + 0.3 < 0.72, so three tokens.
        let top_p = SamplingParams {
            top_p: 0.72,
            ..params(1.0)
        };
        assert_eq!(kept(top_p.clone(), &logits), BTreeSet::from([0, 1, 2]));
        // After top-3 the masses are 4/9, 3/9, 2/9: 7/9 >= 0.72, so two.
        let both = SamplingParams {
            top_k: Some(3),
            ..top_p
        };
        assert_eq!(kept(both, &logits), BTreeSet::from([0, 1]));
    }

    #[test]
    fn temperature_applies_before_top_p() {
        // Softmax of [2, 1, 0] is [0.665, 0.245, 0.090]; of [4, 2, 0] (t = 0.5) [0.867, ...].
        let logits = [2.0, 1.0, 0.0];
        let at = |temperature| {
            kept(
                SamplingParams {
                    top_p: 0.7,
                    ..params(temperature)
                },
                &logits,
            )
        };
        assert_eq!(at(1.0), BTreeSet::from([0, 1]));
        assert_eq!(at(0.5), BTreeSet::from([0]));
    }

    #[test]
    fn min_p_keeps_tokens_relative_to_the_most_likely() {
        let logits = logits_of(&[0.5, 0.3, 0.15, 0.05]);
        let with_min_p = |min_p| {
            kept(
                SamplingParams {
                    min_p,
                    ..params(1.0)
                },
                &logits,
            )
        };
        assert_eq!(with_min_p(0.2), BTreeSet::from([0, 1, 2]));
        assert_eq!(with_min_p(0.5), BTreeSet::from([0, 1]));
        assert_eq!(with_min_p(1.0), BTreeSet::from([0]));
        let all_filters = SamplingParams {
            top_k: Some(3),
            top_p: 0.99,
            min_p: 0.5,
            ..params(1.0)
        };
        assert_eq!(kept(all_filters, &logits), BTreeSet::from([0, 1]));
    }

    #[test]
    fn repetition_penalty_matches_hf() {
        // HF: score = where(score < 0, score * penalty, score / penalty) over tokens seen once
        // or more; token 1 is seen twice but penalised once.
        let penalty = SamplingParams {
            repetition_penalty: 2.0,
            ..SamplingParams::greedy()
        };
        let mut logits = [2.0, -1.0, 0.5, 3.0];
        sampler(penalty.clone())
            .sample(&mut logits, &[0, 1, 1, 42])
            .unwrap();
        assert_eq!(logits, [1.0, -2.0, 0.5, 3.0]);
        // Only the last token counts with a window of 1; the prompt counts as much as output.
        let windowed = SamplingParams {
            repetition_window: Some(1),
            ..penalty
        };
        let mut logits = [2.0, -1.0, 0.5, 3.0];
        Sampler::new(windowed, 3)
            .unwrap()
            .sample(&mut logits, &[0, 3, 0, 1])
            .unwrap();
        assert_eq!(logits, [2.0, -2.0, 0.5, 3.0]);
    }

    #[test]
    fn repetition_penalty_changes_the_greedy_choice() {
        let penalty = SamplingParams {
            repetition_penalty: 1.5,
            ..SamplingParams::greedy()
        };
        assert_eq!(sampler(penalty).sample(&mut [1.2, 1.0], &[0]).unwrap(), 1);
    }

    #[test]
    fn frequency_and_presence_penalties_count_only_the_output() {
        let penalties = SamplingParams {
            frequency_penalty: 0.5,
            presence_penalty: 0.25,
            ..SamplingParams::greedy()
        };
        let mut logits = [1.0; 4];
        // Prompt [1, 2]; output [2, 2, 3].
        Sampler::new(penalties, 2)
            .unwrap()
            .sample(&mut logits, &[1, 2, 2, 2, 3])
            .unwrap();
        assert_eq!(logits, [1.0, 1.0, 1.0 - 1.0 - 0.25, 1.0 - 0.5 - 0.25]);
    }

    #[test]
    fn processors_see_only_the_output_and_run_after_penalties() {
        let penalty = SamplingParams {
            repetition_penalty: 2.0,
            ..SamplingParams::greedy()
        };
        // Bans the token whose id is the number of generated tokens; keeps what it saw.
        let record = |generated: &[u32], logits: &mut [f32]| {
            assert_eq!(logits[0], 4.0 / 2.0, "penalties first");
            logits[generated.len()] = NEG_INF;
        };
        let mut sampler = Sampler::new(penalty, 2).unwrap().with_processor(record);
        // Output so far is one token: token 1 is banned.
        let mut logits = [4.0, 9.0, 1.0];
        assert_eq!(sampler.sample(&mut logits, &[0, 0, 2]).unwrap(), 0);
        assert_eq!(logits, [2.0, NEG_INF, 0.5]);
    }

    #[test]
    fn banned_tokens_are_never_picked() {
        let mut sampler = sampler(params(1.0)).with_processor(BanTokens::new([0, 2]));
        let logits = [5.0, 0.0, 5.0, 0.0];
        assert!(draws(&mut sampler, &logits, 300)
            .iter()
            .all(|id| [1, 3].contains(id)));
    }

    #[test]
    fn nothing_allowed_is_an_error_unless_falling_back_to_eos() {
        let ban_all = BanTokens::new(0..4);
        let mut strict = sampler(params(1.0)).with_processor(ban_all.clone());
        let result = strict.sample(&mut [1.0; 4], &[]);
        assert!(
            matches!(result, Err(InferError::NoTokenAllowed)),
            "{result:?}"
        );
        for temperature in [0.0, 1.0] {
            let mut lenient = sampler(params(temperature))
                .with_processor(ban_all.clone())
                .with_processor(FallbackToEos { eos_token_id: 3 });
            assert_eq!(lenient.sample(&mut [1.0; 4], &[]).unwrap(), 3);
        }
    }

    #[test]
    fn a_token_that_is_the_only_one_allowed_has_log_prob_0() {
        for temperature in [0.0, 0.7, 1.0] {
            let only_2 = BanTokens::new([0, 1, 3]);
            let mut sampler = sampler(params(temperature)).with_processor(only_2);
            let (id, log_prob) = sampler
                .sample_with_log_prob(&mut [4.0, 9.0, -3.0, 1.0], &[])
                .unwrap();
            assert_eq!((id, log_prob), (2, 0.0), "temperature {temperature}");
        }
    }

    #[test]
    fn the_log_prob_is_of_the_processed_logits_at_the_temperature() {
        // Token 0 is banned: the rest share the mass as softmax([1, 0, 0] / t).
        let logits = [5.0, 1.0, 0.0, 0.0];
        for temperature in [0.5f32, 1.0, 2.0] {
            let mut sampler = sampler(params(temperature)).with_processor(BanTokens::new([0]));
            for _ in 0..20 {
                let (id, log_prob) = sampler
                    .sample_with_log_prob(&mut logits.to_vec(), &[])
                    .unwrap();
                let weights = [1.0f32, 0.0, 0.0].map(|l| (l / temperature).exp());
                let expected = (weights[id as usize - 1] / weights.iter().sum::<f32>()).ln();
                assert!((log_prob - expected).abs() < 1e-5, "{temperature} {id}");
            }
        }
        // Greedy reads the processed logits at temperature 1.
        let mut greedy = sampler(SamplingParams::greedy()).with_processor(BanTokens::new([0]));
        let (id, log_prob) = greedy
            .sample_with_log_prob(&mut logits.to_vec(), &[])
            .unwrap();
        let expected = (1.0f32.exp() / (1.0f32.exp() + 2.0)).ln();
        assert_eq!(id, 1);
        assert!(
            (log_prob - expected).abs() < 1e-6,
            "{log_prob} vs {expected}"
        );
    }

    fn any_params() -> impl Strategy<Value = SamplingParams> {
        (
            prop_oneof![Just(0.0f32), 0.05f32..3.0],
            proptest::option::of(1usize..40),
            0.05f32..=1.0,
            0.0f32..0.9,
            0.5f32..2.0,
            -2.0f32..=2.0,
            any::<u64>(),
        )
            .prop_map(
                |(temperature, top_k, top_p, min_p, repetition, frequency, seed)| SamplingParams {
                    temperature,
                    top_k,
                    top_p,
                    min_p,
                    repetition_penalty: repetition,
                    frequency_penalty: frequency,
                    presence_penalty: -frequency / 2.0,
                    seed: Some(seed),
                    ..SamplingParams::default()
                },
            )
    }

    proptest! {
        #[test]
        fn top_k_1_is_greedy(
            logits in prop::collection::vec(-10.0f32..10.0, 1..300),
            seed in any::<u64>(),
        ) {
            let top_1 = SamplingParams { top_k: Some(1), seed: Some(seed), ..params(1.5) };
            let picked = sampler(top_1).sample(&mut logits.clone(), &[]).unwrap();
            let greedy = sampler(SamplingParams::greedy()).sample(&mut logits.clone(), &[]);
            prop_assert_eq!(picked, greedy.unwrap());
        }

        #[test]
        fn picks_an_allowed_finite_token_or_says_none_is_allowed(
            params in any_params(),
            logits in prop::collection::vec(
                prop_oneof![4 => -30.0f32..30.0, 1 => Just(NEG_INF)], 1..300),
            banned in prop::collection::vec(0u32..300, 0..60),
            history in prop::collection::vec(0u32..300, 0..40),
        ) {
            let original = logits.clone();
            let mut logits = logits;
            let mut sampler = Sampler::new(params, history.len() / 2).unwrap()
                .with_processor(BanTokens::new(banned.iter().copied()));
            let anything_allowed = original.iter().enumerate()
                .any(|(id, &l)| l > NEG_INF && !banned.contains(&(id as u32)));
            match sampler.sample(&mut logits, &history) {
                Ok(id) => {
                    prop_assert!(anything_allowed);
                    prop_assert!(!banned.contains(&id));
                    prop_assert!(logits[id as usize].is_finite());
                }
                Err(InferError::NoTokenAllowed) => prop_assert!(!anything_allowed),
                Err(other) => prop_assert!(false, "unexpected error {other}"),
            }
        }

        #[test]
        fn greedy_is_the_argmax_of_the_processed_logits(
            logits in prop::collection::vec(-30.0f32..30.0, 1..300),
            history in prop::collection::vec(0u32..300, 0..40),
        ) {
            let params = SamplingParams { repetition_penalty: 1.3, ..SamplingParams::greedy() };
            let mut logits = logits;
            let id = sampler(params).sample(&mut logits, &history).unwrap();
            let best = logits.iter().copied().fold(NEG_INF, f32::max);
            prop_assert_eq!(logits[id as usize], best);
            prop_assert!(logits[..id as usize].iter().all(|&l| l < best));
        }

        #[test]
        fn the_picked_token_has_a_log_prob_at_most_0_and_greedy_the_largest(
            params in any_params(),
            logits in prop::collection::vec(-30.0f32..30.0, 1..300),
            history in prop::collection::vec(0u32..300, 0..40),
        ) {
            let greedy = params.is_greedy();
            let mut processed = logits.clone();
            let mut sampler = Sampler::new(params, history.len() / 2).unwrap();
            let (id, log_prob) = sampler.sample_with_log_prob(&mut processed, &history).unwrap();
            prop_assert!(log_prob <= 0.0 && log_prob.is_finite(), "{}", log_prob);
            if greedy {
                for other in 0..processed.len() as u32 {
                    let theirs = crate::log_prob_of(&processed, other).unwrap();
                    prop_assert!(theirs <= log_prob, "{} beats the pick {}", other, id);
                }
            }
        }
    }
}
