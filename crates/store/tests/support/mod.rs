//! Helpers shared by the store's integration tests: temp databases, synthetic releases, the
//! real data beside the repository, gzip files.
#![allow(dead_code)] // each test file uses its own subset

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use medcoder_store::synthetic::{write_synthetic_mimic_iv, SyntheticCounts, SyntheticMimic};
use medcoder_store::{Document, IcdNineHandling, MimicOptions, MimicVersion, SplitRatios, Store};

/// `<dir>/db.duckdb`, created.
pub fn open_store(dir: &Path) -> Store {
    Store::open(&dir.join("db.duckdb")).expect("open a database in a temp dir")
}

/// The import options `medcoder prepare mimic` uses by default.
pub fn mimic_options(src: &Path, version: MimicVersion) -> MimicOptions {
    MimicOptions {
        src: src.to_path_buf(),
        version,
        name: None,
        drop: false,
        patient_limit: None,
        seed: 42,
        ratios: SplitRatios::default(),
        split_file: None,
        icd9: IcdNineHandling::Keep,
    }
}

/// A small synthetic MIMIC-IV release under `<dir>/release`.
pub fn synthetic_release(dir: &Path) -> (PathBuf, SyntheticCounts) {
    let src = dir.join("release");
    let counts = write_synthetic_mimic_iv(&src, &SyntheticMimic::small()).expect("write a release");
    (src, counts)
}

/// Every document of a dataset.
pub fn all_documents(store: &Store, dataset: &str) -> Vec<Document> {
    store
        .document_ids(dataset, None)
        .expect("list documents")
        .iter()
        .map(|id| {
            store
                .document(dataset, id)
                .expect("read a document")
                .expect("listed")
        })
        .collect()
}

/// `shared/data/<name>` beside the repository, or `None` after a line saying why the test
/// skips (the folder exists on the development machine only).
pub fn shared_data(name: &str) -> Option<PathBuf> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/data")
        .join(name);
    if path.is_dir() {
        Some(path)
    } else {
        eprintln!(
            "skipping: {} is absent (real data lives beside the repository)",
            path.display()
        );
        None
    }
}

pub fn write_gz(path: &Path, content: &str) {
    std::fs::create_dir_all(path.parent().expect("a parent folder")).expect("create folder");
    let file = std::fs::File::create(path).expect("create a .gz file");
    let mut gz = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
    gz.write_all(content.as_bytes()).expect("write gzip");
    gz.finish().expect("finish gzip");
}

pub fn read_gz(path: &Path) -> String {
    let mut text = String::new();
    flate2::read::MultiGzDecoder::new(std::fs::File::open(path).expect("open a .gz file"))
        .read_to_string(&mut text)
        .expect("read gzip");
    text
}

/// Stats of a dataset as JSON, without the import time (which differs between two imports).
pub fn stats_json(store: &Store, dataset: &str) -> serde_json::Value {
    let mut stats =
        serde_json::to_value(store.dataset_stats(dataset).expect("stats")).expect("stats as JSON");
    stats["imported_at"] = serde_json::Value::Null;
    stats
}

/// `(split, patients)` from the documents of a dataset.
pub fn patients_per_split(documents: &[Document]) -> std::collections::BTreeMap<String, usize> {
    let mut patients: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> =
        std::collections::BTreeMap::new();
    for d in documents {
        let split = d.split.map_or("none", |s| s.as_str()).to_string();
        let patient = d.patient_id.clone().unwrap_or_else(|| d.doc_id.clone());
        patients.entry(split).or_default().insert(patient);
    }
    patients.into_iter().map(|(k, v)| (k, v.len())).collect()
}
