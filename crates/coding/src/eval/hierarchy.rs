//! Hierarchical partial credit: a predicted code near a gold code in the ICD hierarchy earns
//! part of a hit instead of nothing.
//!
//! ICD-10 codes are hierarchical character by character: in ICD-10-CM the first 3 characters
//! are the category and each further one a level below it (E11 → E11.6 → E11.65); in
//! ICD-10-PCS each of the 7 characters is an axis refining the one before (section, body
//! system, root operation, body part, …). So the deepest ancestor two codes share is their
//! longest common prefix. The credit of a code against another is that prefix's length over
//! the longer code's length, when they share at least the 3-character category (CM) or table
//! (PCS), and 0 otherwise; each code takes its best match in the note.

use serde::Serialize;

use super::Rows;

/// Codes sharing fewer leading characters than this (a CM category, a PCS table) earn nothing.
pub const MIN_SHARED_CHARACTERS: usize = 3;

/// How the credit is defined, for the report.
pub const DEFINITION: &str = "Partial credit for a code near a gold code in the ICD hierarchy. \
    The credit of a code against another is the length of their common prefix (dots ignored: \
    each character is a level of the hierarchy, the category E11 then E11.6, E11.65; a PCS \
    code's axes) over the length of the longer code, when they share at least the \
    3-character category (CM) or table (PCS), else 0: E11.65 against E11.9 earns 3/5, E11 \
    against E11.9 3/4, a match 1. Each assigned code takes its best credit against the \
    note's gold codes, each gold code its best against the note's assigned codes; \
    hierarchical P = the assigned codes' credit / their number, R = the gold codes' credit / \
    their number (micro, over all notes), F1 their harmonic mean. It is never below the \
    exact-match P / R / F1.";

/// Micro precision, recall and F1 with partial credit.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct HierarchicalScores {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    /// Sum over the assigned codes of each one's best credit against its note's gold codes.
    pub assigned_credit: f64,
    pub assigned: usize,
    /// Sum over the gold codes of each one's best credit against its note's assigned codes.
    pub gold_credit: f64,
    pub gold: usize,
}

/// The credit of `a` against `b` (symmetric): their common prefix over the longer one's
/// length, when they share at least [`MIN_SHARED_CHARACTERS`]; dots and case are ignored.
pub fn hierarchy_credit(a: &str, b: &str) -> f64 {
    let compact = |code: &str| -> Vec<char> {
        code.chars()
            .filter(|c| *c != '.')
            .map(|c| c.to_ascii_uppercase())
            .collect()
    };
    let (a, b) = (compact(a), compact(b));
    let longer = a.len().max(b.len());
    let shared = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    if longer == 0 || shared < MIN_SHARED_CHARACTERS {
        return 0.0;
    }
    shared as f64 / longer as f64
}

/// The best credit of `code` against any of `others` (0 when there are none).
fn best_credit(code: &str, others: &[String]) -> f64 {
    others
        .iter()
        .map(|other| hierarchy_credit(code, other))
        .fold(0.0, f64::max)
}

/// Hierarchical P/R/F1 of the assigned codes of `rows` (full codes) against their gold.
pub(super) fn hierarchical_scores(rows: &Rows) -> HierarchicalScores {
    let mut scores = HierarchicalScores::default();
    for (gold, _, assigned) in rows {
        scores.assigned += assigned.len();
        scores.gold += gold.len();
        scores.assigned_credit += assigned.iter().map(|c| best_credit(c, gold)).sum::<f64>();
        scores.gold_credit += gold.iter().map(|c| best_credit(c, assigned)).sum::<f64>();
    }
    let ratio = |credit: f64, n: usize| if n == 0 { 0.0 } else { credit / n as f64 };
    scores.precision = ratio(scores.assigned_credit, scores.assigned);
    scores.recall = ratio(scores.gold_credit, scores.gold);
    let sum = scores.precision + scores.recall;
    scores.f1 = if sum == 0.0 {
        0.0
    } else {
        2.0 * scores.precision * scores.recall / sum
    };
    scores
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    fn strings(codes: &[&str]) -> Vec<String> {
        codes.iter().map(|c| c.to_string()).collect()
    }

    #[test]
    fn credit_is_the_shared_prefix_over_the_longer_code_from_the_category_down() {
        assert_eq!(hierarchy_credit("E11.9", "E11.9"), 1.0);
        assert_eq!(hierarchy_credit("e119", "E11.9"), 1.0);
        assert!(close(hierarchy_credit("E11.65", "E11.9"), 3.0 / 5.0));
        assert!(close(hierarchy_credit("E11.9", "E11.65"), 3.0 / 5.0));
        assert!(close(hierarchy_credit("E11", "E11.9"), 3.0 / 4.0));
        assert!(close(hierarchy_credit("S72.001A", "S72.002A"), 5.0 / 7.0));
        // Another category of the same block or chapter: nothing.
        assert_eq!(hierarchy_credit("E10.9", "E11.9"), 0.0);
        assert_eq!(hierarchy_credit("I10", "J18.9"), 0.0);
        // PCS: the same table (section, body system, root operation) and body part.
        assert!(close(hierarchy_credit("0SR9019", "0SR9029"), 5.0 / 7.0));
        assert_eq!(hierarchy_credit("0SR9019", "0SQ9019"), 0.0);
        assert_eq!(hierarchy_credit("", ""), 0.0);
    }

    #[test]
    fn each_code_takes_its_best_match_and_exact_matches_score_as_before() {
        // Note 1: gold {E11.9, I10}, assigned {E11.65, I10, J18.9}.
        // Note 2: gold {K21.9}, nothing assigned.
        let rows: Rows = vec![
            (
                strings(&["E11.9", "I10"]),
                Vec::new(),
                strings(&["E11.65", "I10", "J18.9"]),
            ),
            (strings(&["K21.9"]), Vec::new(), Vec::new()),
        ];
        let s = hierarchical_scores(&rows);
        // Assigned: E11.65 → 3/5 (E11.9), I10 → 1, J18.9 → 0.
        assert!(close(s.assigned_credit, 1.6));
        assert_eq!(s.assigned, 3);
        // Gold: E11.9 → 3/5 (E11.65), I10 → 1, K21.9 → 0.
        assert!(close(s.gold_credit, 1.6));
        assert_eq!(s.gold, 3);
        assert!(close(s.precision, 1.6 / 3.0));
        assert!(close(s.recall, 1.6 / 3.0));
        assert!(close(s.f1, 1.6 / 3.0));
        // Exact matching would give P = R = 1/3: partial credit is never below it.
        assert!(s.precision >= 1.0 / 3.0);
    }

    #[test]
    fn nothing_assigned_or_no_gold_scores_zero_without_dividing_by_zero() {
        let s = hierarchical_scores(&Vec::new());
        assert_eq!((s.precision, s.recall, s.f1), (0.0, 0.0, 0.0));
        let rows: Rows = vec![(strings(&["I10"]), Vec::new(), Vec::new())];
        let s = hierarchical_scores(&rows);
        assert_eq!((s.precision, s.recall, s.f1, s.gold), (0.0, 0.0, 0.0, 1));
    }
}
