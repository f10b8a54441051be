//! Training a KVzap scorer from text: each document is prefilled as the context of a
//! chat turn (as the query-agnostic protocol prefills a document), KVzip's
//! reconstruction pass scores every token, and the pairs (the attention block's
//! normalized input, the log of the token's KVzip score in each KV head) of a sample
//! of tokens go into one ridge regression per layer. Held-out documents then measure
//! the fit (R² per layer) and what matters for selection: how many of the slots KVzip
//! keeps at a budget the scorer keeps too.

use super::{LearnedScorer, Normal};
use crate::compressor::Compressor;
use crate::load::LoadedModel;
use crate::sequence::Sequence;
use crate::Error;
use kvmerger_compression::{Budget, KvDtype, Options, Schedule};
use rand::seq::index::sample;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::time::Instant;

/// KVzip scores below this are read as this (the log stays finite).
const FLOOR: f32 = 1e-10;

#[derive(Clone, Debug)]
pub struct TrainOptions {
    /// Tokens sampled per training document (all when fewer).
    pub sample_per_doc: usize,
    /// Ridge penalties to try, relative to the mean squared feature: the one whose
    /// held-out selection agrees best with KVzip's at the middle budget is kept.
    pub lambdas: Vec<f64>,
    /// The last `held_out` documents are not trained on: they measure the fit.
    pub held_out: usize,
    pub seed: u64,
    /// Budgets at which held-out agreement with KVzip's selection is measured.
    pub budgets: Vec<f64>,
    /// Also train a one-layer MLP of this many GELU units per layer (0: linear only);
    /// it is kept when it agrees with KVzip better than the best linear map.
    pub mlp_units: usize,
    pub mlp_epochs: usize,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            sample_per_doc: 1024,
            lambdas: vec![1e-4, 1e-3, 1e-2, 1e-1],
            held_out: 4,
            seed: 0,
            budgets: vec![0.5, 0.25, 0.125],
            mlp_units: 0,
            mlp_epochs: 8,
        }
    }
}

/// One penalty tried: `(lambda, mean held-out R², [(budget, agreement)])`.
pub type Tried = (f64, f64, Vec<(f64, f64)>);

/// What training measured.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct TrainReport {
    pub train_docs: usize,
    pub train_tokens: usize,
    pub held_out_docs: usize,
    pub held_out_tokens: usize,
    /// The penalty chosen (the linear map's), and whether the MLP was kept instead.
    pub lambda: f64,
    pub mlp: bool,
    /// Every penalty tried, with its mean held-out R² and agreement at each budget.
    pub tried: Vec<Tried>,
    /// Per layer: R² of the predicted log scores on the held-out documents.
    pub r2: Vec<f64>,
    /// `(budget, share)`: of the slots KVzip's one threshold over the cache keeps at
    /// that budget, the share the scorer's threshold keeps too, over the
    /// held-out documents.
    pub agreement: Vec<(f64, f64)>,
    pub secs: f64,
}

/// One document's features and targets, from its template's opening on.
struct Doc {
    /// Per layer: `rows * hidden` normalized hidden states.
    hidden: Vec<Vec<f32>>,
    /// Per layer: `rows * n_kv_heads` log KVzip scores.
    targets: Vec<Vec<f32>>,
    rows: usize,
}

