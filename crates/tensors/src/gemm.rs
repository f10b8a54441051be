//! Several-token products in f32 (prefill): `out[t * rows + r] = W[r] · x[t]`, with
//! each row dequantized once per block of tokens.
//!
//! The layout is BLIS's. A micro-panel holds 32 rows k-major (`panel[k * 32 + i]`), a
//! group holds 12 tokens k-major (`group[k * 12 + j]`), and a micro-kernel keeps the
//! 32 × 12 tile of outputs in registers while it walks k, one rank-1 update per
//! column: no horizontal sums, and the tile is stored token-major as the caller wants
//! it. AVX-512F runs a tile as 12 tokens × 2 vectors of 16 rows (24 accumulators of
//! the 32 registers); AVX2 as four quarters of 16 rows × 6 tokens (12 of 16); other
//! CPUs in plain loops. Every output is the same chain of fused multiply-adds in k
//! order on all three, so they agree to the bit.
//!
//! A task takes a chunk of rows small enough that its packed panel stays in L2 and
//! passes every group of the block over it; a group (12 tokens) stays in L1/L2 while
//! it meets each micro-panel of the chunk.

use crate::kernels::dot_f32;
use crate::quant::QMatrix;
use rayon::prelude::*;
use std::cell::RefCell;

/// Rows of a micro-panel (a tile's height).
const MR: usize = 32;
/// Tokens of a group (a tile's width).
const NR: usize = 12;
/// Bytes of packed weights a task keeps near its core (L2) while groups pass over them.
const CHUNK_BYTES: usize = 3 << 19;
/// Bytes of packed activations per block of tokens: the weights are dequantized once
/// per block.
const BLOCK_BYTES: usize = 8 << 20;

/// 64 bytes, aligned: packed panels are vectors of these, so that a micro-panel's
/// columns (32 f32) never straddle cache lines.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([f32; 16]);

/// `lines` as f32 values.
fn floats(lines: &[Line]) -> &[f32] {
    // SAFETY: Line is 16 f32 with no padding (repr(C), size 64).
    unsafe { std::slice::from_raw_parts(lines.as_ptr().cast(), lines.len() * 16) }
}

fn floats_mut(lines: &mut [Line]) -> &mut [f32] {
    // SAFETY: as in `floats`.
    unsafe { std::slice::from_raw_parts_mut(lines.as_mut_ptr().cast(), lines.len() * 16) }
}

