//! `kvmerger demo`: what compression is for. A long document with several facts buried
//! in it is read (prefilled) once; each method compresses it once, before any question
//! is seen; then every question is asked of the compressed document, appended
//! uncompressed. The table counts the right answers per method and budget, beside the
//! memory each kept.

use crate::cli::DemoArgs;
use crate::compress::mib;
use crate::run::load_model;
use anyhow::{anyhow, bail, Result};
use kvmerger_compression::{Budget, Recipe};
use kvmerger_engine::compress::Compressor;
use kvmerger_engine::generate::GenerateParams;
use kvmerger_engine::sequence::Sequence;
use std::sync::Arc;

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
    "Valparaiso",
    "Tromso",
];
const PEOPLE: &[&str] = &[
    "Anna", "Boris", "Chen", "Dara", "Emil", "Fatima", "Goran", "Hana", "Ivo", "Jamal",
];

/// A filler text of about `tokens` tokens with one fact at `depth`, and the question
/// about it (for `bench --fidelity`'s prompt).
pub fn haystack(tokens: usize, depth: f64, city: &str) -> String {
    let (text, _) = document(tokens, &[(depth, format!("The secret city is {city}."))]);
    format!("{text}\n\nQuestion: What is the secret city?")
}

/// About `tokens` tokens of filler with each fact at its depth (0 = start, 1 = end).
fn document(tokens: usize, facts: &[(f64, String)]) -> (String, usize) {
    // One filler group is about 25 tokens in BPE vocabularies.
    let reps = (tokens / 25).max(2);
    let mut s = String::new();
    for i in 0..reps {
        for (depth, fact) in facts {
            if ((reps as f64) * depth.clamp(0.0, 1.0)).round() as usize == i {
                s.push_str(fact);
                s.push(' ');
            }
        }
        s.push_str(FILLER);
    }
    (s, reps)
}

pub fn run(a: DemoArgs, dir: &std::path::Path) -> Result<()> {
    if a.length < 64 {
        bail!("--length must be at least 64 tokens");
    }
    if a.needles == 0 || a.needles > PEOPLE.len() {
        bail!("--needles must be between 1 and {}", PEOPLE.len());
    }
    let mut runs: Vec<(String, Arc<Compressor>)> =
        vec![("full".into(), Arc::new(Compressor::none()))];
    for b in &a.budgets {
        for m in &a.methods {
            // Options are `;`-separated here: `--methods` is a comma-separated list.
            let spec = format!("{}@{b}", m.replace(';', ","));
            let recipe = Recipe::parse(&spec).map_err(|e| anyhow!("--methods {m}: {e}"))?;
            if recipe.prefill_chunk.is_some() {
                bail!(
                    "--methods {m}: the demo reads the document once for every method, so it \
                     cannot compress during prefill (try `kvmerger generate --prefill-chunk`)"
                );
            }
            let budget: Budget = b.parse()?;
            runs.push((
                format!("{m} @ {budget}"),
                Arc::new(Compressor::from_recipe(&recipe)?),
            ));
        }
    }
    let (lm, dtype) = load_model(&a.model, dir)?;
    // The facts: one person per needle, each with a different city, spread from near
    // the start to near the end of the document.
    // A stride coprime to the number of cities gives each person a different one.
    let cities: Vec<&str> = (0..CITIES.len())
        .map(|i| CITIES[(a.seed as usize % CITIES.len() + i * 5) % CITIES.len()])
        .collect();
    let n = a.needles;
    let facts: Vec<(&str, &str, f64)> = (0..n)
        .map(|i| {
            let depth = (i as f64 + 0.5) / n as f64;
            (PEOPLE[i], cities[i], depth)
        })
        .collect();
    let (doc, _) = document(
        a.length,
        &facts
            .iter()
            .map(|(p, c, d)| (*d, format!("{p}'s secret city is {c}.")))
            .collect::<Vec<_>>(),
    );
    let context = format!(
        "Read the document below. Several people each have a secret city; remember them.\n\n{doc}\n\n"
    );
    let first = lm.split_prompt(&context, "", "", true)?;
    let total = first.context.len() + 32;
    if total >= lm.model.cfg.ctx_len {
        bail!(
            "a document of {} tokens does not fit the context of {}",
            first.context.len(),
            lm.model.cfg.ctx_len
        );
    }
    let questions: Vec<Vec<u32>> = facts
        .iter()
        .map(|(p, _, _)| {
            lm.split_prompt(&context, &format!("What is {p}'s secret city?"), "", true)
                .map(|s| s.question)
        })
        .collect::<Result<_, _>>()?;

    eprintln!(
        "reading a document of {} tokens once, with {n} facts in it...",
        first.context.len()
    );
    let mut base = Sequence::shared(&lm.model, dtype, runs.iter().map(|(_, c)| c.as_ref()));
    base.protect(first.prefix);
    let prefill = base.feed(&lm.model, &first.context)?;
    base.score(&lm)?;
    let params = GenerateParams {
        max_tokens: a.max_tokens,
        stop: vec!["\n\n".into()],
        ..Default::default()
    };
    println!(
        "model {}, document {} tokens, read in {:.2}s; {n} questions asked of each compressed copy\n",
        lm.name,
        first.context.len(),
        prefill
    );
    println!(
        "| method | right answers | KV cache | kept | compress | per answer | a wrong answer |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (label, comp) in &runs {
        let mut compressed = base.clone();
        compressed.set_compressor(comp.clone())?;
        let report = compressed.compress(&lm)?;
        let secs = report.secs + report.pass_secs;
        let kept = compressed.cache.bytes();
        let (mut right, mut decode, mut wrong) = (0, 0.0, None);
        for ((_, city, _), q) in facts.iter().zip(&questions) {
            let mut s = compressed.clone();
            s.append(&lm.model, q)?;
            let gen = s.generate(&lm.model, &lm.tokenizer, &params, &mut |_| true)?;
            decode += gen.decode_secs;
            if gen.text.contains(city) {
                right += 1;
            } else if wrong.is_none() {
                wrong = Some(format!(
                    "{} (not {city})",
                    gen.text.trim().replace(['|', '\n'], " ")
                ));
            }
        }
        println!(
            "| {label} | {right}/{n} | {:.2} MiB | {:.0}% | {:.1} ms | {:.2}s | {} |",
            mib(kept),
            100.0 * kept as f64 / base.cache.bytes() as f64,
            secs * 1e3,
            decode / n as f64,
            wrong.unwrap_or_default()
        );
    }
    Ok(())
}
