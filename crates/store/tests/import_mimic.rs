//! MIMIC-IV / MIMIC-III imports: a synthetic release with notes (always), and the PhysioNet
//! demo releases beside the repository (skipped, saying why, when absent).

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use medcoder_store::{import_mimic, IcdNineHandling, MimicVersion, Split, StoreError};
use support::{
    all_documents, mimic_options, open_store, patients_per_split, read_gz, shared_data, stats_json,
    synthetic_release, write_gz,
};

#[test]
fn synthetic_release_keeps_every_admission_note_and_code() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, counts) = synthetic_release(tmp.path());
    let store = open_store(tmp.path());
    let report = import_mimic(&store, &mimic_options(&src, MimicVersion::Iv)).unwrap();
    assert_eq!(report.dataset, "mimic-iv");
    assert_eq!(report.documents, counts.admissions);
    assert_eq!(report.documents_with_text, counts.notes);
    assert_eq!(report.diagnosis_codes, counts.diagnosis_rows);
    assert_eq!(report.procedure_codes, counts.procedure_rows);
    let stats = store.dataset_stats("mimic-iv").unwrap();
    assert_eq!(stats.patients, counts.patients);
    assert_eq!(
        stats.splits.iter().map(|(_, n)| n).sum::<u64>(),
        counts.admissions
    );

    let documents = all_documents(&store, "mimic-iv");
    let codes = |version: i32| -> BTreeSet<&str> {
        documents
            .iter()
            .filter(|d| d.icd_version == Some(version))
            .flat_map(|d| d.diagnoses.iter().chain(&d.procedures).map(String::as_str))
            .collect()
    };
    let (icd10, icd9) = (codes(10), codes(9));
    assert!(
        icd10.contains("E11.9") && icd10.contains("I10"),
        "{icd10:?}"
    );
    assert!(
        icd10.contains("S72.001A") && icd10.contains("0DTJ4ZZ"),
        "{icd10:?}"
    );
    assert!(
        !icd10.contains("E119"),
        "ICD-10-CM codes are stored with their dot"
    );
    assert!(icd9.contains("4019") && icd9.contains("3893"), "{icd9:?}");
    assert!(
        icd9.iter().all(|c| !c.contains('.')),
        "ICD-9 codes stay as given: {icd9:?}"
    );
    for d in &documents {
        assert!(
            d.text.as_deref().is_none_or(|t| t.starts_with("Name:")),
            "{d:?}"
        );
        assert_eq!(d.lang.as_deref(), Some("en"));
    }

    assert_eq!(store.patients_in_several_splits("mimic-iv").unwrap(), 0);
    let per_split = patients_per_split(&documents);
    let share = |split: &str| per_split.get(split).copied().unwrap_or(0) as f64 / 40.0;
    assert!((share("train") - 0.8).abs() <= 0.05, "{per_split:?}");
    assert!((share("validation") - 0.1).abs() <= 0.05, "{per_split:?}");
    assert!((share("test") - 0.1).abs() <= 0.05, "{per_split:?}");
    assert!(
        !per_split.contains_key("none"),
        "every document has a split: {per_split:?}"
    );
}

