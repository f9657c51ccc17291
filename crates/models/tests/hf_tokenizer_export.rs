//! The tokenizer of a real GGUF asset written as tokenizer.json + tokenizer_config.json, read
//! back as an HF folder, must give the GGUF tokenizer's ids (which match llama.cpp's) and decode
//! back to the text. Each test prints why it skips when its asset is not installed.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use medcoder_assets::{MedcoderHome, ModelRef};
use medcoder_models::hf_tokenizer_export::write_hf_tokenizer;
use medcoder_models::loader::read_gguf;
use medcoder_models::{ChatMessage, ModelTokenizer};
use serde_json::Value;

/// The GGUF file of an installed asset model, or `None` after saying why the test skips.
fn installed_gguf(alias: &str) -> Option<PathBuf> {
    let resolved = MedcoderHome::from_env()
        .map_err(|e| e.to_string())
        .and_then(|home| {
            let reference: ModelRef = alias.parse().map_err(|e| format!("{e}"))?;
            reference.resolve(&home).map_err(|e| e.to_string())
        });
    match resolved {
        Ok(model) => match model.file {
            Some(file) if file.is_file() => Some(file),
            _ => {
                eprintln!(
                    "skipping: {alias} has no GGUF file in {}",
                    model.dir.display()
                );
                None
            }
        },
        Err(e) => {
            eprintln!(
                "skipping: {alias} is not installed ({e}); run `medcoder assets fetch {alias}`"
            );
            None
        }
    }
}

/// Clinical text in two languages, codes, digits, whitespace runs, emoji and both families'
/// turn markers.
const TEXTS: &[&str] = &[
    "Patient is a 67-year-old male with type 2 diabetes mellitus without complications (E11.9) \
     and essential hypertension (I10). Plan: metformin 500 mg PO BID.",
    "Paciente de 54 años con neumonía adquirida en la comunidad; refiere disnea, fiebre de \
     38,5 °C y dolor torácico. Diagnóstico: J18.9. Alérgico a la penicilina.",
    "Codes: E11.9, I10, 0DTJ4ZZ, Z79.4, S72.001A, 02HV33Z",
    "1234567890 3.14159 2024-03-15 10:45 BP 140/90 mmHg, HR 88 bpm, SpO2 97%",
    "  leading spaces,   runs   of spaces,\ttabs\t\tand trailing spaces   ",
    "line one\nline two\n\n\nafter blank lines\r\nwindows line\n",
    "Emoji: 🩺💊🏥 😀👍🏽 ❤️ — “quotes” ½ dose, café-au-lait, naïve, Ñandú, 漢字, Привет",
    "<|im_start|>system\nYou are a medical coder.<|im_end|>\n<|im_start|>user\nChest pain, \
     rule out MI.<|im_end|>\n<|im_start|>assistant\nR07.9<|im_end|>\n",
    "<start_of_turn>user\nCode: acute appendicitis<end_of_turn>\n<start_of_turn>model\nK35.80\
     <end_of_turn>\n",
    "<bos><eos><pad><unk><|endoftext|> don't I'M we'll",
    "",
    " ",
    "\n",
];

