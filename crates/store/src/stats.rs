//! What a database holds: `medcoder db stats`.

use duckdb::params;
use serde::Serialize;

use crate::error::DbContext;
use crate::{ImportReport, Store, StoreError};

#[derive(Debug, Clone, Serialize)]
pub struct NoteLength {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct DatasetStats {
    pub name: String,
    pub kind: String,
    pub source: String,
    pub imported_at: String,
    pub documents: u64,
    pub documents_with_text: u64,
    pub patients: u64,
    pub diagnosis_codes: u64,
    pub procedure_codes: u64,
    pub distinct_diagnosis_codes: u64,
    pub distinct_procedure_codes: u64,
    pub icd_versions: Vec<(String, u64)>,
    pub code_status: Vec<(String, u64)>,
    pub splits: Vec<(String, u64)>,
    pub conversations: u64,
    /// Evidence spans (CodiEsp X rows).
    pub evidence: u64,
    /// Characters per document text.
    pub note_chars: Option<NoteLength>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DatabaseStats {
    pub path: String,
    pub datasets: Vec<DatasetStats>,
}

impl Store {
    pub fn stats(&self) -> Result<DatabaseStats, StoreError> {
        let datasets = self
            .datasets()?
            .into_iter()
            .map(|d| self.dataset_stats(&d.name))
            .collect::<Result<_, _>>()?;
        Ok(DatabaseStats {
            path: self.path().display().to_string(),
            datasets,
        })
    }

    fn grouped(&self, sql: &str, dataset: &str) -> Result<Vec<(String, u64)>, StoreError> {
        let mut stmt = self.conn().prepare(sql).db(|| format!("({sql})"))?;
        let rows = stmt
            .query_map(params![dataset], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
            })
            .db(|| format!("({sql})"))?;
        rows.map(|row| row.map(|(k, n)| (k, u64::try_from(n).unwrap_or(0))))
            .collect::<Result<_, _>>()
            .db(|| format!("({sql})"))
    }

    pub fn dataset_stats(&self, name: &str) -> Result<DatasetStats, StoreError> {
        let dataset = self.dataset(name)?;
        let count = |sql: &str| self.count(sql, name);
        let texts = self.document_texts_sql()?;
        let codes = |kind: &str, distinct: bool| {
            let what = if distinct {
                "count(DISTINCT code)"
            } else {
                "count(*)"
            };
            count(&format!(
                "SELECT {what} FROM document_codes WHERE dataset = ? AND kind = '{kind}'"
            ))
        };
        let note_chars = self
            .conn()
            .query_row(
                &format!(
                    "SELECT quantile_cont(length(text), 0.5), quantile_cont(length(text), 0.9),
                            quantile_cont(length(text), 0.99), max(length(text))
                     FROM {texts} t WHERE dataset = ?"
                ),
                params![name],
                |r| {
                    Ok((
                        r.get::<_, Option<f64>>(0)?,
                        r.get::<_, Option<f64>>(1)?,
                        r.get::<_, Option<f64>>(2)?,
                        r.get::<_, Option<i64>>(3)?,
                    ))
                },
            )
            .db(|| "note length percentiles".into())?;
        let note_chars = match note_chars {
            (Some(p50), Some(p90), Some(p99), Some(max)) => Some(NoteLength {
                p50,
                p90,
                p99,
                max: u64::try_from(max).unwrap_or(0),
            }),
            _ => None,
        };
        Ok(DatasetStats {
            name: dataset.name.clone(),
            kind: dataset.kind.as_str().to_string(),
            source: dataset.source,
            imported_at: dataset.imported_at,
            documents: count("SELECT count(*) FROM documents WHERE dataset = ?")?,
            documents_with_text: count(&format!(
                "SELECT count(*) FROM {texts} t WHERE dataset = ? AND text <> ''"
            ))?,
            patients: count(
                "SELECT count(DISTINCT coalesce(patient_id, doc_id)) FROM documents WHERE dataset = ?",
            )?,
            diagnosis_codes: codes("diagnosis", false)?,
            procedure_codes: codes("procedure", false)?,
            distinct_diagnosis_codes: codes("diagnosis", true)?,
            distinct_procedure_codes: codes("procedure", true)?,
            icd_versions: self.grouped(
                "SELECT coalesce(CAST(icd_version AS VARCHAR), 'none'), count(*) FROM documents
                 WHERE dataset = ? GROUP BY 1 ORDER BY 1",
                name,
            )?,
            code_status: self.grouped(
                "SELECT coalesce(k.status, 'unchecked'), count(*) FROM document_codes c
                 LEFT JOIN code_catalog k USING (kind, icd_version, code)
                 WHERE c.dataset = ? GROUP BY 1 ORDER BY 2 DESC",
                name,
            )?,
            splits: self.grouped(
                "SELECT split, count(*) FROM splits WHERE dataset = ? GROUP BY 1 ORDER BY 1",
                name,
            )?,
            conversations: count("SELECT count(*) FROM conversations WHERE dataset = ?")?,
            evidence: count("SELECT count(*) FROM evidence WHERE dataset = ?")?,
            note_chars,
        })
    }
}

pub(crate) fn import_report(
    store: &Store,
    name: &str,
    tables_imported: Vec<(String, u64)>,
    tables_skipped: Vec<String>,
) -> Result<ImportReport, StoreError> {
    let stats = store.dataset_stats(name)?;
    let in_splits: u64 = stats.splits.iter().map(|(_, n)| n).sum();
    let mut notes = Vec::new();
    let units = stats.documents.max(stats.conversations);
    if in_splits < units {
        notes.push(format!(
            "{} of {units} documents have no split (absent from the split file)",
            units - in_splits
        ));
    }
    Ok(ImportReport {
        dataset: name.to_string(),
        tables_imported,
        tables_skipped,
        documents: stats.documents,
        documents_with_text: stats.documents_with_text,
        diagnosis_codes: stats.diagnosis_codes,
        procedure_codes: stats.procedure_codes,
        code_status: stats.code_status,
        splits: stats.splits,
        notes,
    })
}
