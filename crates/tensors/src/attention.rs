//! Grouped-query attention over the engine's cache.
//!
//! Work is split into units of one KV head, a block of queries and a range of keys.
//! A unit handles every query head of its group together: keys and values are
//! converted to f32 one tile at a time (a few KiB, kept in L1) and each tile serves
//! all the unit's query rows, so a GQA group reads its KV head once, not once per
//! query head. Prefill blocks queries (each block scores its rows against the keys
//! it may see, key-major: every key value is broadcast against eight query rows,
//! then sums values four rows at a time); decoding (one query) splits the keys into
//! ranges so that both threads share a head, and the ranges are combined through
//! their softmax maxima and sums (as flash-decoding does). No n×n matrix is ever
//! held.
//! When the caller asks for attention statistics, the softmax rows are folded into
//! them; when it does not, nothing extra is done.

use crate::kernels::{
    add_weighted_rows, dot_rows, exp_shifted_key_major, exp_shifted_sum, f16_to_f32, max_f32,
    q8_0_to_f32, scores_key_major, weighted_key_major,
};
use kvmerger_compression::{HeadStore, KvSlice};
use rayon::prelude::*;

/// Which statistics to fold in for one layer, and where the prompt's window starts.
#[derive(Clone, Copy, Debug, Default)]
pub struct StatsRequest {
    pub accumulated: bool,
    /// Queries with chunk index `>= window_from` each keep their attention row.
    pub window_from: Option<usize>,
    /// Chunk index of the query whose row is the `last` statistic.
    pub last_at: Option<usize>,
    /// The largest attention each slot receives from any query of the chunk.
    pub peak: bool,
}

impl StatsRequest {
    pub fn any(&self) -> bool {
        self.accumulated || self.window_from.is_some() || self.last_at.is_some() || self.peak
    }
}

