//! `kvmerger analyze`: the paper's observations on a model, and merge maps.

use crate::cli::{
    AnalyzeArgs, AnalyzeCommand, AnalyzeInput, MergeMapArgs, SimilarityArgs, SparsityArgs,
};
use crate::shared::progress::Bar;
use crate::shared::session::load_model;
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use kvmerger_assets::{self as assets, Progress};
use kvmerger_compression::methods::kvmerger::KvMerger;
use kvmerger_compression::{Budget, Options};
use kvmerger_engine::chat::Message;
use kvmerger_engine::load::LoadedModel;
use kvmerger_eval::analyze::{self, Similarity, Sparsity};
use kvmerger_eval::runner::SampleSource;
use kvmerger_eval::sources::TaskSamples;
use kvmerger_eval::{plot, tasks};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub fn run(a: AnalyzeArgs, dir: &Path) -> Result<()> {
    match a.command {
        AnalyzeCommand::Similarity(s) => similarity(s, dir),
        AnalyzeCommand::Sparsity(s) => sparsity(s, dir),
        AnalyzeCommand::MergeMap(m) => merge_map(m, dir),
    }
}

fn ruler_dir(dir: &Path) -> Result<PathBuf> {
    let bar = Bar::new();
    let r = assets::fetch("ruler", dir, &bar);
    bar.finish();
    r.context("fetching the RULER data")
}

fn check_tasks(names: &[String]) -> Result<()> {
    for t in names {
        if !tasks::task_names().contains(&t.as_str()) {
            bail!(
                "unknown task '{t}' (known: {})",
                tasks::task_names().join(", ")
            );
        }
    }
    if names.is_empty() {
        bail!("--tasks is empty");
    }
    Ok(())
}

/// The layer to picture (default: the middle one), after checking it and the KV head
/// exist in this model.
fn layer_and_head(lm: &LoadedModel, layer: Option<usize>, head: usize) -> Result<usize> {
    let n_layers = lm.model.cfg.n_layers;
    let layer = layer.unwrap_or(n_layers / 2);
    if layer >= n_layers {
        bail!("--layer {layer}: the model has {n_layers} layers");
    }
    if head >= lm.model.cfg.n_kv_heads {
        bail!(
            "--head {head}: the model has {} KV heads",
            lm.model.cfg.n_kv_heads
        );
    }
    Ok(layer)
}

fn prompt_ids(lm: &LoadedModel, input: &str, answer_prefix: &str) -> Result<Vec<u32>> {
    let mut p = lm.template.render(&[Message::user(input)], true)?;
    p.push_str(answer_prefix);
    Ok(lm.tokenizer.encode(&p, true)?)
}

