//! A GGUF file's tokenizer written out as the files of an HF model folder (tokenizer.json and
//! tokenizer_config.json), so that a model loaded from GGUF can be saved as an HF checkpoint
//! (e.g. a merged fine-tune) whose tokenizer gives the same ids as the GGUF one.
//!
//! tokenizer.json is the serialization of the very tokenizer [`GgufVocab::build`] makes, so the
//! HF `tokenizers` library (Rust or Python) rebuilds it piece for piece:
//! - `gpt2` vocabs: BPE with vocab and merges, the `Split` regexes llama.cpp picks from
//!   `tokenizer.ggml.pre`, then ByteLevel; ByteLevel decoder.
//! - `llama` (SentencePiece) vocabs such as Gemma 3's: BPE with `byte_fallback`, merges ranked
//!   by score, `Prepend("▁")` (when `add_space_prefix`) and `Replace(" ", "▁")` normalizers, and
//!   the `Replace` / `ByteFallback` / `Fuse` / `Strip` decoders: the layout HF uses for Llama
//!   and Gemma tokenizers.
//!
//! Control tokens are special added tokens, user-defined tokens plain added tokens; BOS / EOS
//! are added by a `TemplateProcessing` post-processor where the GGUF asks for them.
//!
//! tokenizer_config.json names the class `PreTrainedTokenizerFast` (transformers then uses
//! tokenizer.json as it is, without a model-specific class rebuilding its normalizers), the
//! bos/eos/pad/unk tokens, `add_bos_token` / `add_eos_token`, the chat template when the GGUF
//! has one, and `model_max_length` from `<arch>.context_length`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use serde_json::{json, Map, Value as Json};

use crate::gguf_tokenizer::GgufVocab;
use crate::ModelError;

/// Write `tokenizer.json` and `tokenizer_config.json` into `dir` (made if missing) for the
/// tokenizer in a GGUF file's metadata (`gguf_path` is for error messages), replacing files of
/// those names. The chat template is the GGUF's `tokenizer.chat_template`, `model_max_length`
/// its `<general.architecture>.context_length`.
///
/// A merge command that loaded a model from GGUF calls it with
/// `loader::read_gguf(path)?.metadata`. A `chat_template.jinja` already in `dir` is left alone
/// (readers prefer it to the `chat_template` field): write into a fresh folder.
pub fn write_hf_tokenizer(
    metadata: &HashMap<String, Value>,
    gguf_path: &Path,
    dir: &Path,
) -> Result<(), ModelError> {
    let vocab = GgufVocab::from_metadata(metadata, gguf_path)?;
    let tokenizer = vocab.build()?;
    let tokenizer_json = tokenizer.to_string(false).map_err(|e| ModelError::File {
        path: gguf_path.to_path_buf(),
        message: format!("tokenizer from GGUF metadata: cannot serialize it: {e}"),
    })?;
    let config = tokenizer_config(&vocab, context_length(metadata));
    let config_json = serde_json::to_string_pretty(&config).map_err(|e| ModelError::File {
        path: dir.join("tokenizer_config.json"),
        message: format!("cannot serialize: {e}"),
    })?;
    fs_err::create_dir_all(dir)?;
    fs_err::write(dir.join("tokenizer.json"), tokenizer_json)?;
    fs_err::write(dir.join("tokenizer_config.json"), config_json + "\n")?;
    Ok(())
}

/// `<general.architecture>.context_length`, when the metadata has it as an integer.
fn context_length(metadata: &HashMap<String, Value>) -> Option<u64> {
    let Some(Value::String(arch)) = metadata.get("general.architecture") else {
        return None;
    };
    metadata
        .get(&format!("{arch}.context_length"))
        .and_then(|v| match v {
            Value::Bool(_) => None,
            v => v.to_u64().ok(),
        })
}

