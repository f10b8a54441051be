//! Block layouts: scalar dequantization and simple round-to-nearest quantizers.
//!
//! All multi-byte fields are little-endian; `d`/`dmin`/`m` are IEEE half floats
//! unless stated otherwise.
//!
//! | type | elems | bytes | layout |
//! |------|------:|------:|--------|
//! | Q4_0 | 32 | 18 | `d, qs[16]`; `(q-8)*d`, low nibbles = elems 0..16, high = 16..32 |
//! | Q4_1 | 32 | 20 | `d, m, qs[16]`; `q*d + m` |
//! | Q5_0 | 32 | 22 | `d, qh: u32, qs[16]`; bit `i` of `qh` is bit 4 of elem `i`; `(q-16)*d` |
//! | Q5_1 | 32 | 24 | `d, m, qh: u32, qs[16]`; `q*d + m` |
//! | Q8_0 | 32 | 34 | `d, qs[32]: i8`; `q*d` |
//! | Q4_K | 256 | 144 | `d, dmin, scales[12], qs[128]` |
//! | Q5_K | 256 | 176 | `d, dmin, scales[12], qh[32], qs[128]` |
//! | Q6_K | 256 | 210 | `ql[128], qh[64], scales[16]: i8, d` |
//! | Q8_K | 256 | 292 | `d: f32, qs[256]: i8, bsums[16]: i16` |

use super::GgmlType;
use half::{bf16, f16};

#[inline(always)]
pub(crate) fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

#[inline(always)]
fn put_f16(out: &mut Vec<u8>, x: f32) {
    out.extend_from_slice(&f16::from_f32(x).to_bits().to_le_bytes());
}

/// The 6-bit scale and min of sub-block `j` (0..8) of a Q4_K/Q5_K super-block.
#[inline(always)]
pub(crate) fn k_scale_min(scales: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (scales[j] & 63, scales[j + 4] & 63)
    } else {
        let sc = (scales[j + 4] & 0x0f) | ((scales[j - 4] >> 6) << 4);
        let m = (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4);
        (sc, m)
    }
}

/// Packs eight 6-bit scales and mins into the 12-byte Q4_K/Q5_K form.
fn k_pack_scales(sc: &[u8; 8], m: &[u8; 8]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for j in 0..4 {
        s[j] = (sc[j] & 63) | ((sc[j + 4] >> 4) << 6);
        s[j + 4] = (m[j] & 63) | ((m[j + 4] >> 4) << 6);
        s[j + 8] = (sc[j + 4] & 0x0f) | ((m[j + 4] & 0x0f) << 4);
    }
    s
}

