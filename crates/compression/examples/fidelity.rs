//! Hand-run check (not a test): how far each method's compressed head moves the
//! attention output of future queries, on a synthetic head whose statistics come from
//! real causal softmax attention. A proxy for choosing defaults (KVMerger's `mass` and
//! `sigma`), not a substitute for the task benchmarks.
//!
//! Keys follow an AR(1) process (neighbour cosine about `rho`, with occasional jumps,
//! like RoPE'd keys); each query mixes its own key (locality), the key of a random
//! earlier token (retrieval) and noise. Prefill queries give the accumulated, window
//! and last statistics; 64 further queries, attending to the prompt only, are scored by
//! the relative L2 error of their attention output against the full cache.
//!
//! ```text
//! cargo run --release -p kvmerger-compression --example fidelity [slots] [rho]
//! ```

mod common;

use common::normal;
use kvmerger_compression::{HeadData, HeadInput, HeadStats, SlotMeta};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const DIM: usize = 64;
const WINDOW: usize = 32;
const FUTURE: usize = 64;

struct Sim {
    data: HeadData,
    stats: HeadStats,
    future: Vec<Vec<f32>>,
}

fn softmax_row(q: &[f32], keys: &[f32], upto: usize) -> Vec<f32> {
    let scale = 1.0 / (DIM as f32).sqrt();
    let logits: Vec<f32> = keys[..upto * DIM]
        .chunks_exact(DIM)
        .map(|k| k.iter().zip(q).map(|(a, b)| a * b).sum::<f32>() * scale)
        .collect();
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = logits.iter().map(|l| (l - m).exp()).collect();
    let s: f32 = e.iter().sum();
    e.iter().map(|x| x / s).collect()
}

fn simulate(n: usize, rho: f32, seed: u64) -> Sim {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let total = n + FUTURE;
    let mut keys = Vec::with_capacity(total * DIM);
    let mut key: Vec<f32> = (0..DIM).map(|_| normal(&mut rng)).collect();
    for _ in 0..total {
        if rng.gen_bool(0.05) {
            key = (0..DIM).map(|_| normal(&mut rng)).collect();
        } else {
            let c = (1.0 - rho * rho).sqrt();
            for x in key.iter_mut() {
                *x = rho * *x + c * normal(&mut rng);
            }
        }
        keys.extend_from_slice(&key);
    }
    let mut queries = Vec::with_capacity(total);
    for i in 0..total {
        let r = rng.gen_range(0..i.clamp(1, n));
        let q: Vec<f32> = (0..DIM)
            .map(|d| 0.8 * keys[i * DIM + d] + 0.8 * keys[r * DIM + d] + 0.5 * normal(&mut rng))
            .collect();
        queries.push(q);
    }
    let mut data = HeadData::new(DIM);
    for i in 0..n {
        let value: Vec<f32> = (0..DIM).map(|_| normal(&mut rng)).collect();
        data.push(
            &keys[i * DIM..(i + 1) * DIM],
            &value,
            SlotMeta::token(i as u32),
        );
    }
    let (mut acc, mut window, mut last) = (vec![0.0f32; n], vec![0.0f32; n], vec![0.0f32; n]);
    for (i, q) in queries.iter().enumerate().take(n) {
        let row = softmax_row(q, &data.keys, i + 1);
        for (j, p) in row.iter().enumerate() {
            acc[j] += p;
            if i + WINDOW >= n {
                window[j] += p;
            }
            if i + 1 == n {
                last[j] += p;
            }
        }
    }
    for (m, a) in data.meta.iter_mut().zip(&acc) {
        m.score = *a;
    }
    let stats = HeadStats {
        accumulated: Some(acc),
        window: Some(window),
        last: Some(last),
        ..Default::default()
    };
    Sim {
        data,
        stats,
        future: queries[n..].to_vec(),
    }
}

fn attend(q: &[f32], data: &HeadData) -> Vec<f32> {
    let scale = 1.0 / (DIM as f32).sqrt();
    let logits: Vec<f32> = (0..data.len())
        .map(|i| {
            data.key(i).iter().zip(q).map(|(a, b)| a * b).sum::<f32>() * scale + data.meta[i].bias
        })
        .collect();
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = logits.iter().map(|l| (l - m).exp()).collect();
    let s: f32 = e.iter().sum();
    let mut out = vec![0.0; DIM];
    for (i, w) in e.iter().enumerate() {
        for (o, v) in out.iter_mut().zip(data.value(i)) {
            *o += w / s * v;
        }
    }
    out
}

fn error(sim: &Sim, out: &HeadData) -> f64 {
    let mut total = 0.0;
    for q in &sim.future {
        let (a, b) = (attend(q, &sim.data), attend(q, out));
        let diff: f32 = a.iter().zip(&b).map(|(x, y)| (x - y) * (x - y)).sum();
        let norm: f32 = a.iter().map(|x| x * x).sum();
        total += (diff / norm).sqrt() as f64;
    }
    total / sim.future.len() as f64
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let n: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(1024);
    let rho: f32 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(0.9);
    let sims: Vec<Sim> = (0..3).map(|s| simulate(n, rho, s)).collect();
    let pos = common::mid_layer(1);
    let variants: &[(&str, &[(&str, &str)])] = &[
        ("streaming", &[]),
        ("h2o", &[]),
        ("tova", &[]),
        ("snapkv", &[]),
        ("knorm", &[]),
        ("random", &[]),
        ("cam", &[]),
        ("d2o", &[]),
        ("kvmerger", &[("mass", "bias")]),
        ("kvmerger", &[("mass", "none")]),
        ("kvmerger", &[("mass", "scale")]),
        ("kvmerger", &[("sigma", "5")]),
        ("kvmerger", &[("sigma", "1")]),
        ("kvmerger", &[("chain", "first")]),
        ("kvmerger", &[("score", "window")]),
        ("kvmerger", &[("mode", "paper")]),
        ("kvmerger+", &[("selector", "snapkv"), ("merge", "values")]),
        (
            "kvmerger+",
            &[
                ("selector", "snapkv"),
                ("merge", "values"),
                ("damp", "1"),
                ("cap", "100"),
            ],
        ),
        (
            "kvmerger+",
            &[("selector", "snapkv"), ("merge", "values"), ("damp", "0")],
        ),
        (
            "kvmerger+",
            &[
                ("selector", "snapkv"),
                ("merge", "values"),
                ("epsilon", "0.75"),
            ],
        ),
        ("kvmerger+", &[("selector", "snapkv")]),
        ("kvmerger", &[("heavy", "0")]),
    ];
    println!("{n} slots x {DIM} dims, rho {rho}; mean relative error of {FUTURE} future queries' attention output, 3 heads");
    let budgets = [n / 2, n * 35 / 100, n / 10];
    print!("{:<32}", "method");
    for b in budgets {
        print!(" {:>14}", format!("budget {b}"));
    }
    println!();
    for (name, pairs) in variants {
        let (method, label) = common::variant(name, pairs);
        print!("{label:<32}");
        for budget in budgets {
            let mut err = 0.0;
            let mut size = 0;
            for sim in &sims {
                let out = method
                    .compress(HeadInput {
                        data: &sim.data,
                        stats: &sim.stats,
                        pos,
                        budget,
                    })
                    .unwrap();
                size += out.len();
                err += error(sim, &out);
            }
            let cell = if size > budget * sims.len() {
                format!("{:.4} ({})", err / sims.len() as f64, size / sims.len())
            } else {
                format!("{:.4}", err / sims.len() as f64)
            };
            print!(" {cell:>14}");
        }
        println!();
    }
}
