//! Dot products of a few query vectors with every row of a large row-major table (sentence
//! embeddings against thousands of stored ones): `out[q][r] = query q · row r`.
//!
//! A general matmul packs the table into its own layout on every call; for a handful of
//! queries that packing costs more than the products (the retrieval engine spent twice as
//! long packing as multiplying). Here the table is read once, in place: four rows at a time
//! against three queries at a time, twelve running sums in registers (AVX2 + FMA where the CPU
//! has them, checked at run time; elsewhere a portable loop the compiler vectorises).

#![allow(unsafe_code)]

/// `out[q * rows + r] = queries[q] · table[r]`, with `table` (`rows × dim`) and `queries`
/// (`n × dim`) row-major. `out` is resized to `n × rows`.
pub fn row_dots(table: &[f32], queries: &[f32], dim: usize, out: &mut Vec<f32>) {
    assert!(dim > 0, "row_dots: zero dimension");
    assert!(
        table.len().is_multiple_of(dim) && queries.len().is_multiple_of(dim),
        "row_dots: table ({}) or queries ({}) not a whole number of rows of {dim}",
        table.len(),
        queries.len()
    );
    let rows = table.len() / dim;
    out.clear();
    out.resize(queries.len() / dim * rows, 0.0);
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        unsafe { avx2::row_dots(table, queries, dim, out) };
        return;
    }
    portable_row_dots(table, queries, dim, out);
}

/// One dot product, to the bit what [`row_dots`] gives for the same pair (the same lanes, in
/// the same order), so that a pair picked from an approximate pass can be computed alone.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        return unsafe { avx2::dot(a, b) };
    }
    portable_dot(a, b)
}

/// The same for one query: its dot product with every row.
pub fn dots_with(table: &[f32], query: &[f32]) -> Vec<f32> {
    let mut out = Vec::new();
    row_dots(table, query, query.len().max(1), &mut out);
    out
}

fn portable_row_dots(table: &[f32], queries: &[f32], dim: usize, out: &mut [f32]) {
    let rows = table.len() / dim;
    for (q, query) in queries.chunks_exact(dim).enumerate() {
        for (r, row) in table.chunks_exact(dim).enumerate() {
            out[q * rows + r] = portable_dot(query, row);
        }
    }
}

/// Eight independent sums, so that the loop vectorises without reassociating floats.
fn portable_dot(a: &[f32], b: &[f32]) -> f32 {
    let mut sums = [0f32; 8];
    let mut a_chunks = a.chunks_exact(8);
    let mut b_chunks = b.chunks_exact(8);
    for (x, y) in (&mut a_chunks).zip(&mut b_chunks) {
        for i in 0..8 {
            sums[i] += x[i] * y[i];
        }
    }
    let tail: f32 = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .map(|(x, y)| x * y)
        .sum();
    sums.iter().sum::<f32>() + tail
}

/// Rows and queries taken together in the SIMD kernels: each chunk loaded serves three or
/// four products.
pub(crate) const ROW_BLOCK: usize = 4;
pub(crate) const QUERY_BLOCK: usize = 3;

