//! Codes that cannot be reported as they are written: malformed ones (not an ICD-10-CM or
//! ICD-10-PCS code by their shape, checked always), and, against the US code set when it is
//! installed, well-formed codes the US release does not have at all and codes it has only as
//! a header. CodiEsp is annotated in the Spanish edition (ICD-10-ES), so its gold, and a model
//! trained on it, hold codes of both last kinds; they are counted apart from malformed ones.

use std::collections::{HashMap, HashSet};

use medcoder_icd::{CodeSystem, IcdCode, IcdKnowledge};
use serde::Serialize;

use crate::CodeKind;

/// Where a well-formed code stands in the US code set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsCodeStatus {
    /// A code that may be reported: a billable CM code, a complete PCS code.
    Reportable,
    /// A header: a CM category or subcategory with codes below it (a code missing its 7th
    /// character too), or a PCS code's first characters.
    HeaderOnly,
    /// Neither a code nor a header of the release.
    NotInCodeSet,
}

/// Where a code of a kind stands in the US code set.
type StatusOf<'a> = Box<dyn Fn(&str, CodeKind) -> UsCodeStatus + Sync + 'a>;

/// The US code set codes are checked against: its name and where a code stands in it (a
/// function, so that tests need not load the code sets).
pub struct UsCodeSet<'a> {
    /// The release, for the report.
    pub name: String,
    status: StatusOf<'a>,
}

impl std::fmt::Debug for UsCodeSet<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UsCodeSet")
            .field("name", &self.name)
            .finish()
    }
}

impl<'a> UsCodeSet<'a> {
    pub fn new(
        name: impl Into<String>,
        status: impl Fn(&str, CodeKind) -> UsCodeStatus + Sync + 'a,
    ) -> Self {
        Self {
            name: name.into(),
            status: Box::new(status),
        }
    }

    /// The knowledge base's ICD-10-CM and ICD-10-PCS releases.
    pub fn of(kb: &'a IcdKnowledge) -> Self {
        Self::new(
            format!("{} / {}", kb.cm.version, kb.pcs.version),
            move |code, kind| us_code_status(kb, code, kind),
        )
    }

    pub fn status(&self, code: &str, kind: CodeKind) -> UsCodeStatus {
        (self.status)(code, kind)
    }
}

fn system_of(kind: CodeKind) -> CodeSystem {
    match kind {
        CodeKind::Diagnosis => CodeSystem::Cm,
        CodeKind::Procedure => CodeSystem::Pcs,
    }
}

/// Where `code` (a diagnosis: ICD-10-CM, a procedure: ICD-10-PCS) stands in the knowledge
/// base's releases; a malformed code is not in them.
pub fn us_code_status(kb: &IcdKnowledge, code: &str, kind: CodeKind) -> UsCodeStatus {
    let Ok(code) = IcdCode::parse_as(system_of(kind), code) else {
        return UsCodeStatus::NotInCodeSet;
    };
    let compact = code.compact();
    match kind {
        CodeKind::Diagnosis => match kb.cm.get(compact) {
            Some(entry) if entry.billable => UsCodeStatus::Reportable,
            Some(_) => UsCodeStatus::HeaderOnly,
            None => UsCodeStatus::NotInCodeSet,
        },
        CodeKind::Procedure => {
            if kb.pcs.get(compact).is_some() {
                UsCodeStatus::Reportable
            } else if !kb.pcs.with_prefix(compact).is_empty() {
                UsCodeStatus::HeaderOnly
            } else {
                UsCodeStatus::NotInCodeSet
            }
        }
    }
}

/// Why a code cannot be reported as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum InvalidReason {
    /// Not an ICD-10-CM (diagnoses) / ICD-10-PCS (procedures) code by its shape.
    Malformed,
    /// Well-formed, but not in the US release at all.
    NotInUsCodeSet,
    /// In the US release only as a header (or a partial PCS code).
    UsHeaderOnly,
}

