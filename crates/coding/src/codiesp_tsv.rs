//! CodiEsp's TSV layout, which TeMU-BSC's official evaluation script
//! (`codiespD_P_evaluation.py`) reads: `D.tsv` (diagnoses) and `P.tsv` (procedures), one
//! `note id<TAB>code` line per code, no header, codes in lower case (CM codes with their dot),
//! predictions in rank order. The script's third input, the list of valid codes, is one code
//! per line.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::eval::GoldNote;
use crate::{CodeKind, CodingError, NotePrediction};

/// The file of each kind.
pub const FILES: [(CodeKind, &str); 2] = [(CodeKind::Diagnosis, "D"), (CodeKind::Procedure, "P")];

/// `<dir>/D.tsv` and `<dir>/P.tsv` of the predictions' rankings (the layout of a CodiEsp
/// submission).
pub fn write_predictions(
    dir: &Path,
    predictions: &[NotePrediction],
) -> Result<Vec<PathBuf>, CodingError> {
    write_pairs(dir, |kind| {
        predictions
            .iter()
            .flat_map(|p| {
                p.ranking(kind)
                    .iter()
                    .map(|c| (p.id.as_str(), c.code.as_str()))
            })
            .collect()
    })
}

/// `<dir>/D.tsv` and `<dir>/P.tsv` of the gold codes (the layout of CodiEsp's gold files), and
/// `<dir>/D_codes.tsv`, `<dir>/P_codes.tsv`: `valid_codes` of each kind, one per line.
pub fn write_gold(
    dir: &Path,
    gold: &[GoldNote],
    valid_codes: impl Fn(CodeKind) -> BTreeSet<String>,
) -> Result<Vec<PathBuf>, CodingError> {
    let mut written = write_pairs(dir, |kind| {
        gold.iter()
            .flat_map(|g| g.codes(kind).iter().map(|c| (g.id.as_str(), c.as_str())))
            .collect()
    })?;
    for (kind, name) in FILES {
        let codes: BTreeSet<String> = valid_codes(kind).iter().map(|c| tsv_code(c)).collect();
        let text: String = codes.iter().map(|c| format!("{c}\n")).collect();
        let path = dir.join(format!("{name}_codes.tsv"));
        medcoder_train::atomic::write_file(&path, text.as_bytes())?;
        written.push(path);
    }
    Ok(written)
}

/// A code as CodiEsp writes it: lower case.
fn tsv_code(code: &str) -> String {
    code.trim().to_lowercase()
}

/// `<dir>/{D,P}.tsv` of `(note id, code)` pairs, in order.
fn write_pairs<'a>(
    dir: &Path,
    pairs: impl Fn(CodeKind) -> Vec<(&'a str, &'a str)>,
) -> Result<Vec<PathBuf>, CodingError> {
    fs_err::create_dir_all(dir)?;
    let mut written = Vec::new();
    for (kind, name) in FILES {
        let text: String = pairs(kind)
            .into_iter()
            .map(|(id, code)| format!("{id}\t{}\n", tsv_code(code)))
            .collect();
        let path = dir.join(format!("{name}.tsv"));
        medcoder_train::atomic::write_file(&path, text.as_bytes())?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn gold_and_valid_codes_in_codiesp_layout() {
        let dir = tempfile::tempdir().unwrap();
        let gold = vec![
            GoldNote {
                id: "S0004-1".into(),
                diagnoses: vec!["N44.8".into(), "R51".into()],
                procedures: vec!["BW03ZZZ".into()],
            },
            GoldNote {
                id: "S0004-2".into(),
                diagnoses: vec!["I10".into()],
                procedures: vec![],
            },
        ];
        let valid = |kind: CodeKind| -> BTreeSet<String> {
            let codes: &[&str] = match kind {
                CodeKind::Diagnosis => &["R51", "N44.8", "I10", "E11.9"],
                CodeKind::Procedure => &["BW03ZZZ"],
            };
            codes.iter().map(|c| c.to_string()).collect()
        };
        let written = write_gold(dir.path(), &gold, valid).unwrap();
        assert_eq!(written.len(), 4);
        let read = |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap();
        assert_eq!(
            read("D.tsv"),
            "S0004-1\tn44.8\nS0004-1\tr51\nS0004-2\ti10\n"
        );
        assert_eq!(read("P.tsv"), "S0004-1\tbw03zzz\n");
        assert_eq!(read("D_codes.tsv"), "e11.9\ni10\nn44.8\nr51\n");
        assert_eq!(read("P_codes.tsv"), "bw03zzz\n");
    }
}
