//! LoRA training on the CPU without candle's autograd: a hand-written forward and backward
//! pass of the llama-style decoder (llama, qwen2) in f32, straight into preallocated buffers.
//!
//! Candle's graph costs a tensor (an allocation, a single-threaded elementwise kernel, a copy
//! for every strided view) per operation and keeps every intermediate alive until the
//! backward pass; on two cores that overhead was worth more than the matrix products. Here a
//! layer keeps only what its backward needs (its input, the normed inputs, q/k/v, the
//! attention output and each row's log-sum-exp, gate and up, the LoRA `x·Aᵀ` products), the
//! attention probabilities are recomputed block by block, and every product is one gemm call
//! that accumulates into its destination.
//!
//! The gradients are the same as the candle path's (`train/tests/gradients.rs` checks the two
//! against each other); the path is used where [`unsupported_reason`] is `None`.

use std::cell::RefCell;

use candle_core::{bail, DType, Device, Result, Tensor, TensorId};
use rayon::prelude::*;

use crate::cpu_train_kernels::{self as k, AttentionDims, MatOut, MatRef};
use crate::cpu_train_weights::{frozen_base, frozen_dense, BaseWeight, Held};
use crate::layers::{Embedding, Linear};
use crate::lora::{DropoutDraw, LoraLinear};
use crate::transformer::{CausalLm, DecoderLayer};

/// The scored tokens of a right-padded batch.
#[derive(Debug, Clone, Copy)]
pub struct ScoredBatch<'a> {
    /// (rows, len) token ids, row-major.
    pub ids: &'a [u32],
    pub rows: usize,
    pub len: usize,
    /// Packed rows: for every token (rows, len) the column where its document starts in its
    /// row. A token then attends only to its own document's earlier tokens, and its rotary
    /// position counts from that start. `None`: one document per row.
    pub doc_starts: Option<&'a [u32]>,
    /// Flat positions (`row · len + column`) whose next token is scored…
    pub positions: &'a [u32],
    /// …and that token.
    pub targets: &'a [u32],
}

/// The summed loss over the scored tokens and the gradients of `loss_sum / total_targets`.
#[derive(Debug)]
pub struct LossAndGrads {
    pub loss_sum: f64,
    /// Keyed by the LoRA tensor (`LoraLinear::a` / `b`) they belong to.
    pub grads: Vec<(TensorId, Tensor)>,
}

/// `None` when this path covers `lm` as it is set up for training, else why not (the caller
/// then uses candle's autograd). `MEDCODER_TRAIN_KERNELS=candle` turns the path off.
pub fn unsupported_reason(lm: &CausalLm) -> Option<String> {
    if std::env::var("MEDCODER_TRAIN_KERNELS").is_ok_and(|v| v == "candle") {
        return Some("MEDCODER_TRAIN_KERNELS=candle".into());
    }
    if !lm.device.is_cpu() || lm.dtype != DType::F32 {
        return Some("not an f32 model on the CPU".into());
    }
    let spec = &lm.spec;
    if spec.qk_norm || spec.sandwich_norms || spec.final_logit_softcapping.is_some() {
        return Some("q/k norms, sandwich norms or logit soft-capping".into());
    }
    if spec.sliding_windows.iter().any(Option::is_some) {
        return Some("sliding-window attention".into());
    }
    if matches!(&lm.embed_tokens, Embedding::Dense(t) if t.is_variable())
        || lm.norm.weight().is_variable()
        || !frozen_dense(&lm.lm_head)
    {
        return Some("trainable embeddings, norms or LM head (full fine-tuning)".into());
    }
    for layer in &lm.layers {
        let a = &layer.self_attn;
        if a.num_kv_heads == 0 || a.num_heads % a.num_kv_heads != 0 {
            return Some("query heads not a multiple of kv heads".into());
        }
        if layer.input_layernorm.weight().is_variable() || layer.pre_mlp_norm.weight().is_variable()
        {
            return Some("trainable norms".into());
        }
        for linear in layer.linears() {
            let covered = match linear {
                Linear::Lora(lora) => {
                    frozen_base(&lora.base)
                        && lora.a.dtype() == DType::F32
                        && lora.b.dtype() == DType::F32
                }
                other => frozen_base(other),
            };
            if !covered {
                return Some("a trainable base layer (full fine-tuning)".into());
            }
        }
    }
    None
}

