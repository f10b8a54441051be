//! AVX2 + FMA + F16C kernels (x86-64). Every function here is `unsafe` and
//! may only be called after checking for those features ([`super::Isa`]).
//! They reproduce the arithmetic of [`super::scalar`]: the same activation
//! bytes, the same exact integer block sums; only the order of the `f32`
//! additions differs.

// Kernels index several arrays with one counter; iterators would obscure them.
#![allow(clippy::needless_range_loop)]

use super::act::{ActRow, QActs};
use super::formats::k_scale_min;
use super::panel::{Panel, PR};
use super::{GgmlType, FR};
use std::arch::x86_64::*;

#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

#[inline(always)]
unsafe fn hsum_i32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
    _mm_cvtsi128_si32(s)
}

#[inline(always)]
unsafe fn f16_1(p: *const u8) -> f32 {
    let bits = (p as *const u16).read_unaligned();
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// Broadcast of the f32 at `p`, as an opaque load: the compiler would
/// otherwise turn a store-then-broadcast through a stack buffer into a chain
/// of shuffles, which cost more than the load.
#[target_feature(enable = "avx")]
#[inline]
unsafe fn bcast_mem(p: *const f32) -> __m256 {
    let r: __m256;
    std::arch::asm!(
        "vbroadcastss {r}, dword ptr [{p}]",
        r = lateout(ymm_reg) r,
        p = in(reg) p,
        options(pure, readonly, nostack, preserves_flags)
    );
    r
}

#[inline(always)]
unsafe fn loadu(p: *const u8) -> __m256i {
    _mm256_loadu_si256(p as *const __m256i)
}

/// 16 bytes of packed nibbles -> 32 bytes: low nibbles then high nibbles.
#[inline(always)]
unsafe fn nibbles(p: *const u8) -> __m256i {
    let q = _mm_loadu_si128(p as *const __m128i);
    let v = _mm256_set_m128i(_mm_srli_epi16(q, 4), q);
    _mm256_and_si256(v, _mm256_set1_epi8(0x0f))
}

/// Q6_K: one half (`h`, 128 weights) of the 256-weight super-block at `p`, as four
/// groups of 32 unsigned 6-bit values (low nibbles from `ql`, high two bits from `qh`),
/// in the order of the block's sub-blocks `4h .. 4h + 4`.
#[inline(always)]
unsafe fn q6k_half(p: *const u8, h: usize) -> [__m256i; 4] {
    let mask = _mm256_set1_epi8(0x0f);
    let m30 = _mm256_set1_epi8(0x30);
    let ql0 = loadu(p.add(64 * h));
    let ql1 = loadu(p.add(64 * h + 32));
    let qh = loadu(p.add(128 + 32 * h));
    [
        _mm256_or_si256(
            _mm256_and_si256(ql0, mask),
            _mm256_and_si256(_mm256_slli_epi16(qh, 4), m30),
        ),
        _mm256_or_si256(
            _mm256_and_si256(ql1, mask),
            _mm256_and_si256(_mm256_slli_epi16(qh, 2), m30),
        ),
        _mm256_or_si256(
            _mm256_and_si256(_mm256_srli_epi16(ql0, 4), mask),
            _mm256_and_si256(qh, m30),
        ),
        _mm256_or_si256(
            _mm256_and_si256(_mm256_srli_epi16(ql1, 4), mask),
            _mm256_and_si256(_mm256_srli_epi16(qh, 2), m30),
        ),
    ]
}

/// Q4_K / Q5_K: the 64 weights of sub-blocks `2c` and `2c + 1` of the super-block at
/// `p` (quants at `p + qs_off`), as two vectors of 32 unsigned values: the low and the
/// high nibbles of one 32-byte row, with Q5_K's fifth bits (`five`; `qh`, the block's
/// 32 bytes of high bits) put in as 0x10.
#[inline(always)]
unsafe fn q45k_pair(
    p: *const u8,
    qs_off: usize,
    qh: __m256i,
    c: usize,
    five: bool,
) -> [__m256i; 2] {
    let mask = _mm256_set1_epi8(0x0f);
    let x10 = _mm256_set1_epi8(0x10);
    let v = loadu(p.add(qs_off + 32 * c));
    let mut lo = _mm256_and_si256(v, mask);
    let mut hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
    if five {
        let bit = _mm256_set1_epi8(1 << (2 * c));
        let bit2 = _mm256_set1_epi8(2 << (2 * c));
        lo = _mm256_or_si256(
            lo,
            _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, bit), bit), x10),
        );
        hi = _mm256_or_si256(
            hi,
            _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, bit2), bit2), x10),
        );
    }
    [lo, hi]
}

/// The 32 bits of `qh` -> 32 bytes, `0x10` where the bit is set.
#[inline(always)]
unsafe fn bits_to_0x10(qh: u32) -> __m256i {
    let v = _mm256_set1_epi32(qh as i32);
    let shuf = _mm256_setr_epi8(
        0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3,
        3, 3,
    );
    let v = _mm256_shuffle_epi8(v, shuf);
    let sel = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    let hit = _mm256_cmpeq_epi8(_mm256_and_si256(v, sel), sel);
    _mm256_and_si256(hit, _mm256_set1_epi8(0x10))
}

/// Sum of u8 x i8 products, as 8 lanes of i32.
#[inline(always)]
unsafe fn dot_u8i8(w: __m256i, x: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1))
}

/// Sum of i8 x i8 products, as 8 lanes of i32.
#[inline(always)]
unsafe fn dot_i8i8(w: __m256i, x: __m256i) -> __m256i {
    dot_u8i8(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w))
}

// ---------------------------------------------------------------------------
// Activation quantization

