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
    // (step, set aside by a replacement that was interrupted, path)
    let mut found: Vec<(usize, bool, PathBuf)> = entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let (digits, aside) = match name.strip_suffix(".replaced") {
                Some(rest) => (rest.strip_prefix(".step-")?, true),
                None => (name.strip_prefix("step-")?, false),
            };
            let step = digits.parse().ok()?;
            let path = entry.path();
            path.join("trainer_state.json")
                .is_file()
                .then_some((step, aside, path))
        })
        .collect();
    found.sort();
    // A folder set aside counts only where its step has no other.
    found.dedup_by_key(|(step, _, _)| *step);
    found
        .into_iter()
        .map(|(step, _, path)| (step, path))
        .collect()
}

/// Write a checkpoint of the current step and prune old ones (keeping the last `keep_last`
/// and the best). Returns its folder.
///
/// A failed write (a full disk, a file-size limit) removes what it had written and leaves the
/// earlier checkpoints as they were; the error names the checkpoint that could not be written.
pub fn save_checkpoint(
    run_dir: &Path,
    state: &TrainerState,
    trainable: &Trainable,
    optimizer: &AdamW,
    config_yaml: &str,
    keep_last: usize,
) -> Result<PathBuf, TrainError> {
    let root = checkpoints_dir(run_dir);
    let final_dir = root.join(step_dir_name(state.step));
    let temp_dir = root.join(format!(".{}.partial", step_dir_name(state.step)));
    let written = write_checkpoint_folder(&temp_dir, state, trainable, optimizer, config_yaml)
        .and_then(|()| replace_dir(&temp_dir, &final_dir));
    if let Err(error) = written {
        let _ = std::fs::remove_dir_all(&temp_dir);
        let kept = list_checkpoints(run_dir)
            .pop()
            .map_or_else(|| "none".into(), |(_, p)| p.display().to_string());
        return Err(TrainError::Checkpoint {
            path: final_dir.display().to_string(),
            message: format!(
                "could not be written ({error}); nothing of it was kept, and the last complete checkpoint is {kept}: free some disk space and resume"
            ),
        });
    }
    sync_dir(&root);
    prune(run_dir, keep_last, state.best_step)?;
    Ok(final_dir)
}

fn write_checkpoint_folder(
    dir: &Path,
    state: &TrainerState,
    trainable: &Trainable,
    optimizer: &AdamW,
    config_yaml: &str,
) -> Result<(), TrainError> {
    if dir.exists() {
        fs_err::remove_dir_all(dir)?;
    }
    fs_err::create_dir_all(dir)?;
    trainable.save(dir)?;
    write_safetensors(
        &dir.join("optimizer.safetensors"),
        &optimizer.state_tensors().into_iter().collect(),
    )?;
    write_file(&dir.join("config.yaml"), config_yaml.as_bytes())?;
    let json = serde_json::to_string_pretty(state).map_err(std::io::Error::other)?;
    // Written last: its presence marks the folder complete.
    write_file(&dir.join("trainer_state.json"), json.as_bytes())
}

/// Put the complete folder `from` at `to`. A checkpoint already there (the same step saved
/// again, e.g. once finished) is moved aside first and removed only after the new one is in
/// place, so that some complete checkpoint of the step exists at every moment.
fn replace_dir(from: &Path, to: &Path) -> Result<(), TrainError> {
    if !to.exists() {
        fs_err::rename(from, to)?;
        return Ok(());
    }
    let name = to
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let aside = to.with_file_name(format!(".{name}.replaced"));
    if aside.exists() {
        fs_err::remove_dir_all(&aside)?;
    }
    fs_err::rename(to, &aside)?;
    if let Err(error) = fs_err::rename(from, to) {
        let _ = std::fs::rename(&aside, to);
        return Err(error.into());
    }
    let _ = std::fs::remove_dir_all(&aside);
    Ok(())
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
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".partial") || name.ends_with(".replaced") {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_lists_whole_checkpoints_and_one_set_aside_by_an_interrupted_replacement() {
        let run = tempfile::tempdir().expect("a temp dir");
        let root = checkpoints_dir(run.path());
        for (name, complete) in [
            ("step-00000003", true),
            // Set aside while step 3 was saved again: step 3 itself is whole.
            (".step-00000003.replaced", true),
            // Interrupted between the two renames: the only copy of step 4.
            (".step-00000004.replaced", true),
            // Written in part: never listed.
            (".step-00000005.partial", true),
            ("step-00000006", false),
        ] {
            let dir = root.join(name);
            std::fs::create_dir_all(&dir).expect("a folder");
            if complete {
                std::fs::write(dir.join("trainer_state.json"), "{}").expect("a state");
            }
        }
        assert_eq!(
            list_checkpoints(run.path()),
            vec![
                (3, root.join("step-00000003")),
                (4, root.join(".step-00000004.replaced")),
            ]
        );
    }
}
