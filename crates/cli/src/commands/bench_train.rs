//! `medcoder bench train`: LoRA SFT step throughput and peak RSS of our trainer on a
//! random-weight SmolLM2-135M-shaped llama, side by side with PyTorch + PEFT on the same shape,
//! threads, sequence length and batch (`../shared/bench/peft_cpu_anchor.py`), in f32 and bf16,
//! in one run. Each side runs in its own process, so each peak RSS is its own.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor, Var};
use medcoder_train::config::LossOn;
use medcoder_train::data::{pad_batch, Example};
use medcoder_train::metrics::peak_rss_mib;
use medcoder_train::optim::{clip_grad_norm, AdamW};
use medcoder_train::trainable::make_trainable;
use medcoder_train::trainer::batch_loss_and_grads;
use medcoder_train::TrainConfig;
use serde::{Deserialize, Serialize};

/// The anchor's model shape (peft_cpu_anchor.py's SMOLLM2_135M).
const HIDDEN: usize = 576;
const INTERMEDIATE: usize = 1536;
const LAYERS: usize = 30;
const HEADS: usize = 9;
const KV_HEADS: usize = 3;
const VOCAB: usize = 49152;

#[derive(Debug, clap::Args)]
pub struct TrainBenchArgs {
    #[arg(long, default_value_t = 2)]
    threads: usize,
    #[arg(long, default_value_t = 512)]
    seq: usize,
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Measured steps (after 2 warm-up steps, as the anchor).
    #[arg(long, default_value_t = 6)]
    steps: usize,
    #[arg(long, default_value_t = 16)]
    rank: usize,
    /// Recompute activations layer by layer in the backward pass (less memory).
    #[arg(long)]
    gradient_checkpointing: bool,
    /// The PyTorch + PEFT anchor script.
    #[arg(long, default_value = "../shared/bench/peft_cpu_anchor.py")]
    anchor: PathBuf,
    /// Python with torch, transformers and peft (default: .venv-reference/bin/python if
    /// present, else python3).
    #[arg(long)]
    python: Option<PathBuf>,
    /// Anchor precisions to run.
    #[arg(long, value_delimiter = ',', default_value = "float32,bfloat16")]
    anchor_dtypes: Vec<String>,
    #[arg(long)]
    json: bool,
}

/// One side's measurement.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepSpeed {
    pub who: String,
    pub dtype: String,
    pub tokens_per_s: f64,
    pub step_s: f64,
    pub peak_rss_gib: f64,
    #[serde(default)]
    pub losses: Vec<f64>,
}

#[derive(Debug, Serialize)]
struct TrainBenchReport {
    machine: String,
    threads: usize,
    seq: usize,
    batch: usize,
    rank: usize,
    medcoder: StepSpeed,
    anchors: Vec<StepSpeed>,
    anchor_errors: Vec<String>,
    /// Ours over the fastest anchor.
    speed_ratio: Option<f64>,
    /// Our peak RSS over that anchor's.
    memory_ratio: Option<f64>,
}

