//! The CPU kernels of the hand-written training pass (`lora_train_cpu`): strided f32 matrix
//! products straight into caller-owned buffers (gemm, with accumulation, so `dx = dy·W +
//! dU·A` needs no temporaries), and the row-wise pieces (RMSNorm, RoPE, the gated
//! activation, causal attention) with their backward passes, all spread over rayon's threads.
//!
//! Layout everywhere: token-major rows, `(tokens, features)`, row-major.
//!
//! Unsafe code here: gemm takes raw pointers and strides, and parallel tasks write disjoint
//! blocks of one buffer through raw pointers (which block is whose is stated at each site).
#![allow(unsafe_code)]

use gemm::Parallelism;
use rayon::prelude::*;

use crate::layers::Activation;

/// A read-only strided view of an f32 matrix.
#[derive(Clone, Copy)]
pub(crate) struct MatRef<'a> {
    data: &'a [f32],
    offset: usize,
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// `data` as a row-major (rows, cols) matrix.
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self::strided(data, 0, rows, cols, cols)
    }

    /// Rows of width `cols` starting at `offset`, `ld` apart (a column block of a wider
    /// matrix, e.g. one attention head of (tokens, heads·head_dim)).
    pub fn strided(data: &'a [f32], offset: usize, rows: usize, cols: usize, ld: usize) -> Self {
        let view = Self {
            data,
            offset,
            rows,
            cols,
            row_stride: ld,
            col_stride: 1,
        };
        assert!(view.fits(), "matrix view out of bounds");
        view
    }

    /// The transpose, without a copy.
    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    /// Rows `start..start + count`.
    pub fn rows(self, start: usize, count: usize) -> Self {
        assert!(start + count <= self.rows, "row range out of bounds");
        Self {
            offset: self.offset + start * self.row_stride,
            rows: count,
            ..self
        }
    }

    fn fits(&self) -> bool {
        if self.rows == 0 || self.cols == 0 {
            return true;
        }
        let last =
            self.offset + (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride;
        last < self.data.len()
    }

    fn ptr(&self) -> *const f32 {
        self.data[self.offset..].as_ptr()
    }
}

/// A destination for products: rows of width `cols`, `ld` apart, from a raw pointer so that
/// parallel tasks can write disjoint blocks of one buffer.
#[derive(Clone, Copy)]
pub(crate) struct MatOut {
    ptr: *mut f32,
    rows: usize,
    cols: usize,
    ld: usize,
}

// Safety: tasks holding copies write disjoint blocks (each constructor's caller's promise).
unsafe impl Send for MatOut {}
unsafe impl Sync for MatOut {}

impl MatOut {
    /// `data` as a row-major (rows, cols) matrix.
    pub fn new(data: &mut [f32], rows: usize, cols: usize) -> Self {
        assert!(data.len() >= rows * cols, "output buffer too small");
        Self {
            ptr: data.as_mut_ptr(),
            rows,
            cols,
            ld: cols,
        }
    }

    /// A column block `col..col + cols` of rows `row..row + rows` of a matrix `ld` wide.
    ///
    /// # Safety
    /// The block must lie inside `data`, and no other live view may write to it.
    pub unsafe fn block(
        data: *mut f32,
        row: usize,
        rows: usize,
        col: usize,
        cols: usize,
        ld: usize,
    ) -> Self {
        Self {
            ptr: data.add(row * ld + col),
            rows,
            cols,
            ld,
        }
    }
}

/// How many threads a product may use.
pub(crate) fn threads() -> Parallelism {
    match rayon::current_num_threads() {
        0 | 1 => Parallelism::None,
        n => Parallelism::Rayon(n),
    }
}

