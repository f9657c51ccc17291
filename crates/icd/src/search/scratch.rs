//! Per-thread buffers a search accumulates into. A query touches a few thousand of the index's
//! texts and codes; allocating and zeroing arrays over all of them per query cost more than
//! the scoring itself, so each thread keeps one set, all zero between searches, and a search
//! resets only what it touched.

use std::cell::Cell;

use super::DocRef;

/// The buffers of one search.
#[derive(Debug, Default)]
pub(super) struct Scratch {
    /// A bit per indexed text: scored by this search.
    scored: Vec<u64>,
    scored_texts: Vec<u32>,
    /// Per CM entry and per PCS code: the best score of its texts (0: untouched).
    pub best_cm: Vec<f32>,
    pub best_pcs: Vec<f32>,
    pub touched: Vec<DocRef>,
    pub top: TopCodes,
}

/// The `k` best codes touched so far. A code's score only rises, so an offer at or below the
/// `k`-th score changes nothing and costs one comparison.
#[derive(Debug, Default)]
pub(super) struct TopCodes {
    k: usize,
    codes: Vec<(DocRef, f32)>,
    /// The lowest score in `codes` once it holds `k` codes; 0 before.
    kth: f32,
}

impl TopCodes {
    pub fn reset(&mut self, k: usize) {
        self.k = k;
        self.codes.clear();
        self.kth = 0.0;
    }

    /// The `k`-th best score so far (0 while fewer than `k` codes are touched).
    pub fn kth(&self) -> f32 {
        self.kth
    }

    /// A code's score is now (at least) `score`.
    pub fn offer(&mut self, code: DocRef, score: f32) {
        if self.k == 0 || (self.codes.len() == self.k && score <= self.kth) {
            return;
        }
        if let Some(entry) = self.codes.iter_mut().find(|(c, _)| *c == code) {
            entry.1 = entry.1.max(score);
        } else if self.codes.len() < self.k {
            self.codes.push((code, score));
        } else if let Some(lowest) = self.codes.iter_mut().min_by(|a, b| a.1.total_cmp(&b.1)) {
            *lowest = (code, score);
        }
        if self.codes.len() == self.k {
            self.kth = self
                .codes
                .iter()
                .map(|(_, s)| *s)
                .min_by(f32::total_cmp)
                .unwrap_or(0.0);
        }
    }
}

thread_local! {
    static SCRATCH: Cell<Option<Box<Scratch>>> = const { Cell::new(None) };
}

impl Scratch {
    pub fn is_scored(&self, text: u32) -> bool {
        self.scored[text as usize / 64] & (1 << (text % 64)) != 0
    }

    pub fn mark_scored(&mut self, text: u32) {
        self.scored[text as usize / 64] |= 1 << (text % 64);
        self.scored_texts.push(text);
    }

    /// This thread's buffers, sized for an index of `texts` texts over `cm` and `pcs` codes.
    /// A search that panics never gives them back, so a half-used set is never reused.
    pub fn take(texts: usize, cm: usize, pcs: usize) -> Box<Self> {
        let mut scratch = SCRATCH.with(Cell::take).unwrap_or_default();
        if scratch.scored.len() * 64 < texts {
            scratch.scored.resize(texts.div_ceil(64), 0);
        }
        if scratch.best_cm.len() < cm {
            scratch.best_cm.resize(cm, 0.0);
        }
        if scratch.best_pcs.len() < pcs {
            scratch.best_pcs.resize(pcs, 0.0);
        }
        scratch
    }

    /// Zero what the search touched and keep the buffers for the thread's next search.
    pub fn give_back(mut self: Box<Self>) {
        for &text in &self.scored_texts {
            self.scored[text as usize / 64] = 0;
        }
        self.scored_texts.clear();
        for &doc in &self.touched {
            match doc {
                DocRef::Cm(i) => self.best_cm[i as usize] = 0.0,
                DocRef::Pcs(i) => self.best_pcs[i as usize] = 0.0,
            }
        }
        self.touched.clear();
        SCRATCH.with(|cell| cell.set(Some(self)));
    }
}
