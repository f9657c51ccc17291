//! A tiny random-weight llama checkpoint (config.json + model.safetensors) for a tokenizer
//! folder's vocabulary, written by the tests themselves (no download).
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

pub const HIDDEN: usize = 64;
pub const INTERMEDIATE: usize = 128;
pub const LAYERS: usize = 2;

/// The sizes of a tiny llama.
#[derive(Debug, Clone, Copy)]
pub struct TinyShape {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
}

impl TinyShape {
    /// The default tiny model: [`HIDDEN`], [`INTERMEDIATE`], [`LAYERS`], 4 heads, 2 KV heads.
    pub const SMALL: Self = Self {
        hidden: HIDDEN,
        intermediate: INTERMEDIATE,
        layers: LAYERS,
        heads: 4,
        kv_heads: 2,
    };
}

/// Write `config.json` and `model.safetensors` of a llama model with `vocab` entries into
/// `dir` (beside its tokenizer files). Weights are drawn from a seeded generator.
pub fn write_tiny_llama(dir: &Path, vocab: usize, seed: u64) {
    write_tiny_llama_shaped(dir, vocab, seed, TinyShape::SMALL);
}

/// [`write_tiny_llama`] with other sizes.
pub fn write_tiny_llama_shaped(dir: &Path, vocab: usize, seed: u64, shape: TinyShape) {
    let TinyShape {
        hidden,
        intermediate,
        layers,
        heads,
        kv_heads,
    } = shape;
    std::fs::create_dir_all(dir).expect("the model folder");
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden / heads,
        "hidden_act": "silu",
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": false,
        "vocab_size": vocab,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "torch_dtype": "float32"
    });
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config).expect("JSON"),
    )
    .expect("config.json");
    let mut state = seed;
    let mut random = |shape: &[usize], std: f32| -> Tensor {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n)
            .map(|_| {
                state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                z ^= z >> 31;
                ((z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * std * 1.7
            })
            .collect();
        Tensor::from_vec(values, shape, &Device::Cpu).expect("a tensor")
    };
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    tensors.insert(
        "model.embed_tokens.weight".into(),
        random(&[vocab, hidden], 0.5),
    );
    tensors.insert("lm_head.weight".into(), random(&[vocab, hidden], 0.1));
    tensors.insert(
        "model.norm.weight".into(),
        Tensor::ones(hidden, candle_core::DType::F32, &Device::Cpu).expect("ones"),
    );
    let kv = kv_heads * hidden / heads;
    for layer in 0..layers {
        let p = format!("model.layers.{layer}");
        for (name, shape) in [
            ("self_attn.q_proj", [hidden, hidden]),
            ("self_attn.k_proj", [kv, hidden]),
            ("self_attn.v_proj", [kv, hidden]),
            ("self_attn.o_proj", [hidden, hidden]),
            ("mlp.gate_proj", [intermediate, hidden]),
            ("mlp.up_proj", [intermediate, hidden]),
            ("mlp.down_proj", [hidden, intermediate]),
        ] {
            let std = 1.0 / (shape[1] as f32).sqrt();
            tensors.insert(format!("{p}.{name}.weight"), random(&shape, std));
        }
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            tensors.insert(
                format!("{p}.{norm}.weight"),
                Tensor::ones(hidden, candle_core::DType::F32, &Device::Cpu).expect("ones"),
            );
        }
    }
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))
        .expect("model.safetensors");
}
