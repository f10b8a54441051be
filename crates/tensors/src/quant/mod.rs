//! Block formats (the ggml family) and the quantized matrix kernels.
//!
//! A [`QMatrix`] holds a weight matrix in its file format (borrowed from the
//! memory map when it comes from GGUF) and multiplies activations by it.
//! [`dequantize_row`] turns blocks back into `f32`.
//!
//! How [`QMatrix::matmul`] works, for quantized weights:
//!
//! - the activations are quantized once per call to 8 bits in blocks of 32
//!   (`act`): one scale per block, for the K-quants too;
//! - one token (`n == 1`, decoding): each row is dotted straight from the
//!   file's blocks (`avx2::matvec_rows`): integer dot products per block
//!   (`vpmaddubsw`/`vpmaddwd`), block scales eight at a time, two rows per
//!   pass, weight rows prefetched ahead (decoding streams weights from DRAM);
//! - several tokens (prefill): eight rows at a time are decoded into a panel
//!   of integer blocks (`panel`), a group of panels of about 256 KiB once per
//!   call, and tile kernels reuse them for every token; tokens go in blocks
//!   that keep their activations in L2. For the unsigned kinds (every format
//!   but Q8_0) the panel is also row-interleaved, 4 bytes of each of the 8
//!   rows in one register, so that one `vpmaddubsw` against 4 broadcast
//!   activation bytes serves all 8 rows, and several such products add up in
//!   16 bits before they are widened (4 tokens x 8 rows a tile); the
//!   per-block offsets (`m` of Q4_1, `-8 d` of Q4_0, the mins of Q4_K, ...)
//!   join through the activations' block sums in the same tile. Q8_0's signed
//!   bytes go through a row-major tile (`vpsignb`, 4 rows x 2 tokens);
//! - rows are split into chunks over the rayon pool (a multiple of the
//!   thread count); small products stay on the calling thread.
//!
//! The AVX2 kernels are chosen at run time ([`crate::kernels::Family::active`]:
//! the CPU's features, or `KVMERGER_KERNELS=plain`); with the `avx512` family on
//! a CPU with AVX-512 VNNI the unsigned prefill tiles use `vpdpbusd` ([`vnni`]).
//! The portable kernels (`scalar`) define the
//! arithmetic and give the same integer sums, so results differ only by f32
//! rounding order.
//!
//! Performance note: the forward pass should run on a pool thread
//! (`ThreadPool::install`, or inside `rayon::scope`): a matmul called from
//! outside the pool pays ~10-15 us to hand its chunks over and wait, which
//! over the ~200 matmuls of a decoded token is milliseconds.

mod act;
#[cfg(target_arch = "x86_64")]
mod avx2;
mod formats;
mod panel;
mod scalar;

pub use formats::quantize_row;

use act::QActs;
use panel::PR;

use crate::Error;
use memmap2::Mmap;
use rayon::prelude::*;
use std::sync::Arc;

/// Dequantizes `out.len()` elements (a multiple of the block size) of type
/// `ty` from `src` (at least `ty.row_bytes(out.len())` bytes). Values are
/// those of the ggml reference (`gguf.quants.dequantize`), bit for bit,
/// whichever kernel runs.
pub fn dequantize_row(ty: GgmlType, src: &[u8], out: &mut [f32]) {
    let n = out.len();
    let bs = ty.block_size();
    assert_eq!(
        n % bs,
        0,
        "dequantize_row: {n} elements is not a multiple of the {ty} block size {bs}"
    );
    assert!(
        src.len() >= ty.row_bytes(n),
        "dequantize_row: {} bytes is too short for {n} {ty} elements",
        src.len()
    );
    #[cfg(target_arch = "x86_64")]
    if Isa::detect() == Isa::Avx2 {
        // SAFETY: the CPU has the features; lengths are checked above.
        if unsafe { avx2::dequantize_row(ty, src, out) } {
            return;
        }
    }
    formats::dequantize_row_scalar(ty, src, out)
}

/// Tensor element types, with their ggml ids.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
}