#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn quantize_act_blocks(
    x: &[f32],
    qs: &mut [i8],
    d: &mut [f32],
    ds: &mut [f32],
    ds16: &mut [f32],
) {
    let nb = d.len();
    assert!(x.len() >= nb * 32 && qs.len() >= nb * 32 && ds.len() >= nb && ds16.len() >= 2 * nb);
    let sign = _mm256_set1_ps(-0.0);
    let perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for b in 0..nb {
        let p = x.as_ptr().add(32 * b);
        let v0 = _mm256_loadu_ps(p);
        let v1 = _mm256_loadu_ps(p.add(8));
        let v2 = _mm256_loadu_ps(p.add(16));
        let v3 = _mm256_loadu_ps(p.add(24));
        let a = _mm256_max_ps(
            _mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
            _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)),
        );
        let m = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
        let amax = _mm_cvtss_f32(m);
        let id = _mm256_set1_ps(if amax > 0.0 { 127.0 / amax } else { 0.0 });
        // Rounds to nearest even (the default MXCSR mode).
        let i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, id));
        let i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, id));
        let i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, id));
        let i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, id));
        let s0 = hsum_i32(_mm256_add_epi32(i0, i1));
        let s1 = hsum_i32(_mm256_add_epi32(i2, i3));
        let p01 = _mm256_packs_epi32(i0, i1);
        let p23 = _mm256_packs_epi32(i2, i3);
        let q = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p01, p23), perm);
        _mm256_storeu_si256(qs.as_mut_ptr().add(32 * b) as *mut __m256i, q);
        let db = amax / 127.0;
        d[b] = db;
        ds[b] = db * (s0 + s1) as f32;
        ds16[2 * b] = db * s0 as f32;
        ds16[2 * b + 1] = db * s1 as f32;
    }
}

// ---------------------------------------------------------------------------
// Matrix-vector kernels straight from the file's blocks

/// Eight half floats at `p`, `p + stride`, ... as f32.
#[inline(always)]
unsafe fn f16x8_strided(p: *const u8, stride: usize) -> __m256 {
    let h = |k: usize| (p.add(k * stride) as *const u16).read_unaligned() as u64;
    let lo = h(0) | h(1) << 16 | h(2) << 32 | h(3) << 48;
    let hi = h(4) | h(5) << 16 | h(6) << 32 | h(7) << 48;
    _mm256_cvtph_ps(_mm_set_epi64x(hi as i64, lo as i64))
}

/// 16 bytes of packed nibbles -> 32 bytes (low nibbles, then high), from one
/// 128-bit broadcast and a per-lane shift.
#[inline(always)]
unsafe fn nibbles_b(p: *const u8) -> __m256i {
    let v = _mm256_broadcastsi128_si256(_mm_loadu_si128(p as *const __m128i));
    _mm256_and_si256(
        _mm256_srlv_epi32(v, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4)),
        _mm256_set1_epi8(0x0f),
    )
}

/// Up to eight half floats at `p`, `p + stride`, ... as f32 (zeros past `n`).
#[inline(always)]
unsafe fn f16x8_strided_n(p: *const u8, stride: usize, n: usize) -> __m256 {
    if n >= 8 {
        return f16x8_strided(p, stride);
    }
    let mut v = [0u16; 8];
    for (k, x) in v.iter_mut().enumerate().take(n) {
        *x = (p.add(k * stride) as *const u16).read_unaligned();
    }
    _mm256_cvtph_ps(_mm_loadu_si128(v.as_ptr() as *const __m128i))
}

/// `NR` rows of Q4_0 / Q4_1 / Q5_0 / Q5_1 (blocks of `TS` bytes) with one
/// token. Scales are handled eight blocks at a time.
#[inline(always)]
unsafe fn dot_q4q5<const TS: usize, const FIVE: bool, const MIN: bool, const NR: usize>(
    rows: [*const u8; NR],
    a: ActRow<'_>,
) -> [f32; NR] {
    let nb = a.nb;
    let (qh_off, qs_off) = match (FIVE, MIN) {
        (false, false) => (0, 2),
        (false, true) => (0, 4),
        (true, false) => (2, 6),
        (true, true) => (4, 8),
    };
    let off = if FIVE { -16.0 } else { -8.0 };
    let xp = a.qs.as_ptr() as *const u8;
    let mut acc = [_mm256_setzero_ps(); NR];
    let mut accm = [_mm256_setzero_ps(); NR];
    let mut sbuf = [[0f32; 8]; NR];
    let mut b0 = 0;
    while b0 < nb {
        let kn = (nb - b0).min(8);
        // a.d and a.ds are padded by 8 past the last token; d8 is 0 past kn.
        let dx8 = _mm256_loadu_ps(a.d.as_ptr().add(b0));
        let ds8 = _mm256_loadu_ps(a.ds.as_ptr().add(b0));
        for j in 0..NR {
            let p0 = rows[j].add(b0 * TS);
            let d8 = f16x8_strided_n(p0, TS, kn);
            _mm256_storeu_ps(sbuf[j].as_mut_ptr(), _mm256_mul_ps(d8, dx8));
            let m8 = if MIN {
                f16x8_strided_n(p0.add(2), TS, kn)
            } else {
                d8
            };
            accm[j] = _mm256_fmadd_ps(m8, ds8, accm[j]);
        }
        // (A macro, not a closure: closures do not inherit target features.)
        macro_rules! blk {
            ($k:expr) => {{
                let k = $k;
                let x = loadu(xp.add(32 * (b0 + k)));
                for j in 0..NR {
                    let p = rows[j].add((b0 + k) * TS);
                    let mut w = nibbles_b(p.add(qs_off));
                    if FIVE {
                        w = _mm256_or_si256(
                            w,
                            bits_to_0x10((p.add(qh_off) as *const u32).read_unaligned()),
                        );
                    }
                    let f = _mm256_cvtepi32_ps(dot_u8i8(w, x));
                    acc[j] = _mm256_fmadd_ps(f, bcast_mem(sbuf[j].as_ptr().add(k)), acc[j]);
                }
            }};
        }
        if kn == 8 {
            for k in 0..8 {
                blk!(k);
            }
        } else {
            for k in 0..kn {
                blk!(k);
            }
        }
        b0 += 8;
    }
    let mut r = [0f32; NR];
    for j in 0..NR {
        let m = if MIN {
            accm[j]
        } else {
            _mm256_mul_ps(accm[j], _mm256_set1_ps(off))
        };
        r[j] = hsum(_mm256_add_ps(acc[j], m));
    }
    r
}

