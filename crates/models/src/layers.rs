//! Pieces every model family shares, written once: linear layers (dense or quantized),
//! RMSNorm, rotary embeddings, a gated MLP and attention masks.
//!
//! Each piece has a fast inference path (candle's fused kernels, which have no backward pass)
//! and a differentiable path built only from ops that do (matmul, narrow, cat, exp, sum…),
//! chosen by [`Mode`].

use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Module, Result, Tensor, D};

use crate::frozen::{apply_flattened, FrozenDenseMatMul, FrozenQuantizedMatMul};
use crate::lora::LoraLinear;
use crate::nf4::Nf4Tensor;
use crate::qmatmul_cpu::CpuQMatMul;

/// Which kernels a forward pass uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Fused kernels: fastest, but candle computes no gradient through them.
    #[default]
    Inference,
    /// Only ops with a backward pass, for training.
    Differentiable,
}

/// `y = x Wᵀ + b` with `W` kept dense (HF checkpoints, dequantized GGUF) or quantized (GGUF).
#[derive(Debug, Clone)]
pub enum Linear {
    Dense {
        /// (out, in)
        weight: Tensor,
        bias: Option<Tensor>,
    },
    Quantized {
        weight: Arc<QMatMul>,
        /// The quantized tensor behind `weight`, kept for export and dequantizing.
        source: Arc<QTensor>,
        /// Our CPU kernel for the block type, when there is one.
        cpu_kernel: Option<Arc<CpuQMatMul>>,
        bias: Option<Tensor>,
    },
    /// A frozen layer in NF4 (QLoRA's base format), dequantized on the fly.
    Nf4 {
        weight: Arc<Nf4Tensor>,
        bias: Option<Tensor>,
    },
    /// A frozen layer with a trainable low-rank update.
    Lora(Arc<LoraLinear>),
}

impl Linear {
    /// A quantized layer, run by our CPU kernels where they cover the block type (unless
    /// `MEDCODER_CANDLE_QMATMUL=1` asks for candle's, to compare) and by candle's elsewhere.
    pub fn quantized(source: Arc<QTensor>, bias: Option<Tensor>) -> Result<Self> {
        let use_candle = std::env::var("MEDCODER_CANDLE_QMATMUL").is_ok_and(|v| v == "1");
        let cpu_kernel = if use_candle {
            None
        } else {
            CpuQMatMul::new(source.clone()).map(Arc::new)
        };
        Ok(Self::Quantized {
            weight: Arc::new(QMatMul::from_arc(source.clone())?),
            source,
            cpu_kernel,
            bias,
        })
    }

    pub fn bias(&self) -> Option<&Tensor> {
        match self {
            Self::Dense { bias, .. } | Self::Quantized { bias, .. } | Self::Nf4 { bias, .. } => {
                bias.as_ref()
            }
            Self::Lora(lora) => lora.base.bias(),
        }
    }

    /// (out, in)
    pub fn shape(&self) -> Result<(usize, usize)> {
        match self {
            Self::Dense { weight, .. } => weight.dims2(),
            Self::Quantized { source, .. } => source.shape().dims2(),
            Self::Nf4 { weight, .. } => Ok(weight.dims()),
            Self::Lora(lora) => lora.base.shape(),
        }
    }

    /// The same layer with its weight dequantized to `dtype` (dense layers unchanged).
    pub fn dequantized(&self, dtype: DType, device: &Device) -> Result<Self> {
        Ok(match self {
            Self::Quantized { source, bias, .. } => Self::Dense {
                weight: source.dequantize(device)?.to_dtype(dtype)?,
                bias: bias.clone(),
            },
            Self::Nf4 { weight, bias } => Self::Dense {
                weight: weight.dequantize(device, dtype)?,
                bias: bias.clone(),
            },
            other => other.clone(),
        })
    }

    /// One layer computing several quantized layers of the same input at once (their rows
    /// stacked), so that q/k/v or gate/up cost one pass over the input instead of several.
    /// `None` unless all are quantized alike without biases on the CPU kernels.
    pub fn fused_quantized(parts: &[&Linear]) -> Result<Option<Linear>> {
        let mut sources = Vec::new();
        for part in parts {
            match part {
                Self::Quantized {
                    source,
                    cpu_kernel: Some(_),
                    bias: None,
                    ..
                } => sources.push(source.clone()),
                _ => return Ok(None),
            }
        }
        let Some(first) = sources.first() else {
            return Ok(None);
        };
        let (dtype, cols) = (first.dtype(), first.shape().dims2()?.1);
        let mut bytes = Vec::new();
        let mut rows = 0;
        for source in &sources {
            let (r, c) = source.shape().dims2()?;
            if source.dtype() != dtype || c != cols {
                return Ok(None);
            }
            bytes.extend_from_slice(&source.data()?);
            rows += r;
        }
        let storage = candle_core::quantized::QStorage::from_data(
            std::borrow::Cow::Owned(bytes),
            &first.device(),
            dtype,
        )?;
        let fused = Arc::new(QTensor::new(storage, (rows, cols))?);
        Ok(Some(Self::quantized(fused, None)?))
    }

