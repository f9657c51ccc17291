//! Quantized matrix products on the CPU for the GGUF block types our small models use (Q4_1,
//! Q8_0, Q5_0), with AVX2 kernels picked at run time.
//!
//! Why our own: candle 0.11 compiles its SIMD paths only when the whole build targets AVX
//! (`-C target-cpu`), and has none for Q4_1, so a portable binary runs scalar loops. As in
//! llama.cpp, activations are quantized to 8 bits per 32-value block (scale rounded to f16) and
//! each output is a sum over blocks of integer dot products times the two scales.

use std::sync::{Arc, OnceLock};

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape};
use half::f16;
use rayon::prelude::*;

const BLOCK: usize = 32;

/// One 32-value block of quantized activations: `x ≈ d * qs`, `s = d * Σ qs`.
#[derive(Debug, Clone, Copy)]
pub struct Q8Block {
    d: f32,
    s: f32,
    qs: [i8; BLOCK],
}

/// The weight block types with a kernel here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    Q4_1,
    Q8_0,
    Q5_0,
}

impl BlockKind {
    pub fn of(dtype: GgmlDType) -> Option<Self> {
        match dtype {
            GgmlDType::Q4_1 => Some(Self::Q4_1),
            GgmlDType::Q8_0 => Some(Self::Q8_0),
            GgmlDType::Q5_0 => Some(Self::Q5_0),
            _ => None,
        }
    }

    fn block_bytes(self) -> usize {
        match self {
            Self::Q4_1 => 20,
            Self::Q8_0 => 34,
            Self::Q5_0 => 22,
        }
    }
}

type DotFn = fn(&[u8], &[Q8Block]) -> f32;
/// One weight row against four activation rows at once (the weight decoded once).
type Dot4Fn = fn(&[u8], [&[Q8Block]; 4]) -> [f32; 4];

struct Kernels {
    q4_1: DotFn,
    q4_1_x4: Option<Dot4Fn>,
    q8_0: DotFn,
    q5_0: DotFn,
}

fn kernels() -> &'static Kernels {
    static KERNELS: OnceLock<Kernels> = OnceLock::new();
    KERNELS.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("fma")
                && std::is_x86_feature_detected!("f16c")
            {
                return Kernels {
                    q4_1: avx2::dot_q4_1,
                    q4_1_x4: Some(avx2::dot_q4_1_x4),
                    q8_0: avx2::dot_q8_0,
                    q5_0: dot_q5_0,
                };
            }
        }
        Kernels {
            q4_1: dot_q4_1,
            q4_1_x4: None,
            q8_0: dot_q8_0,
            q5_0: dot_q5_0,
        }
    })
}

/// `x Wᵀ` for a quantized `W` (rows, cols) and f32 `x` (.., cols), as a candle custom op.
#[derive(Debug, Clone)]
pub struct CpuQMatMul {
    weight: Arc<QTensor>,
    kind: BlockKind,
    rows: usize,
    cols: usize,
}

impl CpuQMatMul {
    /// `None` when the tensor's block type has no kernel here (or is not 2-D, or not on the
    /// CPU): the caller falls back to candle's.
    pub fn new(weight: Arc<QTensor>) -> Option<Self> {
        let kind = BlockKind::of(weight.dtype())?;
        let (rows, cols) = weight.shape().dims2().ok()?;
        if !weight.device().is_cpu() || !cols.is_multiple_of(BLOCK) {
            return None;
        }
        Some(Self {
            weight,
            kind,
            rows,
            cols,
        })
    }
}

impl CustomOp1 for CpuQMatMul {
    fn name(&self) -> &'static str {
        "medcoder-cpu-qmatmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("{}: f32 activations expected", self.name())
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("{}: contiguous activations expected", self.name())
        };
        let xs = &data[start..end];
        let dims = layout.shape().dims();
        let Some((&cols, batch_dims)) = dims.split_last() else {
            candle_core::bail!("{}: activations have no dimension", self.name())
        };
        if cols != self.cols {
            candle_core::bail!(
                "{}: activations have {cols} columns, weight {}",
                self.name(),
                self.cols
            )
        }
        let m = xs.len() / cols;
        let bytes = self.weight.data()?;
        let out = matmul(self.kind, &bytes, self.rows, cols, xs, m);
        let mut shape = batch_dims.to_vec();
        shape.push(self.rows);
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }
}

