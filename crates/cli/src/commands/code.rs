//! `medcoder code`: a note (file or stdin), a JSONL batch, or a split of a prepared dataset in;
//! ranked ICD-10-CM diagnoses and ICD-10-PCS procedures with evidence out.
//!
//! Note text is never logged: progress and errors name notes by id, file and line.

use std::collections::HashSet;
use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Mutex;

use anyhow::{bail, Context};
use medcoder_assets::MedcoderHome;
use medcoder_coding::engine::{load_code_sets, split_notes};
use medcoder_coding::prediction::read_predictions;
use medcoder_coding::{CodeKind, Coder, NotePrediction};

use super::code_engine::EngineArgs;
use rayon::prelude::*;
use serde::Deserialize;

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum OutputFormat {
    /// A readable table per note.
    Table,
    /// One JSON object per note.
    Json,
    /// A FHIR R4 Bundle of Conditions (ICD-10-CM) and Procedures (ICD-10-PCS): the assigned
    /// codes of a single note.
    Fhir,
    /// CodiEsp's TSV layout (`D.tsv`, `P.tsv`: id, code, in rank order) in the folder
    /// `--codiesp-out` names, no gold needed: the official script scores them.
    Codiesp,
}

#[derive(Debug, clap::Args)]
pub struct CodeArgs {
    /// A note: a UTF-8 text file or a PDF with a text layer, or `-` for standard input.
    input: Option<PathBuf>,
    /// A JSONL file of notes to code, one `{"id": …, "text": …}` per line.
    #[arg(long, conflicts_with = "input")]
    batch: Option<PathBuf>,
    /// Code the notes of this split of the prepared dataset instead (e.g. `dev`).
    #[arg(long, conflicts_with_all = ["input", "batch"])]
    split: Option<String>,
    /// Where batch predictions go (JSONL). Appended to: notes already in it are skipped, so
    /// an interrupted run continues where it stopped.
    #[arg(long)]
    out: Option<PathBuf>,
    #[command(flatten)]
    engine: EngineArgs,
    #[arg(long, value_enum, default_value = "table")]
    format: OutputFormat,
    /// Codes per kind shown in the table.
    #[arg(long, default_value_t = 10)]
    top: usize,
    /// Also write CodiEsp's TSV layout (`<dir>/{D,P}.tsv`: id, code, in rank order), which the
    /// official evaluation script reads.
    #[arg(long)]
    codiesp_out: Option<PathBuf>,
    /// llm engine, batch coding: chunks of notes generated together in one continuous batch
    /// (a note joins as soon as a row is free, and is written as soon as it is coded).
    #[arg(long, default_value_t = 8)]
    llm_batch: usize,
}

/// A line of a batch file.
#[derive(Debug, Deserialize)]
struct BatchNote {
    id: String,
    text: String,
}