/// `out = [out +] scale · a · b` (`accumulate` keeps what `out` held).
pub(crate) fn matmul(
    out: MatOut,
    a: MatRef,
    b: MatRef,
    scale: f32,
    accumulate: bool,
    parallelism: Parallelism,
) {
    assert!(
        a.cols == b.rows && out.rows == a.rows && out.cols == b.cols,
        "matmul shapes: ({}, {}) · ({}, {}) → ({}, {})",
        a.rows,
        a.cols,
        b.rows,
        b.cols,
        out.rows,
        out.cols
    );
    if out.rows == 0 || out.cols == 0 {
        return;
    }
    if a.cols == 0 {
        if !accumulate {
            for r in 0..out.rows {
                // Safety: inside the block the caller handed over.
                unsafe { std::slice::from_raw_parts_mut(out.ptr.add(r * out.ld), out.cols) }
                    .fill(0.0);
            }
        }
        return;
    }
    // Safety: the views were bounds-checked when made; `out` is the caller's exclusive block.
    unsafe {
        gemm::gemm(
            out.rows,
            out.cols,
            a.cols,
            out.ptr,
            1,
            out.ld as isize,
            accumulate,
            a.ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            1.0,
            scale,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// `out = x · rstd · w` per row; returns each row's `rstd = 1/√(mean(x²) + eps)`.
pub(crate) fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) -> Vec<f32> {
    let width = w.len();
    let mut rstd = vec![0f32; x.len() / width];
    out.par_chunks_mut(width)
        .zip(x.par_chunks(width))
        .zip(rstd.par_iter_mut())
        .for_each(|((o, x), r)| {
            let mean = x.iter().map(|v| v * v).sum::<f32>() / width as f32;
            *r = 1.0 / (mean + eps).sqrt();
            for ((o, x), w) in o.iter_mut().zip(x).zip(w) {
                *o = x * *r * w;
            }
        });
    rstd
}

/// `dx += rstd·(w∘dy) − x·rstd³/n · Σ(w∘dy∘x)` per row (RMSNorm's backward, weight frozen).
pub(crate) fn rms_norm_backward(x: &[f32], rstd: &[f32], w: &[f32], dy: &[f32], dx: &mut [f32]) {
    let width = w.len();
    dx.par_chunks_mut(width)
        .zip(x.par_chunks(width).zip(dy.par_chunks(width)))
        .zip(rstd.par_iter())
        .for_each(|((dx, (x, dy)), &r)| {
            let dot: f32 = x.iter().zip(dy).zip(w).map(|((x, dy), w)| x * dy * w).sum();
            let c = dot * r * r * r / width as f32;
            for (((dx, x), dy), w) in dx.iter_mut().zip(x).zip(dy).zip(w) {
                *dx += r * w * dy - x * c;
            }
        });
}

/// Rotate each `head_dim` slice of every row by its position's angles (HF's halves layout),
/// in place; `inverse` rotates back (RoPE's backward). `cos`/`sin`: (positions, head_dim/2);
/// row `t` is at position `positions[t]`.
pub(crate) fn rope(
    xs: &mut [f32],
    width: usize,
    head_dim: usize,
    positions: &[u32],
    cos: &[f32],
    sin: &[f32],
    inverse: bool,
) {
    let half = head_dim / 2;
    let sign = if inverse { -1.0 } else { 1.0 };
    xs.par_chunks_mut(width)
        .zip(positions)
        .for_each(|(row, &position)| {
            let p = position as usize * half;
            let (c, s) = (&cos[p..p + half], &sin[p..p + half]);
            for head in row.chunks_mut(head_dim) {
                let (x1, x2) = head.split_at_mut(half);
                for i in 0..half {
                    let (a, b, si) = (x1[i], x2[i], sign * s[i]);
                    x1[i] = a * c[i] - b * si;
                    x2[i] = b * c[i] + a * si;
                }
            }
        });
}

fn gelu_tanh(x: f32) -> (f32, f32) {
    // gelu(x) = x·Φ(x) with Φ ≈ (1 + tanh(k(x + 0.044715x³)))/2; returns (value, derivative)
    const K: f32 = 0.797_884_6;
    let inner = K * (x + 0.044_715 * x * x * x);
    let t = inner.tanh();
    let value = 0.5 * x * (1.0 + t);
    let d_inner = K * (1.0 + 3.0 * 0.044_715 * x * x);
    (value, 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * d_inner)
}

fn activate(activation: Activation, x: f32) -> (f32, f32) {
    match activation {
        Activation::Silu => {
            let s = 1.0 / (1.0 + (-x).exp());
            (x * s, s * (1.0 + x * (1.0 - s)))
        }
        Activation::GeluTanh => gelu_tanh(x),
    }
}

/// `out = act(gate) ∘ up`
pub(crate) fn gated(activation: Activation, gate: &[f32], up: &[f32], out: &mut [f32]) {
    const CHUNK: usize = 4096;
    out.par_chunks_mut(CHUNK)
        .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)))
        .for_each(|(o, (g, u))| {
            for ((o, g), u) in o.iter_mut().zip(g).zip(u) {
                *o = activate(activation, *g).0 * u;
            }
        });
}

