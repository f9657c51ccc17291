use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Subcommand, ValueEnum};
use medcoder_assets::MedcoderHome;
use medcoder_icd::IcdKnowledge;
use medcoder_store::{
    import_codiesp, import_instructions, import_mimic, CodiespOptions, IcdNineHandling,
    ImportReport, InstructionFormat, InstructionOptions, Language, MimicOptions, MimicVersion,
    SplitRatios, Store,
};

#[derive(Debug, clap::Args)]
pub struct DbArg {
    /// The DuckDB database file (created if missing).
    #[arg(long, env = "MEDCODER_DB", value_name = "FILE")]
    db: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum PrepareCommand {
    /// MIMIC-IV (hosp/ + note/) or MIMIC-III CSVs (plain or .gz, PhysioNet layout).
    ///
    /// Raw tables already in the database are skipped unless --drop. One row per admission in
    /// <schema>.admission_facts; documents, ordered gold codes and 80/10/10 patient splits in
    /// the dataset tables.
    Mimic {
        #[arg(long, value_name = "DIR")]
        src: PathBuf,
        #[command(flatten)]
        db: DbArg,
        #[arg(long, value_enum, default_value_t = VersionArg::Iv)]
        mimic_version: VersionArg,
        /// Dataset name (default: mimic-iv or mimic-iii).
        #[arg(long)]
        name: Option<String>,
        /// Import again: replace raw tables and the dataset.
        #[arg(long)]
        drop: bool,
        /// Keep N patients, those with discharge notes first (deterministic for a seed).
        #[arg(long, value_name = "N")]
        patient_limit: Option<u64>,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// CSV with `split` and `subject_id`/`hadm_id` columns, replacing the seeded split.
        #[arg(long, value_name = "FILE")]
        split_file: Option<PathBuf>,
        /// ICD-9-coded admissions: keep them (flagged icd_version 9) or drop them.
        #[arg(long, value_enum, default_value_t = Icd9Arg::Keep)]
        icd9: Icd9Arg,
        #[arg(long)]
        json: bool,
    },
    /// CodiEsp: codiesp_{train,dev}.jsonl, or the official train/trainD.tsv … layout.
    Codiesp {
        #[arg(long, value_name = "DIR")]
        src: PathBuf,
        #[command(flatten)]
        db: DbArg,
        #[arg(long, value_enum, default_value_t = LangArg::En)]
        lang: LangArg,
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        drop: bool,
        #[arg(long)]
        json: bool,
    },
    /// Tokenize a dataset for a model: prompt (through the model's chat template when it has
    /// one) and completion apart, ids stored in the database with the options used.
    Tokens(TokensArgs),
    /// Write a synthetic MIMIC-IV-shaped release (hosp/ + note/discharge), made-up patients,
    /// to try the pipeline without credentialed data.
    SyntheticMimic {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        #[arg(long, default_value_t = 200)]
        patients: u64,
        #[arg(long, default_value_t = 7)]
        seed: u64,
    },
    /// Instruction data in JSONL: alpaca, sharegpt or OpenAI messages (detected or --format).
    Jsonl {
        #[arg(long, value_name = "FILE")]
        src: PathBuf,
        #[command(flatten)]
        db: DbArg,
        #[arg(long)]
        name: String,
        #[arg(long)]
        format: Option<InstructionFormat>,
        #[arg(long)]
        drop: bool,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, clap::Args)]
pub struct TokensArgs {
    #[command(flatten)]
    db: DbArg,
    #[arg(long)]
    dataset: String,
    /// Alias, local model folder, or hub id in the hf-hub cache (its tokenizer.json is used).
    #[arg(long)]
    model: String,
    /// Longest example (prompt + completion) in tokens.
    #[arg(long, default_value_t = 2048)]
    max_len: usize,
    /// Prompt template (YAML: user with {note}, completion with {codes}, system, separator, codes).
    #[arg(long, value_name = "FILE")]
    template: Option<PathBuf>,
    /// Examples over --max-len: drop them, keep the head / head and tail of the note, or chunk it.
    #[arg(long, value_enum, default_value_t = TruncationArg::HeadTail)]
    truncation: TruncationArg,
    /// Tokenize ICD-9-coded documents too (they are kept apart by default).
    #[arg(long)]
    include_icd9: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum TruncationArg {
    Drop,
    Head,
    HeadTail,
    Chunk,
}

#[derive(Debug, Subcommand)]
pub enum DbCommand {
    /// Datasets, splits, document and code counts, note length percentiles.
    Stats {
        #[command(flatten)]
        db: DbArg,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum VersionArg {
    Iv,
    Iii,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Icd9Arg {
    Keep,
    Drop,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LangArg {
    En,
    Es,
}

/// A spinner on stderr while a step runs (hidden when stderr is not a terminal).
fn with_spinner<T>(message: &str, f: impl FnOnce() -> T) -> T {
    let spinner = indicatif::ProgressBar::new_spinner().with_message(message.to_string());
    spinner.enable_steady_tick(Duration::from_millis(120));
    let value = f();
    spinner.finish_and_clear();
    value
}

pub fn run(command: PrepareCommand, home: &MedcoderHome) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let (db, json, report) = match command {
        PrepareCommand::Tokens(args) => return tokens(args, home),
        PrepareCommand::SyntheticMimic {
            out,
            patients,
            seed,
        } => {
            let spec = medcoder_store::synthetic::SyntheticMimic {
                patients,
                seed,
                ..medcoder_store::synthetic::SyntheticMimic::small()
            };
            let counts = medcoder_store::synthetic::write_synthetic_mimic_iv(&out, &spec)?;
            outln!(
                "{}: {} patients, {} admissions, {} discharge notes, {} diagnosis rows",
                out.display(),
                counts.patients,
                counts.admissions,
                counts.notes,
                counts.diagnosis_rows
            );
            return Ok(ExitCode::SUCCESS);
        }
        PrepareCommand::Mimic {
            src,
            db,
            mimic_version,
            name,
            drop,
            patient_limit,
            seed,
            split_file,
            icd9,
            json,
        } => {
            let store = Store::open(&db.db)?;
            let options = MimicOptions {
                src,
                version: match mimic_version {
                    VersionArg::Iv => MimicVersion::Iv,
                    VersionArg::Iii => MimicVersion::Iii,
                },
                name,
                drop,
                patient_limit,
                seed,
                ratios: SplitRatios::default(),
                split_file,
                icd9: match icd9 {
                    Icd9Arg::Keep => IcdNineHandling::Keep,
                    Icd9Arg::Drop => IcdNineHandling::Drop,
                },
            };
            let report = with_spinner("importing MIMIC", || import_mimic(&store, &options))?;
            (store, json, report)
        }
        PrepareCommand::Codiesp {
            src,
            db,
            lang,
            name,
            drop,
            json,
        } => {
            let store = Store::open(&db.db)?;
            let options = CodiespOptions {
                src,
                lang: match lang {
                    LangArg::En => Language::En,
                    LangArg::Es => Language::Es,
                },
                name,
                drop,
            };
            let report = with_spinner("importing CodiEsp", || import_codiesp(&store, &options))?;
            (store, json, report)
        }
        PrepareCommand::Jsonl {
            src,
            db,
            name,
            format,
            drop,
            seed,
            json,
        } => {
            let store = Store::open(&db.db)?;
            let options = InstructionOptions {
                src,
                name,
                format,
                drop,
                seed,
                ratios: SplitRatios::default(),
            };
            let report = with_spinner("importing JSONL", || import_instructions(&store, &options))?;
            (store, json, report)
        }
    };
    let report = check_codes(&db, home, report)?;
    tracing::info!(elapsed_s = started.elapsed().as_secs_f64(), "prepare done");
    if json {
        super::print_json(&report)?;
    } else {
        print_report(&report)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Check the new gold codes against the ICD knowledge base, when its assets are installed.
fn check_codes(
    store: &Store,
    home: &MedcoderHome,
    mut report: ImportReport,
) -> anyhow::Result<ImportReport> {
    if report.diagnosis_codes + report.procedure_codes == 0 {
        return Ok(report);
    }
    match IcdKnowledge::load(home) {
        Ok(kb) => {
            with_spinner("checking gold codes", || store.check_codes(&kb))?;
            let refreshed = store.dataset_stats(&report.dataset)?;
            report.code_status = refreshed.code_status;
        }
        Err(error) => {
            let note = format!("gold codes not checked against ICD-10 ({error})");
            tracing::warn!("{note}");
            report.notes.push(note);
        }
    }
    Ok(report)
}

fn print_report(report: &ImportReport) -> anyhow::Result<()> {
    outln!("dataset {}", report.dataset);
    for (table, rows) in &report.tables_imported {
        outln!("  imported {table:<20} {rows:>10} rows");
    }
    for table in &report.tables_skipped {
        outln!("  skipped  {table:<20} (already in the database; --drop imports it again)");
    }
    outln!(
        "  documents {} ({} with text), diagnosis codes {}, procedure codes {}",
        report.documents,
        report.documents_with_text,
        report.diagnosis_codes,
        report.procedure_codes
    );
    let join = |pairs: &[(String, u64)]| {
        pairs
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if !report.code_status.is_empty() {
        outln!("  gold codes: {}", join(&report.code_status));
    }
    if !report.splits.is_empty() {
        outln!("  splits: {}", join(&report.splits));
    }
    for note in &report.notes {
        outln!("  note: {note}");
    }
    Ok(())
}

pub fn run_db(command: DbCommand) -> anyhow::Result<ExitCode> {
    match command {
        DbCommand::Stats { db, json } => {
            anyhow::ensure!(db.db.is_file(), "{}: no such database", db.db.display());
            let store =
                Store::open(&db.db).with_context(|| format!("opening {}", db.db.display()))?;
            let stats = store.stats()?;
            if json {
                super::print_json(&stats)?;
                return Ok(ExitCode::SUCCESS);
            }
            outln!("{}", stats.path);
            for d in &stats.datasets {
                outln!(
                    "{} ({}), imported {} from {}",
                    d.name,
                    d.kind,
                    d.imported_at,
                    d.source
                );
                outln!(
                    "  documents {} ({} with text), patients {}, conversations {}",
                    d.documents,
                    d.documents_with_text,
                    d.patients,
                    d.conversations
                );
                outln!(
                    "  diagnosis codes {} ({} distinct), procedure codes {} ({} distinct)",
                    d.diagnosis_codes,
                    d.distinct_diagnosis_codes,
                    d.procedure_codes,
                    d.distinct_procedure_codes
                );
                let join = |pairs: &[(String, u64)]| {
                    pairs
                        .iter()
                        .map(|(k, n)| format!("{k} {n}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                outln!("  icd versions: {}", join(&d.icd_versions));
                outln!("  gold code status: {}", join(&d.code_status));
                outln!("  splits: {}", join(&d.splits));
                if let Some(n) = &d.note_chars {
                    outln!(
                        "  text chars: p50 {:.0}, p90 {:.0}, p99 {:.0}, max {}",
                        n.p50,
                        n.p90,
                        n.p99,
                        n.max
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn tokens(args: TokensArgs, home: &MedcoderHome) -> anyhow::Result<ExitCode> {
    let model_ref: medcoder_assets::ModelRef = args.model.parse()?;
    let resolved = model_ref.resolve(home)?;
    let tokenizer = medcoder_models::ModelTokenizer::load(&resolved)?;
    let template = match &args.template {
        Some(path) => medcoder_train::PromptTemplate::from_yaml_file(path)?,
        None => medcoder_train::PromptTemplate::default(),
    };
    let options = medcoder_train::TokenizeOptions {
        dataset: args.dataset,
        model: model_ref.to_string(),
        max_len: args.max_len,
        truncation: match args.truncation {
            TruncationArg::Drop => medcoder_train::Truncation::Drop,
            TruncationArg::Head => medcoder_train::Truncation::Head,
            TruncationArg::HeadTail => medcoder_train::Truncation::HeadTail,
            TruncationArg::Chunk => medcoder_train::Truncation::Chunk,
        },
        template,
        include_icd9: args.include_icd9,
    };
    let store = Store::open(&args.db.db)?;
    let report = with_spinner("tokenizing", || {
        medcoder_train::tokenize_dataset(&store, &tokenizer, &options)
    })?;
    if args.json {
        super::print_json(&report)?;
    } else {
        let l = &report.lengths;
        outln!(
            "{} for {}: {} examples -> {} rows (chat template: {})",
            report.dataset,
            report.model,
            report.examples,
            report.rows_written,
            if report.chat_template { "yes" } else { "no" }
        );
        outln!(
            "  tokens per example before truncation: p50 {}, p90 {}, p99 {}, max {}, mean {:.0}",
            l.p50,
            l.p90,
            l.p99,
            l.max,
            l.mean
        );
        outln!(
            "  over --max-len {}: {} examples ({}), dropped {}",
            args.max_len,
            report.over_limit,
            report.truncation,
            report.dropped
        );
    }
    Ok(ExitCode::SUCCESS)
}