fn collect(lm: &LoadedModel, text: &str) -> Result<Doc, Error> {
    let model = &lm.model;
    let split = lm.split_prompt(text, "", "", true)?;
    // A KVzip compressor makes the sequence run KVzip's pass; it never compresses here.
    let kvzip = Compressor::new(
        "kvzip",
        &Options::new(),
        Budget::Fraction(0.5),
        Schedule::Uniform,
    )?;
    let mut seq = Sequence::new(model, KvDtype::F16, std::sync::Arc::new(kvzip));
    seq.protect(split.prefix);
    seq.stats.hidden = Some(Vec::new());
    seq.feed(model, &split.context)?;
    seq.score(lm)?;
    let (n, from) = (split.context.len(), split.prefix.min(split.context.len()));
    let (h, k) = (model.cfg.hidden, model.cfg.n_kv_heads);
    let all = seq.stats.hidden.take().unwrap_or_default();
    let mut hidden = Vec::with_capacity(model.cfg.n_layers);
    let mut targets = Vec::with_capacity(model.cfg.n_layers);
    for (l, rows) in all.into_iter().enumerate() {
        if rows.len() != n * h {
            return Err(Error::Invalid(format!(
                "layer {l}: {} hidden values for {n} tokens",
                rows.len()
            )));
        }
        hidden.push(rows[from * h..].to_vec());
        let heads = &seq.stats.heads[l];
        let mut t = vec![0.0f32; (n - from) * k];
        for (g, head) in heads.iter().enumerate() {
            let scores = head.reconstruction.as_deref().unwrap_or(&[]);
            if scores.len() != n {
                return Err(Error::Invalid(format!(
                    "layer {l} head {g}: {} reconstruction scores for {n} tokens",
                    scores.len()
                )));
            }
            for (r, &s) in scores[from..].iter().enumerate() {
                t[r * k + g] = s.max(FLOOR).ln();
            }
        }
        targets.push(t);
    }
    Ok(Doc {
        hidden,
        targets,
        rows: n - from,
    })
}

/// Trains a scorer for `lm` on `docs` (the last `opts.held_out` held out).
/// `progress(done, total, what)` is called after each document.
pub fn train(
    lm: &LoadedModel,
    docs: &[String],
    opts: &TrainOptions,
    progress: &mut dyn FnMut(usize, usize, &str),
) -> Result<(LearnedScorer, TrainReport), Error> {
    let t0 = Instant::now();
    if docs.len() <= opts.held_out {
        return Err(Error::Invalid(format!(
            "{} documents leave none to train on with {} held out",
            docs.len(),
            opts.held_out
        )));
    }
    let n_train = docs.len() - opts.held_out;
    let mut report = TrainReport {
        train_docs: n_train,
        held_out_docs: opts.held_out,
        ..Default::default()
    };
    let TrainingRows {
        normal,
        rows_x,
        rows_y,
        tokens,
    } = sample_training_docs(lm, &docs[..n_train], docs.len(), opts, progress)?;
    report.train_tokens = tokens;
    if opts.lambdas.is_empty() {
        return Err(Error::Invalid("no ridge penalty to try".into()));
    }
    let mut candidates = linear_candidates(lm, &normal, opts)?;
    if opts.mlp_units > 0 {
        let mlp = mlp_candidate(lm, &rows_x, &rows_y, opts, n_train, docs.len(), progress);
        candidates.push(mlp);
    }
    drop((rows_x, rows_y));
    for (j, text) in docs[n_train..].iter().enumerate() {
        let doc = collect(lm, text)?;
        for (_, scorer, fit) in candidates.iter_mut() {
            fit.add(scorer, &doc, &opts.budgets);
        }
        report.held_out_tokens += doc.rows;
        progress(n_train + j + 1, docs.len(), "held-out documents");
    }
    let best = best_candidate(&candidates, opts, &mut report);
    let (lambda, mut scorer, fit) = candidates.swap_remove(best);
    report.mlp = scorer.units > 0;
    report.lambda = lambda;
    report.r2 = fit.r2();
    report.agreement = fit.agreement(&opts.budgets);
    report.secs = t0.elapsed().as_secs_f64();
    scorer.training = serde_json::json!({
        "kind": if scorer.units > 0 { "mlp" } else { "linear" },
        "units": scorer.units,
        "mlp_epochs": opts.mlp_epochs,
        "lambda": if lambda.is_nan() { serde_json::Value::Null } else { lambda.into() },
        "sample_per_doc": opts.sample_per_doc,
        "seed": opts.seed,
        "report": report,
    });
    Ok((scorer, report))
}

/// One candidate scorer: its ridge penalty (NaN for the MLP), the scorer, its held-out fit.
type Candidate = (f64, LearnedScorer, Fit);

/// What the training documents gave, per layer: the ridge regression's sums and (for
/// the MLP) the sampled rows themselves; and how many rows were sampled in all.
struct TrainingRows {
    normal: Vec<Normal>,
    /// f16 features.
    rows_x: Vec<Vec<half::f16>>,
    rows_y: Vec<Vec<f32>>,
    tokens: usize,
}

