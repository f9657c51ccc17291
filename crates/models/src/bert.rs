//! BERT encoders (`BertModel`: MiniLM, all-MiniLM-L6-v2 and other sentence-transformers
//! checkpoints): token, position and segment embeddings, then post-norm encoder layers of
//! bidirectional self-attention and a GELU feed-forward block. Weights are read by their HF
//! names (`encoder.layer.0.attention.self.query.weight`, …) from `model.safetensors`.

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{embedding, layer_norm, linear, Embedding, LayerNorm, Linear, VarBuilder};
use serde::Deserialize;

/// `config.json` of a `BertModel`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab_size")]
    pub type_vocab_size: usize,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_position_embedding_type")]
    pub position_embedding_type: String,
}

fn default_hidden_act() -> String {
    "gelu".into()
}

fn default_type_vocab_size() -> usize {
    2
}

fn default_layer_norm_eps() -> f64 {
    1e-12
}

fn default_position_embedding_type() -> String {
    "absolute".into()
}

impl Config {
    /// Why this checkpoint cannot be run here, if it cannot.
    pub fn unsupported_reason(&self) -> Option<String> {
        if !matches!(
            self.hidden_act.as_str(),
            "gelu" | "gelu_new" | "gelu_pytorch_tanh"
        ) {
            return Some(format!("hidden_act `{}` is not supported", self.hidden_act));
        }
        if self.position_embedding_type != "absolute" {
            return Some(format!(
                "position_embedding_type `{}` is not supported (only `absolute`)",
                self.position_embedding_type
            ));
        }
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Some(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        None
    }
}

#[derive(Debug)]
struct Embeddings {
    word_embeddings: Embedding,
    position_embeddings: Embedding,
    token_type_embeddings: Embedding,
    layer_norm: LayerNorm,
}

impl Embeddings {
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            word_embeddings: embedding(cfg.vocab_size, cfg.hidden_size, vb.pp("word_embeddings"))?,
            position_embeddings: embedding(
                cfg.max_position_embeddings,
                cfg.hidden_size,
                vb.pp("position_embeddings"),
            )?,
            token_type_embeddings: embedding(
                cfg.type_vocab_size,
                cfg.hidden_size,
                vb.pp("token_type_embeddings"),
            )?,
            layer_norm: layer_norm(cfg.hidden_size, cfg.layer_norm_eps, vb.pp("LayerNorm"))?,
        })
    }

    /// ids: [batch, seq] u32 → [batch, seq, hidden] (one segment: type id 0 everywhere).
    fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (_, seq) = ids.dims2()?;
        let positions = Tensor::arange(0u32, seq as u32, ids.device())?;
        let words = self.word_embeddings.forward(ids)?;
        let positions = self.position_embeddings.forward(&positions)?.unsqueeze(0)?;
        let segment = self
            .token_type_embeddings
            .forward(&Tensor::zeros(1, DType::U32, ids.device())?)?
            .unsqueeze(0)?;
        self.layer_norm
            .forward(&words.broadcast_add(&positions)?.broadcast_add(&segment)?)
    }
}

#[derive(Debug)]
struct SelfAttention {
    query: Linear,
    key: Linear,
    value: Linear,
    output: Linear,
    output_norm: LayerNorm,
    heads: usize,
    head_dim: usize,
}

impl SelfAttention {
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        let own = vb.pp("self");
        let out = vb.pp("output");
        Ok(Self {
            query: linear(h, h, own.pp("query"))?,
            key: linear(h, h, own.pp("key"))?,
            value: linear(h, h, own.pp("value"))?,
            output: linear(h, h, out.pp("dense"))?,
            output_norm: layer_norm(h, cfg.layer_norm_eps, out.pp("LayerNorm"))?,
            heads: cfg.num_attention_heads,
            head_dim: h / cfg.num_attention_heads,
        })
    }

    /// xs: [batch, seq, hidden]; mask: [batch, 1, 1, seq] additive (0 or a large negative).
    fn forward(&self, xs: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, t, hidden) = xs.dims3()?;
        let split = |x: Tensor| -> Result<Tensor> {
            // [b, t, hidden] → [b, heads, t, head_dim]
            x.reshape((b, t, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(self.query.forward(xs)?)?;
        let k = split(self.key.forward(xs)?)?;
        let v = split(self.value.forward(xs)?)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        // [b, heads, t, t]
        let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(mask)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        // [b, heads, t, head_dim] → [b, t, hidden]
        let context = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, hidden))?;
        self.output_norm
            .forward(&(self.output.forward(&context)? + xs)?)
    }
}

#[derive(Debug)]
struct EncoderLayer {
    attention: SelfAttention,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
    tanh_gelu: bool,
}

