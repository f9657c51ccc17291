//! Tokenizers built from GGUF metadata: small hand-made vocabs, a GGUF file written here, and the
//! real SmolLM2 and Gemma 3 files under $MEDCODER_HOME compared with llama.cpp's ids
//! (tests/fixtures/llamacpp/*.json). Tests that need a real file print why they skip.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use medcoder_assets::ResolvedModel;
use medcoder_models::{ChatMessage, GgufVocab, GgufVocabModel, ModelTokenizer, TokenType};
use serde::Deserialize;

/// Where `medcoder assets` puts files: $MEDCODER_HOME, else ~/.cache/medcoder.
fn medcoder_home() -> Option<PathBuf> {
    if let Some(home) = std::env::var_os("MEDCODER_HOME").filter(|h| !h.is_empty()) {
        return Some(PathBuf::from(home));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("medcoder"))
}

/// The first .gguf file of an asset, or `None` after printing why the test skips.
fn gguf_asset(asset: &str, test: &str) -> Option<PathBuf> {
    let dir = medcoder_home()?.join("assets").join(asset);
    let file = std::fs::read_dir(&dir).ok().and_then(|entries| {
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
            .collect();
        files.sort();
        files.into_iter().next()
    });
    if file.is_none() {
        println!(
            "skipping {test}: no .gguf in {} (run `medcoder assets fetch {asset}`)",
            dir.display()
        );
    }
    file
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// A byte-level BPE vocab spelling "hello world" with two ChatML control tokens.
fn gpt2_vocab() -> GgufVocab {
    let tokens = strings(&[
        "<|im_start|>",
        "<|im_end|>",
        "h",
        "e",
        "l",
        "o",
        "Ġ",
        "w",
        "r",
        "d",
        "he",
        "ll",
        "hell",
        "hello",
        "Ġw",
        "or",
        "Ġwor",
        "ld",
        "Ġworld",
        "<",
        "|",
        "i",
        "m",
        "_",
        "s",
        "t",
        "a",
        ">",
    ]);
    let merges = [
        "h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld",
    ];
    let merges = merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .expect("a merge is two tokens")
        })
        .collect();
    let mut token_types = vec![TokenType::Normal; tokens.len()];
    token_types[..2].fill(TokenType::Control);
    GgufVocab {
        source: PathBuf::from("hand-made.gguf"),
        model: GgufVocabModel::Gpt2 {
            merges,
            pre: Some("smollm".into()),
        },
        tokens,
        token_types,
        bos_id: Some(0),
        eos_id: Some(1),
        unk_id: None,
        pad_id: None,
        add_bos: false,
        add_eos: false,
        chat_template: None,
    }
}

/// A SentencePiece vocab: control tokens, the 256 byte tokens, a few pieces of "hello", and a
/// user-defined newline.
fn llama_vocab(add_space_prefix: bool) -> GgufVocab {
    let mut tokens = strings(&["<unk>", "<s>", "</s>", "<start_of_turn>", "\n"]);
    let mut token_types = vec![TokenType::Control; 4];
    token_types.push(TokenType::UserDefined);
    let mut scores = vec![-1000.0; 5];
    for byte in 0..=255u8 {
        tokens.push(format!("<0x{byte:02X}>"));
        token_types.push(TokenType::Byte);
        scores.push(0.0);
    }
    let pieces = [
        ("▁", -20.0),
        ("h", -10.0),
        ("e", -10.0),
        ("l", -10.0),
        ("o", -10.0),
        ("ll", -1.0),
        ("he", -2.0),
        ("hell", -3.0),
        ("hello", -4.0),
        ("▁hello", -5.0),
    ];
    for (piece, score) in pieces {
        tokens.push(piece.to_string());
        token_types.push(TokenType::Normal);
        scores.push(score);
    }
    GgufVocab {
        source: PathBuf::from("hand-made.gguf"),
        model: GgufVocabModel::Llama {
            scores,
            add_space_prefix,
        },
        tokens,
        token_types,
        bos_id: Some(1),
        eos_id: Some(2),
        unk_id: Some(0),
        pad_id: None,
        add_bos: true,
        add_eos: false,
        chat_template: Some("{{ bos_token }}{{ messages[0]['content'] }}".into()),
    }
}

#[test]
fn gpt2_vocab_merges_bytes_and_reads_control_tokens() {
    let tok = ModelTokenizer::from_gguf_vocab(&gpt2_vocab()).unwrap();
    let id = |t: &str| tok.token_to_id(t).unwrap();
    let text = "<|im_start|>hello world<|im_end|>";
    assert_eq!(tok.encode(text).unwrap(), [0, id("hello"), id("Ġworld"), 1]);
    assert_eq!(tok.decode(&tok.encode(text).unwrap()).unwrap(), text);
    // Read as plain text, a control token is its characters.
    let literal = tok.tokenize("<|im_start|>", false, false).unwrap();
    assert_eq!(literal.len(), 12, "{literal:?}");
    assert_eq!(tok.bos_token.as_deref(), Some("<|im_start|>"));
    assert_eq!(tok.eos_token.as_deref(), Some("<|im_end|>"));
    assert!(!tok.add_bos_token);
    assert_eq!(tok.tokenize("hello", true, true).unwrap(), [id("hello")]);
}