impl InvalidReason {
    pub fn label(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::NotInUsCodeSet => "not in the US code set",
            Self::UsHeaderOnly => "US header only",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct InvalidCode {
    pub code: String,
    /// Notes it appears in.
    pub notes: usize,
    pub why: InvalidReason,
}

/// Counts against the US code set.
#[derive(Debug, Clone, Default, Serialize)]
pub struct UsCodeSetCounts {
    /// Well-formed codes that are neither a code nor a header of the US release.
    pub not_in_us_code_set: usize,
    pub not_in_us_code_set_rate: f64,
    /// Codes the US release has only as a header (category or subcategory with codes below
    /// it, a code missing its 7th character, a partial PCS code): not reportable.
    pub us_header_only: usize,
    pub us_header_only_rate: f64,
    /// Malformed, not in the US code set, or a header: not reportable in the US as written.
    pub not_reportable_in_us: usize,
    pub not_reportable_in_us_rate: f64,
}

/// How many of a set of codes cannot be reported as written, and why.
#[derive(Debug, Clone, Serialize)]
pub struct CodeValidity {
    /// Codes checked: each note's distinct codes once.
    pub codes: usize,
    pub malformed: usize,
    pub malformed_rate: f64,
    /// `None` when the code sets are not installed: not checked, not 0.
    pub us_code_set: Option<UsCodeSetCounts>,
    /// The codes found invalid in the most notes (at most 15).
    pub frequent_invalid: Vec<InvalidCode>,
}

/// Validity of one code kind's predicted and gold codes.
#[derive(Debug, Clone, Serialize)]
pub struct KindValidity {
    /// Every code of the rankings of every predicted note.
    pub ranked: CodeValidity,
    /// The assigned codes of every predicted note.
    pub assigned: CodeValidity,
    /// The gold codes of the scored notes.
    pub gold: CodeValidity,
}

/// What the validity counts mean, for the report.
pub const DEFINITIONS: &[(&str, &str)] = &[
    (
        "malformed",
        "Not an ICD-10-CM (diagnoses) or ICD-10-PCS (procedures) code by its shape: CM is a \
         letter, a digit, then 1 to 5 letters or digits (a dot only after the 3rd character); \
         PCS is at most 7 digits or letters other than I and O. Checked with or without the \
         code sets.",
    ),
    (
        "not in the US code set",
        "Well-formed, but neither a code nor a header of the installed US ICD-10-CM / \
         ICD-10-PCS release: for example codes of CodiEsp's Spanish edition (ICD-10-ES) that \
         the US release lacks. Not counted when the code sets are not installed.",
    ),
    (
        "US header only",
        "In the US release only as a header, so not reportable there: a category or \
         subcategory with codes below it (R51, a code in the Spanish edition, is a header of \
         R51.0 and R51.9 in the US), a code missing its 7th character, or the first \
         characters of a PCS code.",
    ),
    (
        "not reportable in the US",
        "Malformed, not in the US code set, or US header only. Rates are over the codes \
         checked: each note's distinct codes once; `ranked` is every code of every predicted \
         note's ranking, `assigned` the assigned ones, `gold` the scored notes' gold codes.",
    ),
];

/// Checks each note's distinct codes of `kind`.
pub(super) fn code_validity<'c, N>(
    notes: impl IntoIterator<Item = N>,
    kind: CodeKind,
    us: Option<&UsCodeSet>,
) -> CodeValidity
where
    N: IntoIterator<Item = &'c str>,
{
    let mut codes = 0;
    let mut invalid: HashMap<(&str, InvalidReason), usize> = HashMap::new();
    for note in notes {
        let distinct: HashSet<&str> = note.into_iter().collect();
        codes += distinct.len();
        for code in distinct {
            if let Some(why) = invalid_reason(code, kind, us) {
                *invalid.entry((code, why)).or_default() += 1;
            }
        }
    }
    let count = |reason: InvalidReason| {
        invalid
            .iter()
            .filter(|((_, why), _)| *why == reason)
            .map(|(_, n)| n)
            .sum::<usize>()
    };
    let rate = |n: usize| {
        if codes == 0 {
            0.0
        } else {
            n as f64 / codes as f64
        }
    };
    let malformed = count(InvalidReason::Malformed);
    let us_code_set = us.map(|_| {
        let (absent, header) = (
            count(InvalidReason::NotInUsCodeSet),
            count(InvalidReason::UsHeaderOnly),
        );
        let not_reportable = malformed + absent + header;
        UsCodeSetCounts {
            not_in_us_code_set: absent,
            not_in_us_code_set_rate: rate(absent),
            us_header_only: header,
            us_header_only_rate: rate(header),
            not_reportable_in_us: not_reportable,
            not_reportable_in_us_rate: rate(not_reportable),
        }
    });
    let mut frequent: Vec<InvalidCode> = invalid
        .into_iter()
        .map(|((code, why), notes)| InvalidCode {
            code: code.to_string(),
            notes,
            why,
        })
        .collect();
    frequent.sort_by(|a, b| b.notes.cmp(&a.notes).then_with(|| a.code.cmp(&b.code)));
    frequent.truncate(15);
    CodeValidity {
        codes,
        malformed,
        malformed_rate: rate(malformed),
        us_code_set,
        frequent_invalid: frequent,
    }
}

fn invalid_reason(code: &str, kind: CodeKind, us: Option<&UsCodeSet>) -> Option<InvalidReason> {
    if IcdCode::parse_as(system_of(kind), code).is_err() {
        return Some(InvalidReason::Malformed);
    }
    match us?.status(code, kind) {
        UsCodeStatus::Reportable => None,
        UsCodeStatus::HeaderOnly => Some(InvalidReason::UsHeaderOnly),
        UsCodeStatus::NotInCodeSet => Some(InvalidReason::NotInUsCodeSet),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A stand-in US code set: E11.9 and I10 reportable, R51 a header, 0SR9019 a code.
    fn us() -> UsCodeSet<'static> {
        UsCodeSet::new("test", |code, _| match code {
            "E11.9" | "I10" | "0SR9019" => UsCodeStatus::Reportable,
            "R51" | "0SR" => UsCodeStatus::HeaderOnly,
            _ => UsCodeStatus::NotInCodeSet,
        })
    }

    #[test]
    fn malformed_absent_and_header_codes_are_counted_apart() {
        let notes = [
            vec!["E11.9", "R51", "X9", "E11.9"],
            vec!["R51", "S02.919", "E1.19"],
        ];
        let us = us();
        let v = code_validity(
            notes.iter().map(|n| n.iter().copied()),
            CodeKind::Diagnosis,
            Some(&us),
        );
        // Distinct per note: 3 + 3.
        assert_eq!(v.codes, 6);
        // X9 (too short) and E1.19 (dot after the 2nd character).
        assert_eq!(v.malformed, 2);
        let counts = v.us_code_set.unwrap();
        assert_eq!(counts.not_in_us_code_set, 1); // S02.919
        assert_eq!(counts.us_header_only, 2); // R51, twice
        assert_eq!(counts.not_reportable_in_us, 5);
        assert!((counts.not_reportable_in_us_rate - 5.0 / 6.0).abs() < 1e-12);
        assert_eq!(v.frequent_invalid[0].code, "R51");
        assert_eq!(v.frequent_invalid[0].notes, 2);
        assert_eq!(v.frequent_invalid[0].why, InvalidReason::UsHeaderOnly);
    }

    #[test]
    fn without_the_code_sets_only_the_shape_is_checked() {
        let notes = [vec!["0SR9019", "0SR", "0SRI019", "12345678"]];
        let v = code_validity(
            notes.iter().map(|n| n.iter().copied()),
            CodeKind::Procedure,
            None,
        );
        assert_eq!((v.codes, v.malformed), (4, 2)); // I is not a PCS character; 8 characters
        assert!(v.us_code_set.is_none());
        let us = us();
        let v = code_validity(
            notes.iter().map(|n| n.iter().copied()),
            CodeKind::Procedure,
            Some(&us),
        );
        let counts = v.us_code_set.unwrap();
        assert_eq!((counts.us_header_only, counts.not_in_us_code_set), (1, 0));
    }

    #[test]
    fn no_codes_rate_zero() {
        let v = code_validity(Vec::<Vec<&str>>::new(), CodeKind::Diagnosis, Some(&us()));
        assert_eq!((v.codes, v.malformed_rate), (0, 0.0));
        assert_eq!(v.us_code_set.unwrap().not_reportable_in_us_rate, 0.0);
    }
}
