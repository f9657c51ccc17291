//! Gemma 3 text models (Gemma 3 1B/270M, MedGemma text): `Gemma3ForCausalLM`. Sandwich norms
//! scaling by `1 + w`, q/k norms, embeddings scaled by √hidden, GELU (tanh), and local
//! sliding-window layers with their own RoPE base between global ones.

use serde::Deserialize;

use super::{defaults, GgufMeta, RopeScalingConfig, TokenIds};
use crate::layers::Activation;
use crate::transformer::Spec;

/// `config.json` of a `Gemma3ForCausalLM` (`model_type: gemma3_text`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    #[serde(default = "default_head_dim")]
    pub head_dim: usize,
    #[serde(default = "defaults::rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "defaults::rope_theta_1m")]
    pub rope_theta: f64,
    #[serde(default = "defaults::rope_theta_10k")]
    pub rope_local_base_freq: f64,
    pub rope_scaling: Option<RopeScalingConfig>,
    #[serde(default = "default_act")]
    pub hidden_activation: String,
    #[serde(default = "default_head_dim_f64")]
    pub query_pre_attn_scalar: f64,
    #[serde(default = "default_window")]
    pub sliding_window: usize,
    /// Older configs: every `sliding_window_pattern`-th layer is global.
    pub sliding_window_pattern: Option<usize>,
    /// Newer configs: `sliding_attention` or `full_attention` per layer.
    pub layer_types: Option<Vec<String>>,
    pub final_logit_softcapping: Option<f64>,
    pub attn_logit_softcapping: Option<f64>,
    #[serde(default = "default_tie")]
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<TokenIds>,
    pub eos_token_id: Option<TokenIds>,
}

fn default_head_dim() -> usize {
    256
}
fn default_head_dim_f64() -> f64 {
    256.0
}
fn default_max_positions() -> usize {
    32_768
}
fn default_act() -> String {
    "gelu_pytorch_tanh".into()
}
fn default_window() -> usize {
    4096
}
fn default_tie() -> bool {
    true
}

impl Config {
    /// Whether layer `i` attends within the sliding window only.
    pub fn is_sliding(&self, i: usize) -> bool {
        match &self.layer_types {
            Some(types) => types.get(i).is_some_and(|t| t == "sliding_attention"),
            None => !(i + 1).is_multiple_of(self.sliding_window_pattern.unwrap_or(6)),
        }
    }

    pub fn spec(&self) -> Result<Spec, String> {
        if self.attn_logit_softcapping.is_some() {
            return Err("attention logit soft-capping (Gemma 2) is not supported".into());
        }
        Ok(Spec {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads: self.num_key_value_heads,
            head_dim: self.head_dim,
            rms_norm_eps: self.rms_norm_eps,
            max_position_embeddings: self.max_position_embeddings,
            rope_theta: self.rope_theta,
            rope_scaling: RopeScalingConfig::to_scaling(self.rope_scaling.as_ref())?,
            activation: Activation::from_hf(&self.hidden_activation).ok_or_else(|| {
                format!(
                    "hidden_activation `{}` is not supported",
                    self.hidden_activation
                )
            })?,
            tie_word_embeddings: self.tie_word_embeddings,
            qkv_bias: false,
            qk_norm: true,
            sandwich_norms: true,
            scale_embeddings: true,
            attention_scale: Some(self.query_pre_attn_scalar.powf(-0.5)),
            sliding_windows: (0..self.num_hidden_layers)
                .map(|i| self.is_sliding(i).then_some(self.sliding_window))
                .collect(),
            rope_local_theta: Some(self.rope_local_base_freq),
            final_logit_softcapping: self.final_logit_softcapping,
            hf_norm_offset: 1.0,
        })
    }

    /// The same from a GGUF's `gemma3.*` metadata. llama.cpp fixes the sliding-window pattern
    /// at 6, the local RoPE base at 10,000 and the attention scale at 1/√head_dim; files that
    /// say otherwise (`attention.sliding_window_pattern`, `rope.local.freq_base`,
    /// `attention.scale`, as medcoder's export writes them) are honoured.
    pub fn from_gguf(meta: &GgufMeta) -> Result<Self, String> {
        let c = meta.common()?;
        let head_dim = c.head_dim.unwrap_or(c.hidden_size / c.num_heads);
        Ok(Self {
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_hidden_layers: c.num_layers,
            num_attention_heads: c.num_heads,
            num_key_value_heads: c.num_kv_heads,
            head_dim,
            rms_norm_eps: c.rms_norm_eps.unwrap_or(1e-6),
            max_position_embeddings: c.context_length,
            rope_theta: c.rope_theta.unwrap_or(1_000_000.0),
            rope_local_base_freq: meta.opt_f64("rope.local.freq_base")?.unwrap_or(10_000.0),
            rope_scaling: None,
            hidden_activation: default_act(),
            query_pre_attn_scalar: match meta.opt_f64("attention.scale")? {
                Some(scale) if scale > 0.0 => scale.powi(-2),
                _ => head_dim as f64,
            },
            sliding_window: meta.opt_usize("attention.sliding_window")?.unwrap_or(4096),
            sliding_window_pattern: Some(
                meta.opt_usize("attention.sliding_window_pattern")?
                    .unwrap_or(6),
            ),
            layer_types: None,
            final_logit_softcapping: meta.opt_f64("final_logit_softcapping")?,
            attn_logit_softcapping: None,
            tie_word_embeddings: c.tie_word_embeddings,
            bos_token_id: None,
            eos_token_id: None,
        })
    }
}
