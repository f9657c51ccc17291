//! Each family read from GGUF: the tiny transformers checkpoints of `tests/fixtures/tiny/`
//! written as GGUF files the way llama.cpp's converter lays them out (its tensor names and
//! metadata keys, llama's q/k rows permuted, Gemma's norms stored as `1 + w`), then loaded by
//! our GGUF loader and checked against transformers' logits: in f32 exactly, and in Q8_0
//! through our quantized kernels within quantization error.

#![allow(clippy::unwrap_used)] // helpers of tests: a failure is a test failure

use std::collections::HashMap;
use std::path::{Path, PathBuf};

mod support;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use medcoder_models::loader::load_gguf;
use medcoder_models::weights::{gguf_name, GgufLayout};
use serde_json::Value as Json;
use support::{max_abs_diff, tiny_fixture, tiny_reference};

/// llama.cpp's converter permutes llama's q/k rows for its interleaved RoPE.
fn permute(w: &Tensor, heads: usize) -> Tensor {
    let (rows, cols) = w.dims2().unwrap();
    w.reshape((heads, 2, rows / heads / 2, cols))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .reshape((rows, cols))
        .unwrap()
}

/// Write the fixture of `family` as a GGUF file of `dtype` weights; returns its path.
fn write_gguf(family: &str, dtype: GgmlDType, dir: &Path) -> PathBuf {
    let config: Json = serde_json::from_str(
        &std::fs::read_to_string(tiny_fixture(family).join("config.json")).unwrap(),
    )
    .unwrap();
    let n = |key: &str| config[key].as_u64().unwrap() as u32;
    let f = |key: &str| config[key].as_f64().unwrap() as f32;
    let arch = if family == "gemma3" { "gemma3" } else { family };
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (
            format!("{arch}.context_length"),
            Value::U32(n("max_position_embeddings")),
        ),
        (
            format!("{arch}.embedding_length"),
            Value::U32(n("hidden_size")),
        ),
        (
            format!("{arch}.block_count"),
            Value::U32(n("num_hidden_layers")),
        ),
        (
            format!("{arch}.feed_forward_length"),
            Value::U32(n("intermediate_size")),
        ),
        (
            format!("{arch}.attention.head_count"),
            Value::U32(n("num_attention_heads")),
        ),
        (
            format!("{arch}.attention.head_count_kv"),
            Value::U32(n("num_key_value_heads")),
        ),
        (
            format!("{arch}.attention.layer_norm_rms_epsilon"),
            Value::F32(f("rms_norm_eps")),
        ),
        (
            format!("{arch}.rope.freq_base"),
            Value::F32(f("rope_theta")),
        ),
        (format!("{arch}.vocab_size"), Value::U32(n("vocab_size"))),
    ];
    if config["head_dim"].is_u64() {
        meta.push((
            format!("{arch}.attention.key_length"),
            Value::U32(n("head_dim")),
        ));
    }
    if family == "gemma3" {
        meta.extend([
            (
                format!("{arch}.attention.sliding_window"),
                Value::U32(n("sliding_window")),
            ),
            (
                format!("{arch}.attention.sliding_window_pattern"),
                Value::U32(n("sliding_window_pattern")),
            ),
            (
                format!("{arch}.rope.local.freq_base"),
                Value::F32(f("rope_local_base_freq")),
            ),
            (
                format!("{arch}.attention.scale"),
                Value::F32(f("query_pre_attn_scalar").powf(-0.5)),
            ),
        ]);
    }
    let layout = GgufLayout {
        permuted_qk: None,
        sandwich_norms: family == "gemma3",
    };
    let heads = n("num_attention_heads") as usize;
    let kv_heads = n("num_key_value_heads") as usize;
    let tensors: HashMap<String, Tensor> = candle_core::safetensors::load(
        tiny_fixture(family).join("model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let mut written: Vec<(String, QTensor)> = Vec::new();
    for (hf, tensor) in &tensors {
        let name = gguf_name(hf, &layout).unwrap_or_else(|| panic!("no GGUF name for {hf}"));
        let mut t = tensor.to_dtype(DType::F32).unwrap();
        if family == "llama" && name.ends_with("attn_q.weight") {
            t = permute(&t, heads);
        }
        if family == "llama" && name.ends_with("attn_k.weight") {
            t = permute(&t, kv_heads);
        }
        if family == "gemma3" && name.ends_with("norm.weight") {
            t = (t + 1.0).unwrap();
        }
        // Only matrices are quantized, as llama.cpp does; norms and biases stay f32.
        let q = if t.rank() == 2 { dtype } else { GgmlDType::F32 };
        written.push((name, QTensor::quantize(&t, q).unwrap()));
    }
    let path = dir.join(format!("{family}-{dtype:?}.gguf"));
    let mut file = std::fs::File::create(&path).unwrap();
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = written.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut file, &meta_refs, &tensor_refs).unwrap();
    path
}

fn check(family: &str, dtype: GgmlDType, tolerance: impl Fn(f32) -> f32) {
    let dir = tempfile::tempdir().unwrap();
    let path = write_gguf(family, dtype, dir.path());
    let (lm, loaded, _) =
        load_gguf(&path, &Device::Cpu, DType::F32).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(loaded.as_str(), family);
    for input in &tiny_reference(family).inputs {
        let mut cache = lm.new_cache();
        let ours: Vec<f32> = lm
            .next_token_logits(&input.input_ids, &mut cache)
            .unwrap()
            .to_vec1()
            .unwrap();
        let scale = input.last_logits.iter().fold(0f32, |a, x| a.max(x.abs()));
        let diff = max_abs_diff(&ours, &input.last_logits);
        assert!(
            diff < tolerance(scale),
            "{family} {dtype:?}: logits differ by {diff} (scale {scale})"
        );
    }
}

#[test]
fn every_family_reads_its_f32_gguf_as_transformers_computes() {
    for family in ["llama", "qwen2", "qwen3", "gemma3"] {
        check(family, GgmlDType::F32, |_| 2e-4);
    }
}

#[test]
fn every_family_runs_q8_0_gguf_through_the_quantized_kernels() {
    for family in ["llama", "qwen2", "qwen3", "gemma3"] {
        check(family, GgmlDType::Q8_0, |scale| 0.05 * scale);
    }
}
