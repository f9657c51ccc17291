//! The database file: opening, schema, datasets.

use std::path::{Path, PathBuf};

use duckdb::{params, Connection};
use serde::Serialize;

use crate::error::DbContext;
use crate::StoreError;

/// 2: `evidence.spans_text_chars`.
const SCHEMA_VERSION: i64 = 2;

/// DuckDB's memory limit unless MEDCODER_DB_MEMORY sets another.
const DEFAULT_MEMORY_LIMIT: &str = "3GB";

/// The tables every corpus lands in, whatever its source format.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR NOT NULL);
CREATE TABLE IF NOT EXISTS datasets (
    name VARCHAR PRIMARY KEY,
    kind VARCHAR NOT NULL,
    source VARCHAR NOT NULL,
    options VARCHAR NOT NULL,
    imported_at TIMESTAMP NOT NULL DEFAULT current_timestamp
);
-- Where each raw source table was read from (reused only when the file is the same).
CREATE TABLE IF NOT EXISTS raw_sources (
    table_schema VARCHAR NOT NULL,
    table_name VARCHAR NOT NULL,
    file VARCHAR NOT NULL,
    bytes BIGINT NOT NULL,
    modified BIGINT NOT NULL
);
-- One row per unit that gets codes: a MIMIC admission, a CodiEsp case report.
CREATE TABLE IF NOT EXISTS documents (
    dataset VARCHAR NOT NULL,
    doc_id VARCHAR NOT NULL,
    patient_id VARCHAR,
    text VARCHAR,
    lang VARCHAR,
    icd_version INTEGER
);
-- Documents whose text stays in a raw note table instead of being copied (a MIMIC-IV admission
-- with one discharge note): `documents.text` is NULL and the text is that note's.
CREATE TABLE IF NOT EXISTS note_refs (
    dataset VARCHAR NOT NULL,
    doc_id VARCHAR NOT NULL,
    note_table VARCHAR NOT NULL,
    note_id VARCHAR NOT NULL
);
-- Gold codes in their order (MIMIC seq_num, CodiEsp file order); ICD-10 codes normalized
-- (E11.9, 0DTJ4ZZ), ICD-9 codes as given.
CREATE TABLE IF NOT EXISTS document_codes (
    dataset VARCHAR NOT NULL,
    doc_id VARCHAR NOT NULL,
    kind VARCHAR NOT NULL,
    seq INTEGER NOT NULL,
    code VARCHAR NOT NULL,
    icd_version INTEGER NOT NULL
);
-- Each distinct gold code checked once against the ICD knowledge base.
CREATE TABLE IF NOT EXISTS code_catalog (
    kind VARCHAR NOT NULL,
    icd_version INTEGER NOT NULL,
    code VARCHAR NOT NULL,
    status VARCHAR NOT NULL,
    description VARCHAR,
    PRIMARY KEY (kind, icd_version, code)
);
-- Text spans supporting a gold code (CodiEsp X files): offsets into the document text.
CREATE TABLE IF NOT EXISTS evidence (
    dataset VARCHAR NOT NULL,
    doc_id VARCHAR NOT NULL,
    kind VARCHAR NOT NULL,
    code VARCHAR NOT NULL,
    reference VARCHAR NOT NULL,
    spans VARCHAR NOT NULL,
    -- The language of the text the offsets point into (CodiEsp: the Spanish original).
    spans_lang VARCHAR NOT NULL,
    -- That text's length in characters (NULL when unknown), so that the spans can be placed
    -- approximately in a translation of it.
    spans_text_chars BIGINT
);
CREATE TABLE IF NOT EXISTS splits (
    dataset VARCHAR NOT NULL,
    doc_id VARCHAR NOT NULL,
    split VARCHAR NOT NULL
);
-- Tokenized training examples for one model: prompt and completion ids back to back
-- (little-endian u32), the prompt's length marking where the loss starts.
CREATE TABLE IF NOT EXISTS tokens (
    dataset VARCHAR NOT NULL,
    model VARCHAR NOT NULL,
    doc_id VARCHAR NOT NULL,
    chunk INTEGER NOT NULL,
    split VARCHAR,
    ids BLOB NOT NULL,
    prompt_len INTEGER NOT NULL,
    total_len INTEGER NOT NULL,
    truncation VARCHAR
);
-- How each (dataset, model) tokenization was made: the prompt template and options, as JSON.
CREATE TABLE IF NOT EXISTS token_runs (
    dataset VARCHAR NOT NULL,
    model VARCHAR NOT NULL,
    config VARCHAR NOT NULL,
    created_at TIMESTAMP NOT NULL DEFAULT current_timestamp
);
-- Instruction data: one conversation per example, as a JSON array of {role, content}.
CREATE TABLE IF NOT EXISTS conversations (
    dataset VARCHAR NOT NULL,
    example_id VARCHAR NOT NULL,
    messages VARCHAR NOT NULL
);
";

/// Raw note tables that documents may reference by `note_id` instead of copying their text.
pub(crate) const NOTE_TABLES: &[(&str, &str)] = &[("mimic_iv", "discharge")];