#[test]
fn importing_again_is_a_no_op_and_other_options_need_drop() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, _) = synthetic_release(tmp.path());
    let store = open_store(tmp.path());
    let options = mimic_options(&src, MimicVersion::Iv);
    import_mimic(&store, &options).unwrap();
    let first = stats_json(&store, "mimic-iv");
    let imported_at = store.dataset("mimic-iv").unwrap().imported_at;

    let again = import_mimic(&store, &options).unwrap();
    assert!(again.tables_imported.is_empty(), "{again:?}");
    assert_eq!(stats_json(&store, "mimic-iv"), first);
    assert_eq!(store.dataset("mimic-iv").unwrap().imported_at, imported_at);

    let other = medcoder_store::MimicOptions {
        seed: 7,
        ..options.clone()
    };
    let err = import_mimic(&store, &other).unwrap_err();
    assert!(
        matches!(err, StoreError::DatasetExists(ref name) if name == "mimic-iv"),
        "{err}"
    );
    assert!(err.to_string().contains("--drop"), "{err}");
    assert_eq!(
        stats_json(&store, "mimic-iv"),
        first,
        "a refused import changes nothing"
    );

    let dropped = import_mimic(
        &store,
        &medcoder_store::MimicOptions {
            drop: true,
            ..other
        },
    )
    .unwrap();
    assert!(
        !dropped.tables_imported.is_empty(),
        "--drop imports the raw tables again"
    );
    let after = stats_json(&store, "mimic-iv");
    assert_eq!(after["documents"], first["documents"]);
    assert_eq!(after["diagnosis_codes"], first["diagnosis_codes"]);
    assert!(store
        .dataset("mimic-iv")
        .unwrap()
        .options
        .contains("\"seed\":7"));
}

#[test]
fn patient_limit_keeps_that_many_patients_all_with_notes() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, _) = synthetic_release(tmp.path());
    let store = open_store(tmp.path());
    let options = medcoder_store::MimicOptions {
        patient_limit: Some(5),
        ..mimic_options(&src, MimicVersion::Iv)
    };
    import_mimic(&store, &options).unwrap();
    let stats = store.dataset_stats("mimic-iv").unwrap();
    assert_eq!(stats.patients, 5);
    let documents = all_documents(&store, "mimic-iv");
    let mut with_notes: BTreeMap<String, bool> = BTreeMap::new();
    for d in &documents {
        *with_notes.entry(d.patient_id.clone().unwrap()).or_default() |= d.text.is_some();
    }
    assert_eq!(with_notes.len(), 5);
    assert!(
        with_notes.values().all(|has| *has),
        "patients with notes come first: {with_notes:?}"
    );
}

#[test]
fn a_patient_limit_applies_when_the_raw_tables_are_already_imported() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, counts) = synthetic_release(tmp.path());
    let store = open_store(tmp.path());
    import_mimic(&store, &mimic_options(&src, MimicVersion::Iv)).unwrap();
    let small = medcoder_store::MimicOptions {
        name: Some("mimic-iv-small".into()),
        patient_limit: Some(5),
        ..mimic_options(&src, MimicVersion::Iv)
    };
    let report = import_mimic(&store, &small).unwrap();
    assert!(
        report.tables_imported.is_empty(),
        "raw tables are reused: {report:?}"
    );
    assert_eq!(store.dataset_stats("mimic-iv-small").unwrap().patients, 5);
    // ... and the limit of one dataset does not shrink another one of the same release.
    let full = medcoder_store::MimicOptions {
        name: Some("mimic-iv-again".into()),
        ..mimic_options(&src, MimicVersion::Iv)
    };
    import_mimic(&store, &full).unwrap();
    assert_eq!(
        store.dataset_stats("mimic-iv-again").unwrap().patients,
        counts.patients
    );
    assert_eq!(
        store.dataset_stats("mimic-iv").unwrap().patients,
        counts.patients
    );
}

#[test]
fn dropping_icd9_leaves_only_icd10_documents() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, counts) = synthetic_release(tmp.path());
    let store = open_store(tmp.path());
    let options = medcoder_store::MimicOptions {
        icd9: IcdNineHandling::Drop,
        ..mimic_options(&src, MimicVersion::Iv)
    };
    let report = import_mimic(&store, &options).unwrap();
    let stats = store.dataset_stats("mimic-iv").unwrap();
    assert!(
        stats.icd_versions.iter().all(|(v, _)| v != "9"),
        "{:?}",
        stats.icd_versions
    );
    assert!(
        report.documents > 0 && report.documents < counts.admissions,
        "{report:?}"
    );
    assert!(all_documents(&store, "mimic-iv")
        .iter()
        .all(|d| d.icd_version == Some(10)));
}

