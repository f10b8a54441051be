//! `kvmerger+`: an improved KVMerger, following the spec's "Directions" 1-3 on top of a
//! strong selector (direction 6). What it changes against `kvmerger`:
//!
//! - **Selection**: SnapKV's votes (the observation window's attention, pooled) instead
//!   of accumulated attention, and the observation window (`window`) as the recent
//!   window, kept bit-identical. The head always ends at exactly `budget` slots. Two
//!   ways to pick the pivots (`pivots`):
//!   - `snapkv` (default): every slot SnapKV keeps outside the window is a pivot, so the
//!     kept positions are exactly SnapKV's and `kvmerger+` minus `snapkv` measures the
//!     merging alone (the real-model evidence says selection matters most and merging
//!     adds on top of a strong selector). Evicted slots attach to a neighbouring pivot as
//!     consecutive runs: first each pivot absorbs its older neighbours, newest to oldest
//!     as in KVMerger's scan, while the key cosine to the slot just added is above
//!     `epsilon`; then each pivot absorbs the newer evicted neighbours still free, the
//!     same way. Evicted slots that join no pivot are dropped.
//!   - `runs`: KVMerger's sets. The window and a `heavy` share of the rest of the budget
//!     (top pooled votes) are protected, bit-identical; the other slots are split into
//!     exactly the remaining number of consecutive sets by cutting the least similar
//!     neighbour pairs (KVMerger's exact mode with `chain=last`), never merging
//!     neighbours at or below `epsilon` (sets with the fewest votes are dropped instead);
//!     each set's pivot is its member with the most votes.
//! - **Keys** (direction 1): the pivot's key is kept unchanged; only values are merged.
//! - **Values** (direction 3): weights proportional to the members' attention (the raw
//!   window votes), not a Gaussian kernel: `v = sum(a_i v_i) / sum(a_i)`. With identical
//!   keys this is exactly the mean value of the set.
//! - **Mass** (direction 2): the merged slot's logit bias grows by
//!   `min(cap, damp * ln(sum(a_i) / a_p))` over the pivot's own bias: the attention the
//!   set drew relative to its pivot, damped and capped because the observation window's
//!   attention overstates what other queries give to the absorbed slots. With `damp=1`
//!   and a high cap, identical keys reproduce full attention exactly.
//!
//! Votes of zero are read as 1e-12 so the ratios stay finite (the cap bounds them).
//! Count and score of a merged slot are the members' sums; its position is the pivot's.
//!
//! Options: `window` (32), `kernel` (7), `pool` (`max`), as SnapKV; `pivots` (`snapkv`);
//! `heavy` (0.5 of the budget after the window, with `pivots=runs`); `epsilon` (0.5: the
//! independent study found KVMerger at 0.5 better than at 0.75, and with fixed keys a
//! lower threshold only mixes values); `damp` (0.5, the spec's suggestion); `cap`
//! (ln 4 = 1.386: a merged slot draws at most 4 times its pivot's own attention).
//! `damp`, `cap` and `epsilon` are starting points to be measured against `kvmerger`
//! and `snapkv` on the same samples.
//!
//! On the synthetic proxy of `examples/fidelity.rs` (1024 slots; budgets 50% / 35% / 10%)
//! `kvmerger+` beats `snapkv` (0.65 / 0.84 / 1.23 against 0.77 / 0.97 / 1.46) and
//! `pivots=runs` does better still (0.60 / 0.75 / 1.03), but both trail `kvmerger`
//! (0.45 / 0.53 / 0.81): there, averaged keys help, because the proxy's keys are a
//! smooth random walk and its future queries retrieve random earlier tokens, which
//! rewards covering every token over choosing well. The real-model evidence in the spec
//! points the other way, so the defaults follow it; the proxy cannot settle this.

use super::kvmerger::{drop_lowest_sets, exact_sets, runs_of, MergeSet};
use super::snapkv::{SnapSelect, SNAP_OPTIONS};
use super::{OptionDoc, Stat};
use crate::method::{HeadInput, MassCorrection, Method, Options, StatsNeeds};
use crate::store::HeadData;
use crate::Error;
use std::ops::Range;

pub const SUMMARY: &str =
    "KVMerger+: SnapKV selection; pivot keys kept, attention-weighted values, damped log-mass bias";
pub const OPTIONS: &[OptionDoc] = &[
    SNAP_OPTIONS[0],
    SNAP_OPTIONS[1],
    SNAP_OPTIONS[2],
    OptionDoc {
        key: "pivots",
        default: "snapkv",
        help: "snapkv (SnapKV's kept slots absorb similar neighbours) or runs (KVMerger's sets)",
    },
    OptionDoc {
        key: "heavy",
        default: "0.5",
        help: "pivots=runs: share of the budget after the window kept as heavy hitters",
    },
    OptionDoc {
        key: "epsilon",
        default: "0.5",
        help: "cosine threshold for absorbing a neighbour into a pivot",
    },
    OptionDoc {
        key: "damp",
        default: "0.5",
        help: "factor on the log attention-mass bias, in [0, 1]",
    },
    OptionDoc {
        key: "cap",
        default: "1.386",
        help: "largest bias added to a merged slot (ln 4)",
    },
];