/// `NR` rows of Q8_0 with one token.
#[inline(always)]
unsafe fn dot_q8_0<const NR: usize>(rows: [*const u8; NR], a: ActRow<'_>) -> [f32; NR] {
    let nb = a.nb;
    let xp = a.qs.as_ptr() as *const u8;
    let mut acc = [_mm256_setzero_ps(); NR];
    let mut sbuf = [[0f32; 8]; NR];
    let mut b0 = 0;
    while b0 < nb {
        let kn = (nb - b0).min(8);
        let dx8 = _mm256_loadu_ps(a.d.as_ptr().add(b0));
        for j in 0..NR {
            let d8 = f16x8_strided_n(rows[j].add(b0 * 34), 34, kn);
            _mm256_storeu_ps(sbuf[j].as_mut_ptr(), _mm256_mul_ps(d8, dx8));
        }
        macro_rules! blk {
            ($k:expr) => {{
                let k = $k;
                let x = loadu(xp.add(32 * (b0 + k)));
                for j in 0..NR {
                    let f = _mm256_cvtepi32_ps(dot_i8i8(loadu(rows[j].add((b0 + k) * 34 + 2)), x));
                    acc[j] = _mm256_fmadd_ps(f, bcast_mem(sbuf[j].as_ptr().add(k)), acc[j]);
                }
            }};
        }
        if kn == 8 {
            for k in 0..8 {
                blk!(k);
            }
        } else {
            for k in 0..kn {
                blk!(k);
            }
        }
        b0 += 8;
    }
    let mut r = [0f32; NR];
    for j in 0..NR {
        r[j] = hsum(acc[j]);
    }
    r
}

/// How far ahead (bytes) matrix-vector kernels prefetch weight rows: the
/// hardware prefetchers alone leave DRAM bandwidth unused on weights that
/// stream from memory (measured ~1.3x on a whole model's layers).
const PREFETCH_BYTES: usize = 6 << 10;

/// Prefetches rows `r..r+k` (`rb` bytes each) if they are below `r1`.
#[inline(always)]
unsafe fn prefetch_rows(base: *const u8, rb: usize, r: usize, k: usize, r1: usize) {
    if r + k <= r1 {
        let p = base.add(r * rb);
        let mut o = 0;
        while o < k * rb {
            _mm_prefetch::<_MM_HINT_T0>(p.add(o) as *const i8);
            o += 64;
        }
    }
}

/// `out[r] = W[r] . x` for rows `r0..r1` of a quantized matrix (`rb` bytes per
/// row) and one token.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn matvec_rows(
    ty: GgmlType,
    raw: &[u8],
    rb: usize,
    r0: usize,
    r1: usize,
    a: ActRow<'_>,
    out: *mut f32,
) {
    debug_assert!(raw.len() >= r1 * rb && rb >= ty.row_bytes(32 * a.nb));
    let base = raw.as_ptr();
    let ahead = PREFETCH_BYTES.div_ceil(rb).next_multiple_of(2);
    macro_rules! rows2 {
        ($f:ident $(, $c:expr)*) => {{
            let mut r = r0;
            while r + 2 <= r1 {
                prefetch_rows(base, rb, r + ahead, 2, r1);
                let v = $f::<$($c,)* 2>([base.add(r * rb), base.add((r + 1) * rb)], a);
                *out.add(r) = v[0];
                *out.add(r + 1) = v[1];
                r += 2;
            }
            if r < r1 {
                *out.add(r) = $f::<$($c,)* 1>([base.add(r * rb)], a)[0];
            }
        }};
    }
    match ty {
        GgmlType::Q4_0 => rows2!(dot_q4q5, 18, false, false),
        GgmlType::Q4_1 => rows2!(dot_q4q5, 20, false, true),
        GgmlType::Q5_0 => rows2!(dot_q4q5, 22, true, false),
        GgmlType::Q5_1 => rows2!(dot_q4q5, 24, true, true),
        GgmlType::Q8_0 => rows2!(dot_q8_0),
        _ => {
            for r in r0..r1 {
                prefetch_rows(base, rb, r + ahead, 1, r1);
                let row = std::slice::from_raw_parts(base.add(r * rb), rb);
                *out.add(r) = match ty {
                    GgmlType::Q4_K => dot_q4k_q5k::<false>(row, a),
                    GgmlType::Q5_K => dot_q4k_q5k::<true>(row, a),
                    GgmlType::Q6_K => dot_q6_k(row, a),
                    _ => super::scalar::vec_dot(ty, row, a),
                };
            }
        }
    }
}

