//! The model registry (`medcoder models …`): fine-tuned models by name and version, with
//! their base model, adapter (and its sha256), training config, eval headline numbers, stage
//! (dev / staging / production) and artifact paths.
//!
//! It is one JSON file, `<home>/registry/registry.json`, not a DuckDB table: the registry is a
//! handful of entries read by every `code`/`serve` start, which a JSON file serves without
//! opening a database (or holding DuckDB's single-writer lock), and it stays readable and
//! diffable by hand. Each change is a read-modify-write under a lock file
//! (`registry.lock`, created exclusively, holding its writer's pid and host: a crashed writer's
//! lock is taken over, see [`crate::registry_lock`]) and the file is replaced atomically, so
//! concurrent writers neither interleave nor leave a half-written registry. The registry records paths:
//! removing an entry never deletes files on disk.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use medcoder_assets::MedcoderHome;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::eval::provenance::utc_timestamp;
use crate::registry_lock::{LockGuard, LOCK_WAIT};
use crate::CodingError;

/// The files of a run folder that make up the model, hashed into its version (in this order).
const MODEL_FILES: [&str; 3] = [
    "adapter_config.json",
    "adapter_model.safetensors",
    "model.safetensors",
];

fn invalid(message: impl Into<String>) -> CodingError {
    CodingError::Invalid(message.into())
}

/// Where a version is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Dev,
    Staging,
    Production,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Dev => "dev",
            Stage::Staging => "staging",
            Stage::Production => "production",
        }
    }
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Stage {
    type Err = CodingError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "dev" => Ok(Stage::Dev),
            "staging" => Ok(Stage::Staging),
            "production" => Ok(Stage::Production),
            other => Err(invalid(format!(
                "unknown stage '{other}': expected dev, staging or production"
            ))),
        }
    }
}

/// One file of a registered model, with its content hash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HashedFile {
    pub path: PathBuf,
    pub sha256: String,
    pub bytes: u64,
}

/// The headline numbers of one code kind in a `medcoder eval --report` JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KindHeadline {
    pub notes: u64,
    pub micro_precision: f64,
    pub micro_recall: f64,
    pub micro_f1: f64,
    pub macro_f1: f64,
    pub map: f64,
    pub category_micro_f1: f64,
    pub hierarchical_f1: Option<f64>,
}

/// The headline numbers of an eval report, by code kind (`diagnosis`, `procedure`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalHeadline {
    pub report: PathBuf,
    pub notes_gold: u64,
    pub kinds: BTreeMap<String, KindHeadline>,
}

impl EvalHeadline {
    /// Reads the headline numbers of a `report.json` written by `medcoder eval --report`.
    pub fn from_report(path: &Path) -> Result<Self, CodingError> {
        let text = fs_err::read_to_string(path)?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| invalid(format!("{}: not JSON: {e}", path.display())))?;
        let bad = |what: &str| {
            invalid(format!(
                "{}: not a medcoder eval report.json ({what} missing)",
                path.display()
            ))
        };
        let number = |v: &serde_json::Value, pointer: &str| {
            v.pointer(pointer)
                .and_then(serde_json::Value::as_f64)
                .ok_or_else(|| bad(pointer))
        };
        let notes_gold = json
            .get("notes_gold")
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| bad("notes_gold"))?;
        let kinds_json = json
            .get("kinds")
            .and_then(serde_json::Value::as_array)
            .ok_or_else(|| bad("kinds"))?;
        let mut kinds = BTreeMap::new();
        for kind in kinds_json {
            let name = kind
                .get("kind")
                .and_then(serde_json::Value::as_str)
                .ok_or_else(|| bad("kinds[].kind"))?;
            let headline = KindHeadline {
                notes: kind
                    .get("notes")
                    .and_then(serde_json::Value::as_u64)
                    .unwrap_or(0),
                micro_precision: number(kind, "/code/micro/precision")?,
                micro_recall: number(kind, "/code/micro/recall")?,
                micro_f1: number(kind, "/code/micro/f1")?,
                macro_f1: number(kind, "/code/macro_f1")?,
                map: number(kind, "/code/map")?,
                category_micro_f1: number(kind, "/category/micro/f1")?,
                hierarchical_f1: kind
                    .pointer("/hierarchical/f1")
                    .and_then(serde_json::Value::as_f64),
            };
            kinds.insert(name.to_string(), headline);
        }
        Ok(Self {
            report: absolute(path),
            notes_gold,
            kinds,
        })
    }
}

