//! A checkpoint write that runs out of room: the save fails with the checkpoint's path named,
//! leaves no half-written folder, and the previous checkpoint stays byte for byte as it was
//! and restorable (resume continues from it).
//!
//! The failure is real, not a mocked writer: the save runs in a child process (this test
//! binary, re-run for one test) whose file-size limit (RLIMIT_FSIZE) lets the adapter through
//! and stops the optimizer moments part way, with SIGXFSZ ignored so that the write returns
//! EFBIG as a full disk returns ENOSPC.
#![cfg(unix)]
#![allow(clippy::unwrap_used)]
// `pre_exec` and `setrlimit` (the child's file-size limit).
#![allow(unsafe_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use medcoder_models::loader::load_hf_dir;
use medcoder_models::CausalLm;
use medcoder_train::checkpoint::{
    checkpoints_dir, list_checkpoints, restore, save_checkpoint, TrainerState,
};
use medcoder_train::optim::AdamW;
use medcoder_train::trainable::{make_trainable, Trainable};
use medcoder_train::TrainConfig;

/// Set in the child: the run folder it saves into.
const CHILD_ENV: &str = "MEDCODER_TEST_DISK_FULL_RUN_DIR";
const CHILD_TEST: &str = "child_saves_under_a_file_size_limit";

fn config() -> TrainConfig {
    TrainConfig::from_yaml(
        "model: tiny\ndb: none.duckdb\ndataset: none\noutput_dir: none\nlora: {r: 8, alpha: 16}\n",
        &[],
        "test",
    )
    .unwrap()
}

fn setup() -> (CausalLm, Trainable, AdamW) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tests/fixtures/tiny/llama");
    let mut lm = load_hf_dir(&dir, &Device::Cpu, DType::F32).unwrap().0;
    let config = config();
    let trainable = make_trainable(&mut lm, &config, false).unwrap();
    let optimizer = AdamW::new(config.optimizer.clone(), trainable.vars.clone()).unwrap();
    (lm, trainable, optimizer)
}

/// Give every variable values (and the optimizer moments) that differ from the start's.
fn train_a_step(trainable: &Trainable, optimizer: &mut AdamW, seed: f32) {
    for (_, var) in &trainable.vars {
        let shift = Tensor::full(seed, var.shape(), &Device::Cpu).unwrap();
        var.set(&(var.as_tensor() + shift).unwrap()).unwrap();
    }
    let grads: Vec<Option<Tensor>> = trainable
        .vars
        .iter()
        .map(|(_, v)| Some(Tensor::full(seed, v.shape(), &Device::Cpu).unwrap()))
        .collect();
    optimizer.apply(&grads, 1e-3).unwrap();
}

fn state(step: usize) -> TrainerState {
    TrainerState {
        step,
        epoch: 0,
        batch_in_epoch: step,
        tokens_seen: 10 * step as u64,
        seed: 42,
        total_steps: 10,
        ..TrainerState::default()
    }
}

fn folder_bytes(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn variables(trainable: &Trainable) -> Vec<Vec<f32>> {
    trainable
        .vars
        .iter()
        .map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
        .collect()
}

#[test]
fn a_full_disk_while_saving_keeps_the_previous_checkpoint_whole_and_resumable() {
    let run = tempfile::tempdir().unwrap();
    let (_lm, trainable, mut optimizer) = setup();
    train_a_step(&trainable, &mut optimizer, 0.01);
    let step1 = save_checkpoint(
        run.path(),
        &state(1),
        &trainable,
        &optimizer,
        "seed: 42\n",
        2,
    )
    .unwrap();
    let before = folder_bytes(&step1);
    let saved_values = variables(&trainable);
    // A limit between the adapter's size and the optimizer moments' (twice the adapter).
    let adapter = before["adapter_model.safetensors"].len() as u64;
    let moments = before["optimizer.safetensors"].len() as u64;
    assert!(moments > adapter + 1024, "{adapter} vs {moments} bytes");
    let limit = (adapter + moments) / 2;

    let output = child_under_file_size_limit(run.path(), limit);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the child failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // One failed save of a new step, one of the same step again (a run's final checkpoint).
    let errors: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.split_once("SAVE ERROR: ").map(|(_, error)| error))
        .collect();
    assert_eq!(errors.len(), 2, "{stdout}");
    let step2 = checkpoints_dir(run.path()).join("step-00000002");
    assert!(
        errors[0].contains(&step2.display().to_string()),
        "the error names the checkpoint: {}",
        errors[0]
    );
    assert!(
        errors[0].contains("File too large") && errors[0].contains("step-00000001"),
        "the error says why and which checkpoint is kept: {}",
        errors[0]
    );
    assert!(
        errors[1].contains(&step1.display().to_string()),
        "{}",
        errors[1]
    );

    // Nothing half-written is left, the previous checkpoint is as it was…
    assert_eq!(entries(&checkpoints_dir(run.path())), vec!["step-00000001"]);
    assert_eq!(
        list_checkpoints(run.path()),
        vec![(1, step1.clone())],
        "resume picks the previous checkpoint"
    );
    assert!(folder_bytes(&step1) == before, "step 1 was changed");
    // …and restores into a fresh run.
    let (_lm, fresh, mut fresh_optimizer) = setup();
    assert_ne!(variables(&fresh), saved_values);
    let restored = restore(&step1, &fresh, &mut fresh_optimizer, &Device::Cpu).unwrap();
    assert_eq!(restored, state(1));
    assert_eq!(variables(&fresh), saved_values);
    assert_eq!(
        fresh_optimizer.state_tensors().keys().collect::<Vec<_>>(),
        optimizer.state_tensors().keys().collect::<Vec<_>>()
    );
}

/// Re-run this test binary for [`child_saves_under_a_file_size_limit`] alone, with files
/// limited to `limit` bytes.
fn child_under_file_size_limit(run_dir: &Path, limit: u64) -> std::process::Output {
    use std::os::unix::process::CommandExt;
    let mut command = std::process::Command::new(std::env::current_exe().unwrap());
    command
        .args([CHILD_TEST, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, run_dir);
    // Safety: between fork and exec only async-signal-safe calls (setrlimit, signal).
    unsafe {
        command.pre_exec(move || {
            let rlimit = libc::rlimit {
                rlim_cur: limit as libc::rlim_t,
                rlim_max: limit as libc::rlim_t,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &rlimit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Ignored across exec: a write past the limit fails with EFBIG instead of
            // killing the process.
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            Ok(())
        });
    }
    command.output().unwrap()
}

/// The child's half: resume from step 1 (reading is unlimited), train on, try to save step 2
/// and step 1 again, and print the errors. Does nothing outside the child.
#[test]
fn child_saves_under_a_file_size_limit() {
    let Some(run_dir) = std::env::var_os(CHILD_ENV).map(PathBuf::from) else {
        return;
    };
    let (_lm, trainable, mut optimizer) = setup();
    let (_, step1) = list_checkpoints(&run_dir).pop().unwrap();
    let resumed = restore(&step1, &trainable, &mut optimizer, &Device::Cpu).unwrap();
    assert_eq!(resumed.step, 1);
    train_a_step(&trainable, &mut optimizer, 0.02);
    for step in [2, 1] {
        match save_checkpoint(
            &run_dir,
            &state(step),
            &trainable,
            &optimizer,
            "seed: 42\n",
            2,
        ) {
            Ok(dir) => panic!("{} was written past the file-size limit", dir.display()),
            Err(error) => println!("SAVE ERROR: {error}"),
        }
    }
}
