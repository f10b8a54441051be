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

/// Resident memory of this process now, from /proc (0 where unavailable).
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Deterministic prompt tokens spread over the vocabulary (like llama-bench's).
fn bench_tokens(n: usize, vocab: usize, salt: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((i * 7919 + salt * 104729 + 13) % (vocab - 1)) as u32 + 1)
        .collect()
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
    let comp = crate::compress::build(&a.compress)?;
    if !comp.is_noop() {
        return run_compressed(&a, &lm, dtype, &comp, vocab);
    }
    if a.pp > 0 {
        let mut best = f64::INFINITY;
        for r in 0..reps {
            let toks = bench_tokens(a.pp, vocab, r);
            let mut cache = m.new_cache(dtype);
            let t0 = Instant::now();
            m.forward(&toks, &mut cache, StatsNeeds::default(), None, Logits::Last)?;
            best = best.min(t0.elapsed().as_secs_f64());
        }
        println!(
            "| pp{} | {} | {:.3} | {:.1} |",
            a.pp,
            a.pp,
            best,
            a.pp as f64 / best
        );
    }
    if a.tg > 0 {
        let mut best = f64::INFINITY;
        for r in 0..reps {
            let mut cache = m.new_cache(dtype);
            let ctx = a.ctx.max(1);
            let mut logits = m.forward(
                &bench_tokens(ctx, vocab, r + 100),
                &mut cache,
                StatsNeeds::default(),
                None,
                Logits::Last,
            )?;
            let t0 = Instant::now();
            for _ in 0..a.tg {
                let next = argmax(&logits) as u32;
                logits = m.forward(
                    &[next],
                    &mut cache,
                    StatsNeeds::default(),
                    None,
                    Logits::Last,
                )?;
            }
            best = best.min(t0.elapsed().as_secs_f64());
        }
        let label = if a.ctx > 0 {
            format!("tg{} @ ctx {}", a.tg, a.ctx)
        } else {
            format!("tg{}", a.tg)
        };
        println!(
            "| {label} | {} | {:.3} | {:.1} |",
            a.tg,
            best,
            a.tg as f64 / best
        );
    }
    println!(
        "peak resident memory: {:.1} MiB",
        peak_rss_bytes() as f64 / (1 << 20) as f64
    );
    Ok(())
}

/// With a compression method: prefill `pp` tokens, compress, then generate `tg` tokens
/// from the compressed cache; reports compression time against prefill time, and KV
/// bytes and resident memory before and after.
fn run_compressed(
    a: &BenchArgs,
    lm: &kvmerger_engine::load::LoadedModel,
    dtype: kvmerger_compression::KvDtype,
    comp: &kvmerger_engine::compress::Compressor,
    vocab: usize,
) -> Result<()> {
    use crate::compress::mib;
    use kvmerger_engine::cache::PrefillStats;
    use kvmerger_engine::compress::DecodeCompression;
    let m = &lm.model;
    let pp = a.pp.max(a.ctx).max(1);
    let toks = bench_tokens(pp, vocab, 0);
    let mut cache = m.new_cache(dtype);
    let mut stats = PrefillStats::default();
    let t0 = Instant::now();
    let mut logits = m.forward(
        &toks,
        &mut cache,
        comp.needs(),
        Some(&mut stats),
        Logits::Last,
    )?;
    let prefill = t0.elapsed().as_secs_f64();
    println!(
        "| pp{pp} (collecting {:?}) | {pp} | {prefill:.3} | {:.1} |",
        comp.needs(),
        pp as f64 / prefill
    );
    let rss_before = rss_bytes();
    let (report, targets) = comp.compress_prompt(&mut cache, &stats)?;
    drop(stats);
    let rss_after = rss_bytes();
    println!(
        "| compress {} | {pp} | {:.4} | {:.2}% of prefill |",
        comp.name(),
        report.secs,
        100.0 * report.secs / prefill
    );
    if a.tg > 0 {
        let mut dc = DecodeCompression::new(comp, targets);
        let t0 = Instant::now();
        for _ in 0..a.tg {
            let next = argmax(&logits) as u32;
            logits = m.forward(
                &[next],
                &mut cache,
                dc.needs(),
                Some(&mut dc.stats),
                Logits::Last,
            )?;
            dc.after_step(&mut cache)?;
        }
        let secs = t0.elapsed().as_secs_f64();
        println!(
            "| tg{} @ ctx {pp}, compressed | {} | {secs:.3} | {:.1} |",
            a.tg,
            a.tg,
            a.tg as f64 / secs
        );
    }
    println!(
        "KV cache {:.2} MiB -> {:.2} MiB ({:.1}%); resident memory {:.1} MiB -> {:.1} MiB (-{:.1} MiB)",
        mib(report.bytes_before),
        mib(report.bytes_after),
        100.0 * report.ratio(),
        rss_before as f64 / (1 << 20) as f64,
        rss_after as f64 / (1 << 20) as f64,
        (rss_before as f64 - rss_after as f64) / (1 << 20) as f64
    );
    let ratios: Vec<String> = report
        .layer_ratios()
        .iter()
        .map(|x| format!("{x:.2}"))
        .collect();
    println!("kept per layer: {}", ratios.join(" "));
    println!(
        "peak resident memory: {:.1} MiB",
        peak_rss_bytes() as f64 / (1 << 20) as f64
    );
    Ok(())
}
