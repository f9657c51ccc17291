//! `medcoder models`: the model registry (`<home>/registry/registry.json`): register a
//! `medcoder train` run folder, list, show, promote and remove versions.

use std::path::PathBuf;
use std::process::ExitCode;

use medcoder_assets::MedcoderHome;
use medcoder_coding::registry::{ModelEntry, ModelRegistry, RegisterRequest, Stage};

#[derive(Debug, clap::Subcommand)]
pub enum ModelsCommand {
    /// Every registered version: name, version, stage, base model, micro-F1, created.
    List {
        #[arg(long)]
        json: bool,
    },
    /// One entry as JSON: NAME (latest), NAME@VERSION, NAME@production or NAME@staging.
    Show { spec: String },
    /// Register a `medcoder train` run folder (adapter_config.json + adapter_model.safetensors
    /// + config.yaml). The same content again returns the existing version.
    Register(RegisterArgs),
    /// Move NAME@VERSION to a stage; one production version per name (the previous one goes
    /// to staging).
    Promote {
        spec: String,
        #[arg(long, value_parser = parse_stage)]
        stage: Stage,
    },
    /// Drop NAME@VERSION from the registry (refused for the production version). Files on
    /// disk are not deleted.
    Remove { spec: String },
}

#[derive(Debug, clap::Args)]
pub struct RegisterArgs {
    /// The model's name (letters, digits, '.', '_', '-').
    #[arg(long)]
    pub name: String,
    /// The run folder of `medcoder train`.
    #[arg(long, value_name = "RUN_DIR")]
    pub run: PathBuf,
    /// A `medcoder eval --report` report.json: its headline numbers are recorded.
    #[arg(long, value_name = "FILE")]
    pub eval: Option<PathBuf>,
    /// The merged model folder (`medcoder merge`).
    #[arg(long, value_name = "DIR")]
    pub merged: Option<PathBuf>,
    /// The GGUF export (`medcoder export gguf`).
    #[arg(long, value_name = "FILE")]
    pub gguf: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

fn parse_stage(s: &str) -> Result<Stage, String> {
    s.parse()
        .map_err(|e: medcoder_coding::CodingError| e.to_string())
}

pub fn run(cmd: ModelsCommand, home: &MedcoderHome) -> anyhow::Result<ExitCode> {
    let registry = ModelRegistry::open(home);
    match cmd {
        ModelsCommand::List { json } => {
            let models = registry.list()?;
            if json {
                super::print_json(&models)?;
            } else if models.is_empty() {
                outln!("no registered models ({})", registry.file().display());
            } else {
                print_table(&models)?;
            }
        }
        ModelsCommand::Show { spec } => super::print_json(&registry.resolve(&spec)?)?,
        ModelsCommand::Register(args) => {
            register(&registry, &args)?;
        }
        ModelsCommand::Promote { spec, stage } => {
            let (entry, demoted) = registry.promote(&spec, stage)?;
            outln!("{} → {}", entry.id(), entry.stage);
            if let Some(previous) = demoted {
                outln!("{previous} → staging");
            }
        }
        ModelsCommand::Remove { spec } => {
            let entry = registry.remove(&spec)?;
            outln!(
                "removed {} from the registry; its files are not deleted ({})",
                entry.id(),
                entry.adapter_dir.display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Registers and prints what was registered (also called by `medcoder train --register`).
pub fn register(registry: &ModelRegistry, args: &RegisterArgs) -> anyhow::Result<ModelEntry> {
    let (entry, created) = registry.register(&RegisterRequest {
        name: args.name.clone(),
        run_dir: args.run.clone(),
        eval_report: args.eval.clone(),
        merged: args.merged.clone(),
        gguf: args.gguf.clone(),
    })?;
    if args.json {
        super::print_json(&entry)?;
    } else if created {
        outln!("registered {} ({})", entry.id(), entry.stage);
    } else {
        outln!("already registered: {} ({})", entry.id(), entry.stage);
    }
    Ok(entry)
}

fn print_table(models: &[ModelEntry]) -> anyhow::Result<()> {
    let rows: Vec<[String; 6]> = models
        .iter()
        .map(|m| {
            let f1 = m
                .eval
                .as_ref()
                .and_then(|e| e.kinds.get("diagnosis").or(e.kinds.values().next()))
                .map_or("-".to_string(), |k| format!("{:.3}", k.micro_f1));
            [
                m.name.clone(),
                m.version.clone(),
                m.stage.to_string(),
                m.base_model.clone().unwrap_or_else(|| "-".into()),
                f1,
                m.created_at.clone(),
            ]
        })
        .collect();
    let header = [
        "NAME",
        "VERSION",
        "STAGE",
        "BASE MODEL",
        "MICRO-F1",
        "CREATED",
    ];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: [&str; 6]| {
        cells
            .iter()
            .zip(widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    outln!("{}", line(header));
    for row in &rows {
        outln!("{}", line(row.each_ref().map(String::as_str)));
    }
    Ok(())
}
