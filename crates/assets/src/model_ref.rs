//! Model references: an alias of a fetched asset, a local path, or a hub repo id resolved in
//! the standard hf-hub cache (offline: nothing is downloaded at run time).

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::manifest::{asset_spec, AssetKind};
use crate::{AssetError, MedcoderHome};

/// How a user names a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelRef {
    /// An asset of the manifest, e.g. `smollm2-135m-instruct`.
    Alias(String),
    /// A model folder (HF layout) or a single weights file (GGUF, safetensors).
    Path(PathBuf),
    /// `owner/name[@revision]`, looked up in the hf-hub cache.
    Hub { repo: String, revision: String },
}

impl FromStr for ModelRef {
    type Err = AssetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.is_empty() {
            return Err(AssetError::ModelNotFound {
                reference: s.to_string(),
                why: "empty model reference".into(),
            });
        }
        if asset_spec(s).is_some_and(|spec| spec.kind == AssetKind::Model) {
            return Ok(Self::Alias(s.to_string()));
        }
        let path = Path::new(s);
        let looks_like_path =
            s.starts_with('.') || s.starts_with('/') || s.starts_with('~') || path.exists();
        if looks_like_path {
            return Ok(Self::Path(path.to_path_buf()));
        }
        let (repo, revision) = s.split_once('@').unwrap_or((s, "main"));
        let parts: Vec<&str> = repo.split('/').collect();
        if parts.len() == 2 && parts.iter().all(|p| !p.is_empty()) {
            return Ok(Self::Hub {
                repo: repo.to_string(),
                revision: revision.to_string(),
            });
        }
        Err(AssetError::ModelNotFound {
            reference: s.to_string(),
            why: format!(
                "not a known alias ({}), an existing path, or a hub id `owner/name`",
                crate::manifest::ASSETS
                    .iter()
                    .filter(|a| a.kind == AssetKind::Model)
                    .map(|a| a.id)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })
    }
}

impl fmt::Display for ModelRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Alias(alias) => f.write_str(alias),
            Self::Path(path) => write!(f, "{}", path.display()),
            Self::Hub { repo, revision } if revision == "main" => f.write_str(repo),
            Self::Hub { repo, revision } => write!(f, "{repo}@{revision}"),
        }
    }
}

/// Where a model's files are on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedModel {
    /// The folder holding config.json / tokenizer.json, or the folder of a single file.
    pub dir: PathBuf,
    /// The weights file when the model is one file (GGUF), else `None` (read the folder).
    pub file: Option<PathBuf>,
}

/// The hf-hub cache folder: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`.
pub fn hf_hub_cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("HF_HUB_CACHE").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir));
    }
    if let Some(dir) = std::env::var_os("HF_HOME").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir).join("hub"));
    }
    home::home_dir().map(|h| h.join(".cache").join("huggingface").join("hub"))
}

impl ModelRef {
    pub fn resolve(&self, home: &MedcoderHome) -> Result<ResolvedModel, AssetError> {
        match self {
            Self::Alias(alias) => {
                let spec =
                    asset_spec(alias).ok_or_else(|| AssetError::UnknownAsset(alias.clone()))?;
                let main = home.asset_file(spec.id, spec.main_file)?;
                let dir = home.asset_dir(spec.id);
                let is_single_file = main.extension().is_some_and(|e| e == "gguf");
                Ok(ResolvedModel {
                    dir,
                    file: is_single_file.then_some(main),
                })
            }
            Self::Path(path) => resolve_path(path, &self.to_string()),
            Self::Hub { repo, revision } => {
                let cache = hf_hub_cache_dir().ok_or(AssetError::NoHomeDir)?;
                let dir = resolve_in_hub_cache(&cache, repo, revision)?;
                Ok(ResolvedModel { dir, file: None })
            }
        }
    }
}

fn resolve_path(path: &Path, reference: &str) -> Result<ResolvedModel, AssetError> {
    let expanded = match path.strip_prefix("~") {
        Ok(rest) => home::home_dir().map_or_else(|| path.to_path_buf(), |h| h.join(rest)),
        Err(_) => path.to_path_buf(),
    };
    if expanded.is_dir() {
        return Ok(ResolvedModel {
            dir: expanded,
            file: None,
        });
    }
    if expanded.is_file() {
        let dir = expanded
            .parent()
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        return Ok(ResolvedModel {
            dir,
            file: Some(expanded),
        });
    }
    Err(AssetError::ModelNotFound {
        reference: reference.to_string(),
        why: format!("{} does not exist", expanded.display()),
    })
}

/// The snapshot folder of `repo` at `revision` in an hf-hub cache laid out as the `huggingface_hub`
/// library writes it: `models--owner--name/{refs/<revision>, snapshots/<commit>/}`.
fn resolve_in_hub_cache(cache: &Path, repo: &str, revision: &str) -> Result<PathBuf, AssetError> {
    let repo_dir = cache.join(format!("models--{}", repo.replace('/', "--")));
    let not_found = |why: String| AssetError::ModelNotFound {
        reference: repo.to_string(),
        why,
    };
    if !repo_dir.is_dir() {
        return Err(not_found(format!(
            "not in the hf-hub cache {} (medcoder does not download from the hub at run time; \
             copy the model there or pass a local path)",
            cache.display()
        )));
    }
    let ref_file = repo_dir.join("refs").join(revision);
    let commit = if ref_file.is_file() {
        fs_err::read_to_string(&ref_file)?.trim().to_string()
    } else {
        revision.to_string()
    };
    let snapshot = repo_dir.join("snapshots").join(&commit);
    if snapshot.is_dir() {
        Ok(snapshot)
    } else {
        Err(not_found(format!(
            "revision `{revision}` has no snapshot in {}",
            repo_dir.display()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_alias_path_and_hub_id() {
        assert_eq!(
            "smollm2-135m-instruct".parse::<ModelRef>().unwrap(),
            ModelRef::Alias("smollm2-135m-instruct".into())
        );
        assert_eq!(
            "./models/x.gguf".parse::<ModelRef>().unwrap(),
            ModelRef::Path("./models/x.gguf".into())
        );
        assert_eq!(
            "Qwen/Qwen2.5-0.5B@v1".parse::<ModelRef>().unwrap(),
            ModelRef::Hub {
                repo: "Qwen/Qwen2.5-0.5B".into(),
                revision: "v1".into()
            }
        );
        assert!("not-a-model".parse::<ModelRef>().is_err());
        // Knowledge assets are not models.
        assert!("icd10cm".parse::<ModelRef>().is_err());
    }

    #[test]
    fn hub_id_resolves_through_refs_to_snapshot() {
        let cache = tempfile::tempdir().unwrap();
        let repo_dir = cache.path().join("models--org--tiny");
        std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
        std::fs::create_dir_all(repo_dir.join("snapshots").join("abc123")).unwrap();
        std::fs::write(repo_dir.join("refs").join("main"), "abc123\n").unwrap();
        let dir = resolve_in_hub_cache(cache.path(), "org/tiny", "main").unwrap();
        assert_eq!(dir, repo_dir.join("snapshots").join("abc123"));
        let err = resolve_in_hub_cache(cache.path(), "org/absent", "main").unwrap_err();
        assert!(err.to_string().contains("does not download"), "{err}");
    }

    #[test]
    fn alias_not_installed_says_how_to_fetch() {
        let home = MedcoderHome::at(tempfile::tempdir().unwrap().path().join("h"));
        let err = ModelRef::Alias("gemma3-270m".into())
            .resolve(&home)
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("medcoder assets fetch gemma3-270m"),
            "{err}"
        );
    }
}
