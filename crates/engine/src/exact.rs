//! The exact matrix product: weights dequantized to f32 and multiplied by unquantized
//! f32 activations, as a reference implementation computes it.
//!
//! The fast kernels in [`crate::quant`] quantize activations to 8 bits (as llama.cpp
//! does), which moves logits by about 1% per product and, over a deep model, can flip
//! greedy choices. `Precision::Exact`, the default, agrees with fp32 references; one-token
//! products of the commonest formats (Q4_1, Q8_0) use fused kernels that dot the file's
//! blocks with f32 activations directly.

use crate::kernels::dot_f32;
use crate::quant::{GgmlType, QMatrix};
use rayon::prelude::*;

/// How matrix products treat activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Precision {
    /// 8-bit quantized activations with integer dot products (llama.cpp's numerics; fastest).
    Fast,
    /// f32 activations against the file's weights (matches fp32 references; the default).
    #[default]
    Exact,
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fast" => Ok(Precision::Fast),
            "exact" => Ok(Precision::Exact),
            other => Err(format!(
                "unknown precision '{other}' (expected fast or exact)"
            )),
        }
    }
}

/// `out[t*rows + r] = W[r] · x[t]` with f32 activations.
pub fn matmul_exact(w: &QMatrix, x: &[f32], n: usize, out: &mut [f32]) {
    let (rows, cols) = (w.rows(), w.cols());
    if n == 1 {
        if let Some(dot) = fused_dot(w.dtype()) {
            // One token: dot the file's blocks with x directly, without a dequantized row.
            // Formats with per-block offsets use x's sums over blocks of 32, made once here.
            let sums: Vec<f32> = x[..cols].chunks(32).map(|b| b.iter().sum()).collect();
            out[..rows]
                .par_chunks_mut(64)
                .enumerate()
                .for_each(|(b, o)| {
                    for (i, v) in o.iter_mut().enumerate() {
                        *v = dot(w.row_raw(b * 64 + i), x, &sums);
                    }
                });
            return;
        }
    }
    if n == 1 {
        let mut tmp = vec![0.0f32; rows];
        tmp.par_chunks_mut(16).enumerate().for_each(|(b, chunk)| {
            let mut row = vec![0.0f32; cols];
            for (i, o) in chunk.iter_mut().enumerate() {
                w.dequantize_row(b * 16 + i, &mut row);
                *o = dot_f32(&row, x);
            }
        });
        out[..rows].copy_from_slice(&tmp);
        return;
    }
    gemm_exact(w, x, n, out);
}

/// Bytes of f32 rows (weights, or activations) a block of work keeps near the core (L2).
const PANEL_BYTES: usize = 192 * 1024;

