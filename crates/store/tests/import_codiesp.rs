//! CodiEsp imports: the JSONL files and the official TSV layout beside the repository (train and
//! dev only; skipped, saying why, when absent), and a hand-written official-layout fixture.

mod support;

use std::path::{Path, PathBuf};

use medcoder_store::{import_codiesp, CodiespOptions, Document, Language, Split, Store};
use support::{all_documents, open_store, shared_data};

fn options(src: &Path, lang: Language, name: &str) -> CodiespOptions {
    CodiespOptions {
        src: src.to_path_buf(),
        lang,
        name: Some(name.to_string()),
        drop: false,
    }
}

/// `(documents, diagnosis codes, procedure codes, evidence rows)` of one split.
fn split_counts(store: &Store, dataset: &str, split: Split) -> (usize, usize, usize, usize) {
    let ids = store
        .document_ids(dataset, Some(split))
        .expect("list documents");
    let documents: Vec<Document> = ids
        .iter()
        .map(|id| store.document(dataset, id).expect("read").expect("listed"))
        .collect();
    (
        documents.len(),
        documents.iter().map(|d| d.diagnoses.len()).sum(),
        documents.iter().map(|d| d.procedures.len()).sum(),
        documents.iter().map(|d| d.evidence.len()).sum(),
    )
}

/// Counts of SOURCES.md (gold v4): docs, D rows, P rows, X rows.
const TRAIN: (usize, usize, usize, usize) = (500, 5_639, 1_550, 9_181);
const DEV: (usize, usize, usize, usize) = (250, 2_677, 817, 4_477);

fn assert_train_and_dev(store: &Store, dataset: &str) {
    let stats = store.dataset_stats(dataset).expect("stats");
    assert_eq!(stats.documents, 750);
    assert_eq!(
        stats.splits,
        [("train".to_string(), 500), ("validation".to_string(), 250)]
    );
    assert_eq!(stats.diagnosis_codes, 5_639 + 2_677);
    assert_eq!(stats.procedure_codes, 1_550 + 817);
    assert_eq!(stats.evidence, 9_181 + 4_477);
    assert_eq!(split_counts(store, dataset, Split::Train), TRAIN);
    assert_eq!(split_counts(store, dataset, Split::Validation), DEV);
    assert!(store
        .document_ids(dataset, Some(Split::Test))
        .expect("list documents")
        .is_empty());
}

#[test]
fn jsonl_train_and_dev_import_every_document_code_and_span() {
    let Some(src) = shared_data("codiesp") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let store = open_store(tmp.path());
    let report = import_codiesp(&store, &options(&src, Language::En, "codiesp")).unwrap();
    assert_eq!(report.documents_with_text, 750);
    assert_train_and_dev(&store, "codiesp");
    let stats = store.dataset_stats("codiesp").unwrap();
    assert_eq!(stats.distinct_diagnosis_codes, 2_194);
    assert_eq!(stats.distinct_procedure_codes, 727);
    let d = store
        .document("codiesp", "S0004-06142005000700014-1")
        .unwrap()
        .unwrap();
    assert_eq!(d.lang.as_deref(), Some("en"));
    assert!(
        d.diagnoses.contains(&"N44.8".to_string()),
        "{:?}",
        d.diagnoses
    );
    assert!(
        d.procedures.contains(&"BW03ZZZ".to_string()),
        "{:?}",
        d.procedures
    );
    assert_eq!(d.evidence[0].spans, [(2163, 2171)]);
    assert_eq!(d.evidence[1].spans, [(2787, 2801), (2810, 2823)]);
    assert!(d.evidence.iter().all(|e| e.spans_lang == "es"));
}

#[test]
fn spanish_text_is_what_the_evidence_offsets_point_into() {
    let Some(src) = shared_data("codiesp") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let store = open_store(tmp.path());
    let report = import_codiesp(&store, &options(&src, Language::Es, "codiesp-es")).unwrap();
    assert_eq!(report.documents_with_text, 750);
    let (mut single, mut reproduced) = (0, 0);
    for d in all_documents(&store, "codiesp-es") {
        assert_eq!(d.lang.as_deref(), Some("es"));
        let text: Vec<char> = d.text.as_deref().unwrap().chars().collect();
        for e in d.evidence.iter().filter(|e| e.spans.len() == 1) {
            single += 1;
            let (start, end) = (e.spans[0].0 as usize, e.spans[0].1 as usize);
            let span: String = text.get(start..end).unwrap_or_default().iter().collect();
            reproduced += usize::from(span == e.reference);
        }
    }
    // SOURCES.md: every single-span offset reproduces its text but one (off by one in the source).
    // Counted in the X files: rows whose position has no `;`.
    assert_eq!(single, 10_905);
    assert_eq!(
        single - reproduced,
        1,
        "{reproduced} of {single} spans reproduce the reference"
    );
}