/// Statistics gathered for one query head over a chunk (one entry per slot).
#[derive(Clone, Debug, Default)]
pub struct HeadRows {
    pub accumulated: Vec<f32>,
    /// One attention row per query from `window_from` on, in query order.
    pub window: Vec<Vec<f32>>,
    pub last: Vec<f32>,
    pub peak: Vec<f32>,
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

/// Query rows per prefill unit (all heads of a group for a few queries).
const ROWS_PER_UNIT: usize = 16;
/// Keys per range when decoding splits a head's keys over threads.
const DECODE_SPLIT: usize = 512;
/// f32 values of one key or value tile (16 KiB: fits L1 beside the rows it serves).
const TILE_VALUES: usize = 4096;

/// Keys or values `[start, start + n)` of a store as f32, into `out` (n × d).
fn rows_f32(s: KvSlice<'_>, d: usize, start: usize, n: usize, out: &mut [f32]) {
    let out = &mut out[..n * d];
    match s {
        KvSlice::F16(x) => f16_to_f32(&x[start * d..(start + n) * d], out),
        KvSlice::F32(x) => out.copy_from_slice(&x[start * d..(start + n) * d]),
        KvSlice::Q8_0 { q, d: scales } => {
            let nb = d.div_ceil(kvmerger_compression::Q8_BLOCK);
            q8_0_to_f32(
                &q[start * d..(start + n) * d],
                &scales[start * nb..(start + n) * nb],
                d,
                out,
            )
        }
    }
}

/// One unit of work: the query heads of KV head `g` for queries `i0..i1`, against
/// keys `k0..k1`.
#[derive(Clone, Copy)]
struct Unit {
    g: usize,
    i0: usize,
    i1: usize,
    k0: usize,
    k1: usize,
}

/// What a unit leaves behind. Rows are ordered (query, head within the group).
struct Partial {
    /// Per row: the softmax shift (max score) and the sum of shifted exponentials.
    m: Vec<f32>,
    l: Vec<f32>,
    /// Per row: the unnormalised weighted sum of values (d values).
    o: Vec<f32>,
    /// Per row: the shifted exponentials over `k0..k1` (kept only for statistics).
    e: Vec<f32>,
}

/// The keys query `i` may see: `[lo, hi)`.
fn visible(
    p: &LayerAttn,
    meta: &[kvmerger_compression::SlotMeta],
    n_old: usize,
    pos: u32,
    i: usize,
) -> (usize, usize) {
    let hi = n_old + i + 1;
    let lo = match p.window {
        Some(w) => meta[..hi].partition_point(|m| (m.position as u64) + (w as u64) <= pos as u64),
        None => 0,
    };
    (lo, hi)
}

/// The keys each of the unit's queries may see, within the unit's keys.
fn unit_ranges(
    p: &LayerAttn,
    meta: &[kvmerger_compression::SlotMeta],
    n_old: usize,
    positions: &[u32],
    u: Unit,
) -> Vec<(usize, usize)> {
    (u.i0..u.i1)
        .map(|i| {
            let (lo, hi) = visible(p, meta, n_old, positions[i], i);
            (lo.max(u.k0), hi.min(u.k1))
        })
        .collect()
}

fn run_unit(
    p: &LayerAttn,
    store: &HeadStore,
    q: &[f32],
    t: usize,
    positions: &[u32],
    u: Unit,
    keep_e: bool,
) -> Partial {
    let d = p.head_dim;
    let group = p.n_heads / p.n_kv_heads;
    let n_old = store.len() - t;
    let meta = store.meta();
    let nrows = (u.i1 - u.i0) * group;
    let width = u.k1 - u.k0;
    // The unit's query rows, contiguous.
    let mut qr = vec![0.0f32; nrows * d];
    for i in u.i0..u.i1 {
        let src = (i * p.n_heads + u.g * group) * d;
        let dst = (i - u.i0) * group * d;
        qr[dst..dst + group * d].copy_from_slice(&q[src..src + group * d]);
    }
    let ranges = unit_ranges(p, meta, n_old, positions, u);
    let tile = (TILE_VALUES / d).max(4);
    let mut buf = vec![0.0f32; tile * d];
    let mut s = vec![0.0f32; nrows * width];
    let mut j = u.k0;
    while j < u.k1 {
        let nt = tile.min(u.k1 - j);
        rows_f32(store.keys(), d, j, nt, &mut buf);
        dot_rows(&qr, &buf[..nt * d], d, p.scale, &mut s[j - u.k0..], width);
        j += nt;
    }
    let bias = store.has_bias();
    let mut m = vec![f32::NEG_INFINITY; nrows];
    let mut l = vec![0.0f32; nrows];
    for (r, row) in s.chunks_mut(width).enumerate() {
        let (lo, hi) = ranges[r / group];
        if bias {
            for (x, mt) in row.iter_mut().zip(&meta[u.k0..u.k1]) {
                *x += mt.bias;
            }
        }
        if lo >= hi {
            row.fill(0.0);
            continue;
        }
        let (a, b) = (lo - u.k0, hi - u.k0);
        m[r] = max_f32(&row[a..b]);
        l[r] = exp_shifted_sum(&mut row[a..b], m[r]);
        row[..a].fill(0.0);
        row[b..].fill(0.0);
    }
    let mut o = vec![0.0f32; nrows * d];
    let mut j = u.k0;
    while j < u.k1 {
        let nt = tile.min(u.k1 - j);
        rows_f32(store.values(), d, j, nt, &mut buf);
        for (r, or) in o.chunks_mut(d).enumerate() {
            let (lo, hi) = ranges[r / group];
            let (a, b) = (lo.max(j), hi.min(j + nt));
            if a < b {
                let pr = &s[r * width + a - u.k0..r * width + b - u.k0];
                add_weighted_rows(or, pr, &buf[(a - j) * d..(b - j) * d]);
            }
        }
        j += nt;
    }
    Partial {
        m,
        l,
        o,
        e: if keep_e { s } else { Vec::new() },
    }
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
    if t == 1 {
        attend_one(p, stores, q, positions, req, out)
    } else {
        attend_block(p, stores, q, t, positions, req, out)
    }
}

/// Statistics of one query head over a task's queries, every vector as long as the
/// store (empty where not requested).
#[derive(Default)]
struct Folded {
    accumulated: Vec<f32>,
    peak: Vec<f32>,
    /// (query index, softmax row) for the window's queries and the last one.
    rows: Vec<(usize, Vec<f32>)>,
}

/// Buffers one prefill task reuses from unit to unit.
#[derive(Default)]
struct Scratch {
    /// The unit's query rows transposed and scaled (d × np).
    qt: Vec<f32>,
    /// Scores, then exponentials, key-major (width × np).
    s: Vec<f32>,
    /// One tile of keys or values as f32.
    kv: Vec<f32>,
    /// Unnormalised outputs (np × d).
    o: Vec<f32>,
    /// Per row: the softmax shift, the sum of exponentials, and 1 / sum (0 for a row
    /// that sees nothing).
    m: Vec<f32>,
    l: Vec<f32>,
    c: Vec<f32>,
}

/// One prefill unit, key-major: the query heads of KV head `u.g` for queries
/// `u.i0..u.i1` against keys `u.k0..u.k1`, which must cover every key those queries
/// may see, so that each row's softmax is final. Rows are ordered (query, head within
/// the group) and padded to `np`, a multiple of 8 (padding rows score 0 everywhere and
/// are ignored). Leaves the exponentials in `w.s` (zero where a row may not look), the
/// unnormalised outputs in `w.o` and `1 / sum` per row in `w.c`; returns `np`.
fn prefill_unit(
    p: &LayerAttn,
    store: &HeadStore,
    q: &[f32],
    t: usize,
    positions: &[u32],
    u: Unit,
    w: &mut Scratch,
) -> usize {
    let d = p.head_dim;
    let group = p.n_heads / p.n_kv_heads;
    let n_old = store.len() - t;
    let meta = store.meta();
    let nr = (u.i1 - u.i0) * group;
    let np = nr.next_multiple_of(8);
    let width = u.k1 - u.k0;
    w.qt.clear();
    w.qt.resize(d * np, 0.0);
    for r in 0..nr {
        let (i, hh) = (u.i0 + r / group, r % group);
        let src = &q[(i * p.n_heads + u.g * group + hh) * d..][..d];
        for (c, x) in src.iter().enumerate() {
            w.qt[c * np + r] = x * p.scale;
        }
    }
    if w.s.len() < width * np {
        w.s.resize(width * np, 0.0);
    }
    let s = &mut w.s[..width * np];
    let tile = (TILE_VALUES / d).max(4);
    w.kv.resize(tile * d, 0.0);
    let mut j = u.k0;
    while j < u.k1 {
        let nt = tile.min(u.k1 - j);
        rows_f32(store.keys(), d, j, nt, &mut w.kv);
        let at = (j - u.k0) * np;
        scores_key_major(&w.qt, np, &w.kv[..nt * d], d, &mut s[at..at + nt * np]);
        j += nt;
    }
    if store.has_bias() {
        for (row, mt) in s.chunks_exact_mut(np).zip(&meta[u.k0..u.k1]) {
            row.iter_mut().for_each(|x| *x += mt.bias);
        }
    }
    // Keys that some of the unit's queries may not see: below a later query's window,
    // or past an earlier query's own position.
    let ranges = unit_ranges(p, meta, n_old, positions, u);
    let all_lo = ranges.iter().map(|r| r.0).max().unwrap_or(u.k0);
    let all_hi = ranges.iter().map(|r| r.1).min().unwrap_or(u.k1);
    for j in (u.k0..all_lo).chain(all_hi.max(all_lo)..u.k1) {
        let row = &mut s[(j - u.k0) * np..(j - u.k0 + 1) * np];
        for (qi, &(lo, hi)) in ranges.iter().enumerate() {
            if j < lo || j >= hi {
                row[qi * group..(qi + 1) * group].fill(f32::NEG_INFINITY);
            }
        }
    }
    w.m.clear();
    w.m.resize(np, f32::NEG_INFINITY);
    for row in s.chunks_exact(np) {
        for (m, &x) in w.m.iter_mut().zip(row) {
            *m = if x > *m { x } else { *m };
        }
    }
    // A row that sees nothing: every exponential is 0 and so is its sum.
    w.m.iter_mut()
        .filter(|m| **m == f32::NEG_INFINITY)
        .for_each(|m| *m = 0.0);
    w.l.clear();
    w.l.resize(np, 0.0);
    exp_shifted_key_major(s, np, &w.m, &mut w.l);
    w.o.clear();
    w.o.resize(np * d, 0.0);
    let mut j = u.k0;
    while j < u.k1 {
        let nt = tile.min(u.k1 - j);
        rows_f32(store.values(), d, j, nt, &mut w.kv);
        let at = (j - u.k0) * np;
        weighted_key_major(&s[at..at + nt * np], np, &w.kv[..nt * d], d, &mut w.o);
        j += nt;
    }
    w.c.clear();
    w.c.extend(
        w.l.iter()
            .enumerate()
            .map(|(r, &l)| if r < nr && l > 0.0 { 1.0 / l } else { 0.0 }),
    );
    np
}

/// Prefill: each unit covers every key its queries may see, so its softmax shift and
/// sum are final. Tasks run a run of consecutive units of one KV head, normalise
/// their rows and fold statistics as they go, so no unit's exponentials outlive it
/// (a pass of a few thousand queries over a long context would otherwise hold
/// t × n_heads × n values at once).
fn attend_block(
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
    let qb = (ROWS_PER_UNIT / group).max(1);
    let blocks = t.div_ceil(qb);
    // Enough tasks per head for the threads to balance causal (growing) rows.
    let per_task = blocks
        .div_ceil(8 * rayon::current_num_threads().max(1))
        .max(1);
    let mut tasks = Vec::new();
    for g in 0..p.n_kv_heads {
        let mut b = 0;
        while b < blocks {
            let e = (b + per_task).min(blocks);
            tasks.push(Task {
                g,
                q0: b * qb,
                q1: (e * qb).min(t),
            });
            b = e;
        }
    }
    let results: Vec<(Vec<f32>, Vec<Folded>)> = tasks
        .par_iter()
        .map(|&task| prefill_task(&p, &stores[task.g], q, t, positions, req, task, qb))
        .collect();

    let nq = t * p.n_heads;
    out[..nq * d].fill(0.0);
    for (task, (o, _)) in tasks.iter().zip(&results) {
        for i in task.q0..task.q1 {
            let dst = (i * p.n_heads + task.g * group) * d;
            let src = (i - task.q0) * group * d;
            out[dst..dst + group * d].copy_from_slice(&o[src..src + group * d]);
        }
    }
    if !req.any() {
        return Vec::new();
    }
    let mut rows = empty_rows(&p, stores, t, req);
    rows.par_iter_mut().enumerate().for_each(|(h, hr)| {
        let (g, hh) = (h / group, h % group);
        for (task, (_, folded)) in tasks.iter().zip(&results) {
            if task.g == g {
                folded[hh].add_to(hr, req);
            }
        }
    });
    rows
}

/// A prefill task: queries `q0..q1` of KV head `g`.
#[derive(Clone, Copy)]
struct Task {
    g: usize,
    q0: usize,
    q1: usize,
}

/// One task's units in turn (blocks of `qb` queries): the normalised outputs of its
/// rows ((query, head within the group) × d) and, when `req` asks, the statistics of
/// each of the group's query heads.
#[allow(clippy::too_many_arguments)]
fn prefill_task(
    p: &LayerAttn,
    store: &HeadStore,
    q: &[f32],
    t: usize,
    positions: &[u32],
    req: StatsRequest,
    task: Task,
    qb: usize,
) -> (Vec<f32>, Vec<Folded>) {
    let d = p.head_dim;
    let group = p.n_heads / p.n_kv_heads;
    let n_old = store.len() - t;
    let mut o = vec![0.0f32; (task.q1 - task.q0) * group * d];
    let mut stats = req
        .any()
        .then(|| KeyMajorStats::new(req, store.len(), (qb * group).next_multiple_of(8)));
    let mut w = Scratch::default();
    let mut i0 = task.q0;
    while i0 < task.q1 {
        let i1 = (i0 + qb).min(task.q1);
        let (k0, _) = visible(p, store.meta(), n_old, positions[i0], i0);
        let u = Unit {
            g: task.g,
            i0,
            i1,
            k0,
            k1: n_old + i1,
        };
        let np = prefill_unit(p, store, q, t, positions, u, &mut w);
        let nr = (i1 - i0) * group;
        let base = (i0 - task.q0) * group * d;
        for (r, (dst, src)) in o[base..base + nr * d]
            .chunks_exact_mut(d)
            .zip(w.o.chunks_exact(d))
            .enumerate()
        {
            let c = w.c[r];
            for (a, b) in dst.iter_mut().zip(src) {
                *a = b * c;
            }
        }
        if let Some(stats) = &mut stats {
            stats.fold(&mut w, np, u, group);
        }
        i0 = i1;
    }
    let folded = stats.map_or_else(Vec::new, |s| s.finish(group));
    (o, folded)
}

/// A task's statistics while its units run. Accumulated and peak attention are
/// key-major like the units' rows (slot j, row r at j * rows + r): folded with vector
/// operations as units run, then reduced over each head's rows once at the end.
struct KeyMajorStats {
    req: StatsRequest,
    /// Slots in the store.
    n: usize,
    /// Rows of the widest unit, padded to a multiple of 8.
    rows: usize,
    accumulated: Vec<f32>,
    peak: Vec<f32>,
    /// (head within the group, query index, softmax row) for the window and the last query.
    picked: Vec<(usize, usize, Vec<f32>)>,
}

impl KeyMajorStats {
    fn new(req: StatsRequest, n: usize, rows: usize) -> Self {
        let sized = |on: bool| {
            if on {
                vec![0.0f32; n * rows]
            } else {
                Vec::new()
            }
        };
        KeyMajorStats {
            req,
            n,
            rows,
            accumulated: sized(req.accumulated),
            peak: sized(req.peak),
            picked: Vec::new(),
        }
    }