/// Samples up to `opts.sample_per_doc` tokens of each training document into the
/// per-layer sums (and rows, for the MLP); `total` is the count `progress` reports.
fn sample_training_docs(
    lm: &LoadedModel,
    train_docs: &[String],
    total: usize,
    opts: &TrainOptions,
    progress: &mut dyn FnMut(usize, usize, &str),
) -> Result<TrainingRows, Error> {
    let cfg = &lm.model.cfg;
    let (n_layers, h, k) = (cfg.n_layers, cfg.hidden, cfg.n_kv_heads);
    let mut normal: Vec<Normal> = (0..n_layers).map(|_| Normal::new(h, k)).collect();
    // For the MLP: the sampled rows themselves, per layer (f16 features).
    let mut rows_x: Vec<Vec<half::f16>> = vec![Vec::new(); n_layers];
    let mut rows_y: Vec<Vec<f32>> = vec![Vec::new(); n_layers];
    let mut tokens = 0;
    for (i, text) in train_docs.iter().enumerate() {
        let doc = collect(lm, text)?;
        let mut rng = ChaCha8Rng::seed_from_u64(opts.seed ^ (i as u64).wrapping_mul(0x9E37_79B9));
        let mut rows = sample(&mut rng, doc.rows, opts.sample_per_doc.min(doc.rows)).into_vec();
        rows.sort_unstable();
        for (l, ne) in normal.iter_mut().enumerate() {
            let x: Vec<f32> = rows
                .iter()
                .flat_map(|&r| doc.hidden[l][r * h..(r + 1) * h].iter().copied())
                .collect();
            let y: Vec<f32> = rows
                .iter()
                .flat_map(|&r| doc.targets[l][r * k..(r + 1) * k].iter().copied())
                .collect();
            if opts.mlp_units > 0 {
                rows_x[l].extend(x.iter().map(|&v| half::f16::from_f32(v)));
                rows_y[l].extend_from_slice(&y);
            }
            ne.add(&x, &y);
        }
        tokens += rows.len();
        progress(i + 1, total, "training documents");
    }
    Ok(TrainingRows {
        normal,
        rows_x,
        rows_y,
        tokens,
    })
}

/// Solves the ridge regressions once per penalty in `opts.lambdas`: one linear scorer each.
fn linear_candidates(
    lm: &LoadedModel,
    normal: &[Normal],
    opts: &TrainOptions,
) -> Result<Vec<Candidate>, Error> {
    let cfg = &lm.model.cfg;
    let (n_layers, h, k) = (cfg.n_layers, cfg.hidden, cfg.n_kv_heads);
    let mut candidates = Vec::with_capacity(opts.lambdas.len());
    for &lambda in &opts.lambdas {
        let mut weights = Vec::with_capacity(n_layers * k * h);
        let mut bias = Vec::with_capacity(n_layers * k);
        for ne in normal {
            let (w, b) = ne.solve(lambda)?;
            weights.extend(w);
            bias.extend(b);
        }
        candidates.push((
            lambda,
            LearnedScorer {
                n_layers,
                n_kv_heads: k,
                hidden: h,
                units: 0,
                weights,
                bias,
                fingerprint: lm.fingerprint.clone(),
                training: serde_json::Value::Null,
            },
            Fit::new(n_layers, opts.budgets.len()),
        ));
    }
    Ok(candidates)
}

/// Trains the MLP of `opts.mlp_units` units on each layer's sampled rows, reporting
/// each layer as `progress(n_train, total, ...)`.
fn mlp_candidate(
    lm: &LoadedModel,
    rows_x: &[Vec<half::f16>],
    rows_y: &[Vec<f32>],
    opts: &TrainOptions,
    n_train: usize,
    total: usize,
    progress: &mut dyn FnMut(usize, usize, &str),
) -> Candidate {
    let cfg = &lm.model.cfg;
    let (n_layers, h, k) = (cfg.n_layers, cfg.hidden, cfg.n_kv_heads);
    let u = opts.mlp_units;
    let (mut w1, mut w2, mut b1, mut b2) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for l in 0..n_layers {
        let m = train_mlp(
            &rows_x[l],
            &rows_y[l],
            h,
            k,
            u,
            opts.mlp_epochs,
            opts.seed ^ l as u64,
        );
        w1.extend(m.0);
        b1.extend(m.1);
        w2.extend(m.2);
        b2.extend(m.3);
        progress(
            n_train,
            total,
            &format!("MLP layer {} of {n_layers}", l + 1),
        );
    }
    w1.extend(w2);
    b1.extend(b2);
    (
        f64::NAN,
        LearnedScorer {
            n_layers,
            n_kv_heads: k,
            hidden: h,
            units: u,
            weights: w1,
            bias: b1,
            fingerprint: lm.fingerprint.clone(),
            training: serde_json::Value::Null,
        },
        Fit::new(n_layers, opts.budgets.len()),
    )
}

