//! CodiEsp (CLEF eHealth 2020): Spanish clinical case reports with English translations, coded
//! with ICD-10-CM diagnoses (D) and ICD-10-PCS procedures (P), with evidence spans (X).
//!
//! Two layouts are read: `codiesp_<split>.jsonl` files (one record per document), or the
//! official release (`<split>/<split>{D,P,X}.tsv` with `text_files/` and `text_files_en/`).
//! Gold codes are kept as the corpus gives them (the Spanish 2018 edition: some are headers
//! or absent in the US 2026 code set); the code catalog records what each one is.

use std::io::BufRead;
use std::path::{Path, PathBuf};

use duckdb::{params, Connection};
use medcoder_icd::{CodeSystem, IcdCode};
use serde::{Deserialize, Serialize};

use crate::db::DatasetKind;
use crate::error::DbContext;
use crate::splits::Split;
use crate::{ImportReport, Store, StoreError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Language {
    En,
    Es,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CodiespOptions {
    pub src: PathBuf,
    pub lang: Language,
    /// Dataset name; `codiesp` by default.
    pub name: Option<String>,
    pub drop: bool,
}

/// One document as both layouts give it.
#[derive(Debug, Deserialize)]
struct Record {
    id: String,
    #[serde(default)]
    text_en: Option<String>,
    #[serde(default)]
    text_es: Option<String>,
    #[serde(default)]
    diagnoses: Vec<String>,
    #[serde(default)]
    procedures: Vec<String>,
    #[serde(default)]
    evidence: Vec<EvidenceRecord>,
}

#[derive(Debug, Deserialize)]
struct EvidenceRecord {
    label: String,
    code: String,
    reference: String,
    /// `[[start, end], …]` character offsets into the Spanish text.
    offsets: Vec<(u64, u64)>,
}

const SPLITS: &[(&str, Split)] = &[
    ("train", Split::Train),
    ("dev", Split::Validation),
    ("test", Split::Test),
];

pub fn import_codiesp(store: &Store, options: &CodiespOptions) -> Result<ImportReport, StoreError> {
    let name = options
        .name
        .clone()
        .unwrap_or_else(|| "codiesp".to_string());
    let options_json =
        serde_json::to_string(options).map_err(|e| StoreError::Invalid(e.to_string()))?;
    if store.already_imported(&name, &options_json, options.drop)? {
        return crate::stats::import_report(store, &name, Vec::new(), Vec::new());
    }
    let mut parts: Vec<(Split, Vec<Record>)> = Vec::new();
    for (split_name, split) in SPLITS {
        let jsonl = options.src.join(format!("codiesp_{split_name}.jsonl"));
        let official = options
            .src
            .join(split_name)
            .join(format!("{split_name}D.tsv"));
        if jsonl.is_file() {
            parts.push((*split, read_jsonl(&jsonl)?));
        } else if official.is_file() {
            parts.push((
                *split,
                read_official(&options.src.join(split_name), split_name)?,
            ));
        }
    }
    if parts.is_empty() {
        return Err(StoreError::MissingFile {
            path: options.src.clone(),
            hint: ": expected codiesp_train.jsonl / codiesp_dev.jsonl, or train/trainD.tsv …"
                .into(),
        });
    }
    let mut imported = Vec::new();
    store.in_transaction(&format!("importing CodiEsp into {name}"), |conn| {
        Store::reset_dataset(
            conn,
            &name,
            DatasetKind::Codiesp,
            &options.src.to_string_lossy(),
            &options_json,
        )?;
        for (split, records) in &parts {
            write_records(conn, &name, *split, records, options.lang)?;
            imported.push((split.as_str().to_string(), records.len() as u64));
        }
        Ok(())
    })?;
    crate::stats::import_report(store, &name, imported, Vec::new())
}

fn read_jsonl(path: &Path) -> Result<Vec<Record>, StoreError> {
    let file = fs_err::File::open(path)?;
    let mut records = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let record: Record = serde_json::from_str(&line).map_err(|e| StoreError::InputLine {
            path: path.to_path_buf(),
            line: i as u64 + 1,
            message: format!("not a CodiEsp record: {e}"),
        })?;
        records.push(record);
    }
    Ok(records)
}

/// The official layout: D and P files give codes (`id<TAB>code`), X files evidence, the text
/// folders one `<id>.txt` per document.
fn read_official(dir: &Path, split: &str) -> Result<Vec<Record>, StoreError> {
    let mut records: Vec<Record> = Vec::new();
    let mut index = std::collections::HashMap::new();
    let mut record_of = |id: &str, records: &mut Vec<Record>| -> usize {
        *index.entry(id.to_string()).or_insert_with(|| {
            records.push(Record {
                id: id.to_string(),
                text_en: None,
                text_es: None,
                diagnoses: Vec::new(),
                procedures: Vec::new(),
                evidence: Vec::new(),
            });
            records.len() - 1
        })
    };
    for (suffix, is_diagnosis) in [("D", true), ("P", false)] {
        let path = dir.join(format!("{split}{suffix}.tsv"));
        if !path.is_file() {
            continue;
        }
        for (i, line) in fs_err::read_to_string(&path)?.lines().enumerate() {
            let fields: Vec<&str> = line.split('\t').collect();
            let [id, code] = fields[..] else {
                return Err(StoreError::InputLine {
                    path: path.clone(),
                    line: i as u64 + 1,
                    message: format!("expected 2 tab-separated fields, got {}", fields.len()),
                });
            };
            let r = record_of(id, &mut records);
            let list = if is_diagnosis {
                &mut records[r].diagnoses
            } else {
                &mut records[r].procedures
            };
            list.push(code.trim().to_ascii_uppercase());
        }
    }
    let x_path = dir.join(format!("{split}X.tsv"));
    if x_path.is_file() {
        for (i, line) in fs_err::read_to_string(&x_path)?.lines().enumerate() {
            let bad = |message: String| StoreError::InputLine {
                path: x_path.clone(),
                line: i as u64 + 1,
                message,
            };
            let fields: Vec<&str> = line.split('\t').collect();
            let [id, label, code, reference, position] = fields[..] else {
                return Err(bad(format!(
                    "expected 5 tab-separated fields, got {}",
                    fields.len()
                )));
            };
            let offsets =
                parse_offsets(position).ok_or_else(|| bad(format!("bad offsets `{position}`")))?;
            let r = record_of(id, &mut records);
            records[r].evidence.push(EvidenceRecord {
                label: label.to_string(),
                code: code.trim().to_ascii_uppercase(),
                reference: reference.to_string(),
                offsets,
            });
        }
    }
    for (folder, english) in [("text_files", false), ("text_files_en", true)] {
        let folder = dir.join(folder);
        if !folder.is_dir() {
            continue;
        }
        for entry in fs_err::read_dir(&folder)? {
            let path = entry?.path();
            let Some(id) = path
                .file_stem()
                .and_then(|s| s.to_str())
                .map(str::to_string)
            else {
                continue;
            };
            if path.extension().is_none_or(|e| e != "txt") {
                continue;
            }
            let text = fs_err::read_to_string(&path)?;
            let r = record_of(&id, &mut records);
            if english {
                records[r].text_en = Some(text);
            } else {
                records[r].text_es = Some(text);
            }
        }
    }
    records.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(records)
}

/// `2163 2171` or `2787 2801;2810 2823`.
fn parse_offsets(position: &str) -> Option<Vec<(u64, u64)>> {
    position
        .split(';')
        .map(|span| {
            let mut it = span.split_whitespace().map(str::parse::<u64>);
            match (it.next(), it.next(), it.next()) {
                (Some(Ok(start)), Some(Ok(end)), None) if start <= end => Some((start, end)),
                _ => None,
            }
        })
        .collect()
}

/// CodiEsp diagnoses are ICD-10-CM with their dot; keep what does not parse as given.
fn normalize(code: &str, system: CodeSystem) -> String {
    IcdCode::parse_as(system, code)
        .map_or_else(|_| code.trim().to_ascii_uppercase(), |c| c.to_string())
}

fn write_records(
    conn: &Connection,
    dataset: &str,
    split: Split,
    records: &[Record],
    lang: Language,
) -> Result<(), StoreError> {
    let (lang_code, pick): (&str, fn(&Record) -> Option<&String>) = match lang {
        Language::En => ("en", |r| r.text_en.as_ref()),
        Language::Es => ("es", |r| r.text_es.as_ref()),
    };
    let ctx = || format!("writing CodiEsp {} documents", split.as_str());
    let mut documents = conn.appender("documents").db(ctx)?;
    for r in records {
        documents
            .append_row(params![dataset, r.id, r.id, pick(r), lang_code, 10])
            .db(ctx)?;
    }
    documents.flush().db(ctx)?;
    let mut codes = conn.appender("document_codes").db(ctx)?;
    for r in records {
        for (kind, list, system) in [
            ("diagnosis", &r.diagnoses, CodeSystem::Cm),
            ("procedure", &r.procedures, CodeSystem::Pcs),
        ] {
            for (seq, code) in list.iter().enumerate() {
                codes
                    .append_row(params![
                        dataset,
                        r.id,
                        kind,
                        seq as i32 + 1,
                        normalize(code, system),
                        10
                    ])
                    .db(ctx)?;
            }
        }
    }
    codes.flush().db(ctx)?;
    let mut evidence = conn.appender("evidence").db(ctx)?;
    for r in records {
        let spans_text_chars = r.text_es.as_ref().map(|t| t.chars().count() as i64);
        for e in &r.evidence {
            let (kind, system) = if e.label.eq_ignore_ascii_case("PROCEDIMIENTO") {
                ("procedure", CodeSystem::Pcs)
            } else {
                ("diagnosis", CodeSystem::Cm)
            };
            let spans = e
                .offsets
                .iter()
                .map(|(s, t)| format!("{s} {t}"))
                .collect::<Vec<_>>()
                .join(";");
            evidence
                .append_row(params![
                    dataset,
                    r.id,
                    kind,
                    normalize(&e.code, system),
                    e.reference,
                    spans,
                    "es",
                    spans_text_chars
                ])
                .db(ctx)?;
        }
    }
    evidence.flush().db(ctx)?;
    let mut splits = conn.appender("splits").db(ctx)?;
    for r in records {
        splits
            .append_row(params![dataset, r.id, split.as_str()])
            .db(ctx)?;
    }
    splits.flush().db(ctx)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_parse_single_and_discontinuous_spans() {
        assert_eq!(parse_offsets("2163 2171"), Some(vec![(2163, 2171)]));
        assert_eq!(
            parse_offsets("2787 2801;2810 2823"),
            Some(vec![(2787, 2801), (2810, 2823)])
        );
        assert_eq!(parse_offsets("12"), None);
        assert_eq!(parse_offsets("9 3"), None);
    }

    #[test]
    fn codes_are_normalized_when_they_parse() {
        assert_eq!(normalize("n44.8", CodeSystem::Cm), "N44.8");
        assert_eq!(normalize("bw03zzz", CodeSystem::Pcs), "BW03ZZZ");
        assert_eq!(normalize("BT41", CodeSystem::Pcs), "BT41");
    }
}