#[test]
fn add_bos_token_puts_bos_first_only_when_special_tokens_are_added() {
    let mut vocab = gpt2_vocab();
    vocab.add_bos = true;
    let tok = ModelTokenizer::from_gguf_vocab(&vocab).unwrap();
    let hello = tok.token_to_id("hello").unwrap();
    assert_eq!(tok.tokenize("hello", true, true).unwrap(), [0, hello]);
    assert_eq!(tok.tokenize("", true, false).unwrap(), [0]);
    assert_eq!(tok.encode("hello").unwrap(), [hello]);
    vocab.bos_id = None;
    let err = ModelTokenizer::from_gguf_vocab(&vocab)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("hand-made.gguf") && err.contains("bos_token_id"),
        "{err}"
    );
}

#[test]
fn sentencepiece_vocab_merges_by_score_with_space_prefix_and_byte_fallback() {
    let tok = ModelTokenizer::from_gguf_vocab(&llama_vocab(true)).unwrap();
    let id = |t: &str| tok.token_to_id(t).unwrap();
    let byte = |b: u8| id(&format!("<0x{b:02X}>"));
    assert_eq!(tok.encode("hello").unwrap(), [id("▁hello")]);
    assert_eq!(
        tok.encode("hello hello").unwrap(),
        [id("▁hello"), id("▁hello")]
    );
    // "é" is not a piece: its two UTF-8 bytes.
    assert_eq!(
        tok.encode("hé").unwrap(),
        [id("▁"), id("h"), byte(0xC3), byte(0xA9)]
    );
    // The space prefix comes back after a special token, as in llama.cpp.
    let ids = tok.encode("<start_of_turn>hello\nhello").unwrap();
    let expected = [id("<start_of_turn>"), id("▁hello"), id("\n"), id("▁hello")];
    assert_eq!(ids, expected);
    assert_eq!(
        tok.tokenize("hello", true, true).unwrap(),
        [1, id("▁hello")]
    );
    for text in ["hello hé", "hello  é"] {
        assert_eq!(tok.decode(&tok.encode(text).unwrap()).unwrap(), text);
    }
    // Without parse_special the control token is text; the user-defined newline still matches.
    let literal = tok.tokenize("<start_of_turn>\n", false, false).unwrap();
    assert!(!literal.contains(&id("<start_of_turn>")) && literal.ends_with(&[id("\n")]));
}

#[test]
fn sentencepiece_without_space_prefix_keeps_the_text_as_is() {
    let tok = ModelTokenizer::from_gguf_vocab(&llama_vocab(false)).unwrap();
    let id = |t: &str| tok.token_to_id(t).unwrap();
    assert_eq!(tok.encode("hello").unwrap(), [id("hello")]);
    assert_eq!(tok.encode(" hello").unwrap(), [id("▁hello")]);
    assert_eq!(
        tok.decode(&[id("hello"), id("▁hello")]).unwrap(),
        "hello hello"
    );
}

/// The metadata of `vocab` as a GGUF file would hold it.
fn metadata(vocab: &GgufVocab) -> HashMap<String, Value> {
    let strings = |v: &[String]| Value::Array(v.iter().cloned().map(Value::String).collect());
    let types = vocab.token_types.iter().map(|&t| Value::I32(t as i32));
    let mut md = HashMap::from([
        ("tokenizer.ggml.tokens".to_string(), strings(&vocab.tokens)),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.collect()),
        ),
        (
            "tokenizer.ggml.bos_token_id".into(),
            Value::U32(vocab.bos_id.expect("the test vocab has BOS")),
        ),
        (
            "tokenizer.ggml.eos_token_id".into(),
            Value::U32(vocab.eos_id.expect("the test vocab has EOS")),
        ),
        (
            "tokenizer.ggml.add_bos_token".into(),
            Value::Bool(vocab.add_bos),
        ),
    ]);
    if let Some(template) = &vocab.chat_template {
        md.insert(
            "tokenizer.chat_template".into(),
            Value::String(template.clone()),
        );
    }
    match &vocab.model {
        GgufVocabModel::Llama {
            scores,
            add_space_prefix,
        } => {
            md.insert("tokenizer.ggml.model".into(), Value::String("llama".into()));
            let scores = scores.iter().map(|s| Value::F32(*s)).collect();
            md.insert("tokenizer.ggml.scores".into(), Value::Array(scores));
            md.insert(
                "tokenizer.ggml.add_space_prefix".into(),
                Value::Bool(*add_space_prefix),
            );
        }
        GgufVocabModel::Gpt2 { merges, pre } => {
            md.insert("tokenizer.ggml.model".into(), Value::String("gpt2".into()));
            let merges: Vec<String> = merges.iter().map(|(a, b)| format!("{a} {b}")).collect();
            md.insert("tokenizer.ggml.merges".into(), strings(&merges));
            if let Some(pre) = pre {
                md.insert("tokenizer.ggml.pre".into(), Value::String(pre.clone()));
            }
        }
    }
    md
}

