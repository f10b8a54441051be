//! `kvmerger demo`: one long prompt with a fact buried in it, prefilled once, then
//! answered from the full cache and from each compressed copy of it, side by side.

use crate::cli::DemoArgs;
use crate::compress::mib;
use crate::run::load_model;
use anyhow::{bail, Result};
use kvmerger_compression::{Budget, Options, Schedule, StatsNeeds};
use kvmerger_engine::cache::PrefillStats;
use kvmerger_engine::chat::Message;
use kvmerger_engine::compress::{Compressor, DecodeCompression};
use kvmerger_engine::generate::{decode_with, GenerateParams};
use kvmerger_engine::model::Logits;
use std::time::Instant;

const FILLER: &str =
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ";
const CITIES: &[&str] = &[
    "Lisbon",
    "Nairobi",
    "Osaka",
    "Montreal",
    "Krakow",
    "Santiago",
    "Hanoi",
    "Reykjavik",
    "Marrakesh",
    "Tbilisi",
];

/// A user message of about `tokens` tokens of filler with one fact at `depth`, and the
/// question about it.
pub fn haystack(tokens: usize, depth: f64, city: &str) -> String {
    // One filler group is about 25 tokens in BPE vocabularies.
    let reps = (tokens / 25).max(2);
    let at = ((reps as f64) * depth.clamp(0.0, 1.0)).round() as usize;
    let mut s = String::new();
    for i in 0..reps {
        if i == at {
            s.push_str(&format!(
                "The secret city is {city}. Remember it: the secret city is {city}. "
            ));
        }
        s.push_str(FILLER);
    }
    s.push_str("\n\nQuestion: What is the secret city?");
    s
}

pub fn run(a: DemoArgs, dir: &std::path::Path) -> Result<()> {
    if !(0.0..=1.0).contains(&a.depth) {
        bail!("--depth must be between 0 and 1");
    }
    if a.length < 64 {
        bail!("--length must be at least 64 tokens");
    }
    let mut runs: Vec<(String, Compressor)> = vec![("full".into(), Compressor::full())];
    for b in &a.budgets {
        let budget: Budget = b.parse()?;
        for m in &a.methods {
            runs.push((
                format!("{m} @ {budget}"),
                Compressor::new(m, &Options::new(), budget, Schedule::Uniform)?,
            ));
        }
    }
    let (lm, dtype) = load_model(&a.model, dir)?;
    let city = CITIES[(a.seed % CITIES.len() as u64) as usize];
    let text = haystack(a.length, a.depth, city);
    let prompt = lm.template.render(&[Message::new("user", &text)], true)?;
    let ids = lm.tokenizer.encode(&prompt, true)?;
    if ids.len() >= lm.model.cfg.ctx_len {
        bail!(
            "a prompt of {} tokens does not fit the context of {}",
            ids.len(),
            lm.model.cfg.ctx_len
        );
    }
    let needs = runs
        .iter()
        .fold(StatsNeeds::default(), |n, (_, c)| n.union(c.needs()));
    eprintln!(
        "prefilling {} tokens once (the fact {city:?} at depth {:.0}%)...",
        ids.len(),
        a.depth * 100.0
    );
    let mut base = lm.model.new_cache(dtype);
    let mut stats = PrefillStats::default();
    let t0 = Instant::now();
    let logits = lm
        .model
        .forward(&ids, &mut base, needs, Some(&mut stats), Logits::Last)?;
    let prefill = t0.elapsed().as_secs_f64();
    let params = GenerateParams {
        max_tokens: a.max_tokens,
        stop: vec!["\n\n".into()],
        ..Default::default()
    };

    println!(
        "model {}, prompt {} tokens, prefill {:.2}s, secret city {city}\n",
        lm.name,
        ids.len(),
        prefill
    );
    println!("| method | answer | correct | KV cache | kept | compress | decode |");
    println!("|---|---|---|---|---|---|---|");
    for (label, comp) in &runs {
        let mut cache = base.clone();
        let mut dc = None;
        let mut secs = 0.0;
        if !comp.is_noop() {
            let (r, targets) = comp.compress_prompt(&mut cache, &stats)?;
            secs = r.secs;
            dc = Some(DecodeCompression::new(comp, targets));
        }
        let kept = cache.bytes();
        let gen = decode_with(
            &lm.model,
            &lm.tokenizer,
            &mut cache,
            logits.clone(),
            &ids,
            &params,
            dc.as_mut(),
            &mut |_| true,
        )?;
        let answer = gen.text.trim().replace('|', "/");
        println!(
            "| {label} | {answer} | {} | {:.2} MiB | {:.0}% | {:.1} ms | {:.2}s |",
            if answer.contains(city) { "yes" } else { "no" },
            mib(kept),
            100.0 * kept as f64 / base.bytes() as f64,
            secs * 1e3,
            gen.decode_secs
        );
    }
    Ok(())
}
