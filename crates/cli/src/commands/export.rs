//! `medcoder export gguf`: a model, with a LoRA adapter folded in, as one GGUF file (f16, q8_0 or
//! Q4_K_M) with an Ollama Modelfile and an LM Studio layout beside it.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use candle_core::{DType, Device};
use medcoder_assets::MedcoderHome;
use medcoder_coding::registry::ModelRegistry;
use medcoder_models::gguf_export::ExportQuant;
use medcoder_train::lmstudio::{write_lmstudio_layout, LmStudioLayout};

#[derive(Debug, clap::Subcommand)]
pub enum ExportCommand {
    /// Write a GGUF file for llama.cpp, Ollama and LM Studio (tokenizer and chat template
    /// embedded), with a Modelfile and an LM Studio folder layout beside it.
    Gguf(GgufArgs),
}

#[derive(Debug, clap::Args)]
pub struct GgufArgs {
    /// The base model (alias, folder, GGUF file or hub id), or a registered `name@VERSION`;
    /// defaults to the base model of a registered `--adapter`.
    #[arg(long, required_unless_present = "adapter")]
    model: Option<String>,
    /// A LoRA adapter to fold in: a `medcoder train` run folder, any PEFT adapter folder, or a
    /// registered model (`name@production`, `name@staging`, `name@VERSION`), whose registry
    /// entry then records the GGUF.
    #[arg(long, value_name = "RUN_DIR|NAME@VERSION")]
    adapter: Option<PathBuf>,
    /// Weight type: f16, q8_0 or q4_k_m (llama.cpp's mix).
    #[arg(long, default_value = "q8_0")]
    quant: String,
    /// The GGUF file to write (replaced if it exists); the Modelfile goes beside it.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// LM Studio's models folder (e.g. ~/.lmstudio/models) to put the GGUF into, as
    /// `<publisher>/<repo>/<file>.gguf` (hard-linked, or copied across file systems); by default
    /// a folder `lmstudio` beside the GGUF, with a README on handing it to LM Studio.
    #[arg(long, value_name = "DIR")]
    lmstudio_dir: Option<PathBuf>,
    /// The publisher folder of the LM Studio layout.
    #[arg(long, default_value = "medcoder")]
    lmstudio_publisher: String,
    /// The model-repo folder of the LM Studio layout; by default the registered name (with
    /// `--adapter NAME@…`) or the GGUF's file name, with `-GGUF` appended.
    #[arg(long)]
    lmstudio_repo: Option<String>,
    /// Write no LM Studio layout.
    #[arg(long, conflicts_with = "lmstudio_dir")]
    no_lmstudio: bool,
    #[arg(long)]
    json: bool,
}

/// `--json`: the export's report with the LM Studio layout and the registry entry it updated.
#[derive(Debug, serde::Serialize)]
struct ExportOutput<'a> {
    #[serde(flatten)]
    export: &'a medcoder_train::export::ExportReport,
    lmstudio: Option<&'a LmStudioLayout>,
    registered: Option<&'a str>,
}

pub fn run(command: ExportCommand, home: &MedcoderHome) -> anyhow::Result<ExitCode> {
    let ExportCommand::Gguf(args) = command;
    let quant: ExportQuant = args.quant.parse().map_err(anyhow::Error::msg)?;
    let choice = medcoder_coding::registry::resolve_model_choice(
        args.model.as_deref(),
        args.adapter.as_deref(),
        home,
    )?;
    let resolved = choice.resolve_model(home)?;
    // Merging and quantizing run in f32 on the CPU.
    let model = medcoder_models::load_model(&resolved, &Device::Cpu, Some(DType::F32))
        .with_context(|| format!("loading the base model `{}`", choice.model))?;
    let report =
        medcoder_train::export::export_gguf(model, choice.adapter.as_deref(), quant, &args.out)?;
    let lmstudio = if args.no_lmstudio {
        None
    } else {
        let root = args
            .lmstudio_dir
            .clone()
            .unwrap_or_else(|| report.modelfile.with_file_name("lmstudio"));
        let repo = match (&args.lmstudio_repo, &choice.entry) {
            (Some(repo), _) => repo.clone(),
            (None, Some(entry)) => format!("{}-GGUF", entry.name),
            (None, None) => format!("{}-GGUF", report.name),
        };
        Some(write_lmstudio_layout(
            &report.out,
            &root,
            &args.lmstudio_publisher,
            &repo,
        )?)
    };
    let registered = match &choice.entry {
        Some(entry) => Some(
            ModelRegistry::open(home)
                .record_artifacts(&entry.id(), None, Some(&report.out))?
                .id(),
        ),
        None => None,
    };
    if args.json {
        super::print_json(&ExportOutput {
            export: &report,
            lmstudio: lmstudio.as_ref(),
            registered: registered.as_deref(),
        })?;
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
    if let Some(layout) = &lmstudio {
        outln!(
            "LM Studio layout → {} ({}; see {})",
            layout.gguf.display(),
            if layout.hard_linked {
                "hard link"
            } else {
                "copy"
            },
            layout.readme.display()
        );
    }
    if let Some(id) = registered {
        outln!("recorded the GGUF in the registry entry {id}");
    }
    Ok(ExitCode::SUCCESS)
}
