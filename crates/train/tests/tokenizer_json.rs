//! How a model folder's tokenizer.json is read: settings baked into it must not change the ids.

mod support;

use medcoder_models::ModelTokenizer;

/// The bug fixed in "Tokenizer: ignore truncation/padding baked into tokenizer.json": a
/// tokenizer.json with truncation (and padding) settings cut every text at its max_length.
#[test]
fn truncation_and_padding_in_tokenizer_json_do_not_cut_or_pad_ids() {
    let dir = tempfile::tempdir().unwrap();
    let words: Vec<String> = (0..20)
        .map(|i| format!("word{}", char::from(b'a' + i)))
        .collect();
    let text = words.join(" ");
    support::tokenizer::write_chatml_tokenizer(dir.path(), &[text.as_str()]);
    let path = dir.path().join("tokenizer.json");
    let mut hf = tokenizers::Tokenizer::from_file(&path).unwrap();
    hf.with_truncation(Some(tokenizers::TruncationParams {
        max_length: 8,
        ..Default::default()
    }))
    .unwrap();
    hf.with_padding(Some(tokenizers::PaddingParams {
        strategy: tokenizers::PaddingStrategy::Fixed(32),
        ..Default::default()
    }));
    hf.save(&path, true).unwrap();
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(saved["truncation"]["max_length"], 8, "{saved}");
    assert!(saved["padding"].is_object(), "{saved}");
    let baked = hf.encode(text.as_str(), false).unwrap();
    let kept: u32 = baked.get_attention_mask().iter().sum();
    assert_eq!(
        (baked.get_ids().len(), kept),
        (32, 8),
        "as the settings say"
    );

    let tok = ModelTokenizer::from_dir(dir.path()).unwrap();
    let ids = tok.encode(&text).unwrap();
    assert_eq!(ids.len(), 20, "one id per word, none cut, none padded");
    assert_eq!(tok.decode(&ids).unwrap(), text);
    let short = tok.encode("worda wordb").unwrap();
    assert_eq!(short.len(), 2, "no padding to 32");
}