#[test]
fn a_gguf_file_without_tokenizer_json_loads_its_tokenizer_from_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    let md = metadata(&llama_vocab(true));
    let entries: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = std::fs::File::create(&path).unwrap();
    gguf_file::write(&mut file, &entries, &[]).unwrap();
    drop(file);
    let model = ResolvedModel {
        dir: dir.path().to_path_buf(),
        file: Some(path.clone()),
    };
    let tok = ModelTokenizer::load(&model).unwrap();
    assert_eq!(tok.source, path);
    assert_eq!(tok.encode("<start_of_turn>hello").unwrap().len(), 2);
    assert!(tok.add_bos_token);
    let template = tok.chat_template.as_ref().unwrap();
    let prompt = template
        .render(
            &[ChatMessage::new("user", "hi")],
            false,
            tok.bos_token.as_deref(),
            None,
        )
        .unwrap();
    assert_eq!(prompt, "<s>hi");
}

#[test]
fn missing_or_mistyped_metadata_names_the_file_and_the_key() {
    let path = Path::new("/models/broken.gguf");
    let mut md = metadata(&llama_vocab(true));
    md.remove("tokenizer.ggml.tokens");
    let err = ModelTokenizer::from_gguf_metadata(&md, path)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("/models/broken.gguf") && err.contains("`tokenizer.ggml.tokens`: missing")
    );

    let mut md = metadata(&llama_vocab(true));
    md.insert("tokenizer.ggml.scores".into(), Value::String("x".into()));
    let err = ModelTokenizer::from_gguf_metadata(&md, path)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`tokenizer.ggml.scores`: expected an array of f32, found string"),
        "{err}"
    );

    let mut md = metadata(&llama_vocab(true));
    md.insert("tokenizer.ggml.model".into(), Value::String("bert".into()));
    let err = ModelTokenizer::from_gguf_metadata(&md, path)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`tokenizer.ggml.model`: `bert` is not supported"),
        "{err}"
    );

    let mut md = metadata(&gpt2_vocab());
    md.remove("tokenizer.ggml.merges");
    let err = ModelTokenizer::from_gguf_metadata(&md, path)
        .unwrap_err()
        .to_string();
    assert!(err.contains("`tokenizer.ggml.merges`: missing"), "{err}");
}

#[test]
fn smollm2_gguf_tokenizer_reads_chatml() {
    let Some(path) = gguf_asset(
        "smollm2-135m-instruct",
        "smollm2_gguf_tokenizer_reads_chatml",
    ) else {
        return;
    };
    let model = ResolvedModel {
        dir: path.parent().unwrap().to_path_buf(),
        file: Some(path.clone()),
    };
    let tok = ModelTokenizer::load(&model).unwrap();
    assert_eq!(tok.bos_token.as_deref(), Some("<|im_start|>"));
    assert_eq!(tok.eos_token.as_deref(), Some("<|im_end|>"));
    assert!(!tok.add_bos_token);
    let template = tok
        .chat_template
        .as_ref()
        .expect("SmolLM2's GGUF has a chat template");
    let prompt = template
        .render(
            &[ChatMessage::new("user", "Code: chest pain")],
            true,
            None,
            None,
        )
        .unwrap();
    let ids = tok.encode(&prompt).unwrap();
    assert_eq!(ids[0], 1, "<|im_start|> is one token");
    assert_eq!(tok.decode(&ids).unwrap(), prompt);
    assert_eq!(
        tok.encode("Hello world! 123").unwrap(),
        [19556, 905, 17, 216, 33, 34, 35]
    );
}

#[test]
fn gemma3_gguf_tokenizer_reads_turn_markers_and_adds_bos() {
    let Some(path) = gguf_asset(
        "gemma3-270m",
        "gemma3_gguf_tokenizer_reads_turn_markers_and_adds_bos",
    ) else {
        return;
    };
    let tok = ModelTokenizer::from_gguf(&path).unwrap();
    assert_eq!(tok.bos_token.as_deref(), Some("<bos>"));
    assert_eq!(tok.eos_token.as_deref(), Some("<eos>"));
    assert!(tok.add_bos_token);
    let text = "<start_of_turn>user\nPatient: 45 y/o, café-au-lait spots  — ½ dose<end_of_turn>\n";
    let ids = tok.tokenize(text, true, true).unwrap();
    assert_eq!(ids[..2], [2, 105]);
    assert!(ids.contains(&106));
    assert_eq!(tok.decode(&ids[1..]).unwrap(), text);
    let literal = tok.tokenize("<start_of_turn>", false, false).unwrap();
    assert!(literal.len() > 1, "{literal:?}");
}

