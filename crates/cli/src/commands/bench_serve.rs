//! `medcoder bench serve`: wrk (Debian's `wrk` package) on loopback against `POST /v1/code` of
//! an in-process server running the retrieval engine: requests/s and latency percentiles at
//! `--connections`, and the server's resident memory after a short warm-up (≥ 1k requests) and
//! after the measured run (≥ 10k), which must stay flat.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use medcoder_assets::MedcoderHome;
use medcoder_coding::engine::split_notes;
use medcoder_server::ServeConfig;
use medcoder_train::metrics::current_rss_mib;
use serde::Serialize;

#[derive(Debug, clap::Args)]
pub struct ServeBenchArgs {
    /// The prepared database the retrieval engine is fitted on.
    #[arg(long)]
    db: PathBuf,
    #[arg(long)]
    dataset: String,
    /// The split whose notes are sent (cut to --note-chars), in rotation.
    #[arg(long, default_value = "validation")]
    split: String,
    #[arg(long, default_value_t = 2000)]
    note_chars: usize,
    /// Open connections held by wrk.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// wrk's threads (it shares the machine with the server).
    #[arg(long, default_value_t = 1)]
    wrk_threads: usize,
    /// Seconds of the warm-up run (RSS is read after it).
    #[arg(long, default_value_t = 5)]
    warmup_s: u64,
    /// Seconds of the measured run, at least (longer where the warm-up's rate says the server
    /// would not reach --min-requests in all).
    #[arg(long, default_value_t = 30)]
    duration_s: u64,
    /// Requests served in all (warm-up and measured run) before the second RSS reading.
    #[arg(long, default_value_t = 10_000)]
    min_requests: u64,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct WrkRun {
    requests: u64,
    non_2xx: u64,
    socket_errors: u64,
    requests_per_s: f64,
    latency_p50_ms: f64,
    latency_p90_ms: f64,
    latency_p99_ms: f64,
}

#[derive(Debug, Serialize)]
struct ServeBenchReport {
    machine: String,
    connections: usize,
    wrk_threads: usize,
    server_workers: usize,
    mean_note_chars: f64,
    warmup: WrkRun,
    measured: WrkRun,
    rss_after_warmup_mib: f64,
    rss_after_measured_mib: f64,
    requests_served: u64,
    /// The server process's CPU time (user + system) per request of the measured run.
    server_cpu_ms_per_request: f64,
    /// Cores of this kind a closed loop of `connections` needs to reach the target p99 if
    /// throughput grew with cores (connections × CPU per request / target): an estimate
    /// from this run's figures, not a measurement.
    cores_for_target_estimate: f64,
    target_p99_ms: f64,
}

pub fn run(args: ServeBenchArgs, home: &MedcoderHome) -> anyhow::Result<ExitCode> {
    if Command::new("wrk").arg("--version").output().is_err() {
        bail!("`wrk` is not installed: `apt-get install wrk` (Debian) and run again");
    }
    let notes = split_notes(&args.db, &args.dataset, &args.split)?;
    let bodies: Vec<String> = notes
        .iter()
        .map(|n| {
            serde_json::json!({"id": n.id, "text": super::bench_code::cut(&n.text, args.note_chars)})
                .to_string()
        })
        .collect();
    let mean_note_chars = notes
        .iter()
        .map(|n| {
            super::bench_code::cut(&n.text, args.note_chars)
                .chars()
                .count()
        })
        .sum::<usize>() as f64
        / notes.len() as f64;
    let tmp = tempfile::tempdir()?;
    let script = tmp.path().join("notes.lua");
    fs_err::write(&script, wrk_script(&bodies))?;

    let mut config = ServeConfig {
        port: 0,
        ..ServeConfig::default()
    };
    config.engine.db = Some(args.db.clone());
    config.engine.dataset = Some(args.dataset.clone());
    config.limits.queue_capacity = 4 * args.connections.max(64);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let server = runtime.block_on(medcoder_server::bind(config, home.clone()))?;
    let (address, state) = (server.address, server.state.clone());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = runtime.spawn(server.run(async {
        let _ = stopped.await;
    }));
    let started = Instant::now();
    while state.coder().is_none() {
        if started.elapsed() > Duration::from_secs(600) {
            bail!("the engine did not load within 10 minutes");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let url = format!("http://{address}/v1/code");
    let wrk = |seconds: u64| run_wrk(&url, &script, args.connections, args.wrk_threads, seconds);
    let warmup = wrk(args.warmup_s)?;
    let rss_after_warmup_mib = current_rss_mib();
    // Long enough for --min-requests in all at the warm-up's rate, with a tenth to spare (ten
    // minutes at most: the report says how many were served).
    let missing = args.min_requests.saturating_sub(warmup.requests) as f64;
    let needed_s = ((1.1 * missing / warmup.requests_per_s.max(1.0)).ceil() as u64).min(600);
    let cpu_before = process_cpu_seconds();
    let measured = wrk(args.duration_s.max(needed_s))?;
    let cpu_ms_per_request =
        1e3 * (process_cpu_seconds() - cpu_before) / measured.requests.max(1) as f64;
    let rss_after_measured_mib = current_rss_mib();
    let requests_served = state.metrics_notes_coded();
    let _ = stop.send(());
    runtime.block_on(serving)??;
    let report = ServeBenchReport {
        machine: super::bench::machine(),
        connections: args.connections,
        wrk_threads: args.wrk_threads,
        server_workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
        mean_note_chars,
        warmup,
        measured,
        rss_after_warmup_mib,
        rss_after_measured_mib,
        requests_served,
        server_cpu_ms_per_request: cpu_ms_per_request,
        cores_for_target_estimate: args.connections as f64 * cpu_ms_per_request / TARGET_P99_MS,
        target_p99_ms: TARGET_P99_MS,
    };
    if args.json {
        super::print_json(&report)?;
    } else {
        let m = &report.measured;
        outln!(
            "serve, retrieval engine, POST /v1/code with ~{:.0}-character notes, {} connections (wrk, {} thread) — {}",
            report.mean_note_chars, report.connections, report.wrk_threads, report.machine
        );
        outln!(
            "{:.1} req/s; latency p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms (target ≤ {:.0}); {} requests, {} non-2xx, {} socket errors",
            m.requests_per_s, m.latency_p50_ms, m.latency_p90_ms, m.latency_p99_ms,
            report.target_p99_ms, m.requests, m.non_2xx, m.socket_errors
        );
        outln!(
            "server RSS {:.1} MiB after the warm-up ({} requests), {:.1} MiB after {} requests in all",
            report.rss_after_warmup_mib, report.warmup.requests, report.rss_after_measured_mib, report.requests_served
        );
        outln!(
            "server CPU {:.1} ms per request (user + system); p99 ≤ {:.0} ms at {} connections would take ≥ {:.1} such cores if throughput grew with cores (estimate, not measured)",
            report.server_cpu_ms_per_request, report.target_p99_ms, report.connections, report.cores_for_target_estimate
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The p99 latency `/v1/code` should stay under at 64 connections (#8).
const TARGET_P99_MS: f64 = 100.0;

/// CPU seconds (user + system) this process has used: `/proc/self/stat`'s utime and stime,
/// in Linux's fixed 100 ticks per second; 0 where there is no such file.
fn process_cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the command name (in parentheses, which may hold spaces): state is the
    // first, utime the 12th, stime the 13th.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (ticks(11) + ticks(12)) as f64 / 100.0
}

/// A wrk script sending the bodies in rotation.
fn wrk_script(bodies: &[String]) -> String {
    let mut lua = String::from("wrk.method = \"POST\"\nwrk.headers[\"Content-Type\"] = \"application/json\"\nlocal bodies = {\n");
    for body in bodies {
        // Lua long strings need no escaping as long as the closing level does not occur.
        lua += &format!("[==[{body}]==],\n");
    }
    lua += "}\nlocal i = 0\nrequest = function()\n  i = i % #bodies + 1\n  return wrk.format(nil, nil, nil, bodies[i])\nend\n";
    lua += "done = function(summary, latency, requests)\n  io.write(string.format(\"MEDCODER %d %d %d %d %f %f %f %f\\n\", summary.requests, summary.errors.status, summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout, summary.duration, latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean))\nend\n";
    lua
}

fn run_wrk(
    url: &str,
    script: &Path,
    connections: usize,
    threads: usize,
    seconds: u64,
) -> anyhow::Result<WrkRun> {
    let output = Command::new("wrk")
        .args(["-t", &threads.to_string(), "-c", &connections.to_string()])
        .args(["-d", &format!("{seconds}s"), "--timeout", "10s", "-s"])
        .arg(script)
        .arg(url)
        .output()
        .context("running wrk")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("MEDCODER "))
        .with_context(|| {
            format!(
                "wrk printed no summary:\n{stdout}\n{}",
                String::from_utf8_lossy(&output.stderr)
            )
        })?;
    let f: Vec<f64> = line
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(f64::NAN))
        .collect();
    if f.len() != 8 {
        bail!("unexpected wrk summary: {line}");
    }
    // wrk reports microseconds.
    Ok(WrkRun {
        requests: f[0] as u64,
        non_2xx: f[1] as u64,
        socket_errors: f[2] as u64,
        requests_per_s: f[0] / (f[3] / 1e6),
        latency_p50_ms: f[4] / 1e3,
        latency_p90_ms: f[5] / 1e3,
        latency_p99_ms: f[6] / 1e3,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_cpu_time_grows_with_work_done() {
        let before = process_cpu_seconds();
        let started = Instant::now();
        let mut x = 0u64;
        while process_cpu_seconds() < before + 0.05 {
            for i in 0..100_000u64 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "busy for 20 s, CPU time still {} (from {before})",
                process_cpu_seconds()
            );
        }
    }
}
