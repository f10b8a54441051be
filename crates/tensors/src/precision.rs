//! The exact matrix product: weights dequantized to f32 and multiplied by unquantized
//! f32 activations, as a reference implementation computes it.
//!
//! The fast kernels in [`crate::quant`] quantize activations to 8 bits (as llama.cpp
//! does), which moves logits by about 1% per product and, over a deep model, can flip
//! greedy choices. `Precision::Exact`, the default, agrees with fp32 references; one-token
//! products of the commonest formats (Q4_1, Q8_0, Q5_0, Q4_K, Q6_K) use fused kernels
//! that dot the file's blocks with f32 activations directly.
//!
//! `Precision::Balanced` keeps the exact several-token products and rounds one token's
//! activations to 16-bit fixed point per block of 32 ([`matmul_balanced`]), so that the
//! fused kernels multiply integers (`madd`) and convert to f32 once per (sub-)block.

use crate::kernels::dot_f32;
use crate::quant::{GgmlType, QMatrix};
use rayon::prelude::*;

/// How matrix products treat activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Precision {
    /// 8-bit quantized activations with integer dot products (llama.cpp's numerics; fastest).
    Fast,
    /// f32 activations in several-token products (prefill), as `Exact`; in one-token
    /// products (decoding), activations rounded per block of 32 to 16-bit fixed point
    /// (scale = the block's largest |x| / 32767: each value off by at most half the
    /// scale, about 2^-16 of the block's largest activation), with integer dot
    /// products. Formats without such a kernel (all but Q4_1, Q8_0, Q5_0, Q4_K and
    /// Q6_K) and CPUs without AVX2, FMA and F16C take the exact path.
    Balanced,
    /// f32 activations against the file's weights (matches fp32 references; the default).
    #[default]
    Exact,
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fast" => Ok(Precision::Fast),
            "balanced" => Ok(Precision::Balanced),
            "exact" => Ok(Precision::Exact),
            other => Err(format!(
                "unknown precision '{other}' (expected exact, balanced or fast)"
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
    crate::gemm::gemm(w, x, n, out);
}

/// [`matmul_exact`] of several matrices with the same input: several tokens are packed
/// once for all of them.
pub fn matmul_exact_multi(ws: &[&QMatrix], x: &[f32], n: usize, outs: &mut [&mut [f32]]) {
    if n > 1 {
        crate::gemm::gemm_multi(ws, x, n, outs);
        return;
    }
    for (w, o) in ws.iter().zip(outs.iter_mut()) {
        matmul_exact(w, x, n, o);
    }
}

/// One token's activations rounded per block of 32 to 16-bit fixed point:
/// `x[i] ≈ scale[i / 32] * q[i]` with `scale` = the block's largest |x| / 32767 (0 for
/// a block of zeros), so each value is off by at most `scale / 2`; with the exact f32
/// sums of each block (for the formats with per-block offsets).
struct Fixed16 {
    q: Vec<i16>,
    /// `q` with each block of 32 in the order 0..8, 16..24, 8..16, 24..32: the order
    /// of bytes that in-lane unpacks (`_mm256_unpack{lo,hi}_epi8`) widen to i16.
    qi: Vec<i16>,
    scale: Vec<f32>,
    sums: Vec<f32>,
    /// The sums of `q` over each 16 (integers, exact in f32): formats whose weights
    /// are stored with an offset multiply the unsigned values and take the offset
    /// times these sums.
    qsum16: Vec<f32>,
    /// The same over each 32.
    qsum32: Vec<f32>,
}

impl Fixed16 {
    /// Round `x` (a multiple of 32 values long, or its last block is padded with zeros).
    fn new(x: &[f32]) -> Fixed16 {
        let nb = x.len().div_ceil(32);
        let mut q = vec![0i16; nb * 32];
        let mut scale = Vec::with_capacity(nb);
        let mut sums = Vec::with_capacity(nb);
        for (b, qb) in x.chunks(32).zip(q.chunks_mut(32)) {
            let sum: f32 = b.iter().sum();
            let max = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let s = max / 32767.0;
            if s > 0.0 && s.is_finite() {
                // q = round(x / s) with the f32 scale used by the kernels, so that
                // |x - s * q| <= s / 2; |q| <= 32767 since s is within 2^-24 of max/32767.
                let inv = 1.0 / s as f64;
                for (o, v) in qb.iter_mut().zip(b) {
                    *o = (*v as f64 * inv).round().clamp(-32767.0, 32767.0) as i16;
                }
            }
            // Non-finite activations make the block's products NaN, as in f32.
            sums.push(sum);
            scale.push(if sum.is_finite() { s } else { f32::NAN });
        }
        let mut qi = vec![0i16; q.len()];
        for (o, b) in qi.chunks_exact_mut(32).zip(q.chunks_exact(32)) {
            for (k, start) in [0, 16, 8, 24].into_iter().enumerate() {
                o[8 * k..8 * k + 8].copy_from_slice(&b[start..start + 8]);
            }
        }
        let qsum16: Vec<f32> = q
            .chunks_exact(16)
            .map(|c| c.iter().map(|&v| v as i32).sum::<i32>() as f32)
            .collect();
        let mut qsum32: Vec<f32> = qsum16.chunks_exact(2).map(|p| p[0] + p[1]).collect();
        // Kernels load the scales and sums of eight blocks at a time.
        let padded = nb.next_multiple_of(8);
        scale.resize(padded, 0.0);
        sums.resize(padded, 0.0);
        qsum32.resize(padded, 0.0);
        Fixed16 {
            q,
            qi,
            scale,
            sums,
            qsum16,
            qsum32,
        }
    }
}

/// One-token products with 16-bit fixed-point activations (see [`Fixed16`]) for the
/// formats that have such a kernel; everything else (several tokens, other formats or
/// CPUs) is [`matmul_exact`].
pub fn matmul_balanced(w: &QMatrix, x: &[f32], n: usize, out: &mut [f32]) {
    if n == 1 {
        if let Some(rows) = balanced_dot(w.dtype()) {
            let a = Fixed16::new(&x[..w.cols()]);
            balanced_rows(w, rows, &a, out);
            return;
        }
    }
    matmul_exact(w, x, n, out);
}

/// [`matmul_balanced`] of several matrices with the same input, rounded once.
pub fn matmul_balanced_multi(ws: &[&QMatrix], x: &[f32], n: usize, outs: &mut [&mut [f32]]) {
    if n > 1 {
        matmul_exact_multi(ws, x, n, outs);
        return;
    }
    let mut fixed: Option<Fixed16> = None;
    for (w, o) in ws.iter().zip(outs.iter_mut()) {
        match balanced_dot(w.dtype()).filter(|_| n == 1) {
            Some(rows) => {
                let cols = w.cols();
                let a = match fixed.take() {
                    Some(a) if a.q.len() == cols.div_ceil(32) * 32 => a,
                    _ => Fixed16::new(&x[..cols]),
                };
                balanced_rows(w, rows, &a, o);
                fixed = Some(a);
            }
            None => matmul_exact(w, x, n, o),
        }
    }
}

fn balanced_rows(w: &QMatrix, rows: BalancedRows, a: &Fixed16, out: &mut [f32]) {
    out[..w.rows()]
        .par_chunks_mut(64)
        .enumerate()
        .for_each(|(b, o)| {
            rows(
                w.dtype(),
                w.raw(),
                w.dtype().row_bytes(w.cols()),
                b * 64,
                a,
                o,
            )
        });
}

/// (format, all the weight bytes, bytes per row, first row `r0`, fixed-point
/// activations, `out`): the products of rows `r0..r0 + out.len()` into `out`.
type BalancedRows = fn(GgmlType, &[u8], usize, usize, &Fixed16, &mut [f32]);

/// Kernels that dot rows' blocks with 16-bit fixed-point activations, where there are.
fn balanced_dot(ty: GgmlType) -> Option<BalancedRows> {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::kernels::Family::active() >= crate::kernels::Family::Avx2
            && matches!(
                ty,
                GgmlType::Q4_1 | GgmlType::Q8_0 | GgmlType::Q5_0 | GgmlType::Q4_K | GgmlType::Q6_K
            )
        {
            // SAFETY: the CPU features were checked just above, and the type has a kernel.
            return Some(|ty, w, rb, r0, a, out| unsafe { x86::fixed_rows(ty, w, rb, r0, a, out) });
        }
    }
    let _ = ty;
    None
}

