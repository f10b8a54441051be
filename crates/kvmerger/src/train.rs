//! `kvmerger train-scorer`: trains KVzap's learned scorer for a model from public
//! domain text (Jane Austen's novels and the Jargon File, fetched on first use) and
//! writes it to the data directory, where every command finds it.

use crate::cli::TrainArgs;
use crate::shared::progress::Bar;
use crate::shared::session::scorer_path;
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use kvmerger_assets::{self as assets, Progress};
use kvmerger_engine::learned::train::{train, TrainOptions};
use kvmerger_engine::load::LoadedModel;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::Path;

/// The texts named in `spec` (`austen`, `jargon`), each as one string.
fn texts(spec: &str, dir: &Path) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for name in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let bar = Bar::new();
        let r = assets::fetch(name, dir, &bar);
        bar.finish();
        let path = r.with_context(|| format!("fetching {name}"))?;
        match name {
            "austen" => {
                for (title, text) in kvmerger_eval::tasks::text::austen(&path)
                    .with_context(|| format!("reading {}", path.display()))?
                {
                    out.push((title, text));
                }
            }
            "jargon" => {
                let f = if path.is_dir() {
                    path.join("jargon.txt")
                } else {
                    path
                };
                let text = kvmerger_eval::tasks::text::read_text_file(&f)?;
                out.push(("The Jargon File".into(), text));
            }
            other => bail!("unknown training text '{other}' (known: austen, jargon)"),
        }
    }
    if out.is_empty() {
        bail!("--texts names no text");
    }
    Ok(out)
}

/// One fact of the kinds long documents are asked about (a number, a code, a chain of
/// assignments, a key and its value), made up from `rng` and words of the passage.
fn fact(rng: &mut ChaCha8Rng, words: &[&str]) -> String {
    let word = |rng: &mut ChaCha8Rng| {
        let w = words[rng.gen_range(0..words.len())];
        w.trim_matches(|c: char| !c.is_alphanumeric()).to_string()
    };
    let name = |rng: &mut ChaCha8Rng| -> String {
        (0..5)
            .map(|_| (b'A' + rng.gen_range(0..26)) as char)
            .collect()
    };
    let hex = |rng: &mut ChaCha8Rng, n: usize| -> String {
        (0..n)
            .map(|_| format!("{:x}", rng.gen_range(0..16)))
            .collect()
    };
    match rng.gen_range(0..5) {
        0 => format!(
            "One of the special magic numbers for {} is: {}.",
            word(rng),
            rng.gen_range(1_000_000..10_000_000)
        ),
        1 => {
            let (a, b) = (name(rng), name(rng));
            format!(
                "VAR {a} = {} VAR {b} = VAR {a}",
                rng.gen_range(10_000..100_000)
            )
        }
        2 => format!(
            "The code for the {} door is {}-{}.",
            word(rng),
            hex(rng, 4),
            hex(rng, 4)
        ),
        3 => format!("Key {}: value {}.", hex(rng, 8), hex(rng, 12)),
        _ => format!(
            "Remember that {} keeps {} {} in the {} box.",
            word(rng),
            rng.gen_range(2..100),
            word(rng),
            word(rng)
        ),
    }
}

/// `text` with `n` made-up facts put between its sentences.
fn with_facts(text: &str, n: usize, rng: &mut ChaCha8Rng) -> String {
    let words: Vec<&str> = text.split_whitespace().filter(|w| w.len() > 3).collect();
    if n == 0 || words.is_empty() {
        return text.to_string();
    }
    let cuts: Vec<usize> = text.match_indices(". ").map(|(i, _)| i + 2).collect();
    let mut at: Vec<usize> = (0..n)
        .map(|_| {
            cuts.get(rng.gen_range(0..cuts.len().max(1)))
                .copied()
                .unwrap_or(0)
        })
        .collect();
    at.sort_unstable();
    let mut out = String::with_capacity(text.len() + 80 * n);
    let mut last = 0;
    for i in at {
        out.push_str(&text[last..i]);
        out.push_str(&fact(rng, &words));
        out.push(' ');
        last = i;
    }
    out.push_str(&text[last..]);
    out
}

/// `count` passages of the lengths given in turn (tokens of the model), from random
/// places in the texts (each text's share proportional to its length), each with
/// `facts` made-up facts put between its sentences.
fn passages(
    lm: &LoadedModel,
    texts: &[(String, String)],
    lengths: &[usize],
    count: usize,
    facts: usize,
    seed: u64,
) -> Result<Vec<String>> {
    let encoded: Vec<Vec<u32>> = texts
        .iter()
        .map(|(_, t)| lm.tokenizer.encode(t, false))
        .collect::<Result<_, _>>()?;
    let total: usize = encoded.iter().map(|e| e.len()).sum();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let len = lengths[i % lengths.len()];
        // A token position over all texts, then the text it falls in.
        let mut at = rng.gen_range(0..total);
        let ids = encoded
            .iter()
            .find(|e| {
                if at < e.len() {
                    true
                } else {
                    at -= e.len();
                    false
                }
            })
            .expect("at < total");
        if ids.len() < len {
            bail!(
                "a training text has {} tokens, fewer than a passage of {len}",
                ids.len()
            );
        }
        let start = at.min(ids.len() - len);
        // The facts take about 20 tokens each: the passage is cut that much shorter.
        let keep = len.saturating_sub(20 * facts).max(len / 2);
        let text = lm.tokenizer.decode(&ids[start..start + keep]);
        out.push(with_facts(&text, facts, &mut rng));
    }
    Ok(out)
}