    /// The weight as a dense tensor (dequantized, LoRA update merged, if need be): (out, in).
    pub fn dense_weight(&self, device: &Device) -> Result<Tensor> {
        match self {
            Self::Dense { weight, .. } => Ok(weight.clone()),
            Self::Quantized { source, .. } => source.dequantize(device),
            Self::Nf4 { weight, .. } => weight.dequantize(device, DType::F32),
            Self::Lora(lora) => lora.merged_weight(device),
        }
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let ys = match self {
            Self::Lora(lora) => return lora.forward(xs),
            Self::Nf4 { weight, .. } => crate::nf4::frozen_nf4_matmul(xs, weight)?,
            // Training through a frozen layer: the gradient goes to the input only.
            Self::Dense { weight, .. } if xs.track_op() && !weight.track_op() => apply_flattened(
                xs,
                FrozenDenseMatMul {
                    weight: weight.clone(),
                },
            )?,
            Self::Quantized {
                source, cpu_kernel, ..
            } if xs.track_op() => apply_flattened(
                xs,
                FrozenQuantizedMatMul {
                    source: source.clone(),
                    cpu_kernel: cpu_kernel.clone(),
                },
            )?,
            // (.., in) x (in, out): the transposed weight is a strided view, which gemm reads
            // without a copy.
            Self::Dense { weight, .. } => {
                xs.broadcast_matmul(&crate::autograd::maybe_detached(weight).t()?)?
            }
            Self::Quantized {
                cpu_kernel: Some(kernel),
                ..
            } if xs.dtype() == DType::F32 => xs.contiguous()?.apply_op1_no_bwd(kernel.as_ref())?,
            Self::Quantized { weight, .. } => weight.forward(xs)?,
        };
        match self.bias() {
            Some(bias) => ys.broadcast_add(bias),
            None => Ok(ys),
        }
    }
}

/// Root-mean-square norm over the last dimension. Gemma scales by `1 + w` where the others
/// scale by `w`: loaders fold that `1` into the stored weight, so one formula serves all.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn new(weight: Tensor, eps: f64) -> Self {
        Self { weight, eps }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn weight_mut(&mut self) -> &mut Tensor {
        &mut self.weight
    }

    pub fn eps(&self) -> f64 {
        self.eps
    }

    pub fn forward(&self, xs: &Tensor, mode: Mode) -> Result<Tensor> {
        match mode {
            Mode::Inference => candle_nn::ops::rms_norm(xs, &self.weight, self.eps as f32),
            // The fused kernel forward, a closed-form backward (`autograd`).
            Mode::Differentiable => crate::autograd::rms_norm(xs, &self.weight, self.eps),
        }
    }
}

/// How rotary frequencies are stretched for long contexts (`rope_scaling` in config.json).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor`.
    Linear {
        factor: f64,
    },
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

/// Precomputed cos/sin tables for rotary embeddings in HF's layout (rotate the two halves).
#[derive(Debug, Clone)]
pub struct Rotary {
    /// (max_positions, head_dim / 2)
    cos: Tensor,
    sin: Tensor,
}

impl Rotary {
    pub fn new(
        head_dim: usize,
        theta: f64,
        scaling: &RopeScaling,
        max_positions: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let inv_freq: Vec<f32> = (0..head_dim / 2)
            .map(|i| {
                let freq = 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64);
                scaled_frequency(freq, scaling) as f32
            })
            .collect();
        let inv_freq = Tensor::from_vec(inv_freq, (1, head_dim / 2), device)?;
        let positions = Tensor::arange(0u32, max_positions as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((max_positions, 1))?;
        let angles = positions.matmul(&inv_freq)?;
        Ok(Self {
            cos: angles.cos()?.to_dtype(dtype)?,
            sin: angles.sin()?.to_dtype(dtype)?,
        })
    }