/// Prefill every (task, sample) and hand each cache to `f`, with a progress bar.
fn for_each_sample(
    inp: &AnalyzeInput,
    dir: &Path,
    lm: &LoadedModel,
    mut f: impl FnMut(&str, &kvmerger_engine::cache::KvCache) -> Result<()>,
) -> Result<()> {
    check_tasks(&inp.tasks)?;
    if inp.samples == 0 {
        bail!("--samples must be at least 1");
    }
    if inp.length < 64 {
        bail!("--length must be at least 64 tokens");
    }
    let src = TaskSamples::new(lm, ruler_dir(dir)?, inp.seed);
    let total = inp.tasks.len() * inp.samples;
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "[{elapsed_precise}] [{bar:30}] {pos}/{len}, eta {eta} | {msg}",
        )
        .unwrap()
        .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(500));
    for t in &inp.tasks {
        for i in 0..inp.samples {
            bar.set_message(format!("{t} #{i}: prefilling {} tokens", inp.length));
            let s = src.sample(t, inp.length, i)?;
            let ids = prompt_ids(lm, &s.input, &s.answer_prefix)?;
            let cache = analyze::prefill(lm, &ids)?;
            f(t, &cache)?;
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    Ok(())
}

fn report(files: &[PathBuf], out: &Path) {
    if !plot::have_fonts() {
        eprintln!("note: no fonts are installed, so the PNG charts have no text (the SVGs do)");
    }
    for f in files {
        println!("{}", f.display());
    }
    eprintln!("wrote {} files to {}", files.len(), out.display());
}

fn similarity(a: SimilarityArgs, dir: &Path) -> Result<()> {
    if a.max_distance == 0 {
        bail!("--max-distance must be at least 1");
    }
    check_tasks(&a.input.tasks)?;
    let (lm, _) = load_model(&a.input.model, dir)?;
    let layer = layer_and_head(&lm, a.layer, a.head)?;
    let mut sim = Similarity::default();
    let mut first = None;
    for_each_sample(&a.input, dir, &lm, |_, cache| {
        sim.add(&Similarity::of(cache, a.max_distance));
        if first.is_none() {
            first = Some(cache.clone());
        }
        Ok(())
    })?;
    let out = &a.input.out;
    let mut files = analyze::write_similarity(&sim, &lm.name, out).map_err(anyhow::Error::msg)?;
    if let Some(c) = &first {
        files.extend(
            analyze::token_similarity(c, layer, a.head, a.tokens, &lm.name, out)
                .map_err(anyhow::Error::msg)?,
        );
    }
    let (k, v) = (sim.layer_mean(false), sim.layer_mean(true));
    let avg = |m: &Vec<Vec<f64>>, d: usize| m.iter().map(|l| l[d]).sum::<f64>() / m.len() as f64;
    println!(
        "{}: mean cosine similarity over {} samples, all layers and heads",
        lm.name, sim.samples
    );
    println!("| distance | keys | values |\n|---:|---:|---:|");
    for d in [1usize, 2, 4, 8, 16, 32, 64, 128]
        .into_iter()
        .filter(|&d| d <= a.max_distance)
    {
        println!("| {d} | {:.3} | {:.3} |", avg(&k, d - 1), avg(&v, d - 1));
    }
    report(&files, out);
    Ok(())
}

fn sparsity(a: SparsityArgs, dir: &Path) -> Result<()> {
    if !(a.epsilon.is_finite() && (-1.0..=1.0).contains(&a.epsilon)) {
        bail!("--epsilon must be a cosine similarity in [-1, 1]");
    }
    check_tasks(&a.input.tasks)?;
    let (lm, _) = load_model(&a.input.model, dir)?;
    let mut sp = Sparsity {
        epsilon: a.epsilon,
        samples: Vec::new(),
    };
    for_each_sample(&a.input, dir, &lm, |t, cache| {
        sp.samples.push((
            t.to_string(),
            analyze::layer_merge_ratios(cache, a.epsilon)?,
        ));
        Ok(())
    })?;
    let files = analyze::write_sparsity(&sp, &lm.name, &a.input.out).map_err(anyhow::Error::msg)?;
    println!(
        "{}: fraction of slots kept by merging at epsilon {} ({} samples)",
        lm.name,
        a.epsilon,
        sp.samples.len()
    );
    println!("| layer | mean | std | min | max |\n|---:|---:|---:|---:|---:|");
    for (l, (m, s)) in sp.overall().iter().enumerate() {
        let xs: Vec<f64> = sp.samples.iter().map(|x| x.1[l]).collect();
        let lo = xs.iter().copied().fold(f64::MAX, f64::min);
        let hi = xs.iter().copied().fold(f64::MIN, f64::max);
        println!("| {l} | {m:.3} | {s:.3} | {lo:.3} | {hi:.3} |");
    }
    report(&files, &a.input.out);
    eprintln!(
        "use it as a schedule: --schedule {}",
        a.input.out.join("sparsity_schedule.csv").display()
    );
    Ok(())
}

fn merge_map(a: MergeMapArgs, dir: &Path) -> Result<()> {
    let budget: Budget = a.budget.parse()?;
    let mut opts = Options::new();
    for o in &a.opts {
        opts.parse_pair(o)?;
    }
    let method = KvMerger::from_options(&opts)?;
    let (lm, _) = load_model(&a.model, dir)?;
    let layer = layer_and_head(&lm, a.layer, a.head)?;
    let ids = match &a.prompt_file {
        Some(p) => {
            let text = crate::shared::text::read_text(p, "prompt file")?;
            prompt_ids(&lm, &text, "")?
        }
        None => {
            check_tasks(std::slice::from_ref(&a.task))?;
            let src = TaskSamples::new(&lm, ruler_dir(dir)?, 42);
            let s = src.sample(&a.task, a.length, 0)?;
            prompt_ids(&lm, &s.input, &s.answer_prefix)?
        }
    };
    let bar = Bar::new();
    bar.stage(&format!("prefilling {} tokens", ids.len()));
    let cache = analyze::prefill(&lm, &ids);
    bar.finish();
    let cache = cache?;
    let n = ids.len();
    let slots = budget.slots(n);
    let plans = analyze::merge_plans(&cache, &method, slots, a.head)?;
    let out = &a.out;
    let title = format!(
        "{}: KVMerger at {} ({slots} of {n} slots), KV head {}, every layer",
        lm.name, a.budget, a.head
    );
    let mut files = plot::save(
        &analyze::merge_map_layers(&plans, n, &title),
        &out.join(format!("merge_map_H{}", a.head)),
    )
    .map_err(anyhow::Error::msg)?;
    let tokens: Vec<String> = ids.iter().map(|&t| lm.tokenizer.decode(&[t])).collect();
    let title = format!(
        "{}: which tokens share a slot, layer {layer}, KV head {} ({slots} of {n} slots)",
        lm.name, a.head
    );
    files.extend(
        plot::save(
            &analyze::merge_map_tokens(&plans[layer], &tokens, &title),
            &out.join(format!("merge_map_tokens_L{layer}H{}", a.head)),
        )
        .map_err(anyhow::Error::msg)?,
    );
    // The sets as text, for reading without a picture.
    let mut txt = String::new();
    for (l, p) in plans.iter().enumerate() {
        let merged: usize = p.sets.iter().filter(|s| s.members.len() > 1).count();
        let biggest = p.sets.iter().map(|s| s.members.len()).max().unwrap_or(0);
        txt.push_str(&format!(
            "layer {l}: {} protected, {} sets ({merged} merged, largest {biggest}), {} dropped\n",
            p.protected.len(),
            p.sets.len(),
            p.dropped.len()
        ));
    }
    txt.push_str(&format!("\nlayer {layer} sets of more than one token:\n"));
    for s in plans[layer].sets.iter().filter(|s| s.members.len() > 1) {
        let text: String = s.members.clone().map(|i| tokens[i].clone()).collect();
        txt.push_str(&format!(
            "{:>5}..{:<5} pivot {:>5}: {:?}\n",
            s.members.start, s.members.end, s.pivot, text
        ));
    }
    let p = out.join(format!("merge_map_H{}.txt", a.head));
    plot::write_atomic(&p, txt.as_bytes()).map_err(anyhow::Error::msg)?;
    files.push(p);
    report(&files, out);
    Ok(())
}
