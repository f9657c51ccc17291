//! Checkpoints: everything a run needs to continue as if it had never stopped. A checkpoint is
//! a folder `checkpoints/step-NNNNNNNN/` holding the trainable weights (a PEFT adapter, or the
//! full weights), the optimizer moments, the trainer state (step, data cursor, seed, best
//! evaluation) and the config. It is written under a temporary name and renamed when complete,
//! so a kill or a full disk never leaves a checkpoint that looks whole and is not.

use std::path::{Path, PathBuf};

use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::atomic::{sync_dir, write_file, write_safetensors};
use crate::optim::AdamW;
use crate::trainable::Trainable;
use crate::TrainError;

/// Where the run stands after an optimizer step.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub step: usize,
    /// The epoch of the next batch and the index of that batch in it.
    pub epoch: usize,
    pub batch_in_epoch: usize,
    /// Target tokens trained on so far.
    pub tokens_seen: u64,
    pub seed: u64,
    pub total_steps: usize,
    pub best_eval_loss: Option<f64>,
    pub best_step: Option<usize>,
    pub evals_without_improvement: usize,
    /// Why the run ended (`max_steps`, `epochs`, `early_stopping`), once it has.
    pub finished: Option<String>,
}

pub fn checkpoints_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

fn step_dir_name(step: usize) -> String {
    format!("step-{step:08}")
}

/// Complete checkpoints of a run, by step.
pub fn list_checkpoints(run_dir: &Path) -> Vec<(usize, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(checkpoints_dir(run_dir)) else {
        return Vec::new();
    };
    let mut found: Vec<(usize, PathBuf)> = entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("step-")?.parse().ok()?;
            let path = entry.path();
            path.join("trainer_state.json")
                .is_file()
                .then_some((step, path))
        })
        .collect();
    found.sort();
    found
}

/// Write a checkpoint of the current step and prune old ones (keeping the last `keep_last`
/// and the best). Returns its folder.
pub fn save_checkpoint(
    run_dir: &Path,
    state: &TrainerState,
    trainable: &Trainable,
    optimizer: &AdamW,
    config_yaml: &str,
    keep_last: usize,
) -> Result<PathBuf, TrainError> {
    let root = checkpoints_dir(run_dir);
    fs_err::create_dir_all(&root)?;
    let final_dir = root.join(step_dir_name(state.step));
    let temp_dir = root.join(format!(".{}.partial", step_dir_name(state.step)));
    if temp_dir.exists() {
        fs_err::remove_dir_all(&temp_dir)?;
    }
    fs_err::create_dir_all(&temp_dir)?;
    trainable.save(&temp_dir)?;
    write_safetensors(
        &temp_dir.join("optimizer.safetensors"),
        &optimizer.state_tensors().into_iter().collect(),
    )?;
    write_file(&temp_dir.join("config.yaml"), config_yaml.as_bytes())?;
    let json = serde_json::to_string_pretty(state).map_err(std::io::Error::other)?;
    // Written last: its presence marks the folder complete.
    write_file(&temp_dir.join("trainer_state.json"), json.as_bytes())?;
    if final_dir.exists() {
        fs_err::remove_dir_all(&final_dir)?;
    }
    fs_err::rename(&temp_dir, &final_dir)?;
    sync_dir(&root);
    prune(run_dir, keep_last, state.best_step)?;
    Ok(final_dir)
}

fn prune(run_dir: &Path, keep_last: usize, best: Option<usize>) -> Result<(), TrainError> {
    let all = list_checkpoints(run_dir);
    let cut = all.len().saturating_sub(keep_last.max(1));
    for (step, path) in &all[..cut] {
        if Some(*step) != best {
            fs_err::remove_dir_all(path)?;
        }
    }
    // Leftovers of a write that was interrupted.
    if let Ok(entries) = std::fs::read_dir(checkpoints_dir(run_dir)) {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().ends_with(".partial") {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    Ok(())
}

pub fn read_state(dir: &Path) -> Result<TrainerState, TrainError> {
    let path = dir.join("trainer_state.json");
    serde_json::from_str(&fs_err::read_to_string(&path)?).map_err(|e| TrainError::Checkpoint {
        path: path.display().to_string(),
        message: format!("unreadable trainer state: {e}"),
    })
}

/// Restore weights and optimizer moments from a checkpoint folder.
pub fn restore(
    dir: &Path,
    trainable: &Trainable,
    optimizer: &mut AdamW,
    device: &Device,
) -> Result<TrainerState, TrainError> {
    let state = read_state(dir)?;
    trainable.load(dir)?;
    let path = dir.join("optimizer.safetensors");
    let moments =
        candle_core::safetensors::load(&path, device).map_err(|e| TrainError::Checkpoint {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
    optimizer
        .load_state(&moments, state.step)
        .map_err(|message| TrainError::Checkpoint {
            path: path.display().to_string(),
            message,
        })?;
    Ok(state)
}
