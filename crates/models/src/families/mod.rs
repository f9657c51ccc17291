//! One file per model family: a serde `Config` mirroring the family's `config.json`, turned into
//! the shared transformer's [`Spec`](crate::transformer::Spec), and the same from GGUF metadata.

pub mod gemma3;
pub mod llama;
pub mod qwen2;
pub mod qwen3;

use candle_core::quantized::gguf_file;
use serde::Deserialize;

use crate::layers::RopeScaling;

/// Defaults shared by the families' configs (serde `default = "…"`).
pub(crate) mod defaults {
    pub fn rms_norm_eps() -> f64 {
        1e-6
    }
    pub fn rope_theta_10k() -> f64 {
        10_000.0
    }
    pub fn rope_theta_1m() -> f64 {
        1_000_000.0
    }
    pub fn silu() -> String {
        "silu".into()
    }
}

/// What every family's GGUF metadata says the same way (`<arch>.*` keys, tensor presence).
#[derive(Debug, Clone, PartialEq)]
pub struct GgufCommon {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: Option<usize>,
    pub rms_norm_eps: Option<f64>,
    pub context_length: usize,
    pub rope_theta: Option<f64>,
    /// No `output.weight`: the LM head is the token embedding.
    pub tie_word_embeddings: bool,
    /// `blk.0.attn_q.bias` exists.
    pub qkv_bias: bool,
}

/// `rope_scaling` in config.json.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct RopeScalingConfig {
    #[serde(alias = "type")]
    pub rope_type: Option<String>,
    pub factor: Option<f64>,
    pub low_freq_factor: Option<f64>,
    pub high_freq_factor: Option<f64>,
    pub original_max_position_embeddings: Option<usize>,
}

impl RopeScalingConfig {
    pub fn to_scaling(cfg: Option<&Self>) -> Result<RopeScaling, String> {
        let Some(cfg) = cfg else {
            return Ok(RopeScaling::None);
        };
        let factor = cfg.factor.unwrap_or(1.0);
        match cfg.rope_type.as_deref().unwrap_or("default") {
            "default" => Ok(RopeScaling::None),
            "linear" => Ok(RopeScaling::Linear { factor }),
            "llama3" => Ok(RopeScaling::Llama3 {
                factor,
                low_freq_factor: cfg.low_freq_factor.unwrap_or(1.0),
                high_freq_factor: cfg.high_freq_factor.unwrap_or(4.0),
                original_max_position_embeddings: cfg
                    .original_max_position_embeddings
                    .unwrap_or(8192),
            }),
            other => Err(format!("rope_scaling type `{other}` is not supported yet")),
        }
    }
}

/// `eos_token_id` in config.json: one id or several.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            Self::One(id) => vec![*id],
            Self::Many(ids) => ids.clone(),
        }
    }
}

/// Typed access to `<arch>.<key>` GGUF metadata with errors naming the key.
#[allow(missing_debug_implementations)]
pub struct GgufMeta<'a> {
    pub content: &'a gguf_file::Content,
    pub arch: String,
}

impl<'a> GgufMeta<'a> {
    pub fn new(content: &'a gguf_file::Content) -> Result<Self, String> {
        let arch = content
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .ok_or("no general.architecture")?;
        Ok(Self { content, arch })
    }

    fn value(&self, key: &str) -> Option<&gguf_file::Value> {
        self.content.metadata.get(&format!("{}.{key}", self.arch))
    }

    pub fn usize(&self, key: &str) -> Result<usize, String> {
        self.opt_usize(key)?
            .ok_or_else(|| format!("missing {}.{key}", self.arch))
    }

    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>, String> {
        match self.value(key) {
            None => Ok(None),
            Some(v) => v
                .to_u64()
                .or_else(|_| v.to_u32().map(u64::from))
                .or_else(|_| v.to_i32().map(|x| x.max(0) as u64))
                .map(|x| Some(x as usize))
                .map_err(|e| format!("{}.{key}: {e}", self.arch)),
        }
    }

    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>, String> {
        match self.value(key) {
            None => Ok(None),
            Some(v) => v
                .to_f32()
                .map(f64::from)
                .or_else(|_| v.to_f64())
                .map(Some)
                .map_err(|e| format!("{}.{key}: {e}", self.arch)),
        }
    }

    pub fn opt_str(&self, key: &str) -> Option<String> {
        self.value(key).and_then(|v| v.to_string().ok()).cloned()
    }

    /// The vocabulary size: `<arch>.vocab_size`, else the tokenizer's token count.
    pub fn vocab_size(&self) -> Result<usize, String> {
        if let Some(n) = self.opt_usize("vocab_size")? {
            return Ok(n);
        }
        self.content
            .metadata
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.to_vec().ok())
            .map(Vec::len)
            .or_else(|| {
                self.content
                    .tensor_infos
                    .get("token_embd.weight")
                    .map(|t| t.shape.dims()[0])
            })
            .ok_or_else(|| format!("no {}.vocab_size nor tokenizer.ggml.tokens", self.arch))
    }

    pub fn common(&self) -> Result<GgufCommon, String> {
        let num_heads = self.usize("attention.head_count")?;
        let tensors = &self.content.tensor_infos;
        Ok(GgufCommon {
            vocab_size: self.vocab_size()?,
            hidden_size: self.usize("embedding_length")?,
            intermediate_size: self.usize("feed_forward_length")?,
            num_layers: self.usize("block_count")?,
            num_heads,
            num_kv_heads: self
                .opt_usize("attention.head_count_kv")?
                .unwrap_or(num_heads),
            head_dim: self.opt_usize("attention.key_length")?,
            rms_norm_eps: self.opt_f64("attention.layer_norm_rms_epsilon")?,
            context_length: self.usize("context_length")?,
            rope_theta: self.opt_f64("rope.freq_base")?,
            tie_word_embeddings: !tensors.contains_key("output.weight"),
            qkv_bias: tensors.contains_key("blk.0.attn_q.bias"),
        })
    }

    /// Rope scaling from `<arch>.rope.scaling.*`.
    pub fn rope_scaling(&self) -> Result<RopeScaling, String> {
        match self.opt_str("rope.scaling.type").as_deref() {
            None | Some("none") => Ok(RopeScaling::None),
            Some("linear") => Ok(RopeScaling::Linear {
                factor: self.opt_f64("rope.scaling.factor")?.unwrap_or(1.0),
            }),
            Some(other) => Err(format!(
                "{}.rope.scaling.type `{other}` is not supported yet",
                self.arch
            )),
        }
    }
}
