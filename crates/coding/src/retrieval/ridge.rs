//! Kernel ridge regression of every code on the fitted notes: with `K` the notes' cosine
//! similarities (their TF-IDF vectors are unit length) and `Y` the notes' code indicators, the
//! scores of a new note whose similarities to the fitted notes are `k` are
//! `kᵀ (K + λI)⁻¹ Y`. Unlike the nearest notes' vote, every fitted note takes part, weighed
//! against the others that say the same: a code is credited for what sets its notes apart.
//!
//! One matrix `M = (K + λI)⁻¹` serves every code; a note's weights `w = M k` are spread over
//! the codes of the notes they belong to. Leave-one-out is exact and costs nothing more: with
//! `H = K M = I − λM`, the prediction for fitted note `i` without it is
//! `(Σ_{j≠i} H_ij y_j) / (1 − H_ii)`.
//!
//! `M` is derived when the index is built or loaded (it is never saved): an n×n inverse,
//! so the ridge is kept only up to [`MAX_RIDGE_NOTES`] fitted notes.

use foldhash::{HashMap, HashMapExt};

use rayon::prelude::*;

use super::{CandidateSet, RetrievalIndex, SparseVec, RIDGE_CANDIDATES};
use crate::rerank::Signals;

/// Above this many fitted notes the ridge is not built (its inverse grows with n³ and its
/// memory with n²); the nearest notes' vote and the other signals remain.
pub(super) const MAX_RIDGE_NOTES: usize = 3000;

/// The ridge penalty λ, on cosine similarities (the diagonal of `K` is 1).
pub(super) const RIDGE_PENALTY: f64 = 0.1;

#[derive(Debug, Clone, Default)]
pub(super) struct KernelRidge {
    /// n×n, row-major: `(K + λI)⁻¹`.
    inverse: Vec<f64>,
    n: usize,
    penalty: f64,
}

impl KernelRidge {
    /// From the fitted notes' similarity rows (`gram[i][j]` = cos(note i, note j)); `None`
    /// without notes, above [`MAX_RIDGE_NOTES`], or when the system cannot be factored.
    pub fn new(gram: &[Vec<f32>], penalty: f64) -> Option<Self> {
        let n = gram.len();
        if n == 0 || n > MAX_RIDGE_NOTES || penalty <= 0.0 {
            return None;
        }
        let mut a = vec![0f64; n * n];
        for (i, row) in gram.iter().enumerate() {
            debug_assert_eq!(row.len(), n);
            for j in 0..n {
                // Symmetrised: the two dot products may differ in their last bits.
                a[i * n + j] = 0.5 * (f64::from(row[j]) + f64::from(gram[j][i]));
            }
            a[i * n + i] += penalty;
        }
        let inverse = invert_spd(a, n)?;
        Some(Self {
            inverse,
            n,
            penalty,
        })
    }

    /// Per fitted note, its weight in a new note's scores, from the new note's similarities
    /// to the fitted notes: `M k`.
    pub fn weights(&self, sims: &[f32]) -> Vec<f32> {
        self.inverse
            .chunks_exact(self.n)
            .map(|row| {
                row.iter()
                    .zip(sims)
                    .map(|(&m, &s)| m * f64::from(s))
                    .sum::<f64>() as f32
            })
            .collect()
    }

    /// The exact leave-one-out weights of fitted note `i` (its own weight 0): row `i` of
    /// `H = I − λM` without `H_ii`, rescaled by `1 / (1 − H_ii) = 1 / (λ M_ii)`.
    pub fn leave_one_out_weights(&self, i: usize) -> Vec<f32> {
        let row = &self.inverse[i * self.n..(i + 1) * self.n];
        let scale = 1.0 / (self.penalty * row[i]).max(1e-12);
        row.iter()
            .enumerate()
            .map(|(j, &m)| {
                if j == i {
                    0.0
                } else {
                    (-self.penalty * m * scale) as f32
                }
            })
            .collect()
    }
}

/// The ridge over the fitted notes' single-word vectors: its kernel leaves the word pairs out
/// (they add little to whole notes' likeness and make it noisier: dev MAP 0.382 with them,
/// 0.405 without).
#[derive(Debug, Clone)]
pub(super) struct WordRidge {
    ridge: KernelRidge,
    /// Per term: whether it is a single word's stem (not a pair).
    single_word: Vec<bool>,
    /// Per fitted note: the norm of its vector's single-word part.
    word_norms: Vec<f32>,
}

