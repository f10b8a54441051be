//! `kvmerger bench`: prompt processing and generation speed, and peak memory.

use crate::cli::BenchArgs;
use crate::shared::session::load_model;
use anyhow::{bail, Result};
use kvmerger_engine::compressor::Compressor;
use kvmerger_engine::sampling::argmax;
use kvmerger_engine::sequence::Sequence;
use std::sync::Arc;
use std::time::Instant;

/// Peak resident memory of this process, from /proc (0 where unavailable).
pub fn peak_rss_bytes() -> u64 {
    proc_status_bytes("VmHWM:")
}

/// Resident memory of this process now, from /proc (0 where unavailable).
pub fn rss_bytes() -> u64 {
    proc_status_bytes("VmRSS:")
}

/// A size in /proc/self/status (the line starting with `field`, in kB), in bytes; 0
/// where unavailable.
fn proc_status_bytes(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Decode steps run before generation is timed.
const WARM_UP_STEPS: usize = 4;

/// Bytes per second a plain read of a buffer far larger than the caches reaches on
/// `threads` threads (the best of three passes over 512 MiB): the ceiling of a
/// memory-bound decode step.
pub fn read_bandwidth(threads: usize) -> f64 {
    use rayon::prelude::*;
    const WORDS: usize = 64 << 20;
    let buf: Vec<u64> = (0..WORDS as u64).collect();
    let chunk = WORDS.div_ceil(threads.max(1));
    let mut best = f64::INFINITY;
    let mut total = 0u64;
    for _ in 0..3 {
        let t0 = Instant::now();
        total = total.wrapping_add(
            buf.par_chunks(chunk)
                .map(|c| {
                    // Four independent sums, so the loop is bound by loads, not by
                    // one long chain of additions.
                    let mut s = [0u64; 4];
                    for w in c.chunks_exact(4) {
                        for (a, &x) in s.iter_mut().zip(w) {
                            *a = a.wrapping_add(x);
                        }
                    }
                    s.iter().fold(0u64, |a, &b| a.wrapping_add(b))
                })
                .reduce(|| 0, u64::wrapping_add),
        );
        best = best.min(t0.elapsed().as_secs_f64());
    }
    std::hint::black_box(total);
    (WORDS * 8) as f64 / best
}

/// Deterministic prompt tokens spread over the vocabulary (like llama-bench's).
fn bench_tokens(n: usize, vocab: usize, salt: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((i * 7919 + salt * 104729 + 13) % (vocab - 1)) as u32 + 1)
        .collect()
}

pub fn run(a: BenchArgs, dir: &std::path::Path) -> Result<()> {
    if a.pp == 0 && a.tg == 0 && a.fidelity == 0 {
        bail!("nothing to measure: --pp, --tg and --fidelity are all 0");
    }
    let (lm, dtype) = load_model(&a.model, dir)?;
    let m = &lm.model;
    let vocab = m.cfg.vocab.min(lm.tokenizer.vocab_size());
    check_context(&a, m)?;
    let threads = rayon::current_num_threads();
    print_header(&lm, dtype, threads);
    let reps = a.reps.max(1);
    let comp = crate::shared::recipe::build(&a.compress)?;
    if comp.compresses_during_prefill() {
        return prefill_within(&a, &lm, dtype, &comp, vocab);
    }
    if !comp.is_noop() {
        run_compressed(&a, &lm, dtype, &comp, vocab)?;
        return fidelity(&a, &lm, dtype, &comp);
    }
    if a.pp > 0 {
        bench_prefill(&a, m, dtype, vocab, reps)?;
    }
    let mut bandwidth = None;
    if a.tg > 0 {
        bandwidth = Some(bench_generation(&a, m, dtype, vocab, reps)?);
    }
    print_memory_and_bandwidth(m, bandwidth, threads);
    fidelity(&a, &lm, dtype, &comp)
}

/// Refuses, before any work, a run that would pass the model's context midway.
fn check_context(a: &BenchArgs, m: &kvmerger_engine::model::Model) -> Result<()> {
    // Saturating: a count of 2^64 - 1 is refused, not wrapped into a small one.
    let longest =
        a.pp.max(a.ctx)
            .max(16)
            .saturating_add(a.tg.max(a.fidelity))
            .saturating_add(if a.tg > 0 { WARM_UP_STEPS } else { 0 });
    if longest > m.cfg.ctx_len {
        bail!(
            "--pp/--ctx ({}) plus --tg/--fidelity ({}) is {longest} tokens, past the model's context of {} tokens",
            a.pp.max(a.ctx),
            a.tg.max(a.fidelity),
            m.cfg.ctx_len
        );
    }
    Ok(())
}

