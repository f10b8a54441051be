//! KVMerger compressing one (layer, KV head) of 4k and 16k slots to 35%, with the
//! accumulated-attention statistic it reads (H2O-style heavy hitters + merging).
//!
//! `cargo bench -p kvmerger-compression --bench compression`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kvmerger_compression::{registry, HeadData, HeadInput, HeadPos, HeadStats, Options, SlotMeta};
use std::hint::black_box;

/// Keys that drift slowly along the sequence (neighbours are similar, as after RoPE on
/// real text), so merge sets are not trivially empty.
fn head(n: usize, d: usize) -> HeadData {
    let mut h = HeadData::new(d);
    for j in 0..n {
        let k: Vec<f32> = (0..d)
            .map(|c| (j as f32 * 0.01 + c as f32 * 0.7).sin() + ((j * 31 + c) % 17) as f32 * 0.02)
            .collect();
        let v: Vec<f32> = (0..d)
            .map(|c| ((j * 13 + c * 5) % 29) as f32 * 0.1 - 1.4)
            .collect();
        let mut m = SlotMeta::token(j as u32);
        m.score = 1.0 / (1.0 + (j % 97) as f32) + if j % 211 == 0 { 5.0 } else { 0.0 };
        h.push(&k, &v, m);
    }
    h
}

fn kvmerger(c: &mut Criterion) {
    let method = registry::build("kvmerger", &Options::new()).unwrap();
    let mut g = c.benchmark_group("kvmerger_35pct");
    for n in [4096usize, 16384] {
        let data = head(n, 64);
        let stats = HeadStats {
            accumulated: Some(data.meta.iter().map(|m| m.score).collect()),
            ..Default::default()
        };
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter(|| {
                method
                    .compress(HeadInput {
                        data: black_box(&data),
                        stats: &stats,
                        pos: HeadPos::SINGLE,
                        budget: n * 35 / 100,
                    })
                    .unwrap()
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).warm_up_time(std::time::Duration::from_millis(500)).measurement_time(std::time::Duration::from_secs(3));
    targets = kvmerger
}
criterion_main!(benches);