/// What one LoRA update kept for its backward pass.
struct LoraSaved {
    /// dropout(x)·Aᵀ: (tokens, r)
    u: Vec<f32>,
    draw: Option<DropoutDraw>,
}

/// A covered layer's frozen base, its (out, in) and its LoRA update.
fn base_parts(linear: &Linear) -> Result<(&Linear, (usize, usize), Option<&LoraLinear>)> {
    let (base, lora) = match linear {
        Linear::Lora(lora) => (&lora.base, Some(lora.as_ref())),
        other => (other, None),
    };
    Ok((base, base.shape()?, lora))
}

/// `y = x·Wᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ` into `y` (tokens, out).
fn linear_forward(
    linear: &Linear,
    scratch: &RefCell<Vec<f32>>,
    x: &[f32],
    tokens: usize,
    replay: Option<Option<DropoutDraw>>,
    y: &mut [f32],
) -> Result<Option<LoraSaved>> {
    let (base, (out, inp), lora) = base_parts(linear)?;
    let w = BaseWeight::new(base, scratch)?;
    k::matmul(
        MatOut::new(y, tokens, out),
        MatRef::new(x, tokens, inp),
        MatRef::new(w.get()?, out, inp).t(),
        1.0,
        false,
        k::threads(),
    );
    drop(w);
    if let Some(bias) = base.bias() {
        let bias = bias.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        y.par_chunks_mut(out).for_each(|row| {
            row.iter_mut().zip(&bias).for_each(|(y, b)| *y += b);
        });
    }
    let Some(lora) = lora else { return Ok(None) };
    let draw = match replay {
        Some(draw) => draw,
        None => lora.dropout.as_ref().and_then(|d| d.draw()),
    };
    let r = lora.rank();
    let (a, b) = (Held::new(&lora.a)?, Held::new(&lora.b)?);
    let dropped = draw.map(|draw| masked(x, &draw.mask(x.len())));
    let xd = dropped.as_deref().unwrap_or(x);
    let mut u = vec![0f32; tokens * r];
    k::matmul(
        MatOut::new(&mut u, tokens, r),
        MatRef::new(xd, tokens, inp),
        MatRef::new(a.get()?, r, inp).t(),
        1.0,
        false,
        k::threads(),
    );
    k::matmul(
        MatOut::new(y, tokens, out),
        MatRef::new(&u, tokens, r),
        MatRef::new(b.get()?, out, r).t(),
        lora.scale as f32,
        true,
        k::threads(),
    );
    Ok(Some(LoraSaved { u, draw }))
}

fn masked(x: &[f32], mask: &[f32]) -> Vec<f32> {
    x.par_iter().zip(mask).map(|(x, m)| x * m).collect()
}

/// The backward of [`linear_forward`]: `dx (=|+=) dy·W + dropout'(s·dy·B·A)` and the LoRA
/// gradients `dB = s·dyᵀ·U`, `dA = (s·dy·B)ᵀ·dropout(x)`, pushed to `grads`.
#[allow(clippy::too_many_arguments)]
fn linear_backward(
    linear: &Linear,
    scratch: &RefCell<Vec<f32>>,
    x: &[f32],
    saved: Option<&LoraSaved>,
    tokens: usize,
    dy: &[f32],
    dx: &mut [f32],
    accumulate: bool,
    grads: &mut Vec<(TensorId, Tensor)>,
) -> Result<()> {
    let (base, (out, inp), lora) = base_parts(linear)?;
    let w = BaseWeight::new(base, scratch)?;
    k::matmul(
        MatOut::new(dx, tokens, inp),
        MatRef::new(dy, tokens, out),
        MatRef::new(w.get()?, out, inp),
        1.0,
        accumulate,
        k::threads(),
    );
    drop(w);
    let (Some(lora), Some(saved)) = (lora, saved) else {
        return Ok(());
    };
    lora_backward(lora, x, saved, tokens, (out, inp), dy, dx, grads)
}

