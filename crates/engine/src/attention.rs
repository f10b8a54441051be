//! Grouped-query attention over the engine's cache.
//!
//! Each query head reads the keys and values of its KV head directly from the
//! store (no copy per query head). A chunk of queries is processed one query at
//! a time against the slots it may see, so no n×n matrix is ever held. When the
//! caller asks for attention statistics, the softmax rows are folded into them
//! as they are computed; when it does not, nothing extra is done.

use crate::kernels::{axpy_f32, dot_f32, scores_f16, weighted_sum_f16};
use kvmerger_compression::{HeadStore, KvSlice};
use rayon::prelude::*;

/// Which statistics to fold in for one layer, and where the prompt's window starts.
#[derive(Clone, Copy, Debug, Default)]
pub struct StatsRequest {
    pub accumulated: bool,
    /// Queries with chunk index `>= window_from` count toward the window statistic.
    pub window_from: Option<usize>,
    /// Chunk index of the query whose row is the `last` statistic.
    pub last_at: Option<usize>,
}

impl StatsRequest {
    pub fn any(&self) -> bool {
        self.accumulated || self.window_from.is_some() || self.last_at.is_some()
    }
}

/// Statistics gathered for one query head over a chunk (one entry per slot).
#[derive(Clone, Debug, Default)]
pub struct HeadRows {
    pub accumulated: Vec<f32>,
    pub window: Vec<f32>,
    pub last: Vec<f32>,
}

/// Attention parameters for one layer.
#[derive(Clone, Copy, Debug)]
pub struct LayerAttn {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
    /// Sliding window: a query at position p sees slots with position > p - w.
    pub window: Option<usize>,
}

/// Attention of `t` queries against the layer's stores, into `out` (t × n_heads × d).
///
/// `q` is t × n_heads × d (after RoPE). The chunk's own keys and values must already be
/// appended to the stores: query `i` sees the first `n_old + i + 1` slots, where
/// `n_old = store.len() - t`. `positions[i]` is query i's absolute position.
/// Returns per query head statistics when `req.any()`.
pub fn attend(
    p: LayerAttn,
    stores: &[HeadStore],
    q: &[f32],
    t: usize,
    positions: &[u32],
    req: StatsRequest,
    out: &mut [f32],
) -> Vec<HeadRows> {
    let d = p.head_dim;
    let group = p.n_heads / p.n_kv_heads;
    let mut head_out = vec![0.0f32; p.n_heads * t * d];
    let rows: Vec<HeadRows> = head_out
        .par_chunks_mut(t * d)
        .enumerate()
        .map(|(h, ho)| {
            let store = &stores[h / group];
            let n = store.len();
            let n_old = n - t;
            let mut rows = HeadRows::default();
            if req.accumulated {
                rows.accumulated = vec![0.0; n];
            }
            if req.window_from.is_some() {
                rows.window = vec![0.0; n];
            }
            if req.last_at.is_some() {
                rows.last = vec![0.0; n];
            }
            let meta = store.meta();
            let bias = store.has_bias();
            let mut scores = Vec::with_capacity(n);
            for i in 0..t {
                let qi = &q[(i * p.n_heads + h) * d..(i * p.n_heads + h + 1) * d];
                let hi = n_old + i + 1;
                let lo = match p.window {
                    Some(w) => {
                        let pos = positions[i] as u64;
                        meta[..hi].partition_point(|m| (m.position as u64) + (w as u64) <= pos)
                    }
                    None => 0,
                };
                scores.clear();
                match store.keys() {
                    KvSlice::F16(k) => scores_f16(qi, &k[lo * d..hi * d], p.scale, &mut scores),
                    KvSlice::F32(k) => {
                        for j in lo..hi {
                            scores.push(dot_f32(qi, &k[j * d..(j + 1) * d]) * p.scale);
                        }
                    }
                }
                if bias {
                    for (s, m) in scores.iter_mut().zip(&meta[lo..hi]) {
                        *s += m.bias;
                    }
                }
                crate::kernels::softmax(&mut scores);
                let o = &mut ho[i * d..(i + 1) * d];
                o.fill(0.0);
                match store.values() {
                    KvSlice::F16(v) => weighted_sum_f16(o, &scores, &v[lo * d..hi * d]),
                    KvSlice::F32(v) => {
                        for (j, &pj) in (lo..hi).zip(&scores) {
                            axpy_f32(o, pj, &v[j * d..(j + 1) * d]);
                        }
                    }
                }
                if req.accumulated {
                    for (a, s) in rows.accumulated[lo..hi].iter_mut().zip(&scores) {
                        *a += s;
                    }
                }
                if matches!(req.window_from, Some(w) if i >= w) {
                    for (a, s) in rows.window[lo..hi].iter_mut().zip(&scores) {
                        *a += s;
                    }
                }
                if req.last_at == Some(i) {
                    rows.last[lo..hi].copy_from_slice(&scores);
                }
            }
            rows
        })
        .collect();
    for h in 0..p.n_heads {
        for i in 0..t {
            out[(i * p.n_heads + h) * d..(i * p.n_heads + h + 1) * d]
                .copy_from_slice(&head_out[(h * t + i) * d..(h * t + i + 1) * d]);
        }
    }
    rows
}
