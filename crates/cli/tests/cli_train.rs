//! End-to-end tests of `medcoder train`: a synthetic MIMIC-IV release prepared and tokenized by
//! the binary for a tiny random llama written by the test; LoRA training with evaluation,
//! checkpoints and a PEFT adapter; a run killed with SIGKILL at a random step resumes to the
//! same loss curve as an uninterrupted one (with and without packing).

mod support;
#[path = "../../train/tests/support/tiny_model.rs"]
mod tiny_model;
#[path = "../../train/tests/support/tokenizer.rs"]
mod tokenizer_fixture;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use medcoder_assets::MedcoderHome;
use medcoder_models::ModelTokenizer;
use medcoder_store::synthetic::{write_synthetic_mimic_iv, SyntheticMimic};
use medcoder_store::Store;
use serde_json::Value;
use support::{assert_ok, medcoder, Run};

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("a temp dir");
        std::fs::create_dir(dir.path().join("home")).expect("an empty home");
        let src = dir.path().join("release");
        let spec = SyntheticMimic {
            patients: 24,
            note_chars: 300,
            diagnoses_per_admission: 2,
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
            let doc = store
                .document("mimic-iv", &id)
                .expect("a document")
                .expect("listed");
            corpus.extend(doc.text);
            corpus.push(doc.diagnoses.join(", "));
        }
        drop(store);
        tokenizer_fixture::write_chatml_tokenizer(&fx.model_dir(), &corpus);
        let vocab = ModelTokenizer::from_dir(&fx.model_dir())
            .expect("the fixture tokenizer")
            .vocab_size();
        tiny_model::write_tiny_llama(&fx.model_dir(), vocab, 11);
        let (db, model) = (fx.db(), fx.model_dir().display().to_string());
        assert_ok(&fx.run(&[
            "prepare",
            "tokens",
            "--db",
            &db,
            "--dataset",
            "mimic-iv",
            "--model",
            &model,
            "--max-len",
            "160",
            "--truncation",
            "head",
        ]));
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

    /// A config file for a run into `name/`, with `extra` YAML lines.
    fn config(&self, name: &str, extra: &str) -> (PathBuf, PathBuf) {
        let run_dir = self.dir.path().join(name);
        let text = format!(
            "model: {}\ndb: {}\ndataset: mimic-iv\noutput_dir: {}\nmethod: lora\n\
             lora: {{r: 4, alpha: 8, dropout: 0.1, target_modules: [all-linear]}}\n\
             device: cpu\nmax_len: 160\noverlong: drop\nbatch_size: 2\nmax_steps: 14\n\
             optimizer: {{learning_rate: 5.0e-3, schedule: cosine, warmup_steps: 2}}\n\
             eval_every: 5\neval_examples: 4\nsave_every: 2\nkeep_last: 2\nseed: 7\n{extra}",
            self.model_dir().display(),
            self.db(),
            run_dir.display()
        );
        let path = self.dir.path().join(format!("{name}.yaml"));
        std::fs::write(&path, text).expect("the config");
        (path, run_dir)
    }
}

