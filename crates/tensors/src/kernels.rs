//! Small vector kernels for attention and normalisation: plain loops, with AVX2/F16C
//! versions where they pay (dot products and axpy over f16 keys and values), and the
//! choice of kernel family ([`Family`]) that every SIMD path of the engine follows.

use half::f16;

/// A family of SIMD kernels, narrowest first. The engine uses the widest the CPU has,
/// or the one `KVMERGER_KERNELS` names (`avx512`, `avx2` or `plain`), so that every
/// family can be tested and measured on whatever machine runs it.
/// `KVMERGER_NO_SIMD=1` (older name) means `plain`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Family {
    /// Portable loops: the arithmetic every other family reproduces.
    Plain,
    /// AVX2 with FMA and F16C.
    Avx2,
    /// AVX-512F on top of AVX2 (wider GEMM and attention kernels; the quantized
    /// products stay AVX2, except the 8-bit prefill tiles, which use AVX-512
    /// VNNI's `vpdpbusd` on CPUs that have it).
    Avx512,
}

impl Family {
    pub const ALL: [Family; 3] = [Family::Plain, Family::Avx2, Family::Avx512];

    pub fn name(self) -> &'static str {
        match self {
            Family::Plain => "plain",
            Family::Avx2 => "avx2",
            Family::Avx512 => "avx512",
        }
    }

    /// The widest family this CPU runs.
    pub fn supported() -> Family {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c");
            if avx2 && is_x86_feature_detected!("avx512f") {
                return Family::Avx512;
            }
            if avx2 {
                return Family::Avx2;
            }
        }
        Family::Plain
    }

    /// The family asked for in the environment, checked against the CPU: `Ok(None)`
    /// when none is asked for, an error naming the problem for an unknown name or a
    /// family the CPU lacks.
    pub fn requested() -> Result<Option<Family>, String> {
        let no_simd =
            std::env::var_os("KVMERGER_NO_SIMD").is_some_and(|v| !v.is_empty() && v != "0");
        let asked = match std::env::var("KVMERGER_KERNELS") {
            Ok(v) if !v.trim().is_empty() => {
                let v = v.trim().to_ascii_lowercase();
                Some(Family::ALL.into_iter().find(|f| f.name() == v).ok_or_else(|| {
                    format!("KVMERGER_KERNELS={v}: unknown kernel family (avx512, avx2 or plain)")
                })?)
            }
            Err(std::env::VarError::NotUnicode(_)) => {
                return Err("KVMERGER_KERNELS is not valid UTF-8 (avx512, avx2 or plain)".into())
            }
            _ => None,
        };
        let asked = if no_simd { Some(Family::Plain) } else { asked };
        match asked {
            Some(f) if f > Family::supported() => Err(format!(
                "KVMERGER_KERNELS={}: this CPU runs at most the {} kernels",
                f.name(),
                Family::supported().name()
            )),
            a => Ok(a),
        }
    }

    /// The family in use, fixed at its first call: the one asked for in the
    /// environment if the CPU runs it, else the widest the CPU runs. (The binary
    /// refuses a bad `KVMERGER_KERNELS` at start with [`Family::requested`]'s error;
    /// a library caller gets the widest family instead.)
    pub fn active() -> Family {
        use std::sync::OnceLock;
        static ACTIVE: OnceLock<Family> = OnceLock::new();
        *ACTIVE.get_or_init(|| {
            Family::requested()
                .ok()
                .flatten()
                .unwrap_or_else(Family::supported)
        })
    }
}

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

/// Converts f16 values to f32 (`dst.len()` values from the front of `src`).
pub fn f16_to_f32(src: &[f16], dst: &mut [f32]) {
    let n = dst.len();
    let src = &src[..n];
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2() {
            // SAFETY: the CPU supports AVX2 and F16C (checked above); lengths are equal.
            unsafe { x86::f16_to_f32(src, dst) };
            return;
        }
    }
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.to_f32();
    }
}

/// Dequantizes q8_0 rows of `dim` values (one f16 scale per block of 32 values of a
/// row) into `out`.
pub fn q8_0_to_f32(q: &[i8], d: &[f16], dim: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2() && dim.is_multiple_of(32) {
            let out = &mut out[..q.len()];
            assert!(d.len() * 32 >= q.len());
            // SAFETY: the CPU supports AVX2 and F16C (checked above); `out` and `d`
            // cover `q` (asserted above) and rows are whole blocks.
            unsafe { x86::q8_0_to_f32(q, d, out) };
            return;
        }
    }
    kvmerger_compression::dequantize_q8_0(q, d, dim, out);
}

