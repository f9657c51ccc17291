//! A byte-level BPE tokenizer folder (as SmolLM2's and GPT-2's), trained on a test's texts, with
//! ChatML's special tokens and template: the kind of HF tokenizer a GGUF export can carry.
//! Also used by the CLI's tests (`#[path]`), hence no dependency on the crates under test.
#![allow(dead_code)] // each test binary uses a subset

use std::path::Path;

use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

pub const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// tokenizer.json (BPE of at most 400 tokens trained on `texts`, byte-level pre-tokenizer and
/// decoder, `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` as ids 0..3) and tokenizer_config.json
/// (eos `<|im_end|>`, the ChatML template) in `dir`; returns the vocabulary size.
pub fn write_chatml_bpe_tokenizer<S: AsRef<str>>(dir: &Path, texts: &[S]) -> usize {
    std::fs::create_dir_all(dir).expect("the tokenizer folder");
    let specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
    let mut trainer: tokenizers::models::TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(400)
        .min_frequency(1)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .special_tokens(
            specials
                .iter()
                .map(|s| AddedToken::from(*s, true))
                .collect(),
        )
        .build()
        .into();
    let mut tokenizer = Tokenizer::new(BPE::default());
    tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    let corpus: Vec<String> = texts.iter().map(|t| t.as_ref().to_string()).collect();
    tokenizer
        .train(&mut trainer, corpus.into_iter())
        .expect("BPE training");
    tokenizer
        .save(dir.join("tokenizer.json"), true)
        .expect("tokenizer.json");
    let config = serde_json::json!({
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "tokenizer_class": "GPT2Tokenizer",
        "chat_template": CHATML,
    });
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&config).expect("JSON"),
    )
    .expect("tokenizer_config.json");
    tokenizer.get_vocab_size(true)
}