const MIN_VOTE: f32 = 1e-12;

/// Protected slots, sets with their pivots, and dropped slots.
type Split = (Vec<usize>, Vec<(Range<usize>, usize)>, Vec<usize>);

/// How `kvmerger+` picks its pivots.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Pivots {
    /// SnapKV's kept slots, each absorbing similar evicted neighbours.
    Snapkv,
    /// KVMerger's consecutive sets, beside a `heavy` share of protected top-voted slots.
    Runs { heavy: f32 },
}

#[derive(Clone, Debug)]
pub struct KvMergerPlus {
    pub select: SnapSelect,
    pub pivots: Pivots,
    pub epsilon: f32,
    pub damp: f32,
    pub cap: f32,
}

/// What `kvmerger+` does to one head. Every slot is in exactly one of `protected`, a
/// set's `members` or `dropped`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PlusPlan {
    /// Slots kept unchanged (the observation window, and heavy hitters with
    /// `pivots=runs`; every slot when the budget covers the head), ascending.
    pub protected: Vec<usize>,
    /// Merging sets in slot order, singletons included; `weights` are the value weights.
    pub sets: Vec<MergeSet>,
    pub dropped: Vec<usize>,
}

impl PlusPlan {
    pub fn slots(&self) -> usize {
        self.protected.len() + self.sets.len()
    }
}

impl KvMergerPlus {
    pub fn from_options(opts: &Options) -> Result<Self, Error> {
        super::check_options("kvmerger+", opts, OPTIONS)?;
        let epsilon = opts.f32_or("epsilon", 0.5)?;
        if !(-1.0..=1.0).contains(&epsilon) {
            return Err(Error::InvalidOption(format!(
                "option epsilon={epsilon} must be a cosine, in [-1, 1]"
            )));
        }
        let cap = opts.f32_or("cap", 4f32.ln())?;
        if cap < 0.0 {
            return Err(Error::InvalidOption(format!(
                "option cap={cap} must not be negative"
            )));
        }
        let pivots = match opts.choice_or("pivots", &["snapkv", "runs"], "snapkv")? {
            "runs" => Pivots::Runs {
                heavy: super::fraction_or(opts, "heavy", 0.5)?,
            },
            _ if opts.get("heavy").is_some() => {
                return Err(Error::InvalidOption(
                    "kvmerger+: option 'heavy' applies to pivots=runs".into(),
                ))
            }
            _ => Pivots::Snapkv,
        };
        Ok(KvMergerPlus {
            select: SnapSelect::from_options(opts)?,
            pivots,
            epsilon,
            damp: super::fraction_or(opts, "damp", 0.5)?,
            cap,
        })
    }

    /// The protected slots, sets and value weights for `input`, without merging.
    pub fn plan(&self, input: &HeadInput<'_>) -> Result<PlusPlan, Error> {
        let (n, budget, data) = (input.data.len(), input.budget, input.data);
        if budget >= n {
            return Ok(PlusPlan {
                protected: (0..n).collect(),
                ..Default::default()
            });
        }
        let votes = super::stat(input, Stat::Window, "kvmerger+")?;
        let norms = super::key_norms(data);
        let (protected, sets, dropped) = match self.pivots {
            Pivots::Snapkv => self.attach(data, &norms, votes, budget)?,
            Pivots::Runs { heavy } => self.runs(data, &norms, votes, budget, heavy)?,
        };
        let weigh = |(members, pivot): (Range<usize>, usize)| {
            let total: f32 = members.clone().map(|i| votes[i].max(MIN_VOTE)).sum();
            let weights = members
                .clone()
                .map(|i| votes[i].max(MIN_VOTE) / total)
                .collect();
            MergeSet {
                members,
                pivot,
                weights,
            }
        };
        Ok(PlusPlan {
            protected,
            sets: sets.into_iter().map(weigh).collect(),
            dropped,
        })
    }