/// Writes the GGUF's tokenizer as an HF folder, checks the ids and decoding of every text and
/// returns both tokenizers with the written tokenizer_config.json.
fn export_and_compare(alias: &str) -> Option<(ModelTokenizer, ModelTokenizer, Value)> {
    let gguf = installed_gguf(alias)?;
    let metadata = read_gguf(&gguf).unwrap().metadata;
    // MEDCODER_TOKENIZER_EXPORT_DIR keeps the folder (with the GGUF ids of every case in
    // cases.json) for a check with Python's tokenizers / transformers.
    let temp = tempfile::tempdir().unwrap();
    let dir = match std::env::var_os("MEDCODER_TOKENIZER_EXPORT_DIR") {
        Some(root) => PathBuf::from(root).join(alias),
        None => temp.path().to_path_buf(),
    };
    write_hf_tokenizer(&metadata, &gguf, &dir).unwrap();
    let theirs = ModelTokenizer::from_gguf_metadata(&metadata, &gguf).unwrap();
    let ours = ModelTokenizer::from_dir(&dir).unwrap();
    assert_eq!(ours.vocab_size(), theirs.vocab_size());

    let mut mismatches = Vec::new();
    let mut cases = 0;
    let mut recorded = Vec::new();
    for text in TEXTS {
        for (add_special, parse_special) in [(false, false), (false, true), (true, true)] {
            cases += 1;
            let expected = theirs.tokenize(text, add_special, parse_special).unwrap();
            recorded.push(serde_json::json!({"text": text, "add_special": add_special,
                "parse_special": parse_special, "ids": expected}));
            let ids = ours.tokenize(text, add_special, parse_special).unwrap();
            if ids != expected {
                mismatches.push(format!(
                    "{text:?} (add_special {add_special}, parse_special {parse_special}):\n  \
                     GGUF {expected:?}\n  HF   {ids:?}"
                ));
            }
            if !add_special {
                let decoded = ours.decode(&ids).unwrap();
                if decoded != *text {
                    mismatches.push(format!(
                        "decode of {text:?} (parse_special {parse_special}) gives {decoded:?}"
                    ));
                }
            }
        }
    }
    cases += compare_with_llama_cpp(alias, &ours, &mut mismatches);
    assert!(
        mismatches.is_empty(),
        "{alias}: {} of {cases} cases differ:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
    eprintln!("{alias}: the exported tokenizer agrees on all {cases} cases");
    if std::env::var_os("MEDCODER_TOKENIZER_EXPORT_DIR").is_some() {
        let json = serde_json::to_string_pretty(&recorded).unwrap();
        std::fs::write(dir.join("cases.json"), json).unwrap();
    }
    let config = std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap();
    Some((ours, theirs, serde_json::from_str(&config).unwrap()))
}

/// The exported tokenizer against llama.cpp's own ids (tests/fixtures/llamacpp/<alias>.json,
/// recorded by scripts/reference/llamacpp_reference.py): every text with special tokens parsed
/// and not, with BOS, and the generation prompts. Returns the number of cases.
fn compare_with_llama_cpp(
    alias: &str,
    ours: &ModelTokenizer,
    mismatches: &mut Vec<String>,
) -> usize {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/llamacpp")
        .join(format!("{alias}.json"));
    let Ok(text) = std::fs::read_to_string(&path) else {
        eprintln!("no llama.cpp comparison: {} does not exist", path.display());
        return 0;
    };
    let fixture: Value = serde_json::from_str(&text).unwrap();
    let ids = |v: &Value| -> Vec<u32> { serde_json::from_value(v.clone()).unwrap() };
    let add_bos = fixture["tokenizer"]["add_bos"].as_bool().unwrap();
    let mut cases = Vec::new();
    for case in fixture["tokenization"].as_array().unwrap() {
        let input = case["input"].as_str().unwrap();
        cases.push((input, false, false, ids(&case["plain"]["ids"])));
        cases.push((input, false, true, ids(&case["special"]["ids"])));
    }
    let with_bos = &fixture["tokenization_with_bos"];
    cases.push((
        with_bos["input"].as_str().unwrap(),
        true,
        true,
        ids(&with_bos["ids"]),
    ));
    for prompt in fixture["generation"].as_array().unwrap() {
        let text = prompt["prompt"].as_str().unwrap();
        cases.push((text, add_bos, true, ids(&prompt["prompt_ids"])));
    }
    for (text, add_special, parse_special, expected) in &cases {
        let got = ours.tokenize(text, *add_special, *parse_special).unwrap();
        if &got != expected {
            mismatches.push(format!(
                "{text:?} (add_special {add_special}, parse_special {parse_special}):\n  \
                 llama.cpp {expected:?}\n  HF        {got:?}"
            ));
        }
    }
    cases.len()
}

#[test]
fn smollm2_gguf_tokenizer_exports_as_an_equivalent_hf_tokenizer() {
    let Some((ours, theirs, config)) = export_and_compare("smollm2-135m-instruct") else {
        return;
    };
    assert_eq!(config["bos_token"], "<|im_start|>");
    assert_eq!(config["eos_token"], "<|im_end|>");
    assert_eq!(config["add_bos_token"], false);
    assert!(config["model_max_length"].as_u64().unwrap() >= 2048);
    let template = theirs.chat_template.as_ref().unwrap().source().to_string();
    assert_eq!(config["chat_template"].as_str(), Some(template.as_str()));
    assert_eq!(ours.bos_token.as_deref(), Some("<|im_start|>"));
    assert_eq!(ours.eos_token.as_deref(), Some("<|im_end|>"));
    assert!(!ours.add_bos_token);

    // A prompt rendered by the exported template tokenizes as with the GGUF's.
    let messages = [
        ChatMessage::new("system", "You are a medical coder."),
        ChatMessage::new(
            "user",
            "Diabetes tipo 2 sin complicaciones, HTA: E11.9, I10",
        ),
    ];
    let render = |tok: &ModelTokenizer| {
        let template = tok.chat_template.as_ref().unwrap();
        template
            .render(&messages, true, tok.bos_token.as_deref(), None)
            .unwrap()
    };
    let prompt = render(&ours);
    assert_eq!(prompt, render(&theirs));
    let ids = ours.encode(&prompt).unwrap();
    assert_eq!(ids, theirs.encode(&prompt).unwrap());
    assert_eq!(ids[0], ours.token_to_id("<|im_start|>").unwrap());
    assert_eq!(ours.decode(&ids).unwrap(), prompt);
}

#[test]
fn gemma3_gguf_tokenizer_exports_as_an_equivalent_hf_tokenizer() {
    let Some((ours, theirs, config)) = export_and_compare("gemma3-270m") else {
        return;
    };
    assert_eq!(config["bos_token"], "<bos>");
    assert_eq!(config["eos_token"], "<eos>");
    assert_eq!(config["add_bos_token"], true);
    assert!(config["model_max_length"].as_u64().unwrap() >= 2048);
    // The base model's GGUF has no chat template, so neither has the export.
    assert!(theirs.chat_template.is_none());
    assert!(config.get("chat_template").is_none());
    assert!(ours.chat_template.is_none());
    assert_eq!(ours.bos_token.as_deref(), Some("<bos>"));
    assert!(ours.add_bos_token);
    let ids = ours.tokenize("Fractura de cadera", true, true).unwrap();
    assert_eq!(ids[0], 2, "BOS first");
    assert_eq!(
        ids,
        theirs.tokenize("Fractura de cadera", true, true).unwrap()
    );
}
