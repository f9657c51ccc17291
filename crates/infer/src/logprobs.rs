//! Log-probabilities of the next token, for reporting alternatives and logprobs.
//!
//! They take the logits as [`crate::Sampler::sample`] leaves them (finite or -inf); NaN and
//! +inf are not expected there.

use crate::kernels::{collect_top_k, max_finite, most_likely_first, sum_exp_below, Candidate};

/// `log(sum(exp(logits)))` over the finite logits, `None` when there are none.
fn log_sum_exp(logits: &[f32]) -> Option<f64> {
    let max = max_finite(logits)?;
    Some(f64::from(max) + sum_exp_below(logits, max, 1.0).ln())
}

/// The `k` most likely tokens with their log-probabilities (log-softmax over the finite
/// logits), most likely first, ties to the lowest id. Tokens whose logit is -inf are not
/// listed.
pub fn log_softmax_top(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    let Some(log_norm) = log_sum_exp(logits).filter(|_| k > 0) else {
        return Vec::new();
    };
    let mut top: Vec<Candidate> = Vec::with_capacity(k.min(logits.len()));
    if k < logits.len() {
        collect_top_k(logits, k, f32::MIN, &mut top);
    } else {
        let finite = logits.iter().enumerate().filter(|(_, l)| l.is_finite());
        top.extend(finite.map(|(id, &weight)| Candidate {
            id: id as u32,
            weight,
        }));
    }
    top.sort_unstable_by(most_likely_first);
    top.iter()
        .map(|c| (c.id, (f64::from(c.weight) - log_norm) as f32))
        .collect()
}

/// Log-probability of `token_id` under the log-softmax of `logits` (-inf for a banned token);
/// `None` when the id is out of range, its logit is NaN or +inf, or no logit is finite.
pub fn log_prob_of(logits: &[f32], token_id: u32) -> Option<f32> {
    scaled_log_prob(logits, token_id, 1.0)
}

/// [`log_prob_of`] under the log-softmax of `logits * scale`, the distribution sampling at
/// temperature `1 / scale` (> 0) draws from. One pass for the maximum, one for the sum: the
/// price of reporting every generated token's log-probability. Computed relative to the
/// maximum, so the most likely token's value is never above 0 and a token that is the only
/// finite one gets exactly 0.
pub(crate) fn scaled_log_prob(logits: &[f32], token_id: u32, scale: f32) -> Option<f32> {
    let logit = *logits.get(token_id as usize)?;
    if logit.is_nan() || logit == f32::INFINITY {
        return None;
    }
    let max = max_finite(logits)?;
    let log_norm = sum_exp_below(logits, max, scale).ln();
    let relative = (f64::from(logit) - f64::from(max)) * f64::from(scale);
    Some((relative - log_norm) as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NEG_INF: f32 = f32::NEG_INFINITY;

    /// Logits whose softmax is `probs`.
    fn logits_of(probs: &[f32]) -> Vec<f32> {
        probs.iter().map(|p| p.ln()).collect()
    }

    #[test]
    fn log_softmax_top_lists_the_most_likely_with_log_probs() {
        let logits = logits_of(&[0.25, 0.5, 0.25, 0.0]);
        let top = log_softmax_top(&logits, 2);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 0]);
        assert!((top[0].1 - 0.5f32.ln()).abs() < 1e-6);
        assert!((top[1].1 - 0.25f32.ln()).abs() < 1e-6);
        // The zero-probability token (-inf logit) is never listed.
        assert_eq!(log_softmax_top(&logits, 10).len(), 3);
        assert_eq!(log_softmax_top(&logits, 3).len(), 3);
        assert!(log_softmax_top(&logits, 0).is_empty());
        assert!(log_softmax_top(&[NEG_INF], 3).is_empty());
        assert_eq!(log_prob_of(&logits, 3), Some(NEG_INF));
        assert!((log_prob_of(&logits, 2).unwrap() - 0.25f32.ln()).abs() < 1e-6);
        assert_eq!(log_prob_of(&logits, 4), None);
    }

    #[test]
    fn scaled_log_prob_is_the_log_softmax_at_that_temperature() {
        let logits = [2.0f32, 1.0, 0.0, NEG_INF];
        for scale in [0.5f32, 1.0, 2.0, 10.0] {
            let total: f64 = logits.iter().map(|&l| f64::from(l * scale).exp()).sum();
            for id in 0..3 {
                let expected = f64::from(logits[id] * scale) - total.ln();
                let ours = scaled_log_prob(&logits, id as u32, scale).unwrap();
                assert!((f64::from(ours) - expected).abs() < 1e-6, "{scale} {id}");
            }
            assert_eq!(scaled_log_prob(&logits, 3, scale), Some(NEG_INF));
        }
        // The only finite token is certain, exactly.
        assert_eq!(scaled_log_prob(&[NEG_INF, 3.5, NEG_INF], 1, 0.7), Some(0.0));
        assert_eq!(scaled_log_prob(&[NEG_INF, NEG_INF], 1, 1.0), None);
        assert_eq!(scaled_log_prob(&[0.0, f32::NAN], 1, 1.0), None);
    }

    #[test]
    fn log_softmax_top_is_sorted_and_its_probabilities_add_up_to_one() {
        // Many ties: 101 distinct values over 500 tokens.
        let logits: Vec<f32> = (0..500).map(|i| ((i * 37) % 101) as f32 / 10.0).collect();
        let all = log_softmax_top(&logits, 1000);
        assert_eq!(all.len(), 500);
        let total: f64 = all.iter().map(|t| f64::from(t.1).exp()).sum();
        assert!((total - 1.0).abs() < 1e-4, "{total}");
        assert!(all
            .windows(2)
            .all(|w| w[0].1 > w[1].1 || (w[0].1 == w[1].1 && w[0].0 < w[1].0)));
        assert_eq!(log_softmax_top(&logits, 37), all[..37]);
    }
}