/// Records every candidate's held-out fit in `report.tried` and returns the index of
/// the best: the middle budget's agreement decides (25% with the defaults), R² breaks ties.
fn best_candidate(
    candidates: &[Candidate],
    opts: &TrainOptions,
    report: &mut TrainReport,
) -> usize {
    let mid = opts.budgets.len() / 2;
    let mut best = 0;
    for (i, (lambda, _, fit)) in candidates.iter().enumerate() {
        let (r2, agree) = (fit.r2(), fit.agreement(&opts.budgets));
        report.tried.push((
            *lambda,
            r2.iter().sum::<f64>() / r2.len().max(1) as f64,
            agree,
        ));
        let key = |t: &(f64, f64, Vec<(f64, f64)>)| (t.2.get(mid).map_or(0.0, |a| a.1), t.1);
        if key(&report.tried[i]) > key(&report.tried[best]) {
            best = i;
        }
    }
    best
}

/// Held-out fit of one scorer: sums for R² per layer, and agreement with KVzip's
/// selection per budget.
struct Fit {
    sse: Vec<f64>,
    sum: Vec<f64>,
    sum2: Vec<f64>,
    count: usize,
    /// Per budget: slots both keep, slots KVzip keeps.
    agree: Vec<(f64, usize)>,
}

impl Fit {
    fn new(n_layers: usize, budgets: usize) -> Fit {
        Fit {
            sse: vec![0.0; n_layers],
            sum: vec![0.0; n_layers],
            sum2: vec![0.0; n_layers],
            count: 0,
            agree: vec![(0.0, 0); budgets],
        }
    }

    fn add(&mut self, scorer: &LearnedScorer, doc: &Doc, budgets: &[f64]) {
        let k = scorer.n_kv_heads;
        let mut truth: Vec<f32> = Vec::new();
        let mut pred: Vec<f32> = Vec::new();
        for l in 0..scorer.n_layers {
            let mut p = vec![0.0f32; doc.rows * k];
            scorer.predict(l, &doc.hidden[l], &mut p);
            for (&y, &q) in doc.targets[l].iter().zip(&p) {
                self.sse[l] += ((y - q) as f64).powi(2);
                self.sum[l] += y as f64;
                self.sum2[l] += (y as f64).powi(2);
            }
            truth.extend_from_slice(&doc.targets[l]);
            pred.extend(p);
        }
        self.count += doc.rows * k;
        for (b, a) in budgets.iter().zip(self.agree.iter_mut()) {
            let keep = ((truth.len() as f64) * b).round() as usize;
            let mut chosen = vec![false; truth.len()];
            for i in top(&pred, keep) {
                chosen[i] = true;
            }
            a.0 += top(&truth, keep).into_iter().filter(|&i| chosen[i]).count() as f64;
            a.1 += keep;
        }
    }

    fn r2(&self) -> Vec<f64> {
        let n = self.count.max(1) as f64;
        (0..self.sse.len())
            .map(|l| {
                let var = self.sum2[l] - self.sum[l] * self.sum[l] / n;
                if var > 0.0 {
                    1.0 - self.sse[l] / var
                } else {
                    0.0
                }
            })
            .collect()
    }

    fn agreement(&self, budgets: &[f64]) -> Vec<(f64, f64)> {
        budgets
            .iter()
            .zip(&self.agree)
            .map(|(&b, &(both, keep))| (b, both / keep.max(1) as f64))
            .collect()
    }
}

