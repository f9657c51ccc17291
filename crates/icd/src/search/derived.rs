//! Tables a search reads that follow from the index and the code set it was built from:
//! computed on the first search rather than stored, so the knowledge base cache keeps its
//! format.

use std::sync::atomic::{AtomicU64, Ordering};

use super::query::Analyzer;
use super::{DocRef, SearchIndex, B, COVERAGE_WEIGHT, K1};
use crate::cm::CmCodeSet;
use crate::notes::NoteKind;
use crate::pcs::PcsCodeSet;

/// A term's bit in a text's 128-bit signature: (word, mask).
pub(super) fn signature_bit(term: u32) -> (usize, u64) {
    let hash = term.wrapping_mul(0x9E37_79B9) >> 25;
    ((hash >> 6) as usize, 1 << (hash & 63))
}

/// The coverage factor of a text with `essential` essential terms that holds one query term.
fn lone_coverage(essential: u16) -> f32 {
    let coverage = (1.0 / f32::from(essential.max(1))).min(1.0);
    1.0 - COVERAGE_WEIGHT + COVERAGE_WEIGHT * coverage
}

/// A text in a term's list, with what deciding on it needs: lists are read in order, texts'
/// own records are not (most texts a query reads are passed over on these alone, and reading
/// a text's record was the search's costliest cache miss).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Listed {
    pub doc: u32,
    /// The text's bound times the coverage factor of a text that holds one query term.
    pub lone_bound: f32,
    /// Its weight times the largest `tf (K1 + 1) / (tf + K1 norm)` of its terms: this times
    /// the sum of `weight × idf` of the query terms it may hold bounds its score.
    pub bound: f32,
    pub essential: u16,
    pub is_pcs: bool,
    /// The bits of its terms' [`signature_bit`]s. A term whose bit is not set is not in the
    /// text; one whose bit is set may be.
    pub signature: [u64; 2],
}

/// Term ids a text's record holds itself (the record is one 64-byte cache line).
const INLINE_TERMS: usize = 18;

/// What scoring a text reads, in one record: one cache miss, not one per table, and for the
/// texts of at most [`INLINE_TERMS`] terms, each of term frequency 1 and an id below 2¹⁶
/// (nearly all: the index counts a term once per text, and the code sets' vocabulary is
/// ~30k words), not a second one for its term list.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(64))]
pub(super) struct TextInfo {
    /// `K1 * norm`, BM25's length normalization.
    pub k1_norm: f32,
    /// The index's `doc_weight`.
    pub weight: f32,
    /// The code it is a text of.
    pub code: DocRef,
    /// Where its terms are in `text_terms`.
    terms: (u32, u32),
    /// Distinct essential terms (the index's `doc_essential`).
    pub essential: u16,
    /// How many of `inline` are its terms, or [`NOT_INLINE`]: read them from `text_terms`.
    inline_len: u8,
    /// Its term ids, ascending, each of term frequency 1.
    inline: [u16; INLINE_TERMS],
}

const NOT_INLINE: u8 = u8::MAX;
const _: () = assert!(std::mem::size_of::<TextInfo>() == 64);

impl TextInfo {
    /// The term frequency of `term` in this text, if it holds the term.
    #[inline]
    pub fn tf(&self, term: u32, derived: &Derived) -> Option<f32> {
        if self.inline_len == NOT_INLINE {
            let own = derived.terms_of(self);
            let at = own.binary_search_by_key(&term, |(t, _)| *t).ok()?;
            return Some(own[at].1);
        }
        let term = u16::try_from(term).ok()?;
        let inline = &self.inline[..usize::from(self.inline_len)];
        inline.contains(&term).then_some(1.0)
    }
}

/// Asks the CPU to bring `item` into the cache ahead of its use (a hint: nothing is read).
#[inline(always)]
#[allow(unsafe_code)]
pub(super) fn prefetch<T>(item: &T) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // SAFETY: a prefetch neither reads nor faults; SSE is part of x86-64's baseline.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(std::ptr::from_ref(item).cast()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = item;
}

#[derive(Debug, Clone, Default)]
pub(super) struct Derived {
    /// Tells this index from the others of the process (for what threads keep of it).
    pub id: u64,
    /// Per text.
    pub texts: Vec<TextInfo>,
    /// Each text's (term, term frequency), sorted by term: the postings turned around.
    text_terms: Vec<(u32, f32)>,
    /// Per term: the largest `tf (K1 + 1) / (tf + K1 norm)` of its postings, so that
    /// `weight × idf × term_max` bounds what the term adds to any text's score.
    pub term_max: Vec<f32>,
    /// Per term: where its texts start in `by_lone_bound` (one more entry than terms).
    term_start: Vec<u32>,
    /// Each term's texts by their lone bound, highest first: read in this order, the texts
    /// that can still make a query's answer come before those that cannot.
    by_lone_bound: Vec<Listed>,
    /// Per CM entry: where the terms of its "… NOS" inclusion terms start in `nos_terms`
    /// (one more entry than CM entries).
    nos_start: Vec<u32>,
    nos_terms: Vec<Vec<String>>,
    /// Per CM entry and per PCS code: its place among all their codes in code order, so that
    /// ties are broken as comparing the codes would, without reading them.
    cm_order: Vec<u32>,
    pcs_order: Vec<u32>,
}