#[inline(always)]
unsafe fn dot_q4k_q5k<const FIVE: bool>(row: &[u8], a: ActRow<'_>) -> f32 {
    let nsb = a.nb / 8;
    let ts = if FIVE { 176 } else { 144 };
    let qs_off = if FIVE { 48 } else { 16 };
    let rp = row.as_ptr();
    let xp = a.qs.as_ptr() as *const u8;
    let mask = _mm256_set1_epi8(0x0f);
    let mut acc = [_mm256_setzero_ps(); 2];
    let mut accm = 0f32;
    for s in 0..nsb {
        let p = rp.add(s * ts);
        let d = f16_1(p);
        let dmin = f16_1(p.add(2));
        let scales = std::slice::from_raw_parts(p.add(4), 12);
        let qh = if FIVE {
            loadu(p.add(16))
        } else {
            _mm256_setzero_si256()
        };
        let mut msum = 0f32;
        for c in 0..4 {
            let b = 8 * s + 2 * c;
            let q = loadu(p.add(qs_off + 32 * c));
            let mut lo = _mm256_and_si256(q, mask);
            let mut hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), mask);
            if FIVE {
                let bit = _mm256_set1_epi8(1 << (2 * c));
                let bit2 = _mm256_set1_epi8(2 << (2 * c));
                let x10 = _mm256_set1_epi8(0x10);
                lo = _mm256_or_si256(
                    lo,
                    _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, bit), bit), x10),
                );
                hi = _mm256_or_si256(
                    hi,
                    _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, bit2), bit2), x10),
                );
            }
            let (s1, m1) = k_scale_min(scales, 2 * c);
            let (s2, m2) = k_scale_min(scales, 2 * c + 1);
            let f0 = _mm256_cvtepi32_ps(dot_u8i8(lo, loadu(xp.add(32 * b))));
            let f1 = _mm256_cvtepi32_ps(dot_u8i8(hi, loadu(xp.add(32 * b + 32))));
            acc[0] = _mm256_fmadd_ps(
                f0,
                _mm256_set1_ps(d * s1 as f32 * *a.d.get_unchecked(b)),
                acc[0],
            );
            acc[1] = _mm256_fmadd_ps(
                f1,
                _mm256_set1_ps(d * s2 as f32 * *a.d.get_unchecked(b + 1)),
                acc[1],
            );
            msum += m1 as f32 * *a.ds.get_unchecked(b) + m2 as f32 * *a.ds.get_unchecked(b + 1);
        }
        accm -= dmin * msum;
    }
    hsum(_mm256_add_ps(acc[0], acc[1])) + accm
}

/// Q6_K with unsigned 6-bit values; the `-32` offset is applied through the
/// activation sums of each 16.
#[inline(always)]
unsafe fn dot_q6_k(row: &[u8], a: ActRow<'_>) -> f32 {
    let nsb = a.nb / 8;
    let rp = row.as_ptr();
    let xp = a.qs.as_ptr() as *const u8;
    // Picks i16 lanes (2j, 2j+1) of a dword-broadcast vector: low half <- word 0, high half <- word 1.
    let spread = _mm256_setr_epi8(
        0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3,
        2, 3,
    );
    let mut acc = [_mm256_setzero_ps(); 2];
    let mut accm = _mm256_setzero_ps();
    for s in 0..nsb {
        let p = rp.add(s * 210);
        let d = f16_1(p.add(208));
        let sc8 = _mm_loadu_si128(p.add(192) as *const __m128i);
        let sc16 = _mm256_cvtepi8_epi16(sc8);
        // Offset term: -32 * d * sum_j sc[j] * ds16[j].
        let ds16 = a.ds16.as_ptr().add(16 * s);
        let scf0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc8));
        let scf1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(sc8, 8)));
        let t = _mm256_fmadd_ps(
            scf0,
            _mm256_loadu_ps(ds16),
            _mm256_mul_ps(scf1, _mm256_loadu_ps(ds16.add(8))),
        );
        accm = _mm256_fmadd_ps(t, _mm256_set1_ps(-32.0 * d), accm);
        for h in 0..2 {
            let qs = q6k_half(p, h);
            for (g, &q) in qs.iter().enumerate() {
                let j = 4 * h + g;
                let b = 8 * s + j;
                let scv = _mm256_shuffle_epi8(
                    _mm256_permutevar8x32_epi32(sc16, _mm256_set1_epi32(j as i32)),
                    spread,
                );
                let pi = _mm256_madd_epi16(_mm256_maddubs_epi16(q, loadu(xp.add(32 * b))), scv);
                acc[g & 1] = _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(pi),
                    _mm256_set1_ps(d * *a.d.get_unchecked(b)),
                    acc[g & 1],
                );
            }
        }
    }
    hsum(_mm256_add_ps(acc[0], acc[1])) + hsum(accm)
}

// ---------------------------------------------------------------------------
// Panels and tiles

pub(crate) const K_U: u8 = 0;
pub(crate) const K_U16: u8 = 1;
pub(crate) const K_S: u8 = 2;

