//! MIMIC-III and MIMIC-IV (PhysioNet layout, CSV or CSV.GZ) into DuckDB with DuckDB's own CSV
//! reader: the raw tables coding needs, one fact row per admission, gold codes, splits.

use std::path::{Path, PathBuf};

use duckdb::{params, Connection};
use serde::{Deserialize, Serialize};

use crate::csv_input::{csv_error, locate, require_columns};
use crate::db::{sql_path, DatasetKind};
use crate::error::DbContext;
use crate::splits::{assign_by_patient, assign_from_file, seeded_rank, SplitRatios};
use crate::{ImportReport, Store, StoreError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MimicVersion {
    Iv,
    Iii,
}

impl MimicVersion {
    fn schema(self) -> &'static str {
        match self {
            Self::Iv => "mimic_iv",
            Self::Iii => "mimic_iii",
        }
    }

    fn kind(self) -> DatasetKind {
        match self {
            Self::Iv => DatasetKind::MimicIv,
            Self::Iii => DatasetKind::MimicIii,
        }
    }

    fn tables(self) -> &'static [RawTable] {
        match self {
            Self::Iv => IV_TABLES,
            Self::Iii => III_TABLES,
        }
    }
}

/// Admissions coded in ICD-9 (MIMIC-III, and MIMIC-IV before October 2015).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IcdNineHandling {
    /// Import them, flagged `icd_version = 9`, apart from the ICD-10 documents.
    Keep,
    /// Leave them out of the dataset (the raw tables still hold them).
    Drop,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MimicOptions {
    pub src: PathBuf,
    pub version: MimicVersion,
    /// Dataset name; `mimic-iv` / `mimic-iii` by default.
    pub name: Option<String>,
    /// Import again even if the raw tables or the dataset exist.
    pub drop: bool,
    /// Keep this many patients, those with discharge notes first, chosen by `seed`.
    pub patient_limit: Option<u64>,
    pub seed: u64,
    pub ratios: SplitRatios,
    /// A split file that overrides the seeded patient split.
    pub split_file: Option<PathBuf>,
    pub icd9: IcdNineHandling,
}

/// A source table: the file stem under the source folder, the columns we rely on with their
/// types (every other column is read as text), and whether it may be absent.
struct RawTable {
    table: &'static str,
    file: &'static str,
    columns: &'static [(&'static str, &'static str)],
    optional: bool,
}

const IV_TABLES: &[RawTable] = &[
    RawTable {
        table: "patients",
        file: "hosp/patients",
        columns: &[
            ("subject_id", "BIGINT"),
            ("gender", "VARCHAR"),
            ("anchor_age", "INTEGER"),
        ],
        optional: false,
    },
    RawTable {
        table: "admissions",
        file: "hosp/admissions",
        columns: &[
            ("subject_id", "BIGINT"),
            ("hadm_id", "BIGINT"),
            ("admittime", "TIMESTAMP"),
            ("dischtime", "TIMESTAMP"),
        ],
        optional: false,
    },
    RawTable {
        table: "diagnoses_icd",
        file: "hosp/diagnoses_icd",
        columns: &[
            ("subject_id", "BIGINT"),
            ("hadm_id", "BIGINT"),
            ("seq_num", "INTEGER"),
            ("icd_code", "VARCHAR"),
            ("icd_version", "INTEGER"),
        ],
        optional: false,
    },
    RawTable {
        table: "procedures_icd",
        file: "hosp/procedures_icd",
        columns: &[
            ("subject_id", "BIGINT"),
            ("hadm_id", "BIGINT"),
            ("seq_num", "INTEGER"),
            ("icd_code", "VARCHAR"),
            ("icd_version", "INTEGER"),
        ],
        optional: false,
    },
    RawTable {
        table: "d_icd_diagnoses",
        file: "hosp/d_icd_diagnoses",
        columns: &[
            ("icd_code", "VARCHAR"),
            ("icd_version", "INTEGER"),
            ("long_title", "VARCHAR"),
        ],
        optional: false,
    },
    RawTable {
        table: "d_icd_procedures",
        file: "hosp/d_icd_procedures",
        columns: &[
            ("icd_code", "VARCHAR"),
            ("icd_version", "INTEGER"),
            ("long_title", "VARCHAR"),
        ],
        optional: false,
    },
    RawTable {
        table: "discharge",
        file: "note/discharge",
        columns: &[
            ("note_id", "VARCHAR"),
            ("subject_id", "BIGINT"),
            ("hadm_id", "BIGINT"),
            ("note_seq", "INTEGER"),
            ("text", "VARCHAR"),
        ],
        optional: true,
    },
    RawTable {
        table: "radiology",
        file: "note/radiology",
        columns: &[
            ("note_id", "VARCHAR"),
            ("subject_id", "BIGINT"),
            ("hadm_id", "BIGINT"),
            ("text", "VARCHAR"),
        ],
        optional: true,
    },
];

