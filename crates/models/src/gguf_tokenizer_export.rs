//! A tokenizer written as GGUF metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`), the
//! reverse of [`crate::gguf_tokenizer`]: from an HF folder's tokenizer.json and
//! tokenizer_config.json, or copied through from a GGUF base.
//!
//! HF byte-level BPE tokenizers (GPT-2, SmolLM2, Qwen2, Llama 3) become a `gpt2` vocab with their
//! merges; `tokenizer.ggml.pre` names the pre-tokenizer, recognised from the tokenizer.json's
//! pre-tokenizer as llama.cpp's converter recognises it from the ids of a test text.
//! SentencePiece-style tokenizers (byte-fallback BPE, Gemma) are not converted yet.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use serde_json::Value as Json;

use crate::gguf_tokenizer::{
    TokenType, KEY_ADD_BOS, KEY_ADD_EOS, KEY_BOS_ID, KEY_CHAT_TEMPLATE, KEY_EOS_ID, KEY_MERGES,
    KEY_MODEL, KEY_PAD_ID, KEY_PRE, KEY_TOKENS, KEY_TOKEN_TYPE, KEY_UNK_ID,
};
use crate::{ModelError, ModelTokenizer};

/// llama.cpp's end-of-turn token id key.
const KEY_EOT_ID: &str = "tokenizer.ggml.eot_token_id";

/// The tokenizer keys of a GGUF file's metadata, to copy into an export of it.
pub fn copy_tokenizer_metadata(metadata: &HashMap<String, Value>) -> Vec<(String, Value)> {
    let mut keys: Vec<(String, Value)> = metadata
        .iter()
        .filter(|(k, _)| k.starts_with("tokenizer."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    keys.sort_by(|a, b| a.0.cmp(&b.0));
    keys
}

/// The GGUF tokenizer metadata of an HF model folder. `vocab_size` is the model's embedding rows:
/// llama.cpp pads the token list to it with `[PADn]` tokens. `stop_ids` are the model's stop
/// tokens; one that is not the EOS is written as the end-of-turn token, so that the GGUF model
/// stops where the HF one does.
pub fn hf_tokenizer_metadata(
    dir: &Path,
    vocab_size: usize,
    stop_ids: &[u32],
) -> Result<Vec<(String, Value)>, ModelError> {
    let path = dir.join("tokenizer.json");
    let file_error = |message: String| ModelError::File {
        path: path.clone(),
        message,
    };
    let json: Json = serde_json::from_str(&fs_err::read_to_string(&path)?)
        .map_err(|e| file_error(format!("invalid JSON: {e}")))?;
    let model = &json["model"];
    if model["type"].as_str() != Some("BPE") {
        return Err(file_error(format!(
            "a {} tokenizer cannot be written as GGUF: only byte-level BPE tokenizers can",
            model["type"].as_str().unwrap_or("model-less")
        )));
    }
    if !mentions_byte_level(&json["pre_tokenizer"]) {
        return Err(file_error(
            "a BPE tokenizer without a ByteLevel pre-tokenizer (SentencePiece style) cannot be \
             written as GGUF yet"
                .into(),
        ));
    }
    let pre = pre_tokenizer_name(&json["pre_tokenizer"]).map_err(file_error)?;
    let mut tokens: Vec<Option<String>> = vec![None; vocab_size];
    let mut types = vec![TokenType::Normal; vocab_size];
    let mut place = |id: u64, token: &str, kind: TokenType| -> Result<(), ModelError> {
        let slot = tokens.get_mut(id as usize).ok_or_else(|| {
            file_error(format!(
                "token `{token}` has id {id}, beyond the model's {vocab_size} embeddings"
            ))
        })?;
        *slot = Some(token.to_string());
        types[id as usize] = kind;
        Ok(())
    };
    for (token, id) in model["vocab"].as_object().into_iter().flatten() {
        let id = id
            .as_u64()
            .ok_or_else(|| file_error(format!("vocab: `{token}` has no integer id")))?;
        place(id, token, TokenType::Normal)?;
    }
    for added in json["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(content)) = (added["id"].as_u64(), added["content"].as_str()) else {
            continue;
        };
        let kind = if added["special"].as_bool() == Some(true) {
            TokenType::Control
        } else {
            TokenType::UserDefined
        };
        place(id, content, kind)?;
    }
    let tokens: Vec<String> = tokens
        .into_iter()
        .enumerate()
        .map(|(id, token)| {
            token.unwrap_or_else(|| {
                types[id] = TokenType::Unused;
                format!("[PAD{id}]")
            })
        })
        .collect();
    let merges: Vec<String> = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| match m {
            Json::String(s) => Some(s.clone()),
            Json::Array(pair) => match (pair.first()?.as_str(), pair.get(1)?.as_str()) {
                (Some(a), Some(b)) => Some(format!("{a} {b}")),
                _ => None,
            },
            _ => None,
        })
        .collect();
    let tokenizer = ModelTokenizer::from_dir(dir)?;
    let id_of = |token: &Option<String>| {
        token
            .as_deref()
            .and_then(|t| tokens.iter().position(|x| x == t))
            .map(|id| id as u32)
    };
    let strings = |list: Vec<String>| Value::Array(list.into_iter().map(Value::String).collect());
    let mut meta: Vec<(String, Value)> = vec![
        (KEY_MODEL.into(), Value::String("gpt2".into())),
        (KEY_PRE.into(), Value::String(pre.into())),
        (
            KEY_TOKEN_TYPE.into(),
            Value::Array(types.iter().map(|&t| Value::I32(t as i32)).collect()),
        ),
        (KEY_MERGES.into(), strings(merges)),
        (KEY_ADD_BOS.into(), Value::Bool(tokenizer.add_bos_token)),
        (KEY_ADD_EOS.into(), Value::Bool(add_eos(dir)?)),
    ];
    let unk = model["unk_token"].as_str().map(str::to_string);
    let eos = id_of(&tokenizer.eos_token);
    for (key, id) in [
        (KEY_BOS_ID, id_of(&tokenizer.bos_token)),
        (KEY_EOS_ID, eos),
        (KEY_PAD_ID, id_of(&tokenizer.pad_token)),
        (KEY_UNK_ID, id_of(&unk)),
        (
            KEY_EOT_ID,
            stop_ids.iter().copied().find(|&s| Some(s) != eos),
        ),
    ] {
        if let Some(id) = id {
            meta.push((key.into(), Value::U32(id)));
        }
    }
    if let Some(template) = &tokenizer.chat_template {
        meta.push((
            KEY_CHAT_TEMPLATE.into(),
            Value::String(template.source().to_string()),
        ));
    }
    meta.push((KEY_TOKENS.into(), strings(tokens)));
    Ok(meta)
}

