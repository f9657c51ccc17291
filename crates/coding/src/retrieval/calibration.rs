//! Choosing the retrieval engine's settings by leave-one-out over the fitted notes: the
//! neighbours' vote, then a reranker per kind, then per kind the decision threshold.

use rayon::prelude::*;

use super::mentions::MentionMatch;
use super::semantic::SemanticMatch;
use super::{Calibration, NoteMatches, PerKind, RetrievalIndex};
use crate::eval::average_precision;
use crate::lexical::Ranked;
use crate::rerank::{Reranker, Signals};

impl RetrievalIndex {
    /// Leave-one-out over the fitted notes: the (k, power) with the best summed MAP of the
    /// vote alone; then a reranker per kind (vote, code centroids, lexical matches when a
    /// lexicon is given) kept where it raises MAP; then
    /// per kind the threshold with the best micro-F1.
    pub(super) fn calibrate(
        &mut self,
        lexical: Option<&[PerKind]>,
        semantic: Option<&[SemanticMatch]>,
        mentions: Option<&[MentionMatch]>,
    ) {
        let sims: Vec<Vec<f32>> = self.docs.par_iter().map(|v| self.similarities(v)).collect();
        let gold: Vec<[Vec<&str>; 2]> = self
            .doc_codes
            .iter()
            .map(|kinds| {
                kinds.clone().map(|ids| {
                    ids.iter()
                        .map(|&c| self.codes[c as usize].0.as_str())
                        .collect()
                })
            })
            .collect();
        let candidates = |settings: (usize, f32), with_lexical: bool| {
            (0..self.docs.len())
                .into_par_iter()
                .map(|d| {
                    let matches = NoteMatches {
                        lexical: lexical.filter(|_| with_lexical).map(|l| &l[d]),
                        semantic: semantic.filter(|_| with_lexical).map(|s| &s[d]),
                        mentions: mentions.filter(|_| with_lexical).map(|m| &m[d]),
                    };
                    self.candidates(&self.docs[d], &sims[d], settings, Some(d), matches)
                })
                .collect::<Vec<_>>()
        };
        let maps_of = |ranked: &[PerKind]| {
            [0, 1].map(|kind| {
                mean_average_precision(ranked.iter().zip(&gold).map(|(v, g)| (&v[kind], &g[kind])))
            })
        };
        let none: [Option<Reranker>; 2] = [None, None];
        // (summed MAP, k, power, MAPs)
        type Best = (f64, usize, f32, [f64; 2]);
        let mut best: Option<Best> = None;
        for k in [5, 8, 12, 20, 30, 50] {
            for power in [1.0f32, 2.0, 3.0, 5.0] {
                let ranked: Vec<PerKind> = candidates((k, power), false)
                    .into_iter()
                    .map(|c| self.rank(c, &none))
                    .collect();
                let maps = maps_of(&ranked);
                if best.as_ref().is_none_or(|b| maps[0] + maps[1] > b.0) {
                    best = Some((maps[0] + maps[1], k, power, maps));
                }
            }
        }
        let Some((_, k, power, mut maps)) = best else {
            return;
        };
        let mut rerankers: [Option<Reranker>; 2] = [None, None];
        let mut final_candidates = candidates((k, power), false);
        {
            let with_lexical = candidates((k, power), true);
            let fitted: [Option<Reranker>; 2] = [0, 1].map(|kind| {
                let examples: Vec<(Signals, bool)> = with_lexical
                    .iter()
                    .zip(&gold)
                    .flat_map(|(c, g)| {
                        c[kind]
                            .iter()
                            .map(|(code, s)| (*s, g[kind].contains(code)))
                            .collect::<Vec<_>>()
                    })
                    .collect();
                Reranker::fit(&examples)
            });
            let ranked: Vec<PerKind> = with_lexical
                .iter()
                .map(|c| self.rank(c.clone(), &fitted))
                .collect();
            let reranked_maps = maps_of(&ranked);
            for kind in 0..2 {
                if fitted[kind].is_some() && reranked_maps[kind] > maps[kind] {
                    maps[kind] = reranked_maps[kind];
                    rerankers[kind] = fitted[kind].clone();
                }
            }
            if rerankers.iter().any(Option::is_some) {
                final_candidates = with_lexical;
            }
        }
        let votes: Vec<PerKind> = final_candidates
            .into_iter()
            .map(|c| self.rank(c, &rerankers))
            .collect();
        let mut thresholds = [0.5f32; 2];
        let mut f1s = [0.0f64; 2];
        for kind in 0..2 {
            for step in 1..40 {
                let t = step as f32 * 0.025;
                let (mut tp, mut fp, mut fn_) = (0usize, 0usize, 0usize);
                for (v, g) in votes.iter().zip(&gold) {
                    let chosen: Vec<&str> = v[kind]
                        .iter()
                        .filter(|(_, c)| *c >= t)
                        .map(|(code, _)| code.as_str())
                        .collect();
                    let hits = chosen.iter().filter(|c| g[kind].contains(c)).count();
                    tp += hits;
                    fp += chosen.len() - hits;
                    fn_ += g[kind].len() - hits;
                }
                let f1 = f1_score(tp, fp, fn_);
                if f1 > f1s[kind] {
                    f1s[kind] = f1;
                    thresholds[kind] = t;
                }
            }
        }
        self.calibration = Calibration {
            neighbours: k,
            power,
            reranked: [rerankers[0].is_some(), rerankers[1].is_some()],
            thresholds,
            loo_map: maps,
            loo_micro_f1: f1s,
        };
        self.rerankers = rerankers;
    }
}

fn f1_score(tp: usize, fp: usize, fn_: usize) -> f64 {
    if tp == 0 {
        return 0.0;
    }
    2.0 * tp as f64 / (2 * tp + fp + fn_) as f64
}

/// MAP over notes with at least one gold code (a note without prediction scores 0).
fn mean_average_precision<'a>(pairs: impl Iterator<Item = (&'a Ranked, &'a Vec<&'a str>)>) -> f64 {
    let aps: Vec<f64> = pairs
        .filter(|(_, gold)| !gold.is_empty())
        .map(|(ranking, gold)| average_precision(ranking.iter().map(|(c, _)| c), gold))
        .collect();
    aps.iter().sum::<f64>() / aps.len().max(1) as f64
}
