//! `kvmerger`: KVMerger (Wang et al. 2024, arXiv 2407.08454), every point the paper
//! leaves open an option (the method in the project's words, the choices and the
//! evidence: docs/kvmerger-method.md).
//!
//! Per (layer, KV head):
//! 1. Protected slots are kept exactly as they are: the recent window (the newest
//!    `recent` share of the context) and the heavy hitters (the `heavy` share of the
//!    context with the highest aggregated attention `a` among the rest).
//! 2. Merging sets: the unprotected slots are scanned from the newest to the oldest; a
//!    set grows while the next older slot is its neighbour in the cache (protected slots
//!    break runs) and its key's cosine similarity to the reference key is above
//!    `epsilon`. The reference is the last slot added (`chain=last`, the paper's
//!    Algorithm 1) or the set's first, newest slot (`chain=first`). Sets are therefore
//!    runs of consecutive slots; on a fresh prompt, of consecutive positions. (After an
//!    earlier compression, neighbours in the cache are what is left of the sequence.)
//! 3. Each set with more than one member becomes one slot: pivot `p` = the member with
//!    the highest `a` (ties: the newest); `g_i = exp(-|k_p - k_i|^2 / (2 sigma^2))`,
//!    `w = g / sum(g)`; key and value are the `w`-weighted sums; position = the pivot's;
//!    count and score = the members' sums; logit bias per `mass`.
//! 4. Budget (`mode`): `paper` uses `epsilon` as given and returns whatever size results;
//!    `exact` chooses the threshold per head so the head ends at exactly `budget` slots.
//!    With `chain=last` the number of sets at threshold `t` is the number of runs plus the
//!    neighbour pairs with similarity `<= t`, so the exact answer is direct: cut the
//!    `budget - protected - runs` least similar pairs and merge across the others (the
//!    same result as bisecting on epsilon and then merging the most similar adjacent
//!    sets). With `chain=first`, epsilon is bisected and the remaining excess is removed
//!    by merging the adjacent sets whose newest keys are most similar. In both, the
//!    threshold never goes below `min_epsilon` (default 0: slots with orthogonal or
//!    opposed keys are not merged); if the budget is still exceeded, the sets with the
//!    lowest total score are dropped.
//! 5. Layers: `skip_layers` (default `0,1,-1`: the first two and the last layer, whose
//!    attention is close to uniform) are not merged. In `paper` mode they are returned
//!    unchanged; in `exact` mode they must still fit the budget, so they fall back to
//!    H2O-style eviction: the same recent window plus the top-scoring slots.
//!
//! Defaults: `recent`/`heavy` the paper's proportions interpolated in the budget,
//! `mode=exact`, `sigma=mean`, `mass=bias`, `score=accumulated`, `layers=sparsity`,
//! `chain=last`; why each, and what was measured:
//! [docs/kvmerger-method.md](../../../../docs/kvmerger-method.md).
//!
//! [`KvMerger::plan`] (or [`merge_sets`]) exposes the sets and weights without merging.

use super::{OptionDoc, Stat};
use crate::method::{HeadInput, MassCorrection, Method, Options, StatsNeeds};
use crate::scorer::Scorer as _;
use crate::store::{HeadData, SlotMeta};
use crate::Error;
use std::ops::Range;

pub const SUMMARY: &str =
    "KVMerger: recent + heavy hitters kept; similar consecutive keys merged with Gaussian weights";