impl RetrievalIndex {
    /// Built from the fitted notes' vectors (after the postings), or `None` above
    /// [`MAX_RIDGE_NOTES`].
    pub(super) fn word_ridge(&self) -> Option<WordRidge> {
        if self.docs.len() > MAX_RIDGE_NOTES {
            return None;
        }
        let mut single_word = vec![false; self.idf.len()];
        for (term, &id) in &self.vocabulary {
            single_word[id as usize] = !term.contains('_');
        }
        let word_norms: Vec<f32> = self
            .docs
            .iter()
            .map(|v| {
                v.iter()
                    .filter(|(t, _)| single_word[*t as usize])
                    .map(|(_, w)| w * w)
                    .sum::<f32>()
                    .sqrt()
            })
            .collect();
        let gram: Vec<Vec<f32>> = self
            .docs
            .par_iter()
            .map(|v| self.word_similarities(v, &single_word, &word_norms))
            .collect();
        Some(WordRidge {
            ridge: KernelRidge::new(&gram, RIDGE_PENALTY)?,
            single_word,
            word_norms,
        })
    }

    /// Cosine similarity of the single-word parts to every fitted note.
    fn word_similarities(
        &self,
        query: &SparseVec,
        single_word: &[bool],
        word_norms: &[f32],
    ) -> Vec<f32> {
        let mut sims = vec![0f32; self.docs.len()];
        let mut norm2 = 0f32;
        for &(term, weight) in query.iter().filter(|(t, _)| single_word[*t as usize]) {
            norm2 += weight * weight;
            for &(doc, w) in &self.postings[term as usize] {
                sims[doc as usize] += weight * w;
            }
        }
        let norm = norm2.sqrt();
        for (s, &d) in sims.iter_mut().zip(word_norms) {
            *s = if norm > 0.0 && d > 0.0 {
                *s / (norm * d)
            } else {
                0.0
            };
        }
        sims
    }

    /// Each fitted note's weight in the ridge scores of the note `query` (`skip`: the fitted
    /// note left out, exactly); `None` without a ridge.
    pub(super) fn ridge_weights(&self, query: &SparseVec, skip: Option<usize>) -> Option<Vec<f32>> {
        let r = self.ridge.as_ref()?;
        Some(match skip {
            Some(d) => r.ridge.leave_one_out_weights(d),
            None => r
                .ridge
                .weights(&self.word_similarities(query, &r.single_word, &r.word_norms)),
        })
    }

    /// The kernel ridge scores of one kind (`weights`: each fitted note's, from
    /// [`RetrievalIndex::ridge_weights`]): the best scored codes become candidates, and every
    /// candidate scored gets its score and rank.
    pub(super) fn add_ridge_signals<'a>(
        &'a self,
        signals: &mut CandidateSet<'a>,
        kind: usize,
        weights: &[f32],
        training: &impl Fn(u32, usize) -> Signals,
    ) {
        let mut scores: HashMap<u32, f32> = HashMap::new();
        for (codes, &w) in self.doc_codes.iter().zip(weights) {
            if w != 0.0 {
                for &code in &codes[kind] {
                    *scores.entry(code).or_default() += w;
                }
            }
        }
        let mut ranked: Vec<(u32, f32)> = scores.into_iter().collect();
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        for (rank, (code, score)) in ranked.into_iter().enumerate() {
            let name = self.codes[code as usize].0.as_str();
            let Some(entry) =
                signals.entry_if(name, rank < RIDGE_CANDIDATES, || training(code, kind))
            else {
                continue;
            };
            entry.ridge = score;
            entry.ridge_rank = rank + 1;
        }
    }
}