/// out (m, rows) = xs (m, cols) · Wᵀ, W given as `rows` rows of quantized blocks.
pub fn matmul(
    kind: BlockKind,
    weight: &[u8],
    rows: usize,
    cols: usize,
    xs: &[f32],
    m: usize,
) -> Vec<f32> {
    let blocks = cols / BLOCK;
    let row_bytes = blocks * kind.block_bytes();
    let quantized: Vec<Vec<Q8Block>> = xs.chunks_exact(cols).map(quantize_row).collect();
    let dot = match kind {
        BlockKind::Q4_1 => kernels().q4_1,
        BlockKind::Q8_0 => kernels().q8_0,
        BlockKind::Q5_0 => kernels().q5_0,
    };
    let dot4 = match kind {
        BlockKind::Q4_1 => kernels().q4_1_x4,
        _ => None,
    };
    // Output transposed (rows, m) so that threads own whole weight rows, then put back.
    let mut transposed = vec![0f32; rows * m];
    let chunk_rows = (rows / (4 * rayon::current_num_threads().max(1))).clamp(16, 256);
    transposed
        .par_chunks_mut(chunk_rows * m)
        .enumerate()
        .for_each(|(chunk, out)| {
            for (i, out_row) in out.chunks_mut(m).enumerate() {
                let row = chunk * chunk_rows + i;
                let w = &weight[row * row_bytes..(row + 1) * row_bytes];
                let mut done = 0;
                if let Some(dot4) = dot4 {
                    for (o, x) in out_row.chunks_exact_mut(4).zip(quantized.chunks_exact(4)) {
                        o.copy_from_slice(&dot4(w, [&x[0], &x[1], &x[2], &x[3]]));
                        done += 4;
                    }
                }
                for (o, x) in out_row[done..].iter_mut().zip(&quantized[done..]) {
                    *o = dot(w, x);
                }
            }
        });
    if m == 1 {
        return transposed;
    }
    // (rows, m) → (m, rows), in tiles that stay in cache
    const TILE: usize = 32;
    let mut out = vec![0f32; m * rows];
    for r0 in (0..rows).step_by(TILE) {
        for i0 in (0..m).step_by(TILE) {
            for r in r0..(r0 + TILE).min(rows) {
                for i in i0..(i0 + TILE).min(m) {
                    out[i * rows + r] = transposed[r * m + i];
                }
            }
        }
    }
    out
}

/// 8-bit blocks of one activation row, scales rounded to f16 as llama.cpp stores them.
pub fn quantize_row(xs: &[f32]) -> Vec<Q8Block> {
    xs.chunks_exact(BLOCK)
        .map(|chunk| {
            let amax = chunk.iter().fold(0f32, |a, x| a.max(x.abs()));
            let d = amax / 127.0;
            let id = if d > 0.0 { 1.0 / d } else { 0.0 };
            let mut qs = [0i8; BLOCK];
            let mut sum = 0i32;
            for (q, x) in qs.iter_mut().zip(chunk) {
                *q = (x * id).round() as i8;
                sum += i32::from(*q);
            }
            let d = f16::from_f32(d).to_f32();
            Q8Block {
                d,
                s: f16::from_f32(d * sum as f32).to_f32(),
                qs,
            }
        })
        .collect()
}

fn half_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// Q4_1 block: d, m (f16), 16 bytes of nibbles (low nibbles values 0..16, high 16..32);
/// value = d * q + m.
fn dot_q4_1(w: &[u8], xs: &[Q8Block]) -> f32 {
    w.chunks_exact(20)
        .zip(xs)
        .map(|(b, x)| {
            let (d, m) = (half_at(b, 0), half_at(b, 2));
            let mut sum = 0i32;
            for j in 0..16 {
                let byte = b[4 + j];
                sum += i32::from(byte & 0x0F) * i32::from(x.qs[j]);
                sum += i32::from(byte >> 4) * i32::from(x.qs[j + 16]);
            }
            d * x.d * sum as f32 + m * x.s
        })
        .sum()
}

/// Q8_0 block: d (f16), 32 signed bytes; value = d * q.
fn dot_q8_0(w: &[u8], xs: &[Q8Block]) -> f32 {
    w.chunks_exact(34)
        .zip(xs)
        .map(|(b, x)| {
            let d = half_at(b, 0);
            let sum: i32 = b[2..34]
                .iter()
                .zip(&x.qs)
                .map(|(&q, &y)| i32::from(q as i8) * i32::from(y))
                .sum();
            d * x.d * sum as f32
        })
        .sum()
}

