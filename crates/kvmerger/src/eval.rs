//! `kvmerger eval`: run a grid (resumable, shardable), merge shards, write reports.

use crate::cli::EVAL_PRECISION;
use crate::cli::{EvalArgs, EvalCommand, EvalReportArgs, EvalRunArgs};
use crate::shared::progress::Bar;
use crate::shared::session::load_model;
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use kvmerger_assets::{self as assets, Progress};
use kvmerger_eval::grid::{GridSpec, Protocol, Shard, WorkItem, TEXT_TASK};
use kvmerger_eval::records::{self, Record};
use kvmerger_eval::runner::{Observer, Runner, TextSource};
use kvmerger_eval::sample::Sample;
use kvmerger_eval::sources::TaskSamples;
use kvmerger_eval::{report, tasks};
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub fn run(a: EvalArgs, dir: &Path) -> Result<()> {
    match a.command {
        EvalCommand::Run(r) => run_grid(*r, dir),
        EvalCommand::Report(r) => report_cmd(r, false),
        EvalCommand::Merge(r) => report_cmd(r, true),
        EvalCommand::Tasks => {
            for t in tasks::task_names() {
                println!("{t}");
            }
            println!("{TEXT_TASK}  (perplexity and fidelity to the full cache on a long text)");
            println!(
                "longbench/<dataset>, zeroscrolls/<dataset>, ruler/<task>  (with --longbench/--zeroscrolls/--ruler FILE)"
            );
            Ok(())
        }
    }
}

/// The grid: the TOML file if any, with command-line flags overriding its fields.
fn grid_spec(a: &EvalRunArgs) -> Result<GridSpec> {
    let mut g = match &a.config {
        Some(p) => {
            let text = crate::shared::text::read_text(p, "grid config")?;
            GridSpec::from_toml(&text).with_context(|| format!("in {}", p.display()))?
        }
        None => GridSpec {
            methods: "kvmerger,h2o,streaming"
                .split(',')
                .map(String::from)
                .collect(),
            budgets: vec!["0.5".into(), "0.35".into()],
            tasks: vec!["niah_single_2".into()],
            lengths: vec![4096],
            ..Default::default()
        },
    };
    if let Some(v) = &a.methods {
        g.methods = split_methods(v);
    }
    if let Some(v) = &a.budgets {
        g.budgets = v.clone();
    }
    if let Some(v) = &a.tasks {
        g.tasks = v.clone();
    }
    if let Some(v) = &a.lengths {
        g.lengths = v.clone();
    }
    if let Some(v) = a.samples {
        g.samples = v;
    }
    if let Some(v) = a.seed {
        g.seed = v;
    }
    if let Some(v) = &a.text {
        g.text = v.clone();
    }
    if let Some(v) = a.ppl_tokens {
        g.ppl_tokens = v;
    }
    if a.recompress_margin.is_some() {
        g.recompress_margin = a.recompress_margin;
    }
    if let Some(p) = &a.protocol {
        g.protocol = p.parse()?;
    }
    if g.methods.iter().any(|m| m == "all") {
        g.methods = kvmerger_compression::registry::names()
            .iter()
            .filter(|m| **m != "full")
            .map(|s| s.to_string())
            .collect();
    }
    Ok(g)
}

/// Split a comma-separated method list where a method's own options also use commas:
/// a `key=value` piece without a `:` continues the method before it.
fn split_methods(s: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for piece in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match out.last_mut() {
            // `key=value` (a method name never holds '='; a value may hold ':', as in
            // `schedule=pyramid:0.5`) continues the previous method's options.
            Some(last) if is_option(piece) && last.contains(':') => {
                last.push(',');
                last.push_str(piece);
            }
            _ => out.push(piece.to_string()),
        }
    }
    out
}

fn is_option(piece: &str) -> bool {
    match (piece.find('='), piece.find(':')) {
        (Some(eq), Some(colon)) => eq < colon,
        (Some(_), None) => true,
        _ => false,
    }
}

struct EvalBar {
    bar: ProgressBar,
    /// When this run started and how many samples were already done then: the ETA
    /// counts only samples evaluated now.
    start: std::cell::Cell<(std::time::Instant, u64)>,
    /// Not a terminal (a batch job's log): plain lines instead of a bar.
    plain: bool,
}