impl GgmlType {
    /// Every supported type.
    pub const ALL: [GgmlType; 12] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::Q8_K,
    ];

    /// The type with ggml id `x`, or `None` for an unknown or unsupported id.
    pub fn from_u32(x: u32) -> Option<Self> {
        Some(match x {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4_K,
            13 => GgmlType::Q5_K,
            14 => GgmlType::Q6_K,
            15 => GgmlType::Q8_K,
            30 => GgmlType::BF16,
            _ => return None,
        })
    }

    /// The ggml id.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q4_K => 12,
            GgmlType::Q5_K => 13,
            GgmlType::Q6_K => 14,
            GgmlType::Q8_K => 15,
            GgmlType::BF16 => 30,
        }
    }

    /// Elements per block.
    pub fn block_size(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => {
                32
            }
            GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K | GgmlType::Q8_K => 256,
        }
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q5_0 => 22,
            GgmlType::Q5_1 => 24,
            GgmlType::Q8_0 => 34,
            GgmlType::Q4_K => 144,
            GgmlType::Q5_K => 176,
            GgmlType::Q6_K => 210,
            GgmlType::Q8_K => 292,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            GgmlType::F32 => "F32",
            GgmlType::F16 => "F16",
            GgmlType::BF16 => "BF16",
            GgmlType::Q4_0 => "Q4_0",
            GgmlType::Q4_1 => "Q4_1",
            GgmlType::Q5_0 => "Q5_0",
            GgmlType::Q5_1 => "Q5_1",
            GgmlType::Q8_0 => "Q8_0",
            GgmlType::Q4_K => "Q4_K",
            GgmlType::Q5_K => "Q5_K",
            GgmlType::Q6_K => "Q6_K",
            GgmlType::Q8_K => "Q8_K",
        }
    }

    /// Bytes taken by a row of `n` elements (`n` a multiple of the block size).
    pub fn row_bytes(self, n: usize) -> usize {
        n / self.block_size() * self.type_size()
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

enum Storage {
    Mmap {
        map: Arc<Mmap>,
        offset: usize,
        len: usize,
    },
    Bytes(Vec<u8>),
    F32(Vec<f32>),
}

/// A weight matrix `[rows][cols]` (rows = output features, cols = input
/// features = ggml `dims[0]`), stored in its block format.
pub struct QMatrix {
    dtype: GgmlType,
    rows: usize,
    cols: usize,
    row_bytes: usize,
    storage: Storage,
}

impl std::fmt::Debug for QMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QMatrix")
            .field("dtype", &self.dtype)
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .finish()
    }
}

impl QMatrix {
    /// A matrix whose rows are `len` bytes of `map` from `offset` (checked by the
    /// caller: whole blocks, `rows * row_bytes == len`).
    pub(crate) fn from_mmap(
        dtype: GgmlType,
        rows: usize,
        cols: usize,
        map: Arc<Mmap>,
        offset: usize,
        len: usize,
    ) -> QMatrix {
        QMatrix {
            dtype,
            rows,
            cols,
            row_bytes: dtype.row_bytes(cols),
            storage: Storage::Mmap { map, offset, len },
        }
    }

    /// A row-major `f32` matrix.
    pub fn from_f32(rows: usize, cols: usize, data: Vec<f32>) -> QMatrix {
        assert_eq!(
            data.len(),
            rows * cols,
            "QMatrix::from_f32: data length != rows * cols"
        );
        QMatrix {
            dtype: GgmlType::F32,
            rows,
            cols,
            row_bytes: cols * 4,
            storage: Storage::F32(data),
        }
    }

    /// A row-major matrix of little-endian IEEE half floats.
    pub fn from_f16_bytes(rows: usize, cols: usize, bytes: Vec<u8>) -> QMatrix {
        Self::from_bytes(GgmlType::F16, rows, cols, bytes)
    }

    /// A row-major matrix of little-endian bfloat16.
    pub fn from_bf16_bytes(rows: usize, cols: usize, bytes: Vec<u8>) -> QMatrix {
        Self::from_bytes(GgmlType::BF16, rows, cols, bytes)
    }