/// The per-dataset tables, cleared when a dataset is imported again.
pub(crate) const DATASET_TABLES: &[&str] = &[
    "documents",
    "note_refs",
    "document_codes",
    "evidence",
    "splits",
    "conversations",
    "tokens",
    "token_runs",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DatasetKind {
    MimicIv,
    MimicIii,
    Codiesp,
    Instructions,
}

impl DatasetKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MimicIv => "mimic-iv",
            Self::MimicIii => "mimic-iii",
            Self::Codiesp => "codiesp",
            Self::Instructions => "instructions",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        [
            Self::MimicIv,
            Self::MimicIii,
            Self::Codiesp,
            Self::Instructions,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Dataset {
    pub name: String,
    pub kind: DatasetKind,
    pub source: String,
    /// The import options, as JSON: how the dataset was made.
    pub options: String,
    pub imported_at: String,
}

/// An open medcoder database.
#[derive(Debug)]
pub struct Store {
    conn: Connection,
    path: PathBuf,
}

impl Store {
    /// Open (or create) the database file and bring its schema up to date.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs_err::create_dir_all(parent)?;
        }
        let conn = Connection::open(path).db(|| format!("opening database {}", path.display()))?;
        // DuckDB keeps to MEDCODER_DB_MEMORY (e.g. `8GB`), 3 GB by default, spilling to disk
        // past it: its own default (80% of RAM) lets a full MIMIC import cache gigabytes of
        // note text it will not read again.
        let limit = std::env::var("MEDCODER_DB_MEMORY")
            .ok()
            .filter(|l| !l.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_MEMORY_LIMIT.to_string());
        // Insertion order is kept: evidence and codes read back in file order.
        conn.execute_batch(&format!(
            "SET memory_limit = '{}';",
            limit.replace('\'', "")
        ))
        .db(|| format!("configuring {} (memory limit `{limit}`)", path.display()))?;
        let store = Self {
            conn,
            path: path.to_path_buf(),
        };
        store.migrate()?;
        Ok(store)
    }

    fn migrate(&self) -> Result<(), StoreError> {
        self.conn
            .execute_batch(SCHEMA)
            .db(|| format!("{}: creating the schema", self.path.display()))?;
        let version: Option<String> = self
            .conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'schema_version'",
                [],
                |r| r.get(0),
            )
            .ok();
        match version.and_then(|v| v.parse::<i64>().ok()) {
            Some(v) if v > SCHEMA_VERSION => {
                return Err(StoreError::Invalid(format!(
                    "{}: made by a newer medcoder (schema {v}, this one knows {SCHEMA_VERSION})",
                    self.path.display()
                )))
            }
            Some(SCHEMA_VERSION) => {}
            _ => {
                // Schema 1 → 2: the evidence's source text length (unknown for rows already
                // there: a re-import fills it).
                let ctx = || format!("{}: upgrading the schema", self.path.display());
                self.conn
                    .execute_batch(
                        "ALTER TABLE evidence ADD COLUMN IF NOT EXISTS spans_text_chars BIGINT",
                    )
                    .db(ctx)?;
                self.conn
                    .execute(
                        "INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)",
                        params![SCHEMA_VERSION.to_string()],
                    )
                    .db(ctx)?;
            }
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn conn(&self) -> &Connection {
        &self.conn
    }

    pub fn datasets(&self) -> Result<Vec<Dataset>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT name, kind, source, options, CAST(imported_at AS VARCHAR) FROM datasets ORDER BY name",
            )
            .db(|| "listing datasets".into())?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                ))
            })
            .db(|| "listing datasets".into())?;
        let mut datasets = Vec::new();
        for row in rows {
            let (name, kind, source, options, imported_at) =
                row.db(|| "listing datasets".into())?;
            let kind = DatasetKind::parse(&kind).ok_or_else(|| {
                StoreError::Invalid(format!("dataset `{name}` has an unknown kind `{kind}`"))
            })?;
            datasets.push(Dataset {
                name,
                kind,
                source,
                options,
                imported_at,
            });
        }
        Ok(datasets)
    }

    pub fn dataset(&self, name: &str) -> Result<Dataset, StoreError> {
        self.datasets()?
            .into_iter()
            .find(|d| d.name == name)
            .ok_or_else(|| StoreError::UnknownDataset(name.to_string()))
    }

    pub(crate) fn has_dataset(&self, name: &str) -> Result<bool, StoreError> {
        let n: i64 = self
            .conn
            .query_row(
                "SELECT count(*) FROM datasets WHERE name = ?",
                params![name],
                |r| r.get(0),
            )
            .db(|| "looking up a dataset".into())?;
        Ok(n > 0)
    }

    /// Before importing dataset `name`: `true` when it is already there, made with the same
    /// options (a re-run: nothing to do); an error when it was made with other options and
    /// `drop` is off; `false` to go ahead.
    pub(crate) fn already_imported(
        &self,
        name: &str,
        options_json: &str,
        drop: bool,
    ) -> Result<bool, StoreError> {
        if drop || !self.has_dataset(name)? {
            return Ok(false);
        }
        if self.dataset(name)?.options == options_json {
            tracing::info!(dataset = %name, "already imported with the same options; nothing to do");
            return Ok(true);
        }
        Err(StoreError::DatasetExists(name.to_string()))
    }

    /// Whether `schema.table` exists.
    pub(crate) fn table_exists(&self, schema: &str, table: &str) -> Result<bool, StoreError> {
        let n: i64 = self
            .conn
            .query_row(
                "SELECT count(*) FROM information_schema.tables WHERE table_schema = ? AND table_name = ?",
                params![schema, table],
                |r| r.get(0),
            )
            .db(|| format!("looking up table {schema}.{table}"))?;
        Ok(n > 0)
    }

    /// `(dataset, doc_id, text)` of every document that has text, whether stored in `documents`
    /// or referenced in a raw note table (see `note_refs`), as a subquery to select from.
    pub(crate) fn document_texts_sql(&self) -> Result<String, StoreError> {
        let mut sql =
            "SELECT dataset, doc_id, text FROM documents WHERE text IS NOT NULL".to_string();
        for (schema, table) in NOTE_TABLES {
            if self.table_exists(schema, table)? {
                sql.push_str(&format!(
                    " UNION ALL SELECT r.dataset, r.doc_id, n.text FROM note_refs r \
                     JOIN {schema}.{table} n ON n.note_id = r.note_id \
                     WHERE r.note_table = '{schema}.{table}'"
                ));
            }
        }
        Ok(format!("({sql})"))
    }

    /// Run `f` inside one transaction: everything it wrote is committed together or not at all.
    pub(crate) fn in_transaction<T>(
        &self,
        what: &str,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.conn
            .execute_batch("BEGIN TRANSACTION")
            .db(|| format!("{what}: begin"))?;
        match f(&self.conn) {
            Ok(value) => {
                self.conn
                    .execute_batch("COMMIT")
                    .db(|| format!("{what}: commit"))?;
                Ok(value)
            }
            Err(error) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                Err(error)
            }
        }
    }

    /// Inside a transaction: remove every row of a dataset and record it anew.
    pub(crate) fn reset_dataset(
        conn: &Connection,
        name: &str,
        kind: DatasetKind,
        source: &str,
        options: &str,
    ) -> Result<(), StoreError> {
        for table in DATASET_TABLES.iter().chain(&["datasets"]) {
            let column = if *table == "datasets" {
                "name"
            } else {
                "dataset"
            };
            conn.execute(
                &format!("DELETE FROM {table} WHERE {column} = ?"),
                params![name],
            )
            .db(|| format!("clearing dataset {name} from {table}"))?;
        }
        conn.execute(
            "INSERT INTO datasets (name, kind, source, options) VALUES (?, ?, ?, ?)",
            params![name, kind.as_str(), source, options],
        )
        .db(|| format!("recording dataset {name}"))?;
        Ok(())
    }

    /// A count query's single number.
    pub(crate) fn count(&self, sql: &str, dataset: &str) -> Result<u64, StoreError> {
        let n: i64 = self
            .conn
            .query_row(sql, params![dataset], |r| r.get(0))
            .db(|| format!("counting ({sql})"))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }
}

