//! The paper's two observations, measured on a prefilled cache, and merge maps.
//!
//! 1. Keys of neighbouring tokens are similar: the mean cosine similarity of the keys
//!    at positions `t` and `t + d`, per layer and KV head, as a function of the distance
//!    `d`, with values alongside for contrast.
//! 2. The sparsity merging reaches is a property of the layer: the fraction of slots the
//!    merging-set scan (paper mode, threshold `epsilon`, nothing protected) keeps in each
//!    layer, across samples of several tasks. Its per-layer mean is a budget schedule.
//!
//! A merge map shows, for one prompt, which tokens went into which slot.

use crate::plot::{self, Series};
use crate::Error;
use kvmerger_compression::methods::kvmerger::{merge_sets, KvMerger, MergePlan};
use kvmerger_compression::{
    Budget, HeadInput, HeadPos, HeadStats, HeadStore, KvDtype, Options, Schedule,
};
use kvmerger_engine::cache::KvCache;
use kvmerger_engine::compressor::Compressor;
use kvmerger_engine::load::LoadedModel;
use kvmerger_engine::sequence::Sequence;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Prefill `ids` into a fresh cache, collecting what KVMerger's merging-set scan
/// needs (the accumulated attention that picks its pivots, kept in each slot).
pub fn prefill(lm: &LoadedModel, ids: &[u32]) -> Result<KvCache, Error> {
    if ids.len() >= lm.model.cfg.ctx_len {
        return Err(Error::msg(format!(
            "a prompt of {} tokens does not fit the model's context of {}",
            ids.len(),
            lm.model.cfg.ctx_len
        )));
    }
    let kvmerger = Compressor::new(
        "kvmerger",
        &Options::new(),
        Budget::Fraction(0.5),
        Schedule::Uniform,
    )?;
    let mut seq = Sequence::new(&lm.model, KvDtype::F16, std::sync::Arc::new(kvmerger));
    seq.feed(&lm.model, ids)?;
    Ok(seq.cache)
}

fn rows(store: &HeadStore, values: bool) -> Vec<Vec<f32>> {
    let d = store.dim();
    (0..store.len())
        .map(|i| {
            let mut v = vec![0.0; d];
            if values {
                store.value_f32(i, &mut v);
            } else {
                store.key_f32(i, &mut v);
            }
            v
        })
        .collect()
}