    /// The (max_positions, head_dim / 2) cos and sin tables.
    pub(crate) fn tables(&self) -> (&Tensor, &Tensor) {
        (&self.cos, &self.sin)
    }

    pub fn max_positions(&self) -> usize {
        self.cos.dim(0).unwrap_or(0)
    }

    /// Rotate `xs` (b, heads, seq, head_dim) at `positions` (b, seq).
    pub fn apply(&self, xs: &Tensor, positions: &Positions, mode: Mode) -> Result<Tensor> {
        let (cos, sin) = match positions {
            Positions::Contiguous { start, len } => (
                self.cos.narrow(0, *start, *len)?,
                self.sin.narrow(0, *start, *len)?,
            ),
            Positions::PerRow(ids) => {
                // (b, seq) → (b, seq, head_dim / 2)
                let (b, s) = ids.dims2()?;
                let flat = ids.flatten_all()?;
                let half = self.cos.dim(1)?;
                (
                    self.cos.index_select(&flat, 0)?.reshape((b, s, half))?,
                    self.sin.index_select(&flat, 0)?.reshape((b, s, half))?,
                )
            }
        };
        match mode {
            Mode::Inference => candle_nn::rotary_emb::rope(&xs.contiguous()?, &cos, &sin),
            Mode::Differentiable => crate::autograd::rope(xs, &cos, &sin),
        }
    }
}

fn scaled_frequency(freq: f64, scaling: &RopeScaling) -> f64 {
    match *scaling {
        RopeScaling::None => freq,
        RopeScaling::Linear { factor } => freq / factor,
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let original = original_max_position_embeddings as f64;
            let low_freq_wavelen = original / low_freq_factor;
            let high_freq_wavelen = original / high_freq_factor;
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            if wavelen < high_freq_wavelen {
                freq
            } else if wavelen > low_freq_wavelen {
                freq / factor
            } else {
                let smooth =
                    (original / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                (1.0 - smooth) * freq / factor + smooth * freq
            }
        }
    }
}

/// `x * cos + rotate_half(x) * sin` from narrow/cat/mul, all differentiable (the reference
/// the fused op's gradients are checked against).
#[cfg(test)]
pub(crate) fn rope_differentiable(xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (_b, _h, seq, dim) = xs.dims4()?;
    let half = dim / 2;
    // cos/sin: (seq, half) or (b, seq, half) → broadcastable to (b, h, seq, dim)
    let widen = |t: &Tensor| -> Result<Tensor> {
        let full = Tensor::cat(&[t, t], D::Minus1)?;
        match full.rank() {
            2 => full.reshape((1, 1, seq, dim)),
            _ => full.unsqueeze(1),
        }
    };
    let (cos, sin) = (widen(cos)?, widen(sin)?);
    let x1 = xs.narrow(D::Minus1, 0, half)?;
    let x2 = xs.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    xs.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
}

/// The positions of the tokens in a forward pass.
#[derive(Debug, Clone)]
pub enum Positions {
    /// Every row at `start..start + len` (one sequence, or a batch without padding).
    Contiguous { start: usize, len: usize },
    /// Per-row positions (b, seq) as u32 (left-padded batches).
    PerRow(Tensor),
}

/// The MLP's activation (`hidden_act` / `hidden_activation` in config.json).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    GeluTanh,
}

impl Activation {
    pub fn from_hf(name: &str) -> Option<Self> {
        match name {
            "silu" | "swish" => Some(Self::Silu),
            "gelu_pytorch_tanh" | "gelu_new" | "gelu" => Some(Self::GeluTanh),
            _ => None,
        }
    }

    fn apply(self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Silu => candle_nn::ops::silu(xs),
            // tanh approximation, as `gelu_pytorch_tanh`
            Self::GeluTanh => xs.gelu(),
        }
    }
}

/// `down(act(gate(x)) * up(x))`.
#[derive(Debug, Clone)]
pub struct GatedMlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
    pub activation: Activation,
}

impl GatedMlp {
    /// gate and up as one quantized layer, for inference.
    pub fn fused_gate_up(&self) -> Result<Option<Linear>> {
        Linear::fused_quantized(&[&self.gate_proj, &self.up_proj])
    }

