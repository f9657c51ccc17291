//! The generation loop on a real small model (SmolLM2-135M-Instruct, GGUF Q4_1): greedy output
//! as llama.cpp gives it, stops, limits, batches and streaming. Runs when the asset is installed
//! (`medcoder assets fetch smollm2-135m-instruct`) and says so when it skips.

#![allow(clippy::unwrap_used)] // helpers of tests: a failure is a test failure

#[path = "../../models/tests/support/mod.rs"]
mod support;

use std::sync::Arc;

use medcoder_infer::{
    generate, generate_batch, log_softmax_top, stream_into, ContinuousBatch, FallbackToEos,
    FinishReason, GenerateRequest, JsonSchema, JsonSchemaProcessor, LogitsProcessor,
    SamplingParams, StopConditions, TokenTrie, PREFILL_CHUNK,
};
use medcoder_models::LoadedModel;
use support::installed_model;

fn smollm2() -> Option<LoadedModel> {
    installed_model("smollm2-135m-instruct")
}

fn request(model: &LoadedModel, prompt: &str, max_new_tokens: usize) -> GenerateRequest {
    let mut stop = StopConditions::new(max_new_tokens);
    for id in &model.stop_token_ids {
        stop = stop.with_stop_token(*id);
    }
    GenerateRequest {
        prompt_ids: model.tokenizer.tokenize(prompt, true, true).unwrap(),
        sampling: SamplingParams::default(),
        stop,
    }
}

#[test]
fn greedy_generation_streams_what_llama_cpp_says() {
    let Some(model) = smollm2() else { return };
    let mut streamed = String::new();
    let generation = generate(
        &model,
        request(&model, "The capital of France is", 3),
        Vec::new(),
        |text| {
            streamed.push_str(text);
            true
        },
    )
    .unwrap();
    assert_eq!(generation.text, " Paris.\n");
    assert_eq!(streamed, generation.text);
    assert_eq!(generation.finish_reason, FinishReason::Length);
    assert_eq!(generation.token_ids.len(), 3);
}

/// Every generated token comes with the log-probability it was picked with: one per token, at
/// most 0, greedy's pick the most likely token of its step, the same in a batch, and 0 where a
/// processor leaves a single token.
#[test]
fn each_token_has_the_log_probability_it_was_picked_with() {
    let Some(model) = smollm2() else { return };
    let prompt = "The capital of France is";
    let alone = generate(&model, request(&model, prompt, 6), Vec::new(), |_| true).unwrap();
    assert_eq!(alone.token_logprobs.len(), alone.token_ids.len());
    assert!(
        alone
            .token_logprobs
            .iter()
            .all(|l| *l <= 0.0 && l.is_finite()),
        "{:?}",
        alone.token_logprobs
    );
    let prompt_ids = model.tokenizer.tokenize(prompt, true, true).unwrap();
    let mut cache = model.lm.new_cache();
    let logits = model.lm.next_token_logits(&prompt_ids, &mut cache).unwrap();
    let (top_id, top_log_prob) = log_softmax_top(&logits.to_vec1::<f32>().unwrap(), 1)[0];
    assert_eq!(top_id, alone.token_ids[0]);
    assert!((top_log_prob - alone.token_logprobs[0]).abs() < 1e-5);

    let batch = generate_batch(
        &model,
        vec![
            request(&model, "def fibonacci(n):", 6),
            request(&model, prompt, 6),
        ],
    )
    .unwrap();
    // Close, not equal: activations are quantized to 8 bits per block, and a batch's shape
    // changes the order of the kernels' sums, which can tip a rounding; the same prompt twice
    // in one batch differs by up to ~0.07 here.
    assert_eq!(batch[1].token_ids, alone.token_ids);
    for (batched, one) in batch[1].token_logprobs.iter().zip(&alone.token_logprobs) {
        assert!((batched - one).abs() < 0.15, "{batched} vs {one}");
    }

    let forced_id = 42;
    let only_one = move |_: &[u32], logits: &mut [f32]| {
        for (id, logit) in logits.iter_mut().enumerate() {
            if id != forced_id {
                *logit = f32::NEG_INFINITY;
            }
        }
    };
    let processors: Vec<Box<dyn LogitsProcessor>> = vec![Box::new(only_one)];
    let forced = generate(&model, request(&model, prompt, 3), processors, |_| true).unwrap();
    assert_eq!(forced.token_ids, [forced_id as u32; 3]);
    assert_eq!(forced.token_logprobs, [0.0; 3]);
}

#[test]
fn a_stop_string_ends_the_output_before_it() {
    let Some(model) = smollm2() else { return };
    let mut req = request(&model, "The capital of France is", 20);
    req.stop = req.stop.with_stop_string(".");
    let generation = generate(&model, req, Vec::new(), |_| true).unwrap();
    assert_eq!(generation.text, " Paris");
    assert_eq!(generation.finish_reason, FinishReason::Stop);
}

