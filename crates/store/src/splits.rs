//! Train / validation / test splits: by patient (no patient in two splits), seeded and
//! reproducible, or taken from a user's split file.

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;

use duckdb::{params, Connection};
use serde::{Deserialize, Serialize};

use crate::error::DbContext;
use crate::StoreError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Validation,
    Test,
}

impl Split {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Train => "train",
            Self::Validation => "validation",
            Self::Test => "test",
        }
    }
}

impl FromStr for Split {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "train" | "training" => Ok(Self::Train),
            "val" | "valid" | "validation" | "dev" => Ok(Self::Validation),
            "test" => Ok(Self::Test),
            other => Err(StoreError::Invalid(format!(
                "unknown split `{other}` (expected train, validation/dev or test)"
            ))),
        }
    }
}

/// Fractions of patients in train and validation; the rest is test.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SplitRatios {
    pub train: f64,
    pub validation: f64,
}

impl Default for SplitRatios {
    fn default() -> Self {
        Self {
            train: 0.8,
            validation: 0.1,
        }
    }
}

/// A stable 64-bit mix (splitmix64): the same seed and id give the same place on every machine
/// and every version, unlike a database's internal hash.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A seeded rank for an id (FNV-1a of the id, mixed with the seed).
pub(crate) fn seeded_rank(seed: u64, id: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    mix(h ^ mix(seed))
}

/// Give every document of a dataset the split of its patient (documents without a patient are
/// their own patient): patients ordered by seeded rank, the first `train` share to train, etc.
pub(crate) fn assign_by_patient(
    conn: &Connection,
    dataset: &str,
    seed: u64,
    ratios: SplitRatios,
) -> Result<(), StoreError> {
    let mut stmt = conn
        .prepare("SELECT DISTINCT coalesce(patient_id, doc_id) FROM documents WHERE dataset = ?")
        .db(|| "listing patients".into())?;
    let patients: Vec<String> = stmt
        .query_map(params![dataset], |r| r.get(0))
        .db(|| "listing patients".into())?
        .collect::<Result<_, _>>()
        .db(|| "listing patients".into())?;
    let mut ranked: Vec<(u64, &str)> = patients
        .iter()
        .map(|p| (seeded_rank(seed, p), p.as_str()))
        .collect();
    ranked.sort_unstable();
    let n = ranked.len() as f64;
    let train_end = (n * ratios.train).round() as usize;
    let validation_end = (n * (ratios.train + ratios.validation)).round() as usize;
    let assignment = ranked.iter().enumerate().map(|(i, (_, patient))| {
        let split = if i < train_end {
            Split::Train
        } else if i < validation_end {
            Split::Validation
        } else {
            Split::Test
        };
        (*patient, split)
    });
    write_patient_splits(conn, dataset, assignment)
}

fn write_patient_splits<'a>(
    conn: &Connection,
    dataset: &str,
    assignment: impl Iterator<Item = (&'a str, Split)>,
) -> Result<(), StoreError> {
    conn.execute_batch(
        "CREATE OR REPLACE TEMP TABLE patient_split (patient VARCHAR, split VARCHAR)",
    )
    .db(|| "creating the patient split table".into())?;
    {
        let mut appender = conn
            .appender("patient_split")
            .db(|| "writing splits".into())?;
        for (patient, split) in assignment {
            appender
                .append_row(params![patient, split.as_str()])
                .db(|| "writing splits".into())?;
        }
        appender.flush().db(|| "writing splits".into())?;
    }
    conn.execute("DELETE FROM splits WHERE dataset = ?", params![dataset])
        .db(|| "clearing splits".into())?;
    conn.execute(
        "INSERT INTO splits SELECT d.dataset, d.doc_id, p.split FROM documents d
         JOIN patient_split p ON p.patient = coalesce(d.patient_id, d.doc_id) WHERE d.dataset = ?",
        params![dataset],
    )
    .db(|| "writing splits".into())?;
    conn.execute_batch("DROP TABLE patient_split")
        .db(|| "dropping the patient split table".into())?;
    Ok(())
}

