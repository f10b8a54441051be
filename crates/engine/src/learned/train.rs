//! Training a KVzap scorer from text: each document is prefilled as the context of a
//! chat turn (as the query-agnostic protocol prefills a document), KVzip's
//! reconstruction pass scores every token, and the pairs (the attention block's
//! normalized input, the log of the token's KVzip score in each KV head) of a sample
//! of tokens go into one ridge regression per layer. Held-out documents then measure
//! the fit (R² per layer) and what matters for selection: how many of the slots KVzip
//! keeps at a budget the scorer keeps too.

use super::{LearnedScorer, Normal};
use crate::compress::Compressor;
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
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            sample_per_doc: 1024,
            lambdas: vec![1e-4, 1e-3, 1e-2, 1e-1],
            held_out: 4,
            seed: 0,
            budgets: vec![0.5, 0.25, 0.125],
        }
    }
}

/// What training measured.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct TrainReport {
    pub train_docs: usize,
    pub train_tokens: usize,
    pub held_out_docs: usize,
    pub held_out_tokens: usize,
    /// The penalty chosen.
    pub lambda: f64,
    /// Every penalty tried, with its mean held-out R² and agreement at each budget.
    pub tried: Vec<(f64, f64, Vec<(f64, f64)>)>,
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
    let cfg = &lm.model.cfg;
    let (n_layers, h, k) = (cfg.n_layers, cfg.hidden, cfg.n_kv_heads);
    if docs.len() <= opts.held_out {
        return Err(Error::Invalid(format!(
            "{} documents leave none to train on with {} held out",
            docs.len(),
            opts.held_out
        )));
    }
    let n_train = docs.len() - opts.held_out;
    let mut normal: Vec<Normal> = (0..n_layers).map(|_| Normal::new(h, k)).collect();
    let mut report = TrainReport {
        train_docs: n_train,
        held_out_docs: opts.held_out,
        ..Default::default()
    };
    for (i, text) in docs[..n_train].iter().enumerate() {
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
            ne.add(&x, &y);
        }
        report.train_tokens += rows.len();
        progress(i + 1, docs.len(), "training documents");
    }
    if opts.lambdas.is_empty() {
        return Err(Error::Invalid("no ridge penalty to try".into()));
    }
    let mut candidates = Vec::with_capacity(opts.lambdas.len());
    for &lambda in &opts.lambdas {
        let mut weights = Vec::with_capacity(n_layers * k * h);
        let mut bias = Vec::with_capacity(n_layers * k);
        for ne in &normal {
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
                weights,
                bias,
                fingerprint: lm.fingerprint.clone(),
                training: serde_json::Value::Null,
            },
            Fit::new(n_layers, opts.budgets.len()),
        ));
    }
    for (j, text) in docs[n_train..].iter().enumerate() {
        let doc = collect(lm, text)?;
        for (_, scorer, fit) in candidates.iter_mut() {
            fit.add(scorer, &doc, &opts.budgets);
        }
        report.held_out_tokens += doc.rows;
        progress(n_train + j + 1, docs.len(), "held-out documents");
    }
    // The middle budget decides (25% with the defaults); R² breaks ties.
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
    let (lambda, mut scorer, fit) = candidates.swap_remove(best);
    report.lambda = lambda;
    report.r2 = fit.r2();
    report.agreement = fit.agreement(&opts.budgets);
    report.secs = t0.elapsed().as_secs_f64();
    scorer.training = serde_json::json!({
        "lambda": lambda,
        "sample_per_doc": opts.sample_per_doc,
        "seed": opts.seed,
        "report": report,
    });
    Ok((scorer, report))
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
