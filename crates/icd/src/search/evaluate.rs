//! One query against the index, ranked exactly as scoring every text would rank it, without
//! scoring every text a common word is in.
//!
//! A clinical sentence nearly always holds a word of 30–50 thousand titles ("with", "left",
//! "other"). Such a word adds little to any score (its idf is low), so texts that hold little
//! else stay at the bottom of the ranking. The query's terms are taken rarest first, and a
//! term's texts are read by an upper bound of what they can score, highest first:
//! - a text first met under a term holds none of the terms taken before it, so what it can
//!   score is bounded by the terms from there on; once that bound, for the text read and so for
//!   every text after it, is below the `limit`-th best code so far, the rest of the term's
//!   texts are skipped, and once it is for every term left, the search stops;
//! - a text's 128-bit signature (a bit per term it holds) rules out most query terms it does
//!   not hold; a text whose bound over the terms it may hold is below the `limit`-th best code
//!   is passed over, and one that is not is scored on exactly the terms it holds.
//!
//! The codes a text passed over could belong to score below the `limit`-th code even with the
//! largest nudge a code can get, so they can neither make the answer nor push a code that does
//! out of the first [`RERANK_DEPTH`]. Scores are summed in the query's term order, as scoring
//! every text does, so they are the same numbers to the last bit (a test compares both).

use std::collections::HashSet;
use std::ops::Range;

use super::derived::{prefetch, signature_bit, Derived, Listed};
use super::query::Analyzer;
use super::scratch::Scratch;
use super::{
    DocRef, RankedDoc, SearchFilter, SearchIndex, COVERAGE_WEIGHT, INDEX_ONLY_SCORE,
    INDEX_TABLE_BOOST, K1, MAX_TABLE_CODES, NOS_BOOST, RERANK_DEPTH,
};
use crate::cm::CmCodeSet;
use crate::pcs::PcsCodeSet;
use crate::CodeSystem;

/// Queries of at most this many known terms are matched against texts' signatures.
const MASKED_TERMS: usize = 64;
/// How many texts ahead in a term's list a text's record is prefetched.
const PREFETCH_AHEAD: usize = 8;
/// Slack on the bound for the rounding of sums of `f32`s.
const BOUND_SLACK: f32 = 1.001;

/// What the query's terms give one indexed text.
#[derive(Debug, Clone, Copy, Default)]
struct TextHits {
    score: f32,
    /// Sum of the weights of the query terms it holds.
    matched_weight: f32,
    /// Query terms it holds.
    matched: u16,
}

/// A query term the index knows.
struct QueryTerm {
    id: u32,
    weight: f32,
    /// `weight × idf`.
    weighted_idf: f32,
    /// Texts it is in.
    df: usize,
    /// Its bit in a text's signature: (word, mask).
    signature: (usize, u64),
}

struct Query<'a> {
    derived: &'a Derived,
    cm: &'a CmCodeSet,
    filter: SearchFilter,
    /// In the query's order (the order scores are summed in).
    terms: Vec<QueryTerm>,
    /// Sum of the weights of the query's full-weight terms.
    query_weight: f32,
    /// PCS codes of the tables the query points into, as positions: all of them, and the
    /// first [`MAX_TABLE_CODES`] of each (which score [`INDEX_ONLY_SCORE`] at least).
    tables: Vec<Range<usize>>,
    raised_tables: Vec<Range<usize>>,
    /// The bits of the query terms' signature bits, and per bit the positions (as bits) of
    /// the terms that set it.
    signature: [u64; 2],
    terms_at_bit: [u64; 128],
    prune: bool,
}

/// Whether texts that cannot make the answer are passed over (always, but in the test that
/// compares with scoring every text).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Pruning {
    On,
    #[cfg_attr(not(test), allow(dead_code))]
    Off,
}

