//! The loops of sampling that run over the whole vocabulary (150k-260k entries, once per token),
//! written for speed: no sort where a partial selection does, no libm call per element
//! (`f32::exp` made temperature sampling over 262k tokens cost ~2 ms), branch-free bodies that
//! the compiler vectorises.

use std::cmp::Ordering;

use crate::error::{InferError, Result};

/// Below this, [`exp_nonpositive`] returns 0: f32 would need subnormals, and a token this
/// unlikely relative to the best one (< 2e-38) is never drawn anyway.
pub(crate) const MIN_EXP_ARG: f32 = -87.0;

/// `exp(x)` for `x <= 0`, within a few ulp of `f32::exp`; 0 below [`MIN_EXP_ARG`] and for -inf.
/// Cephes' `expf` (range reduction to `r` in [-ln2/2, ln2/2], degree-6 polynomial, scale by
/// 2^k through the exponent bits) without branches or float-to-int casts, so that loops over
/// it vectorise.
#[inline(always)]
pub(crate) fn exp_nonpositive(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5 * 2^23 rounds to an integer, which then sits in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let clamped = if x < MIN_EXP_ARG { MIN_EXP_ARG } else { x };
    let shifted = clamped * std::f32::consts::LOG2_E + ROUND;
    let k = shifted - ROUND;
    let r = clamped - k * LN2_HI - k * LN2_LO;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // 2^k: k is in [-126, 0] here, so k + 127 is a normal exponent.
    let exponent = shifted
        .to_bits()
        .wrapping_sub(ROUND.to_bits())
        .wrapping_add(127);
    let scale = f32::from_bits(exponent << 23);
    if x < MIN_EXP_ARG {
        0.0
    } else {
        y * scale
    }
}

/// Sum in f64, over 8 independent lanes so that the additions need not wait for each other.
pub(crate) fn sum_f64(values: &[f32]) -> f64 {
    let mut lanes = [0.0f64; 8];
    let chunks = values.chunks_exact(8);
    let rest: f64 = chunks.remainder().iter().map(|&v| f64::from(v)).sum();
    for chunk in chunks {
        for (lane, &value) in lanes.iter_mut().zip(chunk) {
            *lane += f64::from(value);
        }
    }
    lanes.iter().sum::<f64>() + rest
}

/// The largest finite logit, `None` when there is none (NaN and ±inf are passed over).
pub(crate) fn max_finite(logits: &[f32]) -> Option<f32> {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = logits.chunks_exact(8);
    let rest = chunks.remainder().iter().copied().filter(|l| l.is_finite());
    let rest = rest.fold(f32::NEG_INFINITY, f32::max);
    for chunk in chunks {
        for (lane, &logit) in lanes.iter_mut().zip(chunk) {
            // False for NaN; selects rather than branches, so that it vectorises.
            let larger = logit > *lane && logit != f32::INFINITY;
            *lane = if larger { logit } else { *lane };
        }
    }
    let max = lanes.iter().copied().fold(rest, f32::max);
    (max > f32::NEG_INFINITY).then_some(max)
}

/// `sum(exp((l - max) * scale))` over the finite logits `l`, all at most `max`, in f64; `scale`
/// (> 0) is 1 / temperature.
pub(crate) fn sum_exp_below(logits: &[f32], max: f32, scale: f32) -> f64 {
    // Exponentials go through a small buffer: the loop that fills it vectorises, one that
    // also accumulates does not.
    let mut buffer = [0.0f32; 256];
    let mut total = 0.0;
    for block in logits.chunks(buffer.len()) {
        let terms = &mut buffer[..block.len()];
        for (term, &logit) in terms.iter_mut().zip(block) {
            let x = if logit.is_finite() {
                (logit - max) * scale
            } else {
                f32::NEG_INFINITY
            };
            *term = exp_nonpositive(x);
        }
        total += sum_f64(terms);
    }
    total
}

/// Index of the first weight at which the running sum exceeds `target`, skipping whole chunks
/// by their sums; `None` when rounding leaves `target` past the end. The weight at the index
/// found is never 0.
pub(crate) fn find_cumulative(weights: &[f32], target: f64) -> Option<usize> {
    const CHUNK: usize = 256;
    let mut cumulative = 0.0f64;
    for (c, chunk) in weights.chunks(CHUNK).enumerate() {
        let chunk_sum = sum_f64(chunk);
        if target >= cumulative + chunk_sum {
            cumulative += chunk_sum;
            continue;
        }
        for (i, &weight) in chunk.iter().enumerate() {
            cumulative += f64::from(weight);
            if target < cumulative {
                return Some(c * CHUNK + i);
            }
        }
    }
    None
}