    /// A row-major matrix already in block format `ty` (each row `ty.row_bytes(cols)` bytes).
    pub fn from_bytes(ty: GgmlType, rows: usize, cols: usize, bytes: Vec<u8>) -> QMatrix {
        assert_eq!(
            cols % ty.block_size(),
            0,
            "QMatrix::from_bytes: cols is not a multiple of the block size"
        );
        let row_bytes = ty.row_bytes(cols);
        assert_eq!(
            bytes.len(),
            rows * row_bytes,
            "QMatrix::from_bytes: wrong byte count for {ty}"
        );
        QMatrix {
            dtype: ty,
            rows,
            cols,
            row_bytes,
            storage: Storage::Bytes(bytes),
        }
    }

    /// Quantizes a row-major `f32` matrix to `ty` (with a simple round-to-nearest quantizer).
    pub fn quantize(ty: GgmlType, rows: usize, cols: usize, data: &[f32]) -> QMatrix {
        assert_eq!(data.len(), rows * cols);
        if ty == GgmlType::F32 {
            return Self::from_f32(rows, cols, data.to_vec());
        }
        let mut bytes = Vec::with_capacity(rows * ty.row_bytes(cols));
        for r in 0..rows {
            bytes.extend_from_slice(&quantize_row(ty, &data[r * cols..(r + 1) * cols]));
        }
        Self::from_bytes(ty, rows, cols, bytes)
    }

    /// Cuts the matrix into consecutive blocks of rows, `counts[i]` rows each (they
    /// must add up to `rows`): the fused projections of Phi-3 (`attn_qkv`, the gate
    /// and up halves of `ffn_up`) become the separate matrices the forward pass
    /// uses. A memory-mapped matrix is cut without copying.
    pub fn split_rows(self, counts: &[usize]) -> Result<Vec<QMatrix>, Error> {
        if counts.iter().sum::<usize>() != self.rows {
            return Err(Error::Invalid(format!(
                "cannot cut {} rows into blocks of {counts:?}",
                self.rows
            )));
        }
        let mut out = Vec::with_capacity(counts.len());
        let mut first = 0;
        for &rows in counts {
            let (start, len) = (first * self.row_bytes, rows * self.row_bytes);
            let storage = match &self.storage {
                Storage::Mmap { map, offset, .. } => Storage::Mmap {
                    map: Arc::clone(map),
                    offset: offset + start,
                    len,
                },
                Storage::Bytes(b) => Storage::Bytes(b[start..start + len].to_vec()),
                Storage::F32(v) => {
                    Storage::F32(v[first * self.cols..(first + rows) * self.cols].to_vec())
                }
            };
            out.push(QMatrix {
                dtype: self.dtype,
                rows,
                cols: self.cols,
                row_bytes: self.row_bytes,
                storage,
            });
            first += rows;
        }
        Ok(out)
    }

    pub fn dtype(&self) -> GgmlType {
        self.dtype
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// Bytes of weight data.
    pub fn bytes(&self) -> usize {
        self.rows * self.row_bytes
    }

    /// All the weight bytes, row after row.
    pub fn raw(&self) -> &[u8] {
        match &self.storage {
            Storage::Mmap { map, offset, len } => &map[*offset..*offset + *len],
            Storage::Bytes(b) => b,
            // SAFETY: any initialized f32 memory is valid as bytes, and u8 has alignment 1.
            Storage::F32(v) => unsafe {
                std::slice::from_raw_parts(v.as_ptr() as *const u8, v.len() * 4)
            },
        }
    }

    /// The bytes of row `r`.
    pub fn row_raw(&self, r: usize) -> &[u8] {
        &self.raw()[r * self.row_bytes..(r + 1) * self.row_bytes]
    }

    /// Row `r` as `f32` (`out.len() == cols`).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        assert!(r < self.rows, "row {r} out of range ({} rows)", self.rows);
        assert_eq!(out.len(), self.cols);
        dequantize_row(self.dtype, self.row_raw(r), out);
    }