#[allow(clippy::too_many_arguments)]
pub(super) fn search(
    index: &SearchIndex,
    derived: &Derived,
    scratch: &mut Scratch,
    text: &str,
    limit: usize,
    filter: SearchFilter,
    (cm, pcs): (&CmCodeSet, &PcsCodeSet),
    pruning: Pruning,
) -> Vec<RankedDoc> {
    let analyzer = Analyzer::new();
    let parsed = analyzer.query_terms(text, &index.procedures, derived.id);
    let n = index.docs.len() as f32;
    let query_weight: f32 = parsed
        .terms
        .iter()
        .map(|(_, w)| *w)
        .filter(|w| *w >= 1.0)
        .sum();
    let terms: Vec<QueryTerm> = parsed
        .terms
        .iter()
        .filter_map(|(term, weight)| {
            let id = *index.terms.get(term)?;
            let df = index.postings[id as usize].len();
            let idf = (1.0 + (n - df as f32 + 0.5) / (df as f32 + 0.5)).ln();
            Some(QueryTerm {
                id,
                weight: *weight,
                weighted_idf: weight * idf,
                df,
                signature: signature_bit(id),
            })
        })
        .collect();
    let tables: Vec<Range<usize>> = parsed
        .pcs_tables
        .iter()
        .map(|t| pcs.prefix_range(t))
        .collect();
    let raised_tables = tables
        .iter()
        .map(|r| r.start..r.end.min(r.start + MAX_TABLE_CODES))
        .collect();
    let mut signature = [0u64; 2];
    let mut terms_at_bit = [0u64; 128];
    for (position, term) in terms.iter().enumerate().take(MASKED_TERMS) {
        let (word, bit) = term.signature;
        signature[word] |= bit;
        terms_at_bit[word * 64 + bit.trailing_zeros() as usize] |= 1 << position;
    }
    let query = Query {
        derived,
        cm,
        filter,
        terms,
        query_weight,
        tables,
        raised_tables,
        signature,
        terms_at_bit,
        prune: pruning == Pruning::On,
    };
    let depth = RERANK_DEPTH.max(limit);
    scratch.top.reset(limit);
    query.gather(scratch, depth);
    // A code below the `limit`-th even with the NOS nudge cannot make the answer; the codes
    // above one that can all can too, so its place among the first `depth` is unchanged.
    let kth = query.kth(scratch);
    let mut ranked: Vec<RankedDoc> = scratch
        .touched
        .iter()
        .map(|&doc| RankedDoc {
            doc,
            score: query.code_score(scratch, doc),
        })
        .filter(|hit| hit.score * NOS_BOOST >= kth)
        .collect();
    let by_score = |a: &RankedDoc, b: &RankedDoc| {
        b.score
            .total_cmp(&a.score)
            .then_with(|| derived.code_order(a.doc).cmp(&derived.code_order(b.doc)))
    };
    let depth = depth.min(ranked.len());
    if depth < ranked.len() {
        ranked.select_nth_unstable_by(depth, by_score);
        ranked.truncate(depth);
    }
    let query_set: HashSet<&str> = parsed.terms.iter().map(|(t, _)| t.as_str()).collect();
    for hit in &mut ranked {
        if let DocRef::Cm(i) = hit.doc {
            if is_nos_default(cm, derived, i, &query_set) {
                hit.score *= NOS_BOOST;
            }
        }
    }
    // `by_score` is a total order (codes are unique), so the first `limit` are the same
    // whichever sort finds them.
    if limit > 0 && ranked.len() > limit {
        ranked.select_nth_unstable_by(limit - 1, by_score);
    }
    ranked.truncate(limit);
    ranked.sort_unstable_by(by_score);
    ranked
}