const III_TABLES: &[RawTable] = &[
    RawTable {
        table: "patients",
        file: "PATIENTS",
        columns: &[("subject_id", "BIGINT"), ("gender", "VARCHAR")],
        optional: false,
    },
    RawTable {
        table: "admissions",
        file: "ADMISSIONS",
        columns: &[
            ("subject_id", "BIGINT"),
            ("hadm_id", "BIGINT"),
            ("admittime", "TIMESTAMP"),
            ("dischtime", "TIMESTAMP"),
        ],
        optional: false,
    },
    RawTable {
        table: "diagnoses_icd",
        file: "DIAGNOSES_ICD",
        columns: &[
            ("subject_id", "BIGINT"),
            ("hadm_id", "BIGINT"),
            ("seq_num", "INTEGER"),
            ("icd9_code", "VARCHAR"),
        ],
        optional: false,
    },
    RawTable {
        table: "procedures_icd",
        file: "PROCEDURES_ICD",
        columns: &[
            ("subject_id", "BIGINT"),
            ("hadm_id", "BIGINT"),
            ("seq_num", "INTEGER"),
            ("icd9_code", "VARCHAR"),
        ],
        optional: false,
    },
    RawTable {
        table: "d_icd_diagnoses",
        file: "D_ICD_DIAGNOSES",
        columns: &[("icd9_code", "VARCHAR"), ("long_title", "VARCHAR")],
        optional: false,
    },
    RawTable {
        table: "d_icd_procedures",
        file: "D_ICD_PROCEDURES",
        columns: &[("icd9_code", "VARCHAR"), ("long_title", "VARCHAR")],
        optional: false,
    },
    RawTable {
        table: "noteevents",
        file: "NOTEEVENTS",
        columns: &[
            ("subject_id", "BIGINT"),
            ("hadm_id", "BIGINT"),
            ("category", "VARCHAR"),
            ("text", "VARCHAR"),
        ],
        optional: true,
    },
];