fn normalized(mut rows: Vec<Vec<f32>>) -> Vec<Vec<f32>> {
    for r in &mut rows {
        let n = r.iter().map(|x| x * x).sum::<f32>().sqrt();
        if n > 0.0 {
            r.iter_mut().for_each(|x| *x /= n);
        }
    }
    rows
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Mean cosine similarity at distances `1..=max_distance`, per layer and KV head.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Similarity {
    pub max_distance: usize,
    /// `key[layer][head][d - 1]`, summed over `samples` samples (see [`Similarity::mean`]).
    pub key: Vec<Vec<Vec<f64>>>,
    pub value: Vec<Vec<Vec<f64>>>,
    pub samples: usize,
}

impl Similarity {
    /// The similarities of one prefilled cache.
    pub fn of(cache: &KvCache, max_distance: usize) -> Similarity {
        let curve = |store: &HeadStore, values: bool| -> Vec<f64> {
            let r = normalized(rows(store, values));
            (1..=max_distance)
                .map(|d| {
                    let n = r.len().saturating_sub(d);
                    if n == 0 {
                        return f64::NAN;
                    }
                    (0..n).map(|t| dot(&r[t], &r[t + d]) as f64).sum::<f64>() / n as f64
                })
                .collect()
        };
        let per = |values: bool| -> Vec<Vec<Vec<f64>>> {
            cache
                .layers
                .iter()
                .map(|heads| heads.iter().map(|s| curve(s, values)).collect())
                .collect()
        };
        Similarity {
            max_distance,
            key: per(false),
            value: per(true),
            samples: 1,
        }
    }

    /// Add another sample's similarities (same model and distances).
    pub fn add(&mut self, other: &Similarity) {
        if self.samples == 0 {
            *self = other.clone();
            return;
        }
        for (a, b) in self
            .key
            .iter_mut()
            .flatten()
            .zip(other.key.iter().flatten())
        {
            a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
        }
        for (a, b) in self
            .value
            .iter_mut()
            .flatten()
            .zip(other.value.iter().flatten())
        {
            a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
        }
        self.samples += other.samples;
    }

    /// Mean over samples: `[layer][head][d - 1]`.
    pub fn mean(&self, values: bool) -> Vec<Vec<Vec<f64>>> {
        let s = self.samples.max(1) as f64;
        let src = if values { &self.value } else { &self.key };
        src.iter()
            .map(|l| {
                l.iter()
                    .map(|h| h.iter().map(|x| x / s).collect())
                    .collect()
            })
            .collect()
    }

    /// Mean over heads and samples, per layer: `[layer][d - 1]`.
    pub fn layer_mean(&self, values: bool) -> Vec<Vec<f64>> {
        self.mean(values)
            .iter()
            .map(|heads| {
                (0..self.max_distance)
                    .map(|d| heads.iter().map(|h| h[d]).sum::<f64>() / heads.len().max(1) as f64)
                    .collect()
            })
            .collect()
    }
}

/// Layers to draw as separate lines: at most `k`, spread over the depth.
fn pick_layers(n: usize, k: usize) -> Vec<usize> {
    if n <= k {
        return (0..n).collect();
    }
    let mut v: Vec<usize> = (0..k).map(|i| i * (n - 1) / (k - 1)).collect();
    v.dedup();
    v
}

/// Curves, per-(layer, head) heatmaps and a CSV of the similarities.
pub fn write_similarity(sim: &Similarity, model: &str, out: &Path) -> Result<Vec<PathBuf>, String> {
    let mut files = Vec::new();
    let n_layers = sim.key.len();
    for (values, what) in [(false, "keys"), (true, "values")] {
        let lm = sim.layer_mean(values);
        let mut series: Vec<Series> = pick_layers(n_layers, 7)
            .into_iter()
            .map(|l| Series {
                name: format!("layer {l}"),
                points: (1..=sim.max_distance)
                    .map(|d| (d as f64, lm[l][d - 1]))
                    .collect(),
                dashed: false,
            })
            .collect();
        series.push(Series {
            name: "all layers".into(),
            points: (1..=sim.max_distance)
                .map(|d| {
                    (
                        d as f64,
                        lm.iter().map(|l| l[d - 1]).sum::<f64>() / n_layers.max(1) as f64,
                    )
                })
                .collect(),
            dashed: true,
        });
        let svg = plot::line_chart(
            &format!("{model}: cosine similarity of {what} against token distance"),
            "distance between tokens",
            &format!("mean cosine similarity of {what}"),
            &series,
            Some((-0.2, 1.0)),
        );
        files.extend(plot::save(
            &svg,
            &out.join(format!("similarity_{what}_curves")),
        )?);

        let mean = sim.mean(values);
        let mut row_names = Vec::new();
        let mut vals = Vec::new();
        for (l, heads) in mean.iter().enumerate() {
            for (h, curve) in heads.iter().enumerate() {
                row_names.push(format!("L{l} H{h}"));
                vals.push(curve.iter().map(|&v| v.is_finite().then_some(v)).collect());
            }
        }
        let cols: Vec<String> = (1..=sim.max_distance).map(|d| d.to_string()).collect();
        let svg = plot::heatmap(
            &format!("{model}: {what}, cosine similarity by layer/head and distance"),
            "distance between tokens",
            "layer, KV head",
            &cols,
            &row_names,
            &vals,
            (0.0, 1.0),
            false,
        );
        files.extend(plot::save(
            &svg,
            &out.join(format!("similarity_{what}_heatmap")),
        )?);
    }
    let (k, v) = (sim.mean(false), sim.mean(true));
    let mut csv = String::from("layer,head,distance,key_similarity,value_similarity\n");
    for l in 0..k.len() {
        for h in 0..k[l].len() {
            for d in 0..sim.max_distance {
                let _ = writeln!(csv, "{l},{h},{},{:.5},{:.5}", d + 1, k[l][h][d], v[l][h][d]);
            }
        }
    }
    let p = out.join("similarity.csv");
    plot::write_atomic(&p, csv.as_bytes())?;
    files.push(p);
    Ok(files)
}

/// Token × token key (and value) cosine similarity of one head over the first `n` tokens.
pub fn token_similarity(
    cache: &KvCache,
    layer: usize,
    head: usize,
    n: usize,
    model: &str,
    out: &Path,
) -> Result<Vec<PathBuf>, String> {
    let store = cache
        .layers
        .get(layer)
        .and_then(|l| l.get(head))
        .ok_or_else(|| format!("no layer {layer} head {head} in this model"))?;
    let n = n.min(store.len());
    let mut files = Vec::new();
    for (values, what) in [(false, "keys"), (true, "values")] {
        let r = normalized(rows(store, values));
        let vals: Vec<Vec<Option<f64>>> = (0..n)
            .map(|i| (0..n).map(|j| Some(dot(&r[i], &r[j]) as f64)).collect())
            .collect();
        let names: Vec<String> = (0..n).map(|i| i.to_string()).collect();
        let svg = plot::heatmap(
            &format!(
                "{model}: {what} of layer {layer}, head {head}, tokens 0–{}",
                n.saturating_sub(1)
            ),
            "token",
            "token",
            &names,
            &names,
            &vals,
            (0.0, 1.0),
            false,
        );
        files.extend(plot::save(
            &svg,
            &out.join(format!("similarity_{what}_tokens_L{layer}H{head}")),
        )?);
    }
    Ok(files)
}

/// A KVMerger in paper mode at `epsilon` with nothing protected and no layer skipped:
/// its merging sets are the ones the similarity alone produces.
pub fn threshold_merger(epsilon: f32) -> Result<KvMerger, Error> {
    let mut o = Options::new();
    o.set("mode", "paper");
    o.set("epsilon", epsilon);
    o.set("recent", 0);
    o.set("heavy", 0);
    // Every layer, including those the method itself leaves alone by default.
    o.set("skip_layers", "none");
    Ok(KvMerger::from_options(&o)?)
}

fn plan_head(
    method: &KvMerger,
    cache: &KvCache,
    layer: usize,
    head: usize,
    budget: usize,
) -> Result<MergePlan, Error> {
    let store = &cache.layers[layer][head];
    let data = store.to_data();
    let stats = HeadStats {
        accumulated: Some(store.meta().iter().map(|m| m.score).collect()),
        ..Default::default()
    };
    let input = HeadInput {
        data: &data,
        stats: &stats,
        pos: HeadPos {
            layer,
            n_layers: cache.layers.len(),
            kv_head: head,
            n_kv_heads: cache.layers[layer].len(),
        },
        budget,
    };
    Ok(merge_sets(method, &input)?)
}

/// Fraction of slots the threshold scan keeps, per layer (summed over KV heads).
pub fn layer_merge_ratios(cache: &KvCache, epsilon: f32) -> Result<Vec<f64>, Error> {
    let m = threshold_merger(epsilon)?;
    let mut out = Vec::new();
    for (l, heads) in cache.layers.iter().enumerate() {
        let (mut kept, mut total) = (0usize, 0usize);
        for (h, store) in heads.iter().enumerate() {
            let n = store.len();
            if n < 2 {
                kept += n;
                total += n;
                continue;
            }
            let plan = plan_head(&m, cache, l, h, n - 1)?;
            kept += plan.slots();
            total += n;
        }
        out.push(kept as f64 / total.max(1) as f64);
    }
    Ok(out)
}

/// Per-layer merge ratios of many samples, labelled by task.
#[derive(Clone, Debug, Default)]
pub struct Sparsity {
    pub epsilon: f32,
    pub samples: Vec<(String, Vec<f64>)>,
}

impl Sparsity {
    fn stats(rows: &[&Vec<f64>]) -> Vec<(f64, f64)> {
        let n_layers = rows.first().map(|r| r.len()).unwrap_or(0);
        (0..n_layers)
            .map(|l| {
                let xs: Vec<f64> = rows.iter().map(|r| r[l]).collect();
                let m = xs.iter().sum::<f64>() / xs.len() as f64;
                let var = xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / xs.len() as f64;
                (m, var.sqrt())
            })
            .collect()
    }
    /// Mean and standard deviation per layer over every sample.
    pub fn overall(&self) -> Vec<(f64, f64)> {
        Self::stats(&self.samples.iter().map(|s| &s.1).collect::<Vec<_>>())
    }
    pub fn tasks(&self) -> Vec<String> {
        let mut t: Vec<String> = Vec::new();
        for (name, _) in &self.samples {
            if !t.contains(name) {
                t.push(name.clone());
            }
        }
        t
    }
    pub fn per_task(&self, task: &str) -> Vec<(f64, f64)> {
        Self::stats(
            &self
                .samples
                .iter()
                .filter(|s| s.0 == task)
                .map(|s| &s.1)
                .collect::<Vec<_>>(),
        )
    }

    /// The per-layer schedule: mean kept fraction per layer, which `--schedule` accepts
    /// (ratios are relative; the schedule normalises them).
    pub fn schedule_text(&self, model: &str) -> String {
        let mut s = format!(
            "# per-layer budget schedule for {model}: the fraction of slots KVMerger's merging-set\n# scan keeps at epsilon = {} (mean over {} samples), as measured by `kvmerger analyze sparsity`\nlayer,ratio\n",
            self.epsilon,
            self.samples.len()
        );
        for (l, (m, _)) in self.overall().iter().enumerate() {
            let _ = writeln!(s, "{l},{m:.5}");
        }
        s
    }
}

pub fn write_sparsity(sp: &Sparsity, model: &str, out: &Path) -> Result<Vec<PathBuf>, String> {
    let mut files = Vec::new();
    let overall = sp.overall();
    let mut series = Vec::new();
    for t in sp.tasks() {
        series.push(Series {
            name: t.clone(),
            points: sp
                .per_task(&t)
                .iter()
                .enumerate()
                .map(|(l, (m, _))| (l as f64, *m))
                .collect(),
            dashed: false,
        });
    }
    series.push(Series {
        name: "all: mean − std".into(),
        points: overall
            .iter()
            .enumerate()
            .map(|(l, (m, s))| (l as f64, m - s))
            .collect(),
        dashed: true,
    });
    series.push(Series {
        name: "all: mean + std".into(),
        points: overall
            .iter()
            .enumerate()
            .map(|(l, (m, s))| (l as f64, m + s))
            .collect(),
        dashed: true,
    });
    let svg = plot::line_chart(
        &format!(
            "{model}: slots kept by merging at ε = {}, per layer",
            sp.epsilon
        ),
        "layer",
        "fraction of slots kept",
        &series,
        Some((0.0, 1.0)),
    );
    files.extend(plot::save(&svg, &out.join("sparsity_per_layer"))?);
    let mut csv = String::from("task,sample,layer,kept_fraction\n");
    for (i, (t, r)) in sp.samples.iter().enumerate() {
        for (l, v) in r.iter().enumerate() {
            let _ = writeln!(csv, "{t},{i},{l},{v:.5}");
        }
    }
    let p = out.join("sparsity.csv");
    plot::write_atomic(&p, csv.as_bytes())?;
    files.push(p);
    let p = out.join("sparsity_schedule.csv");
    plot::write_atomic(&p, sp.schedule_text(model).as_bytes())?;
    files.push(p);
    Ok(files)
}

/// Where each token went, for one head: its slot, and how it got there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    Protected,
    Dropped,
    /// Member of merging set `set`; `pivot` marks the set's pivot. Singletons are sets of one.
    Merged {
        set: usize,
        size: usize,
        pivot: bool,
    },
}

