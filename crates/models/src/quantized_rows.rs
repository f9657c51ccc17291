//! A first, cheaper pass of dot products with a guaranteed error bound: rows and queries
//! rounded to 16-bit integers (a scale per vector), multiplied in integer arithmetic (AVX-512
//! VNNI where the CPU has it, else AVX2; twice the lanes of the `f32` kernel per register,
//! from half the memory). Each product comes with a bound on how far it can be from the `f32`
//! one, so that a caller that wants the best few rows can rule out the rest and compute only
//! the survivors exactly (with [`crate::row_dots::dot`]): the answer is the same as from the
//! `f32` pass.

#![allow(unsafe_code)]

/// Vectors rounded to integers: `x ≈ scale · q`, each `|q_i| ≤ max_magnitude(dim)`.
#[derive(Debug, Clone, Default)]
pub struct QuantizedRows {
    dim: usize,
    /// `dim` rounded up to a multiple of 32 (zeros after `dim`).
    padded: usize,
    values: Vec<i16>,
    scale: Vec<f32>,
    /// Per vector: `Σ |q_i|` (in integer units).
    abs_sum: Vec<f32>,
    /// Per vector: its `f32` Euclidean norm.
    norm: Vec<f32>,
}

/// The largest integer magnitude for `padded` dimensions: a dot product of two such vectors
/// cannot overflow an `i32` (`padded · m² < 2³¹`).
fn max_magnitude(padded: usize) -> f32 {
    ((i32::MAX as f64 / padded.max(1) as f64).sqrt().floor() - 1.0).clamp(1.0, 32767.0) as f32
}

impl QuantizedRows {
    /// `table`: row-major, `dim` values per row.
    pub fn new(table: &[f32], dim: usize) -> Self {
        assert!(
            dim > 0 && table.len().is_multiple_of(dim),
            "quantized rows: bad shape"
        );
        let padded = dim.div_ceil(32) * 32;
        let m = max_magnitude(padded);
        let rows = table.len() / dim;
        let mut out = Self {
            dim,
            padded,
            values: vec![0; rows * padded],
            scale: Vec::with_capacity(rows),
            abs_sum: Vec::with_capacity(rows),
            norm: Vec::with_capacity(rows),
        };
        for (row, slot) in table
            .chunks_exact(dim)
            .zip(out.values.chunks_exact_mut(padded))
        {
            let largest = row.iter().fold(0f32, |a, x| a.max(x.abs()));
            let scale = if largest > 0.0 { largest / m } else { 0.0 };
            let mut abs_sum = 0f32;
            for (q, &x) in slot.iter_mut().zip(row) {
                let v = if scale > 0.0 {
                    (x / scale).round()
                } else {
                    0.0
                };
                // Never beyond `m`, whatever the rounding of `x / scale`.
                let v = v.clamp(-m, m);
                *q = v as i16;
                abs_sum += v.abs();
            }
            out.scale.push(scale);
            out.abs_sum.push(abs_sum);
            out.norm.push(row.iter().map(|x| x * x).sum::<f32>().sqrt());
        }
        out
    }

    pub fn rows(&self) -> usize {
        self.scale.len()
    }

