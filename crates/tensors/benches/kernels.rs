//! Hot kernels of the forward pass: one-token quantized matrix-vector products per
//! weight format (exact f32 activations, balanced 16-bit fixed-point activations, and
//! the fast 8-bit path), and decoding attention over 1k, 4k and 16k cached slots (f16
//! and q8_0).
//!
//! `cargo bench -p kvmerger-tensors --bench kernels` (add a filter to run a subset).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kvmerger_compression::{HeadStore, KvDtype, SlotMeta};
use kvmerger_tensors::attention::{attend, LayerAttn, StatsRequest};
use kvmerger_tensors::precision::{matmul_balanced, matmul_exact};
use kvmerger_tensors::quant::{GgmlType, QMatrix};
use std::hint::black_box;

fn values(n: usize, salt: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (((i * 7919 + salt * 104_729) % 1013) as f32 / 1013.0 - 0.5) * 2.0)
        .collect()
}

/// qwen2.5-0.5b's FFN down-projection shape (4864 -> 896; K-quants need a multiple
/// of 256 columns), one token.
fn matvec(c: &mut Criterion) {
    let (rows, cols) = (896, 4864);
    let w = values(rows * cols, 1);
    let x = values(cols, 2);
    let mut g = c.benchmark_group("matvec_896x4864");
    for ty in [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
    ] {
        let m = QMatrix::quantize(ty, rows, cols, &w);
        g.throughput(Throughput::Bytes(m.bytes() as u64));
        let mut out = vec![0.0f32; rows];
        g.bench_function(BenchmarkId::new("exact", ty.name()), |b| {
            b.iter(|| matmul_exact(&m, black_box(&x), 1, &mut out))
        });
        g.bench_function(BenchmarkId::new("balanced", ty.name()), |b| {
            b.iter(|| matmul_balanced(&m, black_box(&x), 1, &mut out))
        });
        g.bench_function(BenchmarkId::new("fast", ty.name()), |b| {
            b.iter(|| m.matmul(black_box(&x), 1, &mut out))
        });
    }
    g.finish();
}

/// One decoding step of one layer with qwen2.5-0.5b's attention geometry
/// (14 query heads, 2 KV heads, 64 dimensions).
fn decode_attention(c: &mut Criterion) {
    let (n_heads, n_kv, d) = (14, 2, 64);
    let p = LayerAttn {
        n_heads,
        n_kv_heads: n_kv,
        head_dim: d,
        scale: 0.125,
        window: None,
    };
    let mut g = c.benchmark_group("decode_attention");
    for dtype in [KvDtype::F16, KvDtype::Q8_0] {
        for n in [1024usize, 4096, 16384] {
            let stores: Vec<HeadStore> = (0..n_kv)
                .map(|h| {
                    let mut s = HeadStore::with_capacity(d, dtype, n);
                    let k = values(n * d, 3 + h);
                    let v = values(n * d, 5 + h);
                    for j in 0..n {
                        s.push(
                            &k[j * d..(j + 1) * d],
                            &v[j * d..(j + 1) * d],
                            SlotMeta::token(j as u32),
                        );
                    }
                    s
                })
                .collect();
            let q = values(n_heads * d, 7);
            let pos = [(n - 1) as u32];
            let mut out = vec![0.0f32; n_heads * d];
            g.throughput(Throughput::Elements(n as u64));
            g.bench_function(BenchmarkId::new(format!("{dtype:?}"), n), |b| {
                b.iter(|| {
                    attend(
                        p,
                        &stores,
                        black_box(&q),
                        1,
                        &pos,
                        StatsRequest::default(),
                        &mut out,
                    )
                })
            });
        }
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).warm_up_time(std::time::Duration::from_millis(500)).measurement_time(std::time::Duration::from_secs(2));
    targets = matvec, decode_attention
}
criterion_main!(benches);
