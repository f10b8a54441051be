//! Summaries of a grid's records: a Markdown table and a CSV of means per
//! configuration, paired comparisons on the same samples (against the full cache and
//! against the best other method at the same budget, with bootstrap intervals and sign
//! tests, and whether each configuration kept no more than its budget), and the charts
//! (score against budget, per-task bars, NIAH depth × length heatmaps, perplexity and
//! fidelity).

use crate::plot::{self, Series};
use crate::records::Record;
use crate::stats::{self, Interval, PairedDifference};
use kvmerger_compression::Budget;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Means over the samples of one (run, task, length, config).
#[derive(Clone, Debug, PartialEq)]
pub struct Cell {
    pub run: String,
    pub task: String,
    pub length: usize,
    pub config: String,
    pub method: String,
    pub budget: String,
    pub n: usize,
    pub score: Option<f64>,
    pub kv_ratio: f64,
    pub ppl: Option<f64>,
    pub kl: Option<f64>,
    pub top1: Option<f64>,
}

fn mean(v: impl Iterator<Item = f64>) -> Option<f64> {
    let (s, n) = v.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    (n > 0).then(|| s / n as f64)
}

/// Order configurations: full first, then by budget (largest first), then by method in
/// order of first appearance.
fn config_order(records: &[Record]) -> Vec<String> {
    let mut seen: Vec<(String, String, String)> = Vec::new();
    for r in records {
        if !seen.iter().any(|s| s.0 == r.config) {
            seen.push((r.config.clone(), r.method.clone(), r.budget.clone()));
        }
    }
    let methods: Vec<String> = seen.iter().fold(Vec::new(), |mut v, s| {
        if !v.contains(&s.1) {
            v.push(s.1.clone());
        }
        v
    });
    seen.sort_by(|a, b| {
        let fa = a.1 == "full";
        let fb = b.1 == "full";
        fb.cmp(&fa)
            .then(budget_value(&b.2).total_cmp(&budget_value(&a.2)))
            .then(
                methods
                    .iter()
                    .position(|m| *m == a.1)
                    .cmp(&methods.iter().position(|m| *m == b.1)),
            )
            .then(a.0.cmp(&b.0))
    });
    seen.into_iter().map(|s| s.0).collect()
}

/// The configuration a record belongs to without its budget: the name of its line in
/// a chart against the budget (`kvmerger+:protocol=aware@0.5` -> `kvmerger+:protocol=aware`).
/// Two configurations of one method (another protocol, other options, another layer
/// schedule) are two lines, never one mean.
pub fn series_name(config: &str) -> &str {
    match config.rsplit_once('@') {
        Some((name, _)) => name,
        None => config,
    }
}

/// A budget label as a number for ordering and plotting: fractions as themselves,
/// percentages divided by 100, token counts as they are.
pub fn budget_value(label: &str) -> f64 {
    let t = label.trim();
    if let Some(p) = t.strip_suffix('%') {
        return p
            .trim()
            .parse::<f64>()
            .map(|v| v / 100.0)
            .unwrap_or(f64::NAN);
    }
    t.parse::<f64>().unwrap_or(f64::NAN)
}

pub fn cells(records: &[Record]) -> Vec<Cell> {
    let mut groups: BTreeMap<(String, String, usize, String), Vec<&Record>> = BTreeMap::new();
    for r in records {
        groups
            .entry((r.run.clone(), r.task.clone(), r.length, r.config.clone()))
            .or_default()
            .push(r);
    }
    groups
        .into_iter()
        .map(|((run, task, length, config), rs)| Cell {
            run,
            task,
            length,
            method: rs[0].method.clone(),
            budget: rs[0].budget.clone(),
            config,
            n: rs.len(),
            score: mean(rs.iter().filter_map(|r| r.score)),
            kv_ratio: mean(rs.iter().map(|r| r.kv_ratio())).unwrap_or(1.0),
            ppl: mean(rs.iter().filter_map(|r| r.ppl)),
            kl: mean(rs.iter().filter_map(|r| r.kl)),
            top1: mean(rs.iter().filter_map(|r| r.top1)),
        })
        .collect()
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map(|x| format!("{x:.digits$}")).unwrap_or_default()
}

/// A CSV field, quoted when it must be.
fn csv_field(t: &str) -> String {
    if t.contains([',', '"', '\n']) {
        format!("\"{}\"", t.replace('"', "\"\""))
    } else {
        t.to_string()
    }
}

pub fn csv(cells: &[Cell]) -> String {
    let mut s = String::from("run,task,length,config,method,budget,n,score,kv_ratio,ppl,kl,top1\n");
    let q = csv_field;
    for c in cells {
        let _ = writeln!(
            s,
            "{},{},{},{},{},{},{},{},{:.4},{},{},{}",
            q(&c.run),
            q(&c.task),
            c.length,
            q(&c.config),
            q(&c.method),
            q(&c.budget),
            c.n,
            opt(c.score, 4),
            c.kv_ratio,
            opt(c.ppl, 4),
            opt(c.kl, 5),
            opt(c.top1, 4)
        );
    }
    s
}

/// The `task` of a paired row that pools every answer task of its run.
pub const ALL_TASKS: &str = "all";

/// How far (relative) a configuration's kept share may exceed its nominal budget before
/// it is flagged: rounding a fraction of each head to whole slots overshoots a little.
pub const PARITY_TOLERANCE: f64 = 0.005;

/// What a configuration kept against what its budget allows.
#[derive(Clone, Debug, PartialEq)]
pub struct Parity {
    /// Mean share of the full cache's KV bytes kept (None: no record says).
    pub bytes_kept: Option<f64>,
    /// Mean share of the full cache's slots kept, over the records that count slots.
    pub slots_kept: Option<f64>,
    /// The budget as a share of the full cache (mean over samples for token counts).
    pub nominal: Option<f64>,
    /// Bytes or slots kept exceed the nominal share by more than [`PARITY_TOLERANCE`]:
    /// the configuration is compared with others at a budget it did not keep to.
    pub over: bool,
}

/// One configuration's answer-task scores in one scope of a run (every task pooled, or
/// one task), compared sample by sample with the full cache and with the best other
/// compressed configuration at the same budget and protocol.
#[derive(Clone, Debug, PartialEq)]
pub struct PairedRow {
    pub run: String,
    /// A task, or [`ALL_TASKS`].
    pub task: String,
    pub config: String,
    pub method: String,
    pub budget: String,
    pub protocol: String,
    /// Samples scored.
    pub n: usize,
    pub mean: f64,
    /// Bootstrap interval of the mean over samples.
    pub interval: Interval,
    /// This minus the full cache, on the samples both have (None for the full cache, or
    /// when the run has none).
    pub vs_full: Option<PairedDifference>,
    /// The best other configuration at this budget and protocol, and this minus it.
    pub vs_best_other: Option<(String, PairedDifference)>,
    pub parity: Parity,
}

/// A sample of a run: task, length, index.
type SampleKey = (String, usize, usize);

/// The records of one configuration (label and protocol) in one scope.
struct Scored<'a> {
    config: &'a str,
    method: &'a str,
    budget: &'a str,
    protocol: &'a str,
    scores: BTreeMap<SampleKey, f64>,
    records: Vec<&'a Record>,
}