#[allow(clippy::too_many_arguments)]
fn lora_backward(
    lora: &LoraLinear,
    x: &[f32],
    saved: &LoraSaved,
    tokens: usize,
    (out, inp): (usize, usize),
    dy: &[f32],
    dx: &mut [f32],
    grads: &mut Vec<(TensorId, Tensor)>,
) -> Result<()> {
    let r = lora.rank();
    let s = lora.scale as f32;
    let (a, b) = (Held::new(&lora.a)?, Held::new(&lora.b)?);
    let (dy_m, u) = (
        MatRef::new(dy, tokens, out),
        MatRef::new(&saved.u, tokens, r),
    );
    let mut db = vec![0f32; out * r];
    k::matmul(
        MatOut::new(&mut db, out, r),
        dy_m.t(),
        u,
        s,
        false,
        k::threads(),
    );
    let mut du = vec![0f32; tokens * r];
    k::matmul(
        MatOut::new(&mut du, tokens, r),
        dy_m,
        MatRef::new(b.get()?, out, r),
        s,
        false,
        k::threads(),
    );
    let mask = saved.draw.map(|draw| draw.mask(x.len()));
    let dropped = mask.as_deref().map(|m| masked(x, m));
    let mut da = vec![0f32; r * inp];
    k::matmul(
        MatOut::new(&mut da, r, inp),
        MatRef::new(&du, tokens, r).t(),
        MatRef::new(dropped.as_deref().unwrap_or(x), tokens, inp),
        1.0,
        false,
        k::threads(),
    );
    let a_m = MatRef::new(a.get()?, r, inp);
    match &mask {
        None => k::matmul(
            MatOut::new(dx, tokens, inp),
            MatRef::new(&du, tokens, r),
            a_m,
            1.0,
            true,
            k::threads(),
        ),
        Some(mask) => {
            let mut through = vec![0f32; tokens * inp];
            k::matmul(
                MatOut::new(&mut through, tokens, inp),
                MatRef::new(&du, tokens, r),
                a_m,
                1.0,
                false,
                k::threads(),
            );
            dx.par_iter_mut()
                .zip(through.par_iter().zip(mask))
                .for_each(|(dx, (t, m))| *dx += t * m);
        }
    }
    grads.push((lora.a.id(), Tensor::from_vec(da, (r, inp), &Device::Cpu)?));
    grads.push((lora.b.id(), Tensor::from_vec(db, (out, r), &Device::Cpu)?));
    Ok(())
}

/// What a layer's forward pass kept for its backward pass.
struct LayerSaved {
    x: Vec<f32>,
    rstd1: Vec<f32>,
    n1: Vec<f32>,
    /// q and k after RoPE.
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    lse: Vec<f32>,
    attn: Vec<f32>,
    h2: Vec<f32>,
    rstd2: Vec<f32>,
    n2: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    lora: [Option<LoraSaved>; 7],
}

impl LayerSaved {
    fn draws(&self) -> [Option<DropoutDraw>; 7] {
        std::array::from_fn(|i| self.lora[i].as_ref().and_then(|l| l.draw))
    }
}

/// Shapes and tables every layer of one pass shares.
struct Pass<'a> {
    rows: usize,
    seq: usize,
    cos: &'a [f32],
    sin: &'a [f32],
    /// Each token's rotary position (rows·seq).
    positions: Vec<u32>,
    doc_starts: Option<&'a [u32]>,
    /// Where quantized base weights are dequantized, one at a time.
    scratch: RefCell<Vec<f32>>,
}

impl Pass<'_> {
    fn tokens(&self) -> usize {
        self.rows * self.seq
    }
}