pub fn run(args: CodeArgs, home: &MedcoderHome) -> anyhow::Result<ExitCode> {
    if matches!(args.format, OutputFormat::Codiesp) && args.codiesp_out.is_none() {
        bail!(
            "--format codiesp writes D.tsv and P.tsv into a folder: give it with --codiesp-out DIR"
        );
    }
    let config = args.engine.config();
    let coder = Coder::build(&config, load_code_sets(home), home)?;
    if let Some(input) = &args.input {
        let (id, text) = read_note(input)?;
        let prediction = coder.code(&id, &text)?;
        match args.format {
            OutputFormat::Json => super::print_json(&prediction)?,
            OutputFormat::Fhir => {
                super::print_json(&medcoder_coding::fhir::to_fhir_bundle(&prediction))?
            }
            OutputFormat::Table => print_table(&prediction, args.top)?,
            OutputFormat::Codiesp => {}
        }
        if let Some(dir) = &args.codiesp_out {
            medcoder_coding::codiesp_tsv::write_predictions(
                dir,
                std::slice::from_ref(&prediction),
            )?;
            if matches!(args.format, OutputFormat::Codiesp) {
                outln!("wrote {}/D.tsv and P.tsv", dir.display());
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    if matches!(args.format, OutputFormat::Fhir) {
        bail!("--format fhir is for a single note: batch predictions go to --out as JSONL");
    }
    let notes: Vec<BatchNote> = match (&args.batch, &args.split) {
        (Some(file), _) => read_batch(file)?,
        (None, Some(split)) => {
            let (db, dataset) = config
                .dataset_source()
                .context("--split codes the notes of a prepared dataset")?;
            split_notes(db, dataset, split)?
                .into_iter()
                .map(|n| BatchNote {
                    id: n.id,
                    text: n.text,
                })
                .collect()
        }
        (None, None) => bail!("give a note file (or `-`), --batch FILE or --split NAME"),
    };
    let Some(out) = &args.out else {
        bail!("batch coding needs --out FILE (JSONL)")
    };
    let done: HashSet<String> = if out.exists() {
        read_predictions(out)?.into_iter().map(|p| p.id).collect()
    } else {
        HashSet::new()
    };
    let todo: Vec<&BatchNote> = notes.iter().filter(|n| !done.contains(&n.id)).collect();
    tracing::info!(
        notes = notes.len(),
        already_coded = notes.len() - todo.len(),
        out = %out.display(),
        "coding"
    );
    let file = fs_err::OpenOptions::new()
        .create(true)
        .append(true)
        .open(out)?;
    let writer = Mutex::new(std::io::BufWriter::new(file));
    let bar = indicatif::ProgressBar::new(todo.len() as u64);
    let failures = Mutex::new(Vec::new());
    let write = |note: &BatchNote, prediction: anyhow::Result<NotePrediction>| {
        let result = (|| -> anyhow::Result<()> {
            let line = serde_json::to_string(&prediction?)?;
            let mut w = writer
                .lock()
                .map_err(|_| anyhow::anyhow!("writer poisoned"))?;
            writeln!(w, "{line}")?;
            // Each coded note reaches the file at once: a killed run loses none of them.
            w.flush()?;
            Ok(())
        })();
        if let Err(error) = result {
            if let Ok(mut f) = failures.lock() {
                f.push(format!("note {}: {error:#}", note.id));
            }
        }
        bar.inc(1);
    };
    let code_one =
        |note: &&BatchNote| write(note, coder.code(&note.id, &note.text).map_err(Into::into));
    if coder.parallel() {
        todo.par_iter().for_each(code_one);
    } else if let Some(mut batch) = coder.continuous::<&BatchNote>(args.llm_batch) {
        let mut pending = todo.iter();
        loop {
            while batch.has_room() {
                let Some(note) = pending.next() else {
                    break;
                };
                if let Err(refused) = batch.admit(&note.id, &note.text, note) {
                    let (note, error) = *refused;
                    write(note, Err(error.into()));
                }
            }
            if batch.is_idle() {
                break;
            }
            for (note, result) in batch.step(|_| false) {
                write(note, result.map_err(Into::into));
            }
        }
    } else {
        todo.iter().for_each(code_one);
    }
    bar.finish_and_clear();
    writer
        .into_inner()
        .map_err(|_| anyhow::anyhow!("writer poisoned"))?
        .flush()?;
    let failures = failures.into_inner().unwrap_or_default();
    for failure in &failures {
        eprintln!("skipped {failure}");
    }
    if let Some(dir) = &args.codiesp_out {
        medcoder_coding::codiesp_tsv::write_predictions(dir, &read_predictions(out)?)?;
    }
    outln!(
        "coded {} notes ({} already in {}), {} skipped",
        todo.len() - failures.len(),
        done.len(),
        out.display(),
        failures.len()
    );
    Ok(ExitCode::SUCCESS)
}

/// A note from a file or stdin: (id, text). A PDF gives its text layer; binary, non-UTF-8 and
/// empty input, and PDFs without text, are refused naming the file.
fn read_note(input: &Path) -> anyhow::Result<(String, String)> {
    let (id, bytes) = if input == Path::new("-") {
        let mut bytes = Vec::new();
        std::io::stdin().read_to_end(&mut bytes)?;
        ("stdin".to_string(), bytes)
    } else {
        let id = input
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("note")
            .to_string();
        (id, fs_err::read(input)?)
    };
    if bytes.starts_with(b"%PDF") {
        let text = medcoder_coding::pdf::pdf_text(&bytes)
            .map_err(|error| anyhow::anyhow!("{}: {error}", input.display()))?;
        return Ok((id, text));
    }
    let text = String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{}: not UTF-8 text (invalid byte at offset {})",
            input.display(),
            e.utf8_error().valid_up_to()
        )
    })?;
    if text.contains('\0') {
        bail!("{}: binary data, not a text note", input.display());
    }
    if text.trim().is_empty() {
        bail!("{}: the note is empty", input.display());
    }
    Ok((id, text))
}

fn read_batch(file: &Path) -> anyhow::Result<Vec<BatchNote>> {
    let reader = std::io::BufReader::new(fs_err::File::open(file)?);
    let mut notes = Vec::new();
    let mut seen = HashSet::new();
    for (i, line) in reader.lines().enumerate() {
        let line = line.with_context(|| format!("{} line {}", file.display(), i + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<BatchNote>(&line) {
            Ok(note) if !seen.insert(note.id.clone()) => {
                eprintln!(
                    "skipped {} line {}: duplicate id {}",
                    file.display(),
                    i + 1,
                    note.id
                )
            }
            Ok(note) => notes.push(note),
            Err(error) => eprintln!(
                "skipped {} line {}: {error} (each line must be {{\"id\": …, \"text\": …}})",
                file.display(),
                i + 1
            ),
        }
    }
    Ok(notes)
}

fn print_table(p: &NotePrediction, top: usize) -> anyhow::Result<()> {
    outln!("note {} · {} · {:.1} ms", p.id, p.model, p.elapsed_ms);
    for warning in &p.warnings {
        outln!("warning: {warning}");
    }
    for kind in CodeKind::BOTH {
        outln!(
            "\n{:<4} {:<9} {:>5} {:<8} {}",
            "rank",
            kind.as_str(),
            "conf",
            "assigned",
            "description / evidence"
        );
        for c in p.ranking(kind).iter().take(top) {
            outln!(
                "{:<4} {:<9} {:>5.2} {:<8} {}",
                c.rank,
                c.code,
                c.confidence,
                if c.assigned { "yes" } else { "" },
                c.description
                    .as_deref()
                    .unwrap_or("(not in the US code set)")
            );
            for e in &c.evidence {
                let assertion = c.assertion.map(|a| format!(" ({a:?})")).unwrap_or_default();
                outln!(
                    "{:<29} [{}..{}] \"{}\"{assertion}",
                    "",
                    e.start,
                    e.end,
                    e.text
                );
            }
        }
    }
    Ok(())
}