/// A path as an SQL string literal.
pub(crate) fn sql_path(path: &Path) -> String {
    format!("'{}'", path.to_string_lossy().replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opening_twice_keeps_the_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/medcoder.duckdb");
        let store = Store::open(&path).unwrap();
        assert!(store.datasets().unwrap().is_empty());
        drop(store);
        let store = Store::open(&path).unwrap();
        assert!(store.table_exists("main", "documents").unwrap());
    }

    #[test]
    fn a_schema_1_database_gains_the_evidence_text_length() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.duckdb");
        {
            let conn = Connection::open(&path).unwrap();
            let schema_1 = SCHEMA.replace(
                ",\n    -- That text's length in characters (NULL when unknown), so that the spans can be placed\n    -- approximately in a translation of it.\n    spans_text_chars BIGINT",
                "",
            );
            assert!(!schema_1.contains("spans_text_chars"));
            conn.execute_batch(&schema_1).unwrap();
            conn.execute_batch(
                "INSERT INTO meta VALUES ('schema_version', '1');
                 INSERT INTO evidence VALUES ('d', 'a', 'diagnosis', 'I10', 'x', '0 1', 'es');",
            )
            .unwrap();
        }
        let store = Store::open(&path).unwrap();
        let (chars, version): (Option<i64>, String) = store
            .conn
            .query_row(
                "SELECT e.spans_text_chars, m.value FROM evidence e, meta m
                 WHERE m.key = 'schema_version'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!((chars, version.as_str()), (None, "2"));
    }

    #[test]
    fn a_failed_transaction_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db.duckdb")).unwrap();
        let result: Result<(), StoreError> = store.in_transaction("test", |conn| {
            Store::reset_dataset(conn, "x", DatasetKind::Codiesp, "src", "{}")?;
            Err(StoreError::Invalid("boom".into()))
        });
        assert!(result.is_err());
        assert!(!store.has_dataset("x").unwrap());
    }
}