/// A token that survived filtering, with `weight = exp((logit - max_logit) / temperature)`,
/// in (0, 1]: the most likely token weighs 1, so min-p compares weights to `min_p` directly.
/// While top-k chooses, `weight` holds the logit.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Candidate {
    pub(crate) id: u32,
    pub(crate) weight: f32,
}

/// Most likely first; equal weights by lowest id, so every selection is deterministic.
pub(crate) fn most_likely_first(a: &Candidate, b: &Candidate) -> Ordering {
    b.weight.total_cmp(&a.weight).then(a.id.cmp(&b.id))
}

/// The `k` highest logits at or above `floor`, ties to the lowest ids, in no order, as
/// candidates whose weight is still the logit. One pass: a buffer collects the logits that
/// reach a threshold and, when full, is cut back to the best `k`, which raises the threshold to
/// the k-th best logit so far; most tokens then cost one comparison.
pub(crate) fn collect_top_k(logits: &[f32], k: usize, floor: f32, out: &mut Vec<Candidate>) {
    let capacity = (2 * k).max(k + 256);
    let mut threshold = floor;
    for (id, &logit) in logits.iter().enumerate() {
        if logit >= threshold {
            out.push(Candidate {
                id: id as u32,
                weight: logit,
            });
            if out.len() == capacity {
                out.select_nth_unstable_by(k - 1, most_likely_first);
                out.truncate(k);
                threshold = out[k - 1].weight;
            }
        }
    }
    if out.len() > k {
        out.select_nth_unstable_by(k - 1, most_likely_first);
        out.truncate(k);
    }
}

/// How many of the most likely candidates make the nucleus: the fewest whose weights reach
/// `target_weight`; they are moved first, in no particular order. A quickselect on mass rather
/// than rank: each round splits the undecided range in two with a partial selection and keeps
/// the half where the mass runs out, so only the last few candidates are ever sorted.
pub(crate) fn nucleus_len(candidates: &mut [Candidate], target_weight: f64) -> usize {
    const SORT_BELOW: usize = 64;
    let (mut lo, mut hi) = (0, candidates.len());
    // The weight of candidates[..lo], all in the nucleus.
    let mut above = 0.0f64;
    while hi - lo > SORT_BELOW {
        let mid = lo + (hi - lo) / 2;
        candidates[lo..hi].select_nth_unstable_by(mid - lo, most_likely_first);
        let upper: f64 = candidates[lo..mid]
            .iter()
            .map(|c| f64::from(c.weight))
            .sum();
        if above + upper >= target_weight {
            hi = mid;
        } else {
            above += upper;
            lo = mid;
        }
    }
    candidates[lo..hi].sort_unstable_by(most_likely_first);
    for (i, candidate) in candidates[lo..hi].iter().enumerate() {
        above += f64::from(candidate.weight);
        if above >= target_weight {
            return lo + i + 1;
        }
    }
    // Only rounding gets here.
    hi
}