impl Query<'_> {
    fn keep(&self, doc: DocRef) -> bool {
        match doc {
            DocRef::Cm(i) => {
                self.filter.system.is_none_or(|s| s == CodeSystem::Cm)
                    && (!self.filter.billable_only || self.cm.entry(i).billable)
            }
            DocRef::Pcs(_) => self.filter.system.is_none_or(|s| s == CodeSystem::Pcs),
        }
    }

    /// The `limit`-th best code score so far: what a text must be able to beat to be read.
    fn kth(&self, scratch: &Scratch) -> f32 {
        if self.prune {
            scratch.top.kth()
        } else {
            0.0
        }
    }

    /// Takes terms rarest first, scoring the texts they are in that can still make the top
    /// `limit`, until no text left can.
    fn gather(&self, scratch: &mut Scratch, depth: usize) {
        let mut rarest_first: Vec<usize> = (0..self.terms.len()).collect();
        rarest_first.sort_by_key(|&i| (self.terms[i].df, i));
        // Listed first: their scores lift the `limit`-th code early.
        self.list_tables(scratch, if self.prune { depth } else { MAX_TABLE_CODES });
        // A CM code may get the NOS nudge, a PCS code the table boost, never both.
        let pcs_boost = if self.tables.is_empty() {
            1.0
        } else {
            INDEX_TABLE_BOOST
        };
        let boost = NOS_BOOST.max(pcs_boost);
        for (taken, &next) in rarest_first.iter().enumerate() {
            // A text holding none of the terms taken holds some of `rest` at most; it answers
            // the query as far as their weight goes, and its coverage factor is at most
            // `lone_factor` times that of a text holding one query term.
            let rest = &rarest_first[taken..];
            let rest_weight: f32 = rest.iter().map(|&i| self.terms[i].weight).sum();
            let answered = (rest_weight / self.query_weight.max(1.0)).min(1.0);
            let answered = 1.0 - COVERAGE_WEIGHT + COVERAGE_WEIGHT * answered;
            let lone_factor = 1.0 / (1.0 - COVERAGE_WEIGHT + COVERAGE_WEIGHT / rest.len() as f32);
            let most: f32 = rest
                .iter()
                .map(|&i| {
                    let term = &self.terms[i];
                    term.weighted_idf * self.derived.term_max[term.id as usize]
                })
                .sum();
            if most * answered * boost * BOUND_SLACK < self.kth(scratch) {
                break;
            }
            let idf_sum: f32 = rest.iter().map(|&i| self.terms[i].weighted_idf).sum();
            let scale = idf_sum * answered * lone_factor * boost * BOUND_SLACK;
            let list = self.derived.texts_by_lone_bound(self.terms[next].id);
            for (at, listed) in list.iter().enumerate() {
                let doc = listed.doc;
                let kth = self.kth(scratch);
                // The record of a text a few places on is fetched while this one is decided:
                // reading it was most of a search's time.
                if let Some(ahead) = list.get(at + PREFETCH_AHEAD) {
                    if ahead.lone_bound * scale >= kth {
                        prefetch(&self.derived.texts[ahead.doc as usize]);
                    }
                }
                // Bounds what this text, and every text after it, can score.
                if listed.lone_bound * scale < kth {
                    break;
                }
                if scratch.is_scored(doc) {
                    continue;
                }
                if self.terms.len() > MASKED_TERMS {
                    self.score_text(scratch, doc, None);
                    continue;
                }
                // First from the listing alone, then from the text's own record.
                let maybe = self.maybe_held(&listed.signature);
                if self.most_listed(listed.lone_bound, maybe, boost) < kth {
                    continue;
                }
                if self.most(listed, maybe, pcs_boost) >= kth {
                    self.score_text(scratch, doc, Some(maybe));
                }
            }
        }
    }

    /// [`Self::most`] from a text's lone bound: holding `n` query terms, its coverage factor
    /// is at most `1 / (1 - w + w / n)` times that of holding one, and its boost is at most
    /// `boost`.
    fn most_listed(&self, lone_bound: f32, maybe: u64, boost: f32) -> f32 {
        let (idf_sum, weight, count) = self.sums(maybe);
        let answered = (weight / self.query_weight.max(1.0)).min(1.0);
        let lone_factor = 1.0 / (1.0 - COVERAGE_WEIGHT + COVERAGE_WEIGHT / count.max(1.0));
        lone_bound
            * lone_factor
            * idf_sum
            * (1.0 - COVERAGE_WEIGHT + COVERAGE_WEIGHT * answered)
            * boost
            * BOUND_SLACK
    }

    /// Sum of `weight × idf`, sum of weights and count of the query terms `maybe`.
    fn sums(&self, maybe: u64) -> (f32, f32, f32) {
        let (mut idf_sum, mut weight, mut count) = (0f32, 0f32, 0f32);
        let mut bits = maybe;
        while bits != 0 {
            let term = &self.terms[bits.trailing_zeros() as usize];
            bits &= bits - 1;
            idf_sum += term.weighted_idf;
            weight += term.weight;
            count += 1.0;
        }
        (idf_sum, weight, count)
    }

    /// The most a text's code can score, holding at most the query terms `maybe`.
    fn most(&self, text: &Listed, maybe: u64, pcs_boost: f32) -> f32 {
        let (idf_sum, weight, count) = self.sums(maybe);
        let essential = f32::from(text.essential.max(1));
        let coverage = (count / essential).min(1.0);
        let answered = (weight / self.query_weight.max(1.0)).min(1.0);
        let boost = if text.is_pcs { pcs_boost } else { NOS_BOOST };
        text.bound
            * idf_sum
            * (1.0 - COVERAGE_WEIGHT + COVERAGE_WEIGHT * coverage)
            * (1.0 - COVERAGE_WEIGHT + COVERAGE_WEIGHT * answered)
            * boost
            * BOUND_SLACK
    }

    /// The positions of the query terms that a text's signature does not rule out, as bits
    /// (queries of at most [`MASKED_TERMS`] terms).
    fn maybe_held(&self, signature: &[u64; 2]) -> u64 {
        let mut maybe = 0u64;
        for (word, (&text_bits, &query_bits)) in signature.iter().zip(&self.signature).enumerate() {
            let mut shared = text_bits & query_bits;
            while shared != 0 {
                maybe |= self.terms_at_bit[word * 64 + shared.trailing_zeros() as usize];
                shared &= shared - 1;
            }
        }
        maybe
    }

    /// Scores one text on the query terms it holds (`maybe`: those its signature does not
    /// rule out; every term where `None`), summed in query order, and raises its code.
    fn score_text(&self, scratch: &mut Scratch, doc: u32, maybe: Option<u64>) {
        let text = &self.derived.texts[doc as usize];
        let k1_norm = text.k1_norm;
        let mut hits = TextHits::default();
        let mut add = |term: &QueryTerm| {
            if let Some(tf) = text.tf(term.id, self.derived) {
                hits.score += term.weighted_idf * tf * (K1 + 1.0) / (tf + k1_norm);
                hits.matched += 1;
                hits.matched_weight += term.weight;
            }
        };
        match maybe {
            Some(mut bits) => {
                while bits != 0 {
                    add(&self.terms[bits.trailing_zeros() as usize]);
                    bits &= bits - 1;
                }
            }
            None => self.terms.iter().for_each(add),
        }
        scratch.mark_scored(doc);
        // Texts that the query covers whole rank first: "pneumonia" is J18.9 "Pneumonia,
        // unspecified organism" before J13 "Pneumonia due to Streptococcus pneumoniae".
        let essential = f32::from(text.essential.max(1));
        let coverage = (f32::from(hits.matched) / essential).min(1.0);
        // And codes that answer the whole query rank before codes that answer part of it.
        let answered = (hits.matched_weight / self.query_weight.max(1.0)).min(1.0);
        let weighted = hits.score
            * text.weight
            * (1.0 - COVERAGE_WEIGHT + COVERAGE_WEIGHT * coverage)
            * (1.0 - COVERAGE_WEIGHT + COVERAGE_WEIGHT * answered);
        let code = text.code;
        let floor = match code {
            DocRef::Pcs(p) if in_any(&self.raised_tables, p) => INDEX_ONLY_SCORE,
            _ => 0.0,
        };
        self.raise(scratch, code, weighted.max(floor));
    }

    /// A code scores as its best text (its title or one of its inclusion terms). Scores are
    /// positive: 0 marks an untouched code.
    fn raise(&self, scratch: &mut Scratch, doc: DocRef, score: f32) {
        if !self.keep(doc) {
            return;
        }
        let slot = match doc {
            DocRef::Cm(i) => &mut scratch.best_cm[i as usize],
            DocRef::Pcs(i) => &mut scratch.best_pcs[i as usize],
        };
        if *slot == 0.0 {
            scratch.touched.push(doc);
        }
        *slot = slot.max(score);
        let score = self.code_score(scratch, doc);
        scratch.top.offer(doc, score);
    }

    /// Codes of the PCS tables the query points into score [`INDEX_ONLY_SCORE`] at least.
    /// Those no query word is in all tie, and ties go to the lower code, so of each table only
    /// the first `depth` such codes can make the ranking's top `depth`: the rest are left out
    /// (a code a query word is in is raised when its text is scored).
    fn list_tables(&self, scratch: &mut Scratch, depth: usize) {
        if !self.keep(DocRef::Pcs(0)) {
            return;
        }
        for range in &self.raised_tables {
            let mut listed = 0;
            for i in range.clone() {
                if listed == depth {
                    break;
                }
                if scratch.best_pcs[i] == 0.0 {
                    self.raise(scratch, DocRef::Pcs(i as u32), INDEX_ONLY_SCORE);
                    listed += 1;
                }
            }
        }
    }

    /// A touched code's score before the NOS nudge.
    fn code_score(&self, scratch: &Scratch, doc: DocRef) -> f32 {
        match doc {
            DocRef::Cm(i) => scratch.best_cm[i as usize],
            DocRef::Pcs(i) if in_any(&self.tables, i) => {
                scratch.best_pcs[i as usize] * INDEX_TABLE_BOOST
            }
            DocRef::Pcs(i) => scratch.best_pcs[i as usize],
        }
    }
}

