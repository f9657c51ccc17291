//! Fused training ops with hand-written backward passes: attention, RMSNorm, RoPE and
//! cross-entropy. Candle's autograd would record every elementwise step of these (scores,
//! mask, max, exp, sum, divide…), allocate a gradient buffer for each and walk them one by
//! one; here the forward pass runs candle's fused inference kernels outside the graph and the
//! backward pass is a few large tensor ops, as Unsloth and FlashAttention do on GPUs.
//!
//! Mechanism: the result is computed first, without a graph; a custom op then hands that result
//! out as its own forward value (a copy) and records the closed-form backward.

use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CudaStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape,
    Storage, Tensor, D,
};

static NO_GRAD: AtomicUsize = AtomicUsize::new(0);

/// While the returned guard lives, trainable weights enter forward passes detached, so that
/// evaluation records no graph (and keeps no activations alive). Process-wide, as the forward
/// pass runs on the compute pool's threads.
pub fn no_grad() -> NoGradGuard {
    NO_GRAD.fetch_add(1, Ordering::SeqCst);
    NoGradGuard { _private: () }
}

/// Whether forward passes record gradients through trainable weights now.
pub fn grad_enabled() -> bool {
    NO_GRAD.load(Ordering::SeqCst) == 0
}

/// See [`no_grad`].
#[derive(Debug)]
pub struct NoGradGuard {
    _private: (),
}

impl Drop for NoGradGuard {
    fn drop(&mut self) {
        NO_GRAD.fetch_sub(1, Ordering::SeqCst);
    }
}

/// `t`, or `t` detached while gradients are off.
pub fn maybe_detached(t: &Tensor) -> Tensor {
    if grad_enabled() {
        t.clone()
    } else {
        t.detach()
    }
}

/// `out` itself when it is its storage's whole contiguous content (what a backend's
/// `try_clone` copies), else a compact copy.
fn whole(out: &Tensor) -> Result<Tensor> {
    let (start, contiguous) = {
        let (_, layout) = out.storage_and_layout();
        (layout.start_offset(), layout.is_contiguous())
    };
    if start == 0 && contiguous {
        // A fresh result of a kernel: its storage holds exactly its elements.
        Ok(out.clone())
    } else {
        out.copy()
    }
}

/// A copy of `out`'s data for a custom op's forward value.
pub(crate) fn cpu_copy(out: &Tensor) -> Result<(CpuStorage, Shape)> {
    let out = &whole(out)?;
    let (guard, layout) = out.storage_and_layout();
    match &*guard {
        Storage::Cpu(storage) => Ok((storage.try_clone(layout)?, out.shape().clone())),
        _ => bail!("fused op: the precomputed value is not on the CPU"),
    }
}

pub(crate) fn cuda_copy(out: &Tensor) -> Result<(CudaStorage, Shape)> {
    let out = &whole(out)?;
    let (guard, layout) = out.storage_and_layout();
    match &*guard {
        Storage::Cuda(storage) => Ok((storage.try_clone(layout)?, out.shape().clone())),
        _ => bail!("fused op: the precomputed value is not on the CUDA device"),
    }
}

/// Scaled dot-product attention with an additive mask and grouped kv heads:
/// q (b, h, s, d), k and v (b, kv, t, d) → (b, h, s, d). Keeps the probabilities for the
/// backward pass (one (b, h, s, t) tensor instead of candle's half-dozen).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let (b, h, s, d) = q.dims4()?;
    let (_, kv, t, _) = k.dims4()?;
    let group = h / kv;
    let (qd, kd, vd) = (
        q.detach(),
        k.detach().contiguous()?,
        v.detach().contiguous()?,
    );
    // (b, kv, g·s, d) × (b, kv, d, t) → (b, h, s, t)
    let qg = qd.contiguous()?.reshape((b, kv, group * s, d))?;
    let scores = (qg.matmul(&kd.t()?)? * scale)?.reshape((b, h, s, t))?;
    let scores = match mask {
        Some(mask) => scores.broadcast_add(mask)?,
        None => scores,
    };
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    let out = probs
        .reshape((b, kv, group * s, t))?
        .matmul(&vd)?
        .reshape((b, h, s, d))?;
    if !(q.track_op() || k.track_op() || v.track_op()) {
        return Ok(out);
    }
    q.apply_op3(
        k,
        v,
        AttentionOp {
            out,
            probs,
            q: qg,
            k: kd,
            v: vd,
            scale,
            dims: (b, h, kv, s, t, d),
        },
    )
}