pub const OPTIONS: &[OptionDoc] = &[
    OptionDoc { key: "recent", default: "auto", help: "recent window, fraction of the context (auto: the paper's, by budget)" },
    OptionDoc { key: "heavy", default: "auto", help: "heavy hitters, fraction of the context (auto: the paper's, by budget)" },
    OptionDoc { key: "epsilon", default: "0.75", help: "cosine threshold for growing a merging set (paper mode)" },
    OptionDoc { key: "chain", default: "last", help: "compare with the last added key (last) or the set's first (first)" },
    OptionDoc { key: "sigma", default: "mean", help: "Gaussian kernel width: mean distance to the pivot, or a number" },
    OptionDoc { key: "mass", default: "bias", help: "attention mass of merged slots: none, scale (values x|S|) or bias (log-count logit bias)" },
    OptionDoc { key: "mode", default: "exact", help: "exact (exactly the budget per head) or paper (fixed epsilon, any size)" },
    OptionDoc { key: "skip_layers", default: "0,1,-1", help: "layers not merged (negative counts from the end; 'none')" },
    OptionDoc { key: "score", default: "accumulated", help: "pivot and heavy-hitter score: accumulated (all queries), window (last queries), expected (Expected Attention), keydiff or kvzip (reconstruction)" },
    OptionDoc { key: "layers", default: "sparsity", help: "per-layer budgets: sparsity (observation 2, measured on the fly: in proportion to the sets each layer forms at epsilon) or uniform (the paper's literal runs)" },
    OptionDoc { key: "window", default: "32", help: "observation window size, with score=window" },
    OptionDoc { key: "min_epsilon", default: "0", help: "exact mode: lowest threshold tried before dropping sets" },
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Chain {
    Last,
    First,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Sigma {
    Mean,
    Fixed(f32),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mass {
    None,
    Scale,
    Bias,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Paper,
    Exact,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Score {
    Accumulated,
    Window(usize),
    /// Expected Attention's score (query statistics of the context).
    Expected,
    /// KeyDiff's score (no statistics).
    KeyDiff,
    /// KVzip's reconstruction score.
    Reconstruction,
}

/// How the budget is shared between layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layers {
    /// Every layer keeps the budget it is given.
    Uniform,
    /// The paper's observation 2, measured on the cache being compressed: each layer's
    /// share is proportional to the merging sets its heads form at `epsilon` (the
    /// ratio a fixed threshold keeps), water-filled so the total stays the same.
    Sparsity,
}

/// The most layers a `skip_layers` index may count (the engine refuses models with
/// more than 1024).
pub const MAX_LAYERS: usize = 1024;

/// The range of a fixed `sigma`: 2·sigma² stays a normal f32 with room for the
/// squared distances of real keys.
pub const SIGMA_MIN: f32 = 1e-3;
pub const SIGMA_MAX: f32 = 1e6;

#[derive(Clone, Debug, PartialEq)]
pub struct KvMerger {
    pub recent: Option<f32>,
    pub heavy: Option<f32>,
    pub epsilon: f32,
    pub chain: Chain,
    pub sigma: Sigma,
    pub mass: Mass,
    pub mode: Mode,
    pub skip_layers: Vec<i64>,
    pub score: Score,
    pub layers: Layers,
    pub min_epsilon: f32,
}

/// One merging set: consecutive slots that become one.
#[derive(Clone, Debug, PartialEq)]
pub struct MergeSet {
    /// Slot indices of the members (consecutive).
    pub members: Range<usize>,
    pub pivot: usize,
    /// Merge weight of each member, in member order: non-negative, summing to 1.
    pub weights: Vec<f32>,
}

/// What KVMerger does to one head, before doing it. Every slot is in exactly one of
/// `protected`, a set's `members`, or `dropped`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MergePlan {
    /// Slots kept unchanged (recent window and heavy hitters; every slot when the budget
    /// covers the head, or in a skipped layer in paper mode), ascending.
    pub protected: Vec<usize>,
    /// How many of `protected` are the recent window (the newest slots).
    pub recent: usize,
    /// Merging sets in slot order, singletons included (a singleton is kept unchanged).
    pub sets: Vec<MergeSet>,
    /// Slots dropped to meet the budget (exact mode only), ascending.
    pub dropped: Vec<usize>,
    /// Whether the layer is masked out by `skip_layers`.
    pub layer_skipped: bool,
}

impl MergePlan {
    /// Slots the head holds after merging.
    pub fn slots(&self) -> usize {
        self.protected.len() + self.sets.len()
    }
}

/// The merging sets and weights KVMerger would use on `input`.
pub fn merge_sets(method: &KvMerger, input: &HeadInput<'_>) -> Result<MergePlan, Error> {
    method.plan(input)
}

/// The paper's recent and heavy shares of the budget, interpolated in the budget ratio.
pub fn default_shares(budget_ratio: f64) -> (f64, f64) {
    let t = ((budget_ratio - 0.35) / 0.15).clamp(0.0, 1.0);
    let lerp = |a: f64, b: f64| a + (b - a) * t;
    (lerp(0.08 / 0.35, 0.17 / 0.5), lerp(0.02 / 0.35, 0.12 / 0.5))
}

fn parse_layers(s: &str) -> Result<Vec<i64>, Error> {
    let t = s.trim();
    if t.is_empty() || t == "none" {
        return Ok(Vec::new());
    }
    t.split(',')
        .map(|x| {
            let bad = |why: &str| {
                Error::InvalidOption(format!(
                    "option skip_layers='{s}': '{x}' {why} (use e.g. 0,1,-1 or none)"
                ))
            };
            let i = x
                .trim()
                .parse::<i64>()
                .map_err(|_| bad("is not a layer index"))?;
            // No model has more layers; a larger index masks nothing and is a typo.
            if !(-(MAX_LAYERS as i64)..MAX_LAYERS as i64).contains(&i) {
                return Err(bad(&format!("is outside -{MAX_LAYERS}..{MAX_LAYERS}")));
            }
            Ok(i)
        })
        .collect()
}

impl KvMerger {
    pub fn from_options(opts: &Options) -> Result<Self, Error> {
        super::check_options("kvmerger", opts, OPTIONS)?;
        let share = |key: &str| -> Result<Option<f32>, Error> {
            match opts.get(key) {
                None | Some("auto") => Ok(None),
                Some(_) => super::fraction_or(opts, key, 0.0).map(Some),
            }
        };
        let epsilon = opts.f32_or("epsilon", 0.75)?;
        let min_epsilon = opts.f32_or("min_epsilon", 0.0)?;
        for (key, v) in [("epsilon", epsilon), ("min_epsilon", min_epsilon)] {
            if !(-1.0..=1.0).contains(&v) {
                return Err(Error::InvalidOption(format!(
                    "option {key}={v} must be a cosine, in [-1, 1]"
                )));
            }
        }
        let sigma = match opts.get("sigma") {
            None | Some("mean") => Sigma::Mean,
            Some(v) => match v.parse::<f32>() {
                Ok(x) if (SIGMA_MIN..=SIGMA_MAX).contains(&x) => Sigma::Fixed(x),
                _ => {
                    return Err(Error::InvalidOption(format!(
                        "option sigma='{v}' must be 'mean' or a number from {SIGMA_MIN} to {SIGMA_MAX} \
                         (the kernel divides by 2·sigma², which must stay a normal f32)"
                    )))
                }
            },
        };
        let score = match opts.choice_or(
            "score",
            &["accumulated", "window", "expected", "keydiff", "kvzip"],
            "accumulated",
        )? {
            "window" => Score::Window(opts.usize_or("window", 32)?),
            _ if opts.get("window").is_some() => {
                return Err(Error::InvalidOption(
                    "kvmerger: option 'window' applies to score=window".into(),
                ))
            }
            "expected" => Score::Expected,
            "keydiff" => Score::KeyDiff,
            "kvzip" => Score::Reconstruction,
            _ => Score::Accumulated,
        };
        let layers = match opts.choice_or("layers", &["uniform", "sparsity"], "sparsity")? {
            "sparsity" => Layers::Sparsity,
            _ => Layers::Uniform,
        };
        Ok(KvMerger {
            recent: share("recent")?,
            heavy: share("heavy")?,
            epsilon,
            chain: match opts.choice_or("chain", &["last", "first"], "last")? {
                "last" => Chain::Last,
                _ => Chain::First,
            },
            sigma,
            mass: match opts.choice_or("mass", &["none", "scale", "bias"], "bias")? {
                "none" => Mass::None,
                "scale" => Mass::Scale,
                _ => Mass::Bias,
            },
            mode: match opts.choice_or("mode", &["exact", "paper"], "exact")? {
                "exact" => Mode::Exact,
                _ => Mode::Paper,
            },
            skip_layers: parse_layers(opts.get("skip_layers").unwrap_or("0,1,-1"))?,
            score,
            layers,
            min_epsilon,
        })
    }

    /// Whether `layer` is masked out. Indices beyond the model's depth are ignored, so a
    /// mask written for a deeper model applies to a shallower one.
    pub fn skips_layer(&self, layer: usize, n_layers: usize) -> bool {
        self.skip_layers.iter().any(|&s| {
            let at = if s < 0 { n_layers as i64 + s } else { s };
            at == layer as i64
        })
    }

    /// Recent window and heavy-hitter counts for a head of `n` slots and `budget`.
    pub fn protected_counts(&self, n: usize, budget: usize) -> Result<(usize, usize), Error> {
        let (auto_recent, auto_heavy) = default_shares(budget as f64 / n.max(1) as f64);
        let count = |given: Option<f32>, auto: f64| match given {
            Some(f) => (f as f64 * n as f64).round() as usize,
            None => (auto * budget as f64).round() as usize,
        };
        let (recent, heavy) = (
            count(self.recent, auto_recent),
            count(self.heavy, auto_heavy),
        );
        if recent + heavy > budget {
            return Err(Error::Invalid(format!(
                "kvmerger: the recent window ({recent}) and heavy hitters ({heavy}) exceed the budget of {budget} slots"
            )));
        }
        Ok((recent, heavy))
    }

    fn scores<'a>(&self, input: &HeadInput<'a>) -> Result<std::borrow::Cow<'a, [f32]>, Error> {
        use std::borrow::Cow;
        let rename = |e: Error| match e {
            Error::MissingStats { stat, .. } => Error::MissingStats {
                method: "kvmerger".into(),
                stat,
            },
            e => e,
        };
        Ok(match self.score {
            Score::Accumulated => Cow::Borrowed(super::stat(input, Stat::Accumulated, "kvmerger")?),
            Score::Window(_) => Cow::Borrowed(super::stat(input, Stat::Window, "kvmerger")?),
            Score::Reconstruction => {
                Cow::Borrowed(super::stat(input, Stat::Reconstruction, "kvmerger")?)
            }
            Score::Expected => Cow::Owned(
                super::expected_attention::ExpectedAttention::from_options(&Options::new())?
                    .expected_scores(input)
                    .map_err(rename)?,
            ),
            Score::KeyDiff => {
                Cow::Owned(super::keydiff::KeyDiff { sinks: 0 }.key_scores(input.data))
            }
        })
    }

    /// The merging sets a head forms at `epsilon` with nothing protected, per slot: the
    /// share a fixed threshold keeps (the paper's observation 2).
    pub fn sparsity(&self, data: &HeadData) -> f64 {
        let n = data.len();
        if n == 0 {
            return 1.0;
        }
        let norms = super::key_norms(data);
        let whole = 0..n;
        let sets = partition(
            data,
            &norms,
            std::slice::from_ref(&whole),
            self.chain,
            self.epsilon,
        )
        .len();
        sets as f64 / n as f64
    }

    /// Budgets of `inputs` moved between layers by [`Layers::Sparsity`], keeping the total.
    fn layer_budgets(&self, inputs: &[HeadInput<'_>]) -> Vec<usize> {
        use rayon::prelude::*;
        let n_layers = inputs.iter().map(|i| i.pos.layer + 1).max().unwrap_or(0);
        let ratios: Vec<f64> = inputs.par_iter().map(|i| self.sparsity(i.data)).collect();
        let mut per_layer = vec![(0.0f64, 0usize, 0usize, 0usize); n_layers];
        for (i, r) in inputs.iter().zip(&ratios) {
            let e = &mut per_layer[i.pos.layer];
            e.0 += r;
            e.1 += 1;
            e.2 += i.budget;
            e.3 = e.3.max(i.data.len());
        }
        let weights: Vec<f64> = per_layer
            .iter()
            .map(|&(sum, heads, _, _)| if heads == 0 { 0.0 } else { sum / heads as f64 })
            .collect();
        // Per head of each layer, from the total per head the layers were given.
        let heads = per_layer.iter().map(|e| e.1).max().unwrap_or(1).max(1);
        let total: usize = per_layer.iter().map(|e| e.2).sum::<usize>() / heads;
        let len = per_layer.iter().map(|e| e.3).max().unwrap_or(0);
        let floor = inputs
            .iter()
            .map(|i| {
                self.protected_counts(i.data.len(), i.budget)
                    .map(|(r, h)| r + h)
                    .unwrap_or(0)
            })
            .max()
            .unwrap_or(1)
            .max(1);
        let shares = crate::schedule::water_fill(&weights, total, floor, len);
        inputs
            .iter()
            .map(|i| shares[i.pos.layer].min(i.data.len()))
            .collect()
    }

    /// The sets, weights, protected and dropped slots for `input`, without merging.
    pub fn plan(&self, input: &HeadInput<'_>) -> Result<MergePlan, Error> {
        let (n, budget, data) = (input.data.len(), input.budget, input.data);
        let skipped = self.skips_layer(input.pos.layer, input.pos.n_layers);
        if budget >= n || (skipped && self.mode == Mode::Paper) {
            return Ok(MergePlan {
                protected: (0..n).collect(),
                recent: n,
                layer_skipped: skipped,
                ..Default::default()
            });
        }
        let a = self.scores(input)?;
        let a: &[f32] = &a;
        let (recent, heavy) = self.protected_counts(n, budget)?;
        let mut protected = vec![false; n];
        let heavy = if skipped { budget - recent } else { heavy };
        for i in super::recent_plus_top(n, a, recent, recent + heavy) {
            protected[i] = true;
        }
        let mut plan = MergePlan {
            recent,
            layer_skipped: skipped,
            ..Default::default()
        };
        plan.protected = (0..n).filter(|&i| protected[i]).collect();
        if skipped {
            plan.dropped = (0..n).filter(|&i| !protected[i]).collect();
            return Ok(plan);
        }

        let runs = runs_of(&protected);
        let norms = super::key_norms(data);
        let target = budget - plan.protected.len();
        let mut sets = match (self.mode, self.chain) {
            (Mode::Paper, chain) => partition(data, &norms, &runs, chain, self.epsilon),
            (Mode::Exact, Chain::Last) => exact_sets(data, &norms, &runs, target, self.min_epsilon),
            (Mode::Exact, Chain::First) => self.exact_chain_first(data, &norms, &runs, target),
        };
        if self.mode == Mode::Exact {
            plan.dropped = drop_lowest_sets(&mut sets, a, target);
        }
        plan.sets = sets
            .into_iter()
            .map(|members| self.weigh(data, a, members))
            .collect();
        Ok(plan)
    }

    /// Exact budget with `chain=first`: bisect epsilon, then merge the most similar neighbours.
    fn exact_chain_first(
        &self,
        data: &HeadData,
        norms: &[f32],
        runs: &[Range<usize>],
        target: usize,
    ) -> Vec<Range<usize>> {
        let count = |eps: f32| partition(data, norms, runs, Chain::First, eps).len();
        let (mut lo, mut hi) = (self.min_epsilon, 1.001f32);
        if count(lo) > target {
            return partition(data, norms, runs, Chain::First, lo);
        }
        for _ in 0..16 {
            let mid = 0.5 * (lo + hi);
            if count(mid) <= target {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        let at_lo = partition(data, norms, runs, Chain::First, lo);
        if at_lo.len() == target {
            return at_lo;
        }
        let sets = partition(data, norms, runs, Chain::First, hi);
        let excess = sets.len().saturating_sub(target);
        // Boundaries between adjacent sets of one run, by similarity of their newest keys.
        let mut joins: Vec<(f32, usize)> = sets
            .windows(2)
            .enumerate()
            .filter(|(_, w)| w[0].end == w[1].start)
            .map(|(x, w)| {
                (
                    super::key_cosine(data, norms, w[0].end - 1, w[1].end - 1),
                    x,
                )
            })
            .collect();
        joins.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)));
        let mut joined = vec![false; sets.len()];
        for &(_, x) in joins.iter().take(excess) {
            joined[x] = true;
        }
        let mut out: Vec<Range<usize>> = Vec::with_capacity(target);
        for (x, s) in sets.into_iter().enumerate() {
            match out.last_mut() {
                Some(prev) if x > 0 && joined[x - 1] => prev.end = s.end,
                _ => out.push(s),
            }
        }
        out
    }

    /// Pivot and Gaussian-kernel weights of one set.
    fn weigh(&self, data: &HeadData, a: &[f32], members: Range<usize>) -> MergeSet {
        let mut pivot = members.start;
        for i in members.clone() {
            if a[i] >= a[pivot] {
                pivot = i;
            }
        }
        if members.len() == 1 {
            return MergeSet {
                members,
                pivot,
                weights: vec![1.0],
            };
        }
        let d2: Vec<f32> = members
            .clone()
            .map(|i| super::squared_distance(data.key(pivot), data.key(i)))
            .collect();
        let sigma = match self.sigma {
            Sigma::Fixed(s) => s,
            Sigma::Mean => d2.iter().map(|x| x.sqrt()).sum::<f32>() / (members.len() - 1) as f32,
        };
        let denom = 2.0 * sigma * sigma;
        let g: Vec<f32> = if denom.is_normal() {
            d2.iter().map(|x| (-x / denom).exp()).collect()
        } else {
            // A kernel narrower than f32 can hold: only keys equal to the pivot's count
            // (all of them when every key is the pivot's).
            d2.iter()
                .map(|&x| if x == 0.0 { 1.0 } else { 0.0 })
                .collect()
        };
        let total: f32 = g.iter().sum();
        MergeSet {
            members,
            pivot,
            weights: g.iter().map(|x| x / total).collect(),
        }
    }

    /// Carry out `plan` on `data`.
    pub fn apply(&self, plan: &MergePlan, data: &HeadData) -> HeadData {
        let dim = data.dim;
        let mut out = HeadData::new(dim);
        let mut protected = plan.protected.iter().peekable();
        let mut sets = plan.sets.iter().peekable();
        let (mut key, mut value) = (vec![0.0f32; dim], vec![0.0f32; dim]);
        loop {
            let next_protected = protected.peek().map(|&&i| i);
            let next_set = sets.peek().map(|s| s.members.start);
            let take_set = match (next_protected, next_set) {
                (None, None) => break,
                (Some(p), Some(s)) => s < p,
                (None, Some(_)) => true,
                (Some(_), None) => false,
            };
            if !take_set {
                let i = *protected.next().unwrap();
                out.push(data.key(i), data.value(i), data.meta[i]);
                continue;
            }
            let set = sets.next().unwrap();
            if set.members.len() == 1 {
                let i = set.members.start;
                out.push(data.key(i), data.value(i), data.meta[i]);
                continue;
            }
            key.iter_mut().for_each(|x| *x = 0.0);
            value.iter_mut().for_each(|x| *x = 0.0);
            let mut meta = SlotMeta {
                position: data.meta[set.pivot].position,
                count: 0,
                score: 0.0,
                bias: 0.0,
                learned: data.meta[set.pivot].learned,
            };
            let mut weighted_bias = 0.0;
            for (i, &w) in set.members.clone().zip(&set.weights) {
                for (d, x) in key.iter_mut().zip(data.key(i)) {
                    *d += w * x;
                }
                for (d, x) in value.iter_mut().zip(data.value(i)) {
                    *d += w * x;
                }
                meta.count += data.meta[i].count;
                meta.score += data.meta[i].score;
                weighted_bias += w * data.meta[i].bias;
            }
            meta.bias = match self.mass {
                Mass::Bias => {
                    super::log_sum_exp(data.meta[set.members.clone()].iter().map(|m| m.bias))
                }
                Mass::None | Mass::Scale => weighted_bias,
            };
            if self.mass == Mass::Scale {
                let size = set.members.len() as f32;
                value.iter_mut().for_each(|x| *x *= size);
            }
            out.push(&key, &value, meta);
        }
        out
    }
}

