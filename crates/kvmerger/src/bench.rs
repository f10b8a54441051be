//! `kvmerger bench`: prompt processing and generation speed, and peak memory.

use crate::cli::BenchArgs;
use crate::run::load_model;
use anyhow::{bail, Result};
use kvmerger_compression::StatsNeeds;
use kvmerger_engine::model::Logits;
use kvmerger_engine::sampling::argmax;
use std::time::Instant;

/// Peak resident memory of this process, from /proc (0 where unavailable).
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Deterministic prompt tokens spread over the vocabulary (like llama-bench's).
fn bench_tokens(n: usize, vocab: usize, salt: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7919 + salt * 104729 + 13) % (vocab - 1)) as u32 + 1).collect()
}

pub fn run(a: BenchArgs, dir: &std::path::Path) -> Result<()> {
    if a.pp == 0 && a.tg == 0 {
        bail!("nothing to measure: --pp and --tg are both 0");
    }
    let (lm, dtype) = load_model(&a.model, dir)?;
    let m = &lm.model;
    let vocab = m.cfg.vocab.min(lm.tokenizer.vocab_size());
    let threads = rayon::current_num_threads();
    println!(
        "model {} ({}, {} layers, weights {:.1} MiB), threads {threads}, KV {:?}",
        lm.name,
        m.cfg.arch.name(),
        m.cfg.n_layers,
        m.weight_bytes() as f64 / (1 << 20) as f64,
        dtype
    );
    println!("| test | tokens | seconds | tok/s |");
    println!("|---|---|---|---|");
    let reps = a.reps.max(1);
    if a.pp > 0 {
        let mut best = f64::INFINITY;
        for r in 0..reps {
            let toks = bench_tokens(a.pp, vocab, r);
            let mut cache = m.new_cache(dtype);
            let t0 = Instant::now();
            m.forward(&toks, &mut cache, StatsNeeds::default(), None, Logits::Last)?;
            best = best.min(t0.elapsed().as_secs_f64());
        }
        println!("| pp{} | {} | {:.3} | {:.1} |", a.pp, a.pp, best, a.pp as f64 / best);
    }
    if a.tg > 0 {
        let mut best = f64::INFINITY;
        for r in 0..reps {
            let mut cache = m.new_cache(dtype);
            let ctx = a.ctx.max(1);
            let mut logits = m.forward(&bench_tokens(ctx, vocab, r + 100), &mut cache, StatsNeeds::default(), None, Logits::Last)?;
            let t0 = Instant::now();
            for _ in 0..a.tg {
                let next = argmax(&logits) as u32;
                logits = m.forward(&[next], &mut cache, StatsNeeds::default(), None, Logits::Last)?;
            }
            best = best.min(t0.elapsed().as_secs_f64());
        }
        let label = if a.ctx > 0 { format!("tg{} @ ctx {}", a.tg, a.ctx) } else { format!("tg{}", a.tg) };
        println!("| {label} | {} | {:.3} | {:.1} |", a.tg, best, a.tg as f64 / best);
    }
    println!("peak resident memory: {:.1} MiB", peak_rss_bytes() as f64 / (1 << 20) as f64);
    Ok(())
}
