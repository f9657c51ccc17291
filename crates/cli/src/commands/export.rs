//! `medcoder export gguf`: a model, with a LoRA adapter folded in, as one GGUF file (f16, q8_0 or
//! Q4_K_M) with an Ollama Modelfile beside it.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use candle_core::{DType, Device};
use medcoder_assets::{MedcoderHome, ModelRef};
use medcoder_models::gguf_export::ExportQuant;

#[derive(Debug, clap::Subcommand)]
pub enum ExportCommand {
    /// Write a GGUF file for llama.cpp and Ollama (tokenizer and chat template embedded), and a
    /// Modelfile beside it.
    Gguf(GgufArgs),
}

#[derive(Debug, clap::Args)]
pub struct GgufArgs {
    /// The base model (alias, folder, GGUF file or hub id).
    #[arg(long)]
    model: String,
    /// A LoRA adapter to fold in: a `medcoder train` run folder or any PEFT adapter folder.
    #[arg(long, value_name = "RUN_DIR")]
    adapter: Option<PathBuf>,
    /// Weight type: f16, q8_0 or q4_k_m (llama.cpp's mix).
    #[arg(long, default_value = "q8_0")]
    quant: String,
    /// The GGUF file to write (replaced if it exists); the Modelfile goes beside it.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    #[arg(long)]
    json: bool,
}

pub fn run(command: ExportCommand, home: &MedcoderHome) -> anyhow::Result<ExitCode> {
    let ExportCommand::Gguf(args) = command;
    let quant: ExportQuant = args.quant.parse().map_err(anyhow::Error::msg)?;
    let model_ref: ModelRef = args.model.parse()?;
    let resolved = model_ref.resolve(home)?;
    // Merging and quantizing run in f32 on the CPU.
    let model = medcoder_models::load_model(&resolved, &Device::Cpu, Some(DType::F32))
        .with_context(|| format!("loading the base model `{}`", args.model))?;
    let report =
        medcoder_train::export::export_gguf(model, args.adapter.as_deref(), quant, &args.out)?;
    if args.json {
        super::print_json(&report)?;
        return Ok(ExitCode::SUCCESS);
    }
    // One line per kind of fallback (a model has hundreds of tensors), with an example.
    let mut kinds: std::collections::BTreeMap<(usize, &str, &str), (usize, &str)> =
        Default::default();
    for t in &report.fallbacks {
        let row = t.shape.last().copied().unwrap_or(0);
        kinds
            .entry((row, t.wanted.as_str(), t.written.as_str()))
            .or_insert((0, t.name.as_str()))
            .0 += 1;
    }
    for ((row, wanted, written), (count, example)) in kinds {
        outln!(
            "{count} tensors (e.g. {example}) written as {written}: rows of {row} do not fit {wanted} blocks"
        );
    }
    if report.modules_merged > 0 {
        outln!("merged {} adapted layers", report.modules_merged);
    }
    outln!(
        "{} tensors ({}) → {} ({:.2} MiB)",
        report.tensors,
        report.quant.as_str(),
        report.out.display(),
        report.bytes as f64 / 1048576.0
    );
    outln!(
        "Modelfile → {} ({} bytes){}",
        report.modelfile.display(),
        report.modelfile_bytes,
        if report.modelfile_template {
            ""
        } else {
            "; Ollama uses the chat template embedded in the GGUF"
        }
    );
    Ok(ExitCode::SUCCESS)
}