/// Exactly `target` sets (or more, if merging would need a similarity at or below
/// `min_epsilon`) from `runs`, by the chain-last rule: merge across the most similar
/// neighbour pairs, cut at the least similar.
pub(crate) fn exact_sets(
    data: &HeadData,
    norms: &[f32],
    runs: &[Range<usize>],
    target: usize,
    min_epsilon: f32,
) -> Vec<Range<usize>> {
    // (similarity, i) for each neighbour pair (i, i + 1) inside a run.
    let mut optional = Vec::new();
    let mut forced = Vec::new();
    for run in runs {
        for i in run.start..run.end - 1 {
            let s = super::key_cosine(data, norms, i, i + 1);
            if s > min_epsilon {
                optional.push((s, i));
            } else {
                forced.push(i);
            }
        }
    }
    let mut cut = vec![false; data.len()];
    for &i in &forced {
        cut[i] = true;
    }
    let wanted = target.saturating_sub(runs.len() + forced.len());
    if wanted > 0 {
        let k = wanted.min(optional.len());
        optional.select_nth_unstable_by(k - 1, |x, y| x.0.total_cmp(&y.0).then(y.1.cmp(&x.1)));
        for &(_, i) in &optional[..k] {
            cut[i] = true;
        }
    }
    sets_from_cuts(runs, &cut)
}