/// Import a MIMIC release folder into `store` as one dataset.
pub fn import_mimic(store: &Store, options: &MimicOptions) -> Result<ImportReport, StoreError> {
    let version = options.version;
    let schema = version.schema();
    let name = options
        .name
        .clone()
        .unwrap_or_else(|| version.kind().as_str().to_string());
    let options_json =
        serde_json::to_string(options).map_err(|e| StoreError::Invalid(e.to_string()))?;
    if !options.src.is_dir() {
        return Err(StoreError::MissingFile {
            path: options.src.clone(),
            hint: " (expected a MIMIC release folder)".into(),
        });
    }
    if store.already_imported(&name, &options_json, options.drop)? {
        return crate::stats::import_report(store, &name, Vec::new(), Vec::new());
    }

    // Check every file before reading any, so that a bad release fails before it writes.
    let mut sources = Vec::new();
    for table in version.tables() {
        match locate(&options.src, table.file) {
            Some(path) => {
                let required: Vec<&str> = table.columns.iter().map(|(c, _)| *c).collect();
                let header = require_columns(&path, &required)?;
                sources.push((table, Some((path, header))));
            }
            None if table.optional => sources.push((table, None)),
            None => {
                return Err(StoreError::MissingFile {
                    path: options.src.join(format!("{}.csv.gz", table.file)),
                    hint: format!(
                        " (nor {}.csv): is this a MIMIC-{version:?} folder?",
                        table.file
                    ),
                })
            }
        }
    }

    store
        .conn()
        .execute_batch(&format!("CREATE SCHEMA IF NOT EXISTS {schema}"))
        .db(|| format!("creating schema {schema}"))?;
    let mut imported = Vec::new();
    let mut skipped = Vec::new();
    for (table, source) in &sources {
        let Some((path, header)) = source else {
            tracing::info!(table = table.table, "optional table absent: {}", table.file);
            continue;
        };
        if store.table_exists(schema, table.table)? && !options.drop {
            check_same_source(store, schema, table.table, path)?;
            skipped.push(table.table.to_string());
            continue;
        }
        let rows = import_raw_table(store, schema, table, path, header)?;
        imported.push((table.table.to_string(), rows));
    }
    // The limit applies to this dataset only: the raw tables stay whole, so that a dataset
    // made later from the same tables (another name, no limit) gets every patient, and the
    // limit holds when the raw tables were imported by an earlier run.
    let kept = match options.patient_limit {
        Some(limit) => Some(kept_patients(store, version, limit, options.seed)?),
        None => None,
    };

    store.in_transaction(&format!("building dataset {name}"), |conn| {
        Store::reset_dataset(
            conn,
            &name,
            version.kind(),
            &options.src.to_string_lossy(),
            &options_json,
        )?;
        build_facts(store, conn, version)?;
        if let Some(kept) = &kept {
            write_kept_patients(conn, kept)?;
        }
        let notes = notes_select(store, version)?;
        fill_dataset(conn, &name, schema, &notes, options.icd9, kept.is_some())?;
        if kept.is_some() {
            conn.execute_batch("DROP TABLE kept_patients")
                .db(|| "limiting patients".into())?;
        }
        match &options.split_file {
            Some(file) => assign_from_file(conn, &name, file)?,
            None => assign_by_patient(conn, &name, options.seed, options.ratios)?,
        }
        Ok(())
    })?;
    crate::stats::import_report(store, &name, imported, skipped)
}

/// A file's size and modification time (seconds), to tell whether a raw table came from it.
fn file_identity(path: &Path) -> Result<(i64, i64), StoreError> {
    let meta = fs_err::metadata(path)?;
    let modified = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs() as i64);
    Ok((meta.len() as i64, modified))
}

