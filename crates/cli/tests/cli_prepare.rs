//! End-to-end tests of `medcoder prepare` and `medcoder db stats` on synthetic MIMIC-IV releases.
//! MEDCODER_HOME is an empty folder unless a test says otherwise: the gold code check then adds
//! a note instead of loading the ICD knowledge base.

mod support;

use std::path::{Path, PathBuf};
use std::time::Instant;

use medcoder_store::synthetic::{write_synthetic_mimic_iv, SyntheticCounts, SyntheticMimic};
use support::{assert_ok, icd_home, json, medcoder, spawn_medcoder, Run};

/// A temp folder with an empty medcoder home and a synthetic release.
struct Fixture {
    dir: tempfile::TempDir,
    src: PathBuf,
    counts: SyntheticCounts,
}

impl Fixture {
    fn new(spec: &SyntheticMimic) -> Self {
        let dir = tempfile::tempdir().expect("a temp dir");
        std::fs::create_dir(dir.path().join("home")).expect("an empty home");
        let src = dir.path().join("release");
        let counts = write_synthetic_mimic_iv(&src, spec).expect("a synthetic release");
        Self { dir, src, counts }
    }

    fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    fn db(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    fn run(&self, args: &[&str]) -> Run {
        medcoder(&self.home(), args, None)
    }

    fn prepare_mimic(&self, db: &str, extra: &[&str]) -> Run {
        let src = self.src.display().to_string();
        let mut args = vec!["prepare", "mimic", "--src", src.as_str(), "--db", db];
        args.extend_from_slice(extra);
        self.run(&args)
    }

    /// `db stats --json` of the one dataset, without its import time.
    fn dataset_stats(&self, db: &str) -> Option<serde_json::Value> {
        let run = self.run(&["db", "stats", "--db", db, "--json"]);
        assert_ok(&run);
        let stats = json(&run);
        let datasets = stats["datasets"].as_array().expect("a list of datasets");
        assert!(datasets.len() <= 1, "{datasets:?}");
        datasets.first().map(|d| {
            let mut d = d.clone();
            d["imported_at"] = serde_json::Value::Null;
            d
        })
    }
}

#[test]
fn prepare_mimic_prints_the_dataset_and_its_counts() {
    let fx = Fixture::new(&SyntheticMimic::small());
    let db = fx.db("db.duckdb");
    let run = fx.prepare_mimic(&db, &[]);
    assert_ok(&run);
    let c = &fx.counts;
    assert!(
        run.stdout.starts_with("dataset mimic-iv\n"),
        "{}",
        run.stdout
    );
    let line = format!(
        "documents {} ({} with text), diagnosis codes {}, procedure codes {}",
        c.admissions, c.notes, c.diagnosis_rows, c.procedure_rows
    );
    assert!(run.stdout.contains(&line), "{}", run.stdout);
    assert!(run.stdout.contains("imported patients"), "{}", run.stdout);
    assert!(run.stdout.contains("splits: test "), "{}", run.stdout);
    assert!(
        run.stdout.contains("note: gold codes not checked"),
        "{}",
        run.stdout
    );

    // Again: every raw table is skipped and nothing changes.
    let again = fx.prepare_mimic(&db, &[]);
    assert_ok(&again);
    assert!(again.stdout.contains(&line), "{}", again.stdout);
    assert!(!again.stdout.contains("imported "), "{}", again.stdout);
    let refused = fx.prepare_mimic(&db, &["--seed", "1"]);
    assert_eq!(refused.code, Some(2), "{}", refused.stderr);
    assert!(
        refused
            .stderr
            .contains("dataset `mimic-iv` already exists: pass --drop"),
        "{}",
        refused.stderr
    );
}

#[test]
fn prepare_json_and_db_stats_json_agree() {
    let fx = Fixture::new(&SyntheticMimic::small());
    let db = fx.db("db.duckdb");
    let run = fx.prepare_mimic(&db, &["--json", "--name", "mimic-small", "--icd9", "drop"]);
    assert_ok(&run);
    let report = json(&run);
    assert_eq!(report["dataset"], "mimic-small");
    let documents = report["documents"].as_u64().unwrap();
    assert!(
        documents > 0 && documents < fx.counts.admissions,
        "ICD-9 admissions dropped: {report}"
    );
    assert_eq!(report["code_status"][0][0], "unchecked");
    assert!(
        report["notes"][0].as_str().unwrap().contains("not checked"),
        "{report}"
    );

    let stats = fx.dataset_stats(&db).expect("one dataset");
    assert_eq!(stats["name"], "mimic-small");
    assert_eq!(stats["kind"], "mimic-iv");
    assert_eq!(stats["documents"].as_u64(), Some(documents));
    let patients = stats["patients"].as_u64().unwrap();
    assert!(patients > 0 && patients <= fx.counts.patients, "{stats}");
    assert_eq!(
        stats["icd_versions"],
        serde_json::json!([["10", documents]])
    );

    let text = fx.run(&["db", "stats", "--db", &db]);
    assert_ok(&text);
    assert!(
        text.stdout.contains("mimic-small (mimic-iv), imported"),
        "{}",
        text.stdout
    );
    assert!(
        text.stdout.contains(&format!("documents {documents} (")),
        "{}",
        text.stdout
    );
}

#[test]
fn db_stats_of_a_missing_file_fails_without_creating_it() {
    let fx = Fixture::new(&SyntheticMimic {
        patients: 1,
        ..SyntheticMimic::small()
    });
    let db = fx.db("absent.duckdb");
    let run = fx.run(&["db", "stats", "--db", &db]);
    assert_eq!(run.code, Some(2));
    assert!(
        run.stderr.contains("absent.duckdb: no such database"),
        "{}",
        run.stderr
    );
    assert!(!Path::new(&db).exists());
}

#[test]
fn prepare_jsonl_imports_alpaca_records() {
    let fx = Fixture::new(&SyntheticMimic {
        patients: 1,
        ..SyntheticMimic::small()
    });
    let src = fx.dir.path().join("alpaca.jsonl");
    let lines: Vec<String> = (0..20)
        .map(|i| {
            serde_json::json!({"instruction": "Code this note.", "input": format!("Note {i}: chest pain, \"acute\"."), "output": "R07.9"})
                .to_string()
        })
        .collect();
    std::fs::write(&src, lines.join("\n") + "\n").unwrap();
    let db = fx.db("db.duckdb");
    let src = src.display().to_string();
    let args = [
        "prepare", "jsonl", "--src", &src, "--db", &db, "--name", "sft", "--json",
    ];
    let run = fx.run(&args);
    assert_ok(&run);
    let report = json(&run);
    assert_eq!(
        report["tables_imported"],
        serde_json::json!([["conversations", 20]])
    );
    let stats = fx.dataset_stats(&db).expect("one dataset");
    assert_eq!(stats["kind"], "instructions");
    assert_eq!(stats["conversations"], 20);
    let in_splits: u64 = stats["splits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s[1].as_u64().unwrap())
        .sum();
    assert_eq!(in_splits, 20);

    let bad = fx.run(&[
        "prepare", "jsonl", "--src", &src, "--db", &db, "--name", "x", "--format", "sharegpt",
    ]);
    assert_eq!(bad.code, Some(2));
    assert!(
        bad.stderr
            .contains("alpaca.jsonl: line 1: `conversations` is not a list"),
        "{}",
        bad.stderr
    );
}

#[test]
fn prepare_mimic_with_the_code_sets_marks_gold_codes_billable() {
    let Some(home) = icd_home() else { return };
    let fx = Fixture::new(&SyntheticMimic::small());
    let (src, db) = (fx.src.display().to_string(), fx.db("db.duckdb"));
    let run = medcoder(
        home.root(),
        &["prepare", "mimic", "--src", &src, "--db", &db],
        None,
    );
    assert_ok(&run);
    let line = run
        .stdout
        .lines()
        .find(|l| l.trim_start().starts_with("gold codes:"))
        .unwrap_or_default();
    assert!(line.contains("billable"), "{}", run.stdout);
    assert!(line.contains("icd9"), "{}", run.stdout);
    assert!(!line.contains("unchecked"), "{}", run.stdout);
    assert!(!run.stdout.contains("not checked"), "{}", run.stdout);
}

/// A SIGKILL at any moment of an import leaves a database that opens, with no dataset or a
/// complete one; running the import again finishes it, equal to a clean import.
#[test]
fn an_import_killed_midway_resumes_to_the_same_result() {
    let fx = Fixture::new(&SyntheticMimic {
        patients: 3_000,
        note_chars: 4_000,
        ..SyntheticMimic::small()
    });
    let clean_db = fx.db("clean.duckdb");
    let started = Instant::now();
    assert_ok(&fx.prepare_mimic(&clean_db, &[]));
    let clean_import = started.elapsed();
    let clean = fx.dataset_stats(&clean_db).expect("a dataset");
    assert_eq!(clean["documents"].as_u64(), Some(fx.counts.admissions));

    let src = fx.src.display().to_string();
    // Kill points spread over the time a clean import takes (~300-800 ms here), whatever
    // the machine's speed: each hits another step of a fresh import.
    for tenths in [2, 4, 6, 8, 9] {
        let db = fx.db(&format!("killed-{tenths}.duckdb"));
        let args = [
            "prepare",
            "mimic",
            "--src",
            src.as_str(),
            "--db",
            db.as_str(),
        ];
        let mut child = spawn_medcoder(&fx.home(), &args);
        std::thread::sleep(clean_import * tenths / 10);
        let finished = child.try_wait().unwrap().is_some();
        child.kill().unwrap();
        child.wait().unwrap();
        let after_kill = if Path::new(&db).exists() {
            fx.dataset_stats(&db)
        } else {
            None
        };
        eprintln!(
            "killed at {}/10 of {clean_import:?} (finished before: {finished}, dataset: {})",
            tenths,
            after_kill.is_some()
        );
        if let Some(stats) = after_kill {
            assert_eq!(stats, clean, "a dataset after a kill is a complete one");
        }
        assert_ok(&fx.run(&args));
        assert_eq!(
            fx.dataset_stats(&db).expect("a dataset"),
            clean,
            "resumed after {tenths}/10"
        );
    }
}
