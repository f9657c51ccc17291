//! The retrieval engine's candidate signals beyond the TF-IDF neighbours and centroids: the
//! sentence-embedding neighbours and description matches, and the mention windows' votes.

use foldhash::{HashMap, HashMapExt};

use super::mentions::{MentionMatch, MentionScore};
use super::semantic::SemanticMatch;
use super::{
    CandidateSet, RetrievalIndex, MENTION_CANDIDATES, SEMANTIC_NEIGHBOURS, SEMANTIC_TEMPERATURE,
};
use crate::prediction::CodeKind;
use crate::rerank::{MentionVote, Signals};

impl RetrievalIndex {
    /// The fitted notes closest by sentence embeddings (`skip` left out), with softmax weights.
    pub(super) fn semantic_neighbours(
        &self,
        cosines: &[f32],
        skip: Option<usize>,
    ) -> Vec<(usize, f32)> {
        let mut order: Vec<usize> = (0..cosines.len()).filter(|&d| Some(d) != skip).collect();
        let k = SEMANTIC_NEIGHBOURS.min(order.len());
        if k == 0 {
            return Vec::new();
        }
        order.select_nth_unstable_by(k - 1, |&a, &b| cosines[b].total_cmp(&cosines[a]));
        order.truncate(k);
        let best = order.iter().map(|&d| cosines[d]).fold(f32::MIN, f32::max);
        let weights: Vec<f32> = order
            .iter()
            .map(|&d| ((cosines[d] - best) / SEMANTIC_TEMPERATURE).exp())
            .collect();
        let total: f32 = weights.iter().sum::<f32>().max(1e-12);
        order
            .into_iter()
            .zip(weights)
            .map(|(d, w)| (d, w / total))
            .collect()
    }

    /// The embedding neighbours' vote and the description matches of one kind: new candidates
    /// from both, and every candidate's description cosine.
    pub(super) fn add_semantic_signals<'a>(
        &'a self,
        signals: &mut CandidateSet<'a>,
        kind: usize,
        m: &SemanticMatch,
        neighbours: &[(usize, f32)],
        training: &impl Fn(u32, usize) -> Signals,
    ) {
        let mut voted: HashMap<u32, f32> = HashMap::new();
        for &(d, w) in neighbours {
            for &code in &self.doc_codes[d][kind] {
                *voted.entry(code).or_default() += w;
            }
        }
        let mut voted: Vec<(u32, f32)> = voted.into_iter().collect();
        voted.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        for (rank, (code, share)) in voted.into_iter().enumerate() {
            let entry = signals.entry(&self.codes[code as usize].0, || training(code, kind));
            entry.semantic_knn = share;
            entry.semantic_knn_rank = rank + 1;
        }
        let cosine = |code: u32| {
            self.semantic
                .as_ref()
                .map_or(0.0, |index| index.description_cosine(m, code))
        };
        let closest = &m.closest_descriptions[kind];
        for (rank, &(code, _)) in closest.iter().enumerate() {
            let entry = signals.entry(&self.codes[code as usize].0, || training(code, kind));
            entry.description_rank = rank + 1;
        }
        for (code, s) in &mut signals.list {
            if let Some(&c) = self.code_index[kind].get(*code) {
                s.description = cosine(c);
            }
        }
    }

    /// The mention votes of one kind: the best voted codes become candidates, and every
    /// candidate voted for gets its share, rank and best cosine (`vote`: the signals they set,
    /// by TF-IDF windows or embedded sentences).
    pub(super) fn add_mention_signals<'a>(
        &'a self,
        signals: &mut CandidateSet<'a>,
        kind: usize,
        found: &MentionMatch,
        training: &impl Fn(u32, usize) -> Signals,
        vote: fn(&mut Signals) -> &mut MentionVote,
    ) {
        let mut voted: Vec<(u32, MentionScore)> = found
            .iter()
            .filter(|(&code, _)| self.codes[code as usize].1 == CodeKind::BOTH[kind])
            .map(|(&code, &score)| (code, score))
            .collect();
        voted.sort_by(|a, b| b.1.votes.total_cmp(&a.1.votes).then(a.0.cmp(&b.0)));
        let total: f32 = voted.iter().map(|(_, s)| s.votes).sum::<f32>().max(1e-12);
        for (rank, (code, score)) in voted.into_iter().enumerate() {
            let name = self.codes[code as usize].0.as_str();
            let Some(entry) =
                signals.entry_if(name, rank < MENTION_CANDIDATES, || training(code, kind))
            else {
                continue;
            };
            *vote(entry) = MentionVote {
                share: score.votes / total,
                rank: rank + 1,
                best: score.best,
            };
        }
    }
}