impl Scored<'_> {
    fn is_full(&self) -> bool {
        self.method == "full"
    }

    /// (this, other) scores on the samples both have.
    fn pairs(&self, other: &Scored) -> Vec<(f64, f64)> {
        self.scores
            .iter()
            .filter_map(|(k, &a)| other.scores.get(k).map(|&b| (a, b)))
            .collect()
    }
}

/// The share of the full cache a budget allows on a sample of `prompt_tokens` tokens:
/// fractions and percentages as they are, a token count divided by the prompt's tokens
/// (at most everything), the full cache 1. None for a label that is not a budget.
pub fn nominal_share(method: &str, budget: &str, prompt_tokens: usize) -> Option<f64> {
    if method == "full" {
        return Some(1.0);
    }
    match budget.parse::<Budget>().ok()? {
        Budget::Fraction(f) => Some(f),
        Budget::Tokens(_) if prompt_tokens == 0 => None,
        Budget::Tokens(t) => Some((t as f64 / prompt_tokens as f64).min(1.0)),
    }
}

/// Budget parity of one configuration's records.
pub fn parity(method: &str, budget: &str, records: &[&Record]) -> Parity {
    let bytes_kept = mean(
        records
            .iter()
            .filter(|r| r.kv_bytes_full > 0)
            .map(|r| r.kv_bytes as f64 / r.kv_bytes_full as f64),
    );
    // Records written before slots were counted have 0 for both: no evidence either way.
    let slots_kept = mean(
        records
            .iter()
            .filter(|r| r.kv_slots_full > 0)
            .map(|r| r.kv_slots as f64 / r.kv_slots_full as f64),
    );
    let shares: Option<Vec<f64>> = records
        .iter()
        .map(|r| nominal_share(method, budget, r.prompt_tokens))
        .collect();
    let nominal = shares.and_then(|v| mean(v.into_iter()));
    let over = nominal.is_some_and(|n| {
        [bytes_kept, slots_kept]
            .into_iter()
            .flatten()
            .any(|kept| kept > n * (1.0 + PARITY_TOLERANCE))
    });
    Parity {
        bytes_kept,
        slots_kept,
        nominal,
        over,
    }
}

/// Paired comparisons of every configuration of every run: first the run's answer tasks
/// pooled ([`ALL_TASKS`]), then each task; configurations in the summary table's order.
/// Text tasks (perplexity) have no per-sample score and are left out.
pub fn paired_rows(records: &[Record]) -> Vec<PairedRow> {
    let order = config_order(records);
    let answer: Vec<&Record> = records.iter().filter(|r| r.score.is_some()).collect();
    let runs: BTreeSet<&str> = answer.iter().map(|r| r.run.as_str()).collect();
    let mut rows = Vec::new();
    for run in runs {
        let in_run: Vec<&Record> = answer.iter().filter(|r| r.run == run).copied().collect();
        let tasks: BTreeSet<&str> = in_run.iter().map(|r| r.task.as_str()).collect();
        let scopes = std::iter::once(None).chain(tasks.into_iter().map(Some));
        for scope in scopes {
            let in_scope: Vec<&Record> = in_run
                .iter()
                .filter(|r| scope.is_none_or(|t| r.task == t))
                .copied()
                .collect();
            rows.extend(compare(run, scope.unwrap_or(ALL_TASKS), &in_scope, &order));
        }
    }
    rows
}

fn compare(run: &str, task: &str, records: &[&Record], order: &[String]) -> Vec<PairedRow> {
    // A label names one configuration, but records merged from before and after
    // protocols existed may share a label under two protocols: those are two
    // experiments, so a configuration is a (label, protocol).
    let mut configs: Vec<Scored> = Vec::new();
    for label in order {
        let protocols: BTreeSet<&str> = records
            .iter()
            .filter(|r| r.config == *label)
            .map(|r| r.protocol.as_str())
            .collect();
        for protocol in protocols {
            let rs: Vec<&Record> = records
                .iter()
                .filter(|r| r.config == *label && r.protocol == protocol)
                .copied()
                .collect();
            configs.push(Scored {
                config: label,
                method: &rs[0].method,
                budget: &rs[0].budget,
                protocol,
                scores: rs
                    .iter()
                    .filter_map(|r| Some(((r.task.clone(), r.length, r.index), r.score?)))
                    .collect(),
                records: rs,
            });
        }
    }
    // The full cache answers the same under either protocol, so any full cache will
    // do as the reference; one of the same protocol is preferred.
    let full_for = |protocol: &str| {
        configs
            .iter()
            .filter(|c| c.is_full())
            .min_by_key(|c| c.protocol != protocol)
    };
    let compare_with = |this: &Scored, other: &Scored| {
        PairedDifference::of(&this.pairs(other), stats::RESAMPLES, stats::SEED)
    };
    configs
        .iter()
        .map(|this| {
            let values: Vec<f64> = this.scores.values().copied().collect();
            let vs_full = if this.is_full() {
                None
            } else {
                full_for(this.protocol).and_then(|full| compare_with(this, full))
            };
            // The best rival is judged on the samples it shares with this one, so that
            // a rival scored on easier samples does not win by that alone.
            let mut best: Option<(&Scored, f64)> = None;
            if !this.is_full() {
                for other in configs.iter().filter(|o| {
                    !o.is_full()
                        && o.budget == this.budget
                        && o.protocol == this.protocol
                        && o.config != this.config
                }) {
                    let Some(m) =
                        stats::mean(&this.pairs(other).iter().map(|p| p.1).collect::<Vec<_>>())
                    else {
                        continue;
                    };
                    if best.is_none_or(|(_, b)| m > b) {
                        best = Some((other, m));
                    }
                }
            }
            PairedRow {
                run: run.to_string(),
                task: task.to_string(),
                config: this.config.to_string(),
                method: this.method.to_string(),
                budget: this.budget.to_string(),
                protocol: this.protocol.to_string(),
                n: values.len(),
                mean: stats::mean(&values).unwrap_or(f64::NAN),
                interval: stats::bootstrap_mean_interval(&values, stats::RESAMPLES, stats::SEED)
                    .unwrap_or(Interval {
                        low: f64::NAN,
                        high: f64::NAN,
                    }),
                vs_full,
                vs_best_other: best.and_then(|(other, _)| {
                    compare_with(this, other).map(|d| (other.config.to_string(), d))
                }),
                parity: parity(this.method, this.budget, &this.records),
            }
        })
        .collect()
}

fn percent(v: Option<f64>) -> String {
    v.map(|x| format!("{:.1}%", x * 100.0))
        .unwrap_or_else(|| "—".into())
}

fn p_value(p: f64) -> String {
    if p >= 0.001 {
        format!("{p:.3}")
    } else {
        format!("{p:.1e}")
    }
}

/// `+1.5 [−0.5, +3.5]`: a difference ×100 and its interval.
fn difference(d: &PairedDifference) -> String {
    format!(
        "{:+.1} [{:+.1}, {:+.1}]",
        d.mean * 100.0,
        d.interval.low * 100.0,
        d.interval.high * 100.0
    )
}