impl EvalBar {
    /// A progress bar on stderr, ticking twice a second (plain lines when not a terminal).
    fn new() -> EvalBar {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(
                "[{elapsed_precise}] [{bar:30}] {pos}/{len} samples, eta {eta} | {msg}",
            )
            .unwrap()
            .progress_chars("=> "),
        );
        bar.enable_steady_tick(Duration::from_millis(500));
        EvalBar {
            bar,
            start: std::cell::Cell::new((std::time::Instant::now(), 0)),
            plain: !std::io::stderr().is_terminal(),
        }
    }

    fn line(&self, s: String) {
        if self.plain {
            eprintln!("{s}");
        } else {
            self.bar.println(s);
        }
    }
}

impl Observer for EvalBar {
    fn begin(&self, total: usize, done: usize) {
        self.bar.set_length(total as u64);
        self.bar.set_position(done as u64);
        self.bar.reset_eta();
        self.start.set((std::time::Instant::now(), done as u64));
        if done > 0 {
            self.line(format!("resuming: {done} of {total} samples already done"));
        }
    }
    fn stage(&self, item: &WorkItem, what: &str) {
        self.bar.set_message(format!(
            "{} {} #{}: {what}",
            item.task, item.length, item.index
        ));
    }
    fn item_done(&self, item: &WorkItem, records: &[Record]) {
        self.bar.inc(1);
        let pos = self.bar.position();
        let len = self.bar.length().unwrap_or(0);
        let (t0, done0) = self.start.get();
        let per = t0.elapsed().as_secs_f64() / pos.saturating_sub(done0).max(1) as f64;
        let eta = (per * len.saturating_sub(pos) as f64) as u64;
        let full = records.iter().find(|r| r.config == "full");
        let mean = |f: &dyn Fn(&Record) -> Option<f64>| {
            let v: Vec<f64> = records
                .iter()
                .filter(|r| r.config != "full")
                .filter_map(f)
                .collect();
            (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
        };
        let line = match (full.and_then(|r| r.score), mean(&|r| r.score)) {
            (Some(f), Some(m)) => format!("full {:.2}, compressed mean {m:.2}", f),
            _ => match (full.and_then(|r| r.ppl), mean(&|r| r.kl)) {
                (Some(p), Some(k)) => format!("full ppl {p:.2}, compressed mean KL {k:.4}"),
                _ => String::new(),
            },
        };
        let progress = if self.plain {
            format!("[{pos}/{len}, eta {}h{:02}m] ", eta / 3600, eta / 60 % 60)
        } else {
            String::new()
        };
        self.line(format!(
            "{progress}{} {} #{}: {line}",
            item.task, item.length, item.index
        ));
    }
}

fn run_grid(a: EvalRunArgs, dir: &Path) -> Result<()> {
    let mut spec = grid_spec(&a)?;
    let spec_given = a.config.is_some() || a.tasks.is_some();
    let shard: Shard = match &a.shard {
        Some(s) => s.parse()?,
        None => Shard::WHOLE,
    };
    let files = read_task_files(&a, &mut spec, spec_given)?;
    check_grid(&spec, &files)?;
    let ruler_dir = fetch_ruler_if_needed(&spec, dir)?;
    let text = if spec.tasks.iter().any(|t| t == TEXT_TASK) {
        Some(load_text(&spec.text, dir)?)
    } else {
        None
    };
    let mut model = a.model.clone();
    model.precision = Some(model.precision_or(EVAL_PRECISION).to_string());
    let (lm, dtype) = load_model(&model, dir)?;
    let run = format!(
        "{} kv={} precision={}",
        lm.name,
        model.kv_dtype,
        model.precision_or(EVAL_PRECISION)
    );
    let mut source = TaskSamples::new(&lm, ruler_dir, spec.seed);
    source.files = files;
    let out = a.out.clone();
    write_grid_file(&out, &spec, &run)?;
    let configs = spec.configs()?.len();
    eprintln!(
        "{run}: {} samples × {configs} configurations (full + {} methods × {} budgets), shard {}/{}, results in {}",
        spec.items().len(),
        spec.methods.iter().filter(|m| *m != "full").count(),
        spec.budgets.len(),
        shard.index,
        shard.count,
        out.join(shard.file_name()).display()
    );
    let runner = Runner {
        lm: &lm,
        dtype,
        run,
        spec: &spec,
        samples: &source,
        text: text.as_ref(),
    };
    let obs = EvalBar::new();
    let summary = runner.run(&out, shard, &obs);
    obs.bar.finish_and_clear();
    let summary = summary?;
    eprintln!(
        "{} samples: {} evaluated now, {} already done",
        summary.items, summary.evaluated, summary.skipped
    );
    if !a.no_report {
        write_reports(std::slice::from_ref(&out), &out, false, &[])?;
    }
    Ok(())
}

/// Reads the --longbench, --zeroscrolls and --ruler files into samples by task,
/// adding their tasks to the grid unless a config or --tasks chose the tasks.
fn read_task_files(
    a: &EvalRunArgs,
    spec: &mut GridSpec,
    spec_given: bool,
) -> Result<BTreeMap<String, Vec<Sample>>> {
    let mut files = BTreeMap::new();
    let mut inputs: Vec<(&str, &PathBuf)> = Vec::new();
    inputs.extend(a.longbench.iter().map(|p| ("longbench", p)));
    inputs.extend(a.zeroscrolls.iter().map(|p| ("zeroscrolls", p)));
    inputs.extend(a.ruler.iter().map(|p| ("RULER", p)));
    for (kind, path) in inputs {
        let by_task = read_task_file(kind, path, a.dataset.as_deref())?;
        for (t, mut v) in by_task {
            if files.contains_key(&t) {
                bail!(
                    "{}: task {t} was already read from another file",
                    path.display()
                );
            }
            for (i, s) in v.iter_mut().enumerate() {
                s.index = i;
            }
            if !spec_given && !spec.tasks.contains(&t) {
                spec.tasks.push(t.clone());
            }
            files.insert(t, v);
        }
    }
    let from_files = a.longbench.is_some() || a.zeroscrolls.is_some() || !a.ruler.is_empty();
    if from_files && !spec_given {
        spec.tasks.retain(|t| files.contains_key(t));
    }
    Ok(files)
}

/// Reads one task file of the given kind, warns of its skipped lines, and groups its
/// samples by task.
fn read_task_file(
    kind: &str,
    path: &Path,
    dataset: Option<&str>,
) -> Result<BTreeMap<String, Vec<Sample>>> {
    let read = match kind {
        "longbench" => tasks::read_longbench(path, dataset),
        "zeroscrolls" => tasks::read_zeroscrolls(path, dataset),
        _ => tasks::read_ruler(path, None),
    }
    .with_context(|| format!("reading the {kind} file {}", path.display()))?;
    for e in &read.errors {
        eprintln!(
            "warning: {}:{}: {} (line skipped)",
            path.display(),
            e.line,
            e.message
        );
    }
    if read.samples.is_empty() {
        bail!("{}: no usable samples", path.display());
    }
    let mut by_task: BTreeMap<String, Vec<_>> = Default::default();
    for s in read.samples {
        by_task.entry(s.task.clone()).or_default().push(s);
    }
    Ok(by_task)
}

/// Validates the grid against the known tasks, refuses file samples the query-agnostic
/// protocol cannot cut, and notes tasks with fewer samples than asked for.
fn check_grid(spec: &GridSpec, files: &BTreeMap<String, Vec<Sample>>) -> Result<()> {
    let mut known: Vec<&str> = tasks::task_names().to_vec();
    known.extend(files.keys().map(|s| s.as_str()));
    spec.validate(&known)?;
    // The query-agnostic protocol needs every sample cut at its question: say so now,
    // not after the first prefill.
    let configs = spec.configs()?;
    if configs
        .iter()
        .any(|c| c.protocol == Protocol::Agnostic && c.budget.is_some())
    {
        for t in &spec.tasks {
            if let Some(s) = files
                .get(t)
                .and_then(|v| v.iter().take(spec.samples).find(|s| s.split().is_none()))
            {
                bail!(
                    "{t} sample {} does not say where its question starts, which the query-agnostic \
                     protocol needs; run it with --protocol aware",
                    s.index
                );
            }
        }
    }
    for t in &spec.tasks {
        if let Some(v) = files.get(t) {
            if spec.samples > v.len() {
                eprintln!("note: {t} has {} samples; evaluating those", v.len());
            }
        }
    }
    Ok(())
}

/// Fetches the RULER data when a built-in task needs it (an empty path otherwise).
fn fetch_ruler_if_needed(spec: &GridSpec, dir: &Path) -> Result<PathBuf> {
    let needs_ruler = spec
        .tasks
        .iter()
        .any(|t| tasks::task_names().contains(&t.as_str()));
    Ok(if needs_ruler {
        let bar = Bar::new();
        let r = assets::fetch("ruler", dir, &bar);
        bar.finish();
        r.context("fetching the RULER data")?
    } else {
        PathBuf::new()
    })
}

/// Creates the output directory and writes the grid to its `grid.toml` unless one is there.
fn write_grid_file(out: &Path, spec: &GridSpec, run: &str) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let grid_file = out.join("grid.toml");
    if !grid_file.exists() {
        let text = toml::to_string(spec).context("writing the grid")?;
        std::fs::write(&grid_file, format!("# model: {run}\n{text}"))
            .with_context(|| format!("writing {}", grid_file.display()))?;
    }
    Ok(())
}