/// A split file: CSV with a `split` column and one id column: `subject_id` / `patient_id`
/// (a patient's documents follow it) or `hadm_id` / `doc_id` (one document).
pub(crate) fn assign_from_file(
    conn: &Connection,
    dataset: &str,
    path: &Path,
) -> Result<(), StoreError> {
    let header = crate::csv_input::read_header(path)?;
    let split_col =
        header
            .iter()
            .position(|h| h == "split")
            .ok_or_else(|| StoreError::MissingColumns {
                path: path.to_path_buf(),
                missing: "split".into(),
                found: header.join(", "),
            })?;
    let by_patient = header
        .iter()
        .position(|h| h == "subject_id" || h == "patient_id");
    let by_doc = header.iter().position(|h| h == "hadm_id" || h == "doc_id");
    let (id_col, per_patient) = match (by_doc, by_patient) {
        (Some(i), _) => (i, false),
        (None, Some(i)) => (i, true),
        (None, None) => {
            return Err(StoreError::MissingColumns {
                path: path.to_path_buf(),
                missing: "one of subject_id, patient_id, hadm_id, doc_id".into(),
                found: header.join(", "),
            })
        }
    };
    let text = fs_err::read_to_string(path)?;
    let mut assignment: HashMap<String, Split> = HashMap::new();
    for (i, line) in text.lines().enumerate().skip(1) {
        if line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line
            .split(',')
            .map(|f| f.trim().trim_matches('"'))
            .collect();
        let bad = |message: String| StoreError::InputLine {
            path: path.to_path_buf(),
            line: i as u64 + 1,
            message,
        };
        let id = fields
            .get(id_col)
            .ok_or_else(|| bad("missing id field".into()))?;
        let split: Split = fields
            .get(split_col)
            .ok_or_else(|| bad("missing split field".into()))?
            .parse()
            .map_err(|e: StoreError| bad(e.to_string()))?;
        assignment.insert((*id).to_string(), split);
    }
    if per_patient {
        write_patient_splits(
            conn,
            dataset,
            assignment.iter().map(|(p, s)| (p.as_str(), *s)),
        )
    } else {
        conn.execute("DELETE FROM splits WHERE dataset = ?", params![dataset])
            .db(|| "clearing splits".into())?;
        let mut appender = conn.appender("splits").db(|| "writing splits".into())?;
        for (doc, split) in &assignment {
            appender
                .append_row(params![dataset, doc, split.as_str()])
                .db(|| "writing splits".into())?;
        }
        appender.flush().db(|| "writing splits".into())?;
        drop(appender);
        // Ids of the file that are not documents of the dataset are dropped.
        conn.execute(
            "DELETE FROM splits s WHERE s.dataset = ? AND NOT EXISTS
             (SELECT 1 FROM documents d WHERE d.dataset = s.dataset AND d.doc_id = s.doc_id)",
            params![dataset],
        )
        .db(|| "checking split ids".into())?;
        Ok(())
    }
}

impl crate::Store {
    /// How many patients of a dataset have documents in more than one split: 0 for a
    /// patient-level split, where no patient's notes can leak from train into evaluation.
    /// Documents without a patient count as their own patient.
    pub fn patients_in_several_splits(&self, dataset: &str) -> Result<u64, StoreError> {
        self.dataset(dataset)?;
        self.count(
            "SELECT count(*) FROM (
                 SELECT coalesce(d.patient_id, d.doc_id) FROM documents d
                 JOIN splits s ON s.dataset = d.dataset AND s.doc_id = d.doc_id
                 WHERE d.dataset = ? GROUP BY 1 HAVING count(DISTINCT s.split) > 1)",
            dataset,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::DatasetKind;
    use crate::Store;

    #[test]
    fn a_patient_with_documents_in_two_splits_is_counted() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db.duckdb")).unwrap();
        store
            .in_transaction("test", |conn| {
                Store::reset_dataset(conn, "d", DatasetKind::MimicIv, "src", "{}")?;
                conn.execute_batch(
                    "INSERT INTO documents VALUES ('d', 'a1', 'p1', NULL, 'en', 10),
                        ('d', 'a2', 'p1', NULL, 'en', 10), ('d', 'b1', 'p2', NULL, 'en', 10),
                        ('d', 'c1', NULL, NULL, 'en', 10);",
                )
                .db(|| "test rows".into())?;
                assign_by_patient(conn, "d", 42, SplitRatios::default())
            })
            .unwrap();
        assert_eq!(store.patients_in_several_splits("d").unwrap(), 0);
        store
            .conn()
            .execute_batch(
                "UPDATE splits SET split = CASE WHEN doc_id = 'a1' THEN 'train' ELSE 'test' END
                 WHERE doc_id IN ('a1', 'a2')",
            )
            .unwrap();
        assert_eq!(store.patients_in_several_splits("d").unwrap(), 1);
        assert!(store.patients_in_several_splits("nope").is_err());
    }

    #[test]
    fn ranks_are_stable_and_seeded() {
        assert_eq!(seeded_rank(42, "10000032"), seeded_rank(42, "10000032"));
        assert_ne!(seeded_rank(42, "10000032"), seeded_rank(43, "10000032"));
        assert_ne!(seeded_rank(42, "10000032"), seeded_rank(42, "10000033"));
    }

    #[test]
    fn split_names_parse() {
        assert_eq!("dev".parse::<Split>().unwrap(), Split::Validation);
        assert_eq!("TRAIN".parse::<Split>().unwrap(), Split::Train);
        assert!("holdout".parse::<Split>().is_err());
    }
}
