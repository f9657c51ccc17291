//! What JSON constrained decoding costs per generated token on a real vocabulary: builds the
//! token trie once, then masks the logits before each token of a typical coding answer; and,
//! for comparison, what trying every token's text one by one from the same state costs.
//!
//! `cargo run --release -p medcoder-infer --example json_mask_cost -- <tokenizer folder | .gguf>`

use std::sync::Arc;
use std::time::Instant;

use medcoder_infer::{JsonSchema, JsonSchemaProcessor, JsonState, LogitsProcessor, TokenTrie};
use medcoder_models::ModelTokenizer;

const ANSWER: &str = r#"{"diagnoses": [{"code": "E11.9", "evidence": "type 2 diabetes mellitus without complications, on metformin"}, {"code": "I10", "evidence": "essential hypertension"}], "procedures": []}"#;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let Some(path) = std::env::args().nth(1) else {
        return Err("usage: json_mask_cost <tokenizer folder | model.gguf>".into());
    };
    let path = std::path::Path::new(&path);
    let tokenizer = if path.extension().is_some_and(|e| e == "gguf") {
        ModelTokenizer::from_gguf(path)?
    } else {
        ModelTokenizer::from_dir(path)?
    };
    let started = Instant::now();
    let trie = Arc::new(TokenTrie::new(TokenTrie::texts_of(&tokenizer)));
    println!(
        "vocabulary {} tokens: texts and trie built in {:.0} ms",
        trie.vocab_size(),
        started.elapsed().as_secs_f64() * 1e3
    );
    let items = serde_json::json!({"type": "array", "items": {"type": "object",
        "properties": {"code": {"type": "string"}, "evidence": {"type": "string"}},
        "required": ["code", "evidence"], "additionalProperties": false}});
    let schema = serde_json::json!({"type": "object",
        "properties": {"diagnoses": items, "procedures": items},
        "required": ["diagnoses", "procedures"], "additionalProperties": false});
    let schema = Arc::new(JsonSchema::compile(&schema)?);
    let ids = tokenizer.encode(ANSWER)?;
    let rounds = 20;
    let mut per_step = Vec::new();
    let mut allowed_total = 0usize;
    for _ in 0..rounds {
        let mut processor = JsonSchemaProcessor::new(schema.clone(), trie.clone(), vec![2]);
        for n in 0..ids.len() {
            let mut logits = vec![0.0f32; trie.vocab_size()];
            let started = Instant::now();
            processor.process(&ids[..n], &mut logits);
            per_step.push(started.elapsed().as_secs_f64() * 1e6);
            if logits[ids[n] as usize] != 0.0 {
                return Err(format!("token {n} of the answer was refused").into());
            }
            allowed_total += logits.iter().filter(|l| **l == 0.0).count();
        }
    }
    per_step.sort_by(f64::total_cmp);
    let mean = per_step.iter().sum::<f64>() / per_step.len() as f64;
    println!(
        "{} tokens of answer x {rounds}: mask per token mean {mean:.0} µs, median {:.0} µs, max {:.0} µs; {:.0} tokens allowed per step on average",
        ids.len(),
        per_step[per_step.len() / 2],
        per_step[per_step.len() - 1],
        allowed_total as f64 / per_step.len() as f64
    );
    // The naive way: every token's bytes from a copy of the state, at every step.
    let mut state = JsonState::new();
    let mut naive = Vec::new();
    for &id in &ids {
        let started = Instant::now();
        let allowed = (0..trie.vocab_size() as u32)
            .filter(|&t| {
                let mut copy = state.clone();
                trie.text(t).is_some_and(|text| copy.advance(&schema, text))
            })
            .count();
        naive.push(started.elapsed().as_secs_f64() * 1e6);
        std::hint::black_box(allowed);
        if !state.advance(&schema, trie.text(id).unwrap_or_default()) {
            return Err("the answer left the grammar".into());
        }
    }
    naive.sort_by(f64::total_cmp);
    println!(
        "one token at a time instead: mean {:.0} µs, median {:.0} µs per step",
        naive.iter().sum::<f64>() / naive.len() as f64,
        naive[naive.len() / 2]
    );
    Ok(())
}
