//! Fusing the retrieval engine's signals per candidate code (the nearest notes' vote, the
//! lexical match against code descriptions, how often training notes carry the code) into
//! one probability with a logistic regression, trained on leave-one-out candidates of the
//! fitted notes.

use serde::{Deserialize, Serialize};

/// What is known of one candidate code for one note.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Signals {
    /// Share of the nearest notes' (similarity-weighted) vote, 0 when none carries it.
    pub knn: f32,
    /// 1-based rank among the voted codes, 0 when not voted.
    pub knn_rank: usize,
    /// Lexical score in [0, 1], 0 when not matched.
    pub lexical: f32,
    pub lexical_rank: usize,
    /// Fitted notes carrying the code (the note itself left out in leave-one-out).
    pub training_notes: f32,
    /// Cosine similarity to the centroid of the fitted notes carrying the code.
    pub centroid: f32,
    pub centroid_rank: usize,
    /// Share of the vote of the fitted notes closest by sentence embeddings.
    pub semantic_knn: f32,
    pub semantic_knn_rank: usize,
    /// Cosine between the code's description and its best-matching sentence of the note
    /// (sentence embeddings), 0 without them.
    pub description: f32,
    /// 1-based rank among the codes whose descriptions match the note best, 0 when not there.
    pub description_rank: usize,
    /// The vote of the annotated mention windows closest to the note's sentences (TF-IDF),
    /// and of the annotated mention sentences closest by sentence embeddings.
    pub mention: MentionVote,
    pub mention_semantic: MentionVote,
    /// Kernel ridge regression score on the fitted notes' TF-IDF similarities (0 when the
    /// code is in no fitted note), and its 1-based rank (0 when not scored).
    pub ridge: f32,
    pub ridge_rank: usize,
}

/// A code's share of a mention vote, its rank (1-based, 0 when not voted) and the best cosine
/// of one of its mentions with one sentence of the note.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct MentionVote {
    pub share: f32,
    pub rank: usize,
    pub best: f32,
}

pub(crate) const FEATURES: usize = 28;

fn features(s: &Signals) -> [f32; FEATURES] {
    let inv = |r: usize| if r == 0 { 0.0 } else { 1.0 / r as f32 };
    [
        s.knn,
        s.knn.sqrt(),
        inv(s.knn_rank),
        s.lexical,
        f32::from(u8::from(s.lexical_rank > 0)),
        inv(s.lexical_rank),
        (1.0 + s.training_notes).ln(),
        f32::from(u8::from(s.training_notes > 0.0)),
        s.knn * s.lexical,
        f32::from(u8::from(s.knn_rank > 0 && s.lexical_rank > 0)),
        s.centroid,
        inv(s.centroid_rank),
        s.centroid * s.knn,
        s.semantic_knn,
        s.semantic_knn.sqrt(),
        inv(s.semantic_knn_rank),
        s.description,
        inv(s.description_rank),
        s.description * f32::from(u8::from(s.lexical_rank > 0)),
        s.mention.share,
        inv(s.mention.rank),
        s.mention.best,
        s.mention_semantic.share,
        inv(s.mention_semantic.rank),
        s.mention_semantic.best,
        s.ridge,
        s.ridge.max(0.0).sqrt(),
        inv(s.ridge_rank),
    ]
}

/// A logistic regression over standardized [`features`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct Reranker {
    weights: Vec<f32>,
    bias: f32,
    mean: Vec<f32>,
    scale: Vec<f32>,
}

impl Reranker {
    /// Full-batch gradient descent with a little L2; `None` without both classes.
    pub fn fit(examples: &[(Signals, bool)]) -> Option<Self> {
        let positives = examples.iter().filter(|(_, y)| *y).count();
        if positives == 0 || positives == examples.len() {
            return None;
        }
        let xs: Vec<[f32; FEATURES]> = examples.iter().map(|(s, _)| features(s)).collect();
        let n = xs.len() as f32;
        let mut mean = vec![0f32; FEATURES];
        let mut scale = vec![0f32; FEATURES];
        for x in &xs {
            for j in 0..FEATURES {
                mean[j] += x[j] / n;
            }
        }
        for x in &xs {
            for j in 0..FEATURES {
                scale[j] += (x[j] - mean[j]).powi(2) / n;
            }
        }
        scale.iter_mut().for_each(|s| *s = s.sqrt().max(1e-6));
        let std: Vec<[f32; FEATURES]> = xs
            .iter()
            .map(|x| std::array::from_fn(|j| (x[j] - mean[j]) / scale[j]))
            .collect();
        let (mut w, mut b) = (vec![0f32; FEATURES], 0f32);
        let (rate, l2) = (0.5f32, 1e-4f32);
        for _ in 0..400 {
            let mut gw = [0f32; FEATURES];
            let mut gb = 0f32;
            for (x, (_, y)) in std.iter().zip(examples) {
                let z = b + x.iter().zip(&w).map(|(a, b)| a * b).sum::<f32>();
                let err = sigmoid(z) - f32::from(u8::from(*y));
                gb += err / n;
                for j in 0..FEATURES {
                    gw[j] += err * x[j] / n;
                }
            }
            b -= rate * gb;
            for j in 0..FEATURES {
                w[j] -= rate * (gw[j] + l2 * w[j]);
            }
        }
        Some(Self {
            weights: w,
            bias: b,
            mean,
            scale,
        })
    }

    /// How many features the reranker was fitted on.
    pub fn features(&self) -> usize {
        self.weights.len()
    }

    /// Whether it was fitted on the features this build computes (a cache of an older build
    /// may hold fewer).
    pub fn fits_this_build(&self) -> bool {
        [&self.weights, &self.mean, &self.scale]
            .iter()
            .all(|v| v.len() == FEATURES)
    }

    pub fn probability(&self, s: &Signals) -> f32 {
        let x = features(s);
        let z = self.bias
            + (0..FEATURES)
                .map(|j| self.weights[j] * (x[j] - self.mean[j]) / self.scale[j])
                .sum::<f32>();
        sigmoid(z)
    }
}

fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + (-z).exp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learns_that_voted_and_matched_codes_are_right() {
        let mut examples = Vec::new();
        for i in 0..200 {
            let good = i % 3 == 0;
            let s = Signals {
                knn: if good { 0.6 } else { 0.1 },
                knn_rank: if good { 1 } else { 5 },
                lexical: if good { 0.8 } else { 0.0 },
                lexical_rank: usize::from(good),
                training_notes: 3.0,
                centroid: if good { 0.5 } else { 0.2 },
                centroid_rank: if good { 1 } else { 9 },
                ..Signals::default()
            };
            examples.push((s, good));
        }
        let model = Reranker::fit(&examples).unwrap();
        let (good, bad) = (examples[0].0, examples[1].0);
        assert!(model.probability(&good) > 0.9 && model.probability(&bad) < 0.1);
        assert!(Reranker::fit(&examples[..1]).is_none());
        assert!(model.fits_this_build());
        let mut older = model.clone();
        older.weights.pop();
        assert!(!older.fits_this_build());
    }
}