/// The paired-comparison table of one run's pooled rows.
fn paired_markdown(rows: &[&PairedRow]) -> String {
    let mut s = String::from("#### Paired comparison\n\n");
    s.push_str(
        "| config | protocol | n | mean ×100 [95% CI] | Δ vs full ×100 [95% CI] | W/L/T | p | verdict \
         | best other at budget | Δ vs it ×100 [95% CI] | W/L/T | verdict \
         | KV kept | slots kept | nominal | parity |\n",
    );
    s.push_str("|---|---|---:|---:|---:|---:|---:|---|---|---:|---:|---|---:|---:|---:|---|\n");
    let counts = |d: &PairedDifference| format!("{}/{}/{}", d.wins, d.losses, d.ties);
    for r in rows {
        let _ = write!(
            s,
            "| {} | {} | {} | {:.1} [{:.1}, {:.1}] |",
            r.config,
            r.protocol,
            r.n,
            r.mean * 100.0,
            r.interval.low * 100.0,
            r.interval.high * 100.0
        );
        match &r.vs_full {
            Some(d) => {
                let _ = write!(
                    s,
                    " {} | {} | {} | {} |",
                    difference(d),
                    counts(d),
                    p_value(d.p_value),
                    d.verdict().name()
                );
            }
            None => s.push_str(" — | — | — | — |"),
        }
        match &r.vs_best_other {
            Some((other, d)) => {
                let _ = write!(
                    s,
                    " {other} | {} | {} | {} |",
                    difference(d),
                    counts(d),
                    d.verdict().name()
                );
            }
            None => s.push_str(" — | — | — | — |"),
        }
        let flag = match (r.parity.nominal, r.parity.over) {
            (None, _) => "—",
            (Some(_), true) => "⚠ over",
            (Some(_), false) => "ok",
        };
        let _ = writeln!(
            s,
            " {} | {} | {} | {flag} |",
            percent(r.parity.bytes_kept),
            percent(r.parity.slots_kept),
            percent(r.parity.nominal)
        );
    }
    let _ = writeln!(
        s,
        "\nEvery answer sample of the run pooled (the mean column above averages the columns \
         instead). 95% intervals: percentile bootstrap over samples ({} resamples, fixed seed). \
         Δ: this configuration minus the other on the samples both have; W/L/T: samples it \
         scored higher, lower, the same; p: two-sided exact sign test over the untied samples; \
         verdict: tie when the interval covers 0. Best other: the other compressed configuration \
         with the highest mean at the same budget and protocol, on the shared samples. KV kept \
         and slots kept: mean share of the full cache; nominal: the budget as a share (a token \
         count over the prompt's tokens); ⚠ over: kept more than {}% above nominal. Per-task \
         comparisons are in paired.csv.\n",
        stats::RESAMPLES,
        PARITY_TOLERANCE * 100.0
    );
    s
}

/// Every paired row as CSV: scores and differences as fractions, p-values in full.
pub fn paired_csv(rows: &[PairedRow]) -> String {
    let mut s = String::from(
        "run,task,config,method,budget,protocol,n,mean,mean_low,mean_high,\
         full_n,full_diff,full_diff_low,full_diff_high,full_wins,full_losses,full_ties,full_p,full_verdict,\
         best_other,best_other_n,best_other_diff,best_other_diff_low,best_other_diff_high,\
         best_other_wins,best_other_losses,best_other_ties,best_other_p,best_other_verdict,\
         kv_kept,slots_kept,nominal,over_budget\n",
    );
    let comparison = |d: Option<&PairedDifference>| match d {
        Some(d) => format!(
            "{},{:.4},{:.4},{:.4},{},{},{},{:.4e},{}",
            d.n,
            d.mean,
            d.interval.low,
            d.interval.high,
            d.wins,
            d.losses,
            d.ties,
            d.p_value,
            d.verdict().name()
        ),
        None => ",,,,,,,,".into(),
    };
    for r in rows {
        let _ = writeln!(
            s,
            "{},{},{},{},{},{},{},{:.4},{:.4},{:.4},{},{},{},{},{},{},{}",
            csv_field(&r.run),
            csv_field(&r.task),
            csv_field(&r.config),
            csv_field(&r.method),
            csv_field(&r.budget),
            csv_field(&r.protocol),
            r.n,
            r.mean,
            r.interval.low,
            r.interval.high,
            comparison(r.vs_full.as_ref()),
            r.vs_best_other
                .as_ref()
                .map(|(c, _)| csv_field(c))
                .unwrap_or_default(),
            comparison(r.vs_best_other.as_ref().map(|(_, d)| d)),
            opt(r.parity.bytes_kept, 4),
            opt(r.parity.slots_kept, 4),
            opt(r.parity.nominal, 4),
            r.parity.over
        );
    }
    s
}

fn short_len(l: usize) -> String {
    if l >= 1024 && l.is_multiple_of(1024) {
        format!("{}k", l / 1024)
    } else {
        l.to_string()
    }
}

/// The Markdown summary: per run, a table of answer-task scores (×100) with one column
/// per task and length, the paired comparison of its configurations, and a table of
/// perplexity and fidelity. The best compressed score of each budget in each column is
/// in bold.
pub fn markdown(records: &[Record]) -> String {
    markdown_with(records, &paired_rows(records))
}

/// [`markdown`] with the paired rows already computed (the bootstrap is the slow part).
fn markdown_with(records: &[Record], paired: &[PairedRow]) -> String {
    let cells = cells(records);
    let order = config_order(records);
    let runs: BTreeSet<&str> = cells.iter().map(|c| c.run.as_str()).collect();
    let mut s = String::new();
    for run in runs {
        let cs: Vec<&Cell> = cells.iter().filter(|c| c.run == run).collect();
        let _ = writeln!(s, "### {run}\n");
        write_score_table(&mut s, run, &cs, &order, paired);
        write_text_table(&mut s, &cs, &order);
    }
    s
}

/// The run's score table (one row per configuration, one column per task and length,
/// best compressed scores in bold), with its note and the pooled paired rows.
fn write_score_table(
    s: &mut String,
    run: &str,
    cs: &[&Cell],
    order: &[String],
    paired: &[PairedRow],
) {
    let cols: BTreeSet<(String, usize)> = cs
        .iter()
        .filter(|c| c.score.is_some())
        .map(|c| (c.task.clone(), c.length))
        .collect();
    let cols: Vec<(String, usize)> = cols.into_iter().collect();
    if cols.is_empty() {
        return;
    }
    let _ = write!(s, "| config | KV kept |");
    for (t, l) in &cols {
        let _ = write!(s, " {t} {} |", short_len(*l));
    }
    let _ = writeln!(s, " mean |");
    let _ = writeln!(s, "|---|---:|{}---:|", "---:|".repeat(cols.len()));
    write_score_rows(s, cs, order, &cols);
    let ns: BTreeSet<usize> = cs
        .iter()
        .filter(|c| c.score.is_some())
        .map(|c| c.n)
        .collect();
    let ns: Vec<String> = ns.iter().map(|n| n.to_string()).collect();
    let _ = writeln!(
        s,
        "\nScores ×100, mean over {} samples per cell; bold: the best compressed configuration at that budget.\n",
        ns.join("/")
    );
    let pooled: Vec<&PairedRow> = paired
        .iter()
        .filter(|r| r.run == run && r.task == ALL_TASKS)
        .collect();
    if !pooled.is_empty() {
        s.push_str(&paired_markdown(&pooled));
    }
}