    /// The whole matrix as row-major `f32`.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        if self.cols > 0 {
            for (r, o) in out.chunks_exact_mut(self.cols).enumerate() {
                self.dequantize_row(r, o);
            }
        }
        out
    }

    /// `out[t*rows + r] = sum_c W[r][c] * x[t*cols + c]` for `t` in `0..n`,
    /// on the rayon pool of the calling thread (the global one by default).
    ///
    /// Quantized weights multiply activations quantized to 8 bits per block
    /// of 32 (integer dot products); float weights use `f32` FMA. Call it
    /// from a pool thread when called often (see the module docs).
    pub fn matmul(&self, x: &[f32], n: usize, out: &mut [f32]) {
        self.matmul_isa(Isa::detect(), x, n, out)
    }

    pub(crate) fn matmul_isa(&self, isa: Isa, x: &[f32], n: usize, out: &mut [f32]) {
        assert_eq!(
            x.len(),
            n * self.cols,
            "matmul: x has {} values, expected {n} x {}",
            x.len(),
            self.cols
        );
        assert_eq!(
            out.len(),
            n * self.rows,
            "matmul: out has {} values, expected {n} x {}",
            out.len(),
            self.rows
        );
        if n == 0 || self.rows == 0 {
            return;
        }
        if self.cols == 0 {
            out.fill(0.0);
            return;
        }
        let (rows, cols) = (self.rows, self.cols);
        let dst = SyncPtr(out.as_mut_ptr());
        let work = rows * cols * n;
        match self.dtype {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {
                if n < MIN_PANEL_TOKENS {
                    par_rows(rows, 1, work, |r0, r1| {
                        for t in 0..n {
                            let xt = &x[t * cols..(t + 1) * cols];
                            // SAFETY: this task owns rows r0..r1 of every token.
                            unsafe {
                                float_matvec_rows(isa, self, r0, r1, xt, dst.get().add(t * rows))
                            };
                        }
                    });
                } else {
                    par_rows(rows, FR, work, |r0, r1| {
                        self.float_panel_rows(isa, x, n, r0, r1, dst.get())
                    });
                }
            }
            _ => {
                let a = QActs::quantize(isa, x, n, cols);
                par_rows(rows, self.row_align(n), work, |r0, r1| {
                    self.quant_rows(isa, &a, r0, r1, dst)
                });
            }
        }
    }

    /// Row chunks are multiples of this.
    fn row_align(&self, n: usize) -> usize {
        if n < MIN_PANEL_TOKENS {
            2
        } else {
            PR
        }
    }

    /// Quantized weights: rows `r0..r1` of every token of `a` into `dst`
    /// (through panels from `MIN_PANEL_TOKENS` tokens).
    fn quant_rows(&self, isa: Isa, a: &QActs, r0: usize, r1: usize, dst: SyncPtr) {
        let rows = self.rows;
        match a.n >= MIN_PANEL_TOKENS {
            false => {
                // A few tokens: rows in slices that stay in L1/L2 while every
                // token goes over them.
                let step = if a.n == 1 {
                    r1 - r0
                } else {
                    (16384 / self.row_bytes).max(2)
                };
                let mut s0 = r0;
                while s0 < r1 {
                    let s1 = (s0 + step).min(r1);
                    for t in 0..a.n {
                        // SAFETY: this task owns rows r0..r1 of every token.
                        unsafe {
                            matvec_rows(isa, self, s0, s1, a.row(t), dst.get().add(t * rows))
                        };
                    }
                    s0 = s1;
                }
            }
            true => panel::panel_rows(isa, self, a, r0, r1, dst.get(), rows),
        }
    }

    /// Several matrices with the same input `x` (e.g. the Q, K and V
    /// projections, or the gate and up projections):
    /// `outs[i][t*rows_i + r] = sum_c W_i[r][c] * x[t*cols + c]`.
    ///
    /// Equal to calling [`matmul`](Self::matmul) on each, but quantizes the
    /// activations once and runs all the matrices in one parallel pass (one
    /// fork-join instead of one per matrix), which matters for single-token
    /// decoding.
    pub fn matmul_multi(mats: &[&QMatrix], x: &[f32], n: usize, outs: &mut [&mut [f32]]) {
        Self::matmul_multi_isa(Isa::detect(), mats, x, n, outs)
    }

    pub(crate) fn matmul_multi_isa(
        isa: Isa,
        mats: &[&QMatrix],
        x: &[f32],
        n: usize,
        outs: &mut [&mut [f32]],
    ) {
        assert_eq!(
            mats.len(),
            outs.len(),
            "matmul_multi: {} matrices but {} outputs",
            mats.len(),
            outs.len()
        );
        let Some(first) = mats.first() else { return };
        let cols = first.cols;
        for (m, o) in mats.iter().zip(outs.iter()) {
            assert_eq!(
                m.cols, cols,
                "matmul_multi: matrices have different column counts"
            );
            assert_eq!(
                o.len(),
                n * m.rows,
                "matmul_multi: out has {} values, expected {n} x {}",
                o.len(),
                m.rows
            );
        }
        assert_eq!(
            x.len(),
            n * cols,
            "matmul_multi: x has {} values, expected {n} x {cols}",
            x.len()
        );
        let float = |m: &QMatrix| matches!(m.dtype, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16);
        if mats.len() == 1 || n == 0 || cols == 0 || mats.iter().any(|m| float(m)) {
            for (m, o) in mats.iter().zip(outs.iter_mut()) {
                m.matmul_isa(isa, x, n, o);
            }
            return;
        }
        // Activations once for every matrix.
        let a = QActs::quantize(isa, x, n, cols);
        let dsts: Vec<SyncPtr> = outs.iter_mut().map(|o| SyncPtr(o.as_mut_ptr())).collect();
        let mut tasks = Vec::new();
        for (i, m) in mats.iter().enumerate() {
            for (r0, r1) in row_chunks(m.rows, m.row_align(n), m.rows * cols * n) {
                tasks.push((i, r0, r1));
            }
        }
        let run =
            |&(i, r0, r1): &(usize, usize, usize)| mats[i].quant_rows(isa, &a, r0, r1, dsts[i]);
        let total: usize = mats.iter().map(|m| m.rows * cols * n).sum();
        if rayon::current_num_threads() <= 1 || total < MIN_PARALLEL_WORK {
            tasks.iter().for_each(run);
        } else {
            tasks.par_iter().for_each(run);
        }
    }

    /// Float weights, `n` tokens, rows `r0..r1`: decode `FR` rows to f32, then tiles.
    fn float_panel_rows(&self, isa: Isa, x: &[f32], n: usize, r0: usize, r1: usize, out: *mut f32) {
        let (rows, cols) = (self.rows, self.cols);
        let mut w = vec![0f32; FR * cols];
        let mut r = r0;
        while r < r1 {
            let rr = (r1 - r).min(FR);
            for i in 0..FR {
                if i < rr {
                    let wr = &mut w[i * cols..(i + 1) * cols];
                    match isa {
                        // SAFETY: Isa::Avx2 means the CPU has the features.
                        #[cfg(target_arch = "x86_64")]
                        Isa::Avx2 => unsafe {
                            avx2::float_row_to_f32(self.dtype, self.row_raw(r + i), wr)
                        },
                        _ => self.dequantize_row(r + i, wr),
                    }
                } else {
                    w[i * cols..(i + 1) * cols].fill(0.0);
                }
            }
            // SAFETY: the caller owns rows r0..r1 of every token.
            let o = unsafe { out.add(r) };
            let mut t = 0;
            while t < n {
                let tt = (n - t).min(3);
                match isa {
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx2 => unsafe {
                        match tt {
                            1 => avx2::float_tile::<1>(&w, cols, x, t, rr, o, rows),
                            2 => avx2::float_tile::<2>(&w, cols, x, t, rr, o, rows),
                            _ => avx2::float_tile::<3>(&w, cols, x, t, rr, o, rows),
                        }
                    },
                    _ => {
                        for tk in t..t + tt {
                            for i in 0..rr {
                                let v = dot_f32(
                                    &w[i * cols..(i + 1) * cols],
                                    &x[tk * cols..(tk + 1) * cols],
                                );
                                unsafe { *o.add(tk * rows + i) = v };
                            }
                        }
                    }
                }
                t += tt;
            }
            r += rr;
        }
    }
}