/// A raw table already in the database is reused only if it was read from this very file.
fn check_same_source(
    store: &Store,
    schema: &str,
    table: &str,
    path: &Path,
) -> Result<(), StoreError> {
    let recorded: Option<(String, i64, i64)> = store
        .conn()
        .query_row(
            "SELECT file, bytes, modified FROM raw_sources WHERE table_schema = ? AND table_name = ?",
            params![schema, table],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .ok();
    let (bytes, modified) = file_identity(path)?;
    let here = path.to_string_lossy();
    match recorded {
        Some((file, b, m)) if file == here && b == bytes && m == modified => Ok(()),
        Some((file, ..)) => Err(StoreError::Invalid(format!(
            "{schema}.{table} was imported from {file}, not from {here} as it is now: pass --drop to import it again"
        ))),
        None => Err(StoreError::Invalid(format!(
            "{schema}.{table} exists but its source file is not recorded: pass --drop to import it again"
        ))),
    }
}

/// One raw table, in its own transaction: `CREATE TABLE … AS SELECT … FROM read_csv(…)` with
/// the columns we rely on typed and every other column kept as text.
fn import_raw_table(
    store: &Store,
    schema: &str,
    table: &RawTable,
    path: &Path,
    header: &[String],
) -> Result<u64, StoreError> {
    let columns: Vec<String> = header
        .iter()
        .map(|h| {
            let ty = table
                .columns
                .iter()
                .find(|(c, _)| c == h)
                .map_or("VARCHAR", |(_, t)| *t);
            format!("'{}': '{ty}'", h.replace('\'', "''"))
        })
        .collect();
    let sql = format!(
        "CREATE OR REPLACE TABLE {schema}.{name} AS SELECT * FROM read_csv({file}, header = true, \
         delim = ',', quote = '\"', escape = '\"', max_line_size = 4194304, buffer_size = 16777216, \
         columns = {{{columns}}})",
        name = table.table,
        file = sql_path(path),
        columns = columns.join(", "),
    );
    tracing::info!(table = table.table, file = %path.display(), "importing");
    store.in_transaction(&format!("importing {}", path.display()), |conn| {
        conn.execute_batch(&sql)
            .map_err(|source| csv_error(path, &source.to_string()))?;
        let (bytes, modified) = file_identity(path)?;
        conn.execute(
            "DELETE FROM raw_sources WHERE table_schema = ? AND table_name = ?",
            params![schema, table.table],
        )
        .db(|| "recording the source file".into())?;
        conn.execute(
            "INSERT INTO raw_sources VALUES (?, ?, ?, ?, ?)",
            params![schema, table.table, path.to_string_lossy(), bytes, modified],
        )
        .db(|| "recording the source file".into())?;
        let rows: i64 = conn
            .query_row(
                &format!("SELECT count(*) FROM {schema}.{}", table.table),
                [],
                |r| r.get(0),
            )
            .db(|| format!("counting {schema}.{}", table.table))?;
        Ok(u64::try_from(rows).unwrap_or(0))
    })
}

/// The `limit` patients to keep: those with a discharge note first, then by seeded rank.
fn kept_patients(
    store: &Store,
    version: MimicVersion,
    limit: u64,
    seed: u64,
) -> Result<Vec<i64>, StoreError> {
    let schema = version.schema();
    let notes = notes_select(store, version)?;
    let conn = store.conn();
    let mut stmt = conn
        .prepare(&format!(
            "SELECT CAST(p.subject_id AS VARCHAR), p.subject_id IN (SELECT subject_id FROM ({notes})) \
             FROM {schema}.patients p"
        ))
        .db(|| "listing patients".into())?;
    let mut patients: Vec<(bool, u64, String)> = stmt
        .query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, Option<bool>>(1)?))
        })
        .db(|| "listing patients".into())?
        .map(|row| {
            row.map(|(id, has_note)| (!has_note.unwrap_or(false), seeded_rank(seed, &id), id))
        })
        .collect::<Result<_, _>>()
        .db(|| "listing patients".into())?;
    patients.sort_unstable();
    patients.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    patients
        .into_iter()
        .map(|(_, _, id)| {
            id.parse()
                .map_err(|_| StoreError::Invalid(format!("subject_id `{id}` is not a number")))
        })
        .collect()
}

/// `kept_patients`, a temporary table of the patients a limited dataset keeps.
fn write_kept_patients(conn: &Connection, kept: &[i64]) -> Result<(), StoreError> {
    conn.execute_batch("CREATE OR REPLACE TEMP TABLE kept_patients (subject_id BIGINT)")
        .db(|| "limiting patients".into())?;
    let mut appender = conn
        .appender("kept_patients")
        .db(|| "limiting patients".into())?;
    for id in kept {
        appender
            .append_row(params![id])
            .db(|| "limiting patients".into())?;
    }
    appender.flush().db(|| "limiting patients".into())
}

/// The discharge notes as `(subject_id, hadm_id, text, ord)`; empty when the release has none.
fn notes_select(store: &Store, version: MimicVersion) -> Result<String, StoreError> {
    let schema = version.schema();
    Ok(match version {
        MimicVersion::Iv if store.table_exists(schema, "discharge")? => format!(
            "SELECT subject_id, hadm_id, text, coalesce(note_seq, 0) AS ord, note_id AS tie FROM {schema}.discharge"
        ),
        MimicVersion::Iii if store.table_exists(schema, "noteevents")? => format!(
            "SELECT subject_id, hadm_id, text, 0 AS ord, CAST(row_number() OVER () AS VARCHAR) AS tie \
             FROM {schema}.noteevents WHERE lower(category) = 'discharge summary'"
        ),
        _ => "SELECT NULL::BIGINT AS subject_id, NULL::BIGINT AS hadm_id, NULL::VARCHAR AS text, \
              0 AS ord, NULL::VARCHAR AS tie WHERE false"
            .to_string(),
    })
}

