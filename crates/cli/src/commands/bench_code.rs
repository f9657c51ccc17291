//! `medcoder bench code`: notes/s and per-note latency of a coding engine (any `--engine`) on the notes of a
//! prepared split, each cut to about `--note-chars` characters (2 KB by default, at a
//! sentence end): latency one note at a time, throughput with every thread busy.

use std::process::ExitCode;
use std::time::Instant;

use medcoder_assets::MedcoderHome;
use rayon::prelude::*;
use serde::Serialize;

use medcoder_coding::engine::{load_code_sets, split_notes};
use medcoder_coding::Coder;

use super::code_engine::EngineArgs;

#[derive(Debug, clap::Args)]
pub struct CodeBenchArgs {
    #[command(flatten)]
    engine: EngineArgs,
    /// The split whose notes are coded.
    #[arg(long, default_value = "validation")]
    split: String,
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
    let kb = load_code_sets(home);
    let started = Instant::now();
    let config = args.engine.config();
    let engine = Coder::build(&config, kb, home)?;
    let index_load_s = started.elapsed().as_secs_f64();
    let (db, dataset) = config.dataset_source()?;
    let source = split_notes(db, dataset, &args.split)?;
    let notes: Vec<(String, String)> = (0..args.notes)
        .map(|i| {
            let note = &source[i % source.len()];
            (format!("{}#{i}", note.id), cut(&note.text, args.note_chars))
        })
        .collect();
    // Latency: one note at a time.
    let mut latencies = Vec::with_capacity(notes.len());
    for (id, text) in &notes {
        let t = Instant::now();
        engine.code(id, text)?;
        latencies.push(t.elapsed().as_secs_f64() * 1e3);
    }
    latencies.sort_by(f64::total_cmp);
    let pick = |q: f64| latencies[((latencies.len() as f64 - 1.0) * q).round() as usize];
    // Throughput: all threads (one note at a time for engines that use them all).
    let t = Instant::now();
    let code = |(id, text): &(String, String)| engine.code(id, text).map(drop);
    if engine.parallel() {
        notes.par_iter().try_for_each(code)?;
    } else {
        notes.iter().try_for_each(code)?;
    }
    let notes_per_s = notes.len() as f64 / t.elapsed().as_secs_f64();
    let report = CodeBenchReport {
        engine: args.engine.engine.as_str().to_string(),
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
pub(crate) fn cut(text: &str, chars: usize) -> String {
    let head: String = text.chars().take(chars).collect();
    if head.chars().count() < chars {
        return head;
    }
    match head.rfind(". ") {
        Some(end) if end > head.len() / 2 => head[..=end].to_string(),
        _ => head,
    }
}