    /// Folds in one unit's rows (left in `w` by [`prefill_unit`], `np` wide), normalising
    /// them in place first (rows that see nothing, and the padding, become zero).
    fn fold(&mut self, w: &mut Scratch, np: usize, u: Unit, group: usize) {
        let req = self.req;
        let s = &mut w.s[..(u.k1 - u.k0) * np];
        for row in s.chunks_exact_mut(np) {
            for (x, &c) in row.iter_mut().zip(&w.c) {
                *x *= c;
            }
        }
        let at = u.k0 * self.rows;
        if req.accumulated {
            for (dst, row) in self.accumulated[at..]
                .chunks_exact_mut(self.rows)
                .zip(s.chunks_exact(np))
            {
                for (a, &x) in dst.iter_mut().zip(row) {
                    *a += x;
                }
            }
        }
        if req.peak {
            for (dst, row) in self.peak[at..]
                .chunks_exact_mut(self.rows)
                .zip(s.chunks_exact(np))
            {
                for (a, &x) in dst.iter_mut().zip(row) {
                    *a = if x > *a { x } else { *a };
                }
            }
        }
        for r in 0..(u.i1 - u.i0) * group {
            let i = u.i0 + r / group;
            if w.c[r] == 0.0 || !(req.window_from.is_some_and(|w| i >= w) || req.last_at == Some(i))
            {
                continue;
            }
            let mut row = vec![0.0f32; self.n];
            for (a, sr) in row[u.k0..u.k1].iter_mut().zip(s.chunks_exact(np)) {
                *a = sr[r];
            }
            self.picked.push((r % group, i, row));
        }
    }