thread_local! {
    /// A worker's dequantized weight panel, reused by [`gemm_exact`].
    static PANEL: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Several tokens: a chunk of rows is dequantized once into an f32 panel, then
/// multiplied by blocks of tokens whose activations stay in L2, four rows by three
/// tokens at a time (twelve accumulators in registers).
fn gemm_exact(w: &QMatrix, x: &[f32], n: usize, out: &mut [f32]) {
    let (rows, cols) = (w.rows(), w.cols());
    let threads = rayon::current_num_threads().max(1);
    let fit = (PANEL_BYTES / (4 * cols)).max(4);
    let rc = fit.min(rows.div_ceil(4 * threads)).div_ceil(4).max(1) * 4;
    let tb = fit.max(3);
    let mut tmp = vec![0.0f32; rows * n];
    tmp.par_chunks_mut(rc * n).enumerate().for_each(|(c, dst)| {
        let r0 = c * rc;
        let nr = dst.len() / n;
        // Each worker keeps its panel between calls: every value is overwritten by the
        // dequantization, so zeroing a fresh one each time would be wasted work.
        PANEL.with(|p| {
            let mut p = p.borrow_mut();
            if p.len() < nr * cols {
                p.resize(nr * cols, 0.0);
            }
            let panel = &mut p[..nr * cols];
            for (i, row) in panel.chunks_mut(cols).enumerate() {
                w.dequantize_row(r0 + i, row);
            }
            let mut t0 = 0;
            while t0 < n {
                let t1 = (t0 + tb).min(n);
                let xs = &x[t0 * cols..t1 * cols];
                gemm_block(panel, nr, xs, t1 - t0, cols, &mut dst[t0..], n);
                t0 = t1;
            }
        });
    });
    for r in 0..rows {
        for t in 0..n {
            out[t * rows + r] = tmp[r * n + t];
        }
    }
}

/// `dst[r * stride + t] = panel_r · x_t` for `nr` rows and `nt` tokens of `cols` values.
fn gemm_block(
    panel: &[f32],
    nr: usize,
    x: &[f32],
    nt: usize,
    cols: usize,
    dst: &mut [f32],
    stride: usize,
) {
    #[cfg(target_arch = "x86_64")]
    {
        if cols.is_multiple_of(8)
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
        {
            let mut r = 0;
            while r < nr {
                let mr = (nr - r).min(4);
                let mut t = 0;
                while t < nt {
                    let mt = (nt - t).min(3);
                    let mut acc = [[0.0f32; 3]; 4];
                    // SAFETY: AVX2 and FMA were checked above; the rows and tokens read
                    // lie inside `panel` and `x` (indices clamped to the last valid one).
                    unsafe { x86::tile_4x3(panel, r, mr, x, t, mt, cols, &mut acc) };
                    for (i, a) in acc.iter().enumerate().take(mr) {
                        for (j, v) in a.iter().enumerate().take(mt) {
                            dst[(r + i) * stride + t + j] = *v;
                        }
                    }
                    t += mt;
                }
                r += mr;
            }
            return;
        }
    }
    for r in 0..nr {
        for t in 0..nt {
            dst[r * stride + t] = dot_f32(
                &panel[r * cols..(r + 1) * cols],
                &x[t * cols..(t + 1) * cols],
            );
        }
    }
}

/// (row blocks, activations, activation sums per block of 32) -> dot product.
type FusedDot = fn(&[u8], &[f32], &[f32]) -> f32;

/// A kernel that dots one row's blocks with f32 activations, where there is one.
fn fused_dot(ty: GgmlType) -> Option<FusedDot> {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            return match ty {
                // SAFETY (all): the CPU features were checked just above.
                GgmlType::Q4_1 => Some(|w, x, s| unsafe { x86::dot_q4_1(w, x, s) }),
                GgmlType::Q8_0 => Some(|w, x, _| unsafe { x86::dot_q8_0(w, x) }),
                GgmlType::Q5_0 => Some(|w, x, _| unsafe { x86::dot_q5_0(w, x) }),
                GgmlType::Q4_K => Some(|w, x, s| unsafe { x86::dot_q4_k(w, x, s) }),
                GgmlType::Q6_K => Some(|w, x, _| unsafe { x86::dot_q6_k(w, x) }),
                _ => None,
            };
        }
    }
    let _ = ty;
    None
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// An f16 scale through F16C (half's conversion checks the CPU on every call).
    #[inline]
    #[target_feature(enable = "f16c")]
    unsafe fn f16(b: &[u8]) -> f32 {
        let bits = u16::from_le_bytes([b[0], b[1]]);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }

    /// Up to four rows (from `r`) by up to three tokens (from `t`): the missing ones
    /// repeat the last valid row or token, and their sums are ignored by the caller.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile_4x3(
        panel: &[f32],
        r: usize,
        mr: usize,
        x: &[f32],
        t: usize,
        mt: usize,
        cols: usize,
        acc: &mut [[f32; 3]; 4],
    ) {
        let w: [*const f32; 4] =
            std::array::from_fn(|i| panel.as_ptr().add((r + i.min(mr - 1)) * cols));
        let a: [*const f32; 3] =
            std::array::from_fn(|j| x.as_ptr().add((t + j.min(mt - 1)) * cols));
        let mut s = [[_mm256_setzero_ps(); 3]; 4];
        let mut k = 0;
        while k < cols {
            let x0 = _mm256_loadu_ps(a[0].add(k));
            let x1 = _mm256_loadu_ps(a[1].add(k));
            let x2 = _mm256_loadu_ps(a[2].add(k));
            for i in 0..4 {
                let wv = _mm256_loadu_ps(w[i].add(k));
                s[i][0] = _mm256_fmadd_ps(wv, x0, s[i][0]);
                s[i][1] = _mm256_fmadd_ps(wv, x1, s[i][1]);
                s[i][2] = _mm256_fmadd_ps(wv, x2, s[i][2]);
            }
            k += 8;
        }
        for i in 0..4 {
            for j in 0..3 {
                acc[i][j] = hsum(s[i][j]);
            }
        }
    }

    /// Q4_1 blocks of 32: {d: f16, m: f16, qs: [u8; 16]}, value = q * d + m, low nibbles
    /// are elements 0..16 and high nibbles 16..32.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q4_1(w: &[u8], x: &[f32], sums: &[f32]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let mut macc = 0.0f32;
        let mask = _mm_set1_epi8(0x0F);
        for ((b, xs), &sx) in w.chunks_exact(20).zip(x.chunks_exact(32)).zip(sums) {
            let (d, m) = (f16(&b[0..2]), f16(&b[2..4]));
            let qs = _mm_loadu_si128(b.as_ptr().add(4) as *const __m128i);
            let lo = _mm_and_si128(qs, mask);
            let hi = _mm_and_si128(_mm_srli_epi16(qs, 4), mask);
            let px = xs.as_ptr();
            let mut qx = _mm256_setzero_ps();
            for (half, q) in [(0usize, lo), (16, hi)] {
                let q0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q));
                let q1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(q, 8)));
                qx = _mm256_fmadd_ps(q0, _mm256_loadu_ps(px.add(half)), qx);
                qx = _mm256_fmadd_ps(q1, _mm256_loadu_ps(px.add(half + 8)), qx);
            }
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), qx, acc);
            macc += m * sx;
        }
        hsum(acc) + macc
    }

    /// Dot of 32 signed bytes with 32 f32 activations: the sums over the first and the
    /// last 16 (eight lanes each).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot32(q: __m256i, x: *const f32) -> (__m256, __m256) {
        let lo = _mm256_castsi256_si128(q);
        let hi = _mm256_extracti128_si256(q, 1);
        let f = |v: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
        let a = _mm256_fmadd_ps(
            f(lo),
            _mm256_loadu_ps(x),
            _mm256_mul_ps(f(_mm_srli_si128(lo, 8)), _mm256_loadu_ps(x.add(8))),
        );
        let b = _mm256_fmadd_ps(
            f(hi),
            _mm256_loadu_ps(x.add(16)),
            _mm256_mul_ps(f(_mm_srli_si128(hi, 8)), _mm256_loadu_ps(x.add(24))),
        );
        (a, b)
    }

    /// Q5_0 blocks of 32: {d: f16, qh: u32, qs: [u8; 16]}; element j's high bit is bit j
    /// of qh, low nibbles are elements 0..16; value = (q - 16) * d.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q5_0(w: &[u8], x: &[f32]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let mask = _mm_set1_epi8(0x0F);
        let shuf = _mm256_setr_epi8(
            0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3,
            3, 3, 3,
        );
        let bits = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
        let sixteen = _mm256_set1_epi8(16);
        for (b, xs) in w.chunks_exact(22).zip(x.chunks_exact(32)) {
            let d = f16(&b[0..2]);
            let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
            let qs = _mm_loadu_si128(b.as_ptr().add(6) as *const __m128i);
            let nib = _mm256_set_m128i(
                _mm_and_si128(_mm_srli_epi16(qs, 4), mask),
                _mm_and_si128(qs, mask),
            );
            let hb = _mm256_shuffle_epi8(_mm256_set1_epi32(qh as i32), shuf);
            let hb = _mm256_cmpeq_epi8(_mm256_and_si256(hb, bits), bits);
            let q = _mm256_sub_epi8(_mm256_or_si256(nib, _mm256_and_si256(hb, sixteen)), sixteen);
            let (s0, s1) = dot32(q, xs.as_ptr());
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_add_ps(s0, s1), acc);
        }
        hsum(acc)
    }

    /// Q4_K super-blocks of 256: {d: f16, dmin: f16, scales: [u8; 12], qs: [u8; 128]};
    /// eight sub-blocks of 32 with 6-bit scales and mins; value = d*sc*q - dmin*m.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q4_k(w: &[u8], x: &[f32], sums: &[f32]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let mut macc = 0.0f32;
        let mask = _mm256_set1_epi8(0x0F);
        for ((b, xs), sx) in w
            .chunks_exact(144)
            .zip(x.chunks_exact(256))
            .zip(sums.chunks_exact(8))
        {
            let d = f16(&b[0..2]);
            let dmin = f16(&b[2..4]);
            let sc = &b[4..16];
            let scale_min = |j: usize| -> (f32, f32) {
                if j < 4 {
                    ((sc[j] & 63) as f32, (sc[j + 4] & 63) as f32)
                } else {
                    (
                        ((sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4)) as f32,
                        ((sc[j + 4] >> 4) | ((sc[j] >> 6) << 4)) as f32,
                    )
                }
            };
            let px = xs.as_ptr();
            for j in 0..4 {
                let v = _mm256_loadu_si256(b.as_ptr().add(16 + 32 * j) as *const __m256i);
                for (h, q) in [
                    (0usize, _mm256_and_si256(v, mask)),
                    (1, _mm256_and_si256(_mm256_srli_epi16(v, 4), mask)),
                ] {
                    let (scale, min) = scale_min(2 * j + h);
                    let xp = px.add(64 * j + 32 * h);
                    let (s0, s1) = dot32(q, xp);
                    acc = _mm256_fmadd_ps(_mm256_set1_ps(d * scale), _mm256_add_ps(s0, s1), acc);
                    macc -= dmin * min * sx[2 * j + h];
                }
            }
        }
        hsum(acc) + macc
    }

    /// Q6_K super-blocks of 256: {ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16};
    /// sixteen sub-blocks of 16 with 8-bit scales; value = d * sc * (q - 32).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q6_k(w: &[u8], x: &[f32]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let m4 = _mm256_set1_epi8(0x0F);
        let m2 = _mm256_set1_epi8(0x03);
        let off = _mm256_set1_epi8(32);
        for (b, xs) in w.chunks_exact(210).zip(x.chunks_exact(256)) {
            let d = f16(&b[208..210]);
            let sc = &b[192..208];
            let px = xs.as_ptr();
            for n in 0..2 {
                let ql0 = _mm256_loadu_si256(b.as_ptr().add(64 * n) as *const __m256i);
                let ql1 = _mm256_loadu_si256(b.as_ptr().add(64 * n + 32) as *const __m256i);
                let qh = _mm256_loadu_si256(b.as_ptr().add(128 + 32 * n) as *const __m256i);
                let hi = |shift: i32| -> __m256i {
                    let h = match shift {
                        0 => qh,
                        2 => _mm256_srli_epi16(qh, 2),
                        4 => _mm256_srli_epi16(qh, 4),
                        _ => _mm256_srli_epi16(qh, 6),
                    };
                    _mm256_slli_epi16(_mm256_and_si256(h, m2), 4)
                };
                let groups = [
                    _mm256_or_si256(_mm256_and_si256(ql0, m4), hi(0)),
                    _mm256_or_si256(_mm256_and_si256(ql1, m4), hi(2)),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4), hi(4)),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4), hi(6)),
                ];
                for (g, q) in groups.into_iter().enumerate() {
                    let (s0, s1) = dot32(_mm256_sub_epi8(q, off), px.add(128 * n + 32 * g));
                    let k = 8 * n + 2 * g;
                    acc = _mm256_fmadd_ps(_mm256_set1_ps(d * (sc[k] as i8) as f32), s0, acc);
                    acc = _mm256_fmadd_ps(_mm256_set1_ps(d * (sc[k + 1] as i8) as f32), s1, acc);
                }
            }
        }
        hsum(acc)
    }

    /// Q8_0 blocks of 32: {d: f16, qs: [i8; 32]}, value = q * d.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q8_0(w: &[u8], x: &[f32]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        for (b, xs) in w.chunks_exact(34).zip(x.chunks_exact(32)) {
            let d = f16(&b[0..2]);
            let p = b.as_ptr().add(2);
            let px = xs.as_ptr();
            let mut qx = _mm256_setzero_ps();
            for k in 0..4 {
                let q = _mm_loadl_epi64(p.add(8 * k) as *const __m128i);
                let qf = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
                qx = _mm256_fmadd_ps(qf, _mm256_loadu_ps(px.add(8 * k)), qx);
            }
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), qx, acc);
        }
        hsum(acc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::quantize_row;

    /// The blocked several-token product gives what dequantize-then-dot gives, for odd sizes.
    #[test]
    fn blocked_product_matches_dequantize_then_dot() {
        for (rows, cols, n) in [(70, 576, 11), (9, 64, 2), (130, 1024, 37)] {
            let w: Vec<f32> = (0..rows * cols)
                .map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * 2.0)
                .collect();
            let x: Vec<f32> = (0..cols * n)
                .map(|i| ((i * 31 % 97) as f32 / 97.0 - 0.5) * 3.0)
                .collect();
            let bytes: Vec<u8> = w
                .chunks(cols)
                .flat_map(|r| quantize_row(GgmlType::Q4_1, r))
                .collect();
            let m = QMatrix::from_bytes(GgmlType::Q4_1, rows, cols, bytes);
            let mut got = vec![0.0f32; rows * n];
            matmul_exact(&m, &x, n, &mut got);
            let mut row = vec![0.0f32; cols];
            for r in 0..rows {
                m.dequantize_row(r, &mut row);
                for t in 0..n {
                    let want: f64 = row
                        .iter()
                        .zip(&x[t * cols..])
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum();
                    let g = got[t * rows + r] as f64;
                    assert!(
                        (g - want).abs() < 1e-3 * (1.0 + want.abs()),
                        "{rows}x{cols} n {n}: row {r} token {t}: {g} vs {want}"
                    );
                }
            }
        }
    }

    /// The fused one-token kernels give what dequantize-then-dot gives.
    #[test]
    fn fused_kernels_match_dequantize_then_dot() {
        let (rows, cols) = (70, 768);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * 2.0)
            .collect();
        let x: Vec<f32> = (0..cols)
            .map(|i| ((i * 31 % 97) as f32 / 97.0 - 0.5) * 3.0)
            .collect();
        for ty in [
            GgmlType::Q4_1,
            GgmlType::Q8_0,
            GgmlType::Q5_0,
            GgmlType::Q4_K,
            GgmlType::Q6_K,
        ] {
            let bytes: Vec<u8> = w.chunks(cols).flat_map(|r| quantize_row(ty, r)).collect();
            let m = QMatrix::from_bytes(ty, rows, cols, bytes);
            let mut fused = vec![0.0f32; rows];
            matmul_exact(&m, &x, 1, &mut fused);
            let mut row = vec![0.0f32; cols];
            for (r, got) in fused.iter().enumerate() {
                m.dequantize_row(r, &mut row);
                let want: f64 = row.iter().zip(&x).map(|(a, b)| *a as f64 * *b as f64).sum();
                assert!(
                    (*got as f64 - want).abs() < 1e-3 * (1.0 + want.abs()),
                    "{ty:?} row {r}: {got} vs {want}"
                );
            }
        }
    }
}