pub fn fates(plan: &MergePlan, n: usize) -> Vec<Fate> {
    let mut f = vec![Fate::Dropped; n];
    for &p in &plan.protected {
        f[p] = Fate::Protected;
    }
    for (si, s) in plan.sets.iter().enumerate() {
        for i in s.members.clone() {
            f[i] = Fate::Merged {
                set: si,
                size: s.members.len(),
                pivot: i == s.pivot,
            };
        }
    }
    f
}

fn fate_color(f: Fate) -> &'static str {
    match f {
        Fate::Protected => "#222222",
        Fate::Dropped => "#e8e8e8",
        Fate::Merged { size: 1, .. } => "#c6dbef",
        Fate::Merged { set, pivot, .. } => match (set % 2, pivot) {
            (0, false) => "#fdae6b",
            (0, true) => "#d94801",
            (_, false) => "#74c476",
            (_, true) => "#238b45",
        },
    }
}

/// The plans of `method` at `budget` slots per head for head `head` of every layer.
pub fn merge_plans(
    cache: &KvCache,
    method: &KvMerger,
    budget: usize,
    head: usize,
) -> Result<Vec<MergePlan>, Error> {
    (0..cache.layers.len())
        .map(|l| {
            if head >= cache.layers[l].len() {
                return Err(Error::msg(format!(
                    "the model has {} KV heads; there is no head {head}",
                    cache.layers[l].len()
                )));
            }
            plan_head(method, cache, l, head, budget)
        })
        .collect()
}

