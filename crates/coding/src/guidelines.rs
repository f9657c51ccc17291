//! Coding-guideline warnings on a note's assigned codes, from the official code set: codes
//! that cannot be reported as they stand (a header, a missing 7th character) and pairs an
//! Excludes1 note forbids together.

use medcoder_icd::IcdKnowledge;

use crate::prediction::{CodeKind, NotePrediction};

/// Readable warnings, one per problem, naming the codes.
pub fn guideline_warnings(kb: &IcdKnowledge, prediction: &NotePrediction) -> Vec<String> {
    let mut warnings = Vec::new();
    for kind in CodeKind::BOTH {
        for item in prediction.ranking(kind).iter().filter(|c| c.assigned) {
            if let Err(error) = kb.validate(&item.code) {
                warnings.push(format!("{}: {error}", item.code));
            }
        }
    }
    let assigned: Vec<&str> = prediction
        .diagnoses
        .iter()
        .filter(|c| c.assigned)
        .map(|c| c.code.as_str())
        .collect();
    for (i, a) in assigned.iter().enumerate() {
        for b in &assigned[i + 1..] {
            if let Ok(Some(conflict)) = kb.excludes1_conflict(a, b) {
                warnings.push(format!(
                    "{a} and {b}: an Excludes1 note at {} forbids reporting both ({})",
                    conflict.note_at, conflict.note
                ));
            }
        }
    }
    warnings
}