/// Prints the model line and the header of the speed table.
fn print_header(
    lm: &kvmerger_engine::load::LoadedModel,
    dtype: kvmerger_compression::KvDtype,
    threads: usize,
) {
    let m = &lm.model;
    println!(
        "model {} ({}, {} layers, weights {:.1} MiB), threads {threads}, KV {:?}, precision {:?}, kernels {}",
        lm.name,
        m.cfg.arch.name(),
        m.cfg.n_layers,
        m.weight_bytes() as f64 / (1 << 20) as f64,
        dtype,
        m.precision,
        kvmerger_engine::kernels::Family::active().name()
    );
    println!("| test | tokens | seconds | tok/s |");
    println!("|---|---|---|---|");
}

/// Times `pp` prompt tokens fed uncompressed, best of `reps`, and prints the pp row.
fn bench_prefill(
    a: &BenchArgs,
    m: &kvmerger_engine::model::Model,
    dtype: kvmerger_compression::KvDtype,
    vocab: usize,
    reps: usize,
) -> Result<()> {
    let mut best = f64::INFINITY;
    for r in 0..reps {
        let toks = bench_tokens(a.pp, vocab, r);
        let mut seq = Sequence::uncompressed(m, dtype);
        best = best.min(seq.feed(m, &toks)?);
    }
    println!(
        "| pp{} | {} | {:.3} | {:.1} |",
        a.pp,
        a.pp,
        best,
        a.pp as f64 / best
    );
    Ok(())
}

/// Times `tg` uncompressed generation steps, best of `reps`, prints the tg row and
/// returns the average KV bytes read per step and the tokens per second.
fn bench_generation(
    a: &BenchArgs,
    m: &kvmerger_engine::model::Model,
    dtype: kvmerger_compression::KvDtype,
    vocab: usize,
    reps: usize,
) -> Result<(usize, f64)> {
    let mut best = f64::INFINITY;
    let mut kv_read = 0usize;
    for r in 0..reps {
        let mut seq = Sequence::uncompressed(m, dtype);
        let ctx = a.ctx.max(1);
        seq.feed(m, &bench_tokens(ctx, vocab, r + 100))?;
        // Untimed steps first: the first steps after loading pay for weights
        // not yet in memory (one run measured 10.6 tok/s, the next 18.1).
        for _ in 0..WARM_UP_STEPS {
            let next = argmax(seq.logits()) as u32;
            seq.step(m, next)?;
        }
        let kv_start = seq.kv_bytes();
        let t0 = Instant::now();
        for _ in 0..a.tg {
            let next = argmax(seq.logits()) as u32;
            seq.step(m, next)?;
        }
        best = best.min(t0.elapsed().as_secs_f64());
        // Each step reads the whole cache: on average its size half-way.
        kv_read = (kv_start + seq.kv_bytes()) / 2;
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
    Ok((kv_read, a.tg as f64 / best))
}

/// Prints peak resident memory, then the generation's read bandwidth against a read loop's.
fn print_memory_and_bandwidth(
    m: &kvmerger_engine::model::Model,
    bandwidth: Option<(usize, f64)>,
    threads: usize,
) {
    println!(
        "peak resident memory: {:.1} MiB",
        peak_rss_bytes() as f64 / (1 << 20) as f64
    );
    // After the memory reading: the read loop's buffer would count in it.
    if let Some((kv_read, tok_s)) = bandwidth {
        let per_token = m.weight_bytes_per_token() + kv_read;
        let achieved = per_token as f64 * tok_s;
        let loop_rate = read_bandwidth(threads);
        println!(
            "generation reads {:.1} MiB per token (weights {:.1}, KV cache {:.1}): {:.2} GB/s, \
             {:.0}% of a {threads}-thread read loop's {:.2} GB/s",
            per_token as f64 / (1 << 20) as f64,
            m.weight_bytes_per_token() as f64 / (1 << 20) as f64,
            kv_read as f64 / (1 << 20) as f64,
            achieved / 1e9,
            100.0 * achieved / loop_rate,
            loop_rate / 1e9
        );
    }
}

/// Compression during prefill: `pp` tokens fed in chunks, each followed by compression
/// back to the budget; reports the prefill speed, the peak KV bytes against the
/// budget-plus-chunk bound and the full cache, peak resident memory, then generation
/// from the compressed cache.
fn prefill_within(
    a: &BenchArgs,
    lm: &kvmerger_engine::load::LoadedModel,
    dtype: kvmerger_compression::KvDtype,
    comp: &Arc<Compressor>,
    vocab: usize,
) -> Result<()> {
    use crate::shared::recipe::mib;
    let m = &lm.model;
    let pp = a.pp.max(a.ctx).max(1);
    let chunk = comp.prefill_chunk.unwrap_or(pp);
    let toks = bench_tokens(pp, vocab, 0);
    let mut seq = Sequence::new(m, dtype, comp.clone());
    let done = seq.feed_context(lm, &toks)?;
    let (secs, report) = (done.prefill_s, done.compress);
    println!(
        "| pp{pp}, {} during prefill (chunks of {chunk}) | {pp} | {secs:.3} | {:.1} |",
        comp.name(),
        pp as f64 / secs
    );
    let slot = seq.cache.slot_bytes();
    let bound =
        kvmerger_engine::compressor::estimate(comp, pp, 0, m.cfg.n_layers, m.cfg.n_kv_heads, slot)
            .prefill_peak;
    let full = pp * seq.cache.token_bytes();
    let prefill_rss = peak_rss_bytes();
    if a.tg > 0 {
        decode_row(m, &mut seq, a.tg, &format!("ctx {pp}, compressed"))?;
    }
    println!(
        "KV cache: peak {:.2} MiB during prefill (bound budget + one chunk: {:.2} MiB; the full cache would be {:.2} MiB), {:.2} MiB after ({} compression passes, {:.1} ms, {:.2}% of prefill)",
        mib(seq.peak_kv_bytes()),
        mib(bound),
        mib(full),
        mib(report.bytes_after),
        seq.prefill_passes(),
        report.secs * 1e3,
        100.0 * report.secs / secs.max(1e-9)
    );
    println!(
        "peak resident memory: {:.1} MiB after prefill, {:.1} MiB at the end",
        prefill_rss as f64 / (1 << 20) as f64,
        peak_rss_bytes() as f64 / (1 << 20) as f64
    );
    Ok(())
}

/// Generate `tg` greedy tokens from `seq` (re-compressing past its recipe's margin),
/// print the table row `tg<tg> @ <label>`, and return the tokens per second.
fn decode_row(
    m: &kvmerger_engine::model::Model,
    seq: &mut Sequence,
    tg: usize,
    label: &str,
) -> Result<f64> {
    let t0 = Instant::now();
    for _ in 0..tg {
        let next = argmax(seq.logits()) as u32;
        seq.step(m, next)?;
    }
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "| tg{tg} @ {label} | {tg} | {secs:.3} | {:.1} |",
        tg as f64 / secs
    );
    Ok(tg as f64 / secs)
}

