//! Small vector kernels for attention and normalisation: plain loops, with AVX2/F16C
//! versions where they pay (dot products and axpy over f16 keys and values).

use half::f16;

#[inline]
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2() {
            // SAFETY: the CPU supports AVX2 and FMA (checked above).
            return unsafe { x86::dot_f32(a, b) };
        }
    }
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[inline]
pub fn dot_f16(a: &[f32], b: &[f16]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2() {
            // SAFETY: the CPU supports AVX2, FMA and F16C (checked above).
            return unsafe { x86::dot_f16(a, b) };
        }
    }
    a.iter().zip(b).map(|(x, y)| x * y.to_f32()).sum()
}

/// `y += a * x`
#[inline]
pub fn axpy_f32(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// `y += a * x` with x in f16.
#[inline]
pub fn axpy_f16(y: &mut [f32], a: f32, x: &[f16]) {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2() {
            // SAFETY: the CPU supports AVX2, FMA and F16C (checked above).
            return unsafe { x86::axpy_f16(y, a, x) };
        }
    }
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x.to_f32();
    }
}

/// `out[j] = q · k_j * scale` for every key row `k_j` (of `q.len()` values) in `keys`.
pub fn scores_f16(q: &[f32], keys: &[f16], scale: f32, out: &mut Vec<f32>) {
    let d = q.len();
    out.clear();
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2() && d.is_multiple_of(8) {
            out.resize(keys.len() / d, 0.0);
            // SAFETY: the CPU supports AVX2, FMA and F16C (checked above); d is a multiple of 8.
            unsafe { x86::scores_f16(q, keys, scale, out) };
            return;
        }
    }
    out.extend(keys.chunks_exact(d).map(|k| dot_f16(q, k) * scale));
}

/// `out = sum_j p[j] * v_j` over value rows `v_j` (of `out.len()` values) in `values`.
pub fn weighted_sum_f16(out: &mut [f32], p: &[f32], values: &[f16]) {
    let d = out.len();
    out.fill(0.0);
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2() && d.is_multiple_of(8) {
            // SAFETY: the CPU supports AVX2, FMA and F16C (checked above); d is a multiple of 8.
            unsafe { x86::weighted_sum_f16(out, p, values) };
            return;
        }
    }
    for (&pj, v) in p.iter().zip(values.chunks_exact(d)) {
        axpy_f16(out, pj, v);
    }
}

#[cfg(target_arch = "x86_64")]
#[inline]
fn has_avx2() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    })
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use half::f16;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let mut i = 0;
        while i + 16 <= n {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
            acc1 = _mm256_fmadd_ps(
                _mm256_loadu_ps(pa.add(i + 8)),
                _mm256_loadu_ps(pb.add(i + 8)),
                acc1,
            );
            i += 16;
        }
        while i + 8 <= n {
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
            i += 8;
        }
        let mut s = hsum(_mm256_add_ps(acc0, acc1));
        while i < n {
            s += *pa.add(i) * *pb.add(i);
            i += 1;
        }
        s
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_f16(a: &[f32], b: &[f16]) -> f32 {
        let n = a.len().min(b.len());
        let pa = a.as_ptr();
        let pb = b.as_ptr() as *const u16;
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let mut i = 0;
        while i + 16 <= n {
            let b0 = _mm256_cvtph_ps(_mm_loadu_si128(pb.add(i) as *const __m128i));
            let b1 = _mm256_cvtph_ps(_mm_loadu_si128(pb.add(i + 8) as *const __m128i));
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), b0, acc0);
            acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i + 8)), b1, acc1);
            i += 16;
        }
        while i + 8 <= n {
            let b0 = _mm256_cvtph_ps(_mm_loadu_si128(pb.add(i) as *const __m128i));
            acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), b0, acc0);
            i += 8;
        }
        let mut s = hsum(_mm256_add_ps(acc0, acc1));
        while i < n {
            s += *pa.add(i) * b[i].to_f32();
            i += 1;
        }
        s
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn scores_f16(q: &[f32], keys: &[f16], scale: f32, out: &mut [f32]) {
        let d = q.len();
        let pk = keys.as_ptr() as *const u16;
        let pq = q.as_ptr();
        for (j, o) in out.iter_mut().enumerate() {
            let k = pk.add(j * d);
            let mut acc0 = _mm256_setzero_ps();
            let mut acc1 = _mm256_setzero_ps();
            let mut i = 0;
            while i + 16 <= d {
                let k0 = _mm256_cvtph_ps(_mm_loadu_si128(k.add(i) as *const __m128i));
                let k1 = _mm256_cvtph_ps(_mm_loadu_si128(k.add(i + 8) as *const __m128i));
                acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pq.add(i)), k0, acc0);
                acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(pq.add(i + 8)), k1, acc1);
                i += 16;
            }
            if i < d {
                let k0 = _mm256_cvtph_ps(_mm_loadu_si128(k.add(i) as *const __m128i));
                acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pq.add(i)), k0, acc0);
            }
            *o = hsum(_mm256_add_ps(acc0, acc1)) * scale;
        }
    }

    /// Accumulates each block of 64 columns in eight registers across all rows.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn weighted_sum_f16(out: &mut [f32], p: &[f32], values: &[f16]) {
        let d = out.len();
        let pv = values.as_ptr() as *const u16;
        let mut start = 0;
        // Blocks of 64 columns keep 8 accumulators in registers.
        while start < d {
            let w = (d - start).min(64);
            let mut acc = [_mm256_setzero_ps(); 8];
            let nv = w / 8;
            for (j, &pj) in p.iter().enumerate() {
                let a = _mm256_set1_ps(pj);
                let v = pv.add(j * d + start);
                for (c, acc) in acc.iter_mut().enumerate().take(nv) {
                    let x = _mm256_cvtph_ps(_mm_loadu_si128(v.add(8 * c) as *const __m128i));
                    *acc = _mm256_fmadd_ps(a, x, *acc);
                }
            }
            for (c, acc) in acc.iter().enumerate().take(nv) {
                _mm256_storeu_ps(out.as_mut_ptr().add(start + 8 * c), *acc);
            }
            start += w;
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn axpy_f16(y: &mut [f32], a: f32, x: &[f16]) {
        let n = y.len().min(x.len());
        let py = y.as_mut_ptr();
        let px = x.as_ptr() as *const u16;
        let va = _mm256_set1_ps(a);
        let mut i = 0;
        while i + 8 <= n {
            let xv = _mm256_cvtph_ps(_mm_loadu_si128(px.add(i) as *const __m128i));
            _mm256_storeu_ps(
                py.add(i),
                _mm256_fmadd_ps(va, xv, _mm256_loadu_ps(py.add(i))),
            );
            i += 8;
        }
        while i < n {
            *py.add(i) += a * x[i].to_f32();
            i += 1;
        }
    }
}