/// Decodes one row into panel slots (block `b` at `q + b*PR*32`, `d + b*PR`,
/// `sc + b*PR`; offsets at `m[0..nm]`). Returns false for types without a
/// vector decoder.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
// Over 100 lines on purpose: one unrolled AVX2 decoder per format in one match, so that
// no call sits inside the per-block loop.
pub(crate) unsafe fn decode_row(
    ty: GgmlType,
    row: &[u8],
    nb: usize,
    q: *mut u8,
    d: *mut f32,
    sc: *mut [i16; 2],
    m: *mut f32,
) -> bool {
    debug_assert!(row.len() >= ty.row_bytes(32 * nb));
    let rp = row.as_ptr();
    let st = |b: usize, v: __m256i| _mm256_storeu_si256(q.add(b * PR * 32) as *mut __m256i, v);
    match ty {
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 => {
            let ts = ty.type_size();
            let five = matches!(ty, GgmlType::Q5_0 | GgmlType::Q5_1);
            let min = matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1);
            let qh_off = if min { 4 } else { 2 };
            let qs_off = qh_off + if five { 4 } else { 0 };
            let off = if five { -16.0 } else { -8.0 };
            for b in 0..nb {
                let p = rp.add(b * ts);
                let db = f16_1(p);
                *d.add(b * PR) = db;
                *m.add(b) = if min { f16_1(p.add(2)) } else { off * db };
                let mut w = nibbles(p.add(qs_off));
                if five {
                    w = _mm256_or_si256(
                        w,
                        bits_to_0x10((p.add(qh_off) as *const u32).read_unaligned()),
                    );
                }
                st(b, w);
            }
        }
        GgmlType::Q8_0 => {
            for b in 0..nb {
                let p = rp.add(b * 34);
                *d.add(b * PR) = f16_1(p);
                st(b, loadu(p.add(2)));
            }
        }
        GgmlType::Q4_K | GgmlType::Q5_K => {
            let five = ty == GgmlType::Q5_K;
            let ts = ty.type_size();
            let qs_off = if five { 48 } else { 16 };
            for s in 0..nb / 8 {
                let p = rp.add(s * ts);
                let dd = f16_1(p);
                let dmin = f16_1(p.add(2));
                let scales = std::slice::from_raw_parts(p.add(4), 12);
                let qh = if five {
                    loadu(p.add(16))
                } else {
                    _mm256_setzero_si256()
                };
                for c in 0..4 {
                    let b = 8 * s + 2 * c;
                    let [lo, hi] = q45k_pair(p, qs_off, qh, c, five);
                    st(b, lo);
                    st(b + 1, hi);
                    let (s1, m1) = k_scale_min(scales, 2 * c);
                    let (s2, m2) = k_scale_min(scales, 2 * c + 1);
                    *d.add(b * PR) = dd * s1 as f32;
                    *d.add((b + 1) * PR) = dd * s2 as f32;
                    *m.add(b) = -dmin * m1 as f32;
                    *m.add(b + 1) = -dmin * m2 as f32;
                }
            }
        }
        GgmlType::Q6_K => {
            for s in 0..nb / 8 {
                let p = rp.add(s * 210);
                let dd = f16_1(p.add(208));
                for h in 0..2 {
                    for (g, q) in q6k_half(p, h).into_iter().enumerate() {
                        st(8 * s + 4 * h + g, q);
                    }
                }
                for j in 0..8 {
                    let b = 8 * s + j;
                    let s0 = *p.add(192 + 2 * j) as i8 as i16;
                    let s1 = *p.add(193 + 2 * j) as i8 as i16;
                    *d.add(b * PR) = dd;
                    *sc.add(b * PR) = [s0, s1];
                    *m.add(2 * b) = -32.0 * dd * s0 as f32;
                    *m.add(2 * b + 1) = -32.0 * dd * s1 as f32;
                }
            }
        }
        _ => return false,
    }
    true
}

/// Computes `out[(t0+t)*ld + r] = W[r] . x[t0+t]` for the first `rr` rows of a
/// [`K_S`] panel (Q8_0, Q8_K: signed bytes, no offsets) and `T` tokens, `RT`
/// rows at a time.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn tile_signed<const RT: usize, const T: usize>(
    pan: &Panel,
    a: &QActs,
    t0: usize,
    rr: usize,
    sbuf: &mut Vec<f32>,
    out: *mut f32,
    ld: usize,
) {
    const { assert!(PR == 8 && PR.is_multiple_of(RT)) };
    let nb = pan.nb;
    assert!(a.n >= t0 + T && pan.q.len() >= nb * PR * 32 && pan.d.len() >= nb * PR && rr <= PR);
    // Products of weight and activation scales, [b][t][PR].
    sbuf.resize(nb * T * PR, 0.0);
    let sb = sbuf.as_mut_ptr();
    let dp = pan.d.as_ptr();
    let mut xq = [std::ptr::null::<u8>(); T];
    for t in 0..T {
        xq[t] = a.qs.as_ptr().add((t0 + t) * a.cols) as *const u8;
        let xd = a.d.as_ptr().add((t0 + t) * nb);
        for b in 0..nb {
            let dw = _mm256_loadu_ps(dp.add(b * PR));
            _mm256_storeu_ps(
                sb.add((b * T + t) * PR),
                _mm256_mul_ps(dw, _mm256_set1_ps(*xd.add(b))),
            );
        }
    }
    let mut r0 = 0;
    while r0 < rr {
        let acc = tile_signed_rows::<RT, T>(pan, r0, &xq, sb);
        for r in 0..RT.min(rr - r0) {
            for t in 0..T {
                *out.add((t0 + t) * ld + r0 + r) = hsum(acc[r][t]);
            }
        }
        r0 += RT;
    }
}

#[inline(always)]
unsafe fn tile_signed_rows<const RT: usize, const T: usize>(
    pan: &Panel,
    r0: usize,
    xq: &[*const u8; T],
    sb: *const f32,
) -> [[__m256; T]; RT] {
    let nb = pan.nb;
    let mut acc = [[_mm256_setzero_ps(); T]; RT];
    let qp = pan.q.as_ptr().add(r0 * 32);
    let ones = _mm256_set1_epi16(1);
    for b in 0..nb {
        let sbb = sb.add(b * T * PR + r0);
        for r in 0..RT {
            let w = loadu(qp.add((b * PR + r) * 32));
            let aw = _mm256_abs_epi8(w);
            for t in 0..T {
                let xs = _mm256_sign_epi8(loadu(xq[t].add(32 * b)), w);
                let p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, xs), ones);
                let s = bcast_mem(sbb.add(t * PR + r));
                acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), s, acc[r][t]);
            }
        }
    }
    acc
}

/// The interleaved tile for [`K_U`] and [`K_U16`] panels: `out[(t0+t)*ld + r] =
/// W[r] . x[t0+t]` for the first `rr` rows and `T` tokens.
///
/// One register holds 4 bytes of each of the `PR` rows ([`Panel::qi`]); a
/// `vpmaddubsw` against 4 broadcast activation bytes adds every row's pairs
/// into 16-bit lanes. `STEPS` such products add up in 16 bits before a
/// `vpmaddwd` widens them (by ones, or by the rows' scales of each 16 for
/// `K_U16`): with weights below `2^k` and activations within ±127, `STEPS`
/// is at most `32767 / (2 * 127 * (2^k - 1))`, which the caller checks
/// ([`steps_for`]). The block's integer sums then meet the rows' scales times
/// the token's block scale in one `vfmadd`, and the rows' offsets
/// ([`Panel::mi`]) the token's block sums (`ds`, `ds16`) in another. Integer
/// sums are exact, so the result equals the scalar kernel's up to the order
/// of f32 additions.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn tile_interleaved<const KIND: u8, const T: usize, const STEPS: usize>(
    pan: &Panel,
    a: &QActs,
    t0: usize,
    rr: usize,
    out: *mut f32,
    ld: usize,
) {
    const NP: usize = 1;
    interleaved_tile!(false, [pan], a, t0, [rr], [out], ld)
}

