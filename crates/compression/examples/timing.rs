//! Hand-run timing check (not a test): how long each method takes to compress one head
//! of 4096 slots x 64 dimensions, and what that makes for a 30-layer, 3-KV-head model.
//!
//! ```text
//! cargo run --release -p kvmerger-compression --example timing [slots] [dim]
//! ```

mod common;

use kvmerger_compression::{HeadData, HeadInput, HeadStats, SlotMeta};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::time::Instant;

fn head(n: usize, dim: usize) -> (HeadData, HeadStats) {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut normal = move || common::normal(&mut rng);
    let mut data = HeadData::new(dim);
    let mut key: Vec<f32> = (0..dim).map(|_| normal()).collect();
    for i in 0..n {
        for x in key.iter_mut() {
            *x = 0.9 * *x + 0.436 * normal();
        }
        let value: Vec<f32> = (0..dim).map(|_| normal()).collect();
        data.push(&key, &value, SlotMeta::token(i as u32));
    }
    let scores =
        |normal: &mut dyn FnMut() -> f32| (0..n).map(|_| normal().exp()).collect::<Vec<f32>>();
    let stats = HeadStats {
        accumulated: Some(scores(&mut normal)),
        window: Some(scores(&mut normal)),
        last: Some(scores(&mut normal)),
        reconstruction: Some(scores(&mut normal)),
        ..Default::default()
    };
    (data, stats)
}

/// CPU time of the whole process (all threads) so far, where /proc tells it: on a
/// shared machine, wall time also counts the time other processes held the cores.
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0) // USER_HZ is 100 on Linux
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let n = args.first().copied().unwrap_or(4096);
    let dim = args.get(1).copied().unwrap_or(64);
    let (data, stats) = head(n, dim);
    let pos = common::mid_layer(3);
    let variants: &[(&str, &[(&str, &str)])] = &[
        ("kvmerger", &[]),
        ("kvmerger", &[("mode", "paper")]),
        ("kvmerger", &[("chain", "first")]),
        ("kvmerger+", &[]),
        ("kvmerger+", &[("merge", "values")]),
        ("h2o", &[]),
        ("snapkv", &[]),
        ("pyramidkv", &[]),
        ("streaming", &[]),
        ("tova", &[]),
        ("knorm", &[]),
        ("random", &[]),
        ("cam", &[]),
        ("d2o", &[]),
    ];
    println!("one head of {n} slots x {dim} dims; model = 30 layers x 3 KV heads = 90 heads");
    println!(
        "{:<34} {:>7} {:>12} {:>12} {:>12}",
        "method", "budget", "ms/head", "ms/model", "cpu ms/head"
    );
    for budget in [n / 2, n * 35 / 100] {
        for (name, pairs) in variants {
            let (method, label) = common::variant(name, pairs);
            let input = HeadInput {
                data: &data,
                stats: &stats,
                pos,
                budget,
            };
            std::hint::black_box(method.compress(input).unwrap()); // warm-up
            let mut times = Vec::new();
            let (start, cpu_start) = (Instant::now(), cpu_seconds());
            while times.len() < 15 || start.elapsed().as_secs_f64() < 0.5 {
                let t = Instant::now();
                std::hint::black_box(method.compress(input).unwrap());
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
            let cpu = cpu_seconds()
                .zip(cpu_start)
                .map(|(b, a)| (b - a) * 1e3 / times.len() as f64);
            times.sort_by(f64::total_cmp);
            let median = times[times.len() / 2];
            let cpu = cpu.map_or("-".to_string(), |c| format!("{c:.3}"));
            println!(
                "{label:<34} {budget:>7} {median:>12.3} {:>12.1} {cpu:>12}",
                median * 90.0
            );
        }
    }
}
