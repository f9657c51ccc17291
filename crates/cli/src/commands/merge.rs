//! `medcoder merge`: a LoRA adapter folded into its base, written as a full HF-layout model.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use candle_core::{DType, Device};
use medcoder_assets::MedcoderHome;

#[derive(Debug, clap::Args)]
pub struct MergeArgs {
    /// The base model the adapter was trained on (alias, folder, GGUF file or hub id); defaults
    /// to the base model a registered `--adapter` records.
    #[arg(long)]
    model: Option<String>,
    /// The adapter: a `medcoder train` run folder, any PEFT LoRA adapter folder, or a
    /// registered model (`name@production`, `name@staging`, `name@VERSION`).
    #[arg(long, value_name = "DIR|NAME@VERSION")]
    adapter: PathBuf,
    /// The output folder (replaced if it exists).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Weights' dtype: bf16 (default), f16 or f32.
    #[arg(long, default_value = "bf16")]
    dtype: String,
    #[arg(long)]
    json: bool,
}

pub fn run(args: MergeArgs, home: &MedcoderHome) -> anyhow::Result<ExitCode> {
    let dtype = match args.dtype.as_str() {
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        "f32" => DType::F32,
        other => bail!("--dtype `{other}`: use bf16, f16 or f32"),
    };
    let choice = medcoder_coding::registry::resolve_model_choice(
        args.model.as_deref(),
        Some(&args.adapter),
        home,
    )?;
    let adapter = choice.adapter.clone().unwrap_or(args.adapter);
    let resolved = choice.resolve_model(home)?;
    // Merging runs in f32 on the CPU whatever the output dtype.
    let model = medcoder_models::load_model(&resolved, &Device::Cpu, Some(DType::F32))
        .with_context(|| format!("loading the base model `{}`", choice.model))?;
    let report = medcoder_train::merge::merge_to_hf(model, &adapter, &args.out, dtype)?;
    if let Some(entry) = &choice.entry {
        medcoder_coding::registry::ModelRegistry::open(home).record_artifacts(
            &entry.id(),
            Some(&args.out),
            None,
        )?;
        tracing::info!(registered = %entry.id(), merged = %args.out.display(), "recorded in the registry");
    }
    if args.json {
        super::print_json(&report)?;
    } else {
        outln!(
            "merged {} adapted layers into {} tensors ({}, {:.1} MiB) → {}",
            report.modules_merged,
            report.tensors,
            report.dtype,
            report.bytes as f64 / 1048576.0,
            report.out.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}