/// The loop of the SIMD kernels (`f32` here, integers in `quantized_rows`):
/// `out[q * rows + r] = queries[q] · table[r]`, [`ROW_BLOCK`] rows against [`QUERY_BLOCK`]
/// queries at a time (`block`), the rows and queries left over one pair at a time (`single`,
/// called as `single(row, query)`); `table` and `queries` are row-major, `dim` per row.
pub(crate) fn blocked_dots<T, S: Copy>(
    (table, queries, dim): (&[T], &[T], usize),
    out: &mut [S],
    block: impl Fn(&[T], &[T]) -> [[S; ROW_BLOCK]; QUERY_BLOCK],
    single: impl Fn(&[T], &[T]) -> S,
) {
    let rows = table.len() / dim;
    let n = queries.len() / dim;
    let mut r = 0;
    while r + ROW_BLOCK <= rows {
        let rows_here = &table[r * dim..(r + ROW_BLOCK) * dim];
        let mut q = 0;
        while q + QUERY_BLOCK <= n {
            let sums = block(rows_here, &queries[q * dim..(q + QUERY_BLOCK) * dim]);
            for (j, row_sums) in sums.iter().enumerate() {
                let at = (q + j) * rows + r;
                out[at..at + ROW_BLOCK].copy_from_slice(row_sums);
            }
            q += QUERY_BLOCK;
        }
        for (j, query) in queries[q * dim..].chunks_exact(dim).enumerate() {
            for (i, row) in rows_here.chunks_exact(dim).enumerate() {
                out[(q + j) * rows + r + i] = single(row, query);
            }
        }
        r += ROW_BLOCK;
    }
    for (i, row) in table[r * dim..].chunks_exact(dim).enumerate() {
        for (q, query) in queries.chunks_exact(dim).enumerate() {
            out[q * rows + r + i] = single(row, query);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{blocked_dots, QUERY_BLOCK, ROW_BLOCK};

    /// [`super::row_dots`]'s loop. Safety: the CPU must have AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn row_dots(table: &[f32], queries: &[f32], dim: usize, out: &mut [f32]) {
        blocked_dots(
            (table, queries, dim),
            out,
            // SAFETY (both): the caller checked the CPU, the functions' only condition.
            |block, group| dot_block(block, group, dim),
            |row, query| dot(row, query),
        );
    }

    /// [`ROW_BLOCK`] rows (`block`) against [`QUERY_BLOCK`] queries (`group`): twelve
    /// running sums, seven loads per twelve multiply-adds.
    // Indices name the register block's cells (row i, query j) more plainly than iterators.
    #[allow(clippy::needless_range_loop)]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot_block(
        block: &[f32],
        group: &[f32],
        dim: usize,
    ) -> [[f32; ROW_BLOCK]; QUERY_BLOCK] {
        let full = dim / 8 * 8;
        let rp = block.as_ptr();
        let qp = group.as_ptr();
        let mut acc = [[_mm256_setzero_ps(); ROW_BLOCK]; QUERY_BLOCK];
        let mut d = 0;
        while d < full {
            // SAFETY: d + 8 <= dim, so every load stays inside its row.
            let mut q = [_mm256_setzero_ps(); QUERY_BLOCK];
            for j in 0..QUERY_BLOCK {
                q[j] = _mm256_loadu_ps(qp.add(j * dim + d));
            }
            for i in 0..ROW_BLOCK {
                let row = _mm256_loadu_ps(rp.add(i * dim + d));
                for j in 0..QUERY_BLOCK {
                    acc[j][i] = _mm256_fmadd_ps(row, q[j], acc[j][i]);
                }
            }
            d += 8;
        }
        let mut result = [[0f32; ROW_BLOCK]; QUERY_BLOCK];
        for (j, sums) in acc.iter().enumerate() {
            for (i, sum) in sums.iter().enumerate() {
                let tail: f32 = (full..dim)
                    .map(|k| block[i * dim + k] * group[j * dim + k])
                    .sum();
                result[j][i] = horizontal_sum(*sum) + tail;
            }
        }
        result
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let dim = a.len().min(b.len());
        let full = dim / 8 * 8;
        let mut acc = _mm256_setzero_ps();
        let mut d = 0;
        while d < full {
            // SAFETY: d + 8 <= dim.
            acc = _mm256_fmadd_ps(
                _mm256_loadu_ps(a.as_ptr().add(d)),
                _mm256_loadu_ps(b.as_ptr().add(d)),
                acc,
            );
            d += 8;
        }
        horizontal_sum(acc) + (full..dim).map(|k| a[k] * b[k]).sum::<f32>()
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn horizontal_sum(v: __m256) -> f32 {
        let halves = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let pairs = _mm_add_ps(halves, _mm_movehl_ps(halves, halves));
        _mm_cvtss_f32(_mm_add_ss(pairs, _mm_shuffle_ps(pairs, pairs, 1)))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn exact(table: &[f32], queries: &[f32], dim: usize) -> Vec<f64> {
        queries
            .chunks_exact(dim)
            .flat_map(|q| {
                table.chunks_exact(dim).map(move |r| {
                    q.iter()
                        .zip(r)
                        .map(|(a, b)| f64::from(*a) * f64::from(*b))
                        .sum()
                })
            })
            .collect()
    }

    /// Values in [-1, 1] from a xorshift seeded by `seed` (also used by `quantized_rows`).
    pub(crate) fn pseudo_random(n: usize, seed: u32) -> Vec<f32> {
        let mut state = seed.wrapping_mul(2_654_435_761).max(1);
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                (state % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn every_query_row_pair_is_its_dot_product() {
        // Block edges: rows and queries not multiples of the blocks, dims with and without
        // an 8-lane tail, one row, one query.
        for (rows, queries, dim) in [(13, 5, 384), (4, 2, 8), (7, 3, 13), (1, 1, 3), (9, 1, 40)] {
            let table = pseudo_random(rows * dim, rows as u32);
            let qs = pseudo_random(queries * dim, dim as u32);
            let mut out = vec![7.0; 3];
            row_dots(&table, &qs, dim, &mut out);
            let want = exact(&table, &qs, dim);
            assert_eq!(out.len(), want.len());
            for (i, (got, want)) in out.iter().zip(&want).enumerate() {
                assert!(
                    (f64::from(*got) - want).abs() < 1e-4 * (1.0 + want.abs()),
                    "rows {rows} queries {queries} dim {dim} at {i}: {got} vs {want}"
                );
            }
            let mut portable = vec![0.0; want.len()];
            portable_row_dots(&table, &qs, dim, &mut portable);
            for (a, b) in portable.iter().zip(&out) {
                assert!((a - b).abs() < 1e-4 * (1.0 + a.abs()));
            }
        }
        // A pair alone is the same number as in the table's pass, at every block position.
        let (rows, queries, dim) = (11, 7, 387);
        let table = pseudo_random(rows * dim, 3);
        let qs = pseudo_random(queries * dim, 5);
        let mut out = Vec::new();
        row_dots(&table, &qs, dim, &mut out);
        for (q, query) in qs.chunks_exact(dim).enumerate() {
            for (r, row) in table.chunks_exact(dim).enumerate() {
                assert_eq!(dot(query, row).to_bits(), out[q * rows + r].to_bits());
            }
        }
        assert_eq!(dots_with(&[1.0, 2.0, 3.0, 4.0], &[1.0, 1.0]), [3.0, 7.0]);
        let mut out = vec![1.0];
        row_dots(&[], &[1.0, 2.0], 2, &mut out);
        assert!(out.is_empty());
    }
}