impl EncoderLayer {
    fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        let out = vb.pp("output");
        Ok(Self {
            attention: SelfAttention::new(cfg, vb.pp("attention"))?,
            intermediate: linear(
                cfg.hidden_size,
                cfg.intermediate_size,
                vb.pp("intermediate").pp("dense"),
            )?,
            output: linear(cfg.intermediate_size, cfg.hidden_size, out.pp("dense"))?,
            output_norm: layer_norm(cfg.hidden_size, cfg.layer_norm_eps, out.pp("LayerNorm"))?,
            tanh_gelu: cfg.hidden_act != "gelu",
        })
    }

    fn forward(&self, xs: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let xs = self.attention.forward(xs, mask)?;
        let inner = self.intermediate.forward(&xs)?;
        // HF's "gelu" is the exact (erf) one; "gelu_new"/"gelu_pytorch_tanh" the tanh form.
        let inner = if self.tanh_gelu {
            inner.gelu()?
        } else {
            inner.gelu_erf()?
        };
        self.output_norm
            .forward(&(self.output.forward(&inner)? + xs)?)
    }
}

/// The encoder without the pooler head (sentence embedders pool the token states).
#[derive(Debug)]
pub struct BertModel {
    embeddings: Embeddings,
    layers: Vec<EncoderLayer>,
    pub config: Config,
}

impl BertModel {
    /// Weights may sit at the root (`embeddings.…`) or under `bert.` (a `BertFor…` checkpoint).
    pub fn new(cfg: &Config, vb: VarBuilder) -> Result<Self> {
        if let Some(reason) = cfg.unsupported_reason() {
            candle_core::bail!("{reason}");
        }
        let vb = if vb.contains_tensor("embeddings.word_embeddings.weight") {
            vb
        } else {
            vb.pp("bert")
        };
        let encoder = vb.pp("encoder").pp("layer");
        Ok(Self {
            embeddings: Embeddings::new(cfg, vb.pp("embeddings"))?,
            layers: (0..cfg.num_hidden_layers)
                .map(|i| EncoderLayer::new(cfg, encoder.pp(i)))
                .collect::<Result<_>>()?,
            config: cfg.clone(),
        })
    }

    /// ids: [batch, seq] u32; mask: [batch, seq] (1 for tokens, 0 for padding) →
    /// [batch, seq, hidden], the last layer's token states.
    pub fn forward(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        // 0 where attended, -1e9 at padding: [batch, 1, 1, seq]
        let additive = ((mask.to_dtype(DType::F32)? - 1.0)? * 1e9)?.reshape((b, 1, 1, t))?;
        let mut xs = self.embeddings.forward(ids)?;
        for layer in &self.layers {
            xs = layer.forward(&xs, &additive)?;
        }
        Ok(xs)
    }

    pub fn device(&self) -> &Device {
        self.embeddings.word_embeddings.embeddings().device()
    }
}

/// Mean of the token states where `mask` is 1: [batch, seq, hidden] → [batch, hidden].
pub fn mean_pool(states: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let mask = mask.to_dtype(states.dtype())?.unsqueeze(D::Minus1)?;
    let summed = states.broadcast_mul(&mask)?.sum(1)?;
    let counts = mask.sum(1)?.clamp(1e-9, f64::MAX)?;
    summed.broadcast_div(&counts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::VarMap;

    fn tiny() -> Config {
        Config {
            vocab_size: 50,
            hidden_size: 16,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            intermediate_size: 32,
            hidden_act: "gelu".into(),
            max_position_embeddings: 32,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            position_embedding_type: "absolute".into(),
        }
    }

    #[test]
    fn padding_changes_nothing_for_the_real_tokens() -> Result<()> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let model = BertModel::new(&tiny(), vb)?;
        let alone = Tensor::new(&[[3u32, 7, 9]], &Device::Cpu)?;
        let padded = Tensor::new(&[[3u32, 7, 9, 0, 0], [4, 5, 6, 7, 8]], &Device::Cpu)?;
        let mask = Tensor::new(&[[1u32, 1, 1, 0, 0], [1, 1, 1, 1, 1]], &Device::Cpu)?;
        let a = model.forward(&alone, &Tensor::ones((1, 3), DType::U32, &Device::Cpu)?)?;
        let p = model.forward(&padded, &mask)?;
        let diff = (a.squeeze(0)? - p.get(0)?.narrow(0, 0, 3)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{diff}");
        let pooled = mean_pool(&p, &mask)?;
        let expected = a.squeeze(0)?.mean(0)?;
        let diff = (pooled.get(0)? - expected)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{diff}");
        Ok(())
    }

    #[test]
    fn unsupported_checkpoints_are_named() {
        let mut cfg = tiny();
        cfg.position_embedding_type = "relative_key".into();
        assert!(cfg.unsupported_reason().unwrap().contains("relative_key"));
    }
}