#[test]
fn the_caller_can_stop_a_generation() {
    let Some(model) = smollm2() else { return };
    let mut pieces = 0;
    let generation = generate(
        &model,
        request(&model, "def fibonacci(n):", 50),
        Vec::new(),
        |_| {
            pieces += 1;
            pieces < 2
        },
    )
    .unwrap();
    assert_eq!(generation.finish_reason, FinishReason::Cancelled);
    assert!(generation.token_ids.len() < 50);
}

#[test]
fn a_batch_of_different_lengths_gives_what_each_prompt_gives_alone() {
    let Some(model) = smollm2() else { return };
    let prompts = [
        "The capital of France is",
        "def fibonacci(n):",
        "Predict the medical codes for the following text: Patient with type 2 diabetes and hypertension.",
    ];
    let alone: Vec<String> = prompts
        .iter()
        .map(|p| {
            generate(&model, request(&model, p, 8), Vec::new(), |_| true)
                .unwrap()
                .text
        })
        .collect();
    let batch = generate_batch(
        &model,
        prompts.iter().map(|p| request(&model, p, 8)).collect(),
    )
    .unwrap();
    let batched: Vec<String> = batch.into_iter().map(|g| g.text).collect();
    assert_eq!(batched, alone);
}

#[test]
fn seeded_sampling_repeats_itself() {
    let Some(model) = smollm2() else { return };
    let sample = |seed| {
        let mut req = request(&model, "The patient was admitted with", 12);
        req.sampling = SamplingParams {
            temperature: 0.9,
            top_p: 0.95,
            seed: Some(seed),
            ..SamplingParams::default()
        };
        generate(&model, req, Vec::new(), |_| true)
            .unwrap()
            .token_ids
    };
    assert_eq!(sample(7), sample(7));
}

#[test]
fn text_streams_through_a_channel_until_the_receiver_goes() {
    let Some(model) = smollm2() else { return };
    let (sender, receiver) = std::sync::mpsc::channel();
    let generation = generate(
        &model,
        request(&model, "The capital of France is", 3),
        Vec::new(),
        stream_into(sender),
    )
    .unwrap();
    let streamed: String = receiver.try_iter().collect();
    assert_eq!(streamed, generation.text);

    let (sender, receiver) = std::sync::mpsc::channel();
    drop(receiver);
    let generation = generate(
        &model,
        request(&model, "def fibonacci(n):", 30),
        Vec::new(),
        stream_into(sender),
    )
    .unwrap();
    assert_eq!(generation.finish_reason, FinishReason::Cancelled);
}

/// Continuous batching: sequences join a running batch between steps and leave it when done
/// (so the cache's rows and padding change under the others), and every one of them gets the
/// tokens it gets alone.
#[test]
fn sequences_joining_and_leaving_a_running_batch_get_what_they_get_alone() {
    let Some(model) = smollm2() else { return };
    let prompts = [
        ("Predict the medical codes for the following text: Patient with type 2 diabetes and hypertension.", 14),
        ("The capital of France is", 4),
        ("def fibonacci(n):", 9),
        ("Once upon a time", 6),
    ];
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .map(|(p, n)| {
            generate(&model, request(&model, p, *n), Vec::new(), |_| true)
                .unwrap()
                .token_ids
        })
        .collect();
    let mut batch = ContinuousBatch::new(&model);
    let mut streamed = vec![String::new(); prompts.len()];
    let mut results: Vec<Option<Vec<u32>>> = vec![None; prompts.len()];
    let mut record = |finished: medcoder_infer::Finished<usize>| {
        for (i, generation) in finished {
            let generation = generation.unwrap();
            assert_eq!(generation.token_logprobs.len(), generation.token_ids.len());
            results[i] = Some(generation.token_ids);
        }
    };
    let mut on_text = |i: &usize, text: &str| {
        streamed[*i].push_str(text);
        true
    };
    // The first runs alone for a while; the others join at different steps, one of them
    // longer than the rows already there (the batch is padded to it).
    let joins_at = [0, 3, 3, 5];
    for step in 0..40 {
        for (i, _) in joins_at.iter().enumerate().filter(|(_, s)| **s == step) {
            let (prompt, n) = prompts[i];
            assert!(batch
                .join(request(&model, prompt, n), Vec::new(), i)
                .is_ok());
        }
        record(batch.step(&mut on_text).unwrap());
    }
    assert!(batch.is_empty(), "{batch:?}");
    assert_eq!(batch.positions(), 0);
    let results: Vec<Vec<u32>> = results.into_iter().map(Option::unwrap).collect();
    assert_eq!(results, alone);
    for (i, (prompt, n)) in prompts.iter().enumerate() {
        let text = generate(&model, request(&model, prompt, *n), Vec::new(), |_| true)
            .unwrap()
            .text;
        assert_eq!(streamed[i], text, "{prompt}");
    }
}