/// The gated product's backward: `d_out` (overwritten with `d_gate`) and `d_up`.
pub(crate) fn gated_backward(
    activation: Activation,
    gate: &[f32],
    up: &[f32],
    d_out_then_gate: &mut [f32],
    d_up: &mut [f32],
) {
    const CHUNK: usize = 4096;
    d_out_then_gate
        .par_chunks_mut(CHUNK)
        .zip(d_up.par_chunks_mut(CHUNK))
        .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)))
        .for_each(|((dg, du), (g, u))| {
            for (((dg, du), g), u) in dg.iter_mut().zip(du).zip(g).zip(u) {
                let (a, da) = activate(activation, *g);
                *du = *dg * a;
                *dg *= u * da;
            }
        });
}

/// Shapes of one causal attention call: `rows` sequences of `seq` tokens; q (rows·seq,
/// heads·d), k and v (rows·seq, kv_heads·d).
#[derive(Clone, Copy, Debug)]
pub(crate) struct AttentionDims {
    pub rows: usize,
    pub seq: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
}

/// Query rows per block: keys past a block's last row are never computed.
const BLOCK: usize = 64;

impl AttentionDims {
    fn q_width(&self) -> usize {
        self.heads * self.head_dim
    }
    fn kv_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }
    /// Keys and values of kv head `kvh` in sequence `row`: (seq, head_dim) views each.
    fn kv_views<'a>(
        &self,
        k: &'a [f32],
        v: &'a [f32],
        row: usize,
        kvh: usize,
    ) -> (MatRef<'a>, MatRef<'a>) {
        let (kw, d) = (self.kv_width(), self.head_dim);
        let at = row * self.seq * kw + kvh * d;
        (
            MatRef::strided(k, at, self.seq, d, kw),
            MatRef::strided(v, at, self.seq, d, kw),
        )
    }

    /// Query head `h` of sequence `row` in a (tokens, heads·head_dim) buffer.
    fn head_view<'a>(&self, x: &'a [f32], row: usize, h: usize) -> MatRef<'a> {
        let (qw, d) = (self.q_width(), self.head_dim);
        MatRef::strided(x, row * self.seq * qw + h * d, self.seq, d, qw)
    }

    /// The query heads that share kv head `kvh`.
    fn query_heads(&self, kvh: usize) -> std::ops::Range<usize> {
        let group = self.heads / self.kv_heads;
        kvh * group..(kvh + 1) * group
    }

    /// (sequence, kv head) pairs: the unit of parallel work (a kv head's query heads run in
    /// one task, so that their dK/dV sums need no locks).
    fn tasks(&self) -> impl ParallelIterator<Item = (usize, usize)> {
        let kv = self.kv_heads;
        (0..self.rows * kv)
            .into_par_iter()
            .map(move |i| (i / kv, i % kv))
    }
}