impl Derived {
    pub fn new(index: &SearchIndex, cm: &CmCodeSet, pcs: &PcsCodeSet) -> Self {
        let k1_norm = |doc: usize| K1 * (1.0 - B + B * index.doc_len[doc] / index.avg_len);
        let mut counts = vec![0u32; index.docs.len() + 1];
        for postings in &index.postings {
            for &(doc, _) in postings {
                counts[doc as usize + 1] += 1;
            }
        }
        let mut text_terms_start = counts;
        for i in 1..text_terms_start.len() {
            text_terms_start[i] += text_terms_start[i - 1];
        }
        let mut texts: Vec<TextInfo> = (0..index.docs.len())
            .map(|doc| TextInfo {
                k1_norm: k1_norm(doc),
                weight: index.doc_weight[doc],
                terms: (text_terms_start[doc], text_terms_start[doc + 1]),
                essential: index.doc_essential[doc],
                code: index.docs[doc],
                inline_len: NOT_INLINE,
                inline: [0; INLINE_TERMS],
            })
            .collect();
        let mut fill = text_terms_start;
        let total = fill.last().copied().unwrap_or(0) as usize;
        let mut text_terms = vec![(0u32, 0f32); total];
        let mut term_max = Vec::with_capacity(index.postings.len());
        let mut bounds = vec![0f32; index.docs.len()];
        let mut signatures = vec![[0u64; 2]; index.docs.len()];
        for (term, postings) in index.postings.iter().enumerate() {
            let mut max = 0f32;
            for &(doc, tf) in postings {
                let slot = &mut fill[doc as usize];
                text_terms[*slot as usize] = (term as u32, tf);
                *slot += 1;
                let text = &texts[doc as usize];
                let factor = tf * (K1 + 1.0) / (tf + text.k1_norm);
                max = max.max(factor);
                let bound = &mut bounds[doc as usize];
                *bound = bound.max(factor * text.weight);
                let (word, bit) = signature_bit(term as u32);
                signatures[doc as usize][word] |= bit;
            }
            term_max.push(max);
        }
        for text in &mut texts {
            let own = &text_terms[text.terms.0 as usize..text.terms.1 as usize];
            let fits = |&(term, tf): &(u32, f32)| tf == 1.0 && u16::try_from(term).is_ok();
            if own.len() <= INLINE_TERMS && own.iter().all(fits) {
                for (slot, &(term, _)) in text.inline.iter_mut().zip(own) {
                    *slot = term as u16;
                }
                text.inline_len = own.len() as u8;
            }
        }
        let mut term_start = Vec::with_capacity(index.postings.len() + 1);
        let mut by_lone_bound: Vec<Listed> = Vec::with_capacity(total);
        term_start.push(0);
        for postings in &index.postings {
            let start = by_lone_bound.len();
            by_lone_bound.extend(postings.iter().map(|&(doc, _)| {
                let (text, bound) = (&texts[doc as usize], bounds[doc as usize]);
                Listed {
                    doc,
                    lone_bound: bound * lone_coverage(text.essential),
                    bound,
                    essential: text.essential,
                    is_pcs: matches!(text.code, DocRef::Pcs(_)),
                    signature: signatures[doc as usize],
                }
            }));
            by_lone_bound[start..].sort_unstable_by(|a, b| {
                b.lone_bound
                    .total_cmp(&a.lone_bound)
                    .then(a.doc.cmp(&b.doc))
            });
            term_start.push(by_lone_bound.len() as u32);
        }
        let analyzer = Analyzer::new();
        let mut nos_start = Vec::with_capacity(cm.entries.len() + 1);
        let mut nos_terms: Vec<Vec<String>> = Vec::new();
        nos_start.push(0);
        for entry in &cm.entries {
            nos_terms.extend(
                entry
                    .notes
                    .iter()
                    .filter(|n| matches!(n.kind, NoteKind::InclusionTerm | NoteKind::Includes))
                    .filter(|n| n.text.split_whitespace().any(|w| w == "NOS"))
                    .map(|n| analyzer.terms(&n.text))
                    .filter(|terms| !terms.is_empty()),
            );
            nos_start.push(nos_terms.len() as u32);
        }
        let mut by_code: Vec<(&str, DocRef)> = (0..cm.entries.len())
            .map(|i| (cm.entries[i].code.as_str(), DocRef::Cm(i as u32)))
            .chain(
                (0..pcs.codes.len()).map(|i| (pcs.codes[i].code.as_str(), DocRef::Pcs(i as u32))),
            )
            .collect();
        by_code.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let (mut cm_order, mut pcs_order) = (vec![0; cm.entries.len()], vec![0; pcs.codes.len()]);
        for (place, (_, doc)) in by_code.iter().enumerate() {
            match *doc {
                DocRef::Cm(i) => cm_order[i as usize] = place as u32,
                DocRef::Pcs(i) => pcs_order[i as usize] = place as u32,
            }
        }
        static INDEXES: AtomicU64 = AtomicU64::new(1);
        Self {
            id: INDEXES.fetch_add(1, Ordering::Relaxed),
            texts,
            text_terms,
            term_max,
            term_start,
            by_lone_bound,
            nos_start,
            nos_terms,
            cm_order,
            pcs_order,
        }
    }

