//! NF4, QLoRA's base format (bitsandbytes' 4-bit NormalFloat): each weight is one of 16
//! levels placed at quantiles of a normal distribution, times the absolute maximum of its
//! block of 64 (the weight flattened row by row, as bitsandbytes blocks it). Two levels per
//! byte, the first in the high nibble. About 4.5 bits per weight with the f32 scales.
//!
//! A frozen NF4 layer is dequantized on the fly: in the forward product and again in the
//! backward one, never kept dense between the two, so a step holds one layer's dense weight
//! at a time rather than the whole model's.

use std::sync::Arc;

use candle_core::{
    bail, CpuStorage, CudaStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor,
};
use rayon::prelude::*;

/// Weights per absmax scale.
pub const NF4_BLOCK: usize = 64;

/// bitsandbytes' NF4 levels (`bitsandbytes/functional.py`, `get_4bit_type("nf4")`).
pub const NF4_LEVELS: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// The level nearest to `x` (in [-1, 1]): its index.
fn nearest_level(x: f32) -> u8 {
    // Midpoints between neighbouring levels decide; the levels are sorted.
    let mut index = 0u8;
    for i in 1..16 {
        if x > (NF4_LEVELS[i - 1] + NF4_LEVELS[i]) / 2.0 {
            index = i as u8;
        }
    }
    index
}

/// A matrix (out, in) in NF4.
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4Tensor {
    rows: usize,
    cols: usize,
    /// Two level indices per byte, first in the high nibble; (rows·cols).div_ceil(2) bytes.
    codes: Vec<u8>,
    /// One per block of 64 weights (the last block may be shorter).
    absmax: Vec<f32>,
}

impl Nf4Tensor {
    /// Quantize a 2-D tensor (any float dtype, any device).
    pub fn quantize(weight: &Tensor) -> Result<Self> {
        let (rows, cols) = weight.dims2()?;
        let values = weight
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_device(&Device::Cpu)?
            .to_vec1::<f32>()?;
        let absmax: Vec<f32> = values
            .par_chunks(NF4_BLOCK)
            .map(|block| block.iter().fold(0f32, |m, v| m.max(v.abs())))
            .collect();
        if absmax.iter().any(|m| !m.is_finite()) {
            bail!("NF4: the weight holds a non-finite value")
        }
        let level = |i: usize| -> u8 {
            let scale = absmax[i / NF4_BLOCK];
            match values.get(i) {
                Some(&v) if scale > 0.0 => nearest_level(v / scale),
                // Zero blocks (and the padding nibble) decode to 0.
                _ => 7,
            }
        };
        let codes: Vec<u8> = (0..values.len().div_ceil(2))
            .into_par_iter()
            .map(|byte| (level(2 * byte) << 4) | level(2 * byte + 1))
            .collect();
        Ok(Self {
            rows,
            cols,
            codes,
            absmax,
        })
    }