fn layer_forward(
    layer: &DecoderLayer,
    pass: &Pass,
    x: Vec<f32>,
    replay: Option<[Option<DropoutDraw>; 7]>,
) -> Result<(Vec<f32>, LayerSaved)> {
    let t = pass.tokens();
    let attn_layer = &layer.self_attn;
    let (heads, kv_heads, d) = (
        attn_layer.num_heads,
        attn_layer.num_kv_heads,
        attn_layer.head_dim,
    );
    let hidden = x.len() / t;
    let linears = layer.linears();
    let mut lora: [Option<LoraSaved>; 7] = Default::default();
    let mut run = |i: usize, input: &[f32], width: usize| -> Result<Vec<f32>> {
        let mut y = vec![0f32; t * width];
        lora[i] = linear_forward(
            linears[i],
            &pass.scratch,
            input,
            t,
            replay.map(|r| r[i]),
            &mut y,
        )?;
        Ok(y)
    };
    let norm1 = &layer.input_layernorm;
    let w1 = norm1.weight().to_vec1::<f32>()?;
    let mut n1 = vec![0f32; x.len()];
    let rstd1 = k::rms_norm(&x, &w1, norm1.eps() as f32, &mut n1);
    let mut q = run(0, &n1, heads * d)?;
    let mut kk = run(1, &n1, kv_heads * d)?;
    let v = run(2, &n1, kv_heads * d)?;
    let positions = &pass.positions;
    k::rope(&mut q, heads * d, d, positions, pass.cos, pass.sin, false);
    k::rope(
        &mut kk,
        kv_heads * d,
        d,
        positions,
        pass.cos,
        pass.sin,
        false,
    );
    let dims = attention_dims(layer, pass);
    let mut attn = vec![0f32; t * heads * d];
    let lse = k::attention(dims, pass.doc_starts, &q, &kk, &v, &mut attn);
    let mut h2 = run(3, &attn, hidden)?;
    h2.par_iter_mut().zip(&x).for_each(|(h, x)| *h += x);
    let norm2 = &layer.pre_mlp_norm;
    let w2 = norm2.weight().to_vec1::<f32>()?;
    let mut n2 = vec![0f32; x.len()];
    let rstd2 = k::rms_norm(&h2, &w2, norm2.eps() as f32, &mut n2);
    let inter = layer.mlp.gate_proj.shape()?.0;
    let gate = run(4, &n2, inter)?;
    let up = run(5, &n2, inter)?;
    let mut m = vec![0f32; t * inter];
    k::gated(layer.mlp.activation, &gate, &up, &mut m);
    let mut out = run(6, &m, hidden)?;
    out.par_iter_mut().zip(&h2).for_each(|(o, h)| *o += h);
    Ok((
        out,
        LayerSaved {
            x,
            rstd1,
            n1,
            q,
            k: kk,
            v,
            lse,
            attn,
            h2,
            rstd2,
            n2,
            gate,
            up,
            lora,
        },
    ))
}

fn attention_dims(layer: &DecoderLayer, pass: &Pass) -> AttentionDims {
    let a = &layer.self_attn;
    AttentionDims {
        rows: pass.rows,
        seq: pass.seq,
        heads: a.num_heads,
        kv_heads: a.num_kv_heads,
        head_dim: a.head_dim,
        scale: a.scale as f32,
    }
}