#[test]
fn official_tsv_layout_imports_the_same_codes_without_text() {
    let Some(codiesp) = shared_data("codiesp") else {
        return;
    };
    let raw = codiesp.join("raw");
    let tmp = tempfile::tempdir().unwrap();
    let store = open_store(tmp.path());
    let report = import_codiesp(&store, &options(&raw, Language::En, "raw")).unwrap();
    assert_eq!(report.documents_with_text, 0, "the TSVs carry no text");
    assert_train_and_dev(&store, "raw");

    import_codiesp(&store, &options(&codiesp, Language::En, "jsonl")).unwrap();
    let from_jsonl = all_documents(&store, "jsonl");
    let from_tsv = all_documents(&store, "raw");
    assert_eq!(from_jsonl.len(), from_tsv.len());
    for (j, t) in from_jsonl.iter().zip(&from_tsv) {
        assert_eq!(j.doc_id, t.doc_id);
        assert_eq!(
            (&j.diagnoses, &j.procedures, j.split),
            (&t.diagnoses, &t.procedures, t.split)
        );
        // The same spans; only the JSONL knows the length of the Spanish text they point into.
        let without_length = |e: &[medcoder_store::Evidence]| -> Vec<medcoder_store::Evidence> {
            e.iter()
                .map(|e| medcoder_store::Evidence {
                    spans_text_chars: None,
                    ..e.clone()
                })
                .collect()
        };
        assert_eq!(without_length(&j.evidence), t.evidence, "{}", j.doc_id);
        assert!(j.evidence.iter().all(|e| e.spans_text_chars.is_some()));
        assert_eq!(t.text, None);
    }
}

/// A two-document official release: `train/` with D, P and X files and both text folders,
/// `dev/` with a D file only.
fn official_fixture(root: &Path) -> PathBuf {
    let train = root.join("codiesp/train");
    for folder in ["text_files", "text_files_en"] {
        std::fs::create_dir_all(train.join(folder)).expect("write the fixture");
    }
    std::fs::write(
        train.join("trainD.tsv"),
        "S1-1\tn44.8\nS1-1\tr52\nS2-1\tz20.818\n",
    )
    .expect("write the fixture");
    std::fs::write(train.join("trainP.tsv"), "S1-1\tbw03zzz\nS1-1\tbt41\n")
        .expect("write the fixture");
    std::fs::write(
        train.join("trainX.tsv"),
        "S1-1\tDIAGNOSTICO\tn44.8\tdolor testicular\t0 16\n\
         S1-1\tPROCEDIMIENTO\tbw03zzz\tRx tórax\t18 26;28 29\n",
    )
    .expect("write the fixture");
    std::fs::write(
        train.join("text_files/S1-1.txt"),
        "dolor testicular, Rx tórax, y.",
    )
    .expect("write the fixture");
    std::fs::write(
        train.join("text_files_en/S1-1.txt"),
        "testicular pain, chest X-ray.",
    )
    .expect("write the fixture");
    std::fs::write(
        train.join("text_files_en/S2-1.txt"),
        "Contact with COVID-19.",
    )
    .expect("write the fixture");
    std::fs::write(train.join("text_files_en/README"), "not a document")
        .expect("write the fixture");
    let dev = root.join("codiesp/dev");
    std::fs::create_dir_all(&dev).expect("write the fixture");
    std::fs::write(dev.join("devD.tsv"), "S3-1\ti10\n").expect("write the fixture");
    root.join("codiesp")
}

#[test]
fn hand_written_official_layout_imports_codes_texts_and_spans() {
    let tmp = tempfile::tempdir().unwrap();
    let src = official_fixture(tmp.path());
    let store = open_store(tmp.path());
    let report = import_codiesp(&store, &options(&src, Language::En, "codiesp")).unwrap();
    assert_eq!((report.documents, report.documents_with_text), (3, 2));
    assert_eq!((report.diagnosis_codes, report.procedure_codes), (4, 2));
    assert_eq!(
        report.splits,
        [("train".to_string(), 2), ("validation".to_string(), 1)]
    );

    let s1 = store.document("codiesp", "S1-1").unwrap().unwrap();
    assert_eq!(s1.text.as_deref(), Some("testicular pain, chest X-ray."));
    assert_eq!(s1.diagnoses, ["N44.8", "R52"]);
    assert_eq!(s1.procedures, ["BW03ZZZ", "BT41"]);
    assert_eq!(s1.split, Some(Split::Train));
    assert_eq!(s1.evidence.len(), 2);
    assert_eq!(
        (s1.evidence[1].kind.as_str(), s1.evidence[1].code.as_str()),
        ("procedure", "BW03ZZZ")
    );
    assert_eq!(s1.evidence[1].spans, [(18, 26), (28, 29)]);
    let s3 = store.document("codiesp", "S3-1").unwrap().unwrap();
    assert_eq!((s3.text, s3.split), (None, Some(Split::Validation)));
    assert_eq!(s3.diagnoses, ["I10"]);

    let es = import_codiesp(&store, &options(&src, Language::Es, "codiesp-es")).unwrap();
    assert_eq!(es.documents_with_text, 1);
    let s1 = store.document("codiesp-es", "S1-1").unwrap().unwrap();
    let text: Vec<char> = s1.text.unwrap().chars().collect();
    let (start, end) = s1.evidence[1].spans[0];
    let span: String = text[start as usize..end as usize].iter().collect();
    assert_eq!(span, "Rx tórax", "offsets count characters, not bytes");
}

#[test]
fn official_layout_with_a_bad_row_names_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let src = official_fixture(tmp.path());
    std::fs::write(
        src.join("train/trainX.tsv"),
        "S1-1\tDIAGNOSTICO\tn44.8\tdolor\t0 5\nS1-1\tX\tr52\tdolor\t7\n",
    )
    .unwrap();
    let store = open_store(tmp.path());
    let err = import_codiesp(&store, &options(&src, Language::En, "codiesp")).unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("trainX.tsv: line 2: bad offsets `7`"),
        "{message}"
    );
    assert!(store.datasets().unwrap().is_empty());
}
