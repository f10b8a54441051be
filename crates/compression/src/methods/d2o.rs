//! `d2o`: Dynamic Discriminative Operations (Wan et al. 2024), the second merging
//! baseline. Eviction is H2O's (a `recent` share of the budget plus heavy hitters by
//! accumulated attention); then each evicted slot is merged into the kept slot whose key
//! is most similar (cosine), if that similarity reaches a threshold that tracks the
//! similarities seen as an exponential moving average. Evicted slots below it are dropped.
//!
//! Threshold: it starts at the mean of the evicted slots' best similarities; the evicted
//! slots are then visited in position order (the order decoding would evict them in a
//! stream), each compared with the current threshold, which is then updated as
//! `t = ema * t + (1 - ema) * s`.
//!
//! Weighting (our choice, documented since D2O's exact formula is not restated in the
//! project's sources): a kept slot `c` that absorbs evicted slots `E` becomes the
//! softmax-weighted mean of itself and `E`, with weight `exp(1)` for `c` (its similarity
//! to itself) and `exp(s_e)` for each `e`; the same weights mix keys and values. So a
//! slot never moves far from the kept token, and closer tokens pull harder.
//! The merged slot keeps `c`'s position and logit bias; its count and score are the
//! sums over its members.
//!
//! Options: `recent` (share of the budget, default 0.5), `ema` (weight of the old
//! threshold, in [0, 1], default 0.5).

use super::{OptionDoc, Stat};
use crate::method::{HeadInput, Method, Options, StatsNeeds};
use crate::store::HeadData;
use crate::Error;
use rayon::prelude::*;

pub const SUMMARY: &str =
    "D2O: H2O eviction, then evicted slots merged into their most similar kept slot";
pub const OPTIONS: &[OptionDoc] = &[
    OptionDoc {
        key: "recent",
        default: "0.5",
        help: "share of the budget kept as the recent window",
    },
    OptionDoc {
        key: "ema",
        default: "0.5",
        help: "weight of the previous threshold in its moving average, in [0, 1]",
    },
];

#[derive(Clone, Debug)]
pub struct D2o {
    pub recent: f32,
    pub ema: f32,
}

impl D2o {
    pub fn from_options(opts: &Options) -> Result<Self, Error> {
        super::check_options("d2o", opts, OPTIONS)?;
        Ok(D2o {
            recent: super::fraction_or(opts, "recent", 0.5)?,
            ema: super::fraction_or(opts, "ema", 0.5)?,
        })
    }
}

impl Method for D2o {
    fn name(&self) -> &str {
        "d2o"
    }
    fn needs(&self) -> StatsNeeds {
        StatsNeeds {
            accumulated: true,
            ..Default::default()
        }
    }
    fn compress(&self, input: HeadInput<'_>) -> Result<HeadData, Error> {
        let (n, budget, data) = (input.data.len(), input.budget, input.data);
        if budget >= n {
            return Ok(data.clone());
        }
        let scores = super::stat(&input, Stat::Accumulated, "d2o")?;
        let recent = super::share_of(budget, self.recent);
        let mut kept = super::recent_plus_top(n, scores, recent, budget);
        kept.sort_unstable();
        let mut is_kept = vec![false; n];
        for &i in &kept {
            is_kept[i] = true;
        }
        let evicted: Vec<usize> = (0..n).filter(|&i| !is_kept[i]).collect();
        if kept.is_empty() {
            return Ok(HeadData::new(data.dim));
        }

        let dim = data.dim;
        let units = |slots: &[usize]| -> Vec<f32> {
            let mut out = Vec::with_capacity(slots.len() * dim);
            for &i in slots {
                let k = data.key(i);
                let norm = super::dot(k, k).sqrt();
                out.extend(k.iter().map(|x| if norm > 0.0 { x / norm } else { 0.0 }));
            }
            out
        };
        let best = most_similar(&units(&evicted), &units(&kept), dim);

        let mut absorbed: Vec<Vec<(usize, f32)>> = vec![Vec::new(); kept.len()];
        let mut threshold = best.iter().map(|b| b.1).sum::<f32>() / best.len().max(1) as f32;
        for (&e, &(j, s)) in evicted.iter().zip(&best) {
            if s >= threshold {
                absorbed[j].push((e, s));
            }
            threshold = self.ema * threshold + (1.0 - self.ema) * s;
        }

        let mut out = HeadData::new(dim);
        let (mut key, mut value) = (vec![0.0f32; dim], vec![0.0f32; dim]);
        for (j, &c) in kept.iter().enumerate() {
            if absorbed[j].is_empty() {
                out.push(data.key(c), data.value(c), data.meta[c]);
                continue;
            }
            let self_weight = 1.0f32.exp();
            let total = self_weight + absorbed[j].iter().map(|&(_, s)| s.exp()).sum::<f32>();
            let mut meta = data.meta[c];
            for (dst, src) in [(&mut key, data.key(c)), (&mut value, data.value(c))] {
                for (d, s) in dst.iter_mut().zip(src) {
                    *d = s * self_weight / total;
                }
            }
            for &(e, s) in &absorbed[j] {
                let w = s.exp() / total;
                for (d, x) in key.iter_mut().zip(data.key(e)) {
                    *d += w * x;
                }
                for (d, x) in value.iter_mut().zip(data.value(e)) {
                    *d += w * x;
                }
                meta.count += data.meta[e].count;
                meta.score += data.meta[e].score;
            }
            out.push(&key, &value, meta);
        }
        Ok(out)
    }
}