/// The rows of a score table: each configuration's scores and mean, the best
/// compressed ones at each budget in bold.
fn write_score_rows(s: &mut String, cs: &[&Cell], order: &[String], cols: &[(String, usize)]) {
    let find = |cfg: &str, t: &str, l: usize| {
        cs.iter()
            .find(|c| c.config == cfg && c.task == t && c.length == l)
            .copied()
    };
    let budget_of = |cfg: &str| {
        cs.iter()
            .find(|c| c.config == cfg)
            .map(|c| c.budget.clone())
    };
    // Best compressed score per (budget, column), and the row mean.
    let row_mean = |cfg: &str| {
        mean(
            cols.iter()
                .filter_map(|(t, l)| find(cfg, t, *l).and_then(|c| c.score)),
        )
    };
    let best = |cfg: &str, col: Option<&(String, usize)>| -> bool {
        let Some(b) = budget_of(cfg) else {
            return false;
        };
        if cfg == "full" {
            return false;
        }
        let val = |c: &str| match col {
            Some((t, l)) => find(c, t, *l).and_then(|x| x.score),
            None => row_mean(c),
        };
        let Some(mine) = val(cfg) else { return false };
        order
            .iter()
            .filter(|o| o.as_str() != "full" && budget_of(o) == Some(b.clone()))
            .filter_map(|o| val(o))
            .all(|v| v <= mine + 1e-12)
    };
    for cfg in order {
        let row: Vec<&Cell> = cs
            .iter()
            .filter(|c| c.config == *cfg && c.score.is_some())
            .copied()
            .collect();
        if row.is_empty() {
            continue;
        }
        let kv = mean(row.iter().map(|c| c.kv_ratio)).unwrap_or(1.0);
        let _ = write!(s, "| {cfg} | {:.0}% |", kv * 100.0);
        for col in cols {
            match find(cfg, &col.0, col.1).and_then(|c| c.score.map(|v| (v, c.n))) {
                Some((v, _)) if best(cfg, Some(col)) => {
                    let _ = write!(s, " **{:.1}** |", v * 100.0);
                }
                Some((v, _)) => {
                    let _ = write!(s, " {:.1} |", v * 100.0);
                }
                None => s.push_str(" |"),
            }
        }
        match row_mean(cfg) {
            Some(m) if best(cfg, None) => {
                let _ = writeln!(s, " **{:.1}** |", m * 100.0);
            }
            Some(m) => {
                let _ = writeln!(s, " {:.1} |", m * 100.0);
            }
            None => s.push_str(" |\n"),
        }
    }
}

/// The run's text-task table: perplexity, KL and top-1 agreement per configuration
/// and length.
fn write_text_table(s: &mut String, cs: &[&Cell], order: &[String]) {
    let text: Vec<&Cell> = cs.iter().filter(|c| c.ppl.is_some()).copied().collect();
    if !text.is_empty() {
        let _ = writeln!(
            s,
            "| config | length | KV kept | perplexity | KL vs full | top-1 agreement | samples |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|");
        let lengths: BTreeSet<usize> = text.iter().map(|c| c.length).collect();
        for l in lengths {
            for cfg in order {
                if let Some(c) = text.iter().find(|c| c.config == *cfg && c.length == l) {
                    let _ = writeln!(
                        s,
                        "| {cfg} | {} | {:.0}% | {} | {} | {} | {} |",
                        short_len(l),
                        c.kv_ratio * 100.0,
                        opt(c.ppl, 3),
                        opt(c.kl, 4),
                        c.top1
                            .map(|v| format!("{:.1}%", v * 100.0))
                            .unwrap_or_default(),
                        c.n
                    );
                }
            }
        }
        s.push('\n');
    }
}

fn slug(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Write summary.md, summary.csv, paired.csv and the charts under `out`. Returns the
/// files written.
pub fn write_all(records: &[Record], out: &Path) -> Result<Vec<PathBuf>, String> {
    let mut files = Vec::new();
    let paired = paired_rows(records);
    let md = out.join("summary.md");
    plot::write_atomic(&md, markdown_with(records, &paired).as_bytes())?;
    files.push(md);
    let cs = cells(records);
    let csv_path = out.join("summary.csv");
    plot::write_atomic(&csv_path, csv(&cs).as_bytes())?;
    files.push(csv_path);
    let paired_path = out.join("paired.csv");
    plot::write_atomic(&paired_path, paired_csv(&paired).as_bytes())?;
    files.push(paired_path);
    let order = config_order(records);
    let runs: BTreeSet<&str> = cs.iter().map(|c| c.run.as_str()).collect();
    let multi = runs.len() > 1;
    for run in runs {
        let prefix = if multi {
            format!("{}-", slug(run))
        } else {
            String::new()
        };
        let rc: Vec<&Cell> = cs.iter().filter(|c| c.run == run).collect();
        let answer: Vec<&Cell> = rc.iter().filter(|c| c.score.is_some()).copied().collect();
        if !answer.is_empty() {
            files.extend(score_vs_budget(
                run,
                &answer,
                &out.join(format!("{prefix}score_vs_budget")),
            )?);
            let budgets: BTreeSet<String> = answer
                .iter()
                .filter(|c| c.method != "full")
                .map(|c| c.budget.clone())
                .collect();
            for b in budgets {
                files.extend(task_bars(
                    run,
                    &answer,
                    &order,
                    &b,
                    &out.join(format!("{prefix}tasks_at_{}", slug(&b))),
                )?);
            }
        }
        let niah: Vec<&Record> = records
            .iter()
            .filter(|r| r.run == run && r.task.starts_with("niah") && r.score.is_some())
            .collect();
        if !niah.is_empty() {
            files.extend(niah_heatmap(
                run,
                &order,
                &niah,
                &out.join(format!("{prefix}niah")),
            )?);
        }
        let text: Vec<&Cell> = rc.iter().filter(|c| c.ppl.is_some()).copied().collect();
        if !text.is_empty() {
            files.extend(text_bars(
                run,
                &text,
                &order,
                &out.join(format!("{prefix}perplexity")),
            )?);
        }
    }
    Ok(files)
}

/// The lines of the score-against-budget chart: per configuration (without its
/// budget), its mean score over every (task, length) at each budget, ×100; the full
/// cache first, flat.
pub fn budget_series(cells: &[&Cell]) -> Vec<Series> {
    let mut by_cfg: BTreeMap<(String, String), Vec<f64>> = BTreeMap::new();
    let mut names: Vec<String> = Vec::new();
    for c in cells {
        let name = series_name(&c.config).to_string();
        if c.method != "full" && !names.contains(&name) {
            names.push(name.clone());
        }
        by_cfg
            .entry((name, c.budget.clone()))
            .or_default()
            .push(c.score.unwrap_or(0.0));
    }
    let in_range = |b: f64| b.is_finite() && b <= 1.0;
    let lo = by_cfg
        .keys()
        .filter(|k| k.0 != "full")
        .map(|k| budget_value(&k.1))
        .filter(|&b| in_range(b))
        .fold(1.0f64, f64::min);
    let mut series = Vec::new();
    if let Some(f) = by_cfg
        .iter()
        .find(|(k, _)| k.0 == "full")
        .and_then(|(_, v)| mean(v.iter().copied()))
    {
        series.push(Series {
            name: "full cache".into(),
            points: vec![(lo, f * 100.0), (1.0, f * 100.0)],
            dashed: true,
        });
    }
    for name in names {
        let points: Vec<(f64, f64)> = by_cfg
            .iter()
            .filter(|(k, _)| k.0 == name)
            .filter_map(|(k, v)| {
                let b = budget_value(&k.1);
                in_range(b).then(|| (b, mean(v.iter().copied()).unwrap_or(0.0) * 100.0))
            })
            .collect();
        if !points.is_empty() {
            series.push(Series {
                name,
                points,
                dashed: false,
            });
        }
    }
    series
}

/// One line of the decision chart: a configuration's quality (% of the full cache's
/// score on the same samples) against the KV memory it kept (%), per budget, and what
/// compressing cost (median of compression and any extra pass, % of the prefill).
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub name: String,
    /// `(budget, kv kept %, quality %, samples)`, largest budget first.
    pub points: Vec<(String, f64, f64, usize)>,
    pub cost_pct: f64,
}