/// `out[r * stride + j] = (q_r · k_j) * scale` for the `q.len() / d` query rows and
/// the `keys.len() / d` key rows (both row-major, `d` values each).
pub fn dot_rows(q: &[f32], keys: &[f32], d: usize, scale: f32, out: &mut [f32], stride: usize) {
    let (nq, nk) = (q.len() / d, keys.len() / d);
    assert!(nq == 0 || (nq - 1) * stride + nk <= out.len());
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2() && d.is_multiple_of(8) {
            // SAFETY: the CPU supports AVX2 and FMA (checked above); d is a multiple of 8
            // and `out` holds every row (asserted above).
            unsafe { x86::dot_rows(q, keys, d, scale, out, stride) };
            return;
        }
    }
    for r in 0..nq {
        let qr = &q[r * d..(r + 1) * d];
        for j in 0..nk {
            out[r * stride + j] = dot_f32(qr, &keys[j * d..(j + 1) * d]) * scale;
        }
    }
}

/// `o += sum_j p[j] * v_j` over the value rows `v_j` (of `o.len()` values) in `values`.
pub fn add_weighted_rows(o: &mut [f32], p: &[f32], values: &[f32]) {
    let d = o.len();
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2() && d.is_multiple_of(8) {
            // SAFETY: the CPU supports AVX2 and FMA (checked above); d is a multiple of 8.
            unsafe { x86::add_weighted_rows(o, p, values) };
            return;
        }
    }
    for (&pj, v) in p.iter().zip(values.chunks_exact(d)) {
        axpy_f32(o, pj, v);
    }
}

/// `x[i] = exp(x[i] - m)` in place; returns the sum of the results. `m` should be at
/// least `max(x)` (the softmax shift), so that nothing overflows.
pub fn exp_shifted_sum(x: &mut [f32], m: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2() {
            // SAFETY: the CPU supports AVX2 and FMA (checked above).
            return unsafe { x86::exp_shifted_sum(x, m) };
        }
    }
    let mut sum = 0.0f32;
    for v in x.iter_mut() {
        *v = (*v - m).exp();
        sum += *v;
    }
    sum
}

/// Scores in key-major order, for prefill: `out[j * np + r] = sum_c qt[c * np + r] *
/// keys[j * d + c]` for the `keys.len() / d` keys and the `np` query rows, whose values
/// `qt` holds transposed (d × np, already scaled). `np` must be a multiple of 8. Each
/// key value is broadcast against eight rows at a time, so no horizontal sums are
/// needed.
pub fn scores_key_major(qt: &[f32], np: usize, keys: &[f32], d: usize, out: &mut [f32]) {
    let nk = keys.len() / d;
    assert!(np.is_multiple_of(8) && qt.len() >= d * np && out.len() >= nk * np);
    #[cfg(target_arch = "x86_64")]
    {
        if np.is_multiple_of(16) && has_avx512() {
            // SAFETY: the CPU supports AVX-512F (checked); np is a multiple of 16 and
            // `qt` and `out` hold d × np and nk × np values (asserted above).
            unsafe { x86::scores_key_major_512(qt, np, keys, d, out) };
            return;
        }
        if has_avx2() {
            // SAFETY: the CPU supports AVX2 and FMA (checked above); np is a multiple of
            // 8 and `qt` and `out` hold d × np and nk × np values (asserted above).
            unsafe { x86::scores_key_major(qt, np, keys, d, out) };
            return;
        }
    }
    for (j, key) in keys.chunks_exact(d).enumerate() {
        let row = &mut out[j * np..(j + 1) * np];
        row.fill(0.0);
        for (c, &k) in key.iter().enumerate() {
            for (o, &x) in row.iter_mut().zip(&qt[c * np..(c + 1) * np]) {
                *o += x * k;
            }
        }
    }
}

