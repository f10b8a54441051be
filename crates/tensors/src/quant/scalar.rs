//! Portable kernels. They define the arithmetic that the SIMD kernels
//! reproduce: weights in integer form, activations quantized by
//! [`QActs`](super::act::QActs), exact integer dot products per block of 32,
//! then `f32`.

// Kernels index several arrays with one counter; iterators would obscure them.
#![allow(clippy::needless_range_loop)]

use super::act::ActRow;
use super::formats::{f16_at, k_scale_min};
use super::GgmlType;

/// One block of 32 weights in integer form:
/// `w[i] = d * sc[i / 16] * q[i] + m + m16[i / 16]`, where `q` is unsigned
/// (`0..=63`, the [`Kind::Unsigned`] kinds) or the bits of an `i8`
/// ([`Kind::Signed`]: `m == 0`, `m16 == [0, 0]`). Only Q6_K has
/// `sc != [1, 1]` and a non-zero `m16`; the others have `m16 == [0, 0]`.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Blk {
    pub q: [u8; 32],
    pub d: f32,
    pub m: f32,
    pub m16: [f32; 2],
    pub sc: [i16; 2],
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Unsigned `q`, an offset per 32 (Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K).
    Unsigned,
    /// Unsigned `q`, a scale and an offset per 16 (Q6_K).
    Unsigned16,
    /// Signed `q`, no offset (Q8_0, Q8_K).
    Signed,
}

pub(crate) fn kind(ty: GgmlType) -> Kind {
    match ty {
        GgmlType::Q8_0 | GgmlType::Q8_K => Kind::Signed,
        GgmlType::Q6_K => Kind::Unsigned16,
        _ => Kind::Unsigned,
    }
}

/// The largest weight byte a panel of `ty` holds (unsigned kinds: the
/// quantized values before their offset).
pub(crate) fn max_weight(ty: GgmlType) -> u32 {
    match ty {
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q4_K => 15,
        GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q5_K => 31,
        GgmlType::Q6_K => 63,
        _ => 127,
    }
}

/// Block `b` (of 32 elements) of a quantized row.
pub(crate) fn decode_blk(ty: GgmlType, row: &[u8], b: usize) -> Blk {
    let mut k = Blk {
        sc: [1, 1],
        ..Blk::default()
    };
    match ty {
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 => {
            let blk = &row[b * ty.type_size()..(b + 1) * ty.type_size()];
            k.d = f16_at(blk, 0);
            let (qh, qs) = match ty {
                GgmlType::Q4_0 => (0, &blk[2..18]),
                GgmlType::Q4_1 => (0, &blk[4..20]),
                GgmlType::Q5_0 => (
                    u32::from_le_bytes(blk[2..6].try_into().unwrap()),
                    &blk[6..22],
                ),
                _ => (
                    u32::from_le_bytes(blk[4..8].try_into().unwrap()),
                    &blk[8..24],
                ),
            };
            k.m = match ty {
                GgmlType::Q4_0 => -8.0 * k.d,
                GgmlType::Q5_0 => -16.0 * k.d,
                _ => f16_at(blk, 2),
            };
            for j in 0..16 {
                k.q[j] = (qs[j] & 0x0f) | (((qh >> j) & 1) << 4) as u8;
                k.q[j + 16] = (qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4) as u8;
            }
        }
        GgmlType::Q8_0 => {
            let blk = &row[b * 34..(b + 1) * 34];
            k.d = f16_at(blk, 0);
            k.q.copy_from_slice(&blk[2..34]);
        }
        GgmlType::Q4_K | GgmlType::Q5_K => {
            let ts = ty.type_size();
            let sb = &row[(b / 8) * ts..(b / 8 + 1) * ts];
            let j = b % 8;
            let (sc, m) = k_scale_min(&sb[4..16], j);
            k.d = f16_at(sb, 0) * sc as f32;
            k.m = -f16_at(sb, 2) * m as f32;
            let c = j / 2;
            let shift = 4 * (j % 2);
            let qs = if ty == GgmlType::Q4_K {
                &sb[16 + 32 * c..48 + 32 * c]
            } else {
                &sb[48 + 32 * c..80 + 32 * c]
            };
            for l in 0..32 {
                k.q[l] = (qs[l] >> shift) & 0x0f;
                if ty == GgmlType::Q5_K {
                    k.q[l] |= ((sb[16 + l] >> j) & 1) << 4;
                }
            }
        }
        GgmlType::Q6_K => {
            let sb = &row[(b / 8) * 210..(b / 8 + 1) * 210];
            let j = b % 8; // 32-group: half h = j/4, group g = j%4 within the half
            let (h, g) = (j / 4, j % 4);
            let ql = &sb[64 * h + 32 * (g & 1)..][..32];
            let qh = &sb[128 + 32 * h..][..32];
            for l in 0..32 {
                let lo = (ql[l] >> (4 * (g >> 1))) & 0x0f;
                let hi = (qh[l] >> (2 * g)) & 3;
                k.q[l] = lo | (hi << 4);
            }
            k.d = f16_at(sb, 208);
            k.sc = [
                sb[192 + 2 * j] as i8 as i16,
                sb[192 + 2 * j + 1] as i8 as i16,
            ];
            k.m16 = [-32.0 * k.d * k.sc[0] as f32, -32.0 * k.d * k.sc[1] as f32];
        }
        GgmlType::Q8_K => {
            let sb = &row[(b / 8) * 292..(b / 8 + 1) * 292];
            k.d = f32::from_le_bytes(sb[0..4].try_into().unwrap());
            k.q.copy_from_slice(&sb[4 + 32 * (b % 8)..][..32]);
        }
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {
            unreachable!("decode_blk on a float type")
        }
    }
    k
}

/// Integer dot product of one decoded block with 32 activations.
#[inline(always)]
pub(crate) fn blk_isum(kind: Kind, k: &Blk, x: &[i8]) -> i32 {
    let mut s = [0i32; 2];
    for i in 0..32 {
        let w = match kind {
            Kind::Signed => k.q[i] as i8 as i32,
            _ => k.q[i] as i32,
        };
        s[i / 16] += w * x[i] as i32;
    }
    s[0] * k.sc[0] as i32 + s[1] * k.sc[1] as i32
}

/// Dot product of a quantized weight row with one token's quantized activations.
pub(crate) fn vec_dot(ty: GgmlType, row: &[u8], a: ActRow<'_>) -> f32 {
    let kind = kind(ty);
    let mut acc = 0f32;
    let mut accm = 0f32;
    for b in 0..a.nb {
        let k = decode_blk(ty, row, b);
        let isum = blk_isum(kind, &k, &a.qs[32 * b..32 * b + 32]);
        acc += k.d * a.d[b] * isum as f32;
        accm += k.m * a.ds[b] + k.m16[0] * a.ds16[2 * b] + k.m16[1] * a.ds16[2 * b + 1];
    }
    acc + accm
}

/// Dot product of an F32/F16/BF16 row with `x` (eight partial sums).
pub(crate) fn float_dot(ty: GgmlType, row: &[u8], x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let es = ty.type_size();
    for (i, (w, xv)) in row.chunks_exact(es).zip(x).enumerate() {
        let w = match ty {
            GgmlType::F32 => f32::from_le_bytes([w[0], w[1], w[2], w[3]]),
            GgmlType::F16 => f16_at(w, 0),
            _ => f32::from_bits((u16::from_le_bytes([w[0], w[1]]) as u32) << 16),
        };
        acc[i % 8] += w * xv;
    }
    acc.iter().sum()
}