const LEGEND: &[(&str, &str)] = &[
    ("#222222", "kept (recent / heavy hitter)"),
    ("#fdae6b", "merged (alternating sets)"),
    ("#d94801", "pivot of a merged set"),
    ("#c6dbef", "kept alone"),
    ("#e8e8e8", "dropped"),
];

fn legend(s: &mut String, x: f64, y: f64) {
    for (i, (c, name)) in LEGEND.iter().enumerate() {
        let xx = x + 190.0 * i as f64;
        let _ = write!(
            s,
            r##"<rect x="{xx}" y="{y}" width="12" height="12" fill="{c}" stroke="#888" stroke-width="0.5"/><text x="{}" y="{}" font-size="11">{name}</text>"##,
            xx + 16.0,
            y + 10.0
        );
    }
}

/// One strip per layer: token positions left to right, coloured by their fate.
pub fn merge_map_layers(plans: &[MergePlan], n: usize, title: &str) -> String {
    let (w, left, top) = (1000.0, 60.0, 40.0);
    let row = 14.0;
    let h = top + row * plans.len() as f64 + 70.0;
    let cw = (w - left - 20.0) / n.max(1) as f64;
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="DejaVu Sans, Arial, sans-serif" font-size="11"><rect width="{w}" height="{h}" fill="white"/><text x="{}" y="22" text-anchor="middle" font-size="14" font-weight="bold">{}</text>"#,
        w / 2.0,
        title.replace('&', "&amp;").replace('<', "&lt;")
    );
    for (l, plan) in plans.iter().enumerate() {
        let y = top + l as f64 * row;
        let _ = write!(
            s,
            r#"<text x="{}" y="{}" text-anchor="end">L{l}</text>"#,
            left - 4.0,
            y + row - 3.0
        );
        let f = fates(plan, n);
        // Runs of one colour become one rectangle.
        let mut i = 0;
        while i < n {
            let c = fate_color(f[i]);
            let mut j = i + 1;
            while j < n
                && fate_color(f[j]) == c
                && !matches!((f[i], f[j]), (Fate::Merged { set: a, .. }, Fate::Merged { set: b, .. }) if a != b)
            {
                j += 1;
            }
            let _ = write!(
                s,
                r#"<rect x="{:.2}" y="{y:.1}" width="{:.2}" height="{}" fill="{c}"/>"#,
                left + i as f64 * cw,
                (j - i) as f64 * cw + 0.05,
                row - 2.0
            );
            i = j;
        }
    }
    let base = top + row * plans.len() as f64;
    let _ = write!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">token position (0–{})</text>"#,
        left + (w - left - 20.0) / 2.0,
        base + 18.0,
        n.saturating_sub(1)
    );
    legend(&mut s, left, base + 34.0);
    s.push_str("</svg>\n");
    s
}