/// Weighted sums of values, key-major weights: `o[r * d + c] += sum_j p[j * np + r] *
/// values[j * d + c]` for every row r < np (`o` is np × d). `np` must be a multiple
/// of 4; four rows share every value load.
pub fn weighted_key_major(p: &[f32], np: usize, values: &[f32], d: usize, o: &mut [f32]) {
    let nk = values.len() / d;
    assert!(np.is_multiple_of(4) && p.len() >= nk * np && o.len() >= np * d);
    #[cfg(target_arch = "x86_64")]
    {
        if d.is_multiple_of(16) && has_avx512() {
            // SAFETY: the CPU supports AVX-512F (checked); d is a multiple of 16, np of
            // 4, and `p` and `o` hold nk × np and np × d values (asserted above).
            unsafe { x86::weighted_key_major_512(p, np, values, d, o) };
            return;
        }
        if has_avx2() && d.is_multiple_of(8) {
            // SAFETY: the CPU supports AVX2 and FMA (checked above); d is a multiple of 8,
            // np of 4, and `p` and `o` hold nk × np and np × d values (asserted above).
            unsafe { x86::weighted_key_major(p, np, values, d, o) };
            return;
        }
    }
    for (j, v) in values.chunks_exact(d).enumerate() {
        for r in 0..np {
            axpy_f32(&mut o[r * d..(r + 1) * d], p[j * np + r], v);
        }
    }
}

/// Key-major softmax exponentials: `s[j * np + r] = exp(s[j * np + r] - m[r])` for
/// every key row j, each row's sum added to `l[r]`. `m[r]` must be finite and at least
/// the row's largest score; negative infinity gives 0. `np` must be a multiple of 8.
pub fn exp_shifted_key_major(s: &mut [f32], np: usize, m: &[f32], l: &mut [f32]) {
    assert!(np.is_multiple_of(8) && m.len() >= np && l.len() >= np);
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2() {
            // SAFETY: the CPU supports AVX2 and FMA (checked above); `m` and `l` hold np
            // values, a multiple of 8 (asserted above).
            unsafe { x86::exp_shifted_key_major(s, np, m, l) };
            return;
        }
    }
    for row in s.chunks_exact_mut(np) {
        for ((x, &mr), lr) in row.iter_mut().zip(m).zip(l.iter_mut()) {
            *x = (*x - mr).exp();
            *lr += *x;
        }
    }
}

