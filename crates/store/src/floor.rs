//! The floor that `medcoder bench prepare` measures the MIMIC import against: DuckDB's plain
//! `read_csv` of the same files into tables, with nothing else done.

use std::path::{Path, PathBuf};

use crate::db::sql_path;
use crate::error::DbContext;
use crate::{Store, StoreError};

/// Every `.csv` / `.csv.gz` file below `dir`, sorted.
pub fn csv_files(dir: &Path) -> Result<Vec<PathBuf>, StoreError> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(folder) = stack.pop() {
        for entry in fs_err::read_dir(&folder)? {
            let path = entry?.path();
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if path.is_dir() {
                stack.push(path);
            } else if name.ends_with(".csv") || name.ends_with(".csv.gz") {
                files.push(path);
            }
        }
    }
    files.sort();
    Ok(files)
}

/// `CREATE TABLE tN AS SELECT * FROM read_csv('<file>')` for each file; returns the rows read.
pub fn plain_read_csv(store: &Store, files: &[PathBuf]) -> Result<u64, StoreError> {
    let mut rows = 0u64;
    for (i, file) in files.iter().enumerate() {
        let sql = format!(
            "CREATE OR REPLACE TABLE floor_{i} AS SELECT * FROM read_csv({})",
            sql_path(file)
        );
        store
            .conn()
            .execute_batch(&sql)
            .map_err(|source| StoreError::Input {
                path: file.clone(),
                message: source.to_string(),
            })?;
        let n: i64 = store
            .conn()
            .query_row(&format!("SELECT count(*) FROM floor_{i}"), [], |r| r.get(0))
            .db(|| format!("counting {}", file.display()))?;
        rows += u64::try_from(n).unwrap_or(0);
    }
    Ok(rows)
}