/// [`tile_interleaved`] for [`K_U`] with AVX-512 VNNI's `vpdpbusd` (on
/// 256-bit registers, of which AVX-512VL gives 32): one instruction per step,
/// no 16-bit partial sums, and `NP` panels a tile (each activation broadcast
/// serves `NP * PR` rows).
#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
pub(crate) unsafe fn tile_interleaved_vnni<const T: usize, const NP: usize>(
    pans: [&Panel; NP],
    a: &QActs,
    t0: usize,
    rr: [usize; NP],
    out: [*mut f32; NP],
    ld: usize,
) {
    const KIND: u8 = K_U;
    const STEPS: usize = 8;
    interleaved_tile!(true, pans, a, t0, rr, out, ld)
}

/// The body of [`tile_interleaved`] and [`tile_interleaved_vnni`] (a macro, so
/// that each is compiled with its own target features). `KIND`, `T`, `STEPS`
/// and `NP` (panels a tile) are the caller's constants.
macro_rules! interleaved_tile {
    ($vnni:literal, $pans:expr, $a:expr, $t0:expr, $rr:expr, $out:expr, $ld:expr) => {{
        let pans: [&Panel; NP] = $pans;
        let a: &QActs = $a;
        let (t0, ld): (usize, usize) = ($t0, $ld);
        let rr: [usize; NP] = $rr;
        let out: [*mut f32; NP] = $out;
        const { assert!(PR == 8 && STEPS >= 1 && 8 % STEPS == 0 && NP >= 1) };
        let nb = pans[0].nb;
        for p in 0..NP {
            let pan = pans[p];
            assert!(
                KIND != K_S
                    && pan.nb == nb
                    && pan.qi.len() >= nb * PR * 32
                    && pan.d.len() >= nb * PR
                    && pan.mi.len() >= pan.nm * PR
                    && pan.nm == if KIND == K_U16 { 2 * nb } else { nb }
                    && (KIND != K_U16 || (STEPS <= 4 && pan.sv.len() >= 2 * nb))
                    && rr[p] <= PR
            );
        }
        assert!(a.n >= t0 + T && a.ds.len() >= (t0 + T) * nb && a.ds16.len() >= (t0 + T) * 2 * nb);
        let mut xq = [std::ptr::null::<u8>(); T];
        let mut xd = [std::ptr::null::<f32>(); T];
        for t in 0..T {
            xq[t] = a.qs.as_ptr().add((t0 + t) * a.cols) as *const u8;
            xd[t] = a.d.as_ptr().add((t0 + t) * nb);
        }
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_ps(); T]; NP];
        for b in 0..nb {
            let mut wp = [std::ptr::null::<u8>(); NP];
            for p in 0..NP {
                wp[p] = pans[p].qi.as_ptr().add(b * PR * 32);
            }
            let mut isum = [[_mm256_setzero_si256(); T]; NP];
            let mut s = 0;
            if $vnni {
                // One instruction per step: u8 x i8 products added into i32 lanes.
                for j in 0..8 {
                    let mut w = [_mm256_setzero_si256(); NP];
                    for p in 0..NP {
                        w[p] = loadu(wp[p].add(j * 32));
                    }
                    for t in 0..T {
                        let x = _mm256_set1_epi32(std::ptr::read_unaligned(
                            xq[t].add(32 * b + 4 * j) as *const i32,
                        ));
                        for p in 0..NP {
                            isum[p][t] = _mm256_dpbusd_epi32(isum[p][t], w[p], x);
                        }
                    }
                }
                s = 8;
            }
            while s < 8 {
                let mut s16 = [[_mm256_setzero_si256(); T]; NP];
                for j in s..s + STEPS {
                    let mut w = [_mm256_setzero_si256(); NP];
                    for p in 0..NP {
                        w[p] = loadu(wp[p].add(j * 32));
                    }
                    for t in 0..T {
                        let x = _mm256_set1_epi32(std::ptr::read_unaligned(
                            xq[t].add(32 * b + 4 * j) as *const i32,
                        ));
                        for p in 0..NP {
                            s16[p][t] = _mm256_add_epi16(s16[p][t], _mm256_maddubs_epi16(w[p], x));
                        }
                    }
                }
                for p in 0..NP {
                    let widen = if KIND == K_U16 {
                        loadu(pans[p].sv.as_ptr().add(2 * b + s / 4) as *const u8)
                    } else {
                        ones
                    };
                    for t in 0..T {
                        isum[p][t] =
                            _mm256_add_epi32(isum[p][t], _mm256_madd_epi16(s16[p][t], widen));
                    }
                }
                s += STEPS;
            }
            for p in 0..NP {
                let dw = _mm256_loadu_ps(pans[p].d.as_ptr().add(b * PR));
                let mp = pans[p].mi.as_ptr();
                for t in 0..T {
                    let sc = _mm256_mul_ps(dw, _mm256_set1_ps(*xd[t].add(b)));
                    acc[p][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[p][t]), sc, acc[p][t]);
                    if KIND == K_U16 {
                        let ds = a.ds16.as_ptr().add((t0 + t) * 2 * nb + 2 * b);
                        let m0 = _mm256_loadu_ps(mp.add(2 * b * PR));
                        let m1 = _mm256_loadu_ps(mp.add((2 * b + 1) * PR));
                        acc[p][t] = _mm256_fmadd_ps(m0, _mm256_set1_ps(*ds), acc[p][t]);
                        acc[p][t] = _mm256_fmadd_ps(m1, _mm256_set1_ps(*ds.add(1)), acc[p][t]);
                    } else {
                        let ds = *a.ds.as_ptr().add((t0 + t) * nb + b);
                        let m = _mm256_loadu_ps(mp.add(b * PR));
                        acc[p][t] = _mm256_fmadd_ps(m, _mm256_set1_ps(ds), acc[p][t]);
                    }
                }
            }
        }
        for p in 0..NP {
            for t in 0..T {
                let v = acc[p][t];
                let o = out[p].add((t0 + t) * ld);
                if rr[p] == PR {
                    _mm256_storeu_ps(o, v);
                } else {
                    let mut tmp = [0f32; PR];
                    _mm256_storeu_ps(tmp.as_mut_ptr(), v);
                    std::ptr::copy_nonoverlapping(tmp.as_ptr(), o, rr[p]);
                }
            }
        }
    }};
}
use interleaved_tile;