fn in_any(ranges: &[Range<usize>], position: u32) -> bool {
    ranges.iter().any(|r| r.contains(&(position as usize)))
}

/// Whether the code, or a code above it, lists a "… NOS" term made only of query words: the
/// classification's own statement that this is where the unqualified condition goes
/// (e.g. E11 includes "diabetes NOS": diabetes of unstated type is coded as type 2).
fn is_nos_default(cm: &CmCodeSet, derived: &Derived, index: u32, query: &HashSet<&str>) -> bool {
    std::iter::once(index).chain(cm.ancestors(index)).any(|i| {
        derived
            .nos_terms(i)
            .iter()
            .any(|terms| terms.iter().all(|t| query.contains(t.as_str())))
    })
}

#[cfg(test)]
mod tests {
    use medcoder_assets::MedcoderHome;

    use super::*;
    use crate::IcdKnowledge;

    /// Clauses like those notes are cut into: rare and common words, abbreviations, procedure
    /// words that point into PCS tables, words no title has, and nothing at all.
    const QUERIES: &[&str] = &[
        "29 year old woman with a history of duodenal ulcer",
        "with",
        "other relevant background",
        "with left",
        "right renal fossa pain",
        "examination revealed positive right renal percussion",
        "ultrasound showed right foot",
        "T2DM with CKD",
        "no fever",
        "chest x-ray",
        "CT scan of the abdomen and pelvis with contrast",
        "laparoscopic appendectomy",
        "resection",
        "biopsy of the liver",
        "peritoneal dialysis program since January of the same year",
        "ischemic heart disease due to coronary artery disease with transcranial angioplasty",
        "percutaneous drainage of the right kidney",
        "fracture of the left femur",
        "type 2 diabetes mellitus",
        "pneumonia",
        "hypertension",
        "HTN",
        "acute myocardial infarction",
        "urinary tract infection",
        "she was discharged from the outpatient clinic three years after surgery",
        "negative for malignancy",
        "magnetic resonance imaging of the brain",
        "insertion of a central venous catheter",
        "the patient",
        "a",
        "",
        "xyzzy qwerty",
        "2019",
        "TURP",
        "hemodialysis",
        "coronary artery bypass",
        "open reduction and internal fixation of the right tibia",
        "chronic obstructive pulmonary disease exacerbation",
        "left upper lobe",
        "with no evidence of recurrence",
    ];

