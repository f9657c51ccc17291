//! `medcoder eval`: predictions (`medcoder code` JSONL) against gold codes from a prepared
//! database or a JSONL file; printed as Markdown, and with `--report DIR` written as
//! Markdown, HTML, JSON and PNG plots.

use std::collections::{BTreeSet, HashSet};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use medcoder_assets::MedcoderHome;
use medcoder_coding::eval::provenance::{
    utc_timestamp, CodeSetVersions, GoldSource, PredictionSource,
};
use medcoder_coding::eval::{
    evaluate, markdown, write_report, EvalContext, GoldNote, Provenance, UsCodeSet,
};
use medcoder_coding::prediction::read_predictions;
use medcoder_coding::CodeKind;
use medcoder_icd::IcdKnowledge;
use medcoder_store::{Split, Store};
use serde::Deserialize;

#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    /// Predictions: JSONL from `medcoder code`.
    #[arg(long)]
    pred: PathBuf,
    /// Gold codes: a prepared database (`.duckdb`), or a JSONL file of
    /// `{"id", "diagnoses": [...], "procedures": [...]}` lines.
    #[arg(long)]
    gold: PathBuf,
    /// The dataset in the database.
    #[arg(long)]
    dataset: Option<String>,
    /// The split scored (database gold only).
    #[arg(long, default_value = "validation")]
    split: String,
    /// The training split, for recall on codes unseen in training (database gold only).
    #[arg(long, default_value = "train")]
    training_split: String,
    /// Write report.md, report.html, report.json and the plots (top k, F1 per chapter: PNG)
    /// into this folder.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Write the gold of the scored notes in CodiEsp's TSV layout (`D.tsv`, `P.tsv`) and the
    /// codes annotated anywhere in the dataset (`D_codes.tsv`, `P_codes.tsv`) into this
    /// folder, for TeMU-BSC's official script with `medcoder code --codiesp-out`'s files.
    #[arg(long)]
    codiesp_gold_out: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
struct GoldLine {
    id: String,
    #[serde(default)]
    diagnoses: Vec<String>,
    #[serde(default)]
    procedures: Vec<String>,
}

pub fn run(args: EvalArgs, home: &MedcoderHome) -> anyhow::Result<ExitCode> {
    let predictions = read_predictions(&args.pred)?;
    let is_db = matches!(
        args.gold.extension().and_then(|e| e.to_str()),
        Some("duckdb" | "db")
    );
    let Gold {
        notes: gold,
        training_codes,
        dataset_codes,
    } = if is_db {
        let Some(dataset) = &args.dataset else {
            bail!("--dataset is needed with a database as --gold")
        };
        gold_from_db(&args.gold, dataset, &args.split, &args.training_split)?
    } else {
        gold_from_jsonl(&args.gold)?
    };
    if gold.is_empty() {
        bail!("no gold notes in {}", args.gold.display());
    }
    if let Some(dir) = &args.codiesp_gold_out {
        let kind_codes = |kind: CodeKind| match kind {
            CodeKind::Diagnosis => dataset_codes.diagnoses.clone(),
            CodeKind::Procedure => dataset_codes.procedures.clone(),
        };
        let written = medcoder_coding::codiesp_tsv::write_gold(dir, &gold, kind_codes)?;
        eprintln!("CodiEsp gold: {} files in {}", written.len(), dir.display());
    }
    let code_sets = match IcdKnowledge::load(home) {
        Ok(kb) => Some(kb),
        Err(error) => {
            tracing::warn!(%error, "no ICD code sets (run `medcoder assets fetch`): codes are not checked against the US code set");
            None
        }
    };
    let us_code_set = code_sets.as_ref().map(UsCodeSet::of);
    let ctx = EvalContext {
        training_codes: training_codes.as_ref(),
        us_code_set: us_code_set.as_ref(),
    };
    let report = evaluate(&predictions, &gold, &ctx);
    let provenance = Provenance {
        predictions: PredictionSource::of_file(&args.pred, &predictions)?,
        gold: GoldSource {
            file: args.gold.display().to_string(),
            dataset: args.dataset.clone().filter(|_| is_db),
            split: is_db.then(|| args.split.clone()),
            training_split: is_db.then(|| args.training_split.clone()),
        },
        medcoder_version: env!("CARGO_PKG_VERSION").to_string(),
        evaluated_at: utc_timestamp(std::time::SystemTime::now()),
        code_sets: code_sets.as_ref().map(|kb| CodeSetVersions {
            icd10_cm: kb.cm.version.clone(),
            icd10_pcs: kb.pcs.version.clone(),
        }),
    };
    // The files first: a reader of stdout that goes away (`| head`) must not stop them.
    if let Some(dir) = &args.report {
        let written = write_report(dir, &report, &provenance)?;
        eprintln!("report: {} files in {}", written.len(), dir.display());
    }
    outln!("{}", markdown(&report, &provenance, &[]));
    Ok(ExitCode::SUCCESS)
}

