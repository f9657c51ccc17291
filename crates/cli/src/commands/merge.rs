//! `medcoder merge`: a LoRA adapter folded into its base, written as a full HF-layout model.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use candle_core::{DType, Device};
use medcoder_assets::{MedcoderHome, ModelRef};

#[derive(Debug, clap::Args)]
pub struct MergeArgs {
    /// The base model the adapter was trained on (alias, folder, GGUF file or hub id).
    #[arg(long)]
    model: String,
    /// The adapter: a `medcoder train` run folder or any PEFT LoRA adapter folder.
    #[arg(long, value_name = "DIR")]
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
    let model_ref: ModelRef = args.model.parse()?;
    let resolved = model_ref.resolve(home)?;
    // Merging runs in f32 on the CPU whatever the output dtype.
    let model = medcoder_models::load_model(&resolved, &Device::Cpu, Some(DType::F32))
        .with_context(|| format!("loading the base model `{}`", args.model))?;
    let report = medcoder_train::merge::merge_to_hf(model, &args.adapter, &args.out, dtype)?;
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