#[test]
fn a_split_file_assigns_its_splits_by_patient() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, counts) = synthetic_release(tmp.path());
    let split_of = |i: u64| ["train", "dev", "test"][(i % 3) as usize];
    let mut file = String::from("subject_id,split\n");
    for i in 0..counts.patients {
        file.push_str(&format!("{},{}\n", 10_000_000 + i, split_of(i)));
    }
    let split_file = tmp.path().join("splits.csv");
    std::fs::write(&split_file, file).unwrap();
    let store = open_store(tmp.path());
    let options = medcoder_store::MimicOptions {
        split_file: Some(split_file),
        ..mimic_options(&src, MimicVersion::Iv)
    };
    import_mimic(&store, &options).unwrap();
    let documents = all_documents(&store, "mimic-iv");
    assert_eq!(documents.len() as u64, counts.admissions);
    for d in &documents {
        let patient: u64 = d.patient_id.as_deref().unwrap().parse().unwrap();
        let expected: Split = split_of(patient - 10_000_000).parse().unwrap();
        assert_eq!(d.split, Some(expected), "{}", d.doc_id);
    }
}

/// `(hadm_id → diagnosis codes in seq_num order)` read from a MIMIC-IV `diagnoses_icd` file.
fn diagnoses_by_admission(path: &Path) -> BTreeMap<String, Vec<String>> {
    let mut rows: BTreeMap<String, Vec<(u32, String)>> = BTreeMap::new();
    for line in read_gz(path).lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        let code = if f[4] == "10" && f[3].len() > 3 {
            format!("{}.{}", &f[3][..3], &f[3][3..])
        } else {
            f[3].to_string()
        };
        rows.entry(f[1].to_string())
            .or_default()
            .push((f[2].parse().expect("a seq_num"), code));
    }
    rows.into_iter()
        .map(|(hadm, mut codes)| {
            codes.sort();
            (hadm, codes.into_iter().map(|(_, c)| c).collect())
        })
        .collect()
}

#[test]
fn mimic_iv_demo_imports_all_admissions_in_seq_num_order() {
    let Some(demo) = shared_data("mimic-iv-demo") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let store = open_store(tmp.path());
    let report = import_mimic(&store, &mimic_options(&demo, MimicVersion::Iv)).unwrap();
    // Counted in the files with `zcat | wc -l` minus the header line.
    assert_eq!(report.documents, 275);
    assert_eq!(report.documents_with_text, 0, "the demo has no notes");
    assert_eq!(report.diagnosis_codes, 4_506);
    assert_eq!(report.procedure_codes, 722);
    let stats = store.dataset_stats("mimic-iv").unwrap();
    assert_eq!(stats.patients, 100);
    assert_eq!(
        stats.icd_versions,
        [("10".to_string(), 123), ("9".to_string(), 152)]
    );
    assert_eq!(store.patients_in_several_splits("mimic-iv").unwrap(), 0);

    let expected = diagnoses_by_admission(&demo.join("hosp/diagnoses_icd.csv.gz"));
    let documents = all_documents(&store, "mimic-iv");
    assert_eq!(documents.len(), expected.len());
    for d in &documents {
        assert_eq!(d.diagnoses, expected[&d.doc_id], "admission {}", d.doc_id);
    }
    assert!(documents
        .iter()
        .any(|d| d.diagnoses.contains(&"E11.9".to_string())));
    assert!(!documents
        .iter()
        .any(|d| d.diagnoses.contains(&"E119".to_string())));
}