    /// (out, in)
    pub fn dims(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// Bytes held (codes and scales).
    pub fn storage_bytes(&self) -> usize {
        self.codes.len() + 4 * self.absmax.len()
    }

    /// The weights, row by row, into `out` (rows·cols).
    pub fn dequantize_into(&self, out: &mut [f32]) {
        assert_eq!(out.len(), self.rows * self.cols, "NF4: output size");
        out.par_chunks_mut(NF4_BLOCK)
            .zip(&self.absmax)
            .enumerate()
            .for_each(|(block, (values, &scale))| {
                let first = block * NF4_BLOCK;
                for (j, v) in values.iter_mut().enumerate() {
                    let i = first + j;
                    let byte = self.codes[i / 2];
                    let code = if i.is_multiple_of(2) {
                        byte >> 4
                    } else {
                        byte & 0x0f
                    };
                    *v = NF4_LEVELS[code as usize] * scale;
                }
            });
    }

    /// The dense (out, in) weight in `dtype` on `device`.
    pub fn dequantize(&self, device: &Device, dtype: DType) -> Result<Tensor> {
        let mut values = vec![0f32; self.rows * self.cols];
        self.dequantize_into(&mut values);
        Tensor::from_vec(values, (self.rows, self.cols), &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)
    }
}

/// `xs (.., in) · Wᵀ` with `W` a frozen NF4 matrix: dequantized for the product, and again
/// for the backward pass (the gradient goes to the input only).
pub(crate) fn frozen_nf4_matmul(xs: &Tensor, weight: &Arc<Nf4Tensor>) -> Result<Tensor> {
    let dims = xs.dims().to_vec();
    let Some((&k, lead)) = dims.split_last() else {
        bail!("NF4 linear: a scalar input")
    };
    let (n, wk) = weight.dims();
    if k != wk {
        bail!("NF4 linear: input width {k} does not match the weight's {wk}")
    }
    let m: usize = lead.iter().product();
    let flat = xs.contiguous()?.reshape((m, k))?;
    let dense = weight.dequantize(xs.device(), xs.dtype())?;
    let out = flat.detach().matmul(&dense.t()?)?;
    drop(dense);
    let ys = if flat.track_op() {
        flat.apply_op1(FrozenNf4MatMul {
            out,
            weight: weight.clone(),
        })?
    } else {
        out
    };
    let mut shape = lead.to_vec();
    shape.push(n);
    ys.reshape(shape)
}

/// The product computed outside (on any device), handed to the graph with its backward.
struct FrozenNf4MatMul {
    out: Tensor,
    weight: Arc<Nf4Tensor>,
}

impl CustomOp1 for FrozenNf4MatMul {
    fn name(&self) -> &'static str {
        "frozen-nf4-matmul"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        crate::autograd::cpu_copy(&self.out)
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        crate::autograd::cuda_copy(&self.out)
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        // (m, n) · (n, k) → (m, k)
        let dense = self
            .weight
            .dequantize(grad_res.device(), grad_res.dtype())?;
        Ok(Some(grad_res.matmul(&dense)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_round_to_the_nearest_and_blocks_keep_their_absmax() -> Result<()> {
        for (i, &level) in NF4_LEVELS.iter().enumerate() {
            assert_eq!(nearest_level(level) as usize, i);
        }
        assert_eq!(nearest_level(0.03), 7);
        assert_eq!(nearest_level(0.05), 8);
        // A block's largest magnitude is exact (level ±1 times the absmax).
        let values: Vec<f32> = (0..130).map(|i| (i as f32 - 60.0) * 0.01).collect();
        let t = Tensor::from_vec(values.clone(), (2, 65), &Device::Cpu)?;
        let q = Nf4Tensor::quantize(&t)?;
        assert_eq!(q.absmax.len(), 3);
        let back: Vec<f32> = q
            .dequantize(&Device::Cpu, DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        assert_eq!(back[0], values[0]);
        assert_eq!(back[129], values[129]);
        Ok(())
    }

    #[test]
    fn round_trip_error_is_within_half_a_level_gap_of_each_blocks_absmax() -> Result<()> {
        let t = Tensor::randn(0f32, 0.02, (96, 192), &Device::Cpu)?;
        let q = Nf4Tensor::quantize(&t)?;
        assert_eq!(q.storage_bytes(), 96 * 192 / 2 + 4 * 96 * 192 / 64);
        let back = q.dequantize(&Device::Cpu, DType::F32)?;
        let original: Vec<f32> = t.flatten_all()?.to_vec1()?;
        let restored: Vec<f32> = back.flatten_all()?.to_vec1()?;
        // The widest gap between neighbouring levels is 1 − 0.696 ≈ 0.304.
        let max_gap = NF4_LEVELS
            .windows(2)
            .map(|w| w[1] - w[0])
            .fold(0f32, f32::max);
        let mut squared_error = 0f64;
        for (block, (a, b)) in original
            .chunks(NF4_BLOCK)
            .zip(restored.chunks(NF4_BLOCK))
            .enumerate()
        {
            let absmax = q.absmax[block];
            for (x, y) in a.iter().zip(b) {
                assert!(
                    (x - y).abs() <= max_gap / 2.0 * absmax + 1e-7,
                    "block {block}: {x} → {y} (absmax {absmax})"
                );
                squared_error += f64::from((x - y) * (x - y));
            }
        }
        // Normal weights: the relative RMS error of NF4 is about 10%.
        let rms = (squared_error / original.len() as f64).sqrt();
        assert!(rms < 0.12 * 0.02, "relative RMS error {}", rms / 0.02);
        Ok(())
    }

    #[test]
    fn the_frozen_product_matches_the_dense_one_and_its_gradient_reaches_the_input() -> Result<()> {
        let w = Tensor::randn(0f32, 0.5, (24, 128), &Device::Cpu)?;
        let q = Arc::new(Nf4Tensor::quantize(&w)?);
        let dense = q.dequantize(&Device::Cpu, DType::F32)?;
        let x =
            candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 128), &Device::Cpu)?)?;
        let ys = frozen_nf4_matmul(x.as_tensor(), &q)?;
        let want = x.as_tensor().broadcast_matmul(&dense.t()?)?;
        let diff = (&ys - &want)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-4, "{diff}");
        let grads = ys.sqr()?.sum_all()?.backward()?;
        let got = grads.get(x.as_tensor()).cloned();
        let expected = (want * 2.0)?.broadcast_matmul(&dense)?;
        let got = got.ok_or_else(|| candle_core::Error::Msg("no gradient".into()))?;
        let diff = (&got - &expected)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-3, "{diff}");
        Ok(())
    }
}
