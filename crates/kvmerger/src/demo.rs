//! `kvmerger demo`: what compression is for. A long document with several facts buried
//! in it is read (prefilled) once; each method compresses it once, before any question
//! is seen; then every question is asked of the compressed document, appended
//! uncompressed. The table counts the right answers per method and budget, beside the
//! memory each kept.

use crate::cli::DemoArgs;
use crate::shared::recipe::mib;
use crate::shared::session::load_model;
use crate::shared::text::document;
use anyhow::{anyhow, bail, Result};
use kvmerger_compression::{Budget, Recipe};
use kvmerger_engine::compressor::Compressor;
use kvmerger_engine::generate::GenerateParams;
use kvmerger_engine::sequence::Sequence;
use kvmerger_eval::metrics::fold_case_and_accents;
use std::sync::Arc;

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

/// One configuration's result on one document.
struct Outcome {
    right: usize,
    kv_bytes: usize,
    compress_s: f64,
    decode_s: f64,
    wrong: Option<String>,
}

pub fn run(a: DemoArgs, dir: &std::path::Path) -> Result<()> {
    check_args(&a)?;
    let mut runs = build_runs(&a)?;
    let (lm, dtype) = load_model(&a.model, dir)?;
    // A method that needs a trained scorer this model lacks is left out, with a note.
    runs.retain(|(label, c)| match lm.model.check_learned(c.needs()) {
        Ok(()) => true,
        Err(e) => {
            eprintln!("note: {label} left out: {e}");
            false
        }
    });
    let (all, tokens, prefill) = run_seeds(&a, &lm, dtype, &runs)?;
    if a.seeds == 1 {
        print_one_seed(&a, &lm.name, &runs, &all, tokens, prefill);
    } else {
        print_seed_summary(&a, &lm.name, &runs, &all, tokens);
    }
    Ok(())
}

/// Refuses a document length, needle count or seed count out of range.
fn check_args(a: &DemoArgs) -> Result<()> {
    if a.length < 64 {
        bail!("--length must be at least 64 tokens");
    }
    if a.needles == 0 || a.needles > PEOPLE.len() {
        bail!("--needles must be between 1 and {}", PEOPLE.len());
    }
    if a.seeds == 0 || a.seeds > 1000 {
        bail!("--seeds must be between 1 and 1000");
    }
    Ok(())
}

/// The labelled compressors to compare: `full` first, then each method at each budget.
fn build_runs(a: &DemoArgs) -> Result<Vec<(String, Arc<Compressor>)>> {
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
    Ok(runs)
}

/// Runs one document per seed; returns each run's outcomes, and the first document's
/// tokens and prefill time.
fn run_seeds(
    a: &DemoArgs,
    lm: &kvmerger_engine::load::LoadedModel,
    dtype: kvmerger_compression::KvDtype,
    runs: &[(String, Arc<Compressor>)],
) -> Result<(Vec<Vec<Outcome>>, usize, f64)> {
    let mut all: Vec<Vec<Outcome>> = (0..runs.len()).map(|_| Vec::new()).collect();
    let mut shown = None;
    for seed in a.seed..a.seed + a.seeds {
        let (tokens, prefill, outcomes) = one_document(a, lm, dtype, runs, seed)?;
        if shown.is_none() {
            shown = Some((tokens, prefill));
        }
        for (acc, o) in all.iter_mut().zip(outcomes) {
            acc.push(o);
        }
    }
    let (tokens, prefill) = shown.expect("at least one seed");
    Ok((all, tokens, prefill))
}

/// Prints the table for a single document: answers, memory and timings per run.
fn print_one_seed(
    a: &DemoArgs,
    name: &str,
    runs: &[(String, Arc<Compressor>)],
    all: &[Vec<Outcome>],
    tokens: usize,
    prefill: f64,
) {
    let n = a.needles;
    println!(
        "model {}, document {tokens} tokens, read in {prefill:.2}s; {n} questions asked of each compressed copy\n",
        name
    );
    println!(
        "| method | right answers | KV cache | kept | compress | per answer | a wrong answer |"
    );
    println!("|---|---|---|---|---|---|---|");
    let full_bytes = all[0][0].kv_bytes;
    for ((label, _), o) in runs.iter().zip(all) {
        let o = &o[0];
        println!(
            "| {label} | {}/{n} | {:.2} MiB | {:.0}% | {:.1} ms | {:.2}s | {} |",
            o.right,
            mib(o.kv_bytes),
            100.0 * o.kv_bytes as f64 / full_bytes as f64,
            o.compress_s * 1e3,
            o.decode_s / n as f64,
            o.wrong.clone().unwrap_or_default()
        );
    }
}