/// The decision lines of `names` (configurations without their budget) from the
/// query-agnostic records of one run, each against the full cache on the samples both
/// have.
pub fn decisions(records: &[Record], names: &[String]) -> Vec<Decision> {
    type Key = (String, usize, usize);
    let key = |r: &Record| -> Key { (r.task.clone(), r.length, r.index) };
    let full: BTreeMap<Key, f64> = records
        .iter()
        .filter(|r| r.method == "full")
        .filter_map(|r| Some((key(r), r.score?)))
        .collect();
    let mut out = Vec::new();
    for name in names {
        let own: Vec<&Record> = records
            .iter()
            .filter(|r| r.protocol == "agnostic" && series_name(&r.config) == name.as_str())
            .filter(|r| r.method != "full")
            .collect();
        let budgets: BTreeSet<String> = own.iter().map(|r| r.budget.clone()).collect();
        let mut points = Vec::new();
        for b in budgets {
            let rs: Vec<(&Record, f64)> = own
                .iter()
                .filter(|r| r.budget == b)
                .filter_map(|r| Some((*r, *full.get(&key(r))?)))
                .collect();
            let (mine, base): (f64, f64) = rs
                .iter()
                .map(|(r, f)| (r.score.unwrap_or(0.0), *f))
                .fold((0.0, 0.0), |a, x| (a.0 + x.0, a.1 + x.1));
            if rs.is_empty() || base <= 0.0 {
                continue;
            }
            let kept = mean(rs.iter().map(|(r, _)| r.kv_ratio())).unwrap_or(1.0) * 100.0;
            points.push((b, kept, 100.0 * mine / base, rs.len()));
        }
        points.sort_by(|a, b| budget_value(&b.0).total_cmp(&budget_value(&a.0)));
        let mut costs: Vec<f64> = own
            .iter()
            .filter(|r| r.timing.prefill_s > 0.0)
            .map(|r| 100.0 * (r.timing.compress_s + r.timing.reconstruct_s) / r.timing.prefill_s)
            .collect();
        costs.sort_by(f64::total_cmp);
        if !points.is_empty() {
            out.push(Decision {
                name: name.clone(),
                points,
                cost_pct: costs.get(costs.len() / 2).copied().unwrap_or(0.0),
            });
        }
    }
    out
}

/// The decision chart (`stem.svg`, `.png`) and its numbers (`stem.csv`): quality
/// against KV memory kept, one line per configuration in `names`, beside what each
/// costs to compress.
pub fn decision_chart(
    records: &[Record],
    names: &[String],
    stem: &Path,
) -> Result<Vec<PathBuf>, String> {
    let ds = decisions(records, names);
    if ds.is_empty() {
        return Err(format!(
            "no query-agnostic records with a full-cache reference for {}",
            names.join(", ")
        ));
    }
    let run = records.first().map(|r| r.run.as_str()).unwrap_or("");
    let mut series = vec![Series {
        name: "full cache".into(),
        points: vec![(0.0, 100.0), (100.0, 100.0)],
        dashed: true,
    }];
    series.extend(ds.iter().map(|d| Series {
        name: d.name.clone(),
        points: d.points.iter().map(|p| (p.1, p.2)).collect(),
        dashed: false,
    }));
    let quality = plot::line_chart(
        "quality against memory",
        "KV cache kept (% of the full cache)",
        "score (% of the full cache's, same samples)",
        &series,
        None,
    );
    let cost = plot::hbar_log(
        "time to compress",
        "% of the prefill (log scale)",
        &ds.iter().map(|d| d.name.clone()).collect::<Vec<_>>(),
        &ds.iter().map(|d| d.cost_pct.max(1e-3)).collect::<Vec<_>>(),
        1,
    );
    let svg = plot::side_by_side(
        &format!("{run}: which method (query-agnostic)"),
        &quality,
        &cost,
    );
    let mut files = plot::save(&svg, stem)?;
    let mut csv =
        String::from("config,budget,kv_kept_pct,quality_pct,samples,compress_pct_of_prefill\n");
    for d in &ds {
        for p in &d.points {
            let _ = writeln!(
                csv,
                "{},{},{:.1},{:.1},{},{:.2}",
                csv_field(&d.name),
                p.0,
                p.1,
                p.2,
                p.3,
                d.cost_pct
            );
        }
    }
    let csv_path = PathBuf::from(format!("{}.csv", stem.display()));
    plot::write_atomic(&csv_path, csv.as_bytes())?;
    files.push(csv_path);
    Ok(files)
}

fn score_vs_budget(run: &str, cells: &[&Cell], stem: &Path) -> Result<Vec<PathBuf>, String> {
    let svg = plot::line_chart(
        &format!("{run}: mean score against KV budget"),
        "budget (fraction of the prompt's KV cache kept)",
        "mean score over tasks (×100)",
        &budget_series(cells),
        Some((0.0, 100.0)),
    );
    plot::save(&svg, stem)
}

fn task_bars(
    run: &str,
    cells: &[&Cell],
    order: &[String],
    budget: &str,
    stem: &Path,
) -> Result<Vec<PathBuf>, String> {
    let cols: BTreeSet<(String, usize)> =
        cells.iter().map(|c| (c.task.clone(), c.length)).collect();
    let cols: Vec<(String, usize)> = cols.into_iter().collect();
    let cfgs: Vec<&String> = order
        .iter()
        .filter(|o| {
            cells
                .iter()
                .any(|c| &c.config == *o && (c.method == "full" || c.budget == budget))
        })
        .collect();
    let values: Vec<Vec<Option<f64>>> = cfgs
        .iter()
        .map(|cfg| {
            cols.iter()
                .map(|(t, l)| {
                    cells
                        .iter()
                        .find(|c| &c.config == *cfg && &c.task == t && c.length == *l)
                        .and_then(|c| c.score.map(|v| v * 100.0))
                })
                .collect()
        })
        .collect();
    let groups: Vec<String> = cols
        .iter()
        .map(|(t, l)| format!("{t} {}", short_len(*l)))
        .collect();
    let names: Vec<String> = cfgs.iter().map(|s| s.to_string()).collect();
    let svg = plot::bar_chart(
        &format!("{run}: score per task at budget {budget}"),
        "score (×100)",
        &groups,
        &names,
        &values,
        Some((0.0, 100.0)),
    );
    plot::save(&svg, stem)
}

/// Depth bins of a NIAH heatmap.
const DEPTH_BINS: usize = 5;

