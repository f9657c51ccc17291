//! Coding-guideline warnings on a note's assigned codes, from the official code set: codes
//! that cannot be reported as they stand (a header, a missing 7th character), pairs an
//! Excludes1 note forbids together, and manifestation codes whose "Code first" note names an
//! underlying condition none of whose codes is assigned.

use std::collections::BTreeMap;

use medcoder_icd::notes::{code_references, NoteKind};
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
    warnings.extend(code_first_warnings(kb, &assigned));
    warnings
}

/// Assigned codes under a "Code first" note (at the code or above it) none of whose named
/// codes is assigned. A note that holds only where it applies ("code first, if applicable, …")
/// or names no code asks for nothing checkable, and is passed over.
fn code_first_warnings(kb: &IcdKnowledge, assigned: &[&str]) -> Vec<String> {
    let compact: Vec<String> = assigned
        .iter()
        .map(|c| c.replace('.', "").to_ascii_uppercase())
        .collect();
    let mut warnings = Vec::new();
    for code in assigned {
        let Ok(info) = kb.lookup(code) else { continue };
        // The notes of one entry are one instruction: its lines list the alternatives.
        let mut by_entry: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for note in info.notes.iter().filter(|n| n.kind == NoteKind::CodeFirst) {
            by_entry.entry(&note.from).or_default().push(&note.text);
        }
        for (at, lines) in by_entry {
            if lines
                .iter()
                .any(|l| l.to_lowercase().contains("if applicable"))
            {
                continue;
            }
            let named: Vec<_> = lines.iter().flat_map(|l| code_references(l)).collect();
            if named.is_empty() || compact.iter().any(|c| named.iter().any(|r| r.covers(c))) {
                continue;
            }
            let examples: Vec<&str> = lines.iter().take(4).copied().collect();
            warnings.push(format!(
                "{code}: a Code first note at {at} asks for the underlying condition to be coded \
                 first, and none of the codes it names is assigned ({}{})",
                examples.join("; "),
                if lines.len() > examples.len() {
                    "; …"
                } else {
                    ""
                }
            ));
        }
    }
    warnings
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prediction::CodedItem;
    use medcoder_icd::IcdSources;

    /// A two-block tabular list: E08 (code first the underlying condition), E24 Cushing's,
    /// and A40 (code first, if applicable, …).
    const TABULAR: &str = r#"<?xml version="1.0" encoding="utf-8"?>
<ICD10CM.tabular>
  <version>2026</version>
  <chapter>
    <name>4</name>
    <desc>Endocrine, nutritional and metabolic diseases (E00-E89)</desc>
    <section id="E08-E13">
      <desc>Diabetes mellitus (E08-E13)</desc>
      <diag>
        <name>E08</name>
        <desc>Diabetes mellitus due to underlying condition</desc>
        <codeFirst>
          <note>the underlying condition, such as:</note>
          <note>congenital rubella (P35.0)</note>
          <note>Cushing's syndrome (E24.-)</note>
          <note>pancreatitis and other diseases of the pancreas (K85-K86.-)</note>
        </codeFirst>
        <diag>
          <name>E08.9</name>
          <desc>Diabetes mellitus due to underlying condition without complications</desc>
        </diag>
      </diag>
    </section>
    <section id="E20-E35">
      <desc>Disorders of other endocrine glands (E20-E35)</desc>
      <diag>
        <name>E24</name>
        <desc>Cushing's syndrome</desc>
        <diag>
          <name>E24.9</name>
          <desc>Cushing's syndrome, unspecified</desc>
        </diag>
      </diag>
    </section>
  </chapter>
  <chapter>
    <name>1</name>
    <desc>Certain infectious and parasitic diseases (A00-B99)</desc>
    <section id="A30-A49">
      <desc>Other bacterial diseases (A30-A49)</desc>
      <diag>
        <name>A40</name>
        <desc>Streptococcal sepsis</desc>
        <codeFirst>
          <note>, if applicable, postprocedural sepsis (T81.44-)</note>
          <note>streptococcal sepsis during labor (O75.3)</note>
        </codeFirst>
        <diag>
          <name>A40.9</name>
          <desc>Streptococcal sepsis, unspecified</desc>
        </diag>
      </diag>
    </section>
  </chapter>
</ICD10CM.tabular>
"#;

    fn knowledge() -> IcdKnowledge {
        let dir = tempfile::tempdir().unwrap();
        let tabular = dir.path().join("tabular.xml");
        std::fs::write(&tabular, TABULAR).unwrap();
        let pcs = dir.path().join("pcs.csv");
        std::fs::write(&pcs, "0SR9019,Replacement of Right Hip Joint\n").unwrap();
        IcdKnowledge::build(&IcdSources {
            cm_tabular_xml: tabular,
            cm_code_list: None,
            pcs_codes_csv: pcs,
            pcs_axes_db: None,
            pcs_tables_xml: None,
            cm_version: "test".into(),
            pcs_version: "test".into(),
        })
        .unwrap()
    }

    fn prediction(codes: &[&str]) -> NotePrediction {
        NotePrediction {
            id: "n".into(),
            diagnoses: codes
                .iter()
                .enumerate()
                .map(|(i, code)| CodedItem {
                    code: code.to_string(),
                    rank: i + 1,
                    confidence: 1.0,
                    assigned: true,
                    description: None,
                    billable: None,
                    evidence: Vec::new(),
                    assertion: None,
                })
                .collect(),
            procedures: Vec::new(),
            warnings: Vec::new(),
            engine: "test".into(),
            model: "test".into(),
            elapsed_ms: 0.0,
            code_sets: None,
        }
    }

    #[test]
    fn a_code_first_note_warns_until_a_code_it_names_is_assigned() {
        let kb = knowledge();
        let warnings = guideline_warnings(&kb, &prediction(&["E08.9"]));
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].starts_with("E08.9: a Code first note at E08")
                && warnings[0].contains("Cushing's syndrome (E24.-)"),
            "{}",
            warnings[0]
        );
        // Cushing's syndrome (E24.9, under E24.-) assigned too: the instruction is met.
        assert!(guideline_warnings(&kb, &prediction(&["E08.9", "E24.9"])).is_empty());
        // "Code first, if applicable": nothing to check.
        assert!(guideline_warnings(&kb, &prediction(&["A40.9"])).is_empty());
    }
}