/// The indices of the `keep` highest scores.
fn top(s: &[f32], keep: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..s.len()).collect();
    if keep > 0 && keep < idx.len() {
        idx.select_nth_unstable_by(keep - 1, |&x, &y| s[y].total_cmp(&s[x]));
    }
    idx.truncate(keep);
    idx
}

/// A one-layer MLP (`units` GELU units, then `targets` outputs) fitted to rows `x`
/// (`hidden` features each) and targets `y` by Adam on the mean squared error, with
/// features and targets standardized (folded into the weights at the end). Returns
/// `(w1 [units][hidden], b1, w2 [targets][units], b2)`.
fn train_mlp(
    x: &[half::f16],
    y: &[f32],
    hidden: usize,
    targets: usize,
    units: usize,
    epochs: usize,
    seed: u64,
) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    use rand::Rng;
    let (d, k, u) = (hidden, targets, units);
    let n = x.len() / d;
    let scaling = Scaling::new(x, y, d, k, n);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut mlp = Mlp::init(d, k, u, &mut rng);
    let batch = 256usize;
    let mut adam = Adam::new(epochs * n.div_ceil(batch), &[u * d, u, k * u, k]);
    let mut order: Vec<usize> = (0..n).collect();
    for _ in 0..epochs {
        // Shuffle (Fisher-Yates).
        for i in (1..n).rev() {
            let j = rng.gen_range(0..=i);
            order.swap(i, j);
        }
        for chunk in order.chunks(batch) {
            let (z, t) = scaling.batch(chunk, x, y, d, k);
            let grads = mlp.gradients(&z, &t, chunk.len());
            adam.update(&mut mlp, &grads);
        }
    }
    mlp.fold(&scaling);
    (mlp.w1, mlp.b1, mlp.w2, mlp.b2)
}

/// The mean and standard deviation of each of `width` columns over `n` rows.
fn column_mean_sd<T: Copy>(
    values: &[T],
    width: usize,
    n: usize,
    to_f64: impl Fn(T) -> f64,
) -> (Vec<f64>, Vec<f64>) {
    let mut mu = vec![0.0f64; width];
    let mut sd = vec![0.0f64; width];
    for row in values.chunks_exact(width) {
        for (i, &v) in row.iter().enumerate() {
            let v = to_f64(v);
            mu[i] += v;
            sd[i] += v * v;
        }
    }
    for i in 0..width {
        mu[i] /= n.max(1) as f64;
        sd[i] = (sd[i] / n.max(1) as f64 - mu[i] * mu[i]).max(1e-12).sqrt();
    }
    (mu, sd)
}

/// Feature and target standardization: per column, the mean and standard deviation.
struct Scaling {
    mu: Vec<f64>,
    sd: Vec<f64>,
    ymu: Vec<f64>,
    ysd: Vec<f64>,
}

impl Scaling {
    /// Measures the features `x` (`d` per row) and targets `y` (`k` per row) over `n` rows.
    fn new(x: &[half::f16], y: &[f32], d: usize, k: usize, n: usize) -> Scaling {
        let (mu, sd) = column_mean_sd(x, d, n, |v| v.to_f64());
        let (ymu, ysd) = column_mean_sd(y, k, n, |v| v as f64);
        Scaling { mu, sd, ymu, ysd }
    }

    /// The standardized features and targets of the rows `chunk`.
    fn batch(
        &self,
        chunk: &[usize],
        x: &[half::f16],
        y: &[f32],
        d: usize,
        k: usize,
    ) -> (Vec<f32>, Vec<f32>) {
        let (mu, sd) = (&self.mu, &self.sd);
        let z: Vec<f32> = chunk
            .iter()
            .flat_map(|&r| {
                x[r * d..(r + 1) * d]
                    .iter()
                    .enumerate()
                    .map(|(i, v)| ((v.to_f64() - mu[i]) / sd[i]) as f32)
                    .collect::<Vec<_>>()
            })
            .collect();
        let (ymu, ysd) = (&self.ymu, &self.ysd);
        let t: Vec<f32> = chunk
            .iter()
            .flat_map(|&r| (0..k).map(move |i| ((y[r * k + i] as f64 - ymu[i]) / ysd[i]) as f32))
            .collect();
        (z, t)
    }
}

