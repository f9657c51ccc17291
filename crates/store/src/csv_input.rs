//! Input CSV files (plain or gzipped): finding them, and checking their header before DuckDB
//! reads them, so that a wrong file is reported by name and column, not by a parser error.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use crate::StoreError;

/// `<dir>/<stem>.csv.gz` or `<dir>/<stem>.csv`, whichever exists.
pub(crate) fn locate(dir: &Path, stem: &str) -> Option<PathBuf> {
    ["csv.gz", "csv"]
        .iter()
        .map(|ext| dir.join(format!("{stem}.{ext}")))
        .find(|p| p.is_file())
}

fn is_gzip(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "gz")
}

/// The first line of a CSV file, split into lower-case column names.
pub(crate) fn read_header(path: &Path) -> Result<Vec<String>, StoreError> {
    let file = fs_err::File::open(path)?;
    let reader: Box<dyn Read> = if is_gzip(path) {
        Box::new(flate2::read::MultiGzDecoder::new(file))
    } else {
        Box::new(file)
    };
    let mut line = String::new();
    BufReader::new(reader)
        .read_line(&mut line)
        .map_err(|e| StoreError::Input {
            path: path.to_path_buf(),
            message: if is_gzip(path) {
                format!("cannot read it as gzip: {e}")
            } else {
                format!("cannot read it: {e}")
            },
        })?;
    if line.trim().is_empty() {
        return Err(StoreError::Input {
            path: path.to_path_buf(),
            message: "empty file: expected a header line".into(),
        });
    }
    Ok(line
        .trim_end_matches(['\r', '\n'])
        .split(',')
        .map(|c| c.trim().trim_matches('"').to_ascii_lowercase())
        .collect())
}

/// Fail naming the file and the missing columns.
pub(crate) fn require_columns(path: &Path, required: &[&str]) -> Result<Vec<String>, StoreError> {
    let header = read_header(path)?;
    let missing: Vec<&str> = required
        .iter()
        .copied()
        .filter(|c| !header.iter().any(|h| h == c))
        .collect();
    if missing.is_empty() {
        Ok(header)
    } else {
        Err(StoreError::MissingColumns {
            path: path.to_path_buf(),
            missing: missing.join(", "),
            found: header.join(", "),
        })
    }
}

/// A DuckDB CSV error as the user should see it: the file, the line, what was wrong. The rest
/// of DuckDB's message is left out: it repeats the offending row ("Original Line"), which can
/// be note text, and clinical text never goes into logs or error messages.
pub(crate) fn csv_error(path: &Path, message: &str) -> StoreError {
    let line = message.find("Line: ").and_then(|at| {
        message[at + 6..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse::<u64>()
            .ok()
    });
    let detail = message
        .lines()
        .map(str::trim)
        .find(|l| {
            l.starts_with("Error when converting column")
                || l.starts_with("Expected Number of Columns")
        })
        .map(str::to_string)
        .unwrap_or_else(|| {
            let first = message.lines().next().unwrap_or_default();
            first
                .split("Original Line")
                .next()
                .unwrap_or_default()
                .trim()
                .to_string()
        });
    match line {
        Some(line) => StoreError::InputLine {
            path: path.to_path_buf(),
            line,
            message: detail,
        },
        None => StoreError::Input {
            path: path.to_path_buf(),
            message: detail,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn gzipped_header_is_read_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("patients.csv.gz");
        let mut gz = flate2::write::GzEncoder::new(
            std::fs::File::create(&path).unwrap(),
            flate2::Compression::fast(),
        );
        gz.write_all(b"Subject_ID,gender\n1,F\n").unwrap();
        gz.finish().unwrap();
        assert_eq!(locate(dir.path(), "patients"), Some(path.clone()));
        assert_eq!(
            require_columns(&path, &["subject_id"]).unwrap(),
            ["subject_id", "gender"]
        );
        let err = require_columns(&path, &["subject_id", "anchor_age"]).unwrap_err();
        assert!(
            err.to_string().contains("missing column(s) anchor_age"),
            "{err}"
        );
    }

    #[test]
    fn duckdb_csv_errors_keep_line_and_cause_but_not_the_row() {
        let message = "Conversion Error: CSV Error on Line: 7\nOriginal Line: 1,2,x7,secret note text\nError when converting column \"seq_num\". Could not convert string \"x7\" to 'INTEGER'\n\n  file = f.csv";
        let err = csv_error(Path::new("d.csv"), message).to_string();
        assert_eq!(err, "d.csv: line 7: Error when converting column \"seq_num\". Could not convert string \"x7\" to 'INTEGER'");
        assert!(!err.contains("secret"));
    }

    #[test]
    fn bad_gzip_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.csv.gz");
        std::fs::write(&path, b"this is not gzip").unwrap();
        let err = read_header(&path).unwrap_err().to_string();
        assert!(err.contains("x.csv.gz: cannot read it as gzip"), "{err}");
    }
}