/// The query rows of one attention block and the keys they may see.
#[derive(Clone, Copy)]
struct QueryBlock<'a> {
    /// Query rows `r0..r0 + n` of the sequence…
    r0: usize,
    n: usize,
    /// …see keys from `k0` on (0, or the earliest document start among them when packed)…
    k0: usize,
    /// …and each from its document's start (`None`: from key 0).
    doc_starts: Option<&'a [u32]>,
}

impl<'a> QueryBlock<'a> {
    /// `doc_starts`: the sequence's (seq) document start columns, if packed.
    fn new(r0: usize, n: usize, doc_starts: Option<&'a [u32]>) -> Self {
        let doc_starts = doc_starts.map(|s| &s[r0..r0 + n]);
        let k0 = doc_starts.map_or(0, |s| s.iter().copied().min().unwrap_or(0) as usize);
        Self {
            r0,
            n,
            k0,
            doc_starts,
        }
    }

    /// Keys `k0..r0 + n`: the columns of the block's scores.
    fn keys(&self) -> usize {
        self.r0 + self.n - self.k0
    }
}

/// Scores of one block's query rows of one head against its keys, softmaxed under the causal
/// (and document) mask, into `p` (n, keys); fills `lse` for the rows, or (`recompute`, the
/// backward pass) uses it.
fn block_probs(
    q: MatRef,
    k: MatRef,
    block: QueryBlock,
    scale: f32,
    p: &mut [f32],
    lse: &mut [f32],
    recompute: bool,
) {
    let QueryBlock { r0, n, k0, .. } = block;
    let keys = block.keys();
    matmul(
        MatOut::new(p, n, keys),
        q.rows(r0, n),
        k.rows(k0, keys).t(),
        scale,
        false,
        Parallelism::None,
    );
    for (i, row) in p.chunks_mut(keys).take(n).enumerate() {
        let visible = r0 + i + 1 - k0;
        let first = block.doc_starts.map_or(0, |s| s[i] as usize - k0);
        row[visible..].fill(0.0);
        row[..first].fill(0.0);
        let row = &mut row[first..visible];
        if recompute {
            let l = lse[i];
            row.iter_mut().for_each(|v| *v = (*v - l).exp());
        } else {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0;
            row.iter_mut().for_each(|v| {
                *v = (*v - max).exp();
                sum += *v;
            });
            row.iter_mut().for_each(|v| *v /= sum);
            lse[i] = max + sum.ln();
        }
    }
}

/// Causal grouped-query attention: `out` (rows·seq, heads·d) and each query's log-sum-exp
/// `lse` (rows, heads, seq), which is all the backward pass needs besides q, k, v and out.
/// With `doc_starts` (rows·seq: the column where each token's document starts in its row, for
/// packed rows) a query sees only the keys of its own document.
pub(crate) fn attention(
    dims: AttentionDims,
    doc_starts: Option<&[u32]>,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
) -> Vec<f32> {
    let (seq, heads, d) = (dims.seq, dims.heads, dims.head_dim);
    let mut lse = vec![0f32; dims.rows * heads * seq];
    let out_ptr = SendPtr(out.as_mut_ptr());
    let lse_ptr = SendPtr(lse.as_mut_ptr());
    dims.tasks().for_each(|(row, kvh)| {
        let base = row * seq;
        let starts = doc_starts.map(|s| &s[base..base + seq]);
        let (k, v) = dims.kv_views(k, v, row, kvh);
        let mut p = vec![0f32; BLOCK * seq];
        for h in dims.query_heads(kvh) {
            let q = dims.head_view(q, row, h);
            // Safety: this task alone writes head h of sequence `row`.
            let lse = unsafe {
                std::slice::from_raw_parts_mut(lse_ptr.get().add((row * heads + h) * seq), seq)
            };
            for r0 in (0..seq).step_by(BLOCK) {
                let n = BLOCK.min(seq - r0);
                let block = QueryBlock::new(r0, n, starts);
                let keys = block.keys();
                block_probs(q, k, block, dims.scale, &mut p, &mut lse[r0..r0 + n], false);
                let o =
                    unsafe { MatOut::block(out_ptr.get(), base + r0, n, h * d, d, dims.q_width()) };
                matmul(
                    o,
                    MatRef::new(&p, n, keys),
                    v.rows(block.k0, keys),
                    1.0,
                    false,
                    Parallelism::None,
                );
            }
        }
    });
    lse
}