    /// A code's place in code order (see `cm_order`).
    pub fn code_order(&self, doc: DocRef) -> u32 {
        match doc {
            DocRef::Cm(i) => self.cm_order[i as usize],
            DocRef::Pcs(i) => self.pcs_order[i as usize],
        }
    }

    /// A text's (term, term frequency), sorted by term.
    pub fn terms_of(&self, text: &TextInfo) -> &[(u32, f32)] {
        &self.text_terms[text.terms.0 as usize..text.terms.1 as usize]
    }

    /// The texts a term is in with their lone bounds, highest first.
    pub fn texts_by_lone_bound(&self, term: u32) -> &[Listed] {
        &self.by_lone_bound[self.term_range(term)]
    }

    fn term_range(&self, term: u32) -> std::ops::Range<usize> {
        self.term_start[term as usize] as usize..self.term_start[term as usize + 1] as usize
    }

    /// The terms of the "… NOS" inclusion terms written at one CM entry.
    pub fn nos_terms(&self, index: u32) -> &[Vec<String>] {
        let start = self.nos_start[index as usize] as usize;
        let end = self.nos_start[index as usize + 1] as usize;
        &self.nos_terms[start..end]
    }
}

#[cfg(test)]
mod tests {
    use medcoder_assets::MedcoderHome;

    use super::DocRef;
    use crate::IcdKnowledge;

    fn knowledge_base() -> Option<IcdKnowledge> {
        let kb = MedcoderHome::from_env()
            .ok()
            .and_then(|home| IcdKnowledge::load(&home).ok());
        if kb.is_none() {
            eprintln!("skipping: ICD assets not installed (medcoder assets fetch)");
        }
        kb
    }

    #[test]
    fn a_texts_record_holds_the_terms_of_its_term_list() {
        let Some(kb) = knowledge_base() else { return };
        let index = kb.search_index();
        let derived = index
            .derived
            .get_or_init(|| super::Derived::new(index, &kb.cm, &kb.pcs));
        let (mut inline, mut listed) = (0, 0);
        for text in &derived.texts {
            let own = derived.terms_of(text);
            for &(term, tf) in own {
                assert_eq!(text.tf(term, derived), Some(tf));
            }
            // Terms it does not hold, around and between its own.
            for &(term, _) in own {
                for other in [term.wrapping_sub(1), term + 1, term + 70_000] {
                    if own.iter().all(|&(t, _)| t != other) {
                        assert_eq!(text.tf(other, derived), None);
                    }
                }
            }
            if text.inline_len == super::NOT_INLINE {
                listed += 1;
            } else {
                inline += 1;
            }
        }
        // Both ways of reading a text are exercised, and the record serves nearly all.
        assert!(
            listed > 0 && inline > 50 * listed,
            "{inline} inline, {listed} listed"
        );
    }

    #[test]
    fn code_order_is_the_order_of_the_codes() {
        let Some(kb) = knowledge_base() else { return };
        let index = kb.search_index();
        let derived = index
            .derived
            .get_or_init(|| super::Derived::new(index, &kb.cm, &kb.pcs));
        let cm = (0..kb.cm.entries.len()).map(|i| {
            let place = derived.code_order(DocRef::Cm(i as u32));
            (place, kb.cm.entries[i].code.as_str())
        });
        let pcs = (0..kb.pcs.codes.len()).map(|i| {
            let place = derived.code_order(DocRef::Pcs(i as u32));
            (place, kb.pcs.codes[i].code.as_str())
        });
        let mut by_place: Vec<(u32, &str)> = cm.chain(pcs).collect();
        by_place.sort_unstable();
        assert!(by_place
            .windows(2)
            .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1));
    }
}
