//! Building a compressor from flags and a TOML file, and printing what it did.

use crate::cli::CompressArgs;
use anyhow::{anyhow, bail, Context, Result};
use kvmerger_compression::recipe::Value;
use kvmerger_compression::{registry, Recipe, RecipeError, ScheduleFiles};
use kvmerger_engine::compressor::{CompressReport, Compressor};
use std::collections::BTreeMap;
use std::sync::Arc;

pub fn build(a: &CompressArgs) -> Result<Arc<Compressor>> {
    let r = recipe(a)?;
    Ok(Arc::new(Compressor::from_recipe(&r)?))
}

/// The flag that sets a recipe field, for error messages.
fn flag(field: &str) -> String {
    match field {
        "method" => "--method".into(),
        "budget" => "--budget".into(),
        "schedule" => "--schedule".into(),
        "recompress_margin" => "--recompress-margin".into(),
        "prefill_chunk" => "--prefill-chunk".into(),
        f => format!("--opt {}", f.strip_prefix("options.").unwrap_or(f)),
    }
}

/// A compressor's recipe from the TOML file of `--compress-config` with the flags laid
/// over it (flags win), validated.
pub fn recipe(a: &CompressArgs) -> Result<Recipe> {
    let mut r = Recipe::full();
    if let Some(p) = &a.compress_config {
        let text = super::text::read_text(p, "compression config")?;
        let map: BTreeMap<String, Value> = toml::from_str(&text)
            .with_context(|| format!("{} is not a valid compression config", p.display()))?;
        r.apply(&map, ScheduleFiles::Read)
            .map_err(|e| anyhow!("{}: {}: {}", p.display(), e.field, e.message))?;
    }
    let on_flag = |e: RecipeError| anyhow!("{}: {}", flag(&e.field), e.message);
    let set = |r: &mut Recipe, key: &str, v: Option<String>| -> Result<()> {
        match v {
            Some(v) => r.set(key, &v, ScheduleFiles::Read).map_err(on_flag),
            None => Ok(()),
        }
    };
    set(&mut r, "method", a.method.clone())?;
    set(&mut r, "budget", a.budget.clone())?;
    set(&mut r, "schedule", a.schedule.clone())?;
    set(
        &mut r,
        "recompress_margin",
        a.recompress_margin.map(|m| m.to_string()),
    )?;
    set(
        &mut r,
        "prefill_chunk",
        a.prefill_chunk.map(|m| m.to_string()),
    )?;
    for pair in &a.opts {
        r.options
            .parse_pair(pair)
            .map_err(|e| anyhow!("--opt: {e}"))?;
    }
    match r.validate() {
        Ok(_) => Ok(r),
        Err(e) if e.field == "budget" && r.budget.is_none() => bail!(
            "--budget is required with --method {} (e.g. --budget 0.5)",
            r.method
        ),
        Err(e) => Err(on_flag(e)),
    }
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