/// `{schema}.admission_facts`: one row per admission with its note text, ordered diagnosis and
/// procedure codes (by seq_num) and ICD version. A view over the raw tables: the note text is
/// stored once (in `documents`), not copied into a second table.
fn build_facts(store: &Store, conn: &Connection, version: MimicVersion) -> Result<(), StoreError> {
    let schema = version.schema();
    let notes = notes_select(store, version)?;
    let (code, icd_version) = match version {
        MimicVersion::Iv => ("icd_code", "icd_version"),
        MimicVersion::Iii => ("icd9_code", "9"),
    };
    let sql = format!(
        "CREATE OR REPLACE VIEW {schema}.admission_facts AS
         WITH dx AS (SELECT hadm_id, list(trim({code}) ORDER BY seq_num) AS codes, min({icd_version}) AS v
                     FROM {schema}.diagnoses_icd GROUP BY hadm_id),
              px AS (SELECT hadm_id, list(trim({code}) ORDER BY seq_num) AS codes, min({icd_version}) AS v
                     FROM {schema}.procedures_icd GROUP BY hadm_id),
              notes AS (SELECT hadm_id, string_agg(text, chr(10) || chr(10) ORDER BY ord, tie) AS text
                        FROM ({notes}) WHERE hadm_id IS NOT NULL GROUP BY hadm_id)
         SELECT a.subject_id, a.hadm_id, notes.text AS note_text, coalesce(dx.v, px.v) AS icd_version,
                coalesce(dx.codes, []) AS diagnosis_codes, coalesce(px.codes, []) AS procedure_codes
         FROM {schema}.admissions a
         LEFT JOIN dx USING (hadm_id) LEFT JOIN px USING (hadm_id) LEFT JOIN notes USING (hadm_id)"
    );
    // Databases made before the facts became a view hold a table of that name.
    let is_table: bool = conn
        .query_row(
            "SELECT count(*) > 0 FROM information_schema.tables
             WHERE table_schema = ? AND table_name = 'admission_facts' AND table_type = 'BASE TABLE'",
            params![schema],
            |r| r.get(0),
        )
        .db(|| format!("looking up {schema}.admission_facts"))?;
    if is_table {
        conn.execute_batch(&format!("DROP TABLE {schema}.admission_facts"))
            .db(|| format!("replacing {schema}.admission_facts"))?;
    }
    conn.execute_batch(&sql)
        .db(|| format!("building {schema}.admission_facts"))
}

