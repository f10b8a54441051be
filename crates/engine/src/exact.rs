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
            out[..rows]
                .par_chunks_mut(64)
                .enumerate()
                .for_each(|(b, o)| {
                    for (i, v) in o.iter_mut().enumerate() {
                        *v = dot(w.row_raw(b * 64 + i), x);
                    }
                });
            return;
        }
    }
    const BLOCK: usize = 16;
    let mut tmp = vec![0.0f32; rows * n];
    tmp.par_chunks_mut(BLOCK * n)
        .enumerate()
        .for_each(|(b, chunk)| {
            let mut row = vec![0.0f32; cols];
            for (i, dst) in chunk.chunks_mut(n).enumerate() {
                w.dequantize_row(b * BLOCK + i, &mut row);
                for (t, o) in dst.iter_mut().enumerate() {
                    *o = dot_f32(&row, &x[t * cols..(t + 1) * cols]);
                }
            }
        });
    for r in 0..rows {
        for t in 0..n {
            out[t * rows + r] = tmp[r * n + t];
        }
    }
}

type FusedDot = fn(&[u8], &[f32]) -> f32;

/// A kernel that dots one row's blocks with f32 activations, where there is one.
fn fused_dot(ty: GgmlType) -> Option<FusedDot> {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
        {
            return match ty {
                // SAFETY (both): the CPU features were checked just above.
                GgmlType::Q4_1 => Some(|w, x| unsafe { x86::dot_q4_1(w, x) }),
                GgmlType::Q8_0 => Some(|w, x| unsafe { x86::dot_q8_0(w, x) }),
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

    #[inline]
    fn f16(b: &[u8]) -> f32 {
        half::f16::from_le_bytes([b[0], b[1]]).to_f32()
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }

    /// Q4_1 blocks of 32: {d: f16, m: f16, qs: [u8; 16]}, value = q * d + m, low nibbles
    /// are elements 0..16 and high nibbles 16..32.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q4_1(w: &[u8], x: &[f32]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let mask = _mm_set1_epi8(0x0F);
        for (b, xs) in w.chunks_exact(20).zip(x.chunks_exact(32)) {
            let (d, m) = (f16(&b[0..2]), f16(&b[2..4]));
            let qs = _mm_loadu_si128(b.as_ptr().add(4) as *const __m128i);
            let lo = _mm_and_si128(qs, mask);
            let hi = _mm_and_si128(_mm_srli_epi16(qs, 4), mask);
            let px = xs.as_ptr();
            let mut qx = _mm256_setzero_ps();
            let mut sx = _mm256_setzero_ps();
            for (half, q) in [(0usize, lo), (16, hi)] {
                let q0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q));
                let q1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(q, 8)));
                let x0 = _mm256_loadu_ps(px.add(half));
                let x1 = _mm256_loadu_ps(px.add(half + 8));
                qx = _mm256_fmadd_ps(q0, x0, qx);
                qx = _mm256_fmadd_ps(q1, x1, qx);
                sx = _mm256_add_ps(sx, _mm256_add_ps(x0, x1));
            }
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), qx, acc);
            acc = _mm256_fmadd_ps(_mm256_set1_ps(m), sx, acc);
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

    /// The fused one-token kernels give what dequantize-then-dot gives.
    #[test]
    fn fused_kernels_match_dequantize_then_dot() {
        let (rows, cols) = (70, 576);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * 2.0)
            .collect();
        let x: Vec<f32> = (0..cols)
            .map(|i| ((i * 31 % 97) as f32 / 97.0 - 0.5) * 3.0)
            .collect();
        for ty in [GgmlType::Q4_1, GgmlType::Q8_0] {
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
