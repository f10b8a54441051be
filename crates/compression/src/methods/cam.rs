//! `cam`: Cache Merging (Zhang et al., ICML 2024). An eviction rule picks the kept
//! slots; each evicted slot's VALUE is then merged into the slots that follow it, and
//! its key is dropped.
//!
//! Eviction (`select`): `streaming` (the official code: `sinks` start slots plus a recent
//! window filling the rest of the budget) or `h2o` (`recent` share of the budget plus
//! heavy hitters by accumulated attention).
//!
//! Merging, applied at once to a prompt by replaying the official decode-time rule in
//! position order: when slot `e` is evicted, the cache holds every slot after it, so the
//! `m` slots that follow `e` receive it. With `a` the accumulated attention,
//! `p = a[e] / mean(a over those m slots)` clamped to [0, 1]; `M` is `p` (`mode =
//! deterministic`) or a seeded Bernoulli(p) draw (`mode = sample`); each of the `m`
//! followers gets `M * v[e] / m` added to its value, with `v[e]` including what `e`
//! itself received earlier, so merged mass moves forward until it reaches kept slots.
//! Near the end of the sequence fewer than `m` slots may follow; the share is then
//! divided by the number that do, so the added total is always `M * v[e]`.
//!
//! Kept slots keep their keys, positions, counts and scores; only values change (sinks
//! never change: no evicted slot precedes them). No logit bias is set.
//!
//! Options: `select` (`streaming`|`h2o`, default `streaming`), `sinks` (default 4, with
//! `streaming` only), `recent` (default 0.5, with `h2o` only), `m` (followers per merge,
//! default 32, or `recent` for the recent window's size), `mode`
//! (`deterministic`|`sample`, default `deterministic`), `seed` (default 0, for `sample`).

use super::{OptionDoc, Stat};
use crate::method::{HeadInput, Method, Options, StatsNeeds};
use crate::store::HeadData;
use crate::Error;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub const SUMMARY: &str =
    "CaM: eviction (streaming or h2o) plus merging evicted values into the following slots";
pub const OPTIONS: &[OptionDoc] = &[
    OptionDoc {
        key: "select",
        default: "streaming",
        help: "eviction rule: streaming (start + recent) or h2o",
    },
    OptionDoc {
        key: "sinks",
        default: "4",
        help: "start tokens kept (select=streaming)",
    },
    OptionDoc {
        key: "recent",
        default: "0.5",
        help: "share of the budget kept as the recent window (select=h2o)",
    },
    OptionDoc {
        key: "m",
        default: "32",
        help: "number of following slots an evicted value is spread over, or 'recent'",
    },
    OptionDoc {
        key: "mode",
        default: "deterministic",
        help: "deterministic (M = p) or sample (M ~ Bernoulli(p))",
    },
    OptionDoc {
        key: "seed",
        default: "0",
        help: "seed for mode=sample (mixed with the layer and KV head)",
    },
];

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum CamSelect {
    Streaming { sinks: usize },
    H2o { recent: f32 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Followers {
    Count(usize),
    /// As many as the recent window holds.
    Recent,
}

#[derive(Clone, Debug)]
pub struct Cam {
    pub select: CamSelect,
    pub followers: Followers,
    pub sample: bool,
    pub seed: u64,
}

impl Cam {
    pub fn from_options(opts: &Options) -> Result<Self, Error> {
        super::check_options("cam", opts, OPTIONS)?;
        let select = match opts.choice_or("select", &["streaming", "h2o"], "streaming")? {
            "streaming" => {
                if opts.get("recent").is_some() {
                    return Err(Error::InvalidOption(
                        "cam: option 'recent' applies to select=h2o; with select=streaming the recent window is the budget left after the sinks".into(),
                    ));
                }
                CamSelect::Streaming {
                    sinks: opts.usize_or("sinks", 4)?,
                }
            }
            _ => {
                if opts.get("sinks").is_some() {
                    return Err(Error::InvalidOption(
                        "cam: option 'sinks' applies to select=streaming".into(),
                    ));
                }
                CamSelect::H2o {
                    recent: super::fraction_or(opts, "recent", 0.5)?,
                }
            }
        };
        let followers = match opts.get("m") {
            Some("recent") => Followers::Recent,
            _ => match opts.usize_or("m", 32)? {
                0 => {
                    return Err(Error::InvalidOption(
                        "cam: option m must be at least 1".into(),
                    ))
                }
                m => Followers::Count(m),
            },
        };
        let sample =
            opts.choice_or("mode", &["deterministic", "sample"], "deterministic")? == "sample";
        Ok(Cam {
            select,
            followers,
            sample,
            seed: opts.u64_or("seed", 0)?,
        })
    }
}

impl Method for Cam {
    fn name(&self) -> &str {
        "cam"
    }
    fn needs(&self) -> StatsNeeds {
        StatsNeeds {
            accumulated: true,
            ..Default::default()
        }
    }
    fn min_slots(&self) -> usize {
        match self.select {
            CamSelect::Streaming { sinks } => sinks,
            CamSelect::H2o { .. } => 0,
        }
    }
    fn compress(&self, input: HeadInput<'_>) -> Result<HeadData, Error> {
        let (n, budget, data) = (input.data.len(), input.budget, input.data);
        if budget >= n {
            return Ok(data.clone());
        }
        let attention = super::stat(&input, Stat::Accumulated, "cam")?;
        let (kept, recent) = match self.select {
            CamSelect::Streaming { sinks } => {
                super::window_fits("cam", "sinks", sinks, budget)?;
                let recent = budget - sinks;
                ((0..sinks).chain(n - recent..n).collect::<Vec<_>>(), recent)
            }
            CamSelect::H2o { recent } => {
                let recent = super::share_of(budget, recent);
                (super::recent_plus_top(n, attention, recent, budget), recent)
            }
        };
        let m = match self.followers {
            Followers::Count(m) => m,
            Followers::Recent => recent.max(1),
        };
        let mut is_kept = vec![false; n];
        for &i in &kept {
            is_kept[i] = true;
        }
        let dim = data.dim;
        let mut values = data.values.clone();
        let mut rng = ChaCha8Rng::seed_from_u64(super::head_seed(self.seed, input.pos));
        for e in (0..n).filter(|&i| !is_kept[i]) {
            let followers = e + 1..(e + 1 + m).min(n);
            if followers.is_empty() {
                continue;
            }
            let mean = attention[followers.clone()].iter().sum::<f32>() / followers.len() as f32;
            let p = if mean > 0.0 {
                (attention[e] / mean).clamp(0.0, 1.0)
            } else if attention[e] > 0.0 {
                1.0
            } else {
                0.0
            };
            let merge = if self.sample {
                if rng.gen_bool(p as f64) {
                    1.0
                } else {
                    0.0
                }
            } else {
                p
            };
            if merge == 0.0 {
                continue;
            }
            let share = merge / followers.len() as f32;
            let (head, tail) = values.split_at_mut((e + 1) * dim);
            let evicted = &head[e * dim..];
            for f in tail[..followers.len() * dim].chunks_exact_mut(dim) {
                for (x, &v) in f.iter_mut().zip(evicted) {
                    *x += share * v;
                }
            }
        }
        let mut out = super::keep(data, kept);
        let kept_in_order = (0..n).filter(|&i| is_kept[i]);
        for (slot, i) in kept_in_order.enumerate() {
            out.values[slot * dim..(slot + 1) * dim]
                .copy_from_slice(&values[i * dim..(i + 1) * dim]);
        }
        Ok(out)
    }
}