thread_local! {
    /// A worker's packed panel and its scratch rows, reused between calls: every value
    /// in use is overwritten by the packing.
    static PANEL: RefCell<(Vec<Line>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// The output, written by tasks that own disjoint rows of it.
struct Out(*mut f32);
// SAFETY: tasks write disjoint (row, token) entries, and `gemm` waits for all of them.
unsafe impl Sync for Out {}

impl Out {
    fn ptr(&self) -> *mut f32 {
        self.0
    }
}

/// The micro-kernel a CPU runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernel {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Plain,
}

impl Kernel {
    fn detect() -> Kernel {
        use crate::kernels::Family;
        #[cfg(target_arch = "x86_64")]
        {
            match Family::active() {
                Family::Avx512 => return Kernel::Avx512,
                Family::Avx2 => return Kernel::Avx2,
                Family::Plain => {}
            }
        }
        Kernel::Plain
    }

    /// Whether the CPU has AVX2 and FMA (every AVX-512 CPU does), for the transposes
    /// and the few-token dot products.
    fn avx2(self) -> bool {
        self != Kernel::Plain
    }

    /// `tile[j * MR + i] = Σ_k panel[k * MR + i] * group[k * NR + j]`, in k order.
    fn run(self, panel: &[f32], group: &[f32], cols: usize, tile: &mut [f32; MR * NR]) {
        assert!(panel.len() >= cols * MR && group.len() >= cols * NR);
        match self {
            // SAFETY (both): the CPU features were detected in `detect`, and the
            // lengths asserted above cover every read.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => unsafe { x86::tile_avx512(panel, group, cols, tile) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { x86::tile_avx2(panel, group, cols, tile) },
            Kernel::Plain => {
                tile.fill(0.0);
                for k in 0..cols {
                    let a = &panel[k * MR..(k + 1) * MR];
                    for (j, &b) in group[k * NR..(k + 1) * NR].iter().enumerate() {
                        for (c, &w) in tile[j * MR..(j + 1) * MR].iter_mut().zip(a) {
                            *c = w.mul_add(b, *c);
                        }
                    }
                }
            }
        }
    }
}

/// `out[t * rows + r] = W[r] · x[t]` for `n` tokens of `W.cols()` values each.
pub(crate) fn gemm(w: &QMatrix, x: &[f32], n: usize, out: &mut [f32]) {
    gemm_multi(&[w], x, n, &mut [out]);
}

/// [`gemm`] of several matrices with the same input (q, k and v; gate and up): the
/// tokens are packed once for all of them.
pub(crate) fn gemm_multi(ws: &[&QMatrix], x: &[f32], n: usize, outs: &mut [&mut [f32]]) {
    let Some(cols) = ws.first().map(|w| w.cols()) else {
        return;
    };
    let kernel = Kernel::detect();
    if n < FEW_TOKENS {
        for (w, out) in ws.iter().zip(outs.iter_mut()) {
            few_tokens(w, x, n, out, kernel);
        }
        return;
    }
    let tb = ((BLOCK_BYTES / (4 * cols)) / NR * NR).max(4 * NR);
    gemm_blocked(ws, x, n, outs, None, tb, kernel);
}

/// Below this many tokens (several sequences decoding together), packing the weights
/// costs more than the packed kernel saves (qwen2.5, `bench --batch 16`: 88.8 against
/// 81.9 tok/s for the packed path).
const FEW_TOKENS: usize = 32;

/// [`gemm`] for a few tokens: a task dequantizes [`MR`] rows side by side and dots
/// them with every token (a few rows of activations, in L1), four rows by three
/// tokens at a time.
fn few_tokens(w: &QMatrix, x: &[f32], n: usize, out: &mut [f32], kernel: Kernel) {
    let (rows, cols) = (w.rows(), w.cols());
    assert!(x.len() >= n * cols && out.len() >= n * rows);
    let dst = Out(out.as_mut_ptr());
    (0..rows.div_ceil(MR)).into_par_iter().for_each(|c| {
        let r0 = c * MR;
        let nr = MR.min(rows - r0);
        PANEL.with(|cell| {
            let (_, rows_buf) = &mut *cell.borrow_mut();
            rows_buf.resize(MR * cols, 0.0);
            for (i, row) in rows_buf.chunks_exact_mut(cols).take(nr).enumerate() {
                w.dequantize_row(r0 + i, row);
            }
            for i in (0..nr).step_by(4) {
                for t in (0..n).step_by(3) {
                    let (mr, mt) = ((nr - i).min(4), (n - t).min(3));
                    let acc = dots_4x3(
                        &rows_buf[i * cols..nr * cols],
                        mr,
                        &x[t * cols..n * cols],
                        mt,
                        cols,
                        kernel,
                    );
                    for (a, ii) in acc.iter().zip(i..i + mr) {
                        for (v, tt) in a.iter().zip(t..t + mt) {
                            // SAFETY: row r0 + ii belongs to this task alone and tt < n:
                            // the entry lies inside `out`.
                            unsafe { *dst.ptr().add(tt * rows + r0 + ii) = *v };
                        }
                    }
                }
            }
        });
    });
}

/// The dot products of the first `mr` (≤ 4) rows of `w` with the first `mt` (≤ 3) of
/// `x`, rows of `cols` values (entries past `mr` or `mt` are unspecified).
fn dots_4x3(
    w: &[f32],
    mr: usize,
    x: &[f32],
    mt: usize,
    cols: usize,
    kernel: Kernel,
) -> [[f32; 3]; 4] {
    assert!((1..=4).contains(&mr) && (1..=3).contains(&mt));
    assert!(w.len() >= mr * cols && x.len() >= mt * cols);
    #[cfg(target_arch = "x86_64")]
    {
        if cols.is_multiple_of(8) && kernel.avx2() {
            // SAFETY: the CPU has AVX2 and FMA (`kernel` was detected); rows past mr (tokens past mt) repeat
            // the last valid one, so every read lies inside the slices (asserted above).
            return unsafe { x86::dots_4x3(w, mr, x, mt, cols) };
        }
    }
    std::array::from_fn(|i| {
        std::array::from_fn(|j| {
            let (i, j) = (i.min(mr - 1), j.min(mt - 1));
            dot_f32(&w[i * cols..(i + 1) * cols], &x[j * cols..(j + 1) * cols])
        })
    })
}

/// Rows per task: two micro-panels where their packed rows fit in L2, else one. Small
/// tasks keep the threads even (qwen2.5's 896 rows are 14 of them), and a group of
/// tokens (from L3) meets both micro-panels of a task before the next is read.
fn chunk_rows(cols: usize) -> usize {
    if 2 * MR * 4 * cols <= CHUNK_BYTES {
        2 * MR
    } else {
        MR
    }
}

/// [`gemm_multi`] with chunks of `rc` rows (a multiple of [`MR`]; `None`: [`chunk_rows`])
/// and blocks of `tb` tokens.
fn gemm_blocked(
    ws: &[&QMatrix],
    x: &[f32],
    n: usize,
    outs: &mut [&mut [f32]],
    rc: Option<usize>,
    tb: usize,
    kernel: Kernel,
) {
    assert_eq!(ws.len(), outs.len());
    let Some(cols) = ws.first().map(|w| w.cols()) else {
        return;
    };
    assert!(tb > 0 && rc.is_none_or(|rc| rc > 0 && rc.is_multiple_of(MR)));
    assert!(x.len() >= n * cols);
    for (w, out) in ws.iter().zip(outs.iter()) {
        assert!(w.cols() == cols && out.len() >= n * w.rows());
    }
    let mut packed: Vec<f32> = Vec::new();
    for t0 in (0..n).step_by(tb) {
        let nt = tb.min(n - t0);
        pack_tokens(&x[t0 * cols..(t0 + nt) * cols], cols, &mut packed);
        for (w, out) in ws.iter().zip(outs.iter_mut()) {
            let rows = w.rows();
            let rc = rc.unwrap_or_else(|| chunk_rows(cols));
            let dst = Out(out.as_mut_ptr());
            let packed = &packed;
            (0..rows.div_ceil(rc)).into_par_iter().for_each(|c| {
                let r0 = c * rc;
                // SAFETY: the task owns rows r0..r0 + nr of `out`, which holds n tokens
                // of `rows` values (asserted above), and t0 + nt <= n.
                unsafe { chunk_product(w, r0, rc.min(rows - r0), packed, t0, nt, &dst, kernel) };
            });
        }
    }
}

/// The `nt` tokens of `x` (rows of `cols` values) into groups of [`NR`], k-major
/// (`packed[g * NR * cols + k * NR + j]`), zeros past the last token.
fn pack_tokens(x: &[f32], cols: usize, packed: &mut Vec<f32>) {
    let nt = x.len() / cols;
    packed.clear();
    packed.resize(nt.div_ceil(NR) * NR * cols, 0.0);
    packed
        .par_chunks_mut(NR * cols)
        .zip(x.par_chunks(NR * cols))
        .for_each(|(p, xs)| {
            let src: Vec<&[f32]> = xs.chunks_exact(cols).collect();
            // k-major: the writes are sequential, the reads a stream per token.
            for (k, dst) in p.chunks_exact_mut(NR).enumerate() {
                for (d, s) in dst.iter_mut().zip(&src) {
                    *d = s[k];
                }
            }
        });
}

/// One task of [`gemm_blocked`]: rows `r0..r0 + nr` of `w` packed into micro-panels
/// (in the worker's [`PANEL`]), then every group of `packed` (tokens `t0..t0 + nt`)
/// over them, into `dst[t * rows + r]`.
///
/// # Safety
/// No other task may write those rows of `dst`, which must hold `t0 + nt` tokens of
/// `w.rows()` values.
#[allow(clippy::too_many_arguments)]
unsafe fn chunk_product(
    w: &QMatrix,
    r0: usize,
    nr: usize,
    packed: &[f32],
    t0: usize,
    nt: usize,
    dst: &Out,
    kernel: Kernel,
) {
    let (rows, cols) = (w.rows(), w.cols());
    let panels = nr.div_ceil(MR);
    PANEL.with(|cell| {
        let (lines, rows_buf) = &mut *cell.borrow_mut();
        let want = panels * MR * cols / 16;
        if lines.len() < want {
            lines.resize(want, Line([0.0; 16]));
        }
        // Rows are dequantized side by side, then written k-major a micro-panel at a
        // time: the writes fill whole lines, the reads are 32 streams.
        rows_buf.resize(MR * cols, 0.0);
        let panel = &mut floats_mut(lines)[..panels * MR * cols];
        for (m, p) in panel.chunks_exact_mut(MR * cols).enumerate() {
            let live = nr.saturating_sub(m * MR).min(MR);
            for (i, row) in rows_buf.chunks_exact_mut(cols).enumerate() {
                if i < live {
                    w.dequantize_row(r0 + m * MR + i, row);
                } else {
                    row.fill(0.0);
                }
            }
            transpose_rows(rows_buf, cols, p, kernel);
        }
        let panel = &floats(lines)[..panels * MR * cols];
        let mut tile = [0.0f32; MR * NR];
        for (g, group) in packed.chunks_exact(NR * cols).enumerate() {
            let first = g * NR;
            for m in 0..panels {
                kernel.run(&panel[m * MR * cols..], group, cols, &mut tile);
                let (i0, mr) = (r0 + m * MR, (nr - m * MR).min(MR));
                for j in 0..(nt - first).min(NR) {
                    // SAFETY: rows i0..i0 + mr are this task's, and token
                    // t0 + first + j < t0 + nt (the caller's contract).
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            tile[j * MR..].as_ptr(),
                            dst.ptr().add((t0 + first + j) * rows + i0),
                            mr,
                        );
                    }
                }
            }
        }
    });
}

