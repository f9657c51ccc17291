//! Per-step metrics in `metrics.jsonl` (one JSON object per line), peak memory, and the run's
//! loss plot.

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::TrainError;

/// One line of `metrics.jsonl`: a training step (with `loss`) or an evaluation (with
/// `eval_loss`), or both.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MetricsRecord {
    pub step: usize,
    pub epoch: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grad_norm: Option<f64>,
    /// Tokens (padding excluded) processed per second in this step, forward and backward.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_s: Option<f64>,
    /// Scored (target) tokens of this step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_s: Option<f64>,
    pub peak_rss_mib: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_mem_mib: Option<f64>,
}

/// The process's peak resident set (VmHWM) in MiB, 0 where the OS does not say.
pub fn peak_rss_mib() -> f64 {
    read_status_kib("VmHWM:").map_or(0.0, |kib| kib as f64 / 1024.0)
}

/// The process's current resident set in MiB.
pub fn current_rss_mib() -> f64 {
    read_status_kib("VmRSS:").map_or(0.0, |kib| kib as f64 / 1024.0)
}

fn read_status_kib(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    line[key.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// Appends records to `metrics.jsonl`, each line flushed.
#[derive(Debug)]
pub struct MetricsLog {
    file: fs_err::File,
}

impl MetricsLog {
    /// Open for appending. A new run (`resumed_at` none) starts an empty file; a resumed run
    /// first drops the lines after its checkpoint's step (written by the run that was killed),
    /// so the file reads as one uninterrupted run.
    pub fn open(path: &Path, resumed_at: Option<usize>) -> Result<Self, TrainError> {
        let kept = match resumed_at {
            Some(step) if path.exists() => {
                // The lines are kept as written (re-serializing could change float digits).
                let text = fs_err::read_to_string(path)?;
                let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
                let kept: Vec<&str> = lines
                    .iter()
                    .copied()
                    .filter(|line| {
                        serde_json::from_str::<MetricsRecord>(line).is_ok_and(|r| r.step <= step)
                    })
                    .collect();
                (kept.len() != lines.len() || !text.ends_with('\n'))
                    .then(|| kept.iter().map(|l| format!("{l}\n")).collect::<String>())
            }
            Some(_) => None,
            None => Some(String::new()),
        };
        if let Some(text) = kept {
            crate::atomic::write_file(path, text.as_bytes())?;
        }
        let file = fs_err::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(Self { file })
    }

    pub fn append(&mut self, record: &MetricsRecord) -> Result<(), TrainError> {
        let line = serde_json::to_string(record).map_err(std::io::Error::other)?;
        writeln!(self.file, "{line}")?;
        self.file.flush()?;
        Ok(())
    }
}

/// Every record of a `metrics.jsonl`; a torn last line (a kill mid-write) is ignored.
pub fn read_metrics(path: &Path) -> Result<Vec<MetricsRecord>, TrainError> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let text = fs_err::read_to_string(path)?;
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut records = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        match serde_json::from_str(line) {
            Ok(record) => records.push(record),
            Err(_) if i + 1 == lines.len() => {}
            Err(e) => {
                return Err(TrainError::Checkpoint {
                    path: path.display().to_string(),
                    message: format!("line {}: {e}", i + 1),
                })
            }
        }
    }
    Ok(records)
}