/// `d_out` (the gradient on the layer's output) → the gradient on its input.
fn layer_backward(
    layer: &DecoderLayer,
    pass: &Pass,
    s: &LayerSaved,
    d_out: Vec<f32>,
    grads: &mut Vec<(TensorId, Tensor)>,
) -> Result<Vec<f32>> {
    let t = pass.tokens();
    let linears = layer.linears();
    let dims = attention_dims(layer, pass);
    let (heads, kv_heads, d) = (dims.heads, dims.kv_heads, dims.head_dim);
    let hidden = s.x.len() / t;
    let inter = s.gate.len() / t;
    let act = layer.mlp.activation;
    // MLP: out = h2 + down(act(gate)∘up)
    let mut m = vec![0f32; t * inter];
    k::gated(act, &s.gate, &s.up, &mut m);
    let mut dm = vec![0f32; t * inter];
    linear_backward(
        linears[6],
        &pass.scratch,
        &m,
        s.lora[6].as_ref(),
        t,
        &d_out,
        &mut dm,
        false,
        grads,
    )?;
    drop(m);
    let mut d_up = vec![0f32; t * inter];
    k::gated_backward(act, &s.gate, &s.up, &mut dm, &mut d_up);
    let mut dn2 = vec![0f32; t * hidden];
    linear_backward(
        linears[4],
        &pass.scratch,
        &s.n2,
        s.lora[4].as_ref(),
        t,
        &dm,
        &mut dn2,
        false,
        grads,
    )?;
    linear_backward(
        linears[5],
        &pass.scratch,
        &s.n2,
        s.lora[5].as_ref(),
        t,
        &d_up,
        &mut dn2,
        true,
        grads,
    )?;
    drop((dm, d_up));
    let mut dh2 = d_out;
    let w2 = layer.pre_mlp_norm.weight().to_vec1::<f32>()?;
    k::rms_norm_backward(&s.h2, &s.rstd2, &w2, &dn2, &mut dh2);
    // Attention: h2 = x + o(attention(rope(q(n1)), rope(k(n1)), v(n1)))
    let mut d_attn = vec![0f32; t * heads * d];
    linear_backward(
        linears[3],
        &pass.scratch,
        &s.attn,
        s.lora[3].as_ref(),
        t,
        &dh2,
        &mut d_attn,
        false,
        grads,
    )?;
    let mut dq = vec![0f32; t * heads * d];
    let mut dk = vec![0f32; t * kv_heads * d];
    let mut dv = vec![0f32; t * kv_heads * d];
    k::attention_backward(
        dims,
        pass.doc_starts,
        &s.q,
        &s.k,
        &s.v,
        &s.attn,
        &s.lse,
        &d_attn,
        &mut dq,
        &mut dk,
        &mut dv,
    );
    drop(d_attn);
    let positions = &pass.positions;
    k::rope(&mut dq, heads * d, d, positions, pass.cos, pass.sin, true);
    k::rope(
        &mut dk,
        kv_heads * d,
        d,
        positions,
        pass.cos,
        pass.sin,
        true,
    );
    let mut dn1 = vec![0f32; t * hidden];
    linear_backward(
        linears[0],
        &pass.scratch,
        &s.n1,
        s.lora[0].as_ref(),
        t,
        &dq,
        &mut dn1,
        false,
        grads,
    )?;
    linear_backward(
        linears[1],
        &pass.scratch,
        &s.n1,
        s.lora[1].as_ref(),
        t,
        &dk,
        &mut dn1,
        true,
        grads,
    )?;
    linear_backward(
        linears[2],
        &pass.scratch,
        &s.n1,
        s.lora[2].as_ref(),
        t,
        &dv,
        &mut dn1,
        true,
        grads,
    )?;
    let mut dx = dh2;
    let w1 = layer.input_layernorm.weight().to_vec1::<f32>()?;
    k::rms_norm_backward(&s.x, &s.rstd1, &w1, &dn1, &mut dx);
    Ok(dx)
}

/// Logits rows per LM-head chunk: about 64 MB of logits at a time.
const LOGITS_CHUNK_ELEMENTS: usize = 16 << 20;

/// Cross-entropy of the scored rows of `hidden` (tokens, h) through the LM head: the summed
/// loss, and `d_hidden += ∂(loss / total)/∂hidden`.
fn lm_head_loss(
    lm: &CausalLm,
    batch: &ScoredBatch,
    hidden: &[f32],
    total: f64,
    d_hidden: &mut [f32],
) -> Result<f64> {
    let Linear::Dense { weight, .. } = &lm.lm_head else {
        bail!("CPU training path: the LM head is not dense")
    };
    let (vocab, h) = weight.dims2()?;
    let w = Held::new(weight)?;
    let e = MatRef::new(w.get()?, vocab, h);
    let per = (LOGITS_CHUNK_ELEMENTS / vocab).max(1);
    let mut loss = 0f64;
    let inv_total = (1.0 / total) as f32;
    for (positions, targets) in batch.positions.chunks(per).zip(batch.targets.chunks(per)) {
        let c = positions.len();
        let mut rows = vec![0f32; c * h];
        for (row, &p) in rows.chunks_mut(h).zip(positions) {
            let p = p as usize;
            row.copy_from_slice(&hidden[p * h..(p + 1) * h]);
        }
        let mut logits = vec![0f32; c * vocab];
        k::matmul(
            MatOut::new(&mut logits, c, vocab),
            MatRef::new(&rows, c, h),
            e.t(),
            1.0,
            false,
            k::threads(),
        );
        // logits → (softmax − onehot) / total, in place
        loss += logits
            .par_chunks_mut(vocab)
            .zip(targets)
            .map(|(row, &target)| {
                let target = target as usize;
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let picked = row[target] - max;
                let mut sum = 0f32;
                row.iter_mut().for_each(|v| {
                    *v = (*v - max).exp();
                    sum += *v;
                });
                let norm = inv_total / sum;
                row.iter_mut().for_each(|v| *v *= norm);
                row[target] -= inv_total;
                f64::from(sum.ln() - picked)
            })
            .sum::<f64>();
        k::matmul(
            MatOut::new(&mut rows, c, h),
            MatRef::new(&logits, c, vocab),
            e,
            1.0,
            false,
            k::threads(),
        );
        for (row, &p) in rows.chunks(h).zip(positions) {
            let p = p as usize;
            d_hidden[p * h..(p + 1) * h]
                .iter_mut()
                .zip(row)
                .for_each(|(d, g)| *d += g);
        }
    }
    Ok(loss)
}