/// The dataset's documents (one per admission) and gold codes, ICD-10 codes normalized.
fn fill_dataset(
    conn: &Connection,
    name: &str,
    schema: &str,
    notes: &str,
    icd9: IcdNineHandling,
    limited: bool,
) -> Result<(), StoreError> {
    let mut keep = match icd9 {
        IcdNineHandling::Keep => "true",
        IcdNineHandling::Drop => "coalesce(icd_version, 10) = 10",
    }
    .to_string();
    if limited {
        keep.push_str(" AND subject_id IN (SELECT subject_id FROM kept_patients)");
    }
    let (code, icd_version) = if schema == MimicVersion::Iii.schema() {
        ("icd9_code", "9")
    } else {
        ("icd_code", "icd_version")
    };
    // The admissions the dataset keeps, and how many discharge notes each has (no text read).
    conn.execute_batch(&format!(
        "CREATE OR REPLACE TEMP TABLE admitted AS
         WITH versions AS (SELECT hadm_id, min(v) AS icd_version FROM (
                             SELECT hadm_id, {icd_version} AS v FROM {schema}.diagnoses_icd
                             UNION ALL SELECT hadm_id, {icd_version} AS v FROM {schema}.procedures_icd)
                           GROUP BY hadm_id)
         SELECT * FROM (SELECT a.hadm_id, a.subject_id, versions.icd_version
                        FROM {schema}.admissions a LEFT JOIN versions USING (hadm_id))
         WHERE {keep};
         CREATE OR REPLACE TEMP TABLE note_counts AS
         SELECT hadm_id, count(*) AS k, any_value(tie) AS note_id
         FROM ({notes}) WHERE hadm_id IS NOT NULL GROUP BY hadm_id;"
    ))
    .db(|| format!("counting the notes of {name}"))?;
    let document = "?, CAST(a.hadm_id AS VARCHAR), CAST(a.subject_id AS VARCHAR)";
    let ctx = || format!("filling documents of {name}");
    if schema == MimicVersion::Iv.schema() {
        // Most admissions have one discharge note: the document refers to it instead of
        // copying its text (gigabytes on a full release).
        conn.execute(
            &format!(
                "INSERT INTO documents SELECT {document}, NULL, 'en', a.icd_version
                 FROM admitted a JOIN note_counts c USING (hadm_id) WHERE c.k = 1"
            ),
            params![name],
        )
        .db(ctx)?;
        conn.execute(
            "INSERT INTO note_refs SELECT ?, CAST(a.hadm_id AS VARCHAR), 'mimic_iv.discharge', c.note_id
             FROM admitted a JOIN note_counts c USING (hadm_id) WHERE c.k = 1",
            params![name],
        )
        .db(ctx)?;
    } else {
        conn.execute(
            &format!(
                "INSERT INTO documents SELECT {document}, n.text, 'en', a.icd_version
                 FROM ({notes}) n JOIN admitted a USING (hadm_id)
                 WHERE hadm_id IN (SELECT hadm_id FROM note_counts WHERE k = 1)"
            ),
            params![name],
        )
        .db(ctx)?;
    }
    // The few admissions with several notes get them joined, in order.
    conn.execute(
        &format!(
            "INSERT INTO documents
             WITH multi AS (SELECT hadm_id, string_agg(text, chr(10) || chr(10) ORDER BY ord, tie) AS text
                            FROM ({notes}) WHERE hadm_id IN (SELECT hadm_id FROM note_counts WHERE k > 1)
                            GROUP BY hadm_id)
             SELECT {document}, multi.text, 'en', a.icd_version FROM multi JOIN admitted a USING (hadm_id)"
        ),
        params![name],
    )
    .db(ctx)?;
    conn.execute(
        &format!(
            "INSERT INTO documents SELECT {document}, NULL, 'en', a.icd_version FROM admitted a
             WHERE hadm_id NOT IN (SELECT hadm_id FROM note_counts)"
        ),
        params![name],
    )
    .db(ctx)?;
    conn.execute_batch("DROP TABLE admitted; DROP TABLE note_counts")
        .db(ctx)?;
    for (kind, table) in [
        ("diagnosis", "diagnoses_icd"),
        ("procedure", "procedures_icd"),
    ] {
        // ICD-10-CM gets its dot after the category; ICD-10-PCS and ICD-9 stay as given.
        let normalized = if kind == "diagnosis" {
            "CASE WHEN v = 10 AND length(c) > 3 THEN upper(substr(c, 1, 3)) || '.' || upper(substr(c, 4)) \
             WHEN v = 10 THEN upper(c) ELSE c END"
        } else {
            "CASE WHEN v = 10 THEN upper(c) ELSE c END"
        };
        conn.execute(
            &format!(
                "INSERT INTO document_codes
                 SELECT ?, doc_id, '{kind}', seq_num, {normalized}, v
                 FROM (SELECT CAST(hadm_id AS VARCHAR) AS doc_id, seq_num, trim({code}) AS c, {icd_version} AS v
                       FROM {schema}.{table})
                 WHERE c IS NOT NULL AND c <> ''
                   AND doc_id IN (SELECT doc_id FROM documents WHERE dataset = ?)"
            ),
            params![name, name],
        )
        .db(|| format!("filling {kind} codes of {name}"))?;
    }
    Ok(())
}