fn metrics(run_dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// (step, value) points of a curve.
type Curve = Vec<(u64, f64)>;

/// (step, loss) of the training steps and (step, eval_loss) of the evaluations.
fn curves(run_dir: &Path) -> (Curve, Curve) {
    let records = metrics(run_dir);
    let pick = |key: &str| -> Curve {
        records
            .iter()
            .filter_map(|r| Some((r["step"].as_u64()?, r.get(key)?.as_f64()?)))
            .collect()
    };
    (pick("loss"), pick("eval_loss"))
}

fn assert_same_curve(a: &[(u64, f64)], b: &[(u64, f64)], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: {a:?} vs {b:?}");
    for ((sa, la), (sb, lb)) in a.iter().zip(b) {
        assert_eq!(sa, sb, "{what}");
        assert!(
            (la - lb).abs() <= 1e-6 * la.abs().max(1.0),
            "{what} at step {sa}: {la} vs {lb}"
        );
    }
}

#[test]
fn lora_training_learns_checkpoints_and_writes_a_peft_adapter() {
    let fx = Fixture::new();
    let (config, run_dir) = fx.config("run", "");
    let config = config.display().to_string();
    let run = fx.run(&["train", "--config", &config, "--json"]);
    assert_ok(&run);
    let summary: Value = serde_json::from_str(&run.stdout).expect("a JSON summary");
    assert_eq!(summary["steps"], 14);
    let (train, eval) = curves(&run_dir);
    assert_eq!(train.len(), 14);
    assert!(eval.len() >= 3, "{eval:?}");
    let (first, best) = (
        eval[0].1,
        summary["best_eval_loss"].as_f64().expect("a best loss"),
    );
    assert!(best < first, "the evaluation loss fell: {first} → {best}");
    // The adapter as PEFT writes it.
    let adapter: Value = serde_json::from_str(
        &std::fs::read_to_string(run_dir.join("adapter_config.json")).expect("adapter_config.json"),
    )
    .expect("JSON");
    assert_eq!(adapter["peft_type"], "LORA");
    assert_eq!(adapter["r"], 4);
    assert_eq!(adapter["lora_alpha"], 8.0);
    assert_eq!(adapter["task_type"], "CAUSAL_LM");
    let targets = adapter["target_modules"].as_array().expect("a list").len();
    assert_eq!(targets, 7);
    let tensors = candle_core::safetensors::load(
        run_dir.join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .expect("adapter_model.safetensors");
    assert_eq!(tensors.len(), 2 * 7 * tiny_model::LAYERS);
    let a = &tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"];
    let b = &tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"];
    assert_eq!(a.dims(), &[4, tiny_model::HIDDEN]);
    assert_eq!(b.dims(), &[tiny_model::HIDDEN, 4]);
    // Checkpoints: the last two and the best; the plot and the resolved config.
    let checkpoints = std::fs::read_dir(run_dir.join("checkpoints"))
        .expect("checkpoints")
        .count();
    assert!(
        (2..=3).contains(&checkpoints),
        "{checkpoints} checkpoints kept"
    );
    assert!(run_dir.join("config.yaml").is_file());
    assert!(run_dir.join("loss.png").is_file());
    // A second run of the same config finds the run complete and changes nothing.
    let before = std::fs::read(run_dir.join("metrics.jsonl")).expect("metrics");
    let again = fx.run(&[
        "train",
        "--config",
        &config,
        "--json",
        "--register",
        "coder",
    ]);
    assert_ok(&again);
    assert!(
        again.stderr.contains("registered coder@"),
        "{}",
        again.stderr
    );
    assert_eq!(
        before,
        std::fs::read(run_dir.join("metrics.jsonl")).expect("metrics")
    );
    // The adapter loads back for generation on its base.
    let model = fx.model_dir().display().to_string();
    let adapter_dir = run_dir.display().to_string();
    assert_ok(&fx.run(&[
        "generate",
        "--model",
        &model,
        "--adapter",
        &adapter_dir,
        "--prompt",
        "Predict",
        "--max-tokens",
        "3",
    ]));
    assert_llm_engine_writes_only_allowed_codes(&fx, &model, &adapter_dir);
    // The registered run codes as `--adapter coder@dev` (its base model from the registry),
    // and the prediction names the version.
    let db = fx.db();
    let coded = medcoder(
        &fx.dir.path().join("home"),
        &[
            "code",
            "--engine",
            "llm",
            "--adapter",
            "coder@dev",
            "--db",
            &db,
            "--dataset",
            "mimic-iv",
            "--device",
            "cpu",
            "--format",
            "json",
            "-",
        ],
        Some("Patient admitted with pneumonia."),
    );
    assert_ok(&coded);
    let prediction: Value = serde_json::from_str(&coded.stdout).expect("a JSON prediction");
    let name = prediction["model"].as_str().expect("a model string");
    assert!(name.contains("adapter coder@"), "{name}");
}

/// The trained adapter codes the validation notes through the llm engine: whatever a tiny
/// random model prefers, constrained decoding lets it write only codes of the training notes.
fn assert_llm_engine_writes_only_allowed_codes(fx: &Fixture, model: &str, adapter: &str) {
    let preds = fx.dir.path().join("llm-preds.jsonl");
    let db = fx.db();
    let code = [
        "code",
        "--engine",
        "llm",
        "--model",
        model,
        "--adapter",
        adapter,
        "--db",
        &db,
        "--dataset",
        "mimic-iv",
        "--device",
        "cpu",
    ];
    let split = [
        "--split",
        "validation",
        "--out",
        preds.to_str().expect("utf-8"),
    ];
    let coded = fx.run(&[&code[..], &split[..]].concat());
    assert_ok(&coded);
    let store = Store::open(Path::new(&db)).expect("open the database");
    let mut allowed = std::collections::HashSet::new();
    for id in store
        .document_ids("mimic-iv", Some(medcoder_store::Split::Train))
        .expect("ids")
    {
        let doc = store
            .document("mimic-iv", &id)
            .expect("read")
            .expect("listed");
        if doc.icd_version == Some(10) {
            allowed.extend(doc.diagnoses.into_iter().chain(doc.procedures));
        }
    }
    drop(store);
    let lines = std::fs::read_to_string(&preds).expect("predictions");
    let mut codes = 0;
    for line in lines.lines() {
        let p: Value = serde_json::from_str(line).expect("a JSON line");
        assert_eq!(p["engine"], "llm");
        for kind in ["diagnoses", "procedures"] {
            for c in p[kind].as_array().expect("a list") {
                let code = c["code"].as_str().expect("a code");
                assert!(allowed.contains(code), "{code} is not a training code");
                // The probability the model gave the code.
                let confidence = c["confidence"].as_f64().expect("a confidence");
                assert!(
                    confidence > 0.0 && confidence <= 1.0,
                    "{code}: {confidence}"
                );
                codes += 1;
            }
        }
    }
    assert!(lines.lines().count() > 0 && codes > 0, "{lines}");
    // Coded in one continuous batch: each note once, whatever order they finish in, none lost.
    let mut written: Vec<String> = lines
        .lines()
        .map(|l| {
            let p: Value = serde_json::from_str(l).expect("JSON");
            p["id"].as_str().expect("an id").to_string()
        })
        .collect();
    written.sort_unstable();
    written.dedup();
    assert!(
        coded
            .stdout
            .starts_with(&format!("coded {} notes (0 already in", written.len()))
            && coded.stdout.contains(", 0 skipped")
            && written.len() == lines.lines().count(),
        "{}: {written:?}",
        coded.stdout
    );
    // Against the US code set (where it is installed): every code reportable as written.
    if let Some(home) = support::icd_home() {
        let us = fx.dir.path().join("llm-us.jsonl");
        let out = [
            "--allowed",
            "us-billable",
            "--out",
            us.to_str().expect("utf-8"),
        ];
        let run = medcoder(
            home.root(),
            &[&code[..], &out[..], &["--split", "validation"]].concat(),
            None,
        );
        assert_ok(&run);
        let kb = medcoder_icd::IcdKnowledge::load(&home).expect("the code sets");
        let text = std::fs::read_to_string(&us).expect("predictions");
        for line in text.lines() {
            let p: Value = serde_json::from_str(line).expect("a JSON line");
            for kind in ["diagnoses", "procedures"] {
                for c in p[kind].as_array().expect("a list") {
                    let code = c["code"].as_str().expect("a code");
                    assert!(kb.validate(code).is_ok(), "{code} is not reportable");
                }
            }
        }
    }
    let run = fx.run(
        &[
            &code[..],
            &["--allowed", "us", "--split", "validation", "--out", "x"],
        ]
        .concat(),
    );
    assert_ne!(run.code, Some(0));
    assert!(
        run.stderr.contains("medcoder assets fetch"),
        "{}",
        run.stderr
    );
    assert_ok(&fx.run(&[
        "eval",
        "--pred",
        preds.to_str().expect("utf-8"),
        "--gold",
        &db,
        "--dataset",
        "mimic-iv",
        "--split",
        "validation",
    ]));
}

#[test]
fn a_run_killed_at_a_random_step_resumes_to_the_same_curve() {
    let fx = Fixture::new();
    for (name, extra) in [("plain", ""), ("packed", "packing: true\n")] {
        killed_and_resumed_equals_whole(&fx, name, extra);
    }
}

/// A run of the config with `extra` lines, killed at a step chosen by the clock and resumed,
/// ends with the losses and adapter of an uninterrupted one.
fn killed_and_resumed_equals_whole(fx: &Fixture, name: &str, extra: &str) {
    let (config, whole) = fx.config(&format!("{name}-whole"), extra);
    assert_ok(&fx.run(&[
        "train",
        "--config",
        &config.display().to_string(),
        "--quiet",
    ]));
    let (expected_train, expected_eval) = curves(&whole);

    let (config, killed) = fx.config(&format!("{name}-killed"), extra);
    // A step chosen by the clock, so that runs of the suite kill at different points.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let kill_after = 3 + (nanos as usize) % 8;
    let mut child = Command::new(env!("CARGO_BIN_EXE_medcoder"))
        .args([
            "train",
            "--config",
            &config.display().to_string(),
            "--quiet",
        ])
        .env(MedcoderHome::ENV, fx.dir.path().join("home"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start medcoder train");
    let started = Instant::now();
    let mut killed_mid_run = false;
    loop {
        if child.try_wait().expect("poll the run").is_some() {
            break;
        }
        let steps = curves(&killed).0.len();
        if steps >= kill_after {
            child.kill().expect("SIGKILL the run");
            child.wait().expect("reap the run");
            killed_mid_run = true;
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(300), "the run hung");
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(
        killed_mid_run,
        "{name}: the run ended before step {kill_after}: nothing was tested"
    );
    let resumed = fx.run(&["train", "--resume", &killed.display().to_string(), "--json"]);
    assert_ok(&resumed);
    let (train, eval) = curves(&killed);
    assert_same_curve(&expected_train, &train, &format!("{name}: training loss"));
    assert_same_curve(&expected_eval, &eval, &format!("{name}: evaluation loss"));
    let a = std::fs::read(whole.join("adapter_model.safetensors")).expect("adapter");
    let b = std::fs::read(killed.join("adapter_model.safetensors")).expect("adapter");
    assert_eq!(a, b, "{name}: the resumed run ends with the same adapter");
}

/// (file name, bytes) of one folder's files, sorted by name.
type FolderFiles = Vec<(String, Vec<u8>)>;

/// Names and files of the entries of a run's `checkpoints/` (one level of folders).
fn checkpoint_files(run_dir: &Path) -> Vec<(String, FolderFiles)> {
    let mut folders: Vec<(String, FolderFiles)> = std::fs::read_dir(run_dir.join("checkpoints"))
        .expect("a checkpoints folder")
        .flatten()
        .map(|folder| {
            let mut files: FolderFiles = std::fs::read_dir(folder.path())
                .expect("a checkpoint folder")
                .flatten()
                .map(|f| {
                    let bytes = std::fs::read(f.path()).expect("a checkpoint file");
                    (f.file_name().to_string_lossy().into_owned(), bytes)
                })
                .collect();
            files.sort();
            (folder.file_name().to_string_lossy().into_owned(), files)
        })
        .collect();
    folders.sort();
    folders
}

#[test]
fn a_full_disk_while_checkpointing_keeps_the_last_checkpoint_and_resume_goes_on() {
    // The file-size limit comes from bash's `ulimit -f` (KiB), with SIGXFSZ ignored so that a
    // write past it fails with EFBIG, as one on a full disk fails with ENOSPC.
    if !Path::new("/bin/bash").is_file() {
        eprintln!("skipping: /bin/bash sets the file-size limit and is not here");
        return;
    }
    let fx = Fixture::new();
    // Rank 1024: an 8 MiB adapter and 16 MiB of optimizer moments, far more than anything
    // else the run writes; the limit falls between the two.
    let rank = ["--set", "lora.r=1024"];
    let limit_kib = 12 * 1024;
    let (config, whole) = fx.config("disk-whole", "");
    let config_arg = config.display().to_string();
    let mut args = vec!["train", "--config", &config_arg, "--quiet"];
    args.extend(rank);
    assert_ok(&fx.run(&args));
    let (expected_train, expected_eval) = curves(&whole);

    // A run killed once it has a checkpoint…
    let (config, run_dir) = fx.config("disk-full", "");
    let config_arg = config.display().to_string();
    let mut child = Command::new(env!("CARGO_BIN_EXE_medcoder"))
        .args(["train", "--config", &config_arg, "--quiet"])
        .args(rank)
        .env(MedcoderHome::ENV, fx.dir.path().join("home"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start medcoder train");
    let first = run_dir.join("checkpoints/step-00000002/trainer_state.json");
    let started = Instant::now();
    while !first.is_file() {
        assert!(
            child.try_wait().expect("poll the run").is_none(),
            "the run ended without a checkpoint at step 2"
        );
        assert!(started.elapsed() < Duration::from_secs(300), "the run hung");
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().expect("SIGKILL the run");
    child.wait().expect("reap the run");
    let kept = medcoder_train::checkpoint::list_checkpoints(&run_dir);
    let (last_step, last_dir) = kept.last().cloned().expect("a checkpoint");
    let before: Vec<_> = checkpoint_files(&run_dir)
        .into_iter()
        .filter(|(name, _)| name.starts_with("step-"))
        .collect();

    // …resumed on a disk that fills up at the next checkpoint…
    let script = format!("trap '' XFSZ; ulimit -f {limit_kib}; exec \"$0\" \"$@\"");
    let run_dir_arg = run_dir.display().to_string();
    let full = Command::new("/bin/bash")
        .args(["-c", &script, env!("CARGO_BIN_EXE_medcoder")])
        .args(["train", "--resume", &run_dir_arg, "--quiet"])
        .env(MedcoderHome::ENV, fx.dir.path().join("home"))
        .output()
        .expect("run medcoder train under a file-size limit");
    let stderr = String::from_utf8_lossy(&full.stderr);
    assert_eq!(full.status.code(), Some(2), "{stderr}");
    let failed = run_dir.join(format!("checkpoints/step-{:08}", last_step + 2));
    assert!(
        stderr.contains(&failed.display().to_string())
            && stderr.contains("File too large")
            && stderr.contains(&last_dir.display().to_string()),
        "the error names the checkpoint it could not write, why, and the one kept: {stderr}"
    );
    // …leaves the checkpoints as they were, nothing half-written beside them…
    assert!(
        checkpoint_files(&run_dir) == before,
        "the checkpoints changed: {:?}",
        checkpoint_files(&run_dir)
            .iter()
            .map(|(name, _)| name)
            .collect::<Vec<_>>()
    );
    // …and once there is room, resuming ends where an uninterrupted run does.
    assert_ok(&fx.run(&["train", "--resume", &run_dir_arg, "--quiet"]));
    let (train, eval) = curves(&run_dir);
    assert_same_curve(&expected_train, &train, "training loss");
    assert_same_curve(&expected_eval, &eval, "evaluation loss");
    let a = std::fs::read(whole.join("adapter_model.safetensors")).expect("adapter");
    let b = std::fs::read(run_dir.join("adapter_model.safetensors")).expect("adapter");
    assert_eq!(a, b, "the resumed run ends with the same adapter");
}

#[test]
fn bad_configs_and_missing_data_fail_with_the_key_or_the_fix_named() {
    let fx = Fixture::new();
    let (config, _) = fx.config("typo", "lerning_rate: 1\n");
    let run = fx.run(&["train", "--config", &config.display().to_string()]);
    assert_eq!(run.code, Some(2));
    assert!(run.stderr.contains("lerning_rate"), "{}", run.stderr);

    let (config, _) = fx.config("badset", "");
    let run = fx.run(&[
        "train",
        "--config",
        &config.display().to_string(),
        "--set",
        "lora.rank=3",
    ]);
    assert!(run.stderr.contains("rank"), "{}", run.stderr);

    let run = fx.run(&[
        "train",
        "--config",
        &config.display().to_string(),
        "--set",
        "dataset=nothing",
    ]);
    assert_eq!(run.code, Some(2));
    assert!(run.stderr.contains("prepare tokens"), "{}", run.stderr);

    let run = fx.run(&[
        "train",
        "--config",
        &config.display().to_string(),
        "--set",
        "max_len=8",
    ]);
    assert!(
        run.stderr.contains("no trainable examples"),
        "{}",
        run.stderr
    );

    // A diverging run stops with the step named and its last checkpoint kept.
    let (config, run_dir) = fx.config("diverge", "");
    let run = fx.run(&[
        "train",
        "--config",
        &config.display().to_string(),
        "--set",
        "optimizer.learning_rate=1.0e+38",
        "--set",
        "optimizer.max_grad_norm=0",
        "--set",
        "optimizer.warmup_steps=0",
    ]);
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    assert!(run.stderr.contains("the loss became"), "{}", run.stderr);
    let kept = std::fs::read_dir(run_dir.join("checkpoints"))
        .map(|entries| entries.count())
        .unwrap_or(0);
    assert!(
        run.stderr.contains("none yet") || kept > 0,
        "a checkpoint is named and kept: {}",
        run.stderr
    );

    // Another config into a folder holding a run is refused, not mixed in.
    let (config, _) = fx.config("shared", "");
    let config = config.display().to_string();
    assert_ok(&fx.run(&["train", "--config", &config, "--set", "max_steps=2"]));
    let run = fx.run(&[
        "train",
        "--config",
        &config,
        "--set",
        "max_steps=2",
        "--set",
        "seed=8",
    ]);
    assert_eq!(run.code, Some(2));
    assert!(run.stderr.contains("--resume"), "{}", run.stderr);
}
