//! A model's `config.json` as transformers writes it for its family, from the [`Spec`] (for
//! models loaded from GGUF, which carry no config.json), so that merged or converted models
//! load in transformers, vLLM and our own loader.

use serde_json::{json, Value};

use crate::layers::{Activation, RopeScaling};
use crate::loader::Family;
use crate::transformer::Spec;

/// `config.json` for `spec`; `dtype` is written as `torch_dtype` (`float32`, `bfloat16`, …).
pub fn hf_config_json(
    family: Family,
    spec: &Spec,
    bos: Option<u32>,
    eos: &[u32],
    dtype: &str,
) -> Value {
    let rope_scaling = match &spec.rope_scaling {
        RopeScaling::None => Value::Null,
        RopeScaling::Linear { factor } => json!({"rope_type": "linear", "factor": factor}),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => json!({
            "rope_type": "llama3",
            "factor": factor,
            "low_freq_factor": low_freq_factor,
            "high_freq_factor": high_freq_factor,
            "original_max_position_embeddings": original_max_position_embeddings,
        }),
    };
    let activation = match spec.activation {
        Activation::Silu => "silu",
        Activation::GeluTanh => "gelu_pytorch_tanh",
    };
    let eos = match eos {
        [one] => json!(one),
        many => json!(many),
    };
    let mut config = json!({
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "rms_norm_eps": spec.rms_norm_eps,
        "max_position_embeddings": spec.max_position_embeddings,
        "rope_theta": spec.rope_theta,
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "torch_dtype": dtype,
        "use_cache": true,
    });
    let (model_type, architecture) = match family {
        Family::Llama => ("llama", "LlamaForCausalLM"),
        Family::Qwen2 => ("qwen2", "Qwen2ForCausalLM"),
        Family::Qwen3 => ("qwen3", "Qwen3ForCausalLM"),
        Family::Gemma3 => ("gemma3_text", "Gemma3ForCausalLM"),
    };
    let extra = match family {
        Family::Llama => json!({
            "hidden_act": activation,
            "attention_bias": spec.qkv_bias,
            "mlp_bias": false,
        }),
        Family::Qwen2 => json!({
            "hidden_act": activation,
            "use_sliding_window": false,
        }),
        Family::Qwen3 => json!({
            "hidden_act": activation,
            "attention_bias": spec.qkv_bias,
            "use_sliding_window": false,
        }),
        Family::Gemma3 => {
            let window = spec.sliding_windows.iter().flatten().next().copied();
            let layer_types: Vec<&str> = spec
                .sliding_windows
                .iter()
                .map(|w| match w {
                    Some(_) => "sliding_attention",
                    None => "full_attention",
                })
                .collect();
            let scalar = spec
                .attention_scale
                .map_or(spec.head_dim as f64, |scale| 1.0 / (scale * scale));
            json!({
                "hidden_activation": activation,
                "query_pre_attn_scalar": scalar.round(),
                "sliding_window": window.unwrap_or(spec.max_position_embeddings),
                "layer_types": layer_types,
                "rope_local_base_freq": spec.rope_local_theta.unwrap_or(10_000.0),
                "final_logit_softcapping": spec.final_logit_softcapping,
                "attn_logit_softcapping": null,
            })
        }
    };
    if let (Some(config), Some(extra)) = (config.as_object_mut(), extra.as_object()) {
        config.extend(extra.clone());
        config.insert("model_type".into(), json!(model_type));
        config.insert("architectures".into(), json!([architecture]));
    }
    config
}