/// NIAH retrieval of every configuration in one picture: a row per configuration,
/// a column per needle-depth bin (per context length when there are several).
fn niah_heatmap(
    run: &str,
    order: &[String],
    rs: &[&Record],
    stem: &Path,
) -> Result<Vec<PathBuf>, String> {
    let lengths: BTreeSet<usize> = rs.iter().map(|r| r.length).collect();
    let lengths: Vec<usize> = lengths.into_iter().collect();
    let cfgs: Vec<&String> = order
        .iter()
        .filter(|c| rs.iter().any(|r| &r.config == *c))
        .collect();
    let ncol = DEPTH_BINS * lengths.len();
    let mut sum = vec![vec![(0.0, 0usize); ncol]; cfgs.len()];
    for r in rs {
        let (Some(d), Some(row)) = (
            r.meta.get("depth").and_then(|v| v.as_f64()),
            cfgs.iter().position(|c| **c == r.config),
        ) else {
            continue;
        };
        let bin = ((d.clamp(0.0, 1.0) * DEPTH_BINS as f64) as usize).min(DEPTH_BINS - 1);
        let l = lengths.iter().position(|&x| x == r.length).unwrap_or(0);
        let cell = &mut sum[row][l * DEPTH_BINS + bin];
        cell.0 += r.score.unwrap_or(0.0);
        cell.1 += 1;
    }
    let values: Vec<Vec<Option<f64>>> = sum
        .iter()
        .map(|row| {
            row.iter()
                .map(|&(s, n)| (n > 0).then(|| s / n as f64))
                .collect()
        })
        .collect();
    let several = lengths.len() > 1;
    let cols: Vec<String> = lengths
        .iter()
        .flat_map(|&l| {
            (0..DEPTH_BINS).map(move |b| {
                let depth = format!(
                    "{:.0}–{:.0}%",
                    100.0 * b as f64 / DEPTH_BINS as f64,
                    100.0 * (b + 1) as f64 / DEPTH_BINS as f64
                );
                if several {
                    format!("{} {depth}", short_len(l))
                } else {
                    depth
                }
            })
        })
        .collect();
    let rows: Vec<String> = cfgs.iter().map(|c| c.to_string()).collect();
    let svg = plot::heatmap(
        &format!("{run}: needle retrieval by depth"),
        "needle depth in the context",
        "configuration",
        &cols,
        &rows,
        &values,
        (0.0, 1.0),
        true,
    );
    plot::save(&svg, stem)
}

