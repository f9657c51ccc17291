//! Llama (SmolLM2, Llama 3.x, DeepSeek-R1-Distill-Llama): `LlamaForCausalLM`.

use serde::Deserialize;

use super::{defaults, GgufMeta, RopeScalingConfig, TokenIds};
use crate::layers::Activation;
use crate::transformer::Spec;

/// `config.json` of a `LlamaForCausalLM`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    #[serde(default = "defaults::rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "defaults::rope_theta_10k")]
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScalingConfig>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "defaults::silu")]
    pub hidden_act: String,
    #[serde(default)]
    pub attention_bias: bool,
    pub bos_token_id: Option<TokenIds>,
    pub eos_token_id: Option<TokenIds>,
}

fn default_max_positions() -> usize {
    2048
}

impl Config {
    pub fn spec(&self) -> Result<Spec, String> {
        Ok(Spec {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim: self
                .head_dim
                .unwrap_or(self.hidden_size / self.num_attention_heads),
            rms_norm_eps: self.rms_norm_eps,
            max_position_embeddings: self.max_position_embeddings,
            rope_theta: self.rope_theta,
            rope_scaling: RopeScalingConfig::to_scaling(self.rope_scaling.as_ref())?,
            activation: Activation::from_hf(&self.hidden_act)
                .ok_or_else(|| format!("hidden_act `{}` is not supported", self.hidden_act))?,
            tie_word_embeddings: self.tie_word_embeddings,
            qkv_bias: self.attention_bias,
            qk_norm: false,
            sandwich_norms: false,
            scale_embeddings: false,
            attention_scale: None,
            sliding_windows: vec![None; self.num_hidden_layers],
            rope_local_theta: None,
            final_logit_softcapping: None,
            hf_norm_offset: 0.0,
        })
    }

    /// The same from a GGUF's `llama.*` metadata.
    pub fn from_gguf(meta: &GgufMeta) -> Result<Self, String> {
        let c = meta.common()?;
        Ok(Self {
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_hidden_layers: c.num_layers,
            num_attention_heads: c.num_heads,
            num_key_value_heads: Some(c.num_kv_heads),
            head_dim: c.head_dim,
            rms_norm_eps: c.rms_norm_eps.unwrap_or(1e-5),
            max_position_embeddings: c.context_length,
            rope_theta: c.rope_theta.unwrap_or(10_000.0),
            rope_scaling: None,
            tie_word_embeddings: c.tie_word_embeddings,
            hidden_act: defaults::silu(),
            attention_bias: c.qkv_bias,
            bos_token_id: None,
            eos_token_id: None,
        })
    }
}