/// Products of 4-byte steps that add up in 16-bit lanes before widening (see
/// [`tile_interleaved`]): 8, 4, 2 or 1 for weights up to 15, 31, 63 or 127.
pub(crate) fn steps_for(max_weight: u32) -> usize {
    let max_pair = 2 * 127 * max_weight.max(1) as usize;
    match 32767 / max_pair {
        8.. => 8,
        4..=7 => 4,
        2..=3 => 2,
        _ => 1,
    }
}

// ---------------------------------------------------------------------------
// Dequantization to f32, with the scalar code's arithmetic (same bits)

/// Eight u8 (or i8 with `SIGNED`) from byte `k*8` of `v` as f32.
#[inline(always)]
unsafe fn bytes8_f32<const SIGNED: bool>(v: __m256i, k: usize) -> __m256i {
    let h = if k < 2 {
        _mm256_castsi256_si128(v)
    } else {
        _mm256_extracti128_si256(v, 1)
    };
    let h = if k % 2 == 1 {
        _mm_unpackhi_epi64(h, h)
    } else {
        h
    };
    if SIGNED {
        _mm256_cvtepi8_epi32(h)
    } else {
        _mm256_cvtepu8_epi32(h)
    }
}

/// Stores at `o` the 32 values `body` for the 32 bytes of `q`, each bound to
/// `v` as i32 lanes. (A macro, not a closure: closures do not inherit target
/// features.)
macro_rules! store32 {
    ($signed:literal, $q:expr, $o:expr, |$v:ident| $body:expr) => {{
        let (q, o) = ($q, $o);
        for k in 0..4 {
            let $v = bytes8_f32::<$signed>(q, k);
            _mm256_storeu_ps(o.add(8 * k), $body);
        }
    }};
}

/// Dequantizes `out.len()` elements of `ty` (lengths checked by the caller).
/// Returns false for types without a vector version.
#[target_feature(enable = "avx2,fma,f16c")]
// Over 100 lines on purpose: one unrolled AVX2 path per quantized format in one match,
// so that no call sits inside the per-block loop.
pub(crate) unsafe fn dequantize_row(ty: GgmlType, src: &[u8], out: &mut [f32]) -> bool {
    let n = out.len();
    assert!(n / ty.block_size() * ty.block_size() == n && src.len() >= ty.row_bytes(n));
    let sp = src.as_ptr();
    let op = out.as_mut_ptr();
    match ty {
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {
            float_row_to_f32(ty, src, out);
        }
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 => {
            let ts = ty.type_size();
            let five = matches!(ty, GgmlType::Q5_0 | GgmlType::Q5_1);
            let min = matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1);
            let qh_off = if min { 4 } else { 2 };
            let qs_off = qh_off + if five { 4 } else { 0 };
            let off = _mm256_set1_epi32(if five { 16 } else { 8 });
            for b in 0..n / 32 {
                let p = sp.add(b * ts);
                let d = _mm256_set1_ps(f16_1(p));
                let mut w = nibbles_b(p.add(qs_off));
                if five {
                    w = _mm256_or_si256(
                        w,
                        bits_to_0x10((p.add(qh_off) as *const u32).read_unaligned()),
                    );
                }
                let o = op.add(32 * b);
                if min {
                    // q*d + m
                    let m = _mm256_set1_ps(f16_1(p.add(2)));
                    store32!(false, w, o, |q| _mm256_add_ps(
                        _mm256_mul_ps(_mm256_cvtepi32_ps(q), d),
                        m
                    ));
                } else {
                    // (q - off) * d
                    store32!(false, w, o, |q| _mm256_mul_ps(
                        _mm256_cvtepi32_ps(_mm256_sub_epi32(q, off)),
                        d
                    ));
                }
            }
        }
        GgmlType::Q8_0 => {
            for b in 0..n / 32 {
                let p = sp.add(b * 34);
                let d = _mm256_set1_ps(f16_1(p));
                store32!(true, loadu(p.add(2)), op.add(32 * b), |q| _mm256_mul_ps(
                    _mm256_cvtepi32_ps(q),
                    d
                ));
            }
        }
        GgmlType::Q4_K | GgmlType::Q5_K => {
            let five = ty == GgmlType::Q5_K;
            let ts = ty.type_size();
            let qs_off = if five { 48 } else { 16 };
            for s in 0..n / 256 {
                let p = sp.add(s * ts);
                let dd = f16_1(p);
                let dmin = f16_1(p.add(2));
                let scales = std::slice::from_raw_parts(p.add(4), 12);
                let qh = if five {
                    loadu(p.add(16))
                } else {
                    _mm256_setzero_si256()
                };
                for c in 0..4 {
                    let [lo, hi] = q45k_pair(p, qs_off, qh, c, five);
                    for (j, q) in [(2 * c, lo), (2 * c + 1, hi)] {
                        let (sc, m) = k_scale_min(scales, j);
                        // d1 * q - m1
                        let d1 = _mm256_set1_ps(dd * sc as f32);
                        let m1 = _mm256_set1_ps(dmin * m as f32);
                        let o = op.add(256 * s + 32 * j);
                        store32!(false, q, o, |v| _mm256_sub_ps(
                            _mm256_mul_ps(d1, _mm256_cvtepi32_ps(v)),
                            m1
                        ));
                    }
                }
            }
        }
        GgmlType::Q6_K => {
            let c32 = _mm256_set1_epi32(32);
            for s in 0..n / 256 {
                let p = sp.add(s * 210);
                let dd = f16_1(p.add(208));
                for h in 0..2 {
                    let groups = q6k_half(p, h);
                    for (g, &q) in groups.iter().enumerate() {
                        let j = 4 * h + g;
                        let o = op.add(256 * s + 32 * j);
                        for half in 0..2 {
                            // d * sc * (q - 32), left to right as in the scalar code
                            let ds = _mm256_set1_ps(dd * (*p.add(192 + 2 * j + half) as i8) as f32);
                            for k in 2 * half..2 * half + 2 {
                                let qi = _mm256_sub_epi32(bytes8_f32::<false>(q, k), c32);
                                _mm256_storeu_ps(
                                    o.add(8 * k),
                                    _mm256_mul_ps(ds, _mm256_cvtepi32_ps(qi)),
                                );
                            }
                        }
                    }
                }
            }
        }
        _ => return false,
    }
    true
}

