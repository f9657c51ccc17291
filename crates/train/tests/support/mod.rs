//! Helpers for the training crate's tests: a synthetic MIMIC-IV release imported into a temp
//! DuckDB, and tokenizer folders whose vocabulary covers its notes.
#![allow(dead_code)] // each test binary uses a subset

pub mod gradients;
pub mod tokenizer;

use std::path::PathBuf;

use medcoder_models::loader::load_hf_dir;
use medcoder_models::{CausalLm, ModelTokenizer};
use medcoder_store::synthetic::{write_synthetic_mimic_iv, SyntheticMimic};
use medcoder_store::{
    import_mimic, Document, IcdNineHandling, MimicOptions, MimicVersion, SplitRatios, Store,
};
use medcoder_train::{PromptTemplate, TokenizeOptions, Truncation};

pub const DATASET: &str = "mimic-iv";

/// A temp folder with a database holding the small synthetic MIMIC-IV release (ICD-9
/// admissions kept, flagged), and two tokenizer folders covering its notes: `chatml/` (chat
/// template, eos `<|im_end|>`) and `bare/` (tokenizer.json only).
#[derive(Debug)]
pub struct MimicFixture {
    pub dir: tempfile::TempDir,
    pub store: Store,
    /// Every document of the dataset, sorted by id.
    pub documents: Vec<Document>,
}

impl MimicFixture {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("a temp dir");
        let src = dir.path().join("release");
        write_synthetic_mimic_iv(&src, &SyntheticMimic::small()).expect("a synthetic release");
        let store = Store::open(&dir.path().join("db.duckdb")).expect("a database");
        let options = MimicOptions {
            src,
            version: MimicVersion::Iv,
            name: None,
            drop: false,
            patient_limit: None,
            seed: 42,
            ratios: SplitRatios::default(),
            split_file: None,
            icd9: IcdNineHandling::Keep,
        };
        import_mimic(&store, &options).expect("import the release");
        let documents = store
            .document_ids(DATASET, None)
            .expect("document ids")
            .iter()
            .map(|id| {
                store
                    .document(DATASET, id)
                    .expect("a document")
                    .expect("listed")
            })
            .collect();
        let fixture = Self {
            dir,
            store,
            documents,
        };
        let corpus = fixture.corpus();
        tokenizer::write_chatml_tokenizer(&fixture.chatml_dir(), &corpus);
        tokenizer::write_bare_tokenizer(&fixture.bare_dir(), &corpus);
        fixture
    }

    pub fn chatml_dir(&self) -> PathBuf {
        self.dir.path().join("chatml")
    }

    pub fn bare_dir(&self) -> PathBuf {
        self.dir.path().join("bare")
    }

    pub fn chatml(&self) -> ModelTokenizer {
        ModelTokenizer::from_dir(&self.chatml_dir()).expect("the ChatML fixture tokenizer")
    }

    pub fn bare(&self) -> ModelTokenizer {
        ModelTokenizer::from_dir(&self.bare_dir()).expect("the bare fixture tokenizer")
    }

    /// Every text the tests encode: notes alone, as prompts with and without the chat
    /// template, and the completions.
    fn corpus(&self) -> Vec<String> {
        let template = PromptTemplate::default();
        let mut texts = vec!["\n…\n".to_string()];
        for doc in &self.documents {
            let Some(text) = &doc.text else { continue };
            let user = template.user_text(text);
            let answer = template.completion_text(&doc.diagnoses, &doc.procedures);
            texts.push(text.clone());
            texts.push(tokenizer::chatml_prompt(&user));
            texts.push(format!("{user}\n"));
            texts.push(format!("{answer}{}", tokenizer::IM_END));
        }
        texts
    }

    /// The documents `tokenize_dataset` reads: those with text, ICD-10 (or without codes)
    /// unless `include_icd9`.
    pub fn examples(&self, include_icd9: bool) -> Vec<&Document> {
        self.documents
            .iter()
            .filter(|d| d.text.as_deref().is_some_and(|t| !t.is_empty()))
            .filter(|d| include_icd9 || d.icd_version.unwrap_or(10) == 10)
            .collect()
    }

    pub fn document(&self, doc_id: &str) -> &Document {
        self.documents
            .iter()
            .find(|d| d.doc_id == doc_id)
            .unwrap_or_else(|| panic!("a row for unknown document {doc_id}"))
    }
}

/// Options for the fixture dataset with the default prompt template.
pub fn options(model: &str, max_len: usize, truncation: Truncation) -> TokenizeOptions {
    TokenizeOptions {
        dataset: DATASET.into(),
        model: model.into(),
        max_len,
        truncation,
        template: PromptTemplate::default(),
        include_icd9: false,
    }
}

/// The gold codes as the default template's completion lists them.
pub fn gold_answer(doc: &Document) -> String {
    doc.diagnoses
        .iter()
        .chain(&doc.procedures)
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

/// One of the tiny random checkpoints in `crates/models/tests/fixtures/tiny/<family>`, in f32
/// on the CPU.
pub fn load_tiny_fixture(family: &str) -> CausalLm {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../models/tests/fixtures/tiny")
        .join(family);
    load_hf_dir(&dir, &candle_core::Device::Cpu, candle_core::DType::F32)
        .unwrap_or_else(|e| panic!("loading {}: {e}", dir.display()))
        .0
}
