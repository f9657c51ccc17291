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

/// Write `path` atomically: `write` fills the temp file it is given, which is then flushed
/// to disk and renamed over `path`; on any error the temp file is removed and `path` is
/// left as it was.
pub fn write_through(
    path: &Path,
    temp: &Path,
    write: impl FnOnce(&Path) -> Result<(), TrainError>,
) -> Result<(), TrainError> {
    let result = write(temp).and_then(|()| {
        fs_err::File::open(temp)?.sync_all()?;
        fs_err::rename(temp, path)?;
        Ok(())
    });
    if result.is_err() {
        let _ = std::fs::remove_file(temp);
    }
    result
}

/// Replace `path` with `bytes` atomically.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<(), TrainError> {
    write_through(path, &temp_path(path), |temp| {
        fs_err::File::create(temp)?.write_all(bytes)?;
        Ok(())
    })
}

/// Save tensors as safetensors at `path` atomically.
pub fn write_safetensors(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<(), TrainError> {
    write_through(path, &temp_path(path), |temp| {
        candle_core::safetensors::save(tensors, temp).map_err(|e| TrainError::Checkpoint {
            path: path.display().to_string(),
            message: e.to_string(),
        })
    })
}

/// Flush a folder's entries (renames into it) to disk.
pub fn sync_dir(dir: &Path) {
    if let Ok(handle) = std::fs::File::open(dir) {
        let _ = handle.sync_all();
    }
}
