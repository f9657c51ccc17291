//! End-to-end tests of `medcoder prepare tokens`: a synthetic MIMIC-IV release imported by the
//! binary, tokenized for a word-level fixture tokenizer written into a temp dir (no download).

mod support;
#[path = "../../train/tests/support/tokenizer.rs"]
mod tokenizer_fixture;

use std::path::{Path, PathBuf};

use medcoder_store::synthetic::{write_synthetic_mimic_iv, SyntheticMimic};
use medcoder_store::Store;
use support::{assert_ok, json, medcoder, Run};

/// A database holding a synthetic release imported by `prepare mimic`, an empty medcoder home,
/// and a ChatML tokenizer folder covering the notes.
struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    /// Short notes with one diagnosis each, so that a 64-token limit leaves room for
    /// part of the note beside the template and the completion.
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("a temp dir");
        std::fs::create_dir(dir.path().join("home")).expect("an empty home");
        let src = dir.path().join("release");
        let spec = SyntheticMimic {
            patients: 12,
            note_chars: 600,
            diagnoses_per_admission: 1,
            procedures_per_admission: 0,
            ..SyntheticMimic::small()
        };
        write_synthetic_mimic_iv(&src, &spec).expect("a synthetic release");
        let fx = Self { dir };
        let src = src.display().to_string();
        assert_ok(&fx.run(&["prepare", "mimic", "--src", &src, "--db", &fx.db()]));
        let store = Store::open(Path::new(&fx.db())).expect("open the database");
        let mut corpus = vec!["Predict the medical codes for the following text: ".to_string()];
        for id in store.document_ids("mimic-iv", None).expect("document ids") {
            let doc = store.document("mimic-iv", &id).expect("a document");
            let doc = doc.expect("listed");
            corpus.extend(doc.text);
            corpus.extend(doc.diagnoses);
        }
        drop(store);
        tokenizer_fixture::write_chatml_tokenizer(&fx.model_dir(), &corpus);
        fx
    }

    fn db(&self) -> String {
        self.dir.path().join("db.duckdb").display().to_string()
    }

    fn model_dir(&self) -> PathBuf {
        self.dir.path().join("model")
    }

    fn run(&self, args: &[&str]) -> Run {
        medcoder(&self.dir.path().join("home"), args, None)
    }

    fn tokens(&self, extra: &[&str]) -> Run {
        let (db, model) = (self.db(), self.model_dir().display().to_string());
        let mut args = vec![
            "prepare",
            "tokens",
            "--db",
            &db,
            "--dataset",
            "mimic-iv",
            "--model",
            &model,
        ];
        args.extend_from_slice(extra);
        self.run(&args)
    }
}

#[test]
fn prepare_tokens_chunks_notes_for_a_local_tokenizer_folder() {
    let fx = Fixture::new();
    let args = ["--max-len", "64", "--truncation", "chunk", "--json"];
    let run = fx.tokens(&args);
    assert_ok(&run);
    let report = json(&run);
    let examples = report["examples"].as_u64().expect("examples");
    let rows = report["rows_written"].as_u64().expect("rows_written");
    assert!(examples > 0 && rows > examples, "{report}");
    assert_eq!(report["chat_template"], true, "{report}");
    assert_eq!(report["truncation"], "chunk", "{report}");
    assert_eq!(report["over_limit"], examples, "{report}");
    assert_eq!(report["dropped"], 0, "{report}");
    assert_eq!(report["model"], fx.model_dir().display().to_string());

    let store = Store::open(Path::new(&fx.db())).expect("open the database");
    let model = fx.model_dir().display().to_string();
    let stored = store.token_rows("mimic-iv", &model).expect("token rows");
    assert_eq!(stored.len() as u64, rows);
    assert!(
        stored.iter().all(|r| r.ids.len() <= 64),
        "rows over --max-len"
    );
    drop(store);

    // Again, in text: the same rows replace the earlier ones.
    let text = fx.tokens(&["--max-len", "64", "--truncation", "chunk"]);
    assert_ok(&text);
    let line =
        format!("mimic-iv for {model}: {examples} examples -> {rows} rows (chat template: yes)");
    assert!(text.stdout.contains(&line), "{}", text.stdout);
    assert!(
        text.stdout.contains(&format!(
            "over --max-len 64: {examples} examples (chunk), dropped 0"
        )),
        "{}",
        text.stdout
    );
}

#[test]
fn a_prompt_template_without_the_note_placeholder_is_refused() {
    let fx = Fixture::new();
    let template = fx.dir.path().join("no-note.yaml");
    std::fs::write(&template, "user: \"Predict the codes.\"\n").unwrap();
    let path = template.display().to_string();
    let run = fx.tokens(&["--template", &path, "--max-len", "64"]);
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    assert!(run.stderr.contains(&path), "{}", run.stderr);
    assert!(
        run.stderr.contains("`user` must contain {note}"),
        "{}",
        run.stderr
    );

    let model = fx.model_dir().display().to_string();
    let store = Store::open(Path::new(&fx.db())).expect("open the database");
    assert!(store.token_rows("mimic-iv", &model).unwrap().is_empty());
}

/// The SmolLM2 asset is one GGUF file: its tokenizer and chat template come from the GGUF
/// metadata. Needs the asset installed (`medcoder assets fetch smollm2-135m-instruct`).
#[test]
fn a_gguf_model_tokenizes_with_its_own_vocabulary_and_chat_template() {
    let alias = "smollm2-135m-instruct";
    let Some(home) = support::home_with_model(alias) else {
        return;
    };
    let fx = Fixture::new();
    let args = [
        "prepare",
        "tokens",
        "--db",
        &fx.db(),
        "--dataset",
        "mimic-iv",
        "--model",
        alias,
        "--json",
    ];
    let run = support::medcoder(home.root(), &args, None);
    assert_ok(&run);
    let report = json(&run);
    assert!(
        report["examples"].as_u64().unwrap_or(0) > 0,
        "{}",
        run.stdout
    );
    assert_eq!(report["chat_template"], true, "{}", run.stdout);
    let store = Store::open(Path::new(&fx.db())).expect("open the database");
    let rows = store.token_rows("mimic-iv", alias).expect("token rows");
    let first = rows.first().expect("tokenized rows");
    // ChatML from the GGUF's template: the prompt opens with <|im_start|> (id 1)
    assert_eq!(first.ids[0], 1, "{:?}", &first.ids[..8]);
    assert!(first.prompt_len > 0 && (first.prompt_len as usize) < first.ids.len());
}
