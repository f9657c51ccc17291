//! A model's tokenizer with its special tokens and chat template, read from the files of an HF
//! model folder (tokenizer.json, tokenizer_config.json, chat_template.jinja) or from the metadata
//! of a GGUF file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::quantized::gguf_file;
use medcoder_assets::ResolvedModel;
use serde_json::Value;

use crate::gguf_tokenizer::GgufVocab;
use crate::{ChatTemplate, ModelError};

#[derive(Debug, Clone)]
pub struct ModelTokenizer {
    tokenizer: tokenizers::Tokenizer,
    /// The same tokenizer reading special-token text as plain text, made on first use.
    literal: OnceLock<tokenizers::Tokenizer>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    /// Whether the model expects BOS before a prompt (`add_bos_token` of tokenizer_config.json,
    /// `tokenizer.ggml.add_bos_token` of GGUF); [`ModelTokenizer::tokenize`] with `add_special`
    /// puts it there.
    pub add_bos_token: bool,
    pub chat_template: Option<ChatTemplate>,
    /// The folder, or the GGUF file, the tokenizer came from.
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
    /// The tokenizer of a resolved model reference: tokenizer.json when the folder has one, else
    /// the metadata of the GGUF file.
    pub fn load(model: &ResolvedModel) -> Result<Self, ModelError> {
        if model.dir.join("tokenizer.json").is_file() {
            return Self::from_dir(&model.dir);
        }
        match &model.file {
            Some(file) if file.extension().is_some_and(|e| e == "gguf") => Self::from_gguf(file),
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
            literal: OnceLock::new(),
            bos_token: token_field(&config, "bos_token"),
            eos_token: token_field(&config, "eos_token"),
            pad_token: token_field(&config, "pad_token"),
            add_bos_token: config.get("add_bos_token").and_then(Value::as_bool) == Some(true),
            chat_template: template.map(ChatTemplate::new),
            source: dir.to_path_buf(),
        })
    }

    /// The tokenizer in a GGUF file's metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`).
    pub fn from_gguf(path: &Path) -> Result<Self, ModelError> {
        Self::from_gguf_metadata(&crate::loader::read_gguf(path)?.metadata, path)
    }

    /// The tokenizer in the metadata of a GGUF file already read (`path` is for messages).
    pub fn from_gguf_metadata(
        metadata: &HashMap<String, gguf_file::Value>,
        path: &Path,
    ) -> Result<Self, ModelError> {
        Self::from_gguf_vocab(&GgufVocab::from_metadata(metadata, path)?)
    }

    /// The tokenizer of a vocab read from GGUF metadata (or made by hand, as tests do).
    pub fn from_gguf_vocab(vocab: &GgufVocab) -> Result<Self, ModelError> {
        let text = |id| vocab.token_text(id).map(str::to_string);
        Ok(Self {
            tokenizer: vocab.build()?,
            literal: OnceLock::new(),
            bos_token: text(vocab.bos_id),
            eos_token: text(vocab.eos_id),
            pad_token: text(vocab.pad_id),
            add_bos_token: vocab.add_bos,
            chat_template: vocab.chat_template.clone().map(ChatTemplate::new),
            source: vocab.source.clone(),
        })
    }

    /// Token ids of a text; special tokens in the text are read as such, none are added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ModelError> {
        self.tokenize(text, false, true)
    }

    /// Token ids as llama.cpp's `llama_tokenize(text, add_special, parse_special)` gives them:
    /// `add_special` adds BOS/EOS where the model asks for them; without `parse_special`, text
    /// such as `<|im_start|>` is read as plain characters (user-defined tokens still match).
    pub fn tokenize(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<u32>, ModelError> {
        let tokenizer = if parse_special {
            &self.tokenizer
        } else {
            self.literal.get_or_init(|| {
                let mut literal = self.tokenizer.clone();
                literal.set_encode_special_tokens(true);
                literal
            })
        };
        tokenizer
            .encode(text, add_special)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| ModelError::Tokenizer(e.to_string()))
    }

    /// The id of a token given by its text (`<|im_end|>`), if the vocab has it.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String, ModelError> {
        self.tokenizer
            .decode(ids, false)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))
    }

    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// The ids of the special tokens (`<|im_end|>`, `<s>`…), which stand for no text.
    pub fn special_token_ids(&self) -> std::collections::HashSet<u32> {
        self.tokenizer
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, token)| token.special)
            .map(|(id, _)| id)
            .collect()
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