struct AttentionOp {
    out: Tensor,
    /// (b, h, s, t)
    probs: Tensor,
    /// (b, kv, g·s, d)
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: f64,
    dims: (usize, usize, usize, usize, usize, usize),
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_copy(&self.out)
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        cuda_copy(&self.out)
    }

    fn bwd(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, h, kv, s, t, d) = self.dims;
        let group = h / kv;
        let go = grad.contiguous()?.reshape((b, kv, group * s, d))?;
        let p = self.probs.reshape((b, kv, group * s, t))?;
        // dV = Pᵀ·dO, dP = dO·Vᵀ
        let dv = p.t()?.matmul(&go)?;
        let dp = go.matmul(&self.v.t()?)?;
        // softmax: dS = P ∘ (dP − Σ dP∘P)
        let row = (&dp * &p)?.sum_keepdim(D::Minus1)?;
        let ds = ((dp.broadcast_sub(&row)? * &p)? * self.scale)?;
        let dq = ds.matmul(&self.k)?.reshape((b, h, s, d))?;
        let dk = ds.t()?.matmul(&self.q)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// RMSNorm over the last dimension, `x / rms(x) · w`, half precision normed in f32.
pub fn rms_norm(xs: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let out = match xs.dtype() {
        // candle's kernel has no f64 variant (f64 runs in gradient checks).
        DType::F64 => {
            let x = xs.detach();
            let mean_square = x.sqr()?.mean_keepdim(D::Minus1)?;
            x.broadcast_div(&(mean_square + eps)?.sqrt()?)?
                .broadcast_mul(&weight.detach())?
        }
        _ => candle_nn::ops::rms_norm(&xs.detach(), &weight.detach(), eps as f32)?,
    };
    if !(xs.track_op() || weight.track_op()) {
        return Ok(out);
    }
    xs.apply_op2(
        weight,
        RmsNormOp {
            out,
            xs: xs.detach(),
            weight: weight.detach(),
            eps,
        },
    )
}

struct RmsNormOp {
    out: Tensor,
    xs: Tensor,
    weight: Tensor,
    eps: f64,
}

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_copy(&self.out)
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        cuda_copy(&self.out)
    }

    fn bwd(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dtype = self.xs.dtype();
        let wide = |t: &Tensor| match t.dtype() {
            DType::F16 | DType::BF16 => t.to_dtype(DType::F32),
            _ => Ok(t.clone()),
        };
        let (x, w, g) = (wide(&self.xs)?, wide(&self.weight)?, wide(grad)?);
        let hidden = x.dim(D::Minus1)? as f64;
        // r = 1/√(mean x² + eps), x̂ = x·r
        let r = ((x.sqr()?.sum_keepdim(D::Minus1)? / hidden)? + self.eps)?
            .sqrt()?
            .recip()?;
        let xhat = x.broadcast_mul(&r)?;
        // dw = Σ_rows g ∘ x̂
        let dw = (&g * &xhat)?.reshape(((), w.elem_count()))?.sum(0)?;
        // dx = r · (ĝ − x̂ · mean(ĝ ∘ x̂)) with ĝ = g ∘ w
        let gw = g.broadcast_mul(&w)?;
        let dot = ((&gw * &xhat)?.sum_keepdim(D::Minus1)? / hidden)?;
        let dx = (gw - xhat.broadcast_mul(&dot)?)?.broadcast_mul(&r)?;
        Ok((
            Some(dx.to_dtype(dtype)?),
            Some(dw.to_dtype(self.weight.dtype())?),
        ))
    }
}

/// Rotary embedding of x (b, h, s, d) with cos/sin (s, d/2) or (b, s, d/2); its gradient is
/// the inverse rotation of the incoming gradient.
pub fn rope(xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let out = candle_nn::rotary_emb::rope(&xs.detach().contiguous()?, cos, sin)?;
    if !xs.track_op() {
        return Ok(out);
    }
    xs.apply_op1(RopeOp {
        out,
        cos: cos.clone(),
        sin: sin.clone(),
    })
}

struct RopeOp {
    out: Tensor,
    cos: Tensor,
    sin: Tensor,
}

impl CustomOp1 for RopeOp {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_copy(&self.out)
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        cuda_copy(&self.out)
    }

    fn bwd(&self, _: &Tensor, _: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let back = candle_nn::rotary_emb::rope(&grad.contiguous()?, &self.cos, &self.sin.neg()?)?;
        Ok(Some(back))
    }
}

/// Σ over rows of −log softmax(logits)[target]: logits (n, vocab) → a scalar (f32 or f64).
/// The gradient is `softmax − onehot` times the incoming scalar gradient.
pub fn cross_entropy_sum(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let wide = match logits.dtype() {
        DType::F16 | DType::BF16 => logits.detach().to_dtype(DType::F32)?,
        _ => logits.detach(),
    };
    // loss = Σ logsumexp(x) − x[target], from one pass of exp.
    let max = wide.max_keepdim(D::Minus1)?;
    let exp = wide.broadcast_sub(&max)?.exp()?;
    let sum = exp.sum_keepdim(D::Minus1)?;
    let index = targets.unsqueeze(1)?;
    let picked = wide.gather(&index, 1)?;
    let loss = ((sum.log()? + max)? - picked)?.sum_all()?;
    let probs = exp.broadcast_div(&sum)?;
    if !logits.track_op() {
        return Ok(loss);
    }
    logits.apply_op1(CrossEntropyOp {
        out: loss,
        probs,
        index,
        dtype: logits.dtype(),
    })
}