/// The gold notes scored, and what else the gold source says.
struct Gold {
    notes: Vec<GoldNote>,
    /// Codes of the training split (database gold only).
    training_codes: Option<HashSet<String>>,
    /// Every code annotated in the dataset (all splits; a gold file's codes).
    dataset_codes: DatasetCodes,
}

#[derive(Default)]
struct DatasetCodes {
    diagnoses: BTreeSet<String>,
    procedures: BTreeSet<String>,
}

impl DatasetCodes {
    fn add(&mut self, diagnoses: &[String], procedures: &[String]) {
        self.diagnoses.extend(diagnoses.iter().cloned());
        self.procedures.extend(procedures.iter().cloned());
    }
}

fn gold_from_db(db: &Path, dataset: &str, split: &str, training: &str) -> anyhow::Result<Gold> {
    let (split, training) = (
        split.parse::<Split>()?.as_str(),
        training.parse::<Split>()?.as_str(),
    );
    let store = Store::open(db)?;
    let mut gold = Vec::new();
    let mut training_codes = HashSet::new();
    let mut dataset_codes = DatasetCodes::default();
    store.for_each_coding_batch(dataset, false, 512, |batch| {
        for e in batch {
            dataset_codes.add(&e.diagnoses, &e.procedures);
            match e.split.as_deref() {
                Some(s) if s == split => gold.push(GoldNote {
                    id: e.doc_id,
                    diagnoses: e.diagnoses,
                    procedures: e.procedures,
                }),
                Some(s) if s == training => {
                    training_codes.extend(e.diagnoses.into_iter().chain(e.procedures))
                }
                _ => {}
            }
        }
        Ok(())
    })?;
    Ok(Gold {
        notes: gold,
        training_codes: (!training_codes.is_empty()).then_some(training_codes),
        dataset_codes,
    })
}

fn gold_from_jsonl(file: &Path) -> anyhow::Result<Gold> {
    let reader = std::io::BufReader::new(fs_err::File::open(file)?);
    let mut gold = Vec::new();
    let mut dataset_codes = DatasetCodes::default();
    for (i, line) in reader.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let g: GoldLine = serde_json::from_str(&line)
            .with_context(|| format!("{} line {}", file.display(), i + 1))?;
        let note = GoldNote {
            id: g.id,
            diagnoses: g.diagnoses.iter().map(|c| normalize(c)).collect(),
            procedures: g.procedures.iter().map(|c| normalize(c)).collect(),
        };
        dataset_codes.add(&note.diagnoses, &note.procedures);
        gold.push(note);
    }
    Ok(Gold {
        notes: gold,
        training_codes: None,
        dataset_codes,
    })
}

/// Codes as the store keeps them: upper case (CodiEsp's files are lower case).
fn normalize(code: &str) -> String {
    code.trim().to_uppercase()
}
