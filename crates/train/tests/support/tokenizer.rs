//! A tiny Hugging Face tokenizer folder written into a temp dir, nothing downloaded: a
//! word-level `tokenizer.json` whose vocabulary is every piece of the texts a test will
//! encode, with `[UNK]` for anything else, and the ChatML special tokens.
//!
//! The pre-tokenizer (and decoder) is byte-level, as in SmolLM2 and Qwen2, rather than plain
//! whitespace: a whitespace pre-tokenizer throws the spaces away, so `decode` could not give
//! back "E11.9, I10" and tests could not compare decoded prompts and completions with the
//! exact text they expect.
//!
//! Also used by the CLI's tests (`#[path]`), hence no dependency on the crates under test.
#![allow(dead_code)] // each test binary uses a subset

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::{json, Value};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};

pub const IM_START: &str = "<|im_start|>";
pub const IM_END: &str = "<|im_end|>";
pub const UNK: &str = "[UNK]";

/// The chat template of SmolLM2-Instruct, without its default system message.
pub const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Special tokens, ids 0.. in this order; `[UNK]` is one so that a decoded unknown piece
/// encodes back to one id.
const SPECIAL: [&str; 3] = [UNK, IM_START, IM_END];

fn byte_level() -> ByteLevel {
    ByteLevel::new(false, true, true)
}

/// The pieces the byte-level pre-tokenizer cuts `text` into, special tokens taken out first
/// (as the tokenizer's added vocabulary does).
fn pieces(text: &str) -> Vec<String> {
    let mut segments = vec![text.to_string()];
    for special in SPECIAL {
        segments = segments
            .iter()
            .flat_map(|s| s.split(special).map(str::to_string).collect::<Vec<_>>())
            .collect();
    }
    let pre_tokenizer = byte_level();
    segments
        .iter()
        .filter(|s| !s.is_empty())
        .flat_map(|segment| {
            let mut pretokenized = PreTokenizedString::from(segment.as_str());
            pre_tokenizer
                .pre_tokenize(&mut pretokenized)
                .expect("byte-level pre-tokenization");
            pretokenized
                .get_splits(OffsetReferential::Original, OffsetType::Byte)
                .into_iter()
                .map(|(piece, _, _)| piece.to_string())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Every piece of `texts`, each also with a leading space ("Ġ"): a note cut into chunks is
/// tokenized again after the prompt's "text: ", where its first piece gets that space.
pub fn vocabulary<S: AsRef<str>>(texts: &[S]) -> BTreeSet<String> {
    let mut vocab: BTreeSet<String> = ["Ġ", "Ċ", "ĊĊ"].map(str::to_string).into();
    for text in texts {
        for piece in pieces(text.as_ref()) {
            if !piece.starts_with('Ġ') {
                vocab.insert(format!("Ġ{piece}"));
            }
            vocab.insert(piece);
        }
    }
    vocab
}

/// tokenizer.json of a word-level model over `vocab`.
fn tokenizer_json(vocab: &BTreeSet<String>) -> Value {
    let mut ids = serde_json::Map::new();
    for (id, token) in SPECIAL
        .iter()
        .map(|s| s.to_string())
        .chain(vocab.iter().cloned())
        .enumerate()
    {
        ids.entry(token).or_insert(json!(id));
    }
    let added: Vec<Value> = SPECIAL
        .iter()
        .enumerate()
        .map(|(id, content)| {
            json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false,
                            "trim_offsets": true, "use_regex": true});
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": null,
        "decoder": byte_level,
        "model": {"type": "WordLevel", "vocab": ids, "unk_token": UNK},
    })
}

fn write_json(path: &Path, value: &Value) {
    let text = serde_json::to_string_pretty(value).expect("JSON");
    std::fs::write(path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// `dir/tokenizer.json` (created with its folder) covering every piece of `texts`.
pub fn write_bare_tokenizer<S: AsRef<str>>(dir: &Path, texts: &[S]) {
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    write_json(
        &dir.join("tokenizer.json"),
        &tokenizer_json(&vocabulary(texts)),
    );
}

/// A ChatML model's tokenizer folder: tokenizer.json, and tokenizer_config.json with
/// `eos_token` `<|im_end|>` and the SmolLM2 chat template.
pub fn write_chatml_tokenizer<S: AsRef<str>>(dir: &Path, texts: &[S]) {
    write_bare_tokenizer(dir, texts);
    let config = json!({
        "added_tokens_decoder": {},
        "bos_token": IM_START,
        "eos_token": IM_END,
        "pad_token": IM_END,
        "unk_token": UNK,
        "model_max_length": 8192,
        "tokenizer_class": "GPT2Tokenizer",
        "chat_template": CHATML,
    });
    write_json(&dir.join("tokenizer_config.json"), &config);
}

/// What the ChatML template renders for one user turn, ready for the answer.
pub fn chatml_prompt(user: &str) -> String {
    format!("{IM_START}user\n{user}{IM_END}\n{IM_START}assistant\n")
}