/// One registered version of a model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelEntry {
    pub name: String,
    /// `YYYYMMDD-<first 12 hex of the content hash>`.
    pub version: String,
    /// sha256 over the model files' names and hashes: equal content, equal hash.
    pub content_sha256: String,
    /// The base model the adapter was trained on (`model` of the run's config.yaml).
    pub base_model: Option<String>,
    /// The run folder: PEFT's adapter layout (adapter_config.json + adapter_model.safetensors).
    pub adapter_dir: PathBuf,
    /// sha256 of the weights file (adapter_model.safetensors, or model.safetensors).
    pub adapter_sha256: String,
    pub files: Vec<HashedFile>,
    /// The run's resolved config.yaml, as JSON.
    pub training_config: Option<serde_json::Value>,
    pub eval: Option<EvalHeadline>,
    /// RFC 3339, UTC.
    pub created_at: String,
    pub stage: Stage,
    pub merged: Option<PathBuf>,
    pub gguf: Option<PathBuf>,
}

impl ModelEntry {
    /// `name@version`.
    pub fn id(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct RegistryFile {
    format: u32,
    models: Vec<ModelEntry>,
}

/// What `register` records besides the run folder's own files.
#[derive(Debug, Default, Clone)]
pub struct RegisterRequest {
    pub name: String,
    pub run_dir: PathBuf,
    pub eval_report: Option<PathBuf>,
    pub merged: Option<PathBuf>,
    pub gguf: Option<PathBuf>,
}

/// What a `name[@version|@stage]` string asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    Latest,
    Version(String),
    Stage(Stage),
}

/// Splits and checks `name`, `name@VERSION`, `name@production|staging|dev`.
pub fn parse_spec(spec: &str) -> Result<(String, Selector), CodingError> {
    let (name, rest) = match spec.split_once('@') {
        Some((name, rest)) => (name, Some(rest)),
        None => (spec, None),
    };
    check_name(name)?;
    let selector = match rest {
        None => Selector::Latest,
        Some(rest) => match rest.parse::<Stage>() {
            Ok(stage) => Selector::Stage(stage),
            Err(_) if is_version(rest) => Selector::Version(rest.to_string()),
            Err(_) => {
                return Err(invalid(format!(
                    "bad version '{rest}' in '{spec}': expected YYYYMMDD-<12 hex digits>, \
                     production, staging or dev"
                )))
            }
        },
    };
    Ok((name.to_string(), selector))
}

/// A model name: 1–64 of letters, digits, `.`, `_`, `-`, starting with a letter or digit.
pub fn check_name(name: &str) -> Result<(), CodingError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "bad model name '{name}': use 1-64 letters, digits, '.', '_' or '-', starting with \
             a letter or digit"
        )))
    }
}

fn is_version(s: &str) -> bool {
    let bytes = s.as_bytes();
    bytes.len() == 21
        && bytes[..8].iter().all(u8::is_ascii_digit)
        && bytes[8] == b'-'
        && bytes[9..]
            .iter()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

fn sha256_file(path: &Path) -> Result<(String, u64), CodingError> {
    let mut file = fs_err::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        bytes += n as u64;
        hasher.update(&buffer[..n]);
    }
    Ok((hex::encode(hasher.finalize()), bytes))
}

/// The registry under a medcoder home: `<home>/registry/registry.json`.
#[derive(Debug, Clone)]
pub struct ModelRegistry {
    dir: PathBuf,
}

