//! Each family's model file against transformers (PyTorch, CPU, eager attention): tiny
//! random-weight checkpoints and their reference logits, written by
//! `scripts/reference/tiny_models.py` into `tests/fixtures/tiny/`.

#![allow(clippy::unwrap_used)] // helpers of tests: a failure is a test failure

mod support;

use candle_core::{DType, Device, Tensor};
use medcoder_models::layers::Mode;
use medcoder_models::loader::load_hf_dir;
use medcoder_models::{CausalLm, ForwardOptions};
use support::{max_abs_diff, tiny_fixture, tiny_reference, Reference};

const TOLERANCE: f32 = 2e-4;

fn load(family: &str) -> (CausalLm, Reference) {
    let dir = tiny_fixture(family);
    let (lm, loaded_family, _) =
        load_hf_dir(&dir, &Device::Cpu, DType::F32).unwrap_or_else(|e| panic!("{family}: {e}"));
    assert!(
        family.starts_with(loaded_family.as_str()),
        "{family} loaded as {loaded_family:?}"
    );
    (lm, tiny_reference(family))
}

/// (seq, vocab) logits of a whole sequence, without a cache.
fn all_logits(lm: &CausalLm, ids: &[u32], mode: Mode) -> Vec<Vec<f32>> {
    let input = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let options = ForwardOptions {
        mode,
        ..ForwardOptions::default()
    };
    lm.forward(&input, None, &options)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap()
}

fn check_family(family: &str) {
    let (lm, reference) = load(family);
    for input in &reference.inputs {
        for mode in [Mode::Inference, Mode::Differentiable] {
            let logits = all_logits(&lm, &input.input_ids, mode);
            let last = logits.last().unwrap();
            let diff = max_abs_diff(last, &input.last_logits);
            assert!(
                diff < TOLERANCE,
                "{family} {mode:?}: last logits differ by {diff}"
            );
            for (position, expected) in input.first8_logits.iter().enumerate() {
                let diff = max_abs_diff(&logits[position][..8], expected);
                assert!(
                    diff < TOLERANCE,
                    "{family} {mode:?}: position {position} differs by {diff}"
                );
            }
        }
        // With a KV cache, token by token after a prefix, the last logits are the same.
        let mut cache = lm.new_cache();
        let split = input.input_ids.len() / 2;
        let mut last = lm
            .next_token_logits(&input.input_ids[..split], &mut cache)
            .unwrap();
        for id in &input.input_ids[split..] {
            last = lm.next_token_logits(&[*id], &mut cache).unwrap();
        }
        let diff = max_abs_diff(&last.to_vec1::<f32>().unwrap(), &input.last_logits);
        assert!(
            diff < TOLERANCE,
            "{family} with a KV cache: last logits differ by {diff}"
        );
        // In pieces of several tokens after a filled cache (chunked prefill: positions and
        // the causal mask start after the cache), the same again.
        let mut cache = lm.new_cache();
        for piece in input.input_ids.chunks(3) {
            last = lm.next_token_logits(piece, &mut cache).unwrap();
        }
        let diff = max_abs_diff(&last.to_vec1::<f32>().unwrap(), &input.last_logits);
        assert!(
            diff < TOLERANCE,
            "{family} prefilled in pieces: last logits differ by {diff}"
        );
    }
}

#[test]
fn llama_matches_transformers() {
    check_family("llama");
}

#[test]
fn llama_with_llama3_rope_scaling_matches_transformers() {
    check_family("llama-rope-llama3");
}

#[test]
fn qwen2_matches_transformers() {
    check_family("qwen2");
}

#[test]
fn qwen3_matches_transformers() {
    check_family("qwen3");
}

#[test]
fn gemma3_matches_transformers() {
    check_family("gemma3");
}

#[test]
fn a_left_padded_batch_gives_each_row_its_own_logits() {
    let (lm, reference) = load("gemma3");
    let long = &reference.inputs[1].input_ids;
    let short = &reference.inputs[0].input_ids;
    let pad = long.len() - short.len();
    let mut rows = long.clone();
    rows.extend(std::iter::repeat_n(0u32, pad));
    rows.extend(short);
    let input = Tensor::from_vec(rows, (2, long.len()), &Device::Cpu).unwrap();
    let padding = [0, pad];
    let options = ForwardOptions {
        left_padding: Some(&padding),
        last_only: true,
        ..ForwardOptions::default()
    };
    let mut cache = lm.new_cache();
    let logits: Vec<Vec<f32>> = lm
        .forward(&input, Some(&mut cache), &options)
        .unwrap()
        .squeeze(1)
        .unwrap()
        .to_vec2()
        .unwrap();
    assert!(max_abs_diff(&logits[0], &reference.inputs[1].last_logits) < TOLERANCE);
    assert!(max_abs_diff(&logits[1], &reference.inputs[0].last_logits) < TOLERANCE);
}