/// Each token's rotary position: its column, or (packed rows) its distance from its
/// document's start.
fn token_positions(rows: usize, seq: usize, doc_starts: Option<&[u32]>) -> Result<Vec<u32>> {
    let columns = (0..rows * seq).map(|t| (t % seq) as u32);
    let Some(starts) = doc_starts else {
        return Ok(columns.collect());
    };
    if starts.len() != rows * seq {
        bail!(
            "CPU training path: document starts for {} tokens, the batch has {}",
            starts.len(),
            rows * seq
        )
    }
    columns
        .zip(starts)
        .map(|(column, &start)| match column.checked_sub(start) {
            Some(position) => Ok(position),
            None => bail!("CPU training path: a document starting after one of its tokens"),
        })
        .collect()
}

/// The summed loss of `batch` and the LoRA gradients of `loss_sum / total_targets`.
/// With `checkpointing` a layer's activations are recomputed in the backward pass from its
/// input (one extra forward pass; memory of one layer instead of all).
pub fn loss_and_grads(
    lm: &CausalLm,
    batch: &ScoredBatch,
    total_targets: f64,
    checkpointing: bool,
) -> Result<LossAndGrads> {
    if let Some(why) = unsupported_reason(lm) {
        bail!("CPU training path: {why}")
    }
    let (rows, seq) = (batch.rows, batch.len);
    if batch.ids.len() != rows * seq || batch.positions.len() != batch.targets.len() {
        bail!("CPU training path: batch shapes do not agree")
    }
    let (cos, sin) = lm.rotary.tables();
    if seq > cos.dim(0)? {
        bail!("CPU training path: {seq} tokens is past the model's rotary table")
    }
    let (cos, sin) = (Held::new(cos)?, Held::new(sin)?);
    let pass = Pass {
        rows,
        seq,
        cos: cos.get()?,
        sin: sin.get()?,
        positions: token_positions(rows, seq, batch.doc_starts)?,
        doc_starts: batch.doc_starts,
        scratch: RefCell::new(Vec::new()),
    };
    let ids = Tensor::from_slice(batch.ids, (rows, seq), &lm.device)?;
    let mut x = lm.embed(&ids)?.flatten_all()?.to_vec1::<f32>()?;
    // Checkpointing keeps each layer's input and dropout draws; otherwise everything.
    let mut saved = Vec::with_capacity(lm.layers.len());
    let mut inputs = Vec::with_capacity(lm.layers.len());
    for layer in &lm.layers {
        if checkpointing {
            let input = x.clone();
            let (out, s) = layer_forward(layer, &pass, x, None)?;
            inputs.push((input, s.draws()));
            x = out;
        } else {
            let (out, s) = layer_forward(layer, &pass, x, None)?;
            saved.push(s);
            x = out;
        }
    }
    let wf = lm.norm.weight().to_vec1::<f32>()?;
    let mut hidden = vec![0f32; x.len()];
    let rstd = k::rms_norm(&x, &wf, lm.norm.eps() as f32, &mut hidden);
    let mut d_hidden = vec![0f32; x.len()];
    let loss_sum = lm_head_loss(lm, batch, &hidden, total_targets, &mut d_hidden)?;
    drop(hidden);
    let mut dx = vec![0f32; x.len()];
    k::rms_norm_backward(&x, &rstd, &wf, &d_hidden, &mut dx);
    drop((x, d_hidden));
    let mut grads = Vec::new();
    for (i, layer) in lm.layers.iter().enumerate().rev() {
        let s = match saved.pop() {
            Some(s) => s,
            None => {
                let (input, draws) = std::mem::take(&mut inputs[i]);
                layer_forward(layer, &pass, input, Some(draws))?.1
            }
        };
        dx = layer_backward(layer, &pass, &s, dx, &mut grads)?;
    }
    Ok(LossAndGrads { loss_sum, grads })
}