fn text_bars(
    run: &str,
    cells: &[&Cell],
    order: &[String],
    stem: &Path,
) -> Result<Vec<PathBuf>, String> {
    let lengths: BTreeSet<usize> = cells.iter().map(|c| c.length).collect();
    let lengths: Vec<usize> = lengths.into_iter().collect();
    let cfgs: Vec<&String> = order
        .iter()
        .filter(|o| cells.iter().any(|c| &c.config == *o))
        .collect();
    let get = |f: &dyn Fn(&Cell) -> Option<f64>| -> Vec<Vec<Option<f64>>> {
        cfgs.iter()
            .map(|cfg| {
                lengths
                    .iter()
                    .map(|l| {
                        cells
                            .iter()
                            .find(|c| &c.config == *cfg && c.length == *l)
                            .and_then(|c| f(c))
                    })
                    .collect()
            })
            .collect()
    };
    let groups: Vec<String> = lengths
        .iter()
        .map(|&l| format!("{} tokens", short_len(l)))
        .collect();
    let names: Vec<String> = cfgs.iter().map(|s| s.to_string()).collect();
    let mut files = plot::save(
        &plot::bar_chart(
            &format!("{run}: perplexity of the next tokens"),
            "perplexity",
            &groups,
            &names,
            &get(&|c| c.ppl),
            None,
        ),
        stem,
    )?;
    let kl_stem = stem.with_file_name(format!(
        "{}_kl",
        stem.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("perplexity")
    ));
    files.extend(plot::save(
        &plot::bar_chart(
            &format!("{run}: KL divergence from the full cache"),
            "mean KL per token (nats)",
            &groups,
            &names,
            &get(&|c| c.kl),
            None,
        ),
        &kl_stem,
    )?);
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::Timing;

    fn rec(
        task: &str,
        config: &str,
        method: &str,
        budget: &str,
        i: usize,
        score: f64,
        depth: f64,
    ) -> Record {
        let mut meta = serde_json::Map::new();
        meta.insert("depth".into(), depth.into());
        Record {
            run: "m".into(),
            task: task.into(),
            length: 4096,
            index: i,
            config: config.into(),
            method: method.into(),
            budget: budget.into(),
            protocol: "agnostic".into(),
            prompt_tokens: 4000,
            kv_bytes_full: 100,
            kv_bytes: if method == "full" { 100 } else { 50 },
            kv_slots_full: 0,
            kv_slots: 0,
            score: Some(score),
            prediction: None,
            references: vec![],
            ppl: None,
            kl: None,
            top1: None,
            meta,
            timing: Timing::default(),
        }
    }

    fn records() -> Vec<Record> {
        let mut v = Vec::new();
        for i in 0..4 {
            v.push(rec(
                "niah_single_1",
                "full",
                "full",
                "1",
                i,
                1.0,
                i as f64 / 4.0,
            ));
            v.push(rec(
                "niah_single_1",
                "h2o@0.5",
                "h2o",
                "0.5",
                i,
                (i % 2) as f64,
                i as f64 / 4.0,
            ));
            v.push(rec(
                "niah_single_1",
                "kvmerger@0.5",
                "kvmerger",
                "0.5",
                i,
                0.75,
                i as f64 / 4.0,
            ));
        }
        v
    }

    #[test]
    fn means_and_kv_ratios_are_per_configuration() {
        let cs = cells(&records());
        let h2o = cs.iter().find(|c| c.config == "h2o@0.5").unwrap();
        assert_eq!(h2o.n, 4);
        assert_eq!(h2o.score, Some(0.5));
        assert_eq!(h2o.kv_ratio, 0.5);
    }

    #[test]
    fn the_table_lists_full_first_and_bolds_the_best_at_each_budget() {
        let md = markdown(&records());
        let full = md.find("| full |").unwrap();
        let kvm = md.find("| kvmerger@0.5 |").unwrap();
        assert!(full < kvm);
        assert!(
            md.contains("| kvmerger@0.5 | 50% | **75.0** | **75.0** |"),
            "{md}"
        );
        assert!(md.contains("| h2o@0.5 | 50% | 50.0 | 50.0 |"), "{md}");
        assert!(md.contains("| full | 100% | 100.0 | 100.0 |"), "{md}");
    }

    #[test]
    fn all_reports_are_written() {
        let dir = tempfile::tempdir().unwrap();
        let files = write_all(&records(), dir.path()).unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        for want in [
            "summary.md",
            "summary.csv",
            "paired.csv",
            "score_vs_budget.svg",
            "score_vs_budget.png",
            "tasks_at_0.5.png",
            "niah.svg",
        ] {
            assert!(
                names.iter().any(|n| n == want),
                "{want} missing from {names:?}"
            );
        }
        let csv = std::fs::read_to_string(dir.path().join("summary.csv")).unwrap();
        assert!(
            csv.contains("m,niah_single_1,4096,h2o@0.5,h2o,0.5,4,0.5000,0.5000,,,"),
            "{csv}"
        );
    }

    #[test]
    fn a_chart_line_is_one_configuration_never_a_mean_of_several() {
        // Two configurations of one method at one budget (another protocol), and a
        // third at another budget: the chart has a line per configuration, at each
        // configuration's own mean.
        let mut v = Vec::new();
        for i in 0..4 {
            v.push(rec("vt", "full", "full", "1", i, 1.0, 0.0));
            v.push(rec("vt", "snapkv@0.5", "snapkv", "0.5", i, 0.25, 0.0));
            v.push(rec("vt", "snapkv@0.25", "snapkv", "0.25", i, 0.0, 0.0));
            let mut aware = rec(
                "vt",
                "snapkv:protocol=aware@0.5",
                "snapkv",
                "0.5",
                i,
                0.75,
                0.0,
            );
            aware.protocol = "aware".into();
            v.push(aware);
        }
        let cs = cells(&v);
        let refs: Vec<&Cell> = cs.iter().collect();
        let series = budget_series(&refs);
        let line = |name: &str| {
            series
                .iter()
                .find(|s| s.name == name)
                .unwrap_or_else(|| panic!("no line {name}: {series:?}"))
        };
        assert_eq!(line("snapkv").points, vec![(0.25, 0.0), (0.5, 25.0)]);
        assert_eq!(line("snapkv:protocol=aware").points, vec![(0.5, 75.0)]);
        assert_eq!(line("full cache").points[1], (1.0, 100.0));
        assert_eq!(series.len(), 3, "{series:?}");
    }

    #[test]
    fn decision_lines_are_quality_against_the_full_cache_on_the_same_samples() {
        let mut v = Vec::new();
        for i in 0..4 {
            v.push(rec(
                "vt",
                "full",
                "full",
                "1",
                i,
                if i < 2 { 1.0 } else { 0.5 },
                0.0,
            ));
            // Sample 3 has no full-cache record in the pairing below.
            let mut r = rec("vt", "keydiff@0.5", "keydiff", "0.5", i, 0.5, 0.0);
            r.timing = Timing {
                prefill_s: 10.0,
                compress_s: 0.1 * (i + 1) as f64,
                ..Default::default()
            };
            v.push(r);
        }
        v.retain(|r| !(r.method == "full" && r.index == 3));
        let d = decisions(&v, &["keydiff".to_string()]);
        assert_eq!(d.len(), 1);
        // Samples 0..3 paired: keydiff 1.5 against full 2.5.
        assert_eq!(d[0].points, vec![("0.5".to_string(), 50.0, 60.0, 3)]);
        // The median of 1%, 2%, 3%, 4% of the prefill (the upper middle).
        assert!((d[0].cost_pct - 3.0).abs() < 1e-9, "{}", d[0].cost_pct);
        let dir = tempfile::tempdir().unwrap();
        let files =
            decision_chart(&v, &["keydiff".to_string()], &dir.path().join("decision")).unwrap();
        assert_eq!(files.len(), 3);
        let svg = std::fs::read_to_string(dir.path().join("decision.svg")).unwrap();
        plot::render_png(&svg).unwrap();
    }

    /// An answer record of sample `i` (task `t`), with half the full cache's bytes kept
    /// unless changed.
    fn scored(config: &str, method: &str, budget: &str, t: &str, i: usize, score: f64) -> Record {
        Record {
            kv_bytes_full: 1000,
            kv_bytes: if method == "full" { 1000 } else { 500 },
            ..rec(t, config, method, budget, i, score, 0.0)
        }
    }

    fn row<'a>(rows: &'a [PairedRow], task: &str, config: &str) -> &'a PairedRow {
        rows.iter()
            .find(|r| r.task == task && r.config == config)
            .unwrap_or_else(|| panic!("no row for {config} on {task} in {rows:#?}"))
    }

    #[test]
    fn a_configuration_identical_to_full_ties_on_every_sample() {
        let mut v = Vec::new();
        for i in 0..20 {
            let s = (i % 3) as f64 / 2.0;
            v.push(scored("full", "full", "1", "qa_1", i, s));
            v.push(scored("same@0.5", "same", "0.5", "qa_1", i, s));
        }
        let rows = paired_rows(&v);
        let same = row(&rows, ALL_TASKS, "same@0.5");
        let d = same.vs_full.as_ref().unwrap();
        assert_eq!(d.mean, 0.0);
        assert_eq!((d.interval.low, d.interval.high), (0.0, 0.0));
        assert_eq!((d.wins, d.losses, d.ties, d.n), (0, 0, 20, 20));
        assert_eq!(d.p_value, 1.0);
        assert_eq!(d.verdict(), stats::Verdict::Tie);
        // The full cache is the reference, not a contestant.
        let full = row(&rows, ALL_TASKS, "full");
        assert!(full.vs_full.is_none() && full.vs_best_other.is_none());
        // No other method at 0.5: nothing to be the best other.
        assert!(same.vs_best_other.is_none());
    }

    #[test]
    fn eighteen_wins_in_twenty_are_better_with_the_sign_test_by_hand() {
        let mut v = Vec::new();
        for i in 0..20 {
            // Two tasks of ten samples, pooled in the run's row.
            let task = if i < 10 { "niah_single_1" } else { "vt" };
            let won = i != 3 && i != 15;
            v.push(scored(
                "full",
                "full",
                "1",
                task,
                i,
                if won { 0.0 } else { 1.0 },
            ));
            v.push(scored(
                "kvmerger@0.5",
                "kvmerger",
                "0.5",
                task,
                i,
                if won { 1.0 } else { 0.0 },
            ));
        }
        let rows = paired_rows(&v);
        let pooled = row(&rows, ALL_TASKS, "kvmerger@0.5");
        assert_eq!(pooled.n, 20);
        assert!((pooled.mean - 0.9).abs() < 1e-12);
        let d = pooled.vs_full.as_ref().unwrap();
        assert_eq!((d.wins, d.losses, d.ties), (18, 2, 0));
        assert!((d.mean - 0.8).abs() < 1e-12);
        assert!(
            d.interval.low > 0.0 && d.interval.high <= 1.0,
            "{:?}",
            d.interval
        );
        // P(at most 2 of 20 fair coins one way), both ways.
        let by_hand = 2.0 * (1.0 + 20.0 + 20.0 * 19.0 / 2.0) / 2f64.powi(20);
        assert!(
            (d.p_value - by_hand).abs() < 1e-15,
            "{} vs {by_hand}",
            d.p_value
        );
        assert_eq!(d.verdict(), stats::Verdict::Better);
        // Each task on its own: 9 of 10 wins.
        let vt = row(&rows, "vt", "kvmerger@0.5").vs_full.clone().unwrap();
        assert_eq!((vt.n, vt.wins, vt.losses), (10, 9, 1));
        assert!((vt.p_value - 2.0 * 11.0 / 1024.0).abs() < 1e-15);
        // The table shows the pooled row; paired.csv has the per-task rows too.
        let md = markdown(&v);
        assert!(
            md.contains("| kvmerger@0.5 | agnostic | 20 | 90.0 ["),
            "{md}"
        );
        assert!(md.contains("| +80.0 ["), "{md}");
        assert!(md.contains("| 18/2/0 | 4.0e-4 | better |"), "{md}");
        let csv = paired_csv(&rows);
        assert_eq!(csv.lines().count(), 1 + 3 * 2, "{csv}");
        assert!(
            csv.contains("m,vt,kvmerger@0.5,kvmerger,0.5,agnostic,10,0.9000,"),
            "{csv}"
        );
    }

    #[test]
    fn the_best_other_is_the_strongest_rival_at_the_same_budget_and_protocol_on_shared_samples() {
        let mut v = Vec::new();
        for i in 0..20 {
            v.push(scored("full", "full", "1", "qa_1", i, 1.0));
            // b is better than e on the samples a has, worse over all of its own.
            v.push(scored(
                "b@0.5",
                "b",
                "0.5",
                "qa_1",
                i,
                if i < 10 { 0.6 } else { 0.0 },
            ));
            v.push(scored("e@0.5", "e", "0.5", "qa_1", i, 0.55));
            // Stronger than both, but at another budget or under the other protocol.
            v.push(scored("c@0.25", "c", "0.25", "qa_1", i, 1.0));
            v.push(Record {
                protocol: "aware".into(),
                ..scored("d:protocol=aware@0.5", "d", "0.5", "qa_1", i, 1.0)
            });
            if i < 10 {
                v.push(scored("a@0.5", "a", "0.5", "qa_1", i, 0.5));
            }
        }
        let rows = paired_rows(&v);
        let (best, d) = row(&rows, ALL_TASKS, "a@0.5")
            .vs_best_other
            .clone()
            .unwrap();
        assert_eq!(best, "b@0.5");
        // Only the ten samples a has are paired.
        assert_eq!((d.n, d.wins, d.losses, d.ties), (10, 0, 10, 0));
        assert!((d.mean + 0.1).abs() < 1e-12);
        assert_eq!(d.verdict(), stats::Verdict::Worse);
        assert_eq!(
            row(&rows, ALL_TASKS, "a@0.5").vs_full.as_ref().unwrap().n,
            10
        );
        // Over all twenty samples e beats b.
        assert_eq!(
            row(&rows, ALL_TASKS, "b@0.5")
                .vs_best_other
                .as_ref()
                .unwrap()
                .0,
            "e@0.5"
        );
        assert!(row(&rows, ALL_TASKS, "c@0.25").vs_best_other.is_none());
        assert!(row(&rows, ALL_TASKS, "d:protocol=aware@0.5")
            .vs_best_other
            .is_none());
        // The aware configuration is still compared with the (agnostic) full cache.
        let dvf = row(&rows, ALL_TASKS, "d:protocol=aware@0.5")
            .vs_full
            .clone()
            .unwrap();
        assert_eq!((dvf.n, dvf.ties), (20, 20));
        // Rows follow the summary table: full first, then budgets from the largest.
        let order: Vec<&str> = rows
            .iter()
            .filter(|r| r.task == ALL_TASKS)
            .map(|r| r.config.as_str())
            .collect();
        assert_eq!(order[0], "full");
        assert_eq!(*order.last().unwrap(), "c@0.25");
        let md = markdown(&v);
        let table = md.find("#### Paired comparison").unwrap();
        assert!(md.find("| c@0.25 | 50% |").unwrap() < table, "{md}");
        assert!(md.find("| full | agnostic | 20 |").unwrap() > table, "{md}");
        assert!(
            md.find("| full | agnostic | 20 |").unwrap()
                < md.find("| a@0.5 | agnostic | 10 |").unwrap()
        );
    }

    #[test]
    fn bootstrap_intervals_of_rows_are_deterministic_and_contain_the_mean() {
        let mut v = Vec::new();
        for i in 0..30 {
            v.push(scored("full", "full", "1", "qa_1", i, 1.0));
            v.push(scored(
                "h2o@0.5",
                "h2o",
                "0.5",
                "qa_1",
                i,
                ((i * 5) % 7) as f64 / 6.0,
            ));
        }
        let once = paired_rows(&v);
        assert_eq!(once, paired_rows(&v));
        let h2o = row(&once, ALL_TASKS, "h2o@0.5");
        assert!(
            h2o.interval.low < h2o.mean && h2o.mean < h2o.interval.high,
            "{h2o:?}"
        );
        let d = h2o.vs_full.as_ref().unwrap();
        assert!(d.interval.low < d.mean && d.mean < d.interval.high, "{d:?}");
        assert_eq!(markdown(&v), markdown(&v));
    }

    #[test]
    fn kept_shares_above_the_nominal_budget_are_flagged() {
        let with =
            |config: &str, budget: &str, bytes: usize, slots: (usize, usize), prompt: usize| {
                Record {
                    kv_bytes: bytes,
                    kv_slots: slots.0,
                    kv_slots_full: slots.1,
                    prompt_tokens: prompt,
                    ..scored(config, "m", budget, "qa_1", 0, 1.0)
                }
            };
        let check = |r: &Record| parity(&r.method, &r.budget, &[r]);
        let over = check(&with("m@0.5", "0.5", 510, (0, 0), 4000));
        assert_eq!(
            (over.nominal, over.bytes_kept, over.slots_kept),
            (Some(0.5), Some(0.51), None)
        );
        assert!(over.over);
        let within = check(&with("m@0.5", "0.5", 502, (0, 0), 4000));
        assert!(!within.over, "{within:?}");
        // Bytes within budget, slots not.
        let slots = check(&with("m@0.5", "0.5", 500, (520, 1000), 4000));
        assert_eq!(slots.slots_kept, Some(0.52));
        assert!(slots.over);
        let percent = check(&with("m@35%", "35%", 350, (350, 1000), 4000));
        assert_eq!(percent.nominal, Some(0.35));
        assert!(!percent.over);
        // Token counts are shares of each sample's prompt, at most all of it.
        assert_eq!(nominal_share("m", "2048", 4096), Some(0.5));
        assert_eq!(nominal_share("m", "2048", 1000), Some(1.0));
        assert_eq!(nominal_share("full", "1", 4096), Some(1.0));
        assert_eq!(nominal_share("m", "lots", 4096), None);
        let a = with("m@2048", "2048", 500, (0, 0), 4096);
        let b = with("m@2048", "2048", 600, (0, 0), 1000);
        let tokens = parity("m", "2048", &[&a, &b]);
        assert_eq!(tokens.nominal, Some(0.75));
        assert!(!tokens.over);
        let tight = with("m@2048", "2048", 600, (0, 0), 8192);
        assert!(parity("m", "2048", &[&tight]).over);
        // The flag reaches both reports.
        let mut v = vec![scored("full", "full", "1", "qa_1", 0, 1.0)];
        v.push(with("m@0.5", "0.5", 510, (0, 0), 4000));
        let md = markdown(&v);
        assert!(md.contains("| 51.0% | — | 50.0% | ⚠ over |"), "{md}");
        assert!(md.contains("| 100.0% | — | 100.0% | ok |"), "{md}");
        let csv = paired_csv(&paired_rows(&v));
        assert!(
            csv.lines()
                .nth(1)
                .unwrap()
                .ends_with(",1.0000,,1.0000,false"),
            "{csv}"
        );
        assert!(
            csv.lines()
                .nth(2)
                .unwrap()
                .ends_with(",0.5100,,0.5000,true"),
            "{csv}"
        );
    }

    #[test]
    fn text_tasks_have_no_paired_comparison() {
        let text = |config: &str, method: &str, budget: &str| Record {
            task: "ppl".into(),
            score: None,
            ppl: Some(12.0),
            kl: Some(0.01),
            top1: Some(0.9),
            ..scored(config, method, budget, "ppl", 0, 0.0)
        };
        let v = vec![text("full", "full", "1"), text("h2o@0.5", "h2o", "0.5")];
        assert!(paired_rows(&v).is_empty());
        let md = markdown(&v);
        assert!(!md.contains("Paired comparison"), "{md}");
        assert!(md.contains("| perplexity |"), "{md}");
    }
}
