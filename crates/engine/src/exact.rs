//! The exact matrix product: weights dequantized to f32 and multiplied by unquantized
//! f32 activations, as a reference implementation computes it.
//!
//! The fast kernels in [`crate::quant`] quantize activations to 8 bits (as llama.cpp
//! does), which moves logits by about 1% and can flip a greedy choice between two
//! nearly tied tokens. `Precision::Exact` trades speed for agreement with fp32 references.

use crate::kernels::dot_f32;
use crate::quant::QMatrix;
use rayon::prelude::*;

/// How matrix products treat activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Precision {
    /// 8-bit quantized activations with integer dot products (fast; the default).
    #[default]
    Fast,
    /// f32 activations against dequantized weights (matches fp32 references).
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