/// The largest value of `x` (negative infinity when empty).
pub fn max_f32(x: &[f32]) -> f32 {
    x.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

#[cfg(target_arch = "x86_64")]
#[inline]
fn has_avx512() -> bool {
    Family::active() >= Family::Avx512
}

#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    Family::active() >= Family::Avx2
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod lanes {
    use std::arch::x86_64::*;

    /// The sum of the eight lanes of `v`.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }

    /// The vector operations of the f32 kernels written once for AVX2 (8 lanes) and
    /// AVX-512 (16): generic over these, inlined into entry points compiled for each
    /// instruction set (the key-major attention kernels here, the prefill GEMM's tiles).
    pub(crate) trait Lanes {
        type V: Copy;
        const N: usize;
        unsafe fn zero() -> Self::V;
        unsafe fn load(p: *const f32) -> Self::V;
        unsafe fn store(p: *mut f32, v: Self::V);
        unsafe fn splat(p: *const f32) -> Self::V;
        /// a * b + c
        unsafe fn fma(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    }

    pub(crate) struct Avx2;
    pub(crate) struct Avx512;

    impl Lanes for Avx2 {
        type V = __m256;
        const N: usize = 8;
        #[inline(always)]
        unsafe fn zero() -> __m256 {
            _mm256_setzero_ps()
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m256 {
            _mm256_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m256) {
            _mm256_storeu_ps(p, v)
        }
        #[inline(always)]
        unsafe fn splat(p: *const f32) -> __m256 {
            _mm256_broadcast_ss(&*p)
        }
        #[inline(always)]
        unsafe fn fma(a: __m256, b: __m256, c: __m256) -> __m256 {
            _mm256_fmadd_ps(a, b, c)
        }
    }

    impl Lanes for Avx512 {
        type V = __m512;
        const N: usize = 16;
        #[inline(always)]
        unsafe fn zero() -> __m512 {
            _mm512_setzero_ps()
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m512 {
            _mm512_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m512) {
            _mm512_storeu_ps(p, v)
        }
        #[inline(always)]
        unsafe fn splat(p: *const f32) -> __m512 {
            _mm512_set1_ps(*p)
        }
        #[inline(always)]
        unsafe fn fma(a: __m512, b: __m512, c: __m512) -> __m512 {
            _mm512_fmadd_ps(a, b, c)
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::lanes::{hsum, Avx2, Avx512, Lanes};
    use half::f16;
    use std::arch::x86_64::*;

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

    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn f16_to_f32(src: &[f16], dst: &mut [f32]) {
        let n = dst.len().min(src.len());
        let ps = src.as_ptr() as *const u16;
        let pd = dst.as_mut_ptr();
        let mut i = 0;
        while i + 8 <= n {
            let v = _mm256_cvtph_ps(_mm_loadu_si128(ps.add(i) as *const __m128i));
            _mm256_storeu_ps(pd.add(i), v);
            i += 8;
        }
        while i < n {
            *pd.add(i) = src[i].to_f32();
            i += 1;
        }
    }

    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn q8_0_to_f32(q: &[i8], d: &[f16], out: &mut [f32]) {
        let pq = q.as_ptr();
        let po = out.as_mut_ptr();
        for (b, scale) in d.iter().enumerate().take(q.len() / 32) {
            let bits = scale.to_bits() as i32;
            let s = _mm256_set1_ps(_mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits))));
            for k in 0..4 {
                let v = _mm_loadl_epi64(pq.add(32 * b + 8 * k) as *const __m128i);
                let f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
                _mm256_storeu_ps(po.add(32 * b + 8 * k), _mm256_mul_ps(f, s));
            }
        }
    }

    /// Four sums of eight lanes each, as one vector of four.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum4(a: __m256, b: __m256, c: __m256, d: __m256) -> __m128 {
        let ab = _mm256_hadd_ps(a, b);
        let cd = _mm256_hadd_ps(c, d);
        let abcd = _mm256_hadd_ps(ab, cd);
        _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1))
    }

    /// Two query rows against four keys at a time: six loads for eight FMAs.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_rows(
        q: &[f32],
        keys: &[f32],
        d: usize,
        scale: f32,
        out: &mut [f32],
        stride: usize,
    ) {
        let (nq, nk) = (q.len() / d, keys.len() / d);
        let pk = keys.as_ptr();
        let po = out.as_mut_ptr();
        let vs = _mm_set1_ps(scale);
        let mut r = 0;
        while r < nq {
            let two = r + 1 < nq;
            let q0 = q.as_ptr().add(r * d);
            let q1 = if two { q0.add(d) } else { q0 };
            let mut j = 0;
            while j + 4 <= nk {
                let k = pk.add(j * d);
                let mut a = [_mm256_setzero_ps(); 8];
                let mut c = 0;
                while c < d {
                    let x0 = _mm256_loadu_ps(q0.add(c));
                    let x1 = _mm256_loadu_ps(q1.add(c));
                    for t in 0..4 {
                        let kv = _mm256_loadu_ps(k.add(t * d + c));
                        a[t] = _mm256_fmadd_ps(x0, kv, a[t]);
                        a[4 + t] = _mm256_fmadd_ps(x1, kv, a[4 + t]);
                    }
                    c += 8;
                }
                let s0 = _mm_mul_ps(hsum4(a[0], a[1], a[2], a[3]), vs);
                _mm_storeu_ps(po.add(r * stride + j), s0);
                if two {
                    let s1 = _mm_mul_ps(hsum4(a[4], a[5], a[6], a[7]), vs);
                    _mm_storeu_ps(po.add((r + 1) * stride + j), s1);
                }
                j += 4;
            }
            while j < nk {
                let k = pk.add(j * d);
                let mut a0 = _mm256_setzero_ps();
                let mut a1 = _mm256_setzero_ps();
                let mut c = 0;
                while c < d {
                    let kv = _mm256_loadu_ps(k.add(c));
                    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q0.add(c)), kv, a0);
                    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q1.add(c)), kv, a1);
                    c += 8;
                }
                *po.add(r * stride + j) = hsum(a0) * scale;
                if two {
                    *po.add((r + 1) * stride + j) = hsum(a1) * scale;
                }
                j += 1;
            }
            r += 2;
        }
    }

    /// Blocks of 64 columns keep eight accumulators in registers across all rows.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn add_weighted_rows(o: &mut [f32], p: &[f32], values: &[f32]) {
        let d = o.len();
        let n = p.len().min(values.len() / d);
        let pv = values.as_ptr();
        let po = o.as_mut_ptr();
        let mut start = 0;
        while start < d {
            let w = (d - start).min(64);
            let nv = w / 8;
            let mut acc = [_mm256_setzero_ps(); 8];
            for (c, a) in acc.iter_mut().enumerate().take(nv) {
                *a = _mm256_loadu_ps(po.add(start + 8 * c));
            }
            for (j, &pj) in p.iter().enumerate().take(n) {
                let a = _mm256_set1_ps(pj);
                let v = pv.add(j * d + start);
                for (c, acc) in acc.iter_mut().enumerate().take(nv) {
                    *acc = _mm256_fmadd_ps(a, _mm256_loadu_ps(v.add(8 * c)), *acc);
                }
            }
            for (c, a) in acc.iter().enumerate().take(nv) {
                _mm256_storeu_ps(po.add(start + 8 * c), *a);
            }
            start += w;
        }
    }

    /// exp(x) for x <= 0 (Cephes' expf: x = n ln2 + r, a degree-6 polynomial in r,
    /// then scaled by 2^n; relative error about 2e-7). Inputs below -87.3 give 0.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn exp256(x: __m256) -> __m256 {
        let lo = _mm256_set1_ps(-87.336_55);
        let under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
        let x = _mm256_max_ps(x, lo);
        let log2e = _mm256_set1_ps(std::f32::consts::LOG2_E);
        let n = _mm256_round_ps(
            _mm256_mul_ps(x, log2e),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        );
        // r = x - n ln2, in two parts for accuracy.
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut y = _mm256_set1_ps(1.987_569_1e-4);
        y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.398_199_9e-3));
        y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.333_452e-3));
        y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.166_579_6e-2));
        y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.666_666_5e-1));
        y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(0.5));
        let r2 = _mm256_mul_ps(r, r);
        y = _mm256_fmadd_ps(y, r2, _mm256_add_ps(r, _mm256_set1_ps(1.0)));
        // 2^n through the exponent bits; n >= -126 here.
        let e = _mm256_slli_epi32(
            _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
            23,
        );
        let y = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
        _mm256_andnot_ps(under, y)
    }

    /// [`super::silu_mul`] over whole vectors of 8; returns how many values it did.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn silu_mul(gate: &mut [f32], up: &[f32]) -> usize {
        let n = gate.len() / 8 * 8;
        let (g, u) = (gate.as_mut_ptr(), up.as_ptr());
        let sign = _mm256_set1_ps(-0.0);
        let one = _mm256_set1_ps(1.0);
        for i in (0..n).step_by(8) {
            let x = _mm256_loadu_ps(g.add(i));
            // e = exp(-|x|) <= 1; sigmoid(x) = 1 / (1 + e) for x >= 0, e / (1 + e) below.
            let e = exp256(_mm256_or_ps(x, sign));
            let negative = _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ);
            let sig = _mm256_div_ps(_mm256_blendv_ps(one, e, negative), _mm256_add_ps(one, e));
            let y = _mm256_mul_ps(_mm256_mul_ps(x, sig), _mm256_loadu_ps(u.add(i)));
            _mm256_storeu_ps(g.add(i), y);
        }
        n
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_shifted_sum(x: &mut [f32], m: f32) -> f32 {
        let n = x.len();
        let p = x.as_mut_ptr();
        let vm = _mm256_set1_ps(m);
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        while i + 8 <= n {
            let y = exp256(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), vm));
            _mm256_storeu_ps(p.add(i), y);
            acc = _mm256_add_ps(acc, y);
            i += 8;
        }
        let mut sum = hsum(acc);
        while i < n {
            let y = (*p.add(i) - m).exp();
            *p.add(i) = y;
            sum += y;
            i += 1;
        }
        sum
    }

    /// [`super::scores_key_major`] with 8 rows a vector (AVX2); np a multiple of 8.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn scores_key_major(qt: &[f32], np: usize, keys: &[f32], d: usize, out: &mut [f32]) {
        scores_keys::<Avx2, 4>(qt, np, keys, d, out)
    }

    /// [`super::scores_key_major`] with 16 rows a vector (AVX-512); np a multiple of 16.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn scores_key_major_512(
        qt: &[f32],
        np: usize,
        keys: &[f32],
        d: usize,
        out: &mut [f32],
    ) {
        scores_keys::<Avx512, 8>(qt, np, keys, d, out)
    }

    /// Every key against every row, K keys at a time.
    #[inline(always)]
    unsafe fn scores_keys<S: Lanes, const K: usize>(
        qt: &[f32],
        np: usize,
        keys: &[f32],
        d: usize,
        out: &mut [f32],
    ) {
        let nk = keys.len() / d;
        let (pk, po) = (keys.as_ptr(), out.as_mut_ptr());
        let mut j = 0;
        while j + K <= nk {
            scores_block::<S, K>(qt, np, pk.add(j * d), d, po.add(j * np));
            j += K;
        }
        while j < nk {
            scores_block::<S, 1>(qt, np, pk.add(j * d), d, po.add(j * np));
            j += 1;
        }
    }

    /// K keys against every row: two vectors of rows at a time, then one.
    #[inline(always)]
    unsafe fn scores_block<S: Lanes, const K: usize>(
        qt: &[f32],
        np: usize,
        pk: *const f32,
        d: usize,
        po: *mut f32,
    ) {
        let (pq, n) = (qt.as_ptr(), S::N);
        let mut r = 0;
        while r + 2 * n <= np {
            let mut a = [[S::zero(); 2]; K];
            for c in 0..d {
                let q0 = S::load(pq.add(c * np + r));
                let q1 = S::load(pq.add(c * np + r + n));
                for (t, at) in a.iter_mut().enumerate() {
                    let k = S::splat(pk.add(t * d + c));
                    at[0] = S::fma(q0, k, at[0]);
                    at[1] = S::fma(q1, k, at[1]);
                }
            }
            for (t, at) in a.iter().enumerate() {
                S::store(po.add(t * np + r), at[0]);
                S::store(po.add(t * np + r + n), at[1]);
            }
            r += 2 * n;
        }
        if r < np {
            let mut a = [S::zero(); K];
            for c in 0..d {
                let q0 = S::load(pq.add(c * np + r));
                for (t, at) in a.iter_mut().enumerate() {
                    *at = S::fma(q0, S::splat(pk.add(t * d + c)), *at);
                }
            }
            for (t, at) in a.iter().enumerate() {
                S::store(po.add(t * np + r), *at);
            }
        }
    }

    /// [`super::weighted_key_major`] with 8 columns a vector (AVX2); d a multiple of 8.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn weighted_key_major(
        p: &[f32],
        np: usize,
        values: &[f32],
        d: usize,
        o: &mut [f32],
    ) {
        weighted_rows::<Avx2, 2>(p, np, values, d, o)
    }

    /// [`super::weighted_key_major`] with 16 columns a vector (AVX-512); d a multiple
    /// of 16.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn weighted_key_major_512(
        p: &[f32],
        np: usize,
        values: &[f32],
        d: usize,
        o: &mut [f32],
    ) {
        weighted_rows::<Avx512, 4>(p, np, values, d, o)
    }

    /// Four rows at a time, V vectors of columns at a time, then one.
    #[inline(always)]
    unsafe fn weighted_rows<S: Lanes, const V: usize>(
        p: &[f32],
        np: usize,
        values: &[f32],
        d: usize,
        o: &mut [f32],
    ) {
        let nk = values.len() / d;
        let (pp, pv, po) = (p.as_ptr(), values.as_ptr(), o.as_mut_ptr());
        for r in (0..np).step_by(4) {
            let mut c = 0;
            while c + V * S::N <= d {
                weighted_block::<S, V>(pp.add(r), np, pv.add(c), d, nk, po.add(r * d + c));
                c += V * S::N;
            }
            while c < d {
                weighted_block::<S, 1>(pp.add(r), np, pv.add(c), d, nk, po.add(r * d + c));
                c += S::N;
            }
        }
    }

    /// Four rows × V vectors of columns of `o`, over every key.
    #[inline(always)]
    unsafe fn weighted_block<S: Lanes, const V: usize>(
        pp: *const f32,
        np: usize,
        pv: *const f32,
        d: usize,
        nk: usize,
        po: *mut f32,
    ) {
        let n = S::N;
        let mut a = [[S::zero(); V]; 4];
        for (t, at) in a.iter_mut().enumerate() {
            for (v, x) in at.iter_mut().enumerate() {
                *x = S::load(po.add(t * d + n * v));
            }
        }
        for j in 0..nk {
            let mut vv = [S::zero(); V];
            for (v, x) in vv.iter_mut().enumerate() {
                *x = S::load(pv.add(j * d + n * v));
            }
            for (t, at) in a.iter_mut().enumerate() {
                let w = S::splat(pp.add(j * np + t));
                for (x, &y) in at.iter_mut().zip(&vv) {
                    *x = S::fma(w, y, *x);
                }
            }
        }
        for (t, at) in a.iter().enumerate() {
            for (v, x) in at.iter().enumerate() {
                S::store(po.add(t * d + n * v), *x);
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_shifted_key_major(s: &mut [f32], np: usize, m: &[f32], l: &mut [f32]) {
        let nk = s.len() / np;
        let ps = s.as_mut_ptr();
        for r in (0..np).step_by(8) {
            let vm = _mm256_loadu_ps(m.as_ptr().add(r));
            let mut acc = _mm256_setzero_ps();
            for j in 0..nk {
                let at = ps.add(j * np + r);
                let y = exp256(_mm256_sub_ps(_mm256_loadu_ps(at), vm));
                _mm256_storeu_ps(at, y);
                acc = _mm256_add_ps(acc, y);
            }
            let pl = l.as_mut_ptr().add(r);
            _mm256_storeu_ps(pl, _mm256_add_ps(_mm256_loadu_ps(pl), acc));
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

/// `gate[i] = silu(gate[i]) * up[i]`: SwiGLU's gating, vectorized where the CPU allows
/// (the sigmoid through exp(-|x|), which never overflows).
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len());
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2() {
            // SAFETY: the features were checked; the lengths are equal (asserted).
            done = unsafe { x86::silu_mul(gate, up) };
        }
    }
    for (g, u) in gate[done..].iter_mut().zip(&up[done..]) {
        *g = silu(*g) * u;
    }
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

    /// The key-major kernels (AVX-512, AVX2 or plain, whichever this CPU runs) give the
    /// plain sums, for row counts and widths that exercise every tail.
    #[test]
    fn key_major_kernels_match_plain_sums() {
        let val = |i: usize| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * 2.0;
        for (np, d, nk) in [
            (16, 64, 13),
            (48, 80, 9),
            (8, 64, 5),
            (32, 128, 17),
            (24, 24, 3),
        ] {
            let qt: Vec<f32> = (0..d * np).map(val).collect();
            let keys: Vec<f32> = (0..nk * d).map(|i| val(i + 5)).collect();
            let mut s = vec![f32::NAN; nk * np];
            scores_key_major(&qt, np, &keys, d, &mut s);
            let mut o: Vec<f32> = (0..np * d).map(|i| val(i + 9)).collect();
            let o0 = o.clone();
            weighted_key_major(&s, np, &keys, d, &mut o);
            for j in 0..nk {
                for r in 0..np {
                    let want: f32 = (0..d).map(|c| qt[c * np + r] * keys[j * d + c]).sum();
                    let got = s[j * np + r];
                    assert!(
                        (got - want).abs() < 1e-4,
                        "np {np} d {d}: score ({j}, {r}) {got} vs {want}"
                    );
                }
            }
            for r in 0..np {
                for c in 0..d {
                    let want = o0[r * d + c]
                        + (0..nk)
                            .map(|j| s[j * np + r] * keys[j * d + c])
                            .sum::<f32>();
                    let got = o[r * d + c];
                    assert!(
                        (got - want).abs() < 1e-3,
                        "np {np} d {d}: out ({r}, {c}) {got} vs {want}"
                    );
                }
            }
        }
    }

    /// The vectorized gating is the scalar one within a few ulps, over the whole range
    /// (values whose exp(-x) overflows included), and NaN stays NaN.
    #[test]
    fn silu_mul_matches_scalar_silu() {
        let mut x: Vec<f32> = (0..203).map(|i| (i as f32 - 101.0) * 0.37).collect();
        x.extend([-200.0, -88.0, 88.0, 200.0, 0.0, -0.0, f32::NAN, 1e-30]);
        let up: Vec<f32> = (0..x.len()).map(|i| 0.5 + (i % 7) as f32).collect();
        let mut got = x.clone();
        silu_mul(&mut got, &up);
        for ((g, v), u) in got.iter().zip(&x).zip(&up) {
            let want = silu(*v) * u;
            if want.is_nan() {
                assert!(g.is_nan(), "silu({v}) * {u}: {g}");
            } else {
                let tol = 4.0 * f32::EPSILON * want.abs() + 1e-30;
                assert!((g - want).abs() <= tol, "silu({v}) * {u}: {g} vs {want}");
            }
        }
    }

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