/// RMSNorm: `out = x / sqrt(mean(x^2) + eps) * w`.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ms = x.iter().map(|v| (*v as f64) * (*v as f64)).sum::<f64>() / x.len() as f64;
    let inv = 1.0 / ((ms as f32) + eps).sqrt();
    for ((o, v), w) in out.iter_mut().zip(x).zip(w) {
        *o = v * inv * w;
    }
}

pub fn rms_norm_inplace(x: &mut [f32], w: &[f32], eps: f32) {
    let ms = x.iter().map(|v| (*v as f64) * (*v as f64)).sum::<f64>() / x.len() as f64;
    let inv = 1.0 / ((ms as f32) + eps).sqrt();
    for (v, w) in x.iter_mut().zip(w) {
        *v *= inv * w;
    }
}

#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

#[inline]
pub fn gelu_tanh(x: f32) -> f32 {
    const C: f32 = 0.797_884_6; // sqrt(2/pi)
    0.5 * x * (1.0 + (C * (x + 0.044715 * x * x * x)).tanh())
}

/// Softmax in place; returns nothing. Stable against large logits.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simd_dot_and_axpy_match_scalar() {
        let a: Vec<f32> = (0..77).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..77).map(|i| (i as f32 * 0.11).cos()).collect();
        let bh: Vec<f16> = b.iter().map(|&x| f16::from_f32(x)).collect();
        let want: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        let want_h: f32 = a.iter().zip(&bh).map(|(x, y)| x * y.to_f32()).sum();
        assert!((dot_f32(&a, &b) - want).abs() < 1e-4);
        assert!((dot_f16(&a, &bh) - want_h).abs() < 1e-4);
        // Whole-matrix kernels against the per-row ones.
        for d in [64usize, 256, 24] {
            let n = 13;
            let keys: Vec<f16> = (0..n * d)
                .map(|i| f16::from_f32((i as f32 * 0.013).sin()))
                .collect();
            let q: Vec<f32> = (0..d).map(|i| (i as f32 * 0.07).cos()).collect();
            let mut s = Vec::new();
            scores_f16(&q, &keys, 0.5, &mut s);
            for (j, sj) in s.iter().enumerate() {
                let want: f32 = q
                    .iter()
                    .zip(&keys[j * d..(j + 1) * d])
                    .map(|(a, b)| a * b.to_f32())
                    .sum::<f32>()
                    * 0.5;
                assert!((sj - want).abs() < 1e-4, "d {d} key {j}: {sj} vs {want}");
            }
            let p: Vec<f32> = (0..n).map(|j| 1.0 / (j + 1) as f32).collect();
            let mut o = vec![0.0f32; d];
            weighted_sum_f16(&mut o, &p, &keys);
            for (c, oc) in o.iter().enumerate() {
                let want: f32 = (0..n).map(|j| p[j] * keys[j * d + c].to_f32()).sum();
                assert!((oc - want).abs() < 1e-4, "d {d} col {c}: {oc} vs {want}");
            }
        }
        let mut y = vec![1.0f32; 77];
        axpy_f16(&mut y, 0.5, &bh);
        for (i, v) in y.iter().enumerate() {
            assert!((v - (1.0 + 0.5 * bh[i].to_f32())).abs() < 1e-6);
        }
    }
}