/// Rows per panel of float weights (F32, F16, BF16) decoded to f32.
pub(crate) const FR: usize = 4;

/// Token counts from which matmul decodes weight panels once and reuses them.
const MIN_PANEL_TOKENS: usize = 4;

/// Multiply-accumulates below which a matmul runs on the calling thread.
const MIN_PARALLEL_WORK: usize = 1 << 17;

/// Instruction sets with kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Isa {
    pub(crate) fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            use std::sync::OnceLock;
            static ISA: OnceLock<Isa> = OnceLock::new();
            *ISA.get_or_init(|| {
                if crate::kernels::Family::active() >= crate::kernels::Family::Avx2 {
                    Isa::Avx2
                } else {
                    Isa::Scalar
                }
            })
        }
        #[cfg(not(target_arch = "x86_64"))]
        Isa::Scalar
    }
}

/// Whether the prefill tiles of the unsigned formats may use AVX-512 VNNI's
/// `vpdpbusd`: the CPU has AVX-512 VNNI and VL, and the active kernel family
/// is `avx512` (so `KVMERGER_KERNELS=avx2` measures what an AVX2-only CPU runs).
#[cfg(target_arch = "x86_64")]
pub(crate) fn vnni() -> bool {
    use std::sync::OnceLock;
    static VNNI: OnceLock<bool> = OnceLock::new();
    *VNNI.get_or_init(|| {
        crate::kernels::Family::active() == crate::kernels::Family::Avx512
            && is_x86_feature_detected!("avx512vnni")
            && is_x86_feature_detected!("avx512vl")
    })
}