/// The fields of tokenizer_config.json that transformers and [`crate::ModelTokenizer`] read.
fn tokenizer_config(vocab: &GgufVocab, model_max_length: Option<u64>) -> Json {
    let mut config = Map::new();
    config.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
    for (key, id) in [
        ("bos_token", vocab.bos_id),
        ("eos_token", vocab.eos_id),
        ("pad_token", vocab.pad_id),
        ("unk_token", vocab.unk_id),
    ] {
        if let Some(text) = vocab.token_text(id) {
            config.insert(key.into(), json!(text));
        }
    }
    config.insert("add_bos_token".into(), json!(vocab.add_bos));
    config.insert("add_eos_token".into(), json!(vocab.add_eos));
    // Decoding must give back the text as tokenized, not "cleaned" of spaces before punctuation.
    config.insert("clean_up_tokenization_spaces".into(), json!(false));
    if let Some(length) = model_max_length {
        config.insert("model_max_length".into(), json!(length));
    }
    if let Some(template) = &vocab.chat_template {
        config.insert("chat_template".into(), json!(template));
    }
    Json::Object(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf_tokenizer::TokenType;
    use crate::ModelTokenizer;

    fn strings(items: &[String]) -> Value {
        Value::Array(items.iter().cloned().map(Value::String).collect())
    }

    fn base(tokens: &[String], types: &[TokenType]) -> HashMap<String, Value> {
        HashMap::from([
            (
                "general.architecture".to_string(),
                Value::String("llama".into()),
            ),
            ("llama.context_length".into(), Value::U32(2048)),
            ("tokenizer.ggml.tokens".into(), strings(tokens)),
            (
                "tokenizer.ggml.token_type".into(),
                Value::Array(types.iter().map(|&t| Value::I32(t as i32)).collect()),
            ),
        ])
    }

    /// A byte-level BPE vocab: every GPT-2 byte character, a few merges, ChatML markers.
    fn gpt2_metadata() -> HashMap<String, Value> {
        let mut tokens = vec!["<|im_start|>".to_string(), "<|im_end|>".to_string()];
        let mut types = vec![TokenType::Control; 2];
        // The GPT-2 byte alphabet.
        let mut alphabet: Vec<char> = (b'!'..=b'~')
            .chain(0xA1..=0xAC)
            .chain(0xAE..=0xFF)
            .map(char::from)
            .collect();
        let mut next = 256u32;
        for b in 0..=255u32 {
            if !alphabet.contains(&char::from_u32(b).unwrap()) {
                alphabet.push(char::from_u32(next).unwrap());
                next += 1;
            }
        }
        for c in alphabet {
            tokens.push(c.to_string());
            types.push(TokenType::Normal);
        }
        let merges = [
            "h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld",
        ];
        for merge in merges {
            tokens.push(merge.replace(' ', ""));
            types.push(TokenType::Normal);
        }
        let mut md = base(&tokens, &types);
        md.insert("tokenizer.ggml.model".into(), Value::String("gpt2".into()));
        md.insert("tokenizer.ggml.pre".into(), Value::String("smollm".into()));
        let merges: Vec<String> = merges.iter().map(|m| m.to_string()).collect();
        md.insert("tokenizer.ggml.merges".into(), strings(&merges));
        md.insert("tokenizer.ggml.bos_token_id".into(), Value::U32(0));
        md.insert("tokenizer.ggml.eos_token_id".into(), Value::U32(1));
        md.insert("tokenizer.ggml.padding_token_id".into(), Value::U32(1));
        md.insert(
            "tokenizer.chat_template".into(),
            Value::String(
                "{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}".into(),
            ),
        );
        md
    }

    /// A SentencePiece vocab with byte tokens, a user-defined newline and a space prefix.
    fn llama_metadata() -> HashMap<String, Value> {
        let mut tokens: Vec<String> = ["<unk>", "<s>", "</s>", "<start_of_turn>", "\n"]
            .map(String::from)
            .to_vec();
        let mut types = vec![TokenType::Unknown, TokenType::Control, TokenType::Control];
        types.extend([TokenType::Control, TokenType::UserDefined]);
        let mut scores = vec![0.0f32; 5];
        for byte in 0..=255u8 {
            tokens.push(format!("<0x{byte:02X}>"));
            types.push(TokenType::Byte);
            scores.push(0.0);
        }
        for (piece, score) in [("▁", -20.0), ("h", -10.0), ("e", -10.0), ("l", -10.0)]
            .into_iter()
            .chain([("o", -10.0), ("ll", -1.0), ("he", -2.0), ("hell", -3.0)])
            .chain([("hello", -4.0), ("▁hello", -5.0)])
        {
            tokens.push(piece.to_string());
            types.push(TokenType::Normal);
            scores.push(score);
        }
        let mut md = base(&tokens, &types);
        md.insert("tokenizer.ggml.model".into(), Value::String("llama".into()));
        md.insert(
            "tokenizer.ggml.scores".into(),
            Value::Array(scores.into_iter().map(Value::F32).collect()),
        );
        md.insert("tokenizer.ggml.add_bos_token".into(), Value::Bool(true));
        md
    }

    fn check_round_trip(md: &HashMap<String, Value>, texts: &[&str]) -> Json {
        let dir = tempfile::tempdir().unwrap();
        let path = Path::new("hand-made.gguf");
        write_hf_tokenizer(md, path, dir.path()).unwrap();
        let gguf = ModelTokenizer::from_gguf_metadata(md, path).unwrap();
        let hf = ModelTokenizer::from_dir(dir.path()).unwrap();
        for text in texts {
            for (add_special, parse_special) in [(false, false), (false, true), (true, true)] {
                let expected = gguf.tokenize(text, add_special, parse_special).unwrap();
                let ids = hf.tokenize(text, add_special, parse_special).unwrap();
                assert_eq!(ids, expected, "{text:?} {add_special} {parse_special}");
                assert_eq!(hf.decode(&ids).unwrap(), gguf.decode(&ids).unwrap());
            }
        }
        assert_eq!(hf.bos_token, gguf.bos_token);
        assert_eq!(hf.eos_token, gguf.eos_token);
        assert_eq!(hf.pad_token, gguf.pad_token);
        assert_eq!(hf.add_bos_token, gguf.add_bos_token);
        assert_eq!(
            hf.chat_template.as_ref().map(|t| t.source().to_string()),
            gguf.chat_template.as_ref().map(|t| t.source().to_string())
        );
        let text = std::fs::read_to_string(dir.path().join("tokenizer_config.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    #[test]
    fn gpt2_vocab_is_written_as_a_byte_level_bpe_tokenizer_json() {
        let texts = [
            "<|im_start|>hello world<|im_end|>",
            "héllo  wörld 123\n\n",
            "",
        ];
        let config = check_round_trip(&gpt2_metadata(), &texts);
        assert_eq!(config["bos_token"], "<|im_start|>");
        assert_eq!(config["eos_token"], "<|im_end|>");
        assert_eq!(config["pad_token"], "<|im_end|>");
        assert_eq!(config["add_bos_token"], false);
        assert_eq!(config["model_max_length"], 2048);
        assert!(config["chat_template"]
            .as_str()
            .unwrap()
            .contains("<|im_start|>"));
        assert_eq!(config["tokenizer_class"], "PreTrainedTokenizerFast");
    }

    #[test]
    fn sentencepiece_vocab_is_written_with_byte_fallback_and_space_prefix() {
        let texts = [
            "hello",
            "hello hé",
            "<start_of_turn>hello\nhello",
            "  é\n",
            "",
        ];
        let config = check_round_trip(&llama_metadata(), &texts);
        assert_eq!(config["bos_token"], "<s>");
        assert_eq!(config["eos_token"], "</s>");
        assert_eq!(config["unk_token"], "<unk>");
        assert_eq!(config["add_bos_token"], true);
        assert!(config.get("chat_template").is_none());
        assert!(config.get("pad_token").is_none());
    }

    #[test]
    fn a_broken_vocab_is_an_error_naming_the_gguf_file() {
        let mut md = llama_metadata();
        md.remove("tokenizer.ggml.tokens");
        let dir = tempfile::tempdir().unwrap();
        let err = write_hf_tokenizer(&md, Path::new("/models/x.gguf"), dir.path())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/models/x.gguf") && err.contains("tokenizer.ggml.tokens"),
            "{err}"
        );
        assert!(!dir.path().join("tokenizer.json").exists());
    }
}