// ---------------------------------------------------------------------------
// Float weights

/// Eight weights of a float row, as f32.
#[inline(always)]
unsafe fn load8(ty: GgmlType, p: *const u8) -> __m256 {
    match ty {
        GgmlType::F32 => _mm256_loadu_ps(p as *const f32),
        GgmlType::F16 => _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
        _ => _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i)),
            16,
        )),
    }
}

#[inline(always)]
unsafe fn float_dot_t(ty: GgmlType, row: &[u8], x: &[f32]) -> f32 {
    let n = x.len();
    let es = ty.type_size();
    debug_assert!(row.len() >= n * es);
    let (rp, xp) = (row.as_ptr(), x.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        for k in 0..4 {
            let j = i + 8 * k;
            acc[k] = _mm256_fmadd_ps(
                load8(ty, rp.add(j * es)),
                _mm256_loadu_ps(xp.add(j)),
                acc[k],
            );
        }
        i += 32;
    }
    while i + 8 <= n {
        acc[0] = _mm256_fmadd_ps(
            load8(ty, rp.add(i * es)),
            _mm256_loadu_ps(xp.add(i)),
            acc[0],
        );
        i += 8;
    }
    let mut s = hsum(_mm256_add_ps(
        _mm256_add_ps(acc[0], acc[1]),
        _mm256_add_ps(acc[2], acc[3]),
    ));
    if i < n {
        s += super::scalar::float_dot(ty, &row[i * es..], &x[i..]);
    }
    s
}

/// An F32/F16/BF16 row as f32 (`out.len()` values).
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn float_row_to_f32(ty: GgmlType, row: &[u8], out: &mut [f32]) {
    let n = out.len();
    let es = ty.type_size();
    assert!(row.len() >= n * es);
    let mut i = 0;
    while i + 8 <= n {
        _mm256_storeu_ps(out.as_mut_ptr().add(i), load8(ty, row.as_ptr().add(i * es)));
        i += 8;
    }
    if i < n {
        super::formats::dequantize_row_scalar(ty, &row[i * es..], &mut out[i..]);
    }
}

/// `out[r] = W[r] . x` for rows `r0..r1` of an F32/F16/BF16 matrix (`rb`
/// bytes per row).
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn float_matvec_rows(
    ty: GgmlType,
    raw: &[u8],
    rb: usize,
    r0: usize,
    r1: usize,
    x: &[f32],
    out: *mut f32,
) {
    assert!(raw.len() >= r1 * rb && rb >= x.len() * ty.type_size());
    let base = raw.as_ptr();
    let ahead = PREFETCH_BYTES.div_ceil(rb);
    for r in r0..r1 {
        prefetch_rows(base, rb, r + ahead, 1, r1);
        let row = std::slice::from_raw_parts(base.add(r * rb), rb);
        *out.add(r) = match ty {
            GgmlType::F32 => float_dot_t(GgmlType::F32, row, x),
            GgmlType::F16 => float_dot_t(GgmlType::F16, row, x),
            _ => float_dot_t(GgmlType::BF16, row, x),
        };
    }
}

/// Float tile: `FR` rows of f32 weights (`w[r*cols..]`) x `T` tokens of `x`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn float_tile<const T: usize>(
    w: &[f32],
    cols: usize,
    x: &[f32],
    t0: usize,
    rr: usize,
    out: *mut f32,
    ld: usize,
) {
    debug_assert!(w.len() >= FR * cols && x.len() >= (t0 + T) * cols);
    let mut acc = [[_mm256_setzero_ps(); T]; FR];
    let wp = w.as_ptr();
    let xp = x.as_ptr().add(t0 * cols);
    let main = cols / 8 * 8;
    let mut c = 0;
    while c < main {
        for r in 0..FR {
            let wv = _mm256_loadu_ps(wp.add(r * cols + c));
            for t in 0..T {
                acc[r][t] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xp.add(t * cols + c)), acc[r][t]);
            }
        }
        c += 8;
    }
    for r in 0..rr {
        for t in 0..T {
            let mut v = hsum(acc[r][t]);
            for k in main..cols {
                v += w[r * cols + k] * x[(t0 + t) * cols + k];
            }
            *out.add((t0 + t) * ld + r) = v;
        }
    }
}