    /// Approximate dot products of every query with every row and their error bounds:
    /// `approx[q * rows + r]` is within `bound[q * rows + r]` of the `f32` dot product of
    /// the original vectors (as [`crate::row_dots::row_dots`] computes it).
    pub fn dots_with_bounds(
        &self,
        queries: &QuantizedRows,
        approx: &mut Vec<f32>,
        bound: &mut Vec<f32>,
    ) {
        assert_eq!(self.dim, queries.dim, "quantized rows: dimensions differ");
        let rows = self.rows();
        let n = queries.rows();
        let sums = integer_dots(&self.values, &queries.values, self.padded);
        // Per element, rounding moved each side by at most half a unit: for x = s(q + d),
        // y = t(p + e), |x·y − s t q·p| ≤ s t (½Σ|p| + ½Σ|q| + ¼·dim). The `f32` pass itself
        // may differ from the exact product by up to dim·2⁻²³·|x||y|; the integer sum's
        // conversion and scaling by a few roundings more.
        let dim = self.dim as f32;
        let float_slack = dim * f32::EPSILON + 1e-5;
        approx.resize(n * rows, 0.0);
        bound.resize(n * rows, 0.0);
        let per_query = sums
            .chunks_exact(rows.max(1))
            .zip(approx.chunks_exact_mut(rows.max(1)))
            .zip(bound.chunks_exact_mut(rows.max(1)));
        for (q, ((sums, approx), bound)) in per_query.enumerate() {
            let (sq, aq, nq) = (queries.scale[q], queries.abs_sum[q], queries.norm[q]);
            let outputs = sums.iter().zip(approx).zip(bound);
            let rows = self.scale.iter().zip(&self.abs_sum).zip(&self.norm);
            for (((sum, approx), bound), ((scale, abs_sum), norm)) in outputs.zip(rows) {
                let st = sq * scale;
                *approx = *sum as f32 * st;
                let rounding = st * (0.5 * (aq + abs_sum) + 0.25 * dim);
                *bound = rounding * 1.001 + float_slack * nq * norm + 1e-7;
            }
        }
    }
}

/// `out[q * rows + r] = queries[q] · table[r]`, exactly, in `i32`.
fn integer_dots(table: &[i16], queries: &[i16], padded: usize) -> Vec<i32> {
    let mut sums = vec![0i32; (queries.len() / padded) * (table.len() / padded)];
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512vnni") {
        // SAFETY: the CPU has AVX-512F and VNNI (checked just above).
        unsafe { avx512::integer_dots(table, queries, padded, &mut sums) };
        return sums;
    }
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above).
        unsafe { avx2::integer_dots(table, queries, padded, &mut sums) };
        return sums;
    }
    portable_integer_dots(table, queries, padded, &mut sums);
    sums
}

fn portable_integer_dots(table: &[i16], queries: &[i16], padded: usize, out: &mut [i32]) {
    let rows = table.len() / padded;
    for (q, query) in queries.chunks_exact(padded).enumerate() {
        for (r, row) in table.chunks_exact(padded).enumerate() {
            out[q * rows + r] = query
                .iter()
                .zip(row)
                .map(|(&a, &b)| i32::from(a) * i32::from(b))
                .sum();
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use crate::row_dots::{blocked_dots, QUERY_BLOCK, ROW_BLOCK};

    /// `out[q * rows + r] = queries[q] · table[r]` in `i32` (no overflow: see
    /// `max_magnitude`); `padded` is a multiple of 16. Safety: the CPU must have AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn integer_dots(
        table: &[i16],
        queries: &[i16],
        padded: usize,
        out: &mut [i32],
    ) {
        blocked_dots(
            (table, queries, padded),
            out,
            // SAFETY (both): the caller checked the CPU, the functions' only condition.
            |block, group| dot_block(block, group, padded),
            |row, query| dot(row, query),
        );
    }

    /// [`ROW_BLOCK`] rows against [`QUERY_BLOCK`] queries: twelve running sums in registers.
    // Indices name the register block's cells (row i, query j) more plainly than iterators.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx2")]
    unsafe fn dot_block(
        block: &[i16],
        group: &[i16],
        padded: usize,
    ) -> [[i32; ROW_BLOCK]; QUERY_BLOCK] {
        let rp = block.as_ptr();
        let qp = group.as_ptr();
        let mut acc = [[_mm256_setzero_si256(); ROW_BLOCK]; QUERY_BLOCK];
        let mut d = 0;
        while d < padded {
            let mut q = [_mm256_setzero_si256(); QUERY_BLOCK];
            for j in 0..QUERY_BLOCK {
                // SAFETY: d + 16 <= padded, inside query j.
                q[j] = _mm256_loadu_si256(qp.add(j * padded + d).cast());
            }
            for i in 0..ROW_BLOCK {
                // SAFETY: d + 16 <= padded, inside row i.
                let row = _mm256_loadu_si256(rp.add(i * padded + d).cast());
                for j in 0..QUERY_BLOCK {
                    acc[j][i] = _mm256_add_epi32(acc[j][i], _mm256_madd_epi16(row, q[j]));
                }
            }
            d += 16;
        }
        let mut result = [[0i32; ROW_BLOCK]; QUERY_BLOCK];
        for j in 0..QUERY_BLOCK {
            for i in 0..ROW_BLOCK {
                result[j][i] = horizontal_sum(acc[j][i]);
            }
        }
        result
    }

    #[target_feature(enable = "avx2")]
    unsafe fn dot(a: &[i16], b: &[i16]) -> i32 {
        let mut acc = _mm256_setzero_si256();
        let mut d = 0;
        while d < a.len().min(b.len()) {
            // SAFETY: both lengths are multiples of 16, so d + 16 is inside both.
            let x = _mm256_loadu_si256(a.as_ptr().add(d).cast());
            let y = _mm256_loadu_si256(b.as_ptr().add(d).cast());
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(x, y));
            d += 16;
        }
        horizontal_sum(acc)
    }

    #[target_feature(enable = "avx2")]
    unsafe fn horizontal_sum(v: __m256i) -> i32 {
        let halves = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        let pairs = _mm_add_epi32(halves, _mm_shuffle_epi32(halves, 0b01_00_11_10));
        let one = _mm_add_epi32(pairs, _mm_shuffle_epi32(pairs, 0b10_11_00_01));
        _mm_cvtsi128_si32(one)
    }
}

