//! Small generated heads: keys correlated with their neighbours (as RoPE'd keys are),
//! with occasional jumps, so merging sets of several sizes appear.

use kvmerger_compression::{
    registry, HeadData, HeadInput, HeadPos, HeadStats, Method, Options, QueryMoments, SlotMeta,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub struct Head {
    pub data: HeadData,
    pub stats: HeadStats,
}

impl Head {
    pub fn input(&self, budget: usize, pos: HeadPos) -> HeadInput<'_> {
        HeadInput {
            data: &self.data,
            stats: &self.stats,
            pos,
            budget,
        }
    }
}

/// Options from `(key, value)` pairs.
pub fn options(pairs: &[(&str, &str)]) -> Options {
    let mut o = Options::new();
    for (k, v) in pairs {
        o.set(k, v);
    }
    o
}

/// The registered method `name` with these options.
pub fn build(name: &str, pairs: &[(&str, &str)]) -> Box<dyn Method> {
    registry::build(name, &options(pairs)).unwrap()
}

pub fn pos(layer: usize, n_layers: usize) -> HeadPos {
    HeadPos {
        layer,
        n_layers,
        kv_head: 0,
        n_kv_heads: 1,
    }
}

/// A layer that `kvmerger`'s default mask does not skip.
pub fn mid() -> HeadPos {
    pos(3, 8)
}

fn normal(rng: &mut ChaCha8Rng) -> f32 {
    // Box-Muller
    let u: f32 = rng.gen_range(1e-7..1.0);
    let v: f32 = rng.gen_range(0.0..1.0);
    (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
}

/// `n` slots of dimension `dim`; neighbour keys have cosine similarity around `rho`.
pub fn head_with(n: usize, dim: usize, seed: u64, rho: f32) -> Head {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut data = HeadData::new(dim);
    let mut key: Vec<f32> = (0..dim).map(|_| normal(&mut rng)).collect();
    let mut acc = Vec::with_capacity(n);
    for i in 0..n {
        if rng.gen_bool(0.08) {
            key = (0..dim).map(|_| normal(&mut rng)).collect();
        } else {
            let c = (1.0 - rho * rho).sqrt();
            for x in key.iter_mut() {
                *x = rho * *x + c * normal(&mut rng);
            }
        }
        let value: Vec<f32> = (0..dim).map(|_| normal(&mut rng)).collect();
        let score = normal(&mut rng).exp();
        acc.push(score);
        data.push(
            &key,
            &value,
            SlotMeta {
                position: i as u32,
                count: 1,
                score,
                bias: 0.0,
                learned: score.ln(),
            },
        );
    }
    let window = (0..n).map(|_| normal(&mut rng).exp()).collect();
    let last = (0..n).map(|_| normal(&mut rng).exp()).collect();
    let reconstruction: Vec<f32> = (0..n).map(|_| normal(&mut rng).exp()).collect();
    // Two query heads with random means and diagonal covariances.
    let queries = (0..2)
        .map(|_| QueryMoments {
            mean: (0..dim).map(|_| normal(&mut rng)).collect(),
            cov: (0..dim * dim)
                .map(|i| {
                    if i % (dim + 1) == 0 {
                        normal(&mut rng).exp()
                    } else {
                        0.0
                    }
                })
                .collect(),
            scale: 1.0 / (dim as f32).sqrt(),
        })
        .collect();
    Head {
        data,
        stats: HeadStats {
            accumulated: Some(acc),
            window: Some(window),
            last: Some(last),
            queries: Some(queries),
            learned: Some(reconstruction.iter().map(|r| r.max(1e-9).ln()).collect()),
            reconstruction: Some(reconstruction),
        },
    }
}

pub fn head(n: usize, dim: usize, seed: u64) -> Head {
    head_with(n, dim, seed, 0.9)
}

/// Softmax attention output of `query` over `data`, with each slot's logit bias.
pub fn attend(query: &[f32], data: &HeadData) -> Vec<f32> {
    let scale = 1.0 / (data.dim as f32).sqrt();
    let logits: Vec<f32> = (0..data.len())
        .map(|i| {
            data.key(i)
                .iter()
                .zip(query)
                .map(|(k, q)| k * q)
                .sum::<f32>()
                * scale
                + data.meta[i].bias
        })
        .collect();
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let weights: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
    let total: f32 = weights.iter().sum();
    let mut out = vec![0.0; data.dim];
    for (i, w) in weights.iter().enumerate() {
        for (o, v) in out.iter_mut().zip(data.value(i)) {
            *o += w / total * v;
        }
    }
    out
}

pub fn positions(data: &HeadData) -> Vec<u32> {
    data.meta.iter().map(|m| m.position).collect()
}

/// The input slot at `position`, as (key, value, meta).
pub fn slot_at(data: &HeadData, position: u32) -> (&[f32], &[f32], SlotMeta) {
    let i = data
        .meta
        .iter()
        .position(|m| m.position == position)
        .expect("position present");
    (data.key(i), data.value(i), data.meta[i])
}

/// Whether the slot at `position` is in `out` bit for bit as it is in `input`.
pub fn unchanged(input: &HeadData, out: &HeadData, position: u32) -> bool {
    match out.meta.iter().position(|m| m.position == position) {
        None => false,
        Some(j) => {
            let (k, v, m) = slot_at(input, position);
            same_bits(out.key(j), k) && same_bits(out.value(j), v) && out.meta[j] == m
        }
    }
}

pub fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// Whether two heads are the same bit for bit.
pub fn identical(a: &HeadData, b: &HeadData) -> bool {
    a.dim == b.dim
        && a.meta == b.meta
        && same_bits(&a.keys, &b.keys)
        && same_bits(&a.values, &b.values)
}