pub fn run(args: TrainBenchArgs) -> anyhow::Result<ExitCode> {
    let exe = std::env::current_exe().context("locating the medcoder binary")?;
    let output = Command::new(exe)
        .args([
            "bench",
            "train-run",
            "--seq",
            &args.seq.to_string(),
            "--batch",
            &args.batch.to_string(),
            "--steps",
            &args.steps.to_string(),
            "--rank",
            &args.rank.to_string(),
        ])
        .args(
            args.gradient_checkpointing
                .then_some("--gradient-checkpointing"),
        )
        .env("RAYON_NUM_THREADS", args.threads.to_string())
        .stderr(Stdio::inherit())
        .output()
        .context("running the measured training")?;
    if !output.status.success() {
        bail!("the measured training run failed ({})", output.status);
    }
    let ours: StepSpeed = last_json_line(&output.stdout)?;
    let mut anchors = Vec::new();
    let mut anchor_errors = Vec::new();
    for dtype in &args.anchor_dtypes {
        match run_anchor(&args, dtype) {
            Ok(speed) => anchors.push(speed),
            Err(error) => anchor_errors.push(format!("{dtype}: {error:#}")),
        }
    }
    let fastest = anchors
        .iter()
        .max_by(|a, b| a.tokens_per_s.total_cmp(&b.tokens_per_s));
    let report = TrainBenchReport {
        machine: super::bench::machine(),
        threads: args.threads,
        seq: args.seq,
        batch: args.batch,
        rank: args.rank,
        speed_ratio: fastest.map(|a| ours.tokens_per_s / a.tokens_per_s),
        memory_ratio: fastest.map(|a| ours.peak_rss_gib / a.peak_rss_gib),
        medcoder: ours,
        anchors,
        anchor_errors,
    };
    if args.json {
        super::print_json(&report)?;
        return Ok(ExitCode::SUCCESS);
    }
    outln!(
        "LoRA SFT step, SmolLM2-135M shape, r{} all-linear, seq {} × batch {}, {} threads — {}",
        report.rank,
        report.seq,
        report.batch,
        report.threads,
        report.machine
    );
    outln!(
        "{:<24} {:>10} {:>9} {:>12}",
        "",
        "tokens/s",
        "step s",
        "peak RSS GiB"
    );
    for s in std::iter::once(&report.medcoder).chain(&report.anchors) {
        outln!(
            "{:<24} {:>10.1} {:>9.2} {:>12.2}",
            format!("{} {}", s.who, s.dtype),
            s.tokens_per_s,
            s.step_s,
            s.peak_rss_gib
        );
    }
    for error in &report.anchor_errors {
        outln!("anchor not run: {error}");
    }
    if let (Some(speed), Some(memory)) = (report.speed_ratio, report.memory_ratio) {
        outln!(
            "medcoder / fastest anchor: {speed:.2}× tokens/s at {memory:.2}× peak RSS (target ≥ 1.5× at ≤ 0.7×)"
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn last_json_line<T: for<'de> Deserialize<'de>>(stdout: &[u8]) -> anyhow::Result<T> {
    let text = String::from_utf8_lossy(stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .context("no JSON line in the output")?;
    serde_json::from_str(line).with_context(|| format!("reading `{line}`"))
}

#[derive(Deserialize)]
struct AnchorLine {
    kind: Option<String>,
    tokens_per_s: Option<f64>,
    step_s: Option<f64>,
    peak_rss_gib: Option<f64>,
}

fn run_anchor(args: &TrainBenchArgs, dtype: &str) -> anyhow::Result<StepSpeed> {
    if !args.anchor.is_file() {
        bail!("{} not found (pass --anchor)", args.anchor.display());
    }
    let python = super::bench::anchor_python(args.python.as_ref());
    let output = Command::new(&python)
        .arg(&args.anchor)
        .args(["--threads", &args.threads.to_string()])
        .args(["--seq", &args.seq.to_string()])
        .args(["--batch", &args.batch.to_string()])
        .args(["--steps", &args.steps.to_string()])
        .args(["--dtype", dtype, "--skip-generate"])
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    if !output.status.success() {
        bail!(
            "{} {} failed ({}): are torch, transformers and peft installed? {}",
            python.display(),
            args.anchor.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
                .lines()
                .last()
                .unwrap_or_default()
        );
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let line = text
        .lines()
        .filter_map(|l| serde_json::from_str::<AnchorLine>(l).ok())
        .find(|l| l.kind.as_deref() == Some("lora_sft_step"))
        .context("the anchor printed no lora_sft_step line")?;
    Ok(StepSpeed {
        who: "pytorch+peft".into(),
        dtype: dtype.into(),
        tokens_per_s: line.tokens_per_s.unwrap_or(0.0),
        step_s: line.step_s.unwrap_or(0.0),
        peak_rss_gib: line.peak_rss_gib.unwrap_or(0.0),
        losses: Vec::new(),
    })
}

/// The measured side, in its own process: a random-weight model of the anchor's shape, LoRA
/// r`rank` on every linear layer of the blocks, loss on every token (labels = inputs, as the
/// anchor), AdamW steps on one fixed random batch.
pub fn run_measurement(
    seq: usize,
    batch: usize,
    steps: usize,
    rank: usize,
    checkpointing: bool,
) -> anyhow::Result<ExitCode> {
    // Built in memory, as the anchor builds its model: no file pages in the peak RSS.
    let mut lm = random_model()?;
    let config = TrainConfig::from_yaml(
        &format!(
            "model: random\ndb: none\ndataset: none\noutput_dir: none\nloss_on: all\n\
             lora: {{r: {rank}, alpha: {}, dropout: 0.0, target_modules: [all-linear]}}\n",
            2 * rank
        ),
        &[],
        "bench",
    )?;
    let trainable = make_trainable(&mut lm, &config, false)?;
    let vars: Vec<Var> = trainable.vars.iter().map(|(_, v)| v.clone()).collect();
    let mut optimizer = AdamW::new(config.optimizer.clone(), trainable.vars.clone())?;
    let mut state = 0x5EED_u64;
    let rows: Vec<Example> = (0..batch)
        .map(|i| Example {
            doc_id: i.to_string(),
            ids: (0..seq)
                .map(|_| (medcoder_models::lora::splitmix64(&mut state) % VOCAB as u64) as u32)
                .collect(),
            prompt_len: 0,
        })
        .collect();
    let refs: Vec<&Example> = rows.iter().collect();
    let padded = pad_batch(&refs, 0, LossOn::All);
    let targets = padded.targets.len() as f64;
    let warm = 2;
    let mut losses = Vec::new();
    let mut started = Instant::now();
    for step in 0..warm + steps {
        if step == warm {
            started = Instant::now();
        }
        let pool = medcoder_models::transformer::compute_pool();
        let run =
            || batch_loss_and_grads(&lm, &padded, targets, &vars, &Device::Cpu, checkpointing);
        let (sum, mut grads) = match pool {
            Some(pool) => pool.install(run)?,
            None => run()?,
        };
        clip_grad_norm(&mut grads, 1.0)?;
        optimizer.apply(&grads, 2e-4)?;
        losses.push(sum / targets);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let kernels = match medcoder_models::lora_train_cpu::unsupported_reason(&lm) {
        None => "cpu pass",
        Some(_) => "autograd",
    };
    let speed = StepSpeed {
        who: format!(
            "medcoder ({kernels}{})",
            if checkpointing { ", ckpt" } else { "" }
        ),
        dtype: "float32".into(),
        tokens_per_s: (batch * seq * steps) as f64 / elapsed,
        step_s: elapsed / steps as f64,
        peak_rss_gib: peak_rss_mib() / 1024.0,
        losses,
    };
    outln!("{}", serde_json::to_string(&speed)?);
    Ok(ExitCode::SUCCESS)
}

/// A llama with the anchor's shape and small random weights (speed does not depend on
/// their values), built in memory.
fn random_model() -> anyhow::Result<medcoder_models::CausalLm> {
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB,
        "max_position_embeddings": 8192, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": true, "hidden_act": "silu"
    });
    let config: medcoder_models::families::llama::Config = serde_json::from_value(config)?;
    let spec = config.spec().map_err(anyhow::Error::msg)?;
    let device = Device::Cpu;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let random = |shape: &[usize]| -> anyhow::Result<Tensor> {
        let std = 1.0 / (*shape.last().unwrap_or(&1) as f32).sqrt();
        Ok(Tensor::randn(0f32, std, shape, &device)?)
    };
    tensors.insert(
        "model.embed_tokens.weight".into(),
        random(&[VOCAB, HIDDEN])?,
    );
    let kv = KV_HEADS * HIDDEN / HEADS;
    for layer in 0..LAYERS {
        let p = format!("model.layers.{layer}");
        for (name, shape) in [
            ("self_attn.q_proj", [HIDDEN, HIDDEN]),
            ("self_attn.k_proj", [kv, HIDDEN]),
            ("self_attn.v_proj", [kv, HIDDEN]),
            ("self_attn.o_proj", [HIDDEN, HIDDEN]),
            ("mlp.gate_proj", [INTERMEDIATE, HIDDEN]),
            ("mlp.up_proj", [INTERMEDIATE, HIDDEN]),
            ("mlp.down_proj", [HIDDEN, INTERMEDIATE]),
        ] {
            tensors.insert(format!("{p}.{name}.weight"), random(&shape)?);
        }
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            tensors.insert(
                format!("{p}.{norm}.weight"),
                Tensor::ones(HIDDEN, DType::F32, &device)?,
            );
        }
    }
    tensors.insert(
        "model.norm.weight".into(),
        Tensor::ones(HIDDEN, DType::F32, &device)?,
    );
    let weights = medcoder_models::weights::Weights::from_tensors(tensors, DType::F32, &device);
    Ok(medcoder_models::CausalLm::new(spec, &weights)?)
}