/// Drop the sets with the lowest total `score` until at most `target` remain; returns
/// the dropped slots, ascending.
pub(crate) fn drop_lowest_sets(
    sets: &mut Vec<Range<usize>>,
    score: &[f32],
    target: usize,
) -> Vec<usize> {
    if sets.len() <= target {
        return Vec::new();
    }
    let set_score = |s: &Range<usize>| score[s.clone()].iter().sum::<f32>();
    let mut order: Vec<usize> = (0..sets.len()).collect();
    order.sort_by(|&x, &y| {
        set_score(&sets[x])
            .total_cmp(&set_score(&sets[y]))
            .then(x.cmp(&y))
    });
    let mut drop = vec![false; sets.len()];
    let mut dropped = Vec::new();
    for &x in &order[..sets.len() - target] {
        drop[x] = true;
        dropped.extend(sets[x].clone());
    }
    dropped.sort_unstable();
    let mut x = 0;
    sets.retain(|_| {
        x += 1;
        !drop[x - 1]
    });
    dropped
}

/// Maximal runs of consecutive unprotected slots.
pub(crate) fn runs_of(protected: &[bool]) -> Vec<Range<usize>> {
    let mut runs = Vec::new();
    let mut start = None;
    for (i, &p) in protected.iter().enumerate() {
        match (p, start) {
            (false, None) => start = Some(i),
            (true, Some(s)) => {
                runs.push(s..i);
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        runs.push(s..protected.len());
    }
    runs
}

/// Sets of each run, split after every slot `i` with `cut[i]`.
fn sets_from_cuts(runs: &[Range<usize>], cut: &[bool]) -> Vec<Range<usize>> {
    let mut sets = Vec::new();
    for run in runs {
        let mut start = run.start;
        for (offset, _) in cut[run.start..run.end - 1]
            .iter()
            .enumerate()
            .filter(|(_, &c)| c)
        {
            let i = run.start + offset;
            sets.push(start..i + 1);
            start = i + 1;
        }
        sets.push(start..run.end);
    }
    sets
}

/// The paper's greedy scan at a fixed threshold: sets in slot order.
fn partition(
    data: &HeadData,
    norms: &[f32],
    runs: &[Range<usize>],
    chain: Chain,
    epsilon: f32,
) -> Vec<Range<usize>> {
    let mut sets = Vec::new();
    for run in runs {
        let first = sets.len();
        let mut end = run.end;
        for i in (run.start..run.end - 1).rev() {
            let reference = match chain {
                Chain::Last => i + 1,
                Chain::First => end - 1,
            };
            if super::key_cosine(data, norms, i, reference) <= epsilon {
                sets.push(i + 1..end);
                end = i + 1;
            }
        }
        sets.push(run.start..end);
        sets[first..].reverse();
    }
    sets
}

impl Method for KvMerger {
    fn check_layers(&self, n_layers: usize) -> Result<(), Error> {
        let n = n_layers as i64;
        match self.skip_layers.iter().find(|&&l| l >= n || l < -n) {
            Some(l) => Err(Error::InvalidOption(format!(
                "option skip_layers: layer {l} does not exist in a model of {n_layers} layers"
            ))),
            None => Ok(()),
        }
    }
    fn check_budget(&self, len: usize, budget: usize) -> Result<(), Error> {
        if budget < len {
            self.protected_counts(len, budget)?;
        }
        Ok(())
    }
    fn compress_all(&self, inputs: &[HeadInput<'_>]) -> Result<Vec<HeadData>, Error> {
        use rayon::prelude::*;
        if self.layers == Layers::Uniform {
            return inputs.par_iter().map(|i| self.compress(*i)).collect();
        }
        let budgets = self.layer_budgets(inputs);
        inputs
            .par_iter()
            .zip(budgets)
            .map(|(i, budget)| self.compress(HeadInput { budget, ..*i }))
            .collect()
    }
    fn name(&self) -> &str {
        "kvmerger"
    }
    fn needs(&self) -> StatsNeeds {
        match self.score {
            Score::Accumulated => StatsNeeds {
                accumulated: true,
                ..Default::default()
            },
            Score::Window(w) => StatsNeeds {
                window: Some(w),
                ..Default::default()
            },
            Score::Expected => {
                super::expected_attention::ExpectedAttention::from_options(&Options::new())
                    .map(|e| e.needs())
                    .unwrap_or_default()
            }
            Score::KeyDiff => StatsNeeds::default(),
            Score::Reconstruction => StatsNeeds {
                reconstruction: true,
                ..Default::default()
            },
        }
    }
    fn mass_correction(&self) -> MassCorrection {
        match self.mass {
            Mass::None => MassCorrection::None,
            Mass::Scale => MassCorrection::ValueScale,
            Mass::Bias => MassCorrection::LogitBias,
        }
    }
    fn compress(&self, input: HeadInput<'_>) -> Result<HeadData, Error> {
        if input.budget >= input.data.len() {
            return Ok(input.data.clone());
        }
        let plan = self.plan(&input)?;
        Ok(self.apply(&plan, input.data))
    }
}
