//! `medcoder bench …`: speed and memory, always side by side with the floor or the anchor,
//! measured in the same run, reported as a ratio.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Subcommand;
use medcoder_assets::MedcoderHome;
use medcoder_store::synthetic::{write_synthetic_mimic_iv, SyntheticMimic};
use medcoder_store::Store;
use serde::Serialize;

#[derive(Debug, Subcommand)]
// Parsed once per run: the size of its largest variant costs nothing worth boxing for.
#[allow(clippy::large_enum_variant)]
pub enum BenchCommand {
    /// Time `prepare mimic` on a synthetic full-scale MIMIC-IV release against DuckDB's plain
    /// read_csv of the same files (the floor), with peak RSS of each, in one run.
    Prepare {
        /// Where the synthetic release is generated once and reused
        /// (default: $MEDCODER_HOME/bench/mimic-iv-synthetic-<patients>).
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        /// Patients to generate (full scale: 300000).
        #[arg(long, default_value_t = 300_000)]
        patients: u64,
        /// Average characters per discharge note.
        #[arg(long, default_value_t = 10_000)]
        note_chars: usize,
        #[arg(long)]
        json: bool,
    },
    /// Prompt and decode tokens/s of our generation on a GGUF file against llama.cpp
    /// (llama-cpp-python) on the same file, prompt and threads, in one run.
    Generate(super::bench_generate::GenerateBenchArgs),
    /// One measured generation run (used by `bench generate`).
    #[command(hide = true)]
    GenerateRun {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        prompt_tokens: usize,
        #[arg(long)]
        new_tokens: usize,
    },
    /// A long prompt joining a continuous batch while another sequence decodes: chunked
    /// prefill against whole-prompt prefill (the decoding sequence's longest wait, the
    /// prompt's first token), in one run.
    Join(super::bench_join::JoinBenchArgs),
    /// Notes/s and per-note latency (p50/p99) of a coding engine on ~2 KB notes.
    Code(super::bench_code::CodeBenchArgs),
    /// The server under load: wrk on loopback against POST /v1/code (retrieval engine):
    /// req/s, p50/p90/p99 latency, and resident memory after 1k and after 10k+ requests.
    Serve(super::bench_serve::ServeBenchArgs),
    /// LoRA SFT tokens/s and peak RSS of our trainer against PyTorch + PEFT on the same
    /// SmolLM2-135M-shaped model, threads, sequence and batch, in f32 and bf16, in one run.
    Train(super::bench_train::TrainBenchArgs),
    /// One measured training run (used by `bench train`).
    #[command(hide = true)]
    TrainRun {
        #[arg(long)]
        seq: usize,
        #[arg(long)]
        batch: usize,
        #[arg(long)]
        steps: usize,
        #[arg(long)]
        rank: usize,
        #[arg(long)]
        gradient_checkpointing: bool,
    },
    /// The floor alone: DuckDB's plain read_csv of every CSV under --src (used by `bench prepare`).
    #[command(hide = true)]
    ReadCsvFloor {
        #[arg(long)]
        src: PathBuf,
        #[arg(long)]
        db: PathBuf,
    },
}

#[derive(Debug, Serialize)]
struct Measured {
    what: String,
    seconds: f64,
    peak_rss_mib: f64,
}

#[derive(Debug, Serialize)]
struct PrepareBench {
    machine: String,
    release: medcoder_store::synthetic::SyntheticCounts,
    floor: Measured,
    prepare: Measured,
    time_ratio: f64,
}