    /// Per query head of the group: the key-major sums and maxima reduced over its rows,
    /// and its picked rows.
    fn finish(self, group: usize) -> Vec<Folded> {
        let reduce = |km: &[f32], hh: usize, add: bool| -> Vec<f32> {
            km.chunks_exact(self.rows)
                .map(|slot| {
                    let mut it = slot.iter().skip(hh).step_by(group);
                    let first = it.next().copied().unwrap_or(0.0);
                    it.fold(first, |a, &x| if add { a + x } else { a.max(x) })
                })
                .collect()
        };
        let mut folded: Vec<Folded> = (0..group)
            .map(|hh| Folded {
                accumulated: if self.req.accumulated {
                    reduce(&self.accumulated, hh, true)
                } else {
                    Vec::new()
                },
                peak: if self.req.peak {
                    reduce(&self.peak, hh, false)
                } else {
                    Vec::new()
                },
                rows: Vec::new(),
            })
            .collect();
        for (hh, i, row) in self.picked {
            folded[hh].rows.push((i, row));
        }
        folded
    }
}

impl Folded {
    /// Adds one task's statistics of a query head to the head's rows.
    fn add_to(&self, hr: &mut HeadRows, req: StatsRequest) {
        if req.accumulated {
            hr.accumulated
                .iter_mut()
                .zip(&self.accumulated)
                .for_each(|(a, b)| *a += b);
        }
        if req.peak {
            hr.peak
                .iter_mut()
                .zip(&self.peak)
                .for_each(|(a, &b)| *a = a.max(b));
        }
        for (i, row) in &self.rows {
            if let Some(w) = req.window_from.filter(|&w| *i >= w) {
                hr.window[i - w].copy_from_slice(row);
            }
            if req.last_at == Some(*i) {
                hr.last.copy_from_slice(row);
            }
        }
    }
}

/// Zeroed statistics for every query head, sized as `req` asks.
fn empty_rows(p: &LayerAttn, stores: &[HeadStore], t: usize, req: StatsRequest) -> Vec<HeadRows> {
    let group = p.n_heads / p.n_kv_heads;
    (0..p.n_heads)
        .map(|h| {
            let n = stores[h / group].len();
            let v = |on: bool| if on { vec![0.0f32; n] } else { Vec::new() };
            HeadRows {
                accumulated: v(req.accumulated),
                window: match req.window_from {
                    Some(w) if w < t => vec![vec![0.0f32; n]; t - w],
                    _ => Vec::new(),
                },
                last: v(req.last_at.is_some()),
                peak: v(req.peak),
            }
        })
        .collect()
}

/// Decoding (one query): each KV head's keys are split into ranges that threads
/// share, combined through their softmax maxima and sums.
fn attend_one(
    p: LayerAttn,
    stores: &[HeadStore],
    q: &[f32],
    positions: &[u32],
    req: StatsRequest,
    out: &mut [f32],
) -> Vec<HeadRows> {
    let t = 1;
    let units = decode_units(&p, stores, positions);
    let keep_e = req.any();
    let parts: Vec<Partial> = units
        .par_iter()
        .map(|&u| run_unit(&p, &stores[u.g], q, t, positions, u, keep_e))
        .collect();
    let (den, factors) = combine_units(&p, &units, &parts, t, out);
    if !keep_e {
        return Vec::new();
    }
    let mut rows = empty_rows(&p, stores, t, req);
    fold_decode_stats(&p, &units, &parts, &factors, &den, req, &mut rows);
    rows
}

/// The units of one decoding step: each KV head's visible keys cut into ranges of at
/// most `DECODE_SPLIT` keys.
fn decode_units(p: &LayerAttn, stores: &[HeadStore], positions: &[u32]) -> Vec<Unit> {
    let t = 1;
    let mut units = Vec::new();
    for (g, store) in stores.iter().enumerate().take(p.n_kv_heads) {
        let n = store.len();
        let n_old = n - t;
        let (lo, hi) = visible(p, store.meta(), n_old, positions[0], 0);
        let parts = (hi - lo).div_ceil(DECODE_SPLIT).max(1);
        let step = (hi - lo).div_ceil(parts);
        for c in 0..parts {
            let k0 = lo + c * step;
            units.push(Unit {
                g,
                i0: 0,
                i1: 1,
                k0,
                k1: (k0 + step).min(hi),
            });
        }
    }
    units
}

/// Combines each (query, head) over the units that cover it into `out`; returns the
/// softmax denominators and, per unit and row, the factor that brings its exponentials
/// to the common shift.
fn combine_units(
    p: &LayerAttn,
    units: &[Unit],
    parts: &[Partial],
    t: usize,
    out: &mut [f32],
) -> (Vec<f32>, Vec<Vec<f32>>) {
    let d = p.head_dim;
    let group = p.n_heads / p.n_kv_heads;
    // Combine each (query, head) over the units that cover it.
    let nq = t * p.n_heads;
    let mut mx = vec![f32::NEG_INFINITY; nq];
    for (u, part) in units.iter().zip(parts) {
        for (r, &m) in part.m.iter().enumerate() {
            let (i, hh) = (u.i0 + r / group, r % group);
            let k = i * p.n_heads + u.g * group + hh;
            mx[k] = mx[k].max(m);
        }
    }
    let mut den = vec![0.0f32; nq];
    out[..nq * d].fill(0.0);
    // Per unit and row, the factor that brings its exponentials to the common shift.
    let factors: Vec<Vec<f32>> = units
        .iter()
        .zip(parts)
        .map(|(u, part)| {
            part.m
                .iter()
                .enumerate()
                .map(|(r, &m)| {
                    let (i, hh) = (u.i0 + r / group, r % group);
                    let k = i * p.n_heads + u.g * group + hh;
                    let f = if m == f32::NEG_INFINITY {
                        0.0
                    } else {
                        (m - mx[k]).exp()
                    };
                    den[k] += part.l[r] * f;
                    let o = &mut out[k * d..(k + 1) * d];
                    for (a, b) in o.iter_mut().zip(&part.o[r * d..(r + 1) * d]) {
                        *a += f * b;
                    }
                    f
                })
                .collect()
        })
        .collect();
    for (k, o) in out[..nq * d].chunks_mut(d).enumerate() {
        if den[k] > 0.0 {
            let inv = 1.0 / den[k];
            o.iter_mut().for_each(|v| *v *= inv);
        }
    }
    (den, factors)
}

/// Statistics: each query head's normalised softmax rows, folded as requested.
fn fold_decode_stats(
    p: &LayerAttn,
    units: &[Unit],
    parts: &[Partial],
    factors: &[Vec<f32>],
    den: &[f32],
    req: StatsRequest,
    rows: &mut [HeadRows],
) {
    let group = p.n_heads / p.n_kv_heads;
    rows.par_iter_mut().enumerate().for_each(|(h, hr)| {
        let (g, hh) = (h / group, h % group);
        for ((u, part), f) in units.iter().zip(parts).zip(factors) {
            if u.g != g {
                continue;
            }
            let width = u.k1 - u.k0;
            for i in u.i0..u.i1 {
                let r = (i - u.i0) * group + hh;
                let k = i * p.n_heads + h;
                if f[r] == 0.0 || den[k] == 0.0 {
                    continue;
                }
                let c = f[r] / den[k];
                let e = &part.e[r * width..(r + 1) * width];
                if req.accumulated {
                    for (a, x) in hr.accumulated[u.k0..u.k1].iter_mut().zip(e) {
                        *a += x * c;
                    }
                }
                if let Some(w) = req.window_from.filter(|&w| i >= w) {
                    for (a, x) in hr.window[i - w][u.k0..u.k1].iter_mut().zip(e) {
                        *a += x * c;
                    }
                }
                if req.peak {
                    for (a, x) in hr.peak[u.k0..u.k1].iter_mut().zip(e) {
                        *a = a.max(x * c);
                    }
                }
                if req.last_at == Some(i) {
                    for (a, x) in hr.last[u.k0..u.k1].iter_mut().zip(e) {
                        *a += x * c;
                    }
                }
            }
        }
    });
}

#[cfg(test)]
#[allow(clippy::needless_range_loop)] // index loops mirror the definitions being checked
mod tests {
    use super::*;
    use kvmerger_compression::{KvDtype, SlotMeta};