/// For each row of `queries`, the row of `keys` with the largest dot product, and that product.
fn most_similar(queries: &[f32], keys: &[f32], dim: usize) -> Vec<(usize, f32)> {
    let n = queries.len() / dim.max(1);
    let mut padded = queries.to_vec();
    padded.resize(n.div_ceil(ROWS) * ROWS * dim, 0.0);
    let mut best: Vec<(usize, f32)> = padded
        .par_chunks(ROWS * dim)
        .flat_map_iter(|block| best_of_block(block, keys, dim))
        .collect();
    best.truncate(n);
    best
}

const ROWS: usize = 8;
const LANES: usize = 8;

fn best_of_block(block: &[f32], keys: &[f32], dim: usize) -> [(usize, f32); ROWS] {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::avx2() {
        // SAFETY: the CPU supports AVX2, checked by `simd::avx2`.
        return unsafe { best_of_block_avx2(block, keys, dim) };
    }
    best_of_block_portable(block, keys, dim)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn best_of_block_avx2(block: &[f32], keys: &[f32], dim: usize) -> [(usize, f32); ROWS] {
    best_of_block_portable(block, keys, dim)
}

/// `ROWS` queries per pass over the keys, so each key row is loaded once for `ROWS` dot
/// products (8 measured fastest: 4 is half as fast, 16 spills registers); lanes of 8
/// partial sums let the compiler vectorise.
#[inline(always)]
fn best_of_block_portable(block: &[f32], keys: &[f32], dim: usize) -> [(usize, f32); ROWS] {
    let body = dim / LANES * LANES;
    let q: [&[f32]; ROWS] = std::array::from_fn(|r| &block[r * dim..(r + 1) * dim]);
    let mut best = [(0usize, f32::NEG_INFINITY); ROWS];
    for (j, key) in keys.chunks_exact(dim).enumerate() {
        let mut acc = [[0.0f32; LANES]; ROWS];
        for c in (0..body).step_by(LANES) {
            let k: &[f32; LANES] = key[c..c + LANES].try_into().unwrap();
            for (a, q) in acc.iter_mut().zip(&q) {
                let q: &[f32; LANES] = q[c..c + LANES].try_into().unwrap();
                for l in 0..LANES {
                    a[l] += q[l] * k[l];
                }
            }
        }
        for ((a, q), b) in acc.iter().zip(&q).zip(best.iter_mut()) {
            let tail: f32 = q[body..].iter().zip(&key[body..]).map(|(x, y)| x * y).sum();
            let s = a.iter().sum::<f32>() + tail;
            if s > b.1 {
                *b = (j, s);
            }
        }
    }
    best
}