    /// With `gate_up` (from [`Self::fused_gate_up`]) the two projections run as one.
    pub fn forward_with(&self, xs: &Tensor, gate_up: Option<&Linear>) -> Result<Tensor> {
        // (b, seq, hidden) → (b, seq, intermediate) → (b, seq, hidden)
        let (gate, up) = match gate_up {
            Some(fused) => {
                let both = fused.forward(xs)?;
                let n = both.dim(candle_core::D::Minus1)? / 2;
                (both.narrow(D::Minus1, 0, n)?, both.narrow(D::Minus1, n, n)?)
            }
            None => (self.gate_proj.forward(xs)?, self.up_proj.forward(xs)?),
        };
        self.down_proj
            .forward(&(self.activation.apply(&gate)? * up)?)
    }
}

impl Module for GatedMlp {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_with(xs, None)
    }
}

/// Token embeddings, dense or quantized.
#[derive(Debug, Clone)]
pub enum Embedding {
    /// (vocab, hidden)
    Dense(Tensor),
    Quantized(Arc<QTensor>),
}

impl Embedding {
    /// ids (b, seq) → (b, seq, hidden)
    pub fn forward(&self, ids: &Tensor, dtype: DType) -> Result<Tensor> {
        match self {
            Self::Dense(table) => {
                let (b, s) = ids.dims2()?;
                let hidden = table.dim(1)?;
                crate::autograd::maybe_detached(table)
                    .index_select(&ids.flatten_all()?, 0)?
                    .reshape((b, s, hidden))?
                    .to_dtype(dtype)
            }
            Self::Quantized(table) => table.embedding(ids)?.to_dtype(dtype),
        }
    }

    /// The same weights as an output projection (tied embeddings).
    pub fn as_linear(&self) -> Result<Linear> {
        Ok(match self {
            Self::Dense(table) => Linear::Dense {
                weight: table.clone(),
                bias: None,
            },
            Self::Quantized(table) => Linear::quantized(table.clone(), None)?,
        })
    }
}

/// The additive attention mask (b or 1, 1, seq, kv_len): 0 where a query may look, -inf
/// elsewhere. `None` when every query may see every key (one new token, no window, no padding).
pub fn attention_mask(
    batch: usize,
    seq: usize,
    past: usize,
    sliding_window: Option<usize>,
    left_padding: Option<&[usize]>,
    dtype: DType,
    device: &Device,
) -> Result<Option<Tensor>> {
    let kv_len = past + seq;
    let window_bites = sliding_window.is_some_and(|w| kv_len > w);
    if seq == 1 && !window_bites && left_padding.is_none_or(|p| p.iter().all(|&n| n == 0)) {
        return Ok(None);
    }
    let rows = left_padding.map_or(1, |p| p.len().max(1));
    let mut mask = vec![0f32; rows * seq * kv_len];
    for row in 0..rows {
        let pad = left_padding.and_then(|p| p.get(row)).copied().unwrap_or(0);
        for i in 0..seq {
            let query = past + i;
            for key in 0..kv_len {
                // A padding position sees itself only: a row of -inf alone would make NaN
                // keys and values, which poison every later query through the cache (NaN
                // scores stay NaN under a -inf mask).
                let visible = if query < pad {
                    key == query
                } else {
                    key <= query && key >= pad && sliding_window.is_none_or(|w| query - key < w)
                };
                if !visible {
                    mask[(row * seq + i) * kv_len + key] = f32::NEG_INFINITY;
                }
            }
        }
    }
    let mask = Tensor::from_vec(mask, (rows, 1, seq, kv_len), device)?.to_dtype(dtype)?;
    if rows == 1 && batch > 1 {
        return Ok(Some(
            mask.broadcast_as((batch, 1, seq, kv_len))?.contiguous()?,
        ));
    }
    Ok(Some(mask))
}

/// The additive mask (b, 1, seq, seq) of packed rows: a query sees the keys from its
/// document's start to itself (and within `sliding_window`). `doc_starts` (b·seq, row-major):
/// the column where each token's document starts in its row.
pub fn packed_attention_mask(
    batch: usize,
    seq: usize,
    doc_starts: &[u32],
    sliding_window: Option<usize>,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    if doc_starts.len() != batch * seq {
        candle_core::bail!(
            "document starts for {} tokens, the batch has {}",
            doc_starts.len(),
            batch * seq
        )
    }
    let mut mask = vec![f32::NEG_INFINITY; batch * seq * seq];
    for (t, &start) in doc_starts.iter().enumerate() {
        let query = t % seq;
        let start = (start as usize).min(query);
        let first = sliding_window.map_or(start, |w| start.max((query + 1).saturating_sub(w)));
        mask[t * seq + first..=t * seq + query].fill(0.0);
    }
    Tensor::from_vec(mask, (batch, 1, seq, seq), device)?.to_dtype(dtype)
}