/// The derivative of the tanh approximation of GELU.
fn gelu_grad(a: f32) -> f32 {
    let c = 0.797_884_6f32;
    let t = (c * (a + 0.044_715 * a * a * a)).tanh();
    0.5 * (1.0 + t) + 0.5 * a * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044_715 * a * a)
}

/// The MLP being trained: `d` features, `u` hidden units, `k` outputs.
struct Mlp {
    d: usize,
    k: usize,
    u: usize,
    /// `[u][d]`
    w1: Vec<f32>,
    b1: Vec<f32>,
    /// `[k][u]`
    w2: Vec<f32>,
    b2: Vec<f32>,
}

impl Mlp {
    /// Random normal weights scaled by each layer's fan-in, zero biases.
    fn init(d: usize, k: usize, u: usize, rng: &mut ChaCha8Rng) -> Mlp {
        use rand::Rng;
        let mut normal = |std: f64| {
            let (a, b): (f64, f64) = (rng.gen_range(1e-12..1.0), rng.gen());
            ((-2.0 * a.ln()).sqrt() * (2.0 * std::f64::consts::PI * b).cos() * std) as f32
        };
        let w1: Vec<f32> = (0..u * d)
            .map(|_| normal(1.0 / (d as f64).sqrt()))
            .collect();
        let w2: Vec<f32> = (0..k * u)
            .map(|_| normal(1.0 / (u as f64).sqrt()))
            .collect();
        let (b1, b2) = (vec![0.0f32; u], vec![0.0f32; k]);
        Mlp {
            d,
            k,
            u,
            w1,
            b1,
            w2,
            b2,
        }
    }

    /// The mean squared error's gradients on a batch of `bn` rows (features `z`,
    /// targets `t`), for w1, b1, w2, b2 in that order.
    fn gradients(&self, z: &[f32], t: &[f32], bn: usize) -> [Vec<f32>; 4] {
        use rayon::prelude::*;
        let (d, k, u) = (self.d, self.k, self.u);
        let (w1, b1, w2, b2) = (&self.w1, &self.b1, &self.w2, &self.b2);
        // Forward.
        let a: Vec<f32> = z
            .par_chunks(d)
            .flat_map_iter(|zr| {
                (0..u).map(|j| b1[j] + crate::kernels::dot_f32(&w1[j * d..(j + 1) * d], zr))
            })
            .collect();
        let g: Vec<f32> = a.iter().map(|&x| super::gelu(x)).collect();
        let mut dout = vec![0.0f32; bn * k];
        for r in 0..bn {
            for h in 0..k {
                let o = b2[h]
                    + crate::kernels::dot_f32(&w2[h * u..(h + 1) * u], &g[r * u..(r + 1) * u]);
                dout[r * k + h] = 2.0 * (o - t[r * k + h]) / bn as f32;
            }
        }
        // Backward.
        let mut gw2 = vec![0.0f32; k * u];
        let mut gb2 = vec![0.0f32; k];
        let mut da = vec![0.0f32; bn * u];
        for r in 0..bn {
            for h in 0..k {
                let e = dout[r * k + h];
                gb2[h] += e;
                for j in 0..u {
                    gw2[h * u + j] += e * g[r * u + j];
                    da[r * u + j] += e * w2[h * u + j];
                }
            }
            for j in 0..u {
                da[r * u + j] *= gelu_grad(a[r * u + j]);
            }
        }
        let gb1: Vec<f32> = (0..u)
            .map(|j| (0..bn).map(|r| da[r * u + j]).sum())
            .collect();
        let gw1: Vec<f32> = (0..u)
            .into_par_iter()
            .flat_map_iter(|j| {
                let mut acc = vec![0.0f32; d];
                for r in 0..bn {
                    let e = da[r * u + j];
                    if e != 0.0 {
                        for (a, zv) in acc.iter_mut().zip(&z[r * d..(r + 1) * d]) {
                            *a += e * zv;
                        }
                    }
                }
                acc
            })
            .collect();
        [gw1, gb1, gw2, gb2]
    }