    /// Plain attention, one query head and one key at a time, in f64.
    fn naive(
        p: LayerAttn,
        stores: &[HeadStore],
        q: &[f32],
        t: usize,
        positions: &[u32],
    ) -> (Vec<f32>, Vec<Vec<Vec<f64>>>) {
        let d = p.head_dim;
        let group = p.n_heads / p.n_kv_heads;
        let mut out = vec![0.0f32; t * p.n_heads * d];
        let mut probs = vec![vec![Vec::new(); t]; p.n_heads];
        for h in 0..p.n_heads {
            let st = &stores[h / group];
            let data = st.to_data();
            let n = st.len();
            for i in 0..t {
                let qi = &q[(i * p.n_heads + h) * d..(i * p.n_heads + h + 1) * d];
                let hi = n - t + i + 1;
                let pos = positions[i] as i64;
                let vis: Vec<usize> = (0..hi)
                    .filter(|&j| {
                        p.window
                            .is_none_or(|w| data.meta[j].position as i64 > pos - w as i64)
                    })
                    .collect();
                let sc: Vec<f64> = vis
                    .iter()
                    .map(|&j| {
                        let k = data.key(j);
                        qi.iter()
                            .zip(k)
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum::<f64>()
                            * p.scale as f64
                            + data.meta[j].bias as f64
                    })
                    .collect();
                let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = sc.iter().map(|s| (s - m).exp()).sum();
                let mut pr = vec![0.0f64; n];
                for (&j, s) in vis.iter().zip(&sc) {
                    pr[j] = (s - m).exp() / z;
                    for c in 0..d {
                        out[(i * p.n_heads + h) * d + c] +=
                            (pr[j] * data.value(j)[c] as f64) as f32;
                    }
                }
                probs[h][i] = pr;
            }
        }
        (out, probs)
    }