pub fn run(a: TrainArgs, dir: &Path) -> Result<()> {
    if a.docs <= a.held_out {
        bail!(
            "--docs {} leaves nothing to train on with --held-out {}",
            a.docs,
            a.held_out
        );
    }
    let lengths = parse_lengths(&a.lengths)?;
    let (lm, _) = crate::shared::session::load_model(&a.model, dir)?;
    check_passages_fit(&lengths, &lm)?;
    let lambdas = parse_lambdas(&a.lambda)?;
    let texts = texts(&a.texts, dir)?;
    let docs = passages(&lm, &texts, &lengths, a.docs, a.facts, a.seed)?;
    let opts = TrainOptions {
        sample_per_doc: a.sample,
        lambdas,
        mlp_units: a.mlp_units,
        mlp_epochs: a.mlp_epochs,
        held_out: a.held_out,
        seed: a.seed,
        ..Default::default()
    };
    let (mut scorer, report) = train_with_bar(&lm, &docs, &opts)?;
    let out = write_scorer(&a, dir, &lm, &mut scorer)?;
    print_report(&lm.name, &report);
    println!("{}", out.display());
    Ok(())
}

/// Parses `--lengths` (token counts separated by commas, each at least 64).
fn parse_lengths(spec: &str) -> Result<Vec<usize>> {
    let lengths: Vec<usize> = spec
        .split(',')
        .map(|s| s.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .context("--lengths must be token counts separated by commas")?;
    if lengths.iter().any(|&l| l < 64) {
        bail!("--lengths: every passage needs at least 64 tokens");
    }
    Ok(lengths)
}

/// Refuses passages that, with their reconstruction pass, pass the model's context.
fn check_passages_fit(lengths: &[usize], lm: &LoadedModel) -> Result<()> {
    let longest = lengths.iter().max().copied().unwrap_or(0);
    // The pass repeats the passage in chunks after it.
    let pass = longest.min(kvmerger_engine::reconstruct::CHUNK) + 64;
    if longest + pass > lm.model.cfg.ctx_len {
        bail!(
            "--lengths: a passage of {longest} tokens and its reconstruction pass do not fit the model's context of {}",
            lm.model.cfg.ctx_len
        );
    }
    Ok(())
}

/// Parses `--lambda` (ridge penalties separated by commas, each in (0, 1000]).
fn parse_lambdas(spec: &str) -> Result<Vec<f64>> {
    let lambdas: Vec<f64> = spec
        .split(',')
        .map(|s| s.trim().parse::<f64>())
        .collect::<Result<_, _>>()
        .context("--lambda must be numbers separated by commas")?;
    if lambdas.is_empty()
        || lambdas
            .iter()
            .any(|l| !(l.is_finite() && *l > 0.0 && *l <= 1e3))
    {
        bail!("--lambda: every penalty must be in (0, 1000]");
    }
    Ok(lambdas)
}

/// Trains the scorer on `docs` behind a progress bar, cleared when done.
fn train_with_bar(
    lm: &LoadedModel,
    docs: &[String],
    opts: &TrainOptions,
) -> Result<(
    kvmerger_engine::learned::LearnedScorer,
    kvmerger_engine::learned::train::TrainReport,
)> {
    let bar = ProgressBar::new(docs.len() as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {pos}/{len} documents [{elapsed}, eta {eta}]",
        )
        .unwrap()
        .progress_chars("=> "),
    );
    bar.set_message("scoring with KVzip's pass");
    let result = train(lm, docs, opts, &mut |done, _, what| {
        bar.set_message(what.to_string());
        bar.set_position(done as u64);
    });
    bar.finish_and_clear();
    Ok(result?)
}

/// Records the training run in the scorer and writes it to `--output` or the data directory.
fn write_scorer(
    a: &TrainArgs,
    dir: &Path,
    lm: &LoadedModel,
    scorer: &mut kvmerger_engine::learned::LearnedScorer,
) -> Result<std::path::PathBuf> {
    scorer.training["texts"] = a.texts.clone().into();
    scorer.training["lengths"] = a.lengths.clone().into();
    scorer.training["docs"] = a.docs.into();
    scorer.training["facts_per_passage"] = a.facts.into();
    scorer.training["model"] = lm.name.clone().into();
    let out = a
        .output
        .clone()
        .unwrap_or_else(|| scorer_path(dir, &lm.fingerprint));
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    scorer.write(&out)?;
    Ok(out)
}

/// Prints the training summary (R², ridge penalty, agreement with KVzip) to stderr.
fn print_report(name: &str, report: &kvmerger_engine::learned::train::TrainReport) {
    let r2 = &report.r2;
    let mean_r2 = r2.iter().sum::<f64>() / r2.len().max(1) as f64;
    eprintln!(
        "[{}] trained on {} tokens of {} documents in {:.0}s; held out {} documents ({} tokens): R² {:.3} (layers {:.2}..{:.2})",
        name,
        report.train_tokens,
        report.train_docs,
        report.secs,
        report.held_out_docs,
        report.held_out_tokens,
        mean_r2,
        r2.iter().copied().fold(f64::INFINITY, f64::min),
        r2.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    );
    eprintln!(
        "  ridge penalty {} (of {:?})",
        report.lambda,
        lambdas_tried(report)
    );
    for (b, share) in &report.agreement {
        eprintln!(
            "  at {:.1}% kept, {:.1}% of the slots KVzip keeps are kept",
            b * 100.0,
            share * 100.0
        );
    }
}

fn lambdas_tried(r: &kvmerger_engine::learned::train::TrainReport) -> Vec<f64> {
    r.tried.iter().map(|t| t.0).collect()
}