/// `p[k * MR + i] = rows[i * cols + k]` for the [`MR`] rows of `rows`.
fn transpose_rows(rows: &[f32], cols: usize, p: &mut [f32], kernel: Kernel) {
    assert!(rows.len() >= MR * cols && p.len() >= MR * cols);
    let mut k0 = 0;
    #[cfg(target_arch = "x86_64")]
    {
        if kernel.avx2() {
            while k0 + 8 <= cols {
                for i0 in (0..MR).step_by(8) {
                    // SAFETY: the CPU has AVX2 (`kernel`); rows i0..i0 + 8 at columns k0..k0 + 8
                    // and their places in `p` lie inside the slices (asserted above).
                    unsafe {
                        x86::transpose_8x8(
                            rows.as_ptr().add(i0 * cols + k0),
                            cols,
                            p.as_mut_ptr().add(k0 * MR + i0),
                            MR,
                        )
                    };
                }
                k0 += 8;
            }
        }
    }
    for k in k0..cols {
        for i in 0..MR {
            p[k * MR + i] = rows[i * cols + k];
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{MR, NR};
    use crate::kernels::lanes::{hsum, Avx2, Avx512, Lanes};
    use std::arch::x86_64::*;

    /// The whole 32 × 12 tile in 16-row vectors.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn tile_avx512(panel: &[f32], group: &[f32], cols: usize, tile: &mut [f32]) {
        block::<Avx512, NR>(panel, 0, group, 0, cols, tile)
    }

    /// The tile as four quarters of 16 rows × 6 tokens, in 8-row vectors.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile_avx2(panel: &[f32], group: &[f32], cols: usize, tile: &mut [f32]) {
        for (i0, j0) in [(0, 0), (16, 0), (0, 6), (16, 6)] {
            block::<Avx2, 6>(panel, i0, group, j0, cols, tile);
        }
    }

    /// Rows `i0..i0 + 2 S::N` by tokens `j0..j0 + T` of the tile: per k, two loads of
    /// rows and T broadcasts feed 2T fused multiply-adds.
    #[inline(always)]
    unsafe fn block<S: Lanes, const T: usize>(
        panel: &[f32],
        i0: usize,
        group: &[f32],
        j0: usize,
        cols: usize,
        tile: &mut [f32],
    ) {
        let (a, b, n) = (panel.as_ptr().add(i0), group.as_ptr().add(j0), S::N);
        let mut acc = [[S::zero(); 2]; T];
        for k in 0..cols {
            let a0 = S::load(a.add(k * MR));
            let a1 = S::load(a.add(k * MR + n));
            for (j, s) in acc.iter_mut().enumerate() {
                let bj = S::splat(b.add(k * NR + j));
                s[0] = S::fma(a0, bj, s[0]);
                s[1] = S::fma(a1, bj, s[1]);
            }
        }
        let c = tile.as_mut_ptr();
        for (j, s) in acc.iter().enumerate() {
            S::store(c.add((j0 + j) * MR + i0), s[0]);
            S::store(c.add((j0 + j) * MR + i0 + n), s[1]);
        }
    }

    /// [`super::dots_4x3`]: twelve accumulators, one load of each row and token per
    /// eight columns.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dots_4x3(
        w: &[f32],
        mr: usize,
        x: &[f32],
        mt: usize,
        cols: usize,
    ) -> [[f32; 3]; 4] {
        let pw: [*const f32; 4] = std::array::from_fn(|i| w.as_ptr().add(i.min(mr - 1) * cols));
        let px: [*const f32; 3] = std::array::from_fn(|j| x.as_ptr().add(j.min(mt - 1) * cols));
        let mut s = [[_mm256_setzero_ps(); 3]; 4];
        for k in (0..cols).step_by(8) {
            let xv: [__m256; 3] = std::array::from_fn(|j| _mm256_loadu_ps(px[j].add(k)));
            for (si, p) in s.iter_mut().zip(pw) {
                let wv = _mm256_loadu_ps(p.add(k));
                for (acc, xj) in si.iter_mut().zip(xv) {
                    *acc = _mm256_fmadd_ps(wv, xj, *acc);
                }
            }
        }
        s.map(|si| si.map(|v| hsum(v)))
    }

    /// The 8 × 8 block at `src` (rows `stride` apart) into `dst` transposed (rows
    /// `dst_stride` apart).
    #[target_feature(enable = "avx2")]
    pub unsafe fn transpose_8x8(src: *const f32, stride: usize, dst: *mut f32, dst_stride: usize) {
        let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(src.add(i * stride)));
        let t: [__m256; 8] = std::array::from_fn(|i| {
            let (a, b) = (r[2 * (i / 2)], r[2 * (i / 2) + 1]);
            if i % 2 == 0 {
                _mm256_unpacklo_ps(a, b)
            } else {
                _mm256_unpackhi_ps(a, b)
            }
        });
        // u[4h + q]: rows 4h..4h + 4, columns q, q + 4 of each 128-bit half.
        let u: [__m256; 8] = std::array::from_fn(|i| {
            let (h, q) = (i / 4, i % 4);
            let (a, b) = (t[4 * h + q / 2], t[4 * h + 2 + q / 2]);
            if q % 2 == 0 {
                _mm256_shuffle_ps::<0x44>(a, b)
            } else {
                _mm256_shuffle_ps::<0xEE>(a, b)
            }
        });
        for q in 0..4 {
            _mm256_storeu_ps(
                dst.add(q * dst_stride),
                _mm256_permute2f128_ps::<0x20>(u[q], u[4 + q]),
            );
            _mm256_storeu_ps(
                dst.add((q + 4) * dst_stride),
                _mm256_permute2f128_ps::<0x31>(u[q], u[4 + q]),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{quantize_row, GgmlType};

    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| (((i + seed) * 7919 % 1013) as f32 / 1013.0 - 0.5) * 2.0)
            .collect()
    }

    fn kernels() -> Vec<Kernel> {
        let mut ks = vec![Kernel::Plain];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") {
                ks.push(Kernel::Avx512);
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                ks.push(Kernel::Avx2);
            }
        }
        ks
    }

    /// The vector kernels are the plain one's chain of fused multiply-adds, to the bit.
    #[test]
    fn kernels_agree_to_the_bit() {
        let cols = 37;
        let panel = values(MR * cols, 1);
        let group = values(NR * cols, 2);
        let mut want = [0.0f32; MR * NR];
        Kernel::Plain.run(&panel, &group, cols, &mut want);
        // The plain kernel is the sum it says it is.
        for (j, i) in [(0, 0), (11, 31), (5, 17)] {
            let s: f64 = (0..cols)
                .map(|k| panel[k * MR + i] as f64 * group[k * NR + j] as f64)
                .sum();
            assert!((want[j * MR + i] as f64 - s).abs() < 1e-5, "({i}, {j})");
        }
        for k in kernels() {
            let mut got = [f32::NAN; MR * NR];
            k.run(&panel, &group, cols, &mut got);
            let same = got
                .iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{k:?} differs from the plain kernel");
        }
    }

    /// The vector transpose puts every value where the plain loop does.
    #[test]
    fn transpose_is_the_plain_one() {
        for kernel in kernels() {
            for cols in [8, 37, 64] {
                let rows = values(MR * cols, 5);
                let mut p = vec![f32::NAN; MR * cols];
                transpose_rows(&rows, cols, &mut p, kernel);
                for i in 0..MR {
                    for k in 0..cols {
                        assert_eq!(
                            p[k * MR + i],
                            rows[i * cols + k],
                            "{kernel:?} cols {cols} ({i}, {k})"
                        );
                    }
                }
            }
        }
    }

    /// Every kernel, chunk and block size gives dequantize-then-dot's products,
    /// including partial micro-panels, partial groups and several blocks of tokens.
    #[test]
    fn products_match_dequantize_then_dot() {
        for (rows, cols, n) in [
            (70, 96, 29),
            (9, 64, 2),
            (130, 160, 37),
            (32, 33, 12),
            (5, 40, 1),
        ] {
            let data = values(rows * cols, 3);
            let w = if cols.is_multiple_of(32) {
                let bytes: Vec<u8> = data
                    .chunks(cols)
                    .flat_map(|r| quantize_row(GgmlType::Q8_0, r))
                    .collect();
                QMatrix::from_bytes(GgmlType::Q8_0, rows, cols, bytes)
            } else {
                QMatrix::from_f32(rows, cols, data)
            };
            let x = values(n * cols, 4);
            let mut row = vec![0.0f32; cols];
            let mut want = vec![0.0f64; rows * n];
            for r in 0..rows {
                w.dequantize_row(r, &mut row);
                for t in 0..n {
                    want[t * rows + r] = row
                        .iter()
                        .zip(&x[t * cols..])
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum();
                }
            }
            for k in kernels() {
                for (rc, tb) in [(32, 12), (64, 5), (96, 1000)] {
                    let mut got = vec![f32::NAN; rows * n];
                    gemm_blocked(&[&w], &x, n, &mut [&mut got], Some(rc), tb, k);
                    for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (*g as f64 - e).abs() < 1e-4 * (1.0 + e.abs()),
                            "{k:?} {rows}x{cols} n {n} rc {rc} tb {tb}: entry {i}: {g} vs {e}"
                        );
                    }
                }
                let mut got = vec![f32::NAN; rows * n];
                few_tokens(&w, &x, n, &mut got, k);
                for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (*g as f64 - e).abs() < 1e-4 * (1.0 + e.abs()),
                        "{k:?} few tokens {rows}x{cols} n {n}: entry {i}: {g} vs {e}"
                    );
                }
            }
            // `gemm` itself: the few-token path below FEW_TOKENS, the packed one above.
            let mut auto = vec![f32::NAN; rows * n];
            gemm(&w, &x, n, &mut auto);
            for (i, (g, e)) in auto.iter().zip(&want).enumerate() {
                assert!(
                    (*g as f64 - e).abs() < 1e-4 * (1.0 + e.abs()),
                    "gemm {rows}x{cols} n {n}: entry {i}: {g} vs {e}"
                );
            }
        }
    }
}