pub fn run(command: BenchCommand, home: &MedcoderHome) -> anyhow::Result<ExitCode> {
    match command {
        BenchCommand::Generate(args) => super::bench_generate::run(args, home),
        BenchCommand::Code(args) => super::bench_code::run(args, home),
        BenchCommand::Join(args) => super::bench_join::run(args, home),
        BenchCommand::Serve(args) => super::bench_serve::run(args, home),
        BenchCommand::Train(args) => super::bench_train::run(args),
        BenchCommand::TrainRun {
            seq,
            batch,
            steps,
            rank,
            gradient_checkpointing,
        } => super::bench_train::run_measurement(seq, batch, steps, rank, gradient_checkpointing),
        BenchCommand::GenerateRun {
            model,
            prompt_tokens,
            new_tokens,
        } => super::bench_generate::run_measurement(&model, prompt_tokens, new_tokens),
        BenchCommand::ReadCsvFloor { src, db } => {
            let store = Store::open(&db)?;
            let files = medcoder_store::floor::csv_files(&src)?;
            let rows = medcoder_store::floor::plain_read_csv(&store, &files)?;
            outln!("{rows}");
            Ok(ExitCode::SUCCESS)
        }
        BenchCommand::Prepare {
            dir,
            patients,
            note_chars,
            json,
        } => {
            let spec = SyntheticMimic {
                patients,
                note_chars,
                ..SyntheticMimic::full_scale()
            };
            let dir = dir.unwrap_or_else(|| {
                home.root()
                    .join("bench")
                    .join(format!("mimic-iv-synthetic-{patients}-{note_chars}"))
            });
            let release = ensure_release(&dir, &spec)?;
            let work = tempfile::Builder::new()
                .prefix("medcoder-bench-")
                .tempdir_in(home.root())?;
            let exe = std::env::current_exe()?;
            let src = dir.to_string_lossy().into_owned();
            let floor_db = work
                .path()
                .join("floor.duckdb")
                .to_string_lossy()
                .into_owned();
            let prepare_db = work
                .path()
                .join("prepare.duckdb")
                .to_string_lossy()
                .into_owned();
            let floor = measure(
                "duckdb read_csv (floor)",
                Command::new(&exe).args([
                    "bench",
                    "read-csv-floor",
                    "--src",
                    &src,
                    "--db",
                    &floor_db,
                ]),
            )?;
            let prepare = measure(
                "medcoder prepare mimic",
                Command::new(&exe)
                    .args(["prepare", "mimic", "--src", &src, "--db", &prepare_db])
                    .env("MEDCODER_HOME", work.path().join("empty-home")),
            )?;
            let report = PrepareBench {
                machine: machine(),
                release,
                time_ratio: prepare.seconds / floor.seconds,
                floor,
                prepare,
            };
            if json {
                super::print_json(&report)?;
            } else {
                outln!("machine: {}", report.machine);
                outln!(
                    "release: {} patients, {} admissions, {} notes, {} diagnosis rows, {:.0} MB gzipped",
                    report.release.patients,
                    report.release.admissions,
                    report.release.notes,
                    report.release.diagnosis_rows,
                    report.release.bytes_written as f64 / 1e6
                );
                for m in [&report.floor, &report.prepare] {
                    outln!(
                        "{:<28} {:>8.1} s   peak RSS {:>7.0} MiB",
                        m.what,
                        m.seconds,
                        m.peak_rss_mib
                    );
                }
                outln!(
                    "ratio prepare / floor: {:.2}x (target <= 1.5x, peak RSS < 4096 MiB)",
                    report.time_ratio
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Generate the synthetic release once; a spec file beside it says what was generated.
fn ensure_release(
    dir: &Path,
    spec: &SyntheticMimic,
) -> anyhow::Result<medcoder_store::synthetic::SyntheticCounts> {
    let marker = dir.join("synthetic.json");
    if let Ok(text) = std::fs::read_to_string(&marker) {
        if let Ok(counts) = serde_json::from_str(&text) {
            return Ok(counts);
        }
    }
    eprintln!(
        "generating a synthetic MIMIC-IV release in {} (once)…",
        dir.display()
    );
    let started = Instant::now();
    let counts = write_synthetic_mimic_iv(dir, spec)?;
    std::fs::write(&marker, serde_json::to_string_pretty(&counts)?)?;
    eprintln!("generated in {:.0} s", started.elapsed().as_secs_f64());
    Ok(counts)
}

/// Run a command, timing it and polling its peak resident memory (VmHWM) until it exits.
fn measure(what: &str, command: &mut Command) -> anyhow::Result<Measured> {
    let started = Instant::now();
    let mut child = command
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    let status_file = format!("/proc/{}/status", child.id());
    let mut peak_kib = 0u64;
    let status = loop {
        if let Ok(text) = std::fs::read_to_string(&status_file) {
            if let Some(kib) = text
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
            {
                peak_kib = peak_kib.max(kib);
            }
        }
        if let Some(status) = child.try_wait()? {
            break status;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(Measured {
        what: what.to_string(),
        seconds: started.elapsed().as_secs_f64(),
        peak_rss_mib: peak_kib as f64 / 1024.0,
    })
}

/// The Python an anchor runs with: the one given, else `.venv-reference/bin/python` when it
/// exists (scripts/reference/setup-venv), else `python3`.
pub(crate) fn anchor_python(explicit: Option<&PathBuf>) -> PathBuf {
    if let Some(python) = explicit {
        return python.clone();
    }
    let venv = PathBuf::from(".venv-reference/bin/python");
    if venv.is_file() {
        venv
    } else {
        PathBuf::from("python3")
    }
}

pub(crate) fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cpu}, {cores} cores")
}