/// Q5_0 block: d (f16), 32 high bits, 16 bytes of low nibbles; value = d * (q - 16).
fn dot_q5_0(w: &[u8], xs: &[Q8Block]) -> f32 {
    w.chunks_exact(22)
        .zip(xs)
        .map(|(b, x)| {
            let d = half_at(b, 0);
            let high = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
            let mut sum = 0i32;
            for j in 0..16 {
                let byte = b[6 + j];
                let lo = i32::from(byte & 0x0F) | (((high >> j) & 1) as i32) << 4;
                let hi = i32::from(byte >> 4) | (((high >> (j + 16)) & 1) as i32) << 4;
                sum += (lo - 16) * i32::from(x.qs[j]) + (hi - 16) * i32::from(x.qs[j + 16]);
            }
            d * x.d * sum as f32
        })
        .sum()
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx2 {
    //! AVX2 + FMA versions of the block dot products: `maddubs` multiplies unsigned by signed
    //! bytes into pairs of i16, `madd` sums those into i32, as llama.cpp's x86 kernels do.
    use std::arch::x86_64::*;

    use super::Q8Block;

    /// Installed only after `is_x86_feature_detected!` holds for avx2, fma and f16c.
    pub fn dot_q4_1(w: &[u8], xs: &[Q8Block]) -> f32 {
        assert_eq!(
            w.len(),
            xs.len() * 20,
            "Q4_1 row and activation blocks differ"
        );
        // SAFETY: the CPU has AVX2, FMA and F16C (checked before this function is installed), and
        // every pointer stays inside `w` (20 bytes per block, asserted) and inside `x.qs`.
        unsafe { dot_q4_1_impl(w, xs) }
    }

    /// Installed only after `is_x86_feature_detected!` holds for avx2, fma and f16c.
    pub fn dot_q8_0(w: &[u8], xs: &[Q8Block]) -> f32 {
        assert_eq!(
            w.len(),
            xs.len() * 34,
            "Q8_0 row and activation blocks differ"
        );
        // SAFETY: as above, 34 bytes per block (asserted), so every pointer stays inside `w`.
        unsafe { dot_q8_0_impl(w, xs) }
    }

    /// One Q4_1 block times one activation block, accumulated into `acc`; returns m · s.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_1_block(b: *const u8, x: &Q8Block, acc: &mut __m256) -> f32 {
        let low = _mm_set1_epi8(0x0F);
        let d = half(b);
        let m = half(b.add(2));
        let raw = _mm_loadu_si128(b.add(4).cast());
        let lo = _mm_and_si128(raw, low);
        let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low);
        let q4 = _mm256_set_m128i(hi, lo);
        let y = _mm256_loadu_si256(x.qs.as_ptr().cast());
        let sums = _mm256_madd_epi16(_mm256_maddubs_epi16(q4, y), _mm256_set1_epi16(1));
        *acc = _mm256_fmadd_ps(_mm256_set1_ps(d * x.d), _mm256_cvtepi32_ps(sums), *acc);
        m * x.s
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_q4_1_impl(w: &[u8], xs: &[Q8Block]) -> f32 {
        // Two blocks per step into two accumulators, so that consecutive FMAs do not wait on
        // each other.
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let (mut mins0, mut mins1) = (0f32, 0f32);
        let base = w.as_ptr();
        let pairs = xs.len() / 2;
        for i in 0..pairs {
            mins0 += q4_1_block(base.add(40 * i), &xs[2 * i], &mut acc0);
            mins1 += q4_1_block(base.add(40 * i + 20), &xs[2 * i + 1], &mut acc1);
        }
        if xs.len() % 2 == 1 {
            mins0 += q4_1_block(base.add(40 * pairs), &xs[2 * pairs], &mut acc0);
        }
        horizontal_sum(_mm256_add_ps(acc0, acc1)) + mins0 + mins1
    }

    /// Installed only after `is_x86_feature_detected!` holds for avx2, fma and f16c.
    pub fn dot_q4_1_x4(w: &[u8], xs: [&[Q8Block]; 4]) -> [f32; 4] {
        for x in xs {
            assert_eq!(
                w.len(),
                x.len() * 20,
                "Q4_1 row and activation blocks differ"
            );
        }
        // SAFETY: as for `dot_q4_1`, for each of the four activation rows.
        unsafe { dot_q4_1_x4_impl(w, xs) }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_q4_1_x4_impl(w: &[u8], xs: [&[Q8Block]; 4]) -> [f32; 4] {
        let low = _mm_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut mins = [0f32; 4];
        let base = w.as_ptr();
        for block in 0..xs[0].len() {
            let b = base.add(20 * block);
            let d = half(b);
            let m = half(b.add(2));
            let raw = _mm_loadu_si128(b.add(4).cast());
            let lo = _mm_and_si128(raw, low);
            let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low);
            let q4 = _mm256_set_m128i(hi, lo);
            for r in 0..4 {
                let x = xs[r].get_unchecked(block);
                let y = _mm256_loadu_si256(x.qs.as_ptr().cast());
                let sums = _mm256_madd_epi16(_mm256_maddubs_epi16(q4, y), ones);
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * x.d), _mm256_cvtepi32_ps(sums), acc[r]);
                mins[r] += m * x.s;
            }
        }
        let mut out = [0f32; 4];
        for r in 0..4 {
            out[r] = horizontal_sum(acc[r]) + mins[r];
        }
        out
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q8_0_block(b: *const u8, x: &Q8Block, acc: &mut __m256) {
        let d = half(b);
        let q = _mm256_loadu_si256(b.add(2).cast());
        let y = _mm256_loadu_si256(x.qs.as_ptr().cast());
        // |q| · (y with q's sign): unsigned by signed, as maddubs needs
        let pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(q, q), _mm256_sign_epi8(y, q));
        let sums = _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
        *acc = _mm256_fmadd_ps(_mm256_set1_ps(d * x.d), _mm256_cvtepi32_ps(sums), *acc);
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_q8_0_impl(w: &[u8], xs: &[Q8Block]) -> f32 {
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let base = w.as_ptr();
        let pairs = xs.len() / 2;
        for i in 0..pairs {
            q8_0_block(base.add(68 * i), &xs[2 * i], &mut acc0);
            q8_0_block(base.add(68 * i + 34), &xs[2 * i + 1], &mut acc1);
        }
        if xs.len() % 2 == 1 {
            q8_0_block(base.add(68 * pairs), &xs[2 * pairs], &mut acc0);
        }
        horizontal_sum(_mm256_add_ps(acc0, acc1))
    }

    /// The little-endian f16 at `p`, converted in a register.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn half(p: *const u8) -> f32 {
        let bits = std::ptr::read_unaligned(p.cast::<u16>());
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn horizontal_sum(v: __m256) -> f32 {
        let quad = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
        let single = _mm_add_ss(pair, _mm_shuffle_ps(pair, pair, 1));
        _mm_cvtss_f32(single)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// Each kernel against candle's dequantized weights times the (unquantized) activations.
    #[test]
    fn kernels_match_dequantized_products() -> Result<()> {
        let device = Device::Cpu;
        // 5 activation rows: four through the 4-row kernel, one through the single one
        let (rows, cols, m) = (40, 96, 5);
        let w = Tensor::randn(0f32, 1.0, (rows, cols), &device)?;
        let xs = Tensor::randn(0f32, 1.0, (m, cols), &device)?;
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0, GgmlDType::Q5_0] {
            let q = Arc::new(QTensor::quantize(&w, dtype)?);
            let exact = xs.matmul(&q.dequantize(&device)?.t()?)?;
            let op = CpuQMatMul::new(q.clone())
                .ok_or_else(|| candle_core::Error::Msg("no kernel".into()))?;
            let ours = xs.apply_op1_no_bwd(&op)?;
            let diff = (ours - &exact)?
                .abs()?
                .max_keepdim(1)?
                .max(0)?
                .to_vec1::<f32>()?[0];
            let scale = exact.abs()?.max_keepdim(1)?.max(0)?.to_vec1::<f32>()?[0];
            assert!(
                diff < 0.02 * scale,
                "{dtype:?}: off by {diff} (scale {scale})"
            );
            // the scalar fallbacks agree with whatever kernel was picked
            let bytes = q.data()?;
            let row = quantize_row(&xs.get(0)?.to_vec1::<f32>()?);
            let row_bytes = cols / BLOCK * BlockKind::of(dtype).map_or(0, BlockKind::block_bytes);
            let scalar = match dtype {
                GgmlDType::Q4_1 => dot_q4_1(&bytes[..row_bytes], &row),
                GgmlDType::Q8_0 => dot_q8_0(&bytes[..row_bytes], &row),
                _ => dot_q5_0(&bytes[..row_bytes], &row),
            };
            let picked = matmul(
                BlockKind::of(dtype).unwrap_or(BlockKind::Q8_0),
                &bytes,
                rows,
                cols,
                &xs.get(0)?.to_vec1::<f32>()?,
                1,
            )[0];
            assert!(
                (scalar - picked).abs() < 1e-3 * scale.max(1.0),
                "{dtype:?}: {scalar} vs {picked}"
            );
        }
        Ok(())
    }
}