/// A clinical note of about `sentences` × 20 tokens.
fn long_note(sentences: usize) -> String {
    (0..sentences)
        .map(|i| {
            format!(
                "Day {i}: blood pressure {} over {}, glucose {} mg/dL, no chest pain, tolerating diet. ",
                120 + i % 30,
                70 + i % 20,
                90 + 7 * i % 80
            )
        })
        .collect()
}

/// Chunked prefill: a long prompt joining a running batch is prefilled a piece per step while
/// the running row goes on decoding a token per step, and both get what they get alone.
#[test]
fn a_long_prompt_joins_a_piece_per_step_while_the_others_decode() {
    let Some(model) = smollm2() else { return };
    let short = ("The capital of France is", 12);
    let note = format!("Summarise: {}", long_note(30));
    let long = (note.as_str(), 5);
    let long_tokens = request(&model, long.0, 1).prompt_ids.len();
    let pieces = long_tokens.div_ceil(PREFILL_CHUNK);
    assert!(pieces >= 3, "{long_tokens} tokens");
    let alone = [short, long].map(|(p, n)| {
        generate(&model, request(&model, p, n), Vec::new(), |_| true)
            .unwrap()
            .token_ids
    });
    let mut batch = ContinuousBatch::new(&model);
    let mut results: Vec<Option<Vec<u32>>> = vec![None, None];
    let mut record = |finished: medcoder_infer::Finished<usize>| {
        for (i, generation) in finished {
            results[i] = Some(generation.unwrap().token_ids);
        }
    };
    assert!(batch
        .join(request(&model, short.0, short.1), Vec::new(), 0)
        .is_ok());
    // Alone, the short prompt is prefilled and becomes a row at once.
    record(batch.step(|_, _| true).unwrap());
    record(batch.step(|_, _| true).unwrap());
    let short_len = batch.positions();
    assert!(batch
        .join(request(&model, long.0, long.1), Vec::new(), 1)
        .is_ok());
    assert_eq!(batch.len(), 2);
    // Each step: the short row decodes one token and one piece of the long prompt goes in;
    // the long prompt becomes a row at the step of its last piece.
    for step in 1..pieces {
        record(batch.step(|_, _| true).unwrap());
        assert_eq!(batch.positions(), short_len + step, "step {step}");
    }
    record(batch.step(|_, _| true).unwrap());
    assert_eq!(batch.positions(), long_tokens);
    while !batch.is_empty() {
        record(batch.step(|_, _| true).unwrap());
    }
    let results: Vec<Vec<u32>> = results.into_iter().map(Option::unwrap).collect();
    assert_eq!(results, alone);
}

/// JSON constrained decoding on a real vocabulary: the answer is JSON valid against the
/// `openai` engine's schema (with at most 3 items a list), and ends with it.
#[test]
fn a_json_schema_constrains_a_real_model_to_valid_json() {
    let Some(model) = smollm2() else { return };
    // maxItems: left alone, this small model lists the same item until max_tokens.
    let items = serde_json::json!({"type": "array", "maxItems": 3, "items": {"type": "object",
        "properties": {"code": {"type": "string"}, "evidence": {"type": "string"}},
        "required": ["code", "evidence"], "additionalProperties": false}});
    let schema = serde_json::json!({"type": "object",
        "properties": {"diagnoses": items, "procedures": items},
        "required": ["diagnoses", "procedures"], "additionalProperties": false});
    let schema = Arc::new(JsonSchema::compile(&schema).unwrap());
    let trie = Arc::new(TokenTrie::new(TokenTrie::texts_of(&model.tokenizer)));
    let prompt = "Give the ICD-10 codes of this note as JSON with diagnoses and procedures, each a list of {code, evidence}.\nNote: Patient with type 2 diabetes and hypertension.\nJSON:";
    let processors: Vec<Box<dyn LogitsProcessor>> = vec![
        Box::new(JsonSchemaProcessor::new(
            schema,
            trie,
            model.stop_token_ids.clone(),
        )),
        Box::new(FallbackToEos {
            eos_token_id: model.stop_token_ids[0],
        }),
    ];
    let generation = generate(&model, request(&model, prompt, 300), processors, |_| true).unwrap();
    assert_eq!(
        generation.finish_reason,
        FinishReason::Stop,
        "{}",
        generation.text
    );
    let value: serde_json::Value = serde_json::from_str(&generation.text)
        .unwrap_or_else(|e| panic!("{e}: {}", generation.text));
    let object = value.as_object().unwrap();
    assert!(
        object["diagnoses"].is_array() && object["procedures"].is_array(),
        "{value}"
    );
}
