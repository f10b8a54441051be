//! Building a compressor from flags and a TOML file, and printing what it did.

use crate::cli::CompressArgs;
use anyhow::{bail, Context, Result};
use kvmerger_compression::{registry, Budget, Options, Schedule};
use kvmerger_engine::compress::{CompressReport, Compressor};
use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    method: Option<String>,
    budget: Option<toml::Value>,
    schedule: Option<String>,
    recompress_margin: Option<usize>,
    #[serde(default)]
    options: BTreeMap<String, toml::Value>,
}

fn scalar(v: &toml::Value) -> Result<String> {
    Ok(match v {
        toml::Value::String(s) => s.clone(),
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) => f.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        other => bail!("option value {other} must be a string, number or boolean"),
    })
}

/// A compressor's recipe from flags and the TOML file (flags win).
#[derive(Clone, Debug)]
pub struct Recipe {
    pub method: String,
    pub budget: Budget,
    pub options: Options,
    pub schedule: Schedule,
    pub recompress_margin: Option<usize>,
}

pub fn build(a: &CompressArgs) -> Result<Compressor> {
    let r = recipe(a)?;
    let mut c = Compressor::new(&r.method, &r.options, r.budget, r.schedule)?;
    c.recompress_margin = r.recompress_margin;
    c.check()?;
    Ok(c)
}

pub fn recipe(a: &CompressArgs) -> Result<Recipe> {
    let file: FileConfig = match &a.compress_config {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            toml::from_str(&text)
                .with_context(|| format!("{} is not a valid compression config", p.display()))?
        }
        None => FileConfig::default(),
    };
    let method = a
        .method
        .clone()
        .or(file.method)
        .unwrap_or_else(|| "full".to_string());
    let budget_text = match (&a.budget, &file.budget) {
        (Some(b), _) => b.clone(),
        (None, Some(b)) => scalar(b)?,
        (None, None) if method == "full" => "1.0".to_string(),
        (None, None) => bail!("--budget is required with --method {method} (e.g. --budget 0.5)"),
    };
    let budget: Budget = budget_text.parse()?;
    let mut opts = Options::new();
    for (k, v) in &file.options {
        opts.set(k, scalar(v)?);
    }
    for pair in &a.opts {
        opts.parse_pair(pair)?;
    }
    let schedule = match a.schedule.as_ref().or(file.schedule.as_ref()) {
        None => Schedule::Uniform,
        Some(s) => Schedule::from_name_or_file(s).context("--schedule")?,
    };
    Ok(Recipe {
        method,
        budget,
        options: opts,
        schedule,
        recompress_margin: a.recompress_margin.or(file.recompress_margin),
    })
}

pub fn print_methods() {
    let scorers = registry::scorers();
    for m in registry::METHODS {
        println!("{:<18} {}", m.name, m.summary);
        if scorers.contains(&m.name) {
            println!("    (a scorer: adakv's scorer= and kvmerger+'s selector= can use it)");
        }
        for o in m.options {
            println!("    {:<12} (default {}) {}", o.key, o.default, o.help);
        }
    }
}

pub fn mib(b: usize) -> f64 {
    b as f64 / (1 << 20) as f64
}

/// One line for the KV bytes and time, one for the per-layer ratios.
pub fn report(r: &CompressReport, prefill_secs: f64) {
    eprintln!(
        "[{}] KV cache {:.2} MiB -> {:.2} MiB ({:.1}% kept) in {:.1} ms ({:.2}% of prefill)",
        r.method,
        mib(r.bytes_before),
        mib(r.bytes_after),
        100.0 * r.ratio(),
        r.secs * 1e3,
        100.0 * r.secs / prefill_secs.max(1e-9)
    );
    let ratios: Vec<String> = r.layer_ratios().iter().map(|x| format!("{x:.2}")).collect();
    eprintln!("[{}] kept per layer: {}", r.method, ratios.join(" "));
}
