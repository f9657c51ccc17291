//! The generation loop on a real small model (SmolLM2-135M-Instruct, GGUF Q4_1): greedy output
//! as llama.cpp gives it, stops, limits, batches and streaming. Runs when the asset is installed
//! (`medcoder assets fetch smollm2-135m-instruct`) and says so when it skips.

#![allow(clippy::unwrap_used)] // helpers of tests: a failure is a test failure

#[path = "../../models/tests/support/mod.rs"]
mod support;

use medcoder_infer::{
    generate, generate_batch, stream_into, FinishReason, GenerateRequest, SamplingParams,
    StopConditions,
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
