//! The parameters of a [`CausalLm`] by HF name: its linear layers (to wrap with LoRA, merge
//! or quantize), every dense tensor (full fine-tuning, export), and dequantization.

use candle_core::{Result, Tensor};

use crate::layers::{Embedding, Linear};
use crate::transformer::CausalLm;

impl CausalLm {
    /// Visit every linear layer by its HF module name (`model.layers.0.self_attn.q_proj`, …,
    /// `lm_head`), in a fixed order; `f` returns whether it replaced the layer, in which case
    /// the fused inference copies of that block (stacked q/k/v, gate/up) are dropped so that
    /// inference runs the replaced layers.
    pub fn visit_linears_mut(
        &mut self,
        mut f: impl FnMut(&str, &mut Linear) -> Result<bool>,
    ) -> Result<()> {
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let prefix = format!("model.layers.{i}");
            let attn = &mut layer.self_attn;
            let mut changed = false;
            for (name, linear) in [
                ("q_proj", &mut attn.q_proj),
                ("k_proj", &mut attn.k_proj),
                ("v_proj", &mut attn.v_proj),
                ("o_proj", &mut attn.o_proj),
            ] {
                changed |= f(&format!("{prefix}.self_attn.{name}"), linear)?;
            }
            if changed {
                attn.qkv = None;
            }
            let mlp = &mut layer.mlp;
            let mut changed = false;
            for (name, linear) in [
                ("gate_proj", &mut mlp.gate_proj),
                ("up_proj", &mut mlp.up_proj),
                ("down_proj", &mut mlp.down_proj),
            ] {
                changed |= f(&format!("{prefix}.mlp.{name}"), linear)?;
            }
            if changed {
                layer.gate_up = None;
            }
        }
        f("lm_head", &mut self.lm_head)?;
        Ok(())
    }

    /// Every dense parameter by HF tensor name (`….weight`, `….bias`), for full fine-tuning:
    /// `f` may replace a tensor by a trainable one of the same shape. A tied LM head is
    /// visited under the embedding's name, so that one variable serves both. Fails on
    /// quantized weights (dequantize first).
    pub fn visit_parameters_mut(
        &mut self,
        mut f: impl FnMut(&str, &mut Tensor) -> Result<()>,
    ) -> Result<()> {
        match &mut self.embed_tokens {
            Embedding::Dense(table) => f("model.embed_tokens.weight", table)?,
            Embedding::Quantized(_) => {
                candle_core::bail!(
                    "full fine-tuning needs dense weights: the embeddings are quantized"
                )
            }
        }
        let tied = self.spec.tie_word_embeddings;
        let visit_linear = |name: &str,
                            linear: &mut Linear,
                            f: &mut dyn FnMut(&str, &mut Tensor) -> Result<()>|
         -> Result<()> {
            match linear {
                Linear::Dense { weight, bias } => {
                    f(&format!("{name}.weight"), weight)?;
                    if let Some(bias) = bias {
                        f(&format!("{name}.bias"), bias)?;
                    }
                    Ok(())
                }
                _ => candle_core::bail!(
                    "full fine-tuning needs dense weights: {name} is quantized or adapted"
                ),
            }
        };
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let prefix = format!("model.layers.{i}");
            let attn = &mut layer.self_attn;
            for (name, linear) in [
                ("q_proj", &mut attn.q_proj),
                ("k_proj", &mut attn.k_proj),
                ("v_proj", &mut attn.v_proj),
                ("o_proj", &mut attn.o_proj),
            ] {
                visit_linear(&format!("{prefix}.self_attn.{name}"), linear, &mut f)?;
            }
            attn.qkv = None;
            for (name, norm) in [("q_norm", &mut attn.q_norm), ("k_norm", &mut attn.k_norm)] {
                if let Some(norm) = norm {
                    f(
                        &format!("{prefix}.self_attn.{name}.weight"),
                        norm.weight_mut(),
                    )?;
                }
            }
            let mlp = &mut layer.mlp;
            for (name, linear) in [
                ("gate_proj", &mut mlp.gate_proj),
                ("up_proj", &mut mlp.up_proj),
                ("down_proj", &mut mlp.down_proj),
            ] {
                visit_linear(&format!("{prefix}.mlp.{name}"), linear, &mut f)?;
            }
            layer.gate_up = None;
            f(
                &format!("{prefix}.input_layernorm.weight"),
                layer.input_layernorm.weight_mut(),
            )?;
            let (pre_mlp, post_attn, post_ff) = if self.spec.sandwich_norms {
                (
                    "pre_feedforward_layernorm",
                    "post_attention_layernorm",
                    "post_feedforward_layernorm",
                )
            } else {
                ("post_attention_layernorm", "", "")
            };
            f(
                &format!("{prefix}.{pre_mlp}.weight"),
                layer.pre_mlp_norm.weight_mut(),
            )?;
            if let Some(norm) = &mut layer.post_attention_norm {
                f(&format!("{prefix}.{post_attn}.weight"), norm.weight_mut())?;
            }
            if let Some(norm) = &mut layer.post_feedforward_norm {
                f(&format!("{prefix}.{post_ff}.weight"), norm.weight_mut())?;
            }
        }
        f("model.norm.weight", self.norm.weight_mut())?;
        if tied {
            match &mut self.lm_head {
                Linear::Dense { weight, .. } => f("model.embed_tokens.weight", weight)?,
                _ => {
                    candle_core::bail!("full fine-tuning needs dense weights: lm_head is quantized")
                }
            }
        } else {
            visit_linear("lm_head", &mut self.lm_head, &mut f)?;
        }
        Ok(())
    }

    /// Dequantize every quantized weight to the model's dtype (QLoRA keeps them quantized;
    /// LoRA on a GGUF file and full fine-tuning need them dense).
    pub fn dequantize(&mut self) -> Result<()> {
        let (dtype, device) = (self.dtype, self.device.clone());
        // Quantized GGUF models run f32 activations on CPU; dense weights follow them.
        if let Embedding::Quantized(table) = &self.embed_tokens {
            self.embed_tokens = Embedding::Dense(table.dequantize(&device)?.to_dtype(dtype)?);
        }
        self.visit_linears_mut(|_, linear| {
            if matches!(linear, Linear::Quantized { .. } | Linear::Nf4 { .. }) {
                *linear = linear.dequantized(dtype, &device)?;
                return Ok(true);
            }
            Ok(false)
        })
    }
}