    /// A clause of more distinct known words than a signature mask holds.
    const LONG_QUERY: &str = "abdominal aortic aneurysm atrial fibrillation acute kidney failure \
        bacterial pneumonia benign prostatic hyperplasia cerebral infarction chronic kidney \
        disease congestive heart failure deep vein thrombosis diabetic ketoacidosis end stage \
        renal disease gastrointestinal hemorrhage hepatitis hyperlipidemia hypothyroidism \
        irritable bowel syndrome methicillin resistant staphylococcus aureus obstructive sleep \
        apnea osteoarthritis pulmonary embolism peptic ulcer rheumatoid arthritis tuberculosis \
        transient ischemic attack urinary incontinence anemia asthma bronchitis cellulitis \
        cholecystitis cirrhosis dementia depression dermatitis epilepsy glaucoma gout migraine \
        obesity pancreatitis psoriasis sepsis syncope tachycardia vertigo melanoma lymphoma \
        leukemia sarcoma carcinoma adenoma cataract otitis sinusitis tonsillitis appendicitis";

    fn knowledge_base() -> Option<IcdKnowledge> {
        let home = MedcoderHome::from_env().ok()?;
        IcdKnowledge::load(&home).ok()
    }

    #[test]
    fn pruned_search_ranks_as_scoring_every_text() {
        let Some(kb) = knowledge_base() else {
            eprintln!("skipping: ICD assets not installed (medcoder assets fetch)");
            return;
        };
        let index = kb.search_index();
        let filters = [
            (None, false),
            (Some(CodeSystem::Cm), false),
            (Some(CodeSystem::Cm), true),
            (Some(CodeSystem::Pcs), false),
        ];
        let mut compared = 0;
        for query in QUERIES.iter().chain([&LONG_QUERY]) {
            for limit in [1, 20, 50] {
                for (system, billable_only) in filters {
                    let filter = SearchFilter {
                        system,
                        billable_only,
                    };
                    let run = |pruning| {
                        index
                            .search_with(query, limit, filter, (&kb.cm, &kb.pcs), pruning)
                            .into_iter()
                            .map(|hit| (hit.doc, hit.score.to_bits()))
                            .collect::<Vec<_>>()
                    };
                    assert_eq!(
                        run(Pruning::On),
                        run(Pruning::Off),
                        "{query:?}, limit {limit}, {filter:?}"
                    );
                    compared += 1;
                }
            }
        }
        assert_eq!(compared, (QUERIES.len() + 1) * 12);
    }
}