/// Each token's rotary position in packed rows (b, seq): its distance from its document's
/// start.
pub fn packed_positions(
    batch: usize,
    seq: usize,
    doc_starts: &[u32],
    device: &Device,
) -> Result<Positions> {
    let positions: Vec<u32> = doc_starts
        .iter()
        .enumerate()
        .map(|(t, &start)| ((t % seq) as u32).saturating_sub(start))
        .collect();
    Ok(Positions::PerRow(Tensor::from_vec(
        positions,
        (batch, seq),
        device,
    )?))
}

/// Softmax over the last dimension.
pub fn softmax_last_dim(xs: &Tensor, mode: Mode) -> Result<Tensor> {
    match mode {
        Mode::Inference => candle_nn::ops::softmax_last_dim(xs),
        Mode::Differentiable => candle_nn::ops::softmax(xs, D::Minus1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_differentiable_paths_match_the_fused_kernels() -> Result<()> {
        let device = Device::Cpu;
        let xs = Tensor::randn(0f32, 1.0, (2, 3, 5, 8), &device)?;
        let norm = RmsNorm::new(Tensor::randn(1f32, 0.1, 8, &device)?, 1e-6);
        let fast = norm.forward(&xs, Mode::Inference)?;
        let slow = norm.forward(&xs, Mode::Differentiable)?;
        assert!(max_abs_diff(&fast, &slow)? < 1e-5);

        let rotary = Rotary::new(8, 10_000.0, &RopeScaling::None, 32, DType::F32, &device)?;
        let positions = Positions::Contiguous { start: 4, len: 5 };
        let fast = rotary.apply(&xs, &positions, Mode::Inference)?;
        let slow = rotary.apply(&xs, &positions, Mode::Differentiable)?;
        assert!(max_abs_diff(&fast, &slow)? < 1e-5);

        let per_row = Positions::PerRow(Tensor::new(
            &[[4u32, 5, 6, 7, 8], [4, 5, 6, 7, 8]],
            &device,
        )?);
        let by_row = rotary.apply(&xs, &per_row, Mode::Inference)?;
        assert!(max_abs_diff(&fast, &by_row)? < 1e-6);

        let fast = softmax_last_dim(&xs, Mode::Inference)?;
        let slow = softmax_last_dim(&xs, Mode::Differentiable)?;
        assert!(max_abs_diff(&fast, &slow)? < 1e-6);
        Ok(())
    }

    #[test]
    fn masks_hide_the_future_the_padding_and_what_is_past_the_window() -> Result<()> {
        let device = Device::Cpu;
        assert!(attention_mask(1, 1, 7, None, None, DType::F32, &device)?.is_none());
        let mask = attention_mask(2, 3, 1, Some(2), Some(&[0, 1]), DType::F32, &device)?
            .ok_or_else(|| candle_core::Error::Msg("expected a mask".into()))?;
        let rows: Vec<Vec<Vec<f32>>> = mask.squeeze(1)?.to_vec3()?;
        let visible = |r: &Vec<f32>| -> Vec<usize> {
            r.iter()
                .enumerate()
                .filter(|(_, v)| v.is_finite())
                .map(|(i, _)| i)
                .collect()
        };
        // query positions 1, 2, 3; window 2: key in (q-2, q]
        assert_eq!(visible(&rows[0][0]), vec![0, 1]);
        assert_eq!(visible(&rows[0][2]), vec![2, 3]);
        // the second row's first position is padding
        assert_eq!(visible(&rows[1][0]), vec![1]);
        // Prefill of a left-padded row: each padding position sees only itself (never an
        // all -inf row, whose softmax is NaN), real positions never see padding.
        let mask = attention_mask(1, 4, 0, None, Some(&[2]), DType::F32, &device)?
            .ok_or_else(|| candle_core::Error::Msg("expected a mask".into()))?;
        let rows: Vec<Vec<Vec<f32>>> = mask.squeeze(1)?.to_vec3()?;
        let seen: Vec<Vec<usize>> = rows[0].iter().map(visible).collect();
        assert_eq!(seen, vec![vec![0], vec![1], vec![2], vec![2, 3]]);
        Ok(())
    }

    #[test]
    fn llama3_scaling_keeps_high_frequencies_and_divides_low_ones() {
        let scaling = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        assert_eq!(scaled_frequency(1.0, &scaling), 1.0);
        let low = 2.0 * std::f64::consts::PI / 100_000.0;
        assert!((scaled_frequency(low, &scaling) - low / 8.0).abs() < 1e-12);
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }
}