fn load_text(spec: &str, dir: &Path) -> Result<TextSource> {
    if spec == "austen" {
        let bar = Bar::new();
        let r = assets::fetch("austen", dir, &bar);
        bar.finish();
        let d = r.context("fetching the Jane Austen novels")?;
        let documents =
            tasks::text::austen(&d).with_context(|| format!("reading {}", d.display()))?;
        return Ok(TextSource { documents });
    }
    let p = PathBuf::from(spec);
    let text = tasks::text::read_text_file(&p).context("reading the --text file")?;
    let title = p
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| spec.to_string());
    Ok(TextSource {
        documents: vec![(title, text)],
    })
}

fn report_cmd(a: EvalReportArgs, merge: bool) -> Result<()> {
    let out = a.out.clone().unwrap_or_else(|| a.dirs[0].clone());
    let decision: Vec<String> = a
        .decision
        .iter()
        .flat_map(|s| s.split(','))
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    write_reports(&a.dirs, &out, merge, &decision)
}

fn write_reports(dirs: &[PathBuf], out: &Path, merge: bool, decision: &[String]) -> Result<()> {
    let c = records::collect(dirs)?;
    for b in &c.bad {
        eprintln!(
            "warning: {}:{}: not a record ({}); skipped",
            b.path.display(),
            b.line,
            b.message
        );
    }
    for k in &c.conflicts {
        eprintln!(
            "warning: two different results for {} / {} {} #{} / {}; kept the first",
            k.0, k.1, k.2, k.3, k.4
        );
    }
    if c.records.is_empty() {
        bail!(
            "no results found in {}",
            dirs.iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    if merge {
        let mut text = String::new();
        for r in &c.records {
            text.push_str(&serde_json::to_string(r)?);
            text.push('\n');
        }
        kvmerger_eval::plot::write_atomic(&out.join("samples.merged.jsonl"), text.as_bytes())
            .map_err(anyhow::Error::msg)?;
        eprintln!(
            "merged {} records from {} files into {}",
            c.records.len(),
            c.files.len(),
            out.join("samples.merged.jsonl").display()
        );
    }
    let mut files = report::write_all(&c.records, out).map_err(anyhow::Error::msg)?;
    if !decision.is_empty() {
        files.extend(
            report::decision_chart(&c.records, decision, &out.join("decision"))
                .map_err(anyhow::Error::msg)?,
        );
    }
    if !kvmerger_eval::plot::have_fonts() {
        eprintln!("note: no fonts are installed, so the PNG charts have no text (the SVGs do)");
    }
    // The summary just written, not computed again: its bootstrap intervals take seconds
    // on a large grid.
    let summary_path = out.join("summary.md");
    let summary = std::fs::read_to_string(&summary_path)
        .with_context(|| format!("reading {}", summary_path.display()))?;
    print!("{summary}");
    eprintln!(
        "wrote {} files to {} ({} records)",
        files.len(),
        out.display(),
        c.records.len()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn method_lists_keep_each_methods_options_together() {
        assert_eq!(
            super::split_methods("kvmerger, kvmerger:sigma=2,mass=none,h2o,snapkv:window=8"),
            [
                "kvmerger",
                "kvmerger:sigma=2,mass=none",
                "h2o",
                "snapkv:window=8"
            ]
        );
        assert_eq!(
            super::split_methods(
                "kvmerger:schedule=pyramid:0.5,h2o:recent=0.1,schedule=pyramid:0.2,tova"
            ),
            [
                "kvmerger:schedule=pyramid:0.5",
                "h2o:recent=0.1,schedule=pyramid:0.2",
                "tova"
            ]
        );
    }
}