/// What scripts/reference/llamacpp_reference.py recorded of llama.cpp's tokenizer.
#[derive(Deserialize)]
struct Fixture {
    tokenizer: FixtureTokenizer,
    /// Each text tokenized without BOS, with special tokens parsed and not.
    tokenization: Vec<FixtureText>,
    tokenization_with_bos: FixtureWithBos,
    /// Prompts tokenized as llama.cpp's tools do: BOS when the file asks, special tokens parsed.
    generation: Vec<FixturePrompt>,
}

#[derive(Deserialize)]
struct FixtureTokenizer {
    add_bos: bool,
    bos_text: Option<String>,
    eos_text: Option<String>,
    chat_template: Option<String>,
}

#[derive(Deserialize)]
struct FixtureText {
    input: String,
    plain: FixtureIds,
    special: FixtureIds,
}

#[derive(Deserialize)]
struct FixtureIds {
    ids: Vec<u32>,
    /// llama.cpp's detokenization of `ids`: `{"text": …}`, or `{"hex": …}` when not UTF-8.
    detokenized: HashMap<String, String>,
}

#[derive(Deserialize)]
struct FixtureWithBos {
    input: String,
    ids: Vec<u32>,
}

#[derive(Deserialize)]
struct FixturePrompt {
    prompt: String,
    prompt_ids: Vec<u32>,
}

/// Our ids (and detokenized text) for every case of a llama.cpp fixture, when the fixture and
/// the model file are there; all differences are listed before failing.
fn check_fixture(name: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/llamacpp")
        .join(format!("{name}.json"));
    if !path.is_file() {
        println!(
            "skipping the llama.cpp comparison: {} does not exist",
            path.display()
        );
        return;
    }
    let Some(model) = gguf_asset(name, &format!("the llama.cpp comparison for {name}")) else {
        return;
    };
    let json = std::fs::read_to_string(&path).expect("the fixture reads");
    let fixture: Fixture = serde_json::from_str(&json).expect("the fixture parses");
    let tok = ModelTokenizer::from_gguf(&model).expect("the GGUF tokenizer builds");
    let meta = &fixture.tokenizer;
    assert_eq!(tok.add_bos_token, meta.add_bos);
    assert_eq!(tok.bos_token, meta.bos_text);
    assert_eq!(tok.eos_token, meta.eos_text);
    assert_eq!(
        tok.chat_template.as_ref().map(|t| t.source().to_string()),
        meta.chat_template
    );

    let mut cases = Vec::new();
    for case in &fixture.tokenization {
        cases.push((case.input.as_str(), false, false, &case.plain.ids));
        cases.push((case.input.as_str(), false, true, &case.special.ids));
    }
    let bos = &fixture.tokenization_with_bos;
    cases.push((bos.input.as_str(), true, true, &bos.ids));
    for prompt in &fixture.generation {
        cases.push((
            prompt.prompt.as_str(),
            meta.add_bos,
            true,
            &prompt.prompt_ids,
        ));
    }
    let mut mismatches = Vec::new();
    for &(text, add_special, parse_special, expected) in &cases {
        let ours = tok
            .tokenize(text, add_special, parse_special)
            .expect("encodes");
        if &ours != expected {
            mismatches.push(format!(
                "{text:?} (add_special {add_special}, parse_special {parse_special}):\n  \
                 llama.cpp {expected:?}\n  ours      {ours:?}"
            ));
        }
    }
    // With special tokens shown, our decoding is llama.cpp's detokenization.
    for case in &fixture.tokenization {
        if let Some(text) = case.special.detokenized.get("text") {
            let ours = tok.decode(&case.special.ids).expect("decodes");
            if &ours != text {
                mismatches.push(format!(
                    "decode {:?}: llama.cpp {text:?}, ours {ours:?}",
                    case.input
                ));
            }
        }
    }
    assert!(
        mismatches.is_empty(),
        "{name}: {} of {} cases differ from llama.cpp:\n{}",
        mismatches.len(),
        cases.len() + fixture.tokenization.len(),
        mismatches.join("\n")
    );
}

#[test]
fn smollm2_ids_match_llama_cpp() {
    check_fixture("smollm2-135m-instruct");
}

#[test]
fn gemma3_ids_match_llama_cpp() {
    check_fixture("gemma3-270m");
}