/// `add_eos_token` of tokenizer_config.json.
fn add_eos(dir: &Path) -> Result<bool, ModelError> {
    let path = dir.join("tokenizer_config.json");
    if !path.is_file() {
        return Ok(false);
    }
    let config: Json =
        serde_json::from_str(&fs_err::read_to_string(&path)?).map_err(|e| ModelError::File {
            path: path.clone(),
            message: format!("invalid JSON: {e}"),
        })?;
    Ok(config["add_eos_token"].as_bool() == Some(true))
}

fn mentions_byte_level(pre: &Json) -> bool {
    match pre {
        Json::Object(map) => {
            map.get("type").and_then(Json::as_str) == Some("ByteLevel")
                || map.values().any(mentions_byte_level)
        }
        Json::Array(list) => list.iter().any(mentions_byte_level),
        _ => false,
    }
}

/// The `tokenizer.ggml.pre` of a byte-level pre-tokenizer: the regexes of its `Split` steps
/// (or ByteLevel's own GPT-2 regex) matched against those llama.cpp knows.
fn pre_tokenizer_name(pre: &Json) -> Result<&'static str, String> {
    let steps: Vec<&Json> = match pre["type"].as_str() {
        Some("Sequence") => pre["pretokenizers"]
            .as_array()
            .map(|l| l.iter().collect())
            .unwrap_or_default(),
        _ => vec![pre],
    };
    let regexes: Vec<&str> = steps
        .iter()
        .filter(|s| s["type"].as_str() == Some("Split"))
        .filter_map(|s| s["pattern"]["Regex"].as_str())
        .collect();
    let digits = steps.iter().any(|s| {
        s["type"].as_str() == Some("Digits") && s["individual_digits"].as_bool() == Some(true)
    });
    let byte_level_regex = steps.iter().any(|s| {
        s["type"].as_str() == Some("ByteLevel") && s["use_regex"].as_bool() != Some(false)
    });
    let known = |name: &str| crate::gguf_tokenizer::pre_tokenizer_spec(Some(name)).regexes;
    let same = |name: &str| known(name) == regexes.as_slice();
    Ok(match () {
        _ if regexes.is_empty() && digits && byte_level_regex => "smollm",
        // llama.cpp names GPT-2's pre-tokenizer `gpt-2`; a file saying `gpt2` does not load
        // there ("unknown pre-tokenizer type").
        _ if regexes.is_empty() && byte_level_regex => "gpt-2",
        _ if same("llama-bpe") => "llama-bpe",
        _ if same("qwen2") => "qwen2",
        _ if same("smollm") => "smollm",
        _ if same("gpt2") => "gpt-2",
        _ if same("default") => "default",
        _ => {
            return Err(format!(
                "the pre-tokenizer (split regexes {regexes:?}) is none that llama.cpp knows"
            ))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `tokenizer.ggml.pre` names llama.cpp's vocabulary loader (`llama-vocab.cpp`,
    /// llama-cpp-python 0.3.36) accepts, of those this module can write.
    const LLAMA_CPP_PRE_NAMES: [&str; 5] = ["default", "llama-bpe", "qwen2", "smollm", "gpt-2"];

    #[test]
    fn pre_tokenizer_names_are_llama_cpps_own_gpt2_included() {
        let byte_level = serde_json::json!({"type": "ByteLevel", "use_regex": true});
        assert_eq!(pre_tokenizer_name(&byte_level), Ok("gpt-2"));
        let smollm = serde_json::json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            {"type": "ByteLevel", "use_regex": true},
        ]});
        assert_eq!(pre_tokenizer_name(&smollm), Ok("smollm"));
        for name in ["llama-bpe", "qwen2", "smollm", "gpt2", "default"] {
            let split: Vec<Json> = crate::gguf_tokenizer::pre_tokenizer_spec(Some(name))
                .regexes
                .iter()
                .map(|r| serde_json::json!({"type": "Split", "pattern": {"Regex": r}}))
                .collect();
            let mut steps = split;
            steps.push(serde_json::json!({"type": "ByteLevel", "use_regex": false}));
            let pre = serde_json::json!({"type": "Sequence", "pretokenizers": steps});
            let written = pre_tokenizer_name(&pre).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(LLAMA_CPP_PRE_NAMES.contains(&written), "{name} → {written}");
            // Our own reader takes the name back to the same regexes.
            assert_eq!(
                crate::gguf_tokenizer::pre_tokenizer_spec(Some(written)).regexes,
                crate::gguf_tokenizer::pre_tokenizer_spec(Some(name)).regexes,
                "{name} → {written}"
            );
        }
    }
}