impl ModelRegistry {
    pub fn open(home: &MedcoderHome) -> Self {
        Self::at(home.root().join("registry"))
    }

    pub fn at(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn file(&self) -> PathBuf {
        self.dir.join("registry.json")
    }

    fn load(&self) -> Result<RegistryFile, CodingError> {
        let file = self.file();
        if !file.exists() {
            return Ok(RegistryFile {
                format: 1,
                models: Vec::new(),
            });
        }
        let text = fs_err::read_to_string(&file)?;
        serde_json::from_str(&text).map_err(|e| invalid(format!("{}: {e}", file.display())))
    }

    /// Runs `change` on the registry under the lock and saves what it leaves.
    fn update<T>(
        &self,
        change: impl FnOnce(&mut RegistryFile) -> Result<T, CodingError>,
    ) -> Result<T, CodingError> {
        fs_err::create_dir_all(&self.dir)?;
        let _lock = LockGuard::acquire(&self.dir.join("registry.lock"), LOCK_WAIT)?;
        let mut registry = self.load()?;
        let out = change(&mut registry)?;
        let json = serde_json::to_string_pretty(&registry)
            .map_err(|e| invalid(format!("serializing the registry: {e}")))?;
        medcoder_train::atomic::write_file(&self.file(), json.as_bytes())?;
        Ok(out)
    }

    /// Every entry, in registration order.
    pub fn list(&self) -> Result<Vec<ModelEntry>, CodingError> {
        Ok(self.load()?.models)
    }

    /// Registers a run folder. Identical content under the same name returns the existing
    /// entry (the bool is `false`); new content gets a new `dev` version (`true`).
    pub fn register(&self, request: &RegisterRequest) -> Result<(ModelEntry, bool), CodingError> {
        check_name(&request.name)?;
        let run_dir = absolute(&request.run_dir);
        if !run_dir.is_dir() {
            return Err(invalid(format!(
                "run folder {} does not exist",
                run_dir.display()
            )));
        }
        let mut files = Vec::new();
        let mut content = Sha256::new();
        for name in MODEL_FILES {
            let path = run_dir.join(name);
            if path.is_file() {
                let (sha256, bytes) = sha256_file(&path)?;
                content.update(format!("{name}\0{sha256}\n").as_bytes());
                files.push(HashedFile {
                    path,
                    sha256,
                    bytes,
                });
            }
        }
        let weights = files
            .iter()
            .find(|f| f.path.extension().is_some_and(|e| e == "safetensors"))
            .ok_or_else(|| {
                invalid(format!(
                    "{} holds no adapter_model.safetensors (or model.safetensors): not a \
                     `medcoder train` run folder",
                    run_dir.display()
                ))
            })?;
        let adapter_sha256 = weights.sha256.clone();
        let content_sha256 = hex::encode(content.finalize());
        let training_config = read_config(&run_dir)?;
        let base_model = training_config
            .as_ref()
            .and_then(|c| c.get("model"))
            .and_then(serde_json::Value::as_str)
            .map(str::to_string);
        let eval = match &request.eval_report {
            Some(path) => Some(EvalHeadline::from_report(path)?),
            None => None,
        };
        let created_at = utc_timestamp(SystemTime::now());
        let version = format!(
            "{}-{}",
            created_at.get(..10).unwrap_or_default().replace('-', ""),
            &content_sha256[..12]
        );
        let entry = ModelEntry {
            name: request.name.clone(),
            version,
            content_sha256,
            base_model,
            adapter_dir: run_dir,
            adapter_sha256,
            files,
            training_config,
            eval,
            created_at,
            stage: Stage::Dev,
            merged: request.merged.as_deref().map(absolute),
            gguf: request.gguf.as_deref().map(absolute),
        };
        self.update(|registry| {
            if let Some(existing) = registry
                .models
                .iter()
                .find(|m| m.name == entry.name && m.content_sha256 == entry.content_sha256)
            {
                return Ok((existing.clone(), false));
            }
            registry.models.push(entry.clone());
            Ok((entry, true))
        })
    }

    /// The entry `spec` names: `name@VERSION`, `name@production`, `name@staging`, `name@dev`
    /// (the latest in that stage) or `name` (the latest registered).
    pub fn resolve(&self, spec: &str) -> Result<ModelEntry, CodingError> {
        let (name, selector) = parse_spec(spec)?;
        let models = self.list()?;
        find(&models, &name, &selector, spec).cloned()
    }

    /// Moves `spec` (`name@VERSION`) to `stage`; promoting to production demotes the previous
    /// production version of that name to staging. Returns the entry and what was demoted.
    pub fn promote(
        &self,
        spec: &str,
        stage: Stage,
    ) -> Result<(ModelEntry, Option<String>), CodingError> {
        let (name, selector) = parse_spec(spec)?;
        self.update(|registry| {
            let target = find(&registry.models, &name, &selector, spec)?
                .version
                .clone();
            let mut demoted = None;
            for model in registry.models.iter_mut().filter(|m| m.name == name) {
                if model.version == target {
                    model.stage = stage;
                } else if stage == Stage::Production && model.stage == Stage::Production {
                    model.stage = Stage::Staging;
                    demoted = Some(model.id());
                }
            }
            let entry = find(&registry.models, &name, &Selector::Version(target), spec)?.clone();
            Ok((entry, demoted))
        })
    }

    /// Records artifacts made from `spec`'s version (a merged model folder, a GGUF file) in its
    /// entry, replacing those recorded before; returns the updated entry.
    pub fn record_artifacts(
        &self,
        spec: &str,
        merged: Option<&Path>,
        gguf: Option<&Path>,
    ) -> Result<ModelEntry, CodingError> {
        let (name, selector) = parse_spec(spec)?;
        self.update(|registry| {
            let version = find(&registry.models, &name, &selector, spec)?
                .version
                .clone();
            let entry = registry
                .models
                .iter_mut()
                .find(|m| m.name == name && m.version == version)
                .ok_or_else(|| invalid(format!("{spec} is not registered")))?;
            if let Some(merged) = merged {
                entry.merged = Some(absolute(merged));
            }
            if let Some(gguf) = gguf {
                entry.gguf = Some(absolute(gguf));
            }
            Ok(entry.clone())
        })
    }

    /// Drops `spec` (`name@VERSION`) from the registry; refused for the production version.
    /// Files on disk are not deleted.
    pub fn remove(&self, spec: &str) -> Result<ModelEntry, CodingError> {
        let (name, selector) = parse_spec(spec)?;
        if !matches!(selector, Selector::Version(_)) {
            return Err(invalid(format!(
                "remove takes an exact version (name@YYYYMMDD-<12 hex>), not '{spec}'"
            )));
        }
        self.update(|registry| {
            let entry = find(&registry.models, &name, &selector, spec)?.clone();
            if entry.stage == Stage::Production {
                return Err(invalid(format!(
                    "refusing to remove {}: it is the production version of {}; promote \
                     another version to production first",
                    entry.id(),
                    entry.name
                )));
            }
            registry.models.retain(|m| m.id() != entry.id());
            Ok(entry)
        })
    }
}

/// The model and adapter a command runs (`code`, `serve`, `generate`, `merge`, `export gguf`),
/// from its `--model` and `--adapter` with registry references resolved.
#[derive(Debug, Clone)]
pub struct ModelChoice {
    /// What to load: an asset id, HF folder, GGUF file or hub id.
    pub model: String,
    /// The adapter folder to apply, if any.
    pub adapter: Option<PathBuf>,
    /// The registered version the adapter (or model) came from.
    pub entry: Option<ModelEntry>,
}

impl ModelChoice {
    /// Where the model's files are: `model` parsed as a reference and found (asset, path or
    /// hf-hub cache).
    pub fn resolve_model(
        &self,
        home: &MedcoderHome,
    ) -> Result<medcoder_assets::ResolvedModel, medcoder_assets::AssetError> {
        self.model
            .parse::<medcoder_assets::ModelRef>()?
            .resolve(home)
    }
}

/// Resolves `--model` and `--adapter` as every command takes them: `--adapter coder@production`
/// (`@staging`, `@dev`, `@VERSION`) is that version's run folder, on the base model it records
/// unless `--model` names one; `--model coder@VERSION` (no adapter) is the same, when `coder` is
/// registered (otherwise it is left to the model's own resolution, as a hub id's `@revision`).
/// An existing path is always a path, `@` or not.
pub fn resolve_model_choice(
    model: Option<&str>,
    adapter: Option<&Path>,
    home: &MedcoderHome,
) -> Result<ModelChoice, CodingError> {
    let registry = ModelRegistry::open(home);
    let entry = match (adapter, model) {
        (Some(adapter), _) => {
            let spec = adapter.to_string_lossy();
            if spec.contains('@') && !adapter.exists() {
                Some(registry.resolve(&spec)?)
            } else {
                None
            }
        }
        (None, Some(model)) if is_registry_spec(model) => {
            let (name, _) = parse_spec(model)?;
            if registry.list()?.iter().any(|m| m.name == name) {
                Some(registry.resolve(model)?)
            } else {
                None
            }
        }
        (None, _) => None,
    };
    let Some(entry) = entry else {
        let model = model.ok_or_else(|| {
            invalid(
                "no model: give --model (an asset id, HF folder, GGUF file or a registered                  name@version)",
            )
        })?;
        return Ok(ModelChoice {
            model: model.to_string(),
            adapter: adapter.map(Path::to_path_buf),
            entry: None,
        });
    };
    let model = match model {
        Some(m) if !is_registry_spec(m) => m.to_string(),
        _ => entry.base_model.clone().ok_or_else(|| {
            invalid(format!(
                "{} records no base model: give --model",
                entry.id()
            ))
        })?,
    };
    Ok(ModelChoice {
        model,
        adapter: Some(entry.adapter_dir.clone()),
        entry: Some(entry),
    })
}

/// Whether `s` reads as a registry reference (`name@version`, `name@production`, …) rather
/// than a path or a hub id (`org/repo@revision` has a `/`, which no registry name has).
pub fn is_registry_spec(s: &str) -> bool {
    s.contains('@') && !Path::new(s).exists() && parse_spec(s).is_ok()
}

fn find<'a>(
    models: &'a [ModelEntry],
    name: &str,
    selector: &Selector,
    spec: &str,
) -> Result<&'a ModelEntry, CodingError> {
    let named: Vec<&ModelEntry> = models.iter().filter(|m| m.name == name).collect();
    if named.is_empty() {
        return Err(invalid(format!(
            "no model named '{name}' in the registry (medcoder models list)"
        )));
    }
    let found = match selector {
        Selector::Latest => named.last().copied(),
        Selector::Version(version) => named.into_iter().find(|m| &m.version == version),
        Selector::Stage(stage) => named.into_iter().rev().find(|m| m.stage == *stage),
    };
    found.ok_or_else(|| {
        let what = match selector {
            Selector::Stage(stage) => format!("{name} has no {stage} version"),
            _ => format!("{spec} is not registered"),
        };
        invalid(format!("{what} (medcoder models list)"))
    })
}

fn read_config(run_dir: &Path) -> Result<Option<serde_json::Value>, CodingError> {
    let path = run_dir.join("config.yaml");
    if !path.is_file() {
        return Ok(None);
    }
    let text = fs_err::read_to_string(&path)?;
    let value: serde_json::Value =
        serde_yaml::from_str(&text).map_err(|e| invalid(format!("{}: {e}", path.display())))?;
    Ok(Some(value))
}

#[cfg(test)]
#[path = "registry_tests.rs"]
mod tests;
