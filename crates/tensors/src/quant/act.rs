//! Activations quantized to 8 bits in blocks of 32, the right-hand side of
//! every integer dot product.
//!
//! Block `b` of token `t` holds `qs[t*cols + 32b ..][..32]` (i8) with scale
//! `d[t*nb + b]` (`x ~= d * q`), `ds[t*nb + b] = d * sum(q)` over the block and
//! `ds16[t*2nb + 2b + h] = d * sum(q)` over each half of 16.
//!
//! Every block has its own scale, also for the K-quants (ggml quantizes their
//! activations per 256 instead, which lets integer sums run over a whole
//! super-block but spreads an outlier channel's scale over 8x as many
//! values: with one outlier of 40x the other values, output error 2.8%
//! instead of 1.4%; measured on qwen2.5's Q6_K `ffn_down`).
//!
//! Rounding is to nearest, ties to even, so the scalar and AVX2 quantizers
//! produce identical bytes.

use super::Isa;

pub(crate) struct QActs {
    pub n: usize,
    pub cols: usize,
    pub nb: usize,
    pub qs: Vec<i8>,
    pub d: Vec<f32>,
    pub ds: Vec<f32>,
    pub ds16: Vec<f32>,
}

impl QActs {
    /// Quantizes `n` rows of `cols` values (`cols` a multiple of 32).
    pub fn quantize(isa: Isa, x: &[f32], n: usize, cols: usize) -> QActs {
        assert_eq!(cols % 32, 0);
        debug_assert_eq!(x.len(), n * cols);
        let nb = cols / 32;
        let mut a = QActs {
            n,
            cols,
            nb,
            qs: vec![0; n * cols],
            // Padded so that kernels may load 8 scales from any block.
            d: vec![0.0; n * nb + 8],
            ds: vec![0.0; n * nb + 8],
            ds16: vec![0.0; 2 * n * nb],
        };
        if n * cols >= 1 << 16 && n > 1 {
            use rayon::prelude::*;
            let per = (n / (4 * rayon::current_num_threads())).max(1);
            a.qs.par_chunks_mut(per * cols)
                .zip(a.d[..n * nb].par_chunks_mut(per * nb))
                .zip(a.ds[..n * nb].par_chunks_mut(per * nb))
                .zip(a.ds16.par_chunks_mut(2 * per * nb))
                .zip(x.par_chunks(per * cols))
                .for_each(|((((qs, d), ds), ds16), x)| quantize_blocks(isa, x, qs, d, ds, ds16));
        } else {
            quantize_blocks(
                isa,
                x,
                &mut a.qs,
                &mut a.d[..n * nb],
                &mut a.ds[..n * nb],
                &mut a.ds16,
            );
        }
        a
    }

    /// Token `t`; its `d` and `ds` slices extend 8 values past the row
    /// (`nb` is `qs.len() / 32`).
    #[inline(always)]
    pub fn row(&self, t: usize) -> ActRow<'_> {
        let nb = self.nb;
        ActRow {
            nb,
            qs: &self.qs[t * self.cols..(t + 1) * self.cols],
            d: &self.d[t * nb..(t + 1) * nb + 8],
            ds: &self.ds[t * nb..(t + 1) * nb + 8],
            ds16: &self.ds16[2 * t * nb..2 * (t + 1) * nb],
        }
    }
}

/// One token's quantized activations.
#[derive(Clone, Copy)]
pub(crate) struct ActRow<'a> {
    pub nb: usize,
    pub qs: &'a [i8],
    pub d: &'a [f32],
    pub ds: &'a [f32],
    pub ds16: &'a [f32],
}

fn quantize_blocks(
    isa: Isa,
    x: &[f32],
    qs: &mut [i8],
    d: &mut [f32],
    ds: &mut [f32],
    ds16: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx2 {
        // SAFETY: Isa::Avx2 is only chosen when the CPU has AVX2, FMA and F16C.
        unsafe { super::avx2::quantize_act_blocks(x, qs, d, ds, ds16) };
        return;
    }
    let _ = isa;
    for (b, (xb, qb)) in x.chunks_exact(32).zip(qs.chunks_exact_mut(32)).enumerate() {
        let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
        let id = if amax > 0.0 { 127.0 / amax } else { 0.0 };
        let mut sum = [0i32; 2];
        for (i, (&v, q)) in xb.iter().zip(qb.iter_mut()).enumerate() {
            let r = (v * id).round_ties_even() as i32;
            *q = r as i8;
            sum[i / 16] += r;
        }
        let db = amax / 127.0;
        d[b] = db;
        ds[b] = db * (sum[0] + sum[1]) as f32;
        ds16[2 * b] = db * sum[0] as f32;
        ds16[2 * b + 1] = db * sum[1] as f32;
    }
}