/// `KL(p || q)` of two logit rows, and whether their top tokens agree.
fn kl_logits(p: &[f32], q: &[f32]) -> (f64, bool) {
    let logsoftmax = |x: &[f32]| -> Vec<f64> {
        let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let z = x.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln() + m;
        x.iter().map(|&v| v as f64 - z).collect()
    };
    let (lp, lq) = (logsoftmax(p), logsoftmax(q));
    let kl = lp
        .iter()
        .zip(&lq)
        .map(|(a, b)| a.exp() * (a - b))
        .sum::<f64>();
    (kl.max(0.0), argmax(p) == argmax(q))
}

/// Fidelity of this run's cache (KV dtype and compression) against a full f16 cache.
fn fidelity(
    a: &BenchArgs,
    lm: &kvmerger_engine::load::LoadedModel,
    dtype: kvmerger_compression::KvDtype,
    comp: &Arc<Compressor>,
) -> Result<()> {
    use kvmerger_compression::KvDtype;
    if a.fidelity == 0 {
        return Ok(());
    }
    let m = &lm.model;
    let n = a.pp.max(a.ctx).max(16);
    let text = match &a.prompt_file {
        Some(p) => crate::shared::text::read_text(p, "prompt file")?,
        None => crate::shared::text::haystack(n + 64, 0.4, "Lisbon"),
    };
    let mut toks = lm.tokenizer.encode(&text, true)?;
    while toks.len() < n {
        let again = toks.clone();
        toks.extend_from_slice(&again);
    }
    toks.truncate(n);
    let mut full = Sequence::uncompressed(m, KvDtype::F16);
    full.feed(m, &toks)?;
    let mut seq = Sequence::new(m, dtype, comp.clone());
    seq.feed(m, &toks)?;
    seq.compress(lm)?;
    let (bytes_full, bytes) = (full.kv_bytes(), seq.kv_bytes());
    let (mut sum, mut worst, mut agree) = (0.0f64, 0.0f64, 0usize);
    for _ in 0..a.fidelity {
        let (kl, same) = kl_logits(full.logits(), seq.logits());
        sum += kl;
        worst = worst.max(kl);
        agree += same as usize;
        let next = argmax(full.logits()) as u32;
        full.step(m, next)?;
        seq.step(m, next)?;
    }
    println!(
        "fidelity vs full f16 cache ({n}-token prompt, {} steps): mean KL {:.5} nats, max KL {:.5}, top-1 agreement {:.3}; KV bytes {:.3}x full f16 ({:?}, {})",
        a.fidelity,
        sum / a.fidelity as f64,
        worst,
        agree as f64 / a.fidelity as f64,
        bytes as f64 / bytes_full as f64,
        dtype,
        comp.name()
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
    comp: &Arc<Compressor>,
    vocab: usize,
) -> Result<()> {
    use crate::shared::recipe::mib;
    let m = &lm.model;
    let pp = a.pp.max(a.ctx).max(1);
    let toks = bench_tokens(pp, vocab, 0);
    let mut seq = Sequence::new(m, dtype, comp.clone());
    let prefill = seq.feed(m, &toks)?;
    println!(
        "| pp{pp} (collecting {}) | {pp} | {prefill:.3} | {:.1} |",
        comp.needs(),
        pp as f64 / prefill
    );
    // The same context uncompressed, for the speed ratio (timed on a copy, dropped
    // before the memory readings).
    let uncompressed = || -> Result<Sequence> {
        let mut full = seq.clone();
        full.set_compressor(Arc::new(Compressor::none()))?;
        Ok(full)
    };
    let full_speed = if a.tg > 0 {
        Some(decode_row(
            m,
            &mut uncompressed()?,
            a.tg,
            &format!("ctx {pp}, full cache"),
        )?)
    } else {
        None
    };
    // The uncompressed sequence, kept for the batched comparison only.
    let full_prompt = if a.tg > 0 && a.batch > 1 {
        Some(uncompressed()?)
    } else {
        None
    };
    let secs = seq.score(lm)?;
    if secs > 0.0 {
        println!(
            "| reconstruction pass ({}) | {pp} | {secs:.3} | {:.2}x prefill |",
            comp.name(),
            secs / prefill
        );
    }
    let rss_before = rss_bytes();
    let report = seq.compress(lm)?;
    let rss_after = rss_bytes();
    println!(
        "| compress {} | {pp} | {:.4} | {:.2}% of prefill |",
        comp.name(),
        report.secs,
        100.0 * report.secs / prefill
    );
    let compressed_prompt = (a.tg > 0 && a.batch > 1).then(|| seq.clone());
    if a.tg > 0 {
        let speed = decode_row(m, &mut seq, a.tg, &format!("ctx {pp}, compressed"))?;
        if let Some(full) = full_speed {
            println!(
                "compressed / full-cache generation speed: {:.2}x; KV bytes {:.3}x the uncompressed cache",
                speed / full,
                report.ratio()
            );
        }
    }
    if let (Some(full), Some(compressed)) = (&full_prompt, &compressed_prompt) {
        batched(a, m, full, compressed)?;
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

/// Generation throughput of `a.batch` sequences decoded together, each from its own copy
/// of the prompt's cache: uncompressed (`full`), then compressed (`compressed`). Every
/// step is one batched forward pass: the weights are read once per step for all the
/// sequences, while each sequence's attention reads its own cache, so the share of
/// time that compression can save grows with the batch.
fn batched(
    a: &BenchArgs,
    m: &kvmerger_engine::model::Model,
    full: &Sequence,
    compressed: &Sequence,
) -> Result<()> {
    let n = a.batch as usize;
    let mut speeds = Vec::new();
    for (label, base) in [("full cache", full), ("compressed", compressed)] {
        let mut seqs: Vec<_> = (0..n).map(|_| base.clone()).collect();
        let t0 = Instant::now();
        for _ in 0..a.tg {
            let toks: Vec<[u32; 1]> = seqs.iter().map(|s| [argmax(s.logits()) as u32]).collect();
            let mut segs: Vec<_> = seqs
                .iter_mut()
                .zip(&toks)
                .map(|(s, t)| s.decode_segment(t))
                .collect();
            let out = m.forward_batch(&mut segs)?;
            drop(segs);
            for ((s, l), t) in seqs.iter_mut().zip(out).zip(&toks) {
                s.after_decode_step(t[0], l)?;
            }
        }
        let secs = t0.elapsed().as_secs_f64();
        let total = a.tg * n;
        println!(
            "| tg{} x batch {n} @ ctx {}, {label} | {total} | {secs:.3} | {:.1} |",
            a.tg,
            full.cache.n_seen,
            total as f64 / secs
        );
        speeds.push(total as f64 / secs);
    }
    println!(
        "batch of {n}: compressed / full-cache generation throughput: {:.2}x",
        speeds[1] / speeds[0]
    );
    Ok(())
}