/// The same with 512-bit registers and VNNI's fused multiply-add of 16-bit pairs: 32 products
/// an instruction, where AVX2 takes two instructions for 16.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use crate::row_dots::{blocked_dots, QUERY_BLOCK, ROW_BLOCK};

    /// Safety: the CPU must have AVX-512F and AVX-512 VNNI; `padded` is a multiple of 32.
    #[target_feature(enable = "avx512f,avx512vnni")]
    pub(super) unsafe fn integer_dots(
        table: &[i16],
        queries: &[i16],
        padded: usize,
        out: &mut [i32],
    ) {
        blocked_dots(
            (table, queries, padded),
            out,
            // SAFETY (both): the caller checked the CPU, the functions' only condition.
            |block, group| dot_block(block, group, padded),
            |row, query| dot(row, query),
        );
    }

    /// [`ROW_BLOCK`] rows against [`QUERY_BLOCK`] queries: twelve running sums in registers.
    // Indices name the register block's cells (row i, query j) more plainly than iterators.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx512f,avx512vnni")]
    unsafe fn dot_block(
        block: &[i16],
        group: &[i16],
        padded: usize,
    ) -> [[i32; ROW_BLOCK]; QUERY_BLOCK] {
        let rp = block.as_ptr();
        let qp = group.as_ptr();
        let mut acc = [[_mm512_setzero_si512(); ROW_BLOCK]; QUERY_BLOCK];
        let mut d = 0;
        while d < padded {
            let mut q = [_mm512_setzero_si512(); QUERY_BLOCK];
            for j in 0..QUERY_BLOCK {
                // SAFETY: d + 32 <= padded, inside query j.
                q[j] = _mm512_loadu_si512(qp.add(j * padded + d).cast());
            }
            for i in 0..ROW_BLOCK {
                // SAFETY: d + 32 <= padded, inside row i.
                let row = _mm512_loadu_si512(rp.add(i * padded + d).cast());
                for j in 0..QUERY_BLOCK {
                    acc[j][i] = _mm512_dpwssd_epi32(acc[j][i], row, q[j]);
                }
            }
            d += 32;
        }
        let mut result = [[0i32; ROW_BLOCK]; QUERY_BLOCK];
        for j in 0..QUERY_BLOCK {
            for i in 0..ROW_BLOCK {
                result[j][i] = _mm512_reduce_add_epi32(acc[j][i]);
            }
        }
        result
    }

    #[target_feature(enable = "avx512f,avx512vnni")]
    unsafe fn dot(a: &[i16], b: &[i16]) -> i32 {
        let mut acc = _mm512_setzero_si512();
        let mut d = 0;
        while d < a.len().min(b.len()) {
            // SAFETY: both lengths are multiples of 32, so d + 32 is inside both.
            let x = _mm512_loadu_si512(a.as_ptr().add(d).cast());
            let y = _mm512_loadu_si512(b.as_ptr().add(d).cast());
            acc = _mm512_dpwssd_epi32(acc, x, y);
            d += 32;
        }
        _mm512_reduce_add_epi32(acc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::row_dots::row_dots;
    use crate::row_dots::tests::pseudo_random;

    #[test]
    fn every_product_is_within_its_bound_of_the_f32_pass() {
        // Block edges (rows and queries not multiples of the blocks), dims that are and are
        // not multiples of 16, a zero row, very unequal magnitudes.
        for (rows, queries, dim) in [(13, 5, 384), (4, 3, 16), (7, 2, 13), (1, 1, 3), (9, 4, 40)] {
            let mut table = pseudo_random(rows * dim, rows as u32 + 1);
            table[..dim].iter_mut().for_each(|x| *x = 0.0);
            if rows > 2 {
                table[dim..2 * dim].iter_mut().for_each(|x| *x *= 1e-3);
                table[2 * dim] = 50.0;
            }
            let qs = pseudo_random(queries * dim, dim as u32);
            let mut exact = Vec::new();
            row_dots(&table, &qs, dim, &mut exact);
            let (mut approx, mut bound) = (Vec::new(), Vec::new());
            let quantized = QuantizedRows::new(&table, dim);
            quantized.dots_with_bounds(&QuantizedRows::new(&qs, dim), &mut approx, &mut bound);
            assert_eq!(approx.len(), exact.len());
            let qq = QuantizedRows::new(&qs, dim);
            let mut portable = vec![0; exact.len()];
            portable_integer_dots(
                &quantized.values,
                &qq.values,
                quantized.padded,
                &mut portable,
            );
            assert_eq!(
                integer_dots(&quantized.values, &qq.values, quantized.padded),
                portable
            );
            // Every kernel this CPU can run, not only the one picked.
            #[cfg(target_arch = "x86_64")]
            {
                let (t, q, p) = (&quantized.values, &qq.values, quantized.padded);
                let mut sums = vec![0; portable.len()];
                if std::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU has AVX2.
                    unsafe { avx2::integer_dots(t, q, p, &mut sums) };
                    assert_eq!(sums, portable);
                }
                if std::is_x86_feature_detected!("avx512f")
                    && std::is_x86_feature_detected!("avx512vnni")
                {
                    sums.fill(0);
                    // SAFETY: the CPU has AVX-512F and VNNI.
                    unsafe { avx512::integer_dots(t, q, p, &mut sums) };
                    assert_eq!(sums, portable);
                }
            }
            for i in 0..exact.len() {
                assert!(
                    (approx[i] - exact[i]).abs() <= bound[i],
                    "rows {rows} queries {queries} dim {dim} at {i}: {} vs {} ± {}",
                    approx[i],
                    exact[i],
                    bound[i]
                );
                // Tight enough to be useful: well under a hundredth of the product's scale.
                let scale = qq.norm[i / rows] * quantized.norm[i % rows];
                assert!(
                    bound[i] <= 1e-2 * scale + 1e-6,
                    "bound {} scale {scale}",
                    bound[i]
                );
            }
        }
    }
}
