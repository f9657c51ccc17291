//! A model's tokenizer with its special tokens and chat template, read from the files of an HF
//! model folder: tokenizer.json, tokenizer_config.json, chat_template.jinja.

use std::path::{Path, PathBuf};

use medcoder_assets::ResolvedModel;
use serde_json::Value;

use crate::{ChatTemplate, ModelError};

#[derive(Debug, Clone)]
pub struct ModelTokenizer {
    tokenizer: tokenizers::Tokenizer,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub chat_template: Option<ChatTemplate>,
    /// The folder the tokenizer came from.
    pub source: PathBuf,
}

/// A special token in tokenizer_config.json: a string, or `{"content": …}`.
fn token_field(config: &Value, key: &str) -> Option<String> {
    match config.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// `chat_template` is a string, or a list of `{name, template}` (the `default` one is used).
fn template_field(config: &Value) -> Option<String> {
    match config.get("chat_template")? {
        Value::String(s) => Some(s.clone()),
        Value::Array(list) => list
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .or_else(|| list.first())
            .and_then(|t| t.get("template"))
            .and_then(Value::as_str)
            .map(str::to_string),
        _ => None,
    }
}

impl ModelTokenizer {
    /// The tokenizer of a resolved model reference.
    pub fn load(model: &ResolvedModel) -> Result<Self, ModelError> {
        if model.dir.join("tokenizer.json").is_file() {
            return Self::from_dir(&model.dir);
        }
        match &model.file {
            Some(file) if file.extension().is_some_and(|e| e == "gguf") => Err(ModelError::Unsupported(format!(
                "{}: a GGUF file without tokenizer.json beside it; building the tokenizer from GGUF \
                 metadata is not implemented yet (it comes with the GGUF model loader)",
                file.display()
            ))),
            _ => Err(ModelError::File {
                path: model.dir.join("tokenizer.json"),
                message: "not found: a model folder needs tokenizer.json".into(),
            }),
        }
    }

    pub fn from_dir(dir: &Path) -> Result<Self, ModelError> {
        let path = dir.join("tokenizer.json");
        let mut tokenizer =
            tokenizers::Tokenizer::from_file(&path).map_err(|e| ModelError::File {
                path: path.clone(),
                message: format!("not a tokenizer: {e}"),
            })?;
        // A tokenizer.json may carry truncation and padding settings (sentence embedders do):
        // ids must be the whole text, cut only where the caller decides.
        tokenizer
            .with_truncation(None)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        tokenizer.with_padding(None);
        let config_path = dir.join("tokenizer_config.json");
        let config: Value = if config_path.is_file() {
            serde_json::from_str(&fs_err::read_to_string(&config_path)?).map_err(|e| {
                ModelError::File {
                    path: config_path.clone(),
                    message: format!("invalid JSON: {e}"),
                }
            })?
        } else {
            Value::Null
        };
        let jinja = dir.join("chat_template.jinja");
        let template = if jinja.is_file() {
            Some(fs_err::read_to_string(&jinja)?)
        } else {
            template_field(&config)
        };
        Ok(Self {
            tokenizer,
            bos_token: token_field(&config, "bos_token"),
            eos_token: token_field(&config, "eos_token"),
            chat_template: template.map(ChatTemplate::new),
            source: dir.to_path_buf(),
        })
    }

    /// Token ids of a text; special tokens in the text are read as such, none are added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        self.tokenizer
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| ModelError::Tokenizer(e.to_string()))
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String, ModelError> {
        self.tokenizer
            .decode(ids, false)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))
    }

    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn special_tokens_and_templates_are_read_in_both_shapes() {
        let config = json!({"bos_token": {"content": "<s>"}, "eos_token": "</s>",
            "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]});
        assert_eq!(token_field(&config, "bos_token").as_deref(), Some("<s>"));
        assert_eq!(token_field(&config, "eos_token").as_deref(), Some("</s>"));
        assert_eq!(template_field(&config).as_deref(), Some("D"));
    }

    #[test]
    fn missing_tokenizer_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let model = ResolvedModel {
            dir: dir.path().to_path_buf(),
            file: None,
        };
        let err = ModelTokenizer::load(&model).unwrap_err().to_string();
        assert!(err.contains("tokenizer.json"), "{err}");
    }
}