/// Dequantizes `out.len()` elements (a multiple of the block size) of type
/// `ty` from `src`: the portable version, which defines the values (the SIMD
/// one gives the same bits).
pub(crate) fn dequantize_row_scalar(ty: GgmlType, src: &[u8], out: &mut [f32]) {
    let n = out.len();
    let bs = ty.block_size();
    assert_eq!(
        n % bs,
        0,
        "dequantize_row: {n} elements is not a multiple of the {ty} block size {bs}"
    );
    let ts = ty.type_size();
    assert!(
        src.len() >= n / bs * ts,
        "dequantize_row: {} bytes is too short for {n} {ty} elements",
        src.len()
    );
    let blocks = src.chunks_exact(ts).zip(out.chunks_exact_mut(bs));
    match ty {
        GgmlType::F32 => {
            for (b, o) in blocks {
                o[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        GgmlType::F16 => {
            for (b, o) in blocks {
                o[0] = f16_at(b, 0);
            }
        }
        GgmlType::BF16 => {
            for (b, o) in blocks {
                o[0] = bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            }
        }
        GgmlType::Q4_0 => blocks.for_each(|(b, o)| dequant_q4_0(b, o)),
        GgmlType::Q4_1 => blocks.for_each(|(b, o)| dequant_q4_1(b, o)),
        GgmlType::Q5_0 => blocks.for_each(|(b, o)| dequant_q5_0(b, o)),
        GgmlType::Q5_1 => blocks.for_each(|(b, o)| dequant_q5_1(b, o)),
        GgmlType::Q8_0 => blocks.for_each(|(b, o)| dequant_q8_0(b, o)),
        GgmlType::Q4_K => blocks.for_each(|(b, o)| dequant_q45_k::<false>(b, o)),
        GgmlType::Q5_K => blocks.for_each(|(b, o)| dequant_q45_k::<true>(b, o)),
        GgmlType::Q6_K => blocks.for_each(|(b, o)| dequant_q6_k(b, o)),
        GgmlType::Q8_K => blocks.for_each(|(b, o)| dequant_q8_k(b, o)),
    }
}

fn dequant_q4_0(b: &[u8], o: &mut [f32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        o[j] = ((qs[j] & 0x0f) as i32 - 8) as f32 * d;
        o[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
    }
}

fn dequant_q4_1(b: &[u8], o: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qs = &b[4..20];
    for j in 0..16 {
        o[j] = (qs[j] & 0x0f) as f32 * d + m;
        o[j + 16] = (qs[j] >> 4) as f32 * d + m;
    }
}

fn dequant_q5_0(b: &[u8], o: &mut [f32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    for j in 0..16 {
        let lo = (qs[j] & 0x0f) as u32 | ((qh >> j) & 1) << 4;
        let hi = (qs[j] >> 4) as u32 | ((qh >> (j + 16)) & 1) << 4;
        o[j] = (lo as i32 - 16) as f32 * d;
        o[j + 16] = (hi as i32 - 16) as f32 * d;
    }
}

fn dequant_q5_1(b: &[u8], o: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    for j in 0..16 {
        let lo = (qs[j] & 0x0f) as u32 | ((qh >> j) & 1) << 4;
        let hi = (qs[j] >> 4) as u32 | ((qh >> (j + 16)) & 1) << 4;
        o[j] = lo as f32 * d + m;
        o[j + 16] = hi as f32 * d + m;
    }
}

fn dequant_q8_0(b: &[u8], o: &mut [f32]) {
    let d = f16_at(b, 0);
    for j in 0..32 {
        o[j] = b[2 + j] as i8 as f32 * d;
    }
}

/// Q4_K (`FIVE` false) and Q5_K: sub-block `j` of 32 is `d * sc[j] * q - dmin * m[j]`,
/// Q5_K's fifth bits coming from the 32 bytes after the scales (bit `j` of byte `l`).
fn dequant_q45_k<const FIVE: bool>(b: &[u8], o: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let (qh, qs) = if FIVE {
        (&b[16..48], &b[48..176])
    } else {
        (&b[0..0], &b[16..144])
    };
    for c in 0..4 {
        let (s1, m1) = k_scale_min(scales, 2 * c);
        let (s2, m2) = k_scale_min(scales, 2 * c + 1);
        let (d1, m1) = (d * s1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * s2 as f32, dmin * m2 as f32);
        let q = &qs[32 * c..32 * c + 32];
        for l in 0..32 {
            let (h1, h2) = if FIVE {
                (
                    ((qh[l] >> (2 * c)) & 1) << 4,
                    ((qh[l] >> (2 * c + 1)) & 1) << 4,
                )
            } else {
                (0, 0)
            };
            o[64 * c + l] = d1 * ((q[l] & 0x0f) | h1) as f32 - m1;
            o[64 * c + 32 + l] = d2 * ((q[l] >> 4) | h2) as f32 - m2;
        }
    }
}

fn dequant_q6_k(b: &[u8], o: &mut [f32]) {
    let ql = &b[0..128];
    let qh = &b[128..192];
    let sc = &b[192..208];
    let d = f16_at(b, 208);
    for h in 0..2 {
        let (ql, qh, sc, o) = (
            &ql[64 * h..],
            &qh[32 * h..],
            &sc[8 * h..],
            &mut o[128 * h..],
        );
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0f) | (qh[l] & 3) << 4) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0f) | ((qh[l] >> 2) & 3) << 4) as i32 - 32;
            let q3 = ((ql[l] >> 4) | ((qh[l] >> 4) & 3) << 4) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | ((qh[l] >> 6) & 3) << 4) as i32 - 32;
            o[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            o[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            o[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            o[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}

fn dequant_q8_k(b: &[u8], o: &mut [f32]) {
    let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    for j in 0..256 {
        o[j] = b[4 + j] as i8 as f32 * d;
    }
}

/// Quantizes `x` (a multiple of the block size) to `ty` with a simple
/// round-to-nearest scheme. Meant for tests and for building small models; it
/// does not search for the best scales.
pub fn quantize_row(ty: GgmlType, x: &[f32]) -> Vec<u8> {
    let bs = ty.block_size();
    assert_eq!(
        x.len() % bs,
        0,
        "quantize_row: {} elements is not a multiple of the {ty} block size",
        x.len()
    );
    let mut out = Vec::with_capacity(ty.row_bytes(x.len()));
    for b in x.chunks_exact(bs) {
        match ty {
            GgmlType::F32 => out.extend_from_slice(&b[0].to_le_bytes()),
            GgmlType::F16 => put_f16(&mut out, b[0]),
            GgmlType::BF16 => out.extend_from_slice(&bf16::from_f32(b[0]).to_bits().to_le_bytes()),
            GgmlType::Q4_0 => quant_sym(b, 8, 15, None, &mut out),
            GgmlType::Q5_0 => quant_sym(b, 16, 31, Some(()), &mut out),
            GgmlType::Q4_1 => quant_affine(b, 15, &mut out),
            GgmlType::Q5_1 => quant_affine(b, 31, &mut out),
            GgmlType::Q8_0 => {
                let amax = b.iter().fold(0f32, |a, v| a.max(v.abs()));
                let d = amax / 127.0;
                let id = if d > 0.0 { 1.0 / d } else { 0.0 };
                put_f16(&mut out, d);
                out.extend(
                    b.iter()
                        .map(|v| (v * id).round().clamp(-127.0, 127.0) as i8 as u8),
                );
            }
            GgmlType::Q4_K => quant_k(b, 15, &mut out),
            GgmlType::Q5_K => quant_k(b, 31, &mut out),
            GgmlType::Q6_K => quant_q6_k(b, &mut out),
            GgmlType::Q8_K => {
                let amax = b.iter().fold(0f32, |a, v| a.max(v.abs()));
                let d = amax / 127.0;
                let id = if d > 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&d.to_le_bytes());
                let q: Vec<i8> = b
                    .iter()
                    .map(|v| (v * id).round().clamp(-127.0, 127.0) as i8)
                    .collect();
                out.extend(q.iter().map(|&v| v as u8));
                for g in q.chunks_exact(16) {
                    let s: i16 = g.iter().map(|&v| v as i16).sum();
                    out.extend_from_slice(&s.to_le_bytes());
                }
            }
        }
    }
    out
}

/// Q4_0 / Q5_0: `(q - off) * d`, `q` in `0..=qmax`.
fn quant_sym(b: &[f32], off: i32, qmax: i32, five: Option<()>, out: &mut Vec<u8>) {
    // The value of largest magnitude maps to -off, keeping its sign.
    let m = b
        .iter()
        .fold(0f32, |a, &v| if v.abs() > a.abs() { v } else { a });
    let d = m / -(off as f32);
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let q: Vec<u8> = b
        .iter()
        .map(|v| ((v * id).round() as i32 + off).clamp(0, qmax) as u8)
        .collect();
    put_f16(out, d);
    put_low_high(&q, five.is_some(), out);
}

/// Q4_1 / Q5_1: `q * d + m`.
fn quant_affine(b: &[f32], qmax: i32, out: &mut Vec<u8>) {
    let min = b.iter().fold(f32::INFINITY, |a, &v| a.min(v));
    let max = b.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
    let d = (max - min) / qmax as f32;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    let q: Vec<u8> = b
        .iter()
        .map(|v| ((v - min) * id).round().clamp(0.0, qmax as f32) as u8)
        .collect();
    put_f16(out, d);
    put_f16(out, min);
    put_low_high(&q, qmax == 31, out);
}

/// A 32-value block's 4- or 5-bit values `q` as Q4_0/Q4_1/Q5_0/Q5_1 store them: with
/// `five`, the fifth bits as one little-endian u32; then the low nibbles, value `j` and
/// value `j + 16` in one byte.
fn put_low_high(q: &[u8], five: bool, out: &mut Vec<u8>) {
    if five {
        let qh = q
            .iter()
            .enumerate()
            .fold(0u32, |h, (i, &v)| h | (((v >> 4) as u32 & 1) << i));
        out.extend_from_slice(&qh.to_le_bytes());
    }
    for j in 0..16 {
        out.push((q[j] & 0x0f) | ((q[j + 16] & 0x0f) << 4));
    }
}

/// Q4_K / Q5_K: sub-block `j` of 32 is `d*sc[j]*q - dmin*m[j]`.
fn quant_k(b: &[f32], qmax: i32, out: &mut Vec<u8>) {
    let mut sub_scale = [0f32; 8];
    let mut sub_min = [0f32; 8]; // stored as a positive offset: value = scale*q - min
    for j in 0..8 {
        let s = &b[32 * j..32 * j + 32];
        let lo = s.iter().fold(0f32, |a, &v| a.min(v));
        let hi = s.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
        sub_scale[j] = (hi - lo).max(0.0) / qmax as f32;
        sub_min[j] = -lo;
    }
    let max_scale = sub_scale.iter().fold(0f32, |a, &v| a.max(v));
    let max_min = sub_min.iter().fold(0f32, |a, &v| a.max(v));
    let d = f16::from_f32(max_scale / 63.0).to_f32();
    let dmin = f16::from_f32(max_min / 63.0).to_f32();
    let mut sc = [0u8; 8];
    let mut mn = [0u8; 8];
    for j in 0..8 {
        sc[j] = if d > 0.0 {
            (sub_scale[j] / d).round().clamp(0.0, 63.0) as u8
        } else {
            0
        };
        // Round the min up so that the smallest value stays reachable.
        mn[j] = if dmin > 0.0 {
            (sub_min[j] / dmin).ceil().clamp(0.0, 63.0) as u8
        } else {
            0
        };
    }
    let mut q = [0u8; 256];
    for j in 0..8 {
        let scale = d * sc[j] as f32;
        let m = dmin * mn[j] as f32;
        let id = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        for l in 0..32 {
            q[32 * j + l] = ((b[32 * j + l] + m) * id).round().clamp(0.0, qmax as f32) as u8;
        }
    }
    put_f16(out, d);
    put_f16(out, dmin);
    out.extend_from_slice(&k_pack_scales(&sc, &mn));
    if qmax == 31 {
        let mut qh = [0u8; 32];
        for c in 0..4 {
            for l in 0..32 {
                qh[l] |= ((q[64 * c + l] >> 4) & 1) << (2 * c);
                qh[l] |= ((q[64 * c + 32 + l] >> 4) & 1) << (2 * c + 1);
            }
        }
        out.extend_from_slice(&qh);
    }
    for c in 0..4 {
        for l in 0..32 {
            out.push((q[64 * c + l] & 0x0f) | ((q[64 * c + 32 + l] & 0x0f) << 4));
        }
    }
}

/// Q6_K: sub-block `j` of 16 is `d*sc[j]*(q - 32)`.
fn quant_q6_k(b: &[f32], out: &mut Vec<u8>) {
    let mut sub = [0f32; 16];
    for j in 0..16 {
        let m = b[16 * j..16 * j + 16]
            .iter()
            .fold(0f32, |a, &v| if v.abs() > a.abs() { v } else { a });
        sub[j] = m / -32.0;
    }
    let amax = sub.iter().fold(0f32, |a, &v| a.max(v.abs()));
    let d = f16::from_f32(amax / 127.0).to_f32();
    let mut sc = [0i8; 16];
    let mut q = [32u8; 256];
    for j in 0..16 {
        sc[j] = if d > 0.0 {
            (sub[j] / d).round().clamp(-128.0, 127.0) as i8
        } else {
            0
        };
        let scale = d * sc[j] as f32;
        if scale != 0.0 {
            for l in 0..16 {
                q[16 * j + l] = ((b[16 * j + l] / scale).round() as i32 + 32).clamp(0, 63) as u8;
            }
        }
    }
    let mut ql = [0u8; 128];
    let mut qh = [0u8; 64];
    for h in 0..2 {
        for l in 0..32 {
            let e = |k: usize| q[128 * h + 32 * k + l];
            let (q1, q2, q3, q4) = (e(0), e(1), e(2), e(3));
            ql[64 * h + l] = (q1 & 0x0f) | ((q3 & 0x0f) << 4);
            ql[64 * h + 32 + l] = (q2 & 0x0f) | ((q4 & 0x0f) << 4);
            qh[32 * h + l] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6);
        }
    }
    out.extend_from_slice(&ql);
    out.extend_from_slice(&qh);
    out.extend(sc.iter().map(|&s| s as u8));
    put_f16(out, d);
}
