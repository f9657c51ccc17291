//! Writes that never leave a half-written file behind: a temp file in the same folder,
//! flushed to disk, then renamed over the target. A full disk fails the write and keeps the
//! previous file (and checkpoint) intact.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::Tensor;

use crate::TrainError;

fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Replace `path` with `bytes` atomically.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<(), TrainError> {
    let temp = temp_path(path);
    let result = (|| -> std::io::Result<()> {
        let mut file = fs_err::File::create(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs_err::rename(&temp, path)?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    Ok(result?)
}

/// Save tensors as safetensors at `path` atomically.
pub fn write_safetensors(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<(), TrainError> {
    let temp = temp_path(path);
    let result = (|| -> Result<(), TrainError> {
        candle_core::safetensors::save(tensors, &temp).map_err(|e| TrainError::Checkpoint {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        fs_err::File::open(&temp)?.sync_all()?;
        fs_err::rename(&temp, path)?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}

/// Flush a folder's entries (renames into it) to disk.
pub fn sync_dir(dir: &Path) {
    if let Ok(handle) = std::fs::File::open(dir) {
        let _ = handle.sync_all();
    }
}