    /// `pivots=snapkv`: SnapKV's kept slots absorb their similar evicted neighbours.
    fn attach(
        &self,
        data: &HeadData,
        norms: &[f32],
        votes: &[f32],
        budget: usize,
    ) -> Result<Split, Error> {
        let n = data.len();
        let window = self.select.window.min(n);
        let mut selected = vec![false; n];
        for i in self.select.select("kvmerger+", votes, budget)? {
            selected[i] = true;
        }
        let pivots: Vec<usize> = (0..n - window).filter(|&i| selected[i]).collect();
        let free = |i: usize, claimed: &[bool]| !selected[i] && !claimed[i];
        let similar = |i: usize, j: usize| super::key_cosine(data, norms, i, j) > self.epsilon;
        let mut claimed = vec![false; n];
        let mut sets = Vec::with_capacity(pivots.len());
        for &p in &pivots {
            let mut lo = p;
            while lo > 0 && free(lo - 1, &claimed) && similar(lo - 1, lo) {
                lo -= 1;
                claimed[lo] = true;
            }
            sets.push((lo..p + 1, p));
        }
        for (&p, (set, _)) in pivots.iter().zip(sets.iter_mut()) {
            let mut hi = p + 1;
            while hi < n && free(hi, &claimed) && similar(hi, hi - 1) {
                claimed[hi] = true;
                hi += 1;
            }
            set.end = hi;
        }
        let dropped = (0..n).filter(|&i| !selected[i] && !claimed[i]).collect();
        Ok(((n - window..n).collect(), sets, dropped))
    }

    /// `pivots=runs`: KVMerger's exact sets beside SnapKV-voted heavy hitters.
    fn runs(
        &self,
        data: &HeadData,
        norms: &[f32],
        votes: &[f32],
        budget: usize,
        heavy: f32,
    ) -> Result<Split, Error> {
        let n = data.len();
        let window = self.select.window.min(n);
        super::window_fits("kvmerger+", "the observation window", window, budget)?;
        let heavy = super::share_of(budget - window, heavy);
        let pooled = self.select.pooled_votes(&votes[..n - window]);
        let mut protected = vec![false; n];
        for i in super::top_k(&pooled, (0..n - window).collect(), heavy) {
            protected[i] = true;
        }
        protected[n - window..].iter_mut().for_each(|p| *p = true);
        let runs = runs_of(&protected);
        let target = budget - window - heavy;
        let mut sets = exact_sets(data, norms, &runs, target, self.epsilon);
        let dropped = drop_lowest_sets(&mut sets, votes, target);
        // The pivot is the member the window attended to most (ties: the newest).
        let with_pivots = sets
            .into_iter()
            .map(|members| {
                // `max_by` keeps the last of equal maxima: the newest.
                let pivot = members
                    .clone()
                    .max_by(|&x, &y| votes[x].total_cmp(&votes[y]))
                    .unwrap_or(members.start);
                (members, pivot)
            })
            .collect();
        Ok((
            (0..n).filter(|&i| protected[i]).collect(),
            with_pivots,
            dropped,
        ))
    }

    /// Carry out `plan` on `data`, with `votes` the window votes the plan was made from.
    pub fn apply(&self, plan: &PlusPlan, data: &HeadData, votes: &[f32]) -> HeadData {
        // Slots in position order: protected ones by index, sets at their pivot.
        let mut order: Vec<(usize, Option<&MergeSet>)> =
            plan.protected.iter().map(|&i| (i, None)).collect();
        order.extend(plan.sets.iter().map(|s| (s.pivot, Some(s))));
        order.sort_unstable_by_key(|x| x.0);
        let mut out = HeadData::new(data.dim);
        let mut value = vec![0.0f32; data.dim];
        for (p, set) in order {
            let set = match set {
                Some(set) if set.members.len() > 1 => set,
                _ => {
                    out.push(data.key(p), data.value(p), data.meta[p]);
                    continue;
                }
            };
            value.iter_mut().for_each(|x| *x = 0.0);
            let mut meta = data.meta[p];
            meta.count = 0;
            meta.score = 0.0;
            let mut mass = 0.0;
            for (i, &w) in set.members.clone().zip(&set.weights) {
                for (d, x) in value.iter_mut().zip(data.value(i)) {
                    *d += w * x;
                }
                meta.count += data.meta[i].count;
                meta.score += data.meta[i].score;
                mass += votes[i].max(MIN_VOTE);
            }
            meta.bias += (self.damp * (mass / votes[p].max(MIN_VOTE)).ln()).min(self.cap);
            out.push(data.key(p), &value, meta);
        }
        out
    }
}

impl Method for KvMergerPlus {
    fn name(&self) -> &str {
        "kvmerger+"
    }
    fn needs(&self) -> StatsNeeds {
        self.select.needs()
    }
    fn min_slots(&self) -> usize {
        self.select.window
    }
    fn mass_correction(&self) -> MassCorrection {
        MassCorrection::LogitBias
    }
    fn compress(&self, input: HeadInput<'_>) -> Result<HeadData, Error> {
        if input.budget >= input.data.len() {
            return Ok(input.data.clone());
        }
        let plan = self.plan(&input)?;
        let votes = super::stat(&input, Stat::Window, "kvmerger+")?;
        Ok(self.apply(&plan, input.data, votes))
    }
}