/// `out[r] = W[r] . x` for rows `r0..r1` and one token.
///
/// # Safety
/// `out` must be valid for writes at `r0..r1`.
unsafe fn matvec_rows(
    isa: Isa,
    w: &QMatrix,
    r0: usize,
    r1: usize,
    a: act::ActRow<'_>,
    out: *mut f32,
) {
    match isa {
        // SAFETY: Isa::Avx2 is only chosen when the CPU has the features.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => avx2::matvec_rows(w.dtype, w.raw(), w.row_bytes, r0, r1, a, out),
        Isa::Scalar => {
            for r in r0..r1 {
                *out.add(r) = scalar::vec_dot(w.dtype, w.row_raw(r), a);
            }
        }
    }
}

/// `out[r] = W[r] . x` for rows `r0..r1` of a float matrix.
///
/// # Safety
/// `out` must be valid for writes at `r0..r1`.
unsafe fn float_matvec_rows(isa: Isa, w: &QMatrix, r0: usize, r1: usize, x: &[f32], out: *mut f32) {
    match isa {
        // SAFETY: Isa::Avx2 is only chosen when the CPU has the features.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => avx2::float_matvec_rows(w.dtype, w.raw(), w.row_bytes, r0, r1, x, out),
        Isa::Scalar => {
            for r in r0..r1 {
                *out.add(r) = scalar::float_dot(w.dtype, w.row_raw(r), x);
            }
        }
    }
}

/// A raw output pointer shared by tasks that write disjoint cells.
#[derive(Clone, Copy)]
struct SyncPtr(*mut f32);
// SAFETY: every task writes a disjoint set of cells (its own rows).
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}
impl SyncPtr {
    #[inline(always)]
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Runs `f(r0, r1)` over chunks of `0..rows` (multiples of `align` rows),
/// in parallel when `work` is large enough to pay for it.
fn par_rows(rows: usize, align: usize, work: usize, f: impl Fn(usize, usize) + Sync) {
    let chunks = row_chunks(rows, align, work);
    if chunks.len() <= 1 {
        f(0, rows);
    } else {
        chunks.into_par_iter().for_each(|(r0, r1)| f(r0, r1));
    }
}

/// Splits `0..rows` into chunks (multiples of `align` rows) for the thread
/// pool: one chunk when `work` is too small to pay for a fork-join, else a
/// multiple of the thread count, a few per thread when there is enough work
/// (evens out uneven progress), none smaller than `MIN_PARALLEL_WORK / 2`.
fn row_chunks(rows: usize, align: usize, work: usize) -> Vec<(usize, usize)> {
    let threads = rayon::current_num_threads();
    if threads <= 1 || work < MIN_PARALLEL_WORK || rows <= align {
        return vec![(0, rows)];
    }
    let per_thread = (work / (threads * MIN_PARALLEL_WORK / 2)).clamp(1, 4);
    let n_chunks = (threads * per_thread).min(rows.div_ceil(align));
    let chunk = rows.div_ceil(n_chunks).div_ceil(align) * align;
    (0..rows.div_ceil(chunk))
        .map(|i| (i * chunk, ((i + 1) * chunk).min(rows)))
        .collect()
}

fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        s += x * y;
    }
    s
}

#[cfg(test)]
mod bench;
#[cfg(test)]
mod tests;
