//! `medcoder train`: fine-tune a model on a prepared dataset (LoRA, QLoRA or full), with
//! checkpoints that `--resume` continues after a kill.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use candle_core::DType;
use indicatif::{ProgressBar, ProgressStyle};
use medcoder_assets::{MedcoderHome, ModelRef};
use medcoder_models::DeviceSpec;
use medcoder_train::checkpoint::list_checkpoints;
use medcoder_train::{TrainConfig, TrainEvent, Trainer};

#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    /// The run's YAML config (see configs/); not needed with --resume.
    #[arg(long, value_name = "FILE", required_unless_present = "resume")]
    config: Option<PathBuf>,
    /// Override a config key: `--set lora.r=8 --set max_steps=100`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    /// Continue the run in this folder from its last checkpoint (its saved config is used).
    #[arg(long, value_name = "RUN_DIR")]
    resume: Option<PathBuf>,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// Register the trained weights in the model registry under this name at the end
    /// (as `medcoder models register --name NAME --run RUN_DIR`).
    #[arg(long, value_name = "NAME")]
    register: Option<String>,
}

pub fn run(args: TrainArgs, home: &MedcoderHome) -> anyhow::Result<ExitCode> {
    if let Some(name) = &args.register {
        medcoder_coding::registry::check_name(name)?;
    }
    let (config, run_dir, resume) = match (&args.resume, &args.config) {
        (Some(dir), _) => {
            let saved = dir.join("config.yaml");
            if !saved.is_file() {
                bail!(
                    "{}: no config.yaml: not a medcoder run folder",
                    dir.display()
                );
            }
            let mut config = TrainConfig::load(&saved, &args.overrides)?;
            config.output_dir = dir.clone();
            (config, dir.clone(), true)
        }
        (None, Some(path)) => {
            let config = TrainConfig::load(path, &args.overrides)?;
            let run_dir = config.output_dir.clone();
            let resume = existing_run_matches(&run_dir, &config)?;
            (config, run_dir, resume)
        }
        (None, None) => bail!("give --config FILE or --resume RUN_DIR"),
    };
    let model_ref: ModelRef = config.model.parse()?;
    let resolved = model_ref
        .resolve(home)
        .with_context(|| format!("the base model `{}`", config.model))?;
    let device_spec: DeviceSpec = config
        .device
        .parse()
        .map_err(|e: String| anyhow::anyhow!("config `device`: {e}"))?;
    let device = device_spec.device()?;
    let dtype = match config.dtype.as_deref() {
        Some("f32") => Some(DType::F32),
        Some("bf16") => Some(DType::BF16),
        Some("f16") => Some(DType::F16),
        _ => None,
    };
    let model = medcoder_models::load_model(&resolved, &device, dtype)
        .with_context(|| format!("loading the base model `{}`", config.model))?;
    tracing::info!(
        family = model.family.as_str(),
        source = %model.source.display(),
        quantized = model.quantized,
        method = ?config.method,
        "base model loaded"
    );
    let mut trainer = Trainer::new(&config, model, &run_dir, resume)?;
    let bar = if args.quiet || args.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(0)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} train [{bar:30}] {pos}/{len} steps {elapsed_precise} eta {eta} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let mut last_eval = None;
    let summary = trainer.run(&mut |event| match event {
        TrainEvent::Started {
            total_steps,
            start_step,
            train_examples,
            eval_examples,
            trainable_parameters,
        } => {
            bar.set_length(total_steps as u64);
            bar.set_position(start_step as u64);
            tracing::info!(
                total_steps,
                start_step,
                train_examples,
                eval_examples,
                trainable_parameters,
                "training"
            );
        }
        TrainEvent::Step(record) => {
            bar.set_position(record.step as u64);
            let eval = last_eval.map_or(String::new(), |l: f64| format!(" eval {l:.4}"));
            bar.set_message(format!(
                "loss {:.4}{eval} lr {:.2e} {:.0} tok/s",
                record.loss.unwrap_or(f64::NAN),
                record.lr.unwrap_or(0.0),
                record.tokens_per_s.unwrap_or(0.0)
            ));
        }
        TrainEvent::Eval(record) => {
            last_eval = record.eval_loss;
            tracing::info!(step = record.step, eval_loss = ?record.eval_loss, "evaluation");
        }
        TrainEvent::Checkpoint(dir) => {
            tracing::info!(checkpoint = %dir.display(), "checkpoint saved");
        }
    })?;
    bar.finish_and_clear();
    if args.json {
        super::print_json(&summary)?;
    } else {
        outln!(
            "trained {} of {} steps ({}) in {}",
            summary.steps,
            summary.total_steps,
            summary.finished,
            summary.run_dir.display()
        );
        if let (Some(first), Some(best)) = (summary.first_eval_loss, summary.best_eval_loss) {
            outln!(
                "eval loss {first:.4} → best {best:.4} (step {})",
                summary.best_step.unwrap_or(0)
            );
        }
        if let Some(speed) = summary.mean_tokens_per_s {
            outln!(
                "{speed:.0} tokens/s, peak RSS {:.0} MiB, {} trainable parameters",
                summary.peak_rss_mib,
                summary.trainable_parameters
            );
        }
        outln!(
            "weights: {} (metrics.jsonl, loss.png, checkpoints/ beside them)",
            summary.weights_dir.display()
        );
    }
    if let Some(name) = &args.register {
        let registry = medcoder_coding::registry::ModelRegistry::open(home);
        let (entry, created) = registry.register(&medcoder_coding::registry::RegisterRequest {
            name: name.clone(),
            run_dir: summary.weights_dir.clone(),
            ..Default::default()
        })?;
        let what = if created {
            "registered"
        } else {
            "already registered"
        };
        // stderr: with --json, stdout is the summary alone.
        eprintln!("{what} {} ({})", entry.id(), entry.stage);
    }
    Ok(ExitCode::SUCCESS)
}

/// A run folder that already holds checkpoints: the same config continues it (a re-run is
/// idempotent), another config is refused rather than mixed in.
fn existing_run_matches(run_dir: &Path, config: &TrainConfig) -> anyhow::Result<bool> {
    if list_checkpoints(run_dir).is_empty() {
        return Ok(false);
    }
    let saved = run_dir.join("config.yaml");
    let same =
        saved.is_file() && TrainConfig::load(&saved, &[]).is_ok_and(|previous| previous == *config);
    if !same {
        bail!(
            "{} already holds a run with another config: `medcoder train --resume {}` continues it, or set another output_dir",
            run_dir.display(),
            run_dir.display()
        );
    }
    tracing::info!(run = %run_dir.display(), "the run exists with this config: continuing it");
    Ok(true)
}