/// Attention's backward: `dq` (like q) and `dk`, `dv` (like k, v), all overwritten.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention_backward(
    dims: AttentionDims,
    doc_starts: Option<&[u32]>,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    d_out: &[f32],
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let (seq, heads, d, scale) = (dims.seq, dims.heads, dims.head_dim, dims.scale);
    dk.fill(0.0);
    dv.fill(0.0);
    let (dq_ptr, dk_ptr, dv_ptr) = (
        SendPtr(dq.as_mut_ptr()),
        SendPtr(dk.as_mut_ptr()),
        SendPtr(dv.as_mut_ptr()),
    );
    let (qw, kw) = (dims.q_width(), dims.kv_width());
    dims.tasks().for_each(|(row, kvh)| {
        let base = row * seq;
        let starts = doc_starts.map(|s| &s[base..base + seq]);
        let (k, v) = dims.kv_views(k, v, row, kvh);
        let mut p = vec![0f32; BLOCK * seq];
        let mut dp = vec![0f32; BLOCK * seq];
        for h in dims.query_heads(kvh) {
            let q = dims.head_view(q, row, h);
            let go = dims.head_view(d_out, row, h);
            // Δ_i = Σ_j dO_ij·O_ij: the softmax backward's row term.
            let delta: Vec<f32> = (0..seq)
                .map(|i| {
                    let at = (base + i) * qw + h * d;
                    d_out[at..at + d]
                        .iter()
                        .zip(&out[at..at + d])
                        .map(|(a, b)| a * b)
                        .sum()
                })
                .collect();
            let mut lse_rows = lse[(row * heads + h) * seq..(row * heads + h + 1) * seq].to_vec();
            for r0 in (0..seq).step_by(BLOCK) {
                let n = BLOCK.min(seq - r0);
                let block = QueryBlock::new(r0, n, starts);
                let (k0, keys) = (block.k0, block.keys());
                block_probs(q, k, block, scale, &mut p, &mut lse_rows[r0..r0 + n], true);
                // Safety: this task alone writes kv head `kvh` and query head `h` of `row`.
                let (dq_o, dk_o, dv_o) = unsafe {
                    (
                        MatOut::block(dq_ptr.get(), base + r0, n, h * d, d, qw),
                        MatOut::block(dk_ptr.get(), base + k0, keys, kvh * d, d, kw),
                        MatOut::block(dv_ptr.get(), base + k0, keys, kvh * d, d, kw),
                    )
                };
                let pm = MatRef::new(&p, n, keys);
                // dV += Pᵀ·dO ; dP = dO·Vᵀ
                matmul(dv_o, pm.t(), go.rows(r0, n), 1.0, true, Parallelism::None);
                matmul(
                    MatOut::new(&mut dp, n, keys),
                    go.rows(r0, n),
                    v.rows(k0, keys).t(),
                    1.0,
                    false,
                    Parallelism::None,
                );
                // dS = P∘(dP − Δ) (the scale is applied in the products below)
                for i in 0..n {
                    let (pr, dpr) = (
                        &p[i * keys..(i + 1) * keys],
                        &mut dp[i * keys..(i + 1) * keys],
                    );
                    let di = delta[r0 + i];
                    for (x, pv) in dpr.iter_mut().zip(pr) {
                        *x = pv * (*x - di);
                    }
                }
                let ds = MatRef::new(&dp, n, keys);
                matmul(dq_o, ds, k.rows(k0, keys), scale, false, Parallelism::None);
                matmul(dk_o, ds.t(), q.rows(r0, n), scale, true, Parallelism::None);
            }
        }
    });
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// Safety: used only to hand disjoint blocks of one buffer to parallel tasks.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}
