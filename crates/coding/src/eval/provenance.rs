//! Where an evaluation's inputs came from, saved with its report so a score says what it is a
//! score of: the predictions file (path, sha256, the engines and models that wrote it), the
//! gold (database, dataset, split), the medcoder version, the time, and the code sets.

use std::io::Read;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::{CodingError, NotePrediction};

#[derive(Debug, Clone, Serialize)]
pub struct Provenance {
    pub predictions: PredictionSource,
    pub gold: GoldSource,
    /// The medcoder that scored them.
    pub medcoder_version: String,
    /// When, in UTC (RFC 3339).
    pub evaluated_at: String,
    /// The ICD code sets codes were checked against; `None` when they are not installed.
    pub code_sets: Option<CodeSetVersions>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PredictionSource {
    pub file: String,
    /// Of the file's bytes, hex.
    pub sha256: String,
    pub notes: usize,
    /// Every distinct `engine` of the predictions, sorted.
    pub engines: Vec<String>,
    /// Every distinct `model` of the predictions (the engine's settings and what it was
    /// fitted on), sorted.
    pub models: Vec<String>,
}

impl PredictionSource {
    /// The file `predictions` were read from, hashed.
    pub fn of_file(path: &Path, predictions: &[NotePrediction]) -> Result<Self, CodingError> {
        let distinct = |field: fn(&NotePrediction) -> &str| {
            let mut values: Vec<String> = predictions.iter().map(|p| field(p).into()).collect();
            values.sort();
            values.dedup();
            values
        };
        Ok(Self {
            file: path.display().to_string(),
            sha256: sha256_of_file(path)?,
            notes: predictions.len(),
            engines: distinct(|p| &p.engine),
            models: distinct(|p| &p.model),
        })
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct GoldSource {
    /// The prepared database or JSONL file.
    pub file: String,
    /// The dataset in the database.
    pub dataset: Option<String>,
    /// The split scored.
    pub split: Option<String>,
    /// The split whose codes count as seen in training.
    pub training_split: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CodeSetVersions {
    pub icd10_cm: String,
    pub icd10_pcs: String,
}

impl Provenance {
    /// The report's title: what was scored against what.
    pub fn title(&self) -> String {
        let gold = &self.gold;
        let what = match (&gold.dataset, &gold.split) {
            (Some(dataset), Some(split)) => format!(" ({dataset} {split})"),
            (Some(dataset), None) => format!(" ({dataset})"),
            _ => String::new(),
        };
        format!(
            "Evaluation of {} against {}{what}",
            self.predictions.file, gold.file
        )
    }
}

/// The sha256 of a file's bytes, hex.
pub fn sha256_of_file(path: &Path) -> Result<String, CodingError> {
    let mut file = fs_err::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// `time` in UTC as RFC 3339 to the second (`2026-04-01T09:30:00Z`).
pub fn utc_timestamp(time: SystemTime) -> String {
    let seconds = time
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let (days, of_day) = (seconds.div_euclid(86_400), seconds.rem_euclid(86_400));
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        of_day / 3600,
        of_day % 3600 / 60,
        of_day % 60
    )
}

/// The proleptic Gregorian date `days` after 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Duration;

    use super::*;

    #[test]
    fn timestamps_are_utc_rfc3339() {
        let at = |s: u64| utc_timestamp(UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(at(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(at(1_774_996_199), "2026-03-31T22:29:59Z");
    }

    #[test]
    fn the_file_hash_is_sha256_of_its_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.jsonl");
        std::fs::write(&path, "abc").unwrap();
        assert_eq!(
            sha256_of_file(&path).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let error = sha256_of_file(&dir.path().join("missing")).unwrap_err();
        assert!(error.to_string().contains("missing"), "{error}");
    }
}
