//! A compact binary cache of the parsed knowledge base, keyed by the sources it was built from:
//! a changed, moved or replaced source file gives a new key, and the cache is rebuilt.

use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use sha2::{Digest, Sha256};

use crate::{IcdError, IcdKnowledge, IcdSources};

/// Bump when the layout of [`IcdKnowledge`] or the parsing rules change.
const FORMAT: u32 = 6;
const PREFIX: &str = "icd-kb-";

fn cache_key(sources: &IcdSources) -> Result<String, IcdError> {
    let mut hasher = Sha256::new();
    hasher.update(FORMAT.to_le_bytes());
    hasher.update(env!("CARGO_PKG_VERSION").as_bytes());
    for path in sources.files() {
        let meta = fs_err::metadata(path)?;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        hasher.update(path.to_string_lossy().as_bytes());
        hasher.update(meta.len().to_le_bytes());
        hasher.update(mtime.to_le_bytes());
    }
    Ok(hex::encode(&hasher.finalize()[..12]))
}

pub(crate) fn cache_path(cache_dir: &Path, sources: &IcdSources) -> Result<PathBuf, IcdError> {
    Ok(cache_dir.join(format!("{PREFIX}{}.bin", cache_key(sources)?)))
}

/// The cached knowledge base, or `None` when there is no usable cache for these sources.
pub(crate) fn read(path: &Path) -> Option<IcdKnowledge> {
    let file = std::fs::File::open(path).ok()?;
    match bincode::deserialize_from(BufReader::new(file)) {
        Ok(kb) => Some(kb),
        Err(error) => {
            tracing::warn!(path = %path.display(), %error, "unreadable ICD cache; rebuilding");
            None
        }
    }
}

/// Write atomically (temp file + rename) and remove caches of older sources.
pub(crate) fn write(path: &Path, kb: &IcdKnowledge) -> Result<(), IcdError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs_err::create_dir_all(dir)?;
    let cache_error = |message: String| IcdError::Cache {
        path: path.to_path_buf(),
        message,
    };
    let tmp = tempfile::NamedTempFile::new_in(dir)?;
    {
        let mut writer = BufWriter::new(tmp.as_file());
        bincode::serialize_into(&mut writer, kb).map_err(|e| cache_error(e.to_string()))?;
        writer.flush()?;
    }
    tmp.persist(path).map_err(|e| cache_error(e.to_string()))?;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(PREFIX) && entry.path() != path {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    Ok(())
}
