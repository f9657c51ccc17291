//! `serve.yaml`: where to listen, which engine codes notes, which model answers chat requests,
//! the limits, and who may call. Printed resolved at start, without secrets.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use medcoder_coding::EngineConfig;
use serde::{Deserialize, Serialize};

use crate::ServerError;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServeConfig {
    pub host: String,
    pub port: u16,
    /// The engine behind `/v1/code` (the same settings as `medcoder code`'s flags).
    pub engine: EngineConfig,
    /// The model behind `/v1/chat/completions`; `None` leaves that route answering 404.
    pub generation: Option<GenerationConfig>,
    pub limits: Limits,
    pub auth: AuthConfig,
    /// Origins allowed to call from a browser; none by default (CORS closed).
    pub cors_origins: Vec<String>,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8080,
            engine: EngineConfig::default(),
            generation: None,
            limits: Limits::default(),
            auth: AuthConfig::default(),
            cors_origins: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GenerationConfig {
    /// An asset id, HF folder or GGUF file.
    pub model: String,
    /// The name clients use in `model`; the model reference by default.
    pub served_name: Option<String>,
    pub device: String,
    /// Sequences in the continuous batch at most: more requests wait in the queue and join
    /// as sequences finish.
    pub max_batch: usize,
    /// `max_tokens` when a request gives none, and the most it may ask for.
    pub default_max_tokens: usize,
    pub max_tokens_limit: usize,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            model: String::new(),
            served_name: None,
            device: "auto".into(),
            max_batch: 8,
            default_max_tokens: 256,
            max_tokens_limit: 2048,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Request bodies above this are refused with 413.
    pub max_body_bytes: usize,
    /// Notes above this many characters are refused with 422, stating both numbers.
    pub max_note_chars: usize,
    /// Notes in one `/v1/code/batch` request at most.
    pub max_batch_notes: usize,
    /// Requests waiting for an engine at most; beyond it, 503 with Retry-After.
    pub queue_capacity: usize,
    /// A request not answered within this many seconds gets 504.
    pub request_timeout_s: f64,
    /// Engine worker threads (coding); 0 = one per core for the retrieval engine, 1 for llm.
    pub workers: usize,
    /// llm engine: notes waiting together are generated as one batch of up to this many.
    pub llm_batch: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 4 << 20,
            max_note_chars: 200_000,
            max_batch_notes: 64,
            queue_capacity: 256,
            request_timeout_s: 60.0,
            workers: 0,
            llm_batch: 8,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// SHA-256 (hex) of each accepted API key (`medcoder serve --hash-key KEY` prints one).
    /// None: the API is open (fine on loopback, not on a network).
    pub api_key_sha256: Vec<String>,
    /// Requests per minute per key (or per client address when keys are off); 0 = unlimited.
    pub rate_limit_per_minute: u32,
}

impl ServeConfig {
    pub fn from_yaml_file(path: &Path) -> Result<Self, ServerError> {
        let text = fs_err::read_to_string(path)?;
        let config: Self = serde_yaml::from_str(&text)
            .map_err(|e| ServerError::Config(format!("{}: {e}", path.display())))?;
        config
            .validate()
            .map_err(|e| ServerError::Config(format!("{}: {e}", path.display())))?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), String> {
        for (i, hash) in self.auth.api_key_sha256.iter().enumerate() {
            if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!(
                    "auth.api_key_sha256[{i}]: not a SHA-256 in hex (64 hex digits); `medcoder serve --hash-key KEY` prints one"
                ));
            }
        }
        if self.limits.queue_capacity == 0 {
            return Err("limits.queue_capacity: must be at least 1".into());
        }
        if self.limits.request_timeout_s.is_nan() || self.limits.request_timeout_s <= 0.0 {
            return Err("limits.request_timeout_s: must be positive".into());
        }
        if let Some(g) = &self.generation {
            if g.model.is_empty() {
                return Err("generation.model: give an asset id, HF folder or GGUF file".into());
            }
            if g.max_batch == 0 {
                return Err("generation.max_batch: must be at least 1".into());
            }
        }
        Ok(())
    }

    pub fn address(&self) -> Result<SocketAddr, ServerError> {
        format!("{}:{}", self.host, self.port)
            .parse()
            .map_err(|e| ServerError::Config(format!("host/port {}:{}: {e}", self.host, self.port)))
    }

    /// The config as YAML with the key hashes replaced by their count.
    pub fn resolved_without_secrets(&self) -> String {
        let mut shown = self.clone();
        let keys = shown.auth.api_key_sha256.len();
        shown.auth.api_key_sha256 = vec![format!("<{keys} key hashes>")];
        serde_yaml::to_string(&shown).unwrap_or_default()
    }

    /// Paths in the config made absolute against the folder of the file they came from.
    pub fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut Option<PathBuf>| {
            if let Some(path) = p {
                if path.is_relative() {
                    *path = base.join(&*path);
                }
            }
        };
        fix(&mut self.engine.db);
        // `adapter: coder@production` names a registered model, not a file.
        let registered = self.engine.adapter.as_ref().is_some_and(|a| {
            a.to_str().is_some_and(|s| {
                s.contains('@') && medcoder_coding::registry::parse_spec(s).is_ok()
            })
        });
        if !registered {
            fix(&mut self.engine.adapter);
        }
        fix(&mut self.engine.prompt_template);
    }
}

/// The SHA-256 (hex) of an API key, as `auth.api_key_sha256` lists it.
pub fn hash_api_key(key: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(key.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_round_trips_and_bad_fields_are_named() {
        let yaml = "port: 9000\nengine:\n  engine: retrieval\n  db: data/c.duckdb\n  dataset: codiesp\nlimits:\n  max_note_chars: 1000\n";
        let config: ServeConfig = serde_yaml::from_str(yaml).expect("parses");
        assert_eq!(config.port, 9000);
        assert_eq!(config.limits.max_note_chars, 1000);
        assert_eq!(
            config.limits.queue_capacity,
            Limits::default().queue_capacity
        );
        let error = serde_yaml::from_str::<ServeConfig>("limits:\n  max_note_char: 3\n")
            .expect_err("unknown field");
        assert!(error.to_string().contains("max_note_char"), "{error}");
    }

    #[test]
    fn registered_adapters_are_not_made_paths() {
        let mut config = ServeConfig::default();
        config.engine.adapter = Some("coder@production".into());
        config.engine.db = Some("codes.duckdb".into());
        config.resolve_paths(Path::new("/etc/medcoder"));
        assert_eq!(config.engine.adapter, Some("coder@production".into()));
        assert_eq!(config.engine.db, Some("/etc/medcoder/codes.duckdb".into()));
        config.engine.adapter = Some("runs/a".into());
        config.resolve_paths(Path::new("/etc/medcoder"));
        assert_eq!(config.engine.adapter, Some("/etc/medcoder/runs/a".into()));
    }

    #[test]
    fn key_hashes_are_checked_and_never_printed() {
        let mut config = ServeConfig::default();
        config.auth.api_key_sha256 = vec!["abc".into()];
        assert!(config
            .validate()
            .expect_err("short")
            .contains("api_key_sha256[0]"));
        let hash = hash_api_key("secret");
        config.auth.api_key_sha256 = vec![hash.clone()];
        config.validate().expect("valid");
        let shown = config.resolved_without_secrets();
        assert!(
            !shown.contains(&hash) && shown.contains("<1 key hashes>"),
            "{shown}"
        );
    }
}