/// The inverse of a symmetric positive definite n×n matrix (row-major) by Cholesky
/// factorisation; `None` when it is not positive definite.
fn invert_spd(mut a: Vec<f64>, n: usize) -> Option<Vec<f64>> {
    // a = L Lᵀ, L stored in the lower triangle.
    for j in 0..n {
        let mut d = a[j * n + j];
        for k in 0..j {
            d -= a[j * n + k] * a[j * n + k];
        }
        if d <= 1e-12 || !d.is_finite() {
            return None;
        }
        let d = d.sqrt();
        a[j * n + j] = d;
        for i in j + 1..n {
            let (row_i, row_j) = (&a[i * n..i * n + j], &a[j * n..j * n + j]);
            let dot: f64 = row_i.iter().zip(row_j).map(|(x, y)| x * y).sum();
            a[i * n + j] = (a[i * n + j] - dot) / d;
        }
    }
    // L⁻¹, lower triangular, row by row by forward substitution.
    let mut l_inv = vec![0f64; n * n];
    for i in 0..n {
        l_inv[i * n + i] = 1.0 / a[i * n + i];
        for j in 0..i {
            let mut sum = 0.0;
            for k in j..i {
                sum += a[i * n + k] * l_inv[k * n + j];
            }
            l_inv[i * n + j] = -sum / a[i * n + i];
        }
    }
    // A⁻¹ = L⁻ᵀ L⁻¹: entry (i, j) = Σ_k L⁻¹[k][i] L⁻¹[k][j], k ≥ max(i, j).
    let mut inverse = vec![0f64; n * n];
    for k in 0..n {
        let row = &l_inv[k * n..k * n + k + 1];
        for i in 0..=k {
            let lki = row[i];
            if lki == 0.0 {
                continue;
            }
            let out = &mut inverse[i * n..i * n + k + 1];
            for (o, &lkj) in out.iter_mut().zip(row) {
                *o += lki * lkj;
            }
        }
    }
    Some(inverse)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inverts_a_positive_definite_matrix() {
        let a = vec![4.0, 2.0, 0.6, 2.0, 5.0, 1.0, 0.6, 1.0, 3.0];
        let inv = invert_spd(a.clone(), 3).unwrap();
        for i in 0..3 {
            for j in 0..3 {
                let e: f64 = (0..3).map(|k| a[i * 3 + k] * inv[k * 3 + j]).sum();
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((e - want).abs() < 1e-12, "({i},{j}): {e}");
            }
        }
        assert!(invert_spd(vec![1.0, 2.0, 2.0, 1.0], 2).is_none());
    }

    /// The leave-one-out weights equal those of a ridge refitted without the note.
    #[test]
    fn leave_one_out_weights_are_those_of_a_ridge_without_the_note() {
        let gram: Vec<Vec<f32>> = vec![
            vec![1.0, 0.8, 0.1, 0.3],
            vec![0.8, 1.0, 0.2, 0.25],
            vec![0.1, 0.2, 1.0, 0.6],
            vec![0.3, 0.25, 0.6, 1.0],
        ];
        let ridge = KernelRidge::new(&gram, RIDGE_PENALTY).unwrap();
        for left_out in 0..4 {
            let loo = ridge.leave_one_out_weights(left_out);
            let others: Vec<usize> = (0..4).filter(|&j| j != left_out).collect();
            let sub: Vec<Vec<f32>> = others
                .iter()
                .map(|&a| others.iter().map(|&b| gram[a][b]).collect())
                .collect();
            let refitted = KernelRidge::new(&sub, RIDGE_PENALTY).unwrap();
            let sims: Vec<f32> = others.iter().map(|&j| gram[left_out][j]).collect();
            let want = refitted.weights(&sims);
            assert_eq!(loo[left_out], 0.0);
            for (w, &j) in want.iter().zip(&others) {
                assert!(
                    (loo[j] - w).abs() < 1e-5,
                    "note {left_out}: {} vs {w}",
                    loo[j]
                );
            }
        }
    }

    #[test]
    fn a_note_like_a_fitted_one_weighs_it_most() {
        let gram: Vec<Vec<f32>> = vec![vec![1.0, 0.1], vec![0.1, 1.0]];
        let ridge = KernelRidge::new(&gram, RIDGE_PENALTY).unwrap();
        let w = ridge.weights(&[0.9, 0.05]);
        assert!(w[0] > 0.7 && w[1].abs() < 0.1, "{w:?}");
        assert!(KernelRidge::new(&vec![vec![1.0]; 1], 0.0).is_none());
    }
}
