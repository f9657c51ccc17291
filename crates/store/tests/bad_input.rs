//! Bad input fails with the file (and line, or column) in the message and leaves no dataset
//! behind: the database still opens, and a fixed input imports.

mod support;

use std::path::Path;

use medcoder_store::{
    import_instructions, import_mimic, InstructionFormat, InstructionOptions, MimicVersion,
    SplitRatios, Store, StoreError,
};
use support::{mimic_options, open_store, read_gz, synthetic_release, write_gz};

/// The import left no dataset, and the database opens again.
fn assert_nothing_written(dir: &Path) {
    let store = open_store(dir);
    assert!(
        store.datasets().expect("list datasets").is_empty(),
        "{:?}",
        store.datasets()
    );
    assert!(store.stats().expect("database stats").datasets.is_empty());
}

fn import_synthetic(dir: &Path, src: &Path) -> Result<medcoder_store::ImportReport, StoreError> {
    let store = open_store(dir);
    import_mimic(&store, &mimic_options(src, MimicVersion::Iv))
}

#[test]
fn a_missing_source_folder_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let err = import_synthetic(tmp.path(), &tmp.path().join("no-such-release")).unwrap_err();
    assert!(matches!(err, StoreError::MissingFile { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("no-such-release: not found"), "{message}");
    assert!(message.contains("MIMIC release folder"), "{message}");
    assert_nothing_written(tmp.path());
}

#[test]
fn a_missing_required_file_is_named_before_anything_is_read() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, _) = synthetic_release(tmp.path());
    std::fs::remove_file(src.join("hosp/diagnoses_icd.csv.gz")).unwrap();
    let err = import_synthetic(tmp.path(), &src).unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("hosp/diagnoses_icd.csv.gz: not found"),
        "{message}"
    );
    assert!(message.contains("diagnoses_icd.csv"), "{message}");
    assert_nothing_written(tmp.path());
}

#[test]
fn a_header_without_a_needed_column_names_file_and_column() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, _) = synthetic_release(tmp.path());
    let patients = src.join("hosp/patients.csv.gz");
    let text = read_gz(&patients).replacen("anchor_age", "age", 1);
    write_gz(&patients, &text);
    let err = import_synthetic(tmp.path(), &src).unwrap_err();
    match &err {
        StoreError::MissingColumns {
            path,
            missing,
            found,
        } => {
            assert!(path.ends_with("hosp/patients.csv.gz"), "{}", path.display());
            assert_eq!(missing, "anchor_age");
            assert!(found.contains("age"), "{found}");
        }
        other => panic!("expected MissingColumns, got {other:?}"),
    }
    assert!(
        err.to_string()
            .contains("patients.csv.gz: missing column(s) anchor_age"),
        "{err}"
    );
    assert_nothing_written(tmp.path());
}

#[test]
fn a_malformed_row_names_file_and_line_and_a_fixed_file_imports() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, counts) = synthetic_release(tmp.path());
    let diagnoses = src.join("hosp/diagnoses_icd.csv.gz");
    let good = read_gz(&diagnoses);
    let mut lines: Vec<String> = good.lines().map(str::to_string).collect();
    // Line 7 of the file (the header is line 1): seq_num `x`.
    let fields: Vec<String> = lines[6].split(',').map(str::to_string).collect();
    lines[6] = format!("{},{},x,{},{}", fields[0], fields[1], fields[3], fields[4]);
    write_gz(&diagnoses, &(lines.join("\n") + "\n"));
    let err = import_synthetic(tmp.path(), &src).unwrap_err();
    let message = err.to_string();
    assert!(message.contains("diagnoses_icd.csv.gz"), "{message}");
    assert!(
        message.contains("diagnoses_icd.csv.gz: line 7:"),
        "{message}"
    );
    assert!(message.contains("seq_num"), "{message}");
    // The row itself (which, in a notes file, is clinical text) is not repeated.
    assert!(!message.contains(&lines[6]), "{message}");
    assert_nothing_written(tmp.path());

    write_gz(&diagnoses, &good);
    let report = import_synthetic(tmp.path(), &src).unwrap();
    assert_eq!(report.diagnosis_codes, counts.diagnosis_rows);
    assert_eq!(report.documents, counts.admissions);
}

#[test]
fn garbage_in_a_gz_file_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, _) = synthetic_release(tmp.path());
    std::fs::write(
        src.join("hosp/admissions.csv.gz"),
        b"subject_id,hadm_id\n\x00\xff garbage",
    )
    .unwrap();
    let err = import_synthetic(tmp.path(), &src).unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("admissions.csv.gz: cannot read it as gzip"),
        "{message}"
    );
    assert_nothing_written(tmp.path());
}

