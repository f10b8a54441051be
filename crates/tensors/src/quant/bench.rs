//! Hand-run timings on real weights: `cargo test --release quant::bench -- --ignored --nocapture`.

use super::*;
use crate::gguf::GgufFile;
use std::time::Instant;

fn time_it(mut f: impl FnMut(), min_secs: f64) -> f64 {
    f(); // warm up
    let mut best = f64::INFINITY;
    let start = Instant::now();
    let mut iters = 0;
    while iters < 3 || start.elapsed().as_secs_f64() < min_secs {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
        iters += 1;
    }
    best
}

/// CPU time of the calling thread (ns), from /proc (tick granularity: use long runs).
fn thread_cpu_ns() -> u64 {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    s.split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Seconds of CPU per call on a one-thread pool (robust to other load on the machine).
fn cpu_time_1thread(mut f: impl FnMut() + Send, min_secs: f64) -> f64 {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    pool.install(|| {
        f();
        let start = Instant::now();
        let c0 = thread_cpu_ns();
        let mut iters = 0u64;
        while iters < 3 || start.elapsed().as_secs_f64() < min_secs {
            f();
            iters += 1;
        }
        (thread_cpu_ns() - c0) as f64 / 1e9 / iters as f64
    })
}

fn bench_tensor(file: &GgufFile, name: &str, ns: &[usize]) {
    bench_matrix(name, &QMatrix::from_gguf(file, name).unwrap(), ns);
}

fn bench_matrix(name: &str, m: &QMatrix, ns: &[usize]) {
    for &n in ns {
        let x = tests::rand_vec(n * m.cols(), 3);
        let mut out = vec![0f32; n * m.rows()];
        let secs = time_it(|| m.matmul(&x, n, &mut out), 0.5);
        let cpu1 = cpu_time_1thread(|| m.matmul(&x, n, &mut out), 0.5);
        let flops = 2.0 * (m.rows() * m.cols() * n) as f64;
        println!(
            "{:<24} {:>4} [{:>6}x{:>5}] n={:<4} | {} threads: {:>9.1} us {:>6.1} GFLOP/s {:>5.1} GB/s | 1 thread (cpu time): {:>6.1} GFLOP/s {:>5.1} GB/s",
            name.trim_end_matches(".weight"),
            m.dtype().name(),
            m.rows(),
            m.cols(),
            n,
            rayon::current_num_threads(),
            secs * 1e6,
            flops / secs / 1e9,
            m.bytes() as f64 / secs / 1e9,
            flops / cpu1 / 1e9,
            m.bytes() as f64 / cpu1 / 1e9,
        );
    }
}

#[test]
#[ignore]
fn bench_real_weights() {
    let dir = kvmerger_assets::data_dir(None).join("models");
    println!("threads: {}", rayon::current_num_threads());
    // Memory bandwidth yardstick: sum 512 MiB with all threads.
    let big = vec![1u64; 64 << 20];
    let secs = time_it(
        || {
            let s: u64 = big
                .par_chunks(1 << 16)
                .map(|c| {
                    c.chunks_exact(8)
                        .fold([0u64; 8], |a, v| {
                            std::array::from_fn(|i| a[i].wrapping_add(v[i]))
                        })
                        .iter()
                        .sum::<u64>()
                })
                .sum();
            assert_eq!(s, 64 << 20);
        },
        0.5,
    );
    println!("memory read: {:.1} GB/s", (512 << 20) as f64 / secs / 1e9);
    drop(big);
    let f = GgufFile::open(&dir.join("smollm2-135m.gguf")).unwrap();
    for name in [
        "blk.0.ffn_up.weight",
        "blk.0.ffn_down.weight",
        "blk.0.attn_q.weight",
    ] {
        bench_tensor(&f, name, &[1, 64, 512]);
    }
    bench_tensor(&f, "token_embd.weight", &[1, 16]);
    // Float weights (safetensors models), from the dequantized Q4_1 values.
    let up = QMatrix::from_gguf(&f, "blk.0.ffn_up.weight").unwrap();
    let wf = up.to_f32();
    for ty in [GgmlType::F32, GgmlType::F16, GgmlType::BF16] {
        let m = QMatrix::quantize(ty, up.rows(), up.cols(), &wf);
        bench_matrix("ffn_up as float", &m, &[1, 64, 512]);
    }
    let f = GgufFile::open(&dir.join("qwen2.5-0.5b.gguf")).unwrap();
    for name in [
        "blk.0.ffn_up.weight",
        "blk.0.ffn_down.weight",
        "blk.11.ffn_down.weight",
        "blk.0.attn_v.weight",
    ] {
        bench_tensor(&f, name, &[1, 64, 512]);
    }
    bench_tensor(&f, "output.weight", &[1]);
}

/// A loop to profile by hand (`perf record`): `QBENCH=tensor:n:secs`.
#[test]
#[ignore]
fn profile_loop() {
    let spec =
        std::env::var("QBENCH").unwrap_or_else(|_| "smollm2-135m:blk.0.ffn_up.weight:64:3".into());
    let p: Vec<&str> = spec.split(':').collect();
    let f = GgufFile::open(
        &kvmerger_assets::data_dir(None)
            .join("models")
            .join(format!("{}.gguf", p[0])),
    )
    .unwrap();
    let m = QMatrix::from_gguf(&f, p[1]).unwrap();
    let n: usize = p[2].parse().unwrap();
    let secs: f64 = p[3].parse().unwrap();
    let x = tests::rand_vec(n * m.cols(), 3);
    let mut out = vec![0f32; n * m.rows()];
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let (cpu, best) = pool.install(|| {
        let start = Instant::now();
        let c0 = thread_cpu_ns();
        let mut iters = 0;
        let mut best = f64::INFINITY;
        while start.elapsed().as_secs_f64() < secs {
            let t = Instant::now();
            m.matmul(&x, n, &mut out);
            best = best.min(t.elapsed().as_secs_f64());
            iters += 1;
        }
        ((thread_cpu_ns() - c0) as f64 / 1e9 / iters as f64, best)
    });
    let fl = 2.0 * (m.rows() * m.cols() * n) as f64;
    println!(
        "{spec}: 1 thread: {:.1} GFLOP/s (mean cpu time), {:.1} GFLOP/s (best wall)",
        fl / cpu / 1e9,
        fl / best / 1e9
    );
}

/// All the weight matrices of a model's layers (and its output head), run in
/// order as a forward pass would, with `n` tokens: the matmul share of a
/// token's (or a prompt's) time. `QMODEL=name:n[,n...]`.
#[test]
#[ignore]
fn bench_model_matmuls() {
    let spec = std::env::var("QMODEL").unwrap_or_else(|_| "smollm2-135m:1,64,512".into());
    let (name, ns) = spec.split_once(':').unwrap();
    let f = GgufFile::open(
        &kvmerger_assets::data_dir(None)
            .join("models")
            .join(format!("{name}.gguf")),
    )
    .unwrap();
    let n_layers = f
        .u64(&format!(
            "{}.block_count",
            f.str("general.architecture").unwrap()
        ))
        .unwrap() as usize;
    let mut mats = Vec::new();
    for l in 0..n_layers {
        for t in [
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "ffn_gate",
            "ffn_up",
            "ffn_down",
        ] {
            mats.push(QMatrix::from_gguf(&f, &format!("blk.{l}.{t}.weight")).unwrap());
        }
    }
    let head = QMatrix::from_gguf(&f, "output.weight")
        .or_else(|_| QMatrix::from_gguf(&f, "token_embd.weight"))
        .unwrap();
    let bytes: usize = mats.iter().map(|m| m.bytes()).sum();
    let macs: usize = mats.iter().map(|m| m.rows() * m.cols()).sum();
    for n in ns.split(',').map(|v| v.parse::<usize>().unwrap()) {
        let max_cols = mats
            .iter()
            .map(|m| m.cols())
            .max()
            .unwrap()
            .max(head.cols());
        let max_rows = mats
            .iter()
            .map(|m| m.rows())
            .max()
            .unwrap()
            .max(head.rows());
        let x = tests::rand_vec(n * max_cols, 5);
        let mut out = vec![0f32; 4 * n * max_rows];
        // QMULTI=1: q/k/v and gate/up through matmul_multi.
        let multi = std::env::var_os("QMULTI").is_some();
        let run_layers = || {
            if multi {
                for l in mats.chunks(7) {
                    let xs = &x[..n * l[0].cols()];
                    let (qkv, rest) =
                        out.split_at_mut(n * (l[0].rows() + l[1].rows() + l[2].rows()));
                    let (q, kv) = qkv.split_at_mut(n * l[0].rows());
                    let (k, v) = kv.split_at_mut(n * l[1].rows());
                    QMatrix::matmul_multi(&[&l[0], &l[1], &l[2]], xs, n, &mut [q, k, v]);
                    l[3].matmul(&x[..n * l[3].cols()], n, &mut rest[..n * l[3].rows()]);
                    let (g, u) = out.split_at_mut(n * l[4].rows());
                    QMatrix::matmul_multi(
                        &[&l[4], &l[5]],
                        &x[..n * l[4].cols()],
                        n,
                        &mut [g, &mut u[..n * l[5].rows()]],
                    );
                    l[6].matmul(&x[..n * l[6].cols()], n, &mut out[..n * l[6].rows()]);
                }
            } else {
                for m in &mats {
                    m.matmul(&x[..n * m.cols()], n, &mut out[..n * m.rows()]);
                }
            }
        };
        // The head runs for the last token only.
        let mut hout = vec![0f32; head.rows()];
        let run_head = || head.matmul(&x[..head.cols()], 1, &mut hout);
        // QINSTALL=1: run on a pool thread, as a forward pass inside
        // `ThreadPool::install` would.
        let (layers, head_t) = if std::env::var_os("QINSTALL").is_some() {
            let pool = rayon::ThreadPoolBuilder::new().build().unwrap();
            pool.install(|| (time_it(run_layers, 1.0), time_it(run_head, 0.5)))
        } else {
            (time_it(run_layers, 1.0), time_it(run_head, 0.5))
        };
        let total = layers + head_t;
        println!(
            "{name} n={n:<4} layers: {:>8.2} ms ({:>6.1} GFLOP/s, {:>5.1} GB/s) + head {:>6.2} ms => {:>7.1} tok/s from matmuls alone",
            layers * 1e3,
            2.0 * (macs * n) as f64 / layers / 1e9,
            bytes as f64 / layers / 1e9,
            head_t * 1e3,
            n as f64 / total
        );
    }
}

/// Cost of one parallel split with no work in it.
#[test]
#[ignore]
fn bench_fork_join_overhead() {
    let f = || {
        for _ in 0..1000 {
            par_rows(1024, 4, 1 << 30, |r0, r1| {
                std::hint::black_box((r0, r1));
            });
        }
    };
    let outside = time_it(f, 1.0) / 1000.0;
    let pool = rayon::ThreadPoolBuilder::new().build().unwrap();
    let inside = pool.install(|| time_it(f, 1.0)) / 1000.0;
    println!(
        "fork-join: {:.1} us from outside the pool, {:.1} us inside",
        outside * 1e6,
        inside * 1e6
    );
}
