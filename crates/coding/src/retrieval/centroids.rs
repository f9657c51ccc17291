//! Code centroids: per code, the sum of the vectors of the fitted notes carrying it. Kept as
//! postings (term → codes whose notes hold it), so that a note's similarity to every centroid
//! costs what its own terms' postings hold, not a pass over every centroid's terms.

use super::SparseVec;

#[derive(Debug, Clone, Default)]
pub(super) struct Centroids {
    /// Per term: (code, summed weight of the term in the notes carrying the code), by code.
    postings: Vec<Vec<(u32, f32)>>,
    /// Per code: the squared norm of its sum.
    norm2: Vec<f32>,
}

impl Centroids {
    /// From the fitted notes' vectors and, per note, its codes (of both kinds).
    pub fn new<'a>(
        terms: usize,
        codes: usize,
        notes: impl Iterator<Item = (&'a SparseVec, impl Iterator<Item = u32>)>,
    ) -> Self {
        let mut postings: Vec<Vec<(u32, f32)>> = vec![Vec::new(); terms];
        for (vector, note_codes) in notes {
            for code in note_codes {
                for &(term, w) in vector {
                    postings[term as usize].push((code, w));
                }
            }
        }
        let mut norm2 = vec![0f32; codes];
        for list in &mut postings {
            // Stable: a code's weights are summed in the notes' order.
            list.sort_by_key(|&(code, _)| code);
            let mut merged: Vec<(u32, f32)> = Vec::with_capacity(list.len());
            for &(code, w) in list.iter() {
                match merged.last_mut() {
                    Some((last, sum)) if *last == code => *sum += w,
                    _ => merged.push((code, w)),
                }
            }
            for &(code, sum) in &merged {
                norm2[code as usize] += sum * sum;
            }
            *list = merged;
        }
        Self { postings, norm2 }
    }

    /// Per code: the dot product of `query` with its sum.
    pub fn dots(&self, query: &SparseVec) -> Vec<f32> {
        let mut dots = vec![0f32; self.norm2.len()];
        for &(term, q) in query {
            for &(code, w) in &self.postings[term as usize] {
                dots[code as usize] += w * q;
            }
        }
        dots
    }

    pub fn norm2(&self, code: u32) -> f32 {
        self.norm2[code as usize]
    }
}