struct CrossEntropyOp {
    out: Tensor,
    probs: Tensor,
    index: Tensor,
    dtype: DType,
}

impl CustomOp1 for CrossEntropyOp {
    fn name(&self) -> &'static str {
        "fused-cross-entropy"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        cpu_copy(&self.out)
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        cuda_copy(&self.out)
    }

    fn bwd(&self, _: &Tensor, _: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let ones = Tensor::ones(self.index.shape(), self.probs.dtype(), self.probs.device())?;
        let onehot = self
            .probs
            .zeros_like()?
            .scatter_add(&self.index, &ones, 1)?;
        let g = (&self.probs - onehot)?.broadcast_mul(&grad.to_dtype(self.probs.dtype())?)?;
        Ok(Some(g.to_dtype(self.dtype)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a - b).and_then(|d| d.abs()).and_then(|d| d.flatten_all());
        d.and_then(|d| d.max(0))
            .and_then(|m| m.to_scalar::<f32>())
            .unwrap_or(f32::INFINITY)
    }

    /// Gradients of `Σ f(vars) ∘ r` for the fused op and its composed reference.
    fn compare(
        vars: &[Var],
        fused: &dyn Fn(&[Tensor]) -> Result<Tensor>,
        reference: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    ) -> Result<()> {
        let inputs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let a = fused(&inputs)?;
        let b = reference(&inputs)?;
        assert!(
            max_abs_diff(&a, &b) < 1e-4,
            "forward differs by {}",
            max_abs_diff(&a, &b)
        );
        let r = Tensor::randn(0f32, 1.0, a.shape(), a.device())?;
        let ga = (a * &r)?.sum_all()?.backward()?;
        let gb = (b * &r)?.sum_all()?.backward()?;
        for (i, var) in vars.iter().enumerate() {
            let (x, y) = (ga.get(var.as_tensor()), gb.get(var.as_tensor()));
            let (Some(x), Some(y)) = (x, y) else {
                panic!("input {i}: a gradient is missing")
            };
            let diff = max_abs_diff(x, y);
            assert!(diff < 1e-4, "input {i}: gradients differ by {diff}");
        }
        Ok(())
    }

    #[test]
    fn fused_ops_have_the_gradients_of_their_composed_definitions() -> Result<()> {
        let dev = Device::Cpu;
        let var = |shape: &[usize]| Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, &dev)?);
        // RMSNorm
        let (x, w) = (var(&[2, 3, 8])?, var(&[8])?);
        compare(&[x, w], &|t| rms_norm(&t[0], &t[1], 1e-6), &|t| {
            let ms = t[0].sqr()?.mean_keepdim(D::Minus1)?;
            t[0].broadcast_div(&(ms + 1e-6)?.sqrt()?)?
                .broadcast_mul(&t[1])
        })?;
        // RoPE
        let x = var(&[2, 2, 5, 8])?;
        let angles = Tensor::randn(0f32, 1.0, (5, 4), &dev)?;
        let (cos, sin) = (angles.cos()?, angles.sin()?);
        compare(&[x], &|t| rope(&t[0], &cos, &sin), &|t| {
            crate::layers::rope_differentiable(&t[0], &cos, &sin)
        })?;
        // Attention with grouped kv heads and a causal mask
        let (q, k, v) = (
            var(&[2, 4, 5, 8])?,
            var(&[2, 2, 5, 8])?,
            var(&[2, 2, 5, 8])?,
        );
        let mask = crate::layers::attention_mask(2, 5, 0, None, None, DType::F32, &dev)?;
        let mask_ref = mask.clone();
        compare(
            &[q, k, v],
            &|t| attention(&t[0], &t[1], &t[2], mask.as_ref(), 0.3),
            &move |t| {
                // repeat kv heads: query head h uses kv head h / 2
                let parts: Vec<Tensor> = (0..4)
                    .map(|h| t[1].narrow(1, h / 2, 1))
                    .collect::<Result<_>>()?;
                let k = Tensor::cat(&parts, 1)?;
                let parts: Vec<Tensor> = (0..4)
                    .map(|h| t[2].narrow(1, h / 2, 1))
                    .collect::<Result<_>>()?;
                let v = Tensor::cat(&parts, 1)?;
                let scores = (t[0].matmul(&k.t()?)? * 0.3)?;
                let scores = match &mask_ref {
                    Some(m) => scores.broadcast_add(m)?,
                    None => scores,
                };
                candle_nn::ops::softmax(&scores, D::Minus1)?.matmul(&v)
            },
        )?;
        // Cross-entropy
        let logits = var(&[6, 11])?;
        let targets = Tensor::new(&[0u32, 3, 10, 5, 5, 1], &dev)?;
        compare(&[logits], &|t| cross_entropy_sum(&t[0], &targets), &|t| {
            let ls = candle_nn::ops::log_softmax(&t[0], D::Minus1)?;
            ls.gather(&targets.unsqueeze(1)?, 1)?.sum_all()?.neg()
        })?;
        Ok(())
    }
}