    fn check(
        n_heads: usize,
        n_kv: usize,
        d: usize,
        n_old: usize,
        t: usize,
        window: Option<usize>,
        dtype: KvDtype,
    ) {
        let p = LayerAttn {
            n_heads,
            n_kv_heads: n_kv,
            head_dim: d,
            scale: 1.0 / (d as f32).sqrt(),
            window,
        };
        let n = n_old + t;
        let stores: Vec<HeadStore> = (0..n_kv)
            .map(|g| {
                let mut s = HeadStore::new(d, dtype);
                for j in 0..n {
                    let k: Vec<f32> = (0..d)
                        .map(|c| ((j * 31 + c * 7 + g * 3) as f32 * 0.137).sin() * 2.0)
                        .collect();
                    let v: Vec<f32> = (0..d)
                        .map(|c| ((j * 13 + c * 5 + g) as f32 * 0.071).cos())
                        .collect();
                    let mut m = SlotMeta::token(j as u32);
                    if j % 7 == 3 {
                        m.bias = 0.5;
                    }
                    s.push(&k, &v, m);
                }
                s
            })
            .collect();
        let q: Vec<f32> = (0..t * n_heads * d)
            .map(|i| ((i * 17) as f32 * 0.0191).cos() * 1.5)
            .collect();
        let positions: Vec<u32> = (n_old..n).map(|x| x as u32).collect();
        let req = StatsRequest {
            accumulated: true,
            window_from: Some(t / 2),
            last_at: Some(t - 1),
            peak: true,
        };
        let mut out = vec![0.0f32; t * n_heads * d];
        let rows = attend(p, &stores, &q, t, &positions, req, &mut out);
        let (want, probs) = naive(p, &stores, &q, t, &positions);
        for (a, b) in out.iter().zip(&want) {
            assert!((a - b).abs() < 2e-5, "output {a} vs {b}");
        }
        for h in 0..n_heads {
            for j in 0..n {
                let acc: f64 = (0..t).map(|i| probs[h][i][j]).sum();
                let peak = (0..t).map(|i| probs[h][i][j]).fold(0.0f64, f64::max);
                assert!((rows[h].accumulated[j] as f64 - acc).abs() < 1e-5);
                assert_eq!(rows[h].window.len(), t - t / 2);
                for (r, i) in (t / 2..t).enumerate() {
                    assert!((rows[h].window[r][j] as f64 - probs[h][i][j]).abs() < 1e-6);
                }
                assert!((rows[h].last[j] as f64 - probs[h][t - 1][j]).abs() < 1e-5);
                assert!((rows[h].peak[j] as f64 - peak).abs() < 1e-6);
            }
        }
        // Without statistics: the same output, no rows.
        let mut out2 = vec![0.0f32; t * n_heads * d];
        let none = attend(
            p,
            &stores,
            &q,
            t,
            &positions,
            StatsRequest::default(),
            &mut out2,
        );
        assert!(none.is_empty());
        assert_eq!(out, out2);
    }

    #[test]
    fn blocked_prefill_matches_plain_attention() {
        check(6, 2, 64, 5, 37, None, KvDtype::F16);
        check(4, 1, 24, 0, 9, None, KvDtype::F32);
        check(4, 4, 16, 3, 20, Some(6), KvDtype::F16);
        check(6, 2, 64, 11, 29, None, KvDtype::Q8_0);
        check(4, 2, 40, 0, 12, None, KvDtype::Q8_0);
        // Qwen2.5's groups of seven (rows padded to 16), several key tiles, a window
        // that moves within a unit, and a group wider than a unit's rows.
        check(14, 2, 64, 300, 41, None, KvDtype::F16);
        check(14, 2, 64, 0, 70, Some(20), KvDtype::Q8_0);
        check(32, 1, 16, 7, 5, None, KvDtype::F32);
    }

    #[test]
    fn split_decoding_matches_plain_attention() {
        check(7, 1, 64, 1500, 1, None, KvDtype::F16);
        check(6, 3, 32, 2100, 1, Some(700), KvDtype::F32);
        check(2, 2, 8, 0, 1, None, KvDtype::F16);
        check(7, 1, 64, 1300, 1, None, KvDtype::Q8_0);
    }
}
