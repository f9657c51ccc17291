//! `medcoder bench code`: notes/s and per-note latency of a coding engine on the notes of a
//! prepared split, each cut to about `--note-chars` characters (2 KB by default, at a
//! sentence end): latency one note at a time, throughput with every thread busy.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use medcoder_assets::MedcoderHome;
use medcoder_coding::lexical::Lexicon;
use medcoder_icd::IcdKnowledge;
use rayon::prelude::*;
use serde::Serialize;

#[derive(Debug, clap::Args)]
pub struct CodeBenchArgs {
    #[arg(long)]
    db: PathBuf,
    #[arg(long)]
    dataset: String,
    /// The split whose notes are coded.
    #[arg(long, default_value = "validation")]
    split: String,
    #[arg(long, value_delimiter = ',', default_value = "train")]
    fit_splits: Vec<String>,
    /// Notes coded (taken in id order, repeated if the split has fewer).
    #[arg(long, default_value_t = 200)]
    notes: usize,
    /// Each note cut to about this many characters (at a sentence end).
    #[arg(long, default_value_t = 2000)]
    note_chars: usize,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct CodeBenchReport {
    engine: String,
    machine: String,
    threads: usize,
    notes: usize,
    mean_note_chars: f64,
    index_load_s: f64,
    notes_per_s: f64,
    latency_p50_ms: f64,
    latency_p99_ms: f64,
    target_notes_per_s: f64,
}

pub fn run(args: CodeBenchArgs, home: &MedcoderHome) -> anyhow::Result<ExitCode> {
    let kb = IcdKnowledge::load(home).ok();
    let lexicon = kb.as_ref().map(|kb| kb as &dyn Lexicon);
    let started = Instant::now();
    let index =
        super::code_engine::retrieval_index(&args.db, &args.dataset, &args.fit_splits, lexicon)?;
    let index_load_s = started.elapsed().as_secs_f64();
    let source = super::code::split_notes(&args.db, &args.dataset, &args.split)?;
    let notes: Vec<(String, String)> = (0..args.notes)
        .map(|i| {
            let note = &source[i % source.len()];
            (format!("{}#{i}", note.id), cut(&note.text, args.note_chars))
        })
        .collect();
    let describe = |code: &str, _| {
        let info = kb.as_ref()?.lookup(code).ok()?;
        Some((info.description, info.billable))
    };
    // Latency: one note at a time.
    let mut latencies: Vec<f64> = notes
        .iter()
        .map(|(id, text)| {
            let t = Instant::now();
            let _ = index.predict(id, text, &describe, lexicon);
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    latencies.sort_by(f64::total_cmp);
    let pick = |q: f64| latencies[((latencies.len() as f64 - 1.0) * q).round() as usize];
    // Throughput: all threads.
    let t = Instant::now();
    notes.par_iter().for_each(|(id, text)| {
        let _ = index.predict(id, text, &describe, lexicon);
    });
    let notes_per_s = notes.len() as f64 / t.elapsed().as_secs_f64();
    let report = CodeBenchReport {
        engine: "retrieval".into(),
        machine: super::bench::machine(),
        threads: rayon::current_num_threads(),
        notes: notes.len(),
        mean_note_chars: notes.iter().map(|(_, t)| t.chars().count()).sum::<usize>() as f64
            / notes.len().max(1) as f64,
        index_load_s,
        notes_per_s,
        latency_p50_ms: pick(0.5),
        latency_p99_ms: pick(0.99),
        target_notes_per_s: 50.0,
    };
    if args.json {
        super::print_json(&report)?;
    } else {
        outln!(
            "coding, {} engine, {} notes of ~{:.0} characters, {} threads — {}",
            report.engine,
            report.notes,
            report.mean_note_chars,
            report.threads,
            report.machine
        );
        outln!(
            "{:.1} notes/s (target ≥ {:.0}), latency p50 {:.1} ms, p99 {:.1} ms; index loaded in {:.1} s",
            report.notes_per_s,
            report.target_notes_per_s,
            report.latency_p50_ms,
            report.latency_p99_ms,
            report.index_load_s
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `text` cut after the last sentence end before `chars` characters (or at `chars`).
fn cut(text: &str, chars: usize) -> String {
    let head: String = text.chars().take(chars).collect();
    if head.chars().count() < chars {
        return head;
    }
    match head.rfind(". ") {
        Some(end) if end > head.len() / 2 => head[..=end].to_string(),
        _ => head,
    }
}