/// The prompt's tokens as text tiles, each coloured by its fate in one head.
pub fn merge_map_tokens(plan: &MergePlan, tokens: &[String], title: &str) -> String {
    let (w, left, top) = (1000.0, 10.0, 40.0);
    let line_h = 18.0;
    let char_w = 6.6;
    let f = fates(plan, tokens.len());
    let mut x = left;
    let mut y = top;
    let mut tiles = String::new();
    for (i, t) in tokens.iter().enumerate() {
        let label: String = t
            .replace('\n', "↵")
            .chars()
            .map(|c| if c.is_control() { '·' } else { c })
            .collect();
        let label = if label.trim().is_empty() {
            "␣".to_string()
        } else {
            label
        };
        let tw = (label.chars().count() as f64 * char_w + 4.0).max(8.0);
        if x + tw > w - 10.0 {
            x = left;
            y += line_h;
        }
        let c = fate_color(f[i]);
        let ink = if matches!(
            f[i],
            Fate::Protected
                | Fate::Merged {
                    pivot: true,
                    size: 2..,
                    ..
                }
        ) {
            "#fff"
        } else {
            "#000"
        };
        let esc = label
            .replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;");
        let _ = write!(
            tiles,
            r#"<rect x="{x:.1}" y="{y:.1}" width="{tw:.1}" height="{}" fill="{c}"/><text x="{:.1}" y="{:.1}" fill="{ink}" font-family="DejaVu Sans Mono, monospace" font-size="11">{esc}</text>"#,
            line_h - 2.0,
            x + 2.0,
            y + 12.0
        );
        x += tw + 1.0;
    }
    let h = y + line_h + 50.0;
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="DejaVu Sans, Arial, sans-serif" font-size="11"><rect width="{w}" height="{h}" fill="white"/><text x="{}" y="22" text-anchor="middle" font-size="14" font-weight="bold">{}</text>"#,
        w / 2.0,
        title.replace('&', "&amp;").replace('<', "&lt;")
    );
    s.push_str(&tiles);
    legend(&mut s, left, y + line_h + 16.0);
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvmerger_compression::methods::kvmerger::MergeSet;

    #[test]
    fn every_token_gets_exactly_one_fate() {
        let plan = MergePlan {
            protected: vec![5],
            recent: 1,
            sets: vec![
                MergeSet {
                    members: 0..3,
                    pivot: 1,
                    weights: vec![0.2, 0.6, 0.2],
                },
                MergeSet {
                    members: 3..4,
                    pivot: 3,
                    weights: vec![1.0],
                },
            ],
            dropped: vec![4],
            layer_skipped: false,
        };
        let f = fates(&plan, 6);
        assert_eq!(
            f[1],
            Fate::Merged {
                set: 0,
                size: 3,
                pivot: true
            }
        );
        assert_eq!(
            f[0],
            Fate::Merged {
                set: 0,
                size: 3,
                pivot: false
            }
        );
        assert_eq!(
            f[3],
            Fate::Merged {
                set: 1,
                size: 1,
                pivot: true
            }
        );
        assert_eq!(f[4], Fate::Dropped);
        assert_eq!(f[5], Fate::Protected);
        let svg = merge_map_tokens(
            &plan,
            &["a", "b", "c", "d", "<e>", "\n"].map(String::from),
            "t",
        );
        assert!(svg.contains("&lt;e&gt;") && svg.contains('↵'));
        plot::render_png(&svg).unwrap();
        plot::render_png(&merge_map_layers(&[plan.clone(), plan], 6, "m")).unwrap();
    }

    #[test]
    fn sparsity_statistics_and_schedule() {
        let sp = Sparsity {
            epsilon: 0.75,
            samples: vec![("a".into(), vec![0.5, 1.0]), ("b".into(), vec![0.7, 1.0])],
        };
        let o = sp.overall();
        assert!((o[0].0 - 0.6).abs() < 1e-12 && (o[0].1 - 0.1).abs() < 1e-12);
        assert_eq!(o[1], (1.0, 0.0));
        let sched = kvmerger_compression::Schedule::parse_ratios(&sp.schedule_text("m")).unwrap();
        assert_eq!(sched, kvmerger_compression::Schedule::File(vec![0.6, 1.0]));
    }
}