#[test]
fn a_truncated_gz_file_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, _) = synthetic_release(tmp.path());
    let notes = src.join("note/discharge.csv.gz");
    let bytes = std::fs::read(&notes).unwrap();
    std::fs::write(&notes, &bytes[..bytes.len() / 2]).unwrap();
    let err = import_synthetic(tmp.path(), &src).unwrap_err();
    let message = err.to_string();
    assert!(message.contains("discharge.csv.gz"), "{message}");
    assert_nothing_written(tmp.path());
}

fn jsonl_options(src: &Path, format: Option<InstructionFormat>) -> InstructionOptions {
    InstructionOptions {
        src: src.to_path_buf(),
        name: "sft".into(),
        format,
        drop: false,
        seed: 42,
        ratios: SplitRatios::default(),
    }
}

fn import_jsonl(dir: &Path, lines: &[&str], format: Option<InstructionFormat>) -> StoreError {
    let path = dir.join("data.jsonl");
    std::fs::write(&path, lines.join("\n")).expect("write the JSONL file");
    let store = open_store(dir);
    let err =
        import_instructions(&store, &jsonl_options(&path, format)).expect_err("the import fails");
    drop(store);
    assert_nothing_written(dir);
    err
}

const ALPACA: &str =
    r#"{"instruction": "Code this note.", "input": "Chest pain.", "output": "R07.9"}"#;

#[test]
fn jsonl_of_an_unknown_format_names_the_line() {
    let tmp = tempfile::tempdir().unwrap();
    let err = import_jsonl(tmp.path(), &[r#"{"prompt": "a", "completion": "b"}"#], None);
    let message = err.to_string();
    assert!(
        message.contains("data.jsonl: line 1: unknown format"),
        "{message}"
    );
    // Once the format is known, a record of another shape is named by its line.
    let err = import_jsonl(tmp.path(), &[ALPACA, "", r#"{"prompt": "a"}"#], None);
    let message = err.to_string();
    assert!(
        message.contains("data.jsonl: line 3: missing string field `instruction`"),
        "{message}"
    );
    let err = import_jsonl(tmp.path(), &[ALPACA], Some(InstructionFormat::Messages));
    assert!(
        err.to_string().contains("line 1: `messages` is not a list"),
        "{err}"
    );
}

#[test]
fn invalid_json_names_line_3() {
    let tmp = tempfile::tempdir().unwrap();
    let err = import_jsonl(
        tmp.path(),
        &[ALPACA, ALPACA, r#"{"instruction": "x", "output": "#],
        None,
    );
    let message = err.to_string();
    assert!(
        message.contains("data.jsonl: line 3: invalid JSON"),
        "{message}"
    );
}

#[test]
fn an_empty_jsonl_file_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let err = import_jsonl(tmp.path(), &["", "  "], None);
    assert!(err.to_string().contains("data.jsonl: no examples"), "{err}");
}

#[test]
fn importing_again_with_other_options_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("data.jsonl");
    std::fs::write(&path, [ALPACA; 10].join("\n")).unwrap();
    let store = Store::open(&tmp.path().join("db.duckdb")).unwrap();
    import_instructions(&store, &jsonl_options(&path, None)).unwrap();
    let before = support::stats_json(&store, "sft");
    let again = import_instructions(&store, &jsonl_options(&path, None)).unwrap();
    assert_eq!(again.dataset, "sft");
    let other = jsonl_options(&path, Some(InstructionFormat::Alpaca));
    let err = import_instructions(&store, &other).unwrap_err();
    assert!(
        matches!(err, StoreError::DatasetExists(ref name) if name == "sft"),
        "{err:?}"
    );
    assert_eq!(support::stats_json(&store, "sft"), before);
    let dropped = InstructionOptions {
        drop: true,
        ..other
    };
    import_instructions(&store, &dropped).unwrap();
    assert_eq!(store.dataset_stats("sft").unwrap().conversations, 10);
}

#[test]
fn raw_tables_from_another_release_are_not_silently_reused() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, _) = synthetic_release(tmp.path());
    let other = tmp.path().join("other-release");
    medcoder_store::synthetic::write_synthetic_mimic_iv(
        &other,
        &medcoder_store::synthetic::SyntheticMimic {
            patients: 3,
            ..medcoder_store::synthetic::SyntheticMimic::small()
        },
    )
    .unwrap();
    import_synthetic(tmp.path(), &src).unwrap();
    let store = open_store(tmp.path());
    let mut options = support::mimic_options(&other, MimicVersion::Iv);
    options.name = Some("other".into());
    let message = import_mimic(&store, &options).unwrap_err().to_string();
    assert!(
        message.contains("mimic_iv.patients was imported from"),
        "{message}"
    );
    assert!(message.contains("--drop"), "{message}");
    options.drop = true;
    let report = import_mimic(&store, &options).unwrap();
    assert_eq!(
        report.documents,
        store.dataset_stats("other").unwrap().documents
    );
}