/// (row blocks, activations, activation sums per block of 32) -> dot product.
type FusedDot = fn(&[u8], &[f32], &[f32]) -> f32;

/// A kernel that dots one row's blocks with f32 activations, where there is one.
fn fused_dot(ty: GgmlType) -> Option<FusedDot> {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::kernels::Family::active() >= crate::kernels::Family::Avx2 {
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
    use super::Fixed16;
    use crate::kernels::lanes::hsum;
    use crate::quant::GgmlType;
    use std::arch::x86_64::*;

    /// An f16 scale through F16C (half's conversion checks the CPU on every call).
    #[inline]
    #[target_feature(enable = "f16c")]
    unsafe fn f16(b: &[u8]) -> f32 {
        let bits = u16::from_le_bytes([b[0], b[1]]);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
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

    // Fixed-point kernels. Activations are i16 (|q| <= 32767), weights widened to i16,
    // and `_mm256_madd_epi16` adds pairs of products into i32 lanes; the lanes are
    // converted to f32 once per block of 32 (Q4_K: sub-block of 32). Each lane then
    // holds at most four products, of weights |w| <= 128 (Q8_0; Q4_1 and Q4_K 15,
    // Q5_0 31 and Q6_K 63 as unsigned values, their offsets going with the sums of
    // the activations), so |lane| <= 4 * 128 * 32767 = 16_776_704 < 2^24: no i32
    // overflow, and the conversion to f32 is exact.

    /// A broadcast of the f32 at `p` as one load (the compiler may otherwise build it
    /// from a register with shuffles).
    #[inline]
    #[target_feature(enable = "avx")]
    unsafe fn bcast(p: *const f32) -> __m256 {
        let r: __m256;
        std::arch::asm!(
            "vbroadcastss {r}, dword ptr [{p}]",
            r = lateout(ymm_reg) r,
            p = in(reg) p,
            options(pure, readonly, nostack, preserves_flags)
        );
        r
    }

    /// 16 bytes at `p` widened to i16 lanes, as one instruction: the compiler would
    /// otherwise move masks and shifts applied to the result before the widening,
    /// which doubles the widenings.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn widen_u8(p: *const u8) -> __m256i {
        let r: __m256i;
        std::arch::asm!(
            "vpmovzxbw {r}, xmmword ptr [{p}]",
            r = lateout(ymm_reg) r,
            p = in(reg) p,
            options(pure, readonly, nostack, preserves_flags)
        );
        r
    }

    /// The f16 at `p`, `p + stride`, ... for `n` of eight (zeros past `n`) as f32.
    #[inline(always)]
    unsafe fn f16x8(p: *const u8, stride: usize, n: usize) -> __m256 {
        let h = |k: usize| (p.add(k * stride) as *const u16).read_unaligned() as u64;
        let v = if n >= 8 {
            let lo = h(0) | h(1) << 16 | h(2) << 32 | h(3) << 48;
            let hi = h(4) | h(5) << 16 | h(6) << 32 | h(7) << 48;
            _mm_set_epi64x(hi as i64, lo as i64)
        } else {
            let mut v = [0u16; 8];
            for (k, x) in v.iter_mut().enumerate().take(n) {
                *x = h(k) as u16;
            }
            _mm_loadu_si128(v.as_ptr() as *const __m128i)
        };
        _mm256_cvtph_ps(v)
    }

    const Q4_1: u8 = 0;
    const Q8_0: u8 = 1;
    const Q5_0: u8 = 2;

    /// `NR` rows of Q4_1, Q8_0 or Q5_0 (`KIND`; blocks of `TS` bytes, see [`dot_q4_1`],
    /// [`dot_q8_0`], [`dot_q5_0`]) with fixed-point activations. Weight scales times
    /// activation scales, and the offsets (Q4_1's m times the exact f32 block sums,
    /// Q5_0's -16 times the sums of the fixed-point values) are taken eight blocks at
    /// a time.
    #[inline(always)]
    // Over 100 lines on purpose: one unrolled AVX2 kernel (fixed-point blocks of 32),
    // whose accumulators live in registers across the whole loop.
    unsafe fn fixed_b32<const KIND: u8, const TS: usize, const NR: usize>(
        rows: [*const u8; NR],
        a: &Fixed16,
    ) -> [f32; NR] {
        let nb = a.q.len() / 32;
        let xq = if KIND == Q5_0 { &a.qi } else { &a.q }.as_ptr() as *const __m256i;
        let zero = _mm256_setzero_si256();
        let mut acc0 = [_mm256_setzero_ps(); NR];
        let mut acc1 = [_mm256_setzero_ps(); NR];
        let mut accm = [_mm256_setzero_ps(); NR];
        let mut sbuf = [[0f32; 8]; NR];
        let m16 = _mm256_set1_epi16(0x0F);
        let m8 = _mm256_set1_epi8(0x0F);
        let shuf = _mm256_setr_epi8(
            0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3,
            3, 3, 3,
        );
        let bits = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
        let sixteen = _mm256_set1_epi8(16);
        let mut b0 = 0;
        while b0 < nb {
            let kn = (nb - b0).min(8);
            // The scales and sums are padded with zeros to a multiple of eight blocks.
            let s8 = _mm256_loadu_ps(a.scale.as_ptr().add(b0));
            for j in 0..NR {
                let p0 = rows[j].add(b0 * TS);
                prefetch_ahead(p0, 8 * TS);
                let d8 = f16x8(p0, TS, kn);
                _mm256_storeu_ps(sbuf[j].as_mut_ptr(), _mm256_mul_ps(d8, s8));
                if KIND == Q4_1 {
                    let sums = _mm256_loadu_ps(a.sums.as_ptr().add(b0));
                    accm[j] = _mm256_fmadd_ps(f16x8(p0.add(2), TS, kn), sums, accm[j]);
                }
                if KIND == Q5_0 {
                    // The offset: -16 * d * s * (sum of q over the block).
                    let qs16 = _mm256_mul_ps(
                        _mm256_loadu_ps(a.qsum32.as_ptr().add(b0)),
                        _mm256_set1_ps(16.0),
                    );
                    accm[j] = _mm256_fnmadd_ps(_mm256_mul_ps(d8, s8), qs16, accm[j]);
                }
            }
            // (A macro, not a closure: closures do not inherit target features.)
            macro_rules! blk {
                ($k:expr, $acc:ident) => {{
                    let k = $k;
                    let x0 = _mm256_loadu_si256(xq.add(2 * (b0 + k)));
                    let x1 = _mm256_loadu_si256(xq.add(2 * (b0 + k) + 1));
                    for j in 0..NR {
                        let p = rows[j].add((b0 + k) * TS);
                        let (w0, w1) = match KIND {
                            Q4_1 => {
                                // Each byte in an i16 lane: its low nibble is element i,
                                // its high nibble element i + 16.
                                let v = widen_u8(p.add(4));
                                (_mm256_and_si256(v, m16), _mm256_srli_epi16(v, 4))
                            }
                            Q8_0 => (
                                _mm256_cvtepi8_epi16(_mm_loadu_si128(p.add(2) as *const __m128i)),
                                _mm256_cvtepi8_epi16(_mm_loadu_si128(p.add(18) as *const __m128i)),
                            ),
                            _ => {
                                // Unsigned 5-bit values (the offset goes with the sums),
                                // elements 0..16 in the low lane and 16..32 in the high
                                // one, widened in the order of `qi`.
                                let qh = (p.add(2) as *const u32).read_unaligned();
                                let qs = _mm_loadu_si128(p.add(6) as *const __m128i);
                                let nib = _mm256_and_si256(
                                    _mm256_set_m128i(_mm_srli_epi16(qs, 4), qs),
                                    m8,
                                );
                                let hb = _mm256_shuffle_epi8(_mm256_set1_epi32(qh as i32), shuf);
                                let hb = _mm256_cmpeq_epi8(_mm256_and_si256(hb, bits), bits);
                                let q = _mm256_or_si256(nib, _mm256_and_si256(hb, sixteen));
                                (_mm256_unpacklo_epi8(q, zero), _mm256_unpackhi_epi8(q, zero))
                            }
                        };
                        let prod =
                            _mm256_add_epi32(_mm256_madd_epi16(w0, x0), _mm256_madd_epi16(w1, x1));
                        $acc[j] = _mm256_fmadd_ps(
                            _mm256_cvtepi32_ps(prod),
                            bcast(sbuf[j].as_ptr().add(k)),
                            $acc[j],
                        );
                    }
                }};
            }
            // Two accumulators a row, for even and odd blocks.
            if kn == 8 {
                for k in 0..4 {
                    blk!(2 * k, acc0);
                    blk!(2 * k + 1, acc1);
                }
            } else {
                for k in 0..kn {
                    blk!(k, acc0);
                }
            }
            b0 += 8;
        }
        std::array::from_fn(|j| hsum(_mm256_add_ps(_mm256_add_ps(acc0[j], acc1[j]), accm[j])))
    }

    /// How far ahead (bytes) the fixed-point kernels prefetch weight rows.
    const PREFETCH_BYTES: usize = 6 << 10;

    /// Prefetches the lines of `bytes` bytes from `p` + [`PREFETCH_BYTES`], spread
    /// through a kernel's loop (a burst of a whole row's lines fills the line-fill
    /// buffers and stalls the core). Addresses past the matrix are harmless: a prefetch
    /// never faults, and `wrapping_add` keeps the pointer arithmetic defined.
    #[inline(always)]
    unsafe fn prefetch_ahead(p: *const u8, bytes: usize) {
        let p = p.wrapping_add(PREFETCH_BYTES);
        let mut o = 0;
        while o < bytes {
            _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(o) as *const i8);
            o += 64;
        }
    }

    /// `out[i] = W[r0 + i] · x` for the rows of a Q4_1, Q8_0, Q5_0, Q4_K or Q6_K matrix
    /// (`raw`, `rb` bytes a row) with fixed-point activations.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn fixed_rows(
        ty: GgmlType,
        raw: &[u8],
        rb: usize,
        r0: usize,
        a: &Fixed16,
        out: &mut [f32],
    ) {
        let r1 = r0 + out.len();
        assert!(r1 * rb <= raw.len() && rb == ty.row_bytes(a.q.len()));
        let base = raw.as_ptr();
        // Two rows a pass share the activations' loads (measured faster than one).
        macro_rules! rows2 {
            ($f:ident $(, $c:expr)*) => {{
                let mut r = r0;
                while r + 2 <= r1 {
                    let v = $f::<$($c,)* 2>([base.add(r * rb), base.add((r + 1) * rb)], a);
                    out[r - r0] = v[0];
                    out[r + 1 - r0] = v[1];
                    r += 2;
                }
                if r < r1 {
                    out[r - r0] = $f::<$($c,)* 1>([base.add(r * rb)], a)[0];
                }
            }};
        }
        match ty {
            GgmlType::Q4_1 => rows2!(fixed_b32, Q4_1, 20),
            GgmlType::Q8_0 => rows2!(fixed_b32, Q8_0, 34),
            GgmlType::Q5_0 => rows2!(fixed_b32, Q5_0, 22),
            GgmlType::Q4_K => rows2!(fixed_q4_k),
            GgmlType::Q6_K => {
                // One row a pass: two need more registers than there are (measured
                // slower).
                for (i, o) in out.iter_mut().enumerate() {
                    *o = fixed_q6_k::<1>([base.add((r0 + i) * rb)], a)[0];
                }
            }
            _ => unreachable!("no fixed-point kernel for {ty:?}"),
        }
    }

    /// The f16 at `p` as f32.
    #[inline(always)]
    unsafe fn f16_at(p: *const u8) -> f32 {
        let bits = (p as *const u16).read_unaligned();
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    /// Q4_K's twelve bytes of 6-bit scales and mins (see [`dot_q4_k`]) as two vectors
    /// of eight f32.
    #[inline(always)]
    unsafe fn k_scales_mins(p: *const u8) -> (__m256, __m256) {
        let w = |k: usize| (p.add(4 * k) as *const u32).read_unaligned();
        let (w0, w1, w2) = (w(0), w(1), w(2));
        let sc_lo = w0 & 0x3f3f_3f3f;
        let m_lo = w1 & 0x3f3f_3f3f;
        let sc_hi = (w2 & 0x0f0f_0f0f) | ((w0 >> 6) & 0x0303_0303) << 4;
        let m_hi = ((w2 >> 4) & 0x0f0f_0f0f) | ((w1 >> 6) & 0x0303_0303) << 4;
        let f = |lo: u32, hi: u32| {
            let v = _mm_cvtsi64_si128((lo as u64 | (hi as u64) << 32) as i64);
            _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v))
        };
        (f(sc_lo, sc_hi), f(m_lo, m_hi))
    }

    /// `NR` rows of Q4_K (see [`dot_q4_k`]) with fixed-point activations: one
    /// activation scale per sub-block of 32.
    #[inline(always)]
    unsafe fn fixed_q4_k<const NR: usize>(rows: [*const u8; NR], a: &Fixed16) -> [f32; NR] {
        let nsb = a.q.len() / 256;
        let xq = a.q.as_ptr() as *const __m256i;
        let mask = _mm256_set1_epi16(0x0F);
        let mut acc = [[_mm256_setzero_ps(); 2]; NR];
        let mut accm = [_mm256_setzero_ps(); NR];
        let mut sbuf = [[0f32; 8]; NR];
        for s in 0..nsb {
            let s8 = _mm256_loadu_ps(a.scale.as_ptr().add(8 * s));
            let sums8 = _mm256_loadu_ps(a.sums.as_ptr().add(8 * s));
            for j in 0..NR {
                let p = rows[j].add(144 * s);
                prefetch_ahead(p, 144);
                let (sc, m) = k_scales_mins(p.add(4));
                let d = _mm256_set1_ps(f16_at(p));
                _mm256_storeu_ps(
                    sbuf[j].as_mut_ptr(),
                    _mm256_mul_ps(_mm256_mul_ps(sc, d), s8),
                );
                let dmin = _mm256_set1_ps(f16_at(p.add(2)));
                accm[j] = _mm256_fnmadd_ps(_mm256_mul_ps(m, dmin), sums8, accm[j]);
            }
            for c in 0..4 {
                // 32 bytes: low nibbles are sub-block 2c, high nibbles 2c + 1; each
                // half of the bytes widened to i16 lanes.
                let x4 = xq.add(16 * s + 4 * c);
                let x = [0, 1, 2, 3].map(|i| _mm256_loadu_si256(x4.add(i)));
                for j in 0..NR {
                    let p = rows[j].add(144 * s + 16 + 32 * c);
                    let (v0, v1) = (widen_u8(p), widen_u8(p.add(16)));
                    let lo = _mm256_add_epi32(
                        _mm256_madd_epi16(_mm256_and_si256(v0, mask), x[0]),
                        _mm256_madd_epi16(_mm256_and_si256(v1, mask), x[1]),
                    );
                    let hi = _mm256_add_epi32(
                        _mm256_madd_epi16(_mm256_srli_epi16(v0, 4), x[2]),
                        _mm256_madd_epi16(_mm256_srli_epi16(v1, 4), x[3]),
                    );
                    let sb = sbuf[j].as_ptr().add(2 * c);
                    acc[j][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo), bcast(sb), acc[j][0]);
                    acc[j][1] =
                        _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi), bcast(sb.add(1)), acc[j][1]);
                }
            }
        }
        std::array::from_fn(|j| hsum(_mm256_add_ps(_mm256_add_ps(acc[j][0], acc[j][1]), accm[j])))
    }

    /// `NR` rows of Q6_K (see [`dot_q6_k`]) with fixed-point activations (one
    /// activation scale per two sub-blocks of 16): unsigned 6-bit values against the activations in the
    /// order of `qi`, so that the i32 lanes of a block of 32 hold sub-block k (0..4)
    /// and k + 1 (4..8), scaled by one vector; the offset of 32 goes with `qsum16`.
    #[inline(always)]
    #[allow(clippy::needless_range_loop)] // h and j index several arrays each
    unsafe fn fixed_q6_k<const NR: usize>(rows: [*const u8; NR], a: &Fixed16) -> [f32; NR] {
        let nsb = a.q.len() / 256;
        let xq = a.qi.as_ptr() as *const __m256i;
        let m4 = _mm256_set1_epi8(0x0F);
        let m30 = _mm256_set1_epi8(0x30);
        let zero = _mm256_setzero_si256();
        let lo_pairs = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
        let hi_pairs = _mm256_setr_epi32(4, 4, 5, 5, 6, 6, 7, 7);
        let mut acc = [[_mm256_setzero_ps(); 2]; NR];
        let mut accm = [_mm256_setzero_ps(); NR];
        for s in 0..nsb {
            // Sub-block k's scale times the activation scale of its block of 32, k / 2.
            let s8 = _mm256_loadu_ps(a.scale.as_ptr().add(8 * s));
            let s_lo = _mm256_permutevar8x32_ps(s8, lo_pairs);
            let s_hi = _mm256_permutevar8x32_ps(s8, hi_pairs);
            let thirty_two = _mm256_set1_ps(32.0);
            let qs0 = _mm256_mul_ps(_mm256_loadu_ps(a.qsum16.as_ptr().add(16 * s)), thirty_two);
            let qs1 = _mm256_mul_ps(
                _mm256_loadu_ps(a.qsum16.as_ptr().add(16 * s + 8)),
                thirty_two,
            );
            let mut sc = [[_mm256_setzero_ps(); 2]; NR];
            for j in 0..NR {
                let p = rows[j].add(210 * s);
                prefetch_ahead(p, 210);
                let d = _mm256_set1_ps(f16_at(p.add(208)));
                let b = _mm_loadu_si128(p.add(192) as *const __m128i);
                let f0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
                let f1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)));
                sc[j] = [
                    _mm256_mul_ps(_mm256_mul_ps(f0, d), s_lo),
                    _mm256_mul_ps(_mm256_mul_ps(f1, d), s_hi),
                ];
                accm[j] = _mm256_fnmadd_ps(sc[j][0], qs0, accm[j]);
                accm[j] = _mm256_fnmadd_ps(sc[j][1], qs1, accm[j]);
            }
            for h in 0..2 {
                for g in 0..4 {
                    // Elements 128h + 32g.. of 32: the low or high nibbles of ql (32
                    // bytes at 64h, or 64h + 32) and two bits of qh (at 128 + 32h).
                    let x4 = xq.add(16 * s + 8 * h + 2 * g);
                    let (x0, x1) = (_mm256_loadu_si256(x4), _mm256_loadu_si256(x4.add(1)));
                    let pick = _mm256_setr_epi32(
                        2 * g as i32,
                        2 * g as i32,
                        2 * g as i32,
                        2 * g as i32,
                        2 * g as i32 + 1,
                        2 * g as i32 + 1,
                        2 * g as i32 + 1,
                        2 * g as i32 + 1,
                    );
                    for j in 0..NR {
                        let p = rows[j].add(210 * s);
                        let ql = _mm256_loadu_si256(p.add(64 * h + 32 * (g & 1)) as *const __m256i);
                        let qh = _mm256_loadu_si256(p.add(128 + 32 * h) as *const __m256i);
                        let (nib, hi) = match g {
                            0 => (ql, _mm256_slli_epi16(qh, 4)),
                            1 => (ql, _mm256_slli_epi16(qh, 2)),
                            2 => (_mm256_srli_epi16(ql, 4), qh),
                            _ => (_mm256_srli_epi16(ql, 4), _mm256_srli_epi16(qh, 2)),
                        };
                        let q =
                            _mm256_or_si256(_mm256_and_si256(nib, m4), _mm256_and_si256(hi, m30));
                        let prod = _mm256_add_epi32(
                            _mm256_madd_epi16(_mm256_unpacklo_epi8(q, zero), x0),
                            _mm256_madd_epi16(_mm256_unpackhi_epi8(q, zero), x1),
                        );
                        let scale = _mm256_permutevar8x32_ps(sc[j][h], pick);
                        acc[j][g & 1] =
                            _mm256_fmadd_ps(_mm256_cvtepi32_ps(prod), scale, acc[j][g & 1]);
                    }
                }
            }
        }
        std::array::from_fn(|j| hsum(_mm256_add_ps(_mm256_add_ps(acc[j][0], acc[j][1]), accm[j])))
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

    /// A deterministic generator of values in [-1, 1).
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> f32 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        }
    }

    /// Random activations with a block of zeros every fifth block and one huge value
    /// in every fifth block from the fourth.
    fn activations(cols: usize, rng: &mut Rng) -> Vec<f32> {
        let mut x: Vec<f32> = (0..cols).map(|_| 3.0 * rng.next()).collect();
        for (b, blk) in x.chunks_mut(32).enumerate() {
            match b % 5 {
                1 => blk.fill(0.0),
                3 => blk[(b * 7) % 32] = if b % 2 == 0 { 900.0 } else { -2500.0 },
                _ => {}
            }
        }
        x
    }

    const BALANCED_TYPES: [GgmlType; 5] = [
        GgmlType::Q4_1,
        GgmlType::Q8_0,
        GgmlType::Q5_0,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
    ];

    /// Whether the balanced kernels run: the active kernel family (the CPU's widest, or
    /// the one `KVMERGER_KERNELS` forces) has AVX2, FMA and F16C.
    fn has_kernels() -> bool {
        crate::kernels::Family::active() >= crate::kernels::Family::Avx2
    }

    /// Rounding to 16-bit fixed point is off by at most half a step, a step is the
    /// block's largest |x| / 32767, and a block of zeros stays zero.
    #[test]
    fn fixed16_rounds_each_value_within_half_a_step() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let x = activations(800, &mut rng);
        let a = Fixed16::new(&x);
        assert_eq!(a.q.len(), 800usize.div_ceil(32) * 32);
        for (b, blk) in x.chunks(32).enumerate() {
            let max = blk.iter().fold(0.0f32, |m, v| m.max(v.abs())) as f64;
            let s = a.scale[b] as f64;
            assert!(
                (s - max / 32767.0).abs() <= 1e-7 * max / 32767.0,
                "block {b}"
            );
            assert_eq!(a.sums[b], blk.iter().sum::<f32>());
            let qb = &a.q[32 * b..32 * b + 32];
            let sum16 = |h: usize| {
                qb[16 * h..16 * h + 16]
                    .iter()
                    .map(|&v| v as f32)
                    .sum::<f32>()
            };
            assert_eq!(a.qsum16[2 * b..2 * b + 2], [sum16(0), sum16(1)]);
            assert_eq!(a.qsum32[b], sum16(0) + sum16(1));
            let qi = &a.qi[32 * b..32 * b + 32];
            for i in 0..32 {
                // qi holds elements 0..8, 16..24, 8..16, 24..32.
                assert_eq!(qi[i], qb[[0, 16, 8, 24][i / 8] + i % 8]);
            }
            for (i, v) in blk.iter().enumerate() {
                let q = a.q[32 * b + i] as f64;
                assert!(q.abs() <= 32767.0);
                let err = (*v as f64 - s * q).abs();
                assert!(err <= s / 2.0, "block {b} value {i}: {v} -> {q} * {s}");
                if max == 0.0 {
                    assert_eq!(q, 0.0);
                }
            }
        }
        // NaN stays NaN in the products.
        let mut y = x.clone();
        y[40] = f32::NAN;
        let w: Vec<f32> = (0..2 * 800).map(|_| rng.next()).collect();
        let m = QMatrix::quantize(GgmlType::Q8_0, 2, 800, &w);
        let mut out = [0.0f32; 2];
        matmul_balanced(&m, &y, 1, &mut out);
        assert!(out.iter().all(|v| v.is_nan()), "{out:?}");
    }

    /// Each balanced kernel against dequantize-then-dot in f64: the error is within the
    /// 16-bit rounding's bound, sum over blocks of (step / 2) * sum |w|, plus f32 slack;
    /// and balanced is much closer than fast (8-bit activations) is.
    #[test]
    fn balanced_kernels_match_dequantize_then_dot_within_the_rounding_bound() {
        let mut rng = Rng(0x2545_F491_4F6C_DD1D);
        for ty in BALANCED_TYPES {
            if has_kernels() {
                assert!(balanced_dot(ty).is_some(), "{ty:?} has no balanced kernel");
            }
            let sizes: &[usize] = if ty.block_size() == 256 {
                &[256, 768, 4864]
            } else {
                &[32, 96, 576, 4864]
            };
            let (mut err_balanced, mut err_fast) = (0.0f64, 0.0f64);
            for &cols in sizes {
                let rows = 13;
                let w: Vec<f32> = (0..rows * cols)
                    .map(|i| rng.next() * if i / cols == 5 { 40.0 } else { 1.0 })
                    .collect();
                let m = QMatrix::quantize(ty, rows, cols, &w);
                let x = activations(cols, &mut rng);
                let a = Fixed16::new(&x);
                let mut got = vec![0.0f32; rows];
                matmul_balanced(&m, &x, 1, &mut got);
                let mut fast = vec![0.0f32; rows];
                m.matmul(&x, 1, &mut fast);
                let mut row = vec![0.0f32; cols];
                for r in 0..rows {
                    m.dequantize_row(r, &mut row);
                    let want: f64 = row.iter().zip(&x).map(|(a, b)| *a as f64 * *b as f64).sum();
                    let mut bound = 0.0f64;
                    let mut mag = 0.0f64;
                    for (b, (wb, xb)) in row.chunks(32).zip(x.chunks(32)).enumerate() {
                        let l1: f64 = wb.iter().map(|v| v.abs() as f64).sum();
                        bound += a.scale[b] as f64 / 2.0 * l1;
                        mag += wb
                            .iter()
                            .zip(xb)
                            .map(|(p, q)| (p * q).abs() as f64)
                            .sum::<f64>();
                    }
                    let slack = (cols / 32 + 16) as f64 * f32::EPSILON as f64 * mag + 1e-30;
                    let err = (got[r] as f64 - want).abs();
                    assert!(
                        err <= 1.01 * bound + slack,
                        "{ty:?} {rows}x{cols} row {r}: {} vs {want}: err {err}, bound {bound} + {slack}",
                        got[r]
                    );
                    err_balanced += err;
                    err_fast += (fast[r] as f64 - want).abs();
                }
            }
            eprintln!("{ty:?}: total |error| balanced {err_balanced:.3e}, fast {err_fast:.3e}");
            assert!(
                10.0 * err_balanced < err_fast,
                "{ty:?}: balanced error {err_balanced} is not well below fast's {err_fast}"
            );
        }
    }

    /// Several tokens, and formats without a balanced kernel, are the exact product;
    /// several matrices at once are each matrix alone.
    #[test]
    fn balanced_is_exact_elsewhere_and_multi_is_each_alone() {
        let mut rng = Rng(7);
        let (rows, cols) = (21, 512);
        let w: Vec<f32> = (0..rows * cols).map(|_| rng.next()).collect();
        let x: Vec<f32> = (0..3 * cols).map(|_| rng.next()).collect();
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q6_K] {
            let m = QMatrix::quantize(ty, rows, cols, &w);
            for n in [1, 3] {
                let mut exact = vec![0.0f32; rows * n];
                let mut balanced = vec![0.0f32; rows * n];
                matmul_exact(&m, &x[..n * cols], n, &mut exact);
                matmul_balanced(&m, &x[..n * cols], n, &mut balanced);
                let same = exact == balanced;
                let fixed = n == 1 && ty != GgmlType::Q4_0 && has_kernels();
                assert_eq!(same, !fixed, "{ty:?} n {n}");
            }
        }
        let mats: Vec<QMatrix> = [GgmlType::Q4_K, GgmlType::Q4_0, GgmlType::Q8_0]
            .into_iter()
            .map(|ty| QMatrix::quantize(ty, rows, cols, &w))
            .collect();
        let refs: Vec<&QMatrix> = mats.iter().collect();
        let mut outs = vec![vec![0.0f32; rows]; 3];
        let mut slices: Vec<&mut [f32]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
        matmul_balanced_multi(&refs, &x[..cols], 1, &mut slices);
        for (m, o) in mats.iter().zip(&outs) {
            let mut alone = vec![0.0f32; rows];
            matmul_balanced(m, &x[..cols], 1, &mut alone);
            assert_eq!(&alone, o);
        }
    }
}
