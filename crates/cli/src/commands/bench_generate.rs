//! `medcoder bench generate`: prompt and decode speed of our generation on a GGUF file, side
//! by side with llama.cpp (llama-cpp-python, `../shared/bench/llamacpp_anchor.py`) on the same
//! file, prompt and thread count, in one run.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

use anyhow::{bail, Context};
use medcoder_assets::{MedcoderHome, ModelRef};
use serde::{Deserialize, Serialize};

/// The anchor's prompt: a clinical sentence repeated, cut to the prompt length in tokens.
const PROMPT_SENTENCE: &str =
    "The patient is a 67 year old man with type 2 diabetes, hypertension \
                               and chronic kidney disease admitted for chest pain. ";

#[derive(Debug, clap::Args)]
pub struct GenerateBenchArgs {
    /// A GGUF model (alias or path).
    #[arg(long, default_value = "smollm2-135m-instruct")]
    model: String,
    #[arg(long, default_value_t = 2)]
    threads: usize,
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    #[arg(long, default_value_t = 128)]
    new_tokens: usize,
    /// llama.cpp's anchor script.
    #[arg(long, default_value = "../shared/bench/llamacpp_anchor.py")]
    anchor: PathBuf,
    /// Python with llama-cpp-python (default: .venv-reference/bin/python if present, else python3).
    #[arg(long)]
    python: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Speed {
    pub kind: String,
    pub threads: usize,
    pub prompt_tokens: usize,
    pub prompt_tokens_per_s: f64,
    pub new: usize,
    pub decode_tokens_per_s: f64,
}

#[derive(Debug, Serialize)]
struct GenerateBench {
    machine: String,
    model: String,
    medcoder: Speed,
    llamacpp: Option<Speed>,
    anchor_missing: Option<String>,
    prompt_ratio: Option<f64>,
    decode_ratio: Option<f64>,
}

pub fn run(args: GenerateBenchArgs, home: &MedcoderHome) -> anyhow::Result<ExitCode> {
    let resolved = args.model.parse::<ModelRef>()?.resolve(home)?;
    let Some(file) = resolved.file.clone() else {
        bail!(
            "{}: bench generate compares GGUF files with llama.cpp; give a .gguf model",
            args.model
        );
    };
    let exe = std::env::current_exe()?;
    let ours = Command::new(exe)
        .args(["bench", "generate-run", "--model"])
        .arg(&file)
        .args([
            "--prompt-tokens",
            &args.prompt_tokens.to_string(),
            "--new-tokens",
            &args.new_tokens.to_string(),
        ])
        .env("RAYON_NUM_THREADS", args.threads.to_string())
        .stderr(Stdio::inherit())
        .output()
        .context("running our generation")?;
    if !ours.status.success() {
        bail!("our generation run failed ({})", ours.status);
    }
    let mut medcoder: Speed =
        serde_json::from_slice(&ours.stdout).context("reading our run's result")?;
    medcoder.threads = args.threads;
    let (llamacpp, anchor_missing) = match run_anchor(&args, &file) {
        Ok(speed) => (Some(speed), None),
        Err(reason) => (None, Some(format!("{reason:#}"))),
    };
    let report = GenerateBench {
        machine: super::bench::machine(),
        model: file.display().to_string(),
        prompt_ratio: llamacpp
            .as_ref()
            .map(|l| medcoder.prompt_tokens_per_s / l.prompt_tokens_per_s),
        decode_ratio: llamacpp
            .as_ref()
            .map(|l| medcoder.decode_tokens_per_s / l.decode_tokens_per_s),
        medcoder,
        llamacpp,
        anchor_missing,
    };
    if args.json {
        super::print_json(&report)?;
        return Ok(ExitCode::SUCCESS);
    }
    outln!("machine: {}", report.machine);
    outln!("model: {}", report.model);
    for speed in std::iter::once(&report.medcoder).chain(report.llamacpp.as_ref()) {
        outln!(
            "{:<10} {} threads   prompt {:>4} tok: {:>7.1} tok/s   decode {:>4} tok: {:>7.1} tok/s",
            speed.kind,
            speed.threads,
            speed.prompt_tokens,
            speed.prompt_tokens_per_s,
            speed.new,
            speed.decode_tokens_per_s
        );
    }
    match (
        &report.prompt_ratio,
        &report.decode_ratio,
        &report.anchor_missing,
    ) {
        (Some(p), Some(d), _) => outln!(
            "ratio medcoder / llama.cpp: prompt {p:.2}x, decode {d:.2}x (target decode >= 1.0x)"
        ),
        (_, _, Some(reason)) => outln!("llama.cpp anchor not run: {reason}"),
        _ => {}
    }
    Ok(ExitCode::SUCCESS)
}

fn run_anchor(args: &GenerateBenchArgs, gguf: &Path) -> anyhow::Result<Speed> {
    if !args.anchor.is_file() {
        bail!("{} not found (pass --anchor)", args.anchor.display());
    }
    let python = super::bench::anchor_python(args.python.as_ref());
    let output = Command::new(&python)
        .arg(&args.anchor)
        .arg(gguf)
        .args([
            "--threads",
            &args.threads.to_string(),
            "--prompt-tokens",
            &args.prompt_tokens.to_string(),
            "--new",
            &args.new_tokens.to_string(),
        ])
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    if !output.status.success() {
        bail!(
            "{} {} failed ({}): is llama-cpp-python installed (scripts/reference/setup-venv)?",
            python.display(),
            args.anchor.display(),
            output.status
        );
    }
    let line = String::from_utf8_lossy(&output.stdout);
    let line = line.lines().last().unwrap_or_default();
    serde_json::from_str(line).with_context(|| format!("reading the anchor's output `{line}`"))
}

/// The measured run, in its own process so that the thread count applies: prefill of the
/// prompt (in pieces, as `generate` does), then greedy decoding of `new_tokens` (stop tokens
/// ignored).
pub fn run_measurement(
    model: &Path,
    prompt_tokens: usize,
    new_tokens: usize,
) -> anyhow::Result<ExitCode> {
    let resolved = medcoder_assets::ResolvedModel {
        dir: model.parent().map(Path::to_path_buf).unwrap_or_default(),
        file: Some(model.to_path_buf()),
    };
    let model =
        medcoder_models::load_model(&resolved, &medcoder_models::DeviceSpec::Cpu.device()?, None)?;
    let text = PROMPT_SENTENCE.repeat(64);
    let mut prompt = model.tokenizer.encode(&text)?;
    prompt.truncate(prompt_tokens);
    // warm-up, as the anchor does
    let mut cache = model.lm.new_cache();
    model
        .lm
        .next_token_logits(&prompt[..8.min(prompt.len())], &mut cache)?;
    let mut cache = model.lm.new_cache();
    let started = Instant::now();
    // As `generate` prefills: in pieces of PREFILL_CHUNK tokens.
    let logits = medcoder_infer::prefill(&model, &prompt, &mut cache)?;
    let prefill = started.elapsed().as_secs_f64();
    let mut logits = candle_core::Tensor::new(logits.as_slice(), &candle_core::Device::Cpu)?;
    let started = Instant::now();
    for _ in 0..new_tokens {
        let id = medcoder_models::transformer::argmax(&logits)?;
        logits = model.lm.next_token_logits(&[id], &mut cache)?;
    }
    let decode = started.elapsed().as_secs_f64();
    let speed = Speed {
        kind: "medcoder".into(),
        threads: std::env::var("RAYON_NUM_THREADS")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0),
        prompt_tokens: prompt.len(),
        prompt_tokens_per_s: prompt.len() as f64 / prefill,
        new: new_tokens,
        decode_tokens_per_s: new_tokens as f64 / decode,
    };
    outln!("{}", serde_json::to_string(&speed)?);
    Ok(ExitCode::SUCCESS)
}