#[test]
fn mimic_iv_demo_with_notes_in_the_mimic_iv_note_schema() {
    let Some(demo) = shared_data("mimic-iv-demo") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("mimic-iv");
    std::fs::create_dir_all(src.join("hosp")).unwrap();
    for table in ["patients", "admissions", "diagnoses_icd", "procedures_icd"]
        .into_iter()
        .chain(["d_icd_diagnoses", "d_icd_procedures"])
    {
        let file = format!("hosp/{table}.csv.gz");
        std::fs::copy(demo.join(&file), src.join(&file)).unwrap();
    }
    // Three real admissions; the first has two notes (joined in note_seq order).
    let admissions = read_gz(&demo.join("hosp/admissions.csv.gz"));
    let picked: Vec<(&str, &str)> = admissions
        .lines()
        .skip(1)
        .take(3)
        .map(|l| {
            let mut f = l.split(',');
            (f.next().unwrap(), f.next().unwrap())
        })
        .collect();
    let texts = [
        "Name:  ___  Unit No: ___\nChief Complaint:\n\"Chest pain\", dyspnea, fatigue\n\nPlan: aspirin, \"low-dose\".",
        "Brief Hospital Course:\r\nNo events, no \"\"issues\"\".\n",
        "Discharge Diagnosis: sepsis, AKI\n\n\n",
        "Addendum, same stay: see above \"note 1\".",
    ];
    let quote = |t: &str| format!("\"{}\"", t.replace('"', "\"\""));
    let mut csv =
        String::from("note_id,subject_id,hadm_id,note_type,note_seq,charttime,storetime,text\n");
    let rows = [(0, 1, 0), (1, 1, 1), (2, 1, 2), (0, 2, 3)];
    for (admission, seq, text) in rows {
        let (subject, hadm) = picked[admission];
        csv.push_str(&format!(
            "{hadm}-DS-{seq},{subject},{hadm},DS,{seq},2180-01-01 00:00:00,,{}\n",
            quote(texts[text])
        ));
    }
    write_gz(&src.join("note/discharge.csv.gz"), &csv);

    let store = open_store(tmp.path());
    let report = import_mimic(&store, &mimic_options(&src, MimicVersion::Iv)).unwrap();
    assert_eq!(report.documents, 275);
    assert_eq!(report.documents_with_text, 3);
    assert!(
        report
            .tables_imported
            .contains(&("discharge".to_string(), 4)),
        "{report:?}"
    );
    let text = |i: usize| {
        store
            .document("mimic-iv", picked[i].1)
            .unwrap()
            .unwrap()
            .text
    };
    assert_eq!(
        text(0).as_deref(),
        Some(format!("{}\n\n{}", texts[0], texts[3]).as_str())
    );
    assert_eq!(text(1).as_deref(), Some(texts[1]));
    assert_eq!(text(2).as_deref(), Some(texts[2]));
}

#[test]
fn mimic_iii_demo_imports_all_admissions_as_icd9() {
    let Some(demo) = shared_data("mimic-iii-demo") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let store = open_store(tmp.path());
    let report = import_mimic(&store, &mimic_options(&demo, MimicVersion::Iii)).unwrap();
    assert_eq!(report.dataset, "mimic-iii");
    assert_eq!(report.documents, 129);
    assert_eq!(
        report.documents_with_text, 0,
        "NOTEEVENTS of the demo is empty"
    );
    assert_eq!(report.diagnosis_codes, 1_761);
    assert_eq!(report.procedure_codes, 506);
    let stats = store.dataset_stats("mimic-iii").unwrap();
    assert_eq!(stats.patients, 100);
    assert_eq!(stats.distinct_diagnosis_codes, 581);
    assert_eq!(stats.icd_versions, [("9".to_string(), 129)]);
    assert_eq!(store.patients_in_several_splits("mimic-iii").unwrap(), 0);

    let dropped = medcoder_store::MimicOptions {
        name: Some("mimic-iii-icd10".into()),
        icd9: IcdNineHandling::Drop,
        ..mimic_options(&demo, MimicVersion::Iii)
    };
    let report = import_mimic(&store, &dropped).unwrap();
    assert_eq!(report.documents, 0, "MIMIC-III is all ICD-9");
    assert!(
        report.tables_imported.is_empty(),
        "the raw tables are shared: {report:?}"
    );
}