/// Id and value of the largest logit, ties to the lowest id. Rejects NaN and +inf, and fails
/// with [`InferError::NoTokenAllowed`] when every logit is -inf.
pub(crate) fn argmax(logits: &[f32]) -> Result<(u32, f32)> {
    let mut best = (0u32, f32::NEG_INFINITY);
    for (id, &logit) in logits.iter().enumerate() {
        if logit > best.1 {
            if logit == f32::INFINITY {
                return Err(InferError::InvalidLogit {
                    token_id: id as u32,
                    value: logit,
                });
            }
            best = (id as u32, logit);
        } else if logit.is_nan() {
            return Err(InferError::InvalidLogit {
                token_id: id as u32,
                value: logit,
            });
        }
    }
    if best.1 == f32::NEG_INFINITY {
        return Err(InferError::NoTokenAllowed);
    }
    Ok(best)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const NEG_INF: f32 = f32::NEG_INFINITY;

    #[test]
    fn exp_nonpositive_is_within_a_few_ulp_of_exp() {
        let mut worst = 0.0f64;
        for i in 0..=870_000 {
            let x = -(i as f32) * 1e-4;
            let exact = f64::from(x).exp();
            let relative = (f64::from(exp_nonpositive(x)) - exact).abs() / exact;
            worst = worst.max(relative);
        }
        assert!(
            worst < 4.0 * f64::from(f32::EPSILON),
            "relative error {worst:e}"
        );
        assert_eq!(exp_nonpositive(0.0), 1.0);
    }

    #[test]
    fn exp_nonpositive_is_zero_far_below_and_at_minus_infinity() {
        assert_eq!(exp_nonpositive(-87.5), 0.0);
        assert_eq!(exp_nonpositive(-1e30), 0.0);
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
        assert!(exp_nonpositive(MIN_EXP_ARG) > 0.0);
    }

    #[test]
    fn find_cumulative_finds_the_weight_covering_the_target() {
        let mut weights = vec![0.0f32; 1000];
        weights[3] = 1.0;
        weights[700] = 2.0;
        weights[999] = 1.0;
        assert_eq!(find_cumulative(&weights, 0.0), Some(3));
        assert_eq!(find_cumulative(&weights, 0.999), Some(3));
        assert_eq!(find_cumulative(&weights, 1.0), Some(700));
        assert_eq!(find_cumulative(&weights, 2.999), Some(700));
        assert_eq!(find_cumulative(&weights, 3.5), Some(999));
        assert_eq!(find_cumulative(&weights, 4.0), None);
    }

    #[test]
    fn max_finite_passes_over_nan_and_infinities() {
        let mut logits = vec![f32::NAN, f32::INFINITY, NEG_INF, -3.0, 2.0];
        logits.extend([1.0; 20]);
        logits[17] = 4.0;
        logits[21] = f32::INFINITY;
        assert_eq!(max_finite(&logits), Some(4.0));
        assert_eq!(max_finite(&[f32::NAN, NEG_INF]), None);
        assert_eq!(max_finite(&[]), None);
    }

    #[test]
    fn sum_exp_below_matches_a_plain_sum() {
        let logits: Vec<f32> = (0..1000).map(|i| (i % 17) as f32 - 20.0).collect();
        let plain: f64 = logits.iter().map(|&l| f64::from(l + 4.0).exp()).sum();
        let fast = sum_exp_below(&logits, -4.0, 1.0);
        assert!((fast - plain).abs() / plain < 1e-6, "{fast} vs {plain}");
        assert_eq!(sum_exp_below(&[NEG_INF, f32::NAN], 0.0, 1.0), 0.0);
        let cooled: f64 = logits
            .iter()
            .map(|&l| f64::from((l + 4.0) * 2.0).exp())
            .sum();
        let fast = sum_exp_below(&logits, -4.0, 2.0);
        assert!((fast - cooled).abs() / cooled < 1e-6, "{fast} vs {cooled}");
    }

    #[test]
    fn sum_f64_adds_every_value() {
        let values: Vec<f32> = (1..=1001).map(|i| i as f32).collect();
        assert_eq!(sum_f64(&values), 1001.0 * 1002.0 / 2.0);
        assert_eq!(sum_f64(&[]), 0.0);
    }

    proptest! {
        #[test]
        fn collect_top_k_matches_a_full_sort(
            // Few distinct values, so that ties at the k-th place are common.
            logits in prop::collection::vec(prop_oneof![(-8i8..8).prop_map(f32::from), Just(NEG_INF)], 1..2000),
            k in 1usize..400,
            floor in prop_oneof![Just(f32::MIN), -8.0f32..8.0],
        ) {
            let mut fast = Vec::new();
            collect_top_k(&logits, k, floor, &mut fast);
            let mut fast: Vec<u32> = fast.iter().map(|c| c.id).collect();
            fast.sort_unstable();
            let mut all: Vec<Candidate> = (0u32..).zip(&logits)
                .filter(|(_, &l)| l >= floor)
                .map(|(id, &weight)| Candidate { id, weight })
                .collect();
            all.sort_by(most_likely_first);
            let mut slow: Vec<u32> = all.iter().take(k).map(|c| c.id).collect();
            slow.sort_unstable();
            prop_assert_eq!(fast, slow);
        }


        #[test]
        fn nucleus_len_is_the_shortest_sorted_prefix_reaching_the_mass(
            // Whole weights keep every sum exact; few values make ties common.
            weights in prop::collection::vec(1u8..8, 1..1500),
            fraction in 0.0f64..1.0,
        ) {
            let mut candidates: Vec<Candidate> = (0u32..)
                .zip(&weights)
                .map(|(id, &w)| Candidate { id, weight: f32::from(w) })
                .collect();
            let total: f64 = weights.iter().map(|&w| f64::from(w)).sum();
            // Half-way between two whole sums, so that no comparison is a tie.
            let target = (fraction * total).floor() + 0.5;
            let len = nucleus_len(&mut candidates, target);
            let mut nucleus: Vec<u32> = candidates[..len].iter().map(|c| c.id).collect();
            nucleus.sort_unstable();
            let mut sorted = candidates.clone();
            sorted.sort_by(most_likely_first);
            let mut mass = 0.0;
            let shortest = 1 + sorted.iter().position(|c| {
                mass += f64::from(c.weight);
                mass >= target
            }).unwrap();
            let mut expected: Vec<u32> = sorted[..shortest].iter().map(|c| c.id).collect();
            expected.sort_unstable();
            prop_assert_eq!(nucleus, expected);
        }
    }
}