    /// Folds the standardization into the weights, so that they take raw features
    /// and give raw targets.
    fn fold(&mut self, s: &Scaling) {
        let (d, k, u) = (self.d, self.k, self.u);
        let (w1, b1, w2, b2) = (&mut self.w1, &mut self.b1, &mut self.w2, &mut self.b2);
        for j in 0..u {
            let mut shift = 0.0f64;
            for i in 0..d {
                let w = w1[j * d + i] as f64 / s.sd[i];
                shift += w * s.mu[i];
                w1[j * d + i] = w as f32;
            }
            b1[j] = (b1[j] as f64 - shift) as f32;
        }
        for h in 0..k {
            for j in 0..u {
                w2[h * u + j] = (w2[h * u + j] as f64 * s.ysd[h]) as f32;
            }
            b2[h] = (b2[h] as f64 * s.ysd[h] + s.ymu[h]) as f32;
        }
    }
}

/// Adam with a cosine learning-rate schedule over `steps` steps.
struct Adam {
    /// First and second moments, for w1, b1, w2, b2 in that order.
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    step: usize,
    steps: usize,
}

impl Adam {
    /// Zero moments for parameters of the given sizes.
    fn new(steps: usize, sizes: &[usize]) -> Adam {
        Adam {
            m: sizes.iter().map(|&s| vec![0.0; s]).collect(),
            v: sizes.iter().map(|&s| vec![0.0; s]).collect(),
            step: 0,
            steps,
        }
    }

    /// Takes one step down the gradients `grads` (w1, b1, w2, b2), each clamped to ±10.
    fn update(&mut self, mlp: &mut Mlp, grads: &[Vec<f32>; 4]) {
        let (lr0, beta1, beta2, eps) = (2e-3f32, 0.9f32, 0.999f32, 1e-8f32);
        self.step += 1;
        let (step, steps) = (self.step, self.steps);
        let lr = lr0 * 0.5 * (1.0 + (std::f32::consts::PI * step as f32 / steps as f32).cos());
        let (c1, c2) = (1.0 - beta1.powi(step as i32), 1.0 - beta2.powi(step as i32));
        let [gw1, gb1, gw2, gb2] = grads;
        for (pi, (p, gr)) in [
            (&mut mlp.w1, gw1),
            (&mut mlp.b1, gb1),
            (&mut mlp.w2, gw2),
            (&mut mlp.b2, gb2),
        ]
        .into_iter()
        .enumerate()
        {
            let (mm, vv) = (&mut self.m[pi], &mut self.v[pi]);
            for i in 0..p.len() {
                let gi = gr[i].clamp(-10.0, 10.0);
                mm[i] = beta1 * mm[i] + (1.0 - beta1) * gi;
                vv[i] = beta2 * vv[i] + (1.0 - beta2) * gi * gi;
                p[i] -= lr * (mm[i] / c1) / ((vv[i] / c2).sqrt() + eps);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mlp_fits_what_a_linear_map_cannot() {
        // y = |x0| * 2 + x1: no linear map fits |x0|.
        let (d, n) = (4, 4000);
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        use rand::Rng;
        let mut x = Vec::new();
        let mut y = Vec::new();
        for _ in 0..n {
            let row: Vec<f32> = (0..d).map(|_| rng.gen_range(-1.0..1.0)).collect();
            y.push(2.0 * row[0].abs() + row[1]);
            x.extend(row.iter().map(|&v| half::f16::from_f32(v)));
        }
        let (w1, b1, w2, b2) = train_mlp(&x, &y, d, 1, 16, 30, 1);
        let s = LearnedScorer {
            n_layers: 1,
            n_kv_heads: 1,
            hidden: d,
            units: 16,
            weights: [w1, w2].concat(),
            bias: [b1, b2].concat(),
            fingerprint: String::new(),
            training: serde_json::Value::Null,
        };
        let mut mse = 0.0f32;
        for (row, want) in x.chunks(d).zip(&y).take(500) {
            let row: Vec<f32> = row.iter().map(|v| v.to_f32()).collect();
            let mut out = [0.0f32];
            s.predict(0, &row, &mut out);
            mse += (out[0] - want).powi(2) / 500.0;
        }
        // The best linear map leaves the variance of 2|x0| around its mean: 1/3.
        assert!(mse < 0.05, "mse {mse}");
        // The file round-trips an MLP too.
        let back = LearnedScorer::from_bytes(&s.to_bytes(), std::path::Path::new("t")).unwrap();
        assert_eq!(back, s);
    }
}