/// Prints the table over several seeds: right answers per document and median compress time.
fn print_seed_summary(
    a: &DemoArgs,
    name: &str,
    runs: &[(String, Arc<Compressor>)],
    all: &[Vec<Outcome>],
    tokens: usize,
) {
    let n = a.needles;
    println!(
        "model {}, documents of about {tokens} tokens with {n} facts, seeds {}..{}: right answers per document\n",
        name,
        a.seed,
        a.seed + a.seeds - 1
    );
    println!("| method | mean | min | median | max | all right | compress (median) |");
    println!("|---|---|---|---|---|---|---|");
    for ((label, _), os) in runs.iter().zip(all) {
        let mut r: Vec<usize> = os.iter().map(|o| o.right).collect();
        r.sort_unstable();
        let mut c: Vec<f64> = os.iter().map(|o| o.compress_s).collect();
        c.sort_by(f64::total_cmp);
        println!(
            "| {label} | {:.2}/{n} | {} | {} | {} | {} of {} | {:.1} ms |",
            r.iter().sum::<usize>() as f64 / r.len() as f64,
            r[0],
            r[r.len() / 2],
            r[r.len() - 1],
            r.iter().filter(|&&x| x == n).count(),
            r.len(),
            c[c.len() / 2] * 1e3
        );
    }
}

/// One document (its facts placed by `seed`) read once, compressed by every run, and
/// every question asked of every copy. Returns its tokens, the prefill time and each
/// run's outcome.
fn one_document(
    a: &DemoArgs,
    lm: &kvmerger_engine::load::LoadedModel,
    dtype: kvmerger_compression::KvDtype,
    runs: &[(String, Arc<Compressor>)],
    seed: u64,
) -> Result<(usize, f64, Vec<Outcome>)> {
    // The facts: one person per needle, each with a different city, spread from near
    // the start to near the end of the document.
    // A stride coprime to the number of cities gives each person a different one.
    let cities: Vec<&str> = (0..CITIES.len())
        .map(|i| CITIES[(seed as usize % CITIES.len() + i * 5) % CITIES.len()])
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
        .map(|(p, _, _)| lm.question_ids(&format!("What is {p}'s secret city?"), ""))
        .collect::<Result<_, _>>()?;
    if a.seeds == 1 {
        eprintln!(
            "reading a document of {} tokens once, with {n} facts in it...",
            first.context.len()
        );
    } else {
        eprintln!("document {seed}: {} tokens...", first.context.len());
    }
    let mut base = Sequence::shared(&lm.model, dtype, runs.iter().map(|(_, c)| c.as_ref()));
    base.protect(first.prefix);
    let prefill = base.feed(&lm.model, &first.context)?;
    base.score(lm)?;
    let params = GenerateParams {
        max_tokens: a.max_tokens,
        stop: vec!["\n\n".into()],
        ..Default::default()
    };
    let mut out = Vec::with_capacity(runs.len());
    for (_, comp) in runs {
        let mut compressed = base.clone();
        compressed.set_compressor(comp.clone())?;
        let report = compressed.compress(lm)?;
        let (mut right, mut decode_s, mut wrong) = (0, 0.0, None);
        for ((_, city, _), q) in facts.iter().zip(&questions) {
            let mut s = compressed.clone();
            s.append(&lm.model, q)?;
            let gen = s.generate(&lm.model, &lm.tokenizer, &params, &mut |_| true)?;
            decode_s += gen.decode_secs;
            if fold_case_and_accents(&gen.text).contains(&fold_case_and_accents(city)) {
                right += 1;
            } else if wrong.is_none() {
                wrong = Some(format!(
                    "{} (not {city})",
                    gen.text.trim().replace(['|', '\n'], " ")
                ));
            }
        }
        out.push(Outcome {
            right,
            kv_bytes: compressed.cache.bytes(),
            compress_s: report.secs + report.pass_secs,
            decode_s,
            wrong,
        });
    }
    Ok((first.context.len(), prefill, out))
}
