//! `snapkv`: SnapKV (Li et al. 2024). The last `window` prompt queries (the observation
//! window) vote: their attention over the earlier slots, summed over the window and
//! over the query heads of the group, is smoothed by a 1-D pooling of width `kernel`
//! along the token axis, and the top `budget - window` earlier slots are kept together
//! with the window itself.
//!
//! Options: `window` (observation window in tokens, default 32; a window larger than
//! the budget is an error), `kernel` (odd pooling width, default 7; 1 disables pooling),
//! `pool` (`max` or `mean`, default `max`).
//!
//! [`SnapSelect`] is shared with `pyramidkv` and `kvmerger+`.

use super::{OptionDoc, Stat};
use crate::method::{HeadInput, Options, StatsNeeds};
use crate::scorer::Scorer;
use crate::Error;

pub const SUMMARY: &str = "SnapKV: observation-window votes, pooled, plus the window itself";
pub const OPTIONS: &[OptionDoc] = SNAP_OPTIONS;

pub(crate) const SNAP_OPTIONS: &[OptionDoc] = &[
    OptionDoc {
        key: "window",
        default: "32",
        help: "observation window: the last prompt tokens, always kept",
    },
    OptionDoc {
        key: "kernel",
        default: "7",
        help: "odd width of the pooling over the votes (1 = none)",
    },
    OptionDoc {
        key: "pool",
        default: "max",
        help: "pooling of the votes: max or mean",
    },
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pool {
    Max,
    Mean,
}

/// SnapKV's selection rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapSelect {
    pub window: usize,
    pub kernel: usize,
    pub pool: Pool,
}

impl SnapSelect {
    pub(crate) fn from_options(opts: &Options) -> Result<Self, Error> {
        let window = opts.usize_or("window", 32)?;
        let kernel = opts.usize_or("kernel", 7)?;
        if kernel % 2 == 0 {
            return Err(Error::InvalidOption(format!(
                "option kernel={kernel} must be odd (1 disables pooling)"
            )));
        }
        let pool = match opts.choice_or("pool", &["max", "mean"], "max")? {
            "max" => Pool::Max,
            _ => Pool::Mean,
        };
        Ok(SnapSelect {
            window,
            kernel,
            pool,
        })
    }

    pub fn needs(&self) -> StatsNeeds {
        StatsNeeds {
            window: Some(self.window),
            ..Default::default()
        }
    }

    /// The observation window's votes for the slots before it, pooled.
    pub fn pooled_votes(&self, votes: &[f32]) -> Vec<f32> {
        let half = self.kernel / 2;
        let m = votes.len();
        (0..m)
            .map(|i| {
                let span = &votes[i.saturating_sub(half)..(i + half + 1).min(m)];
                match self.pool {
                    Pool::Max => span.iter().copied().fold(f32::NEG_INFINITY, f32::max),
                    Pool::Mean => span.iter().sum::<f32>() / span.len() as f32,
                }
            })
            .collect()
    }

    /// Every slot's score under SnapKV's rule: the pooled votes before the window, and
    /// infinity for the window itself.
    pub fn scores(&self, votes: &[f32]) -> Vec<f32> {
        let n = votes.len();
        let window = self.window.min(n);
        let mut s = self.pooled_votes(&votes[..n - window]);
        s.resize(n, f32::INFINITY);
        s
    }

    /// Indices (unsorted) of the `budget` slots SnapKV keeps out of `n`, given the window votes.
    pub fn select(&self, method: &str, votes: &[f32], budget: usize) -> Result<Vec<usize>, Error> {
        let n = votes.len();
        let window = self.window.min(n);
        super::window_fits(method, "the observation window", window, budget)?;
        let pooled = self.pooled_votes(&votes[..n - window]);
        let mut kept = super::top_k(&pooled, (0..n - window).collect(), budget - window);
        kept.extend(n - window..n);
        Ok(kept)
    }
}

#[derive(Clone, Debug)]
pub struct SnapKv {
    pub select: SnapSelect,
}

impl SnapKv {
    pub fn from_options(opts: &Options) -> Result<Self, Error> {
        super::check_options("snapkv", opts, OPTIONS)?;
        Ok(SnapKv {
            select: SnapSelect::from_options(opts)?,
        })
    }
}

impl Scorer for SnapKv {
    fn name(&self) -> &str {
        "snapkv"
    }
    fn needs(&self) -> StatsNeeds {
        self.select.needs()
    }
    fn always_kept(&self) -> Option<(&'static str, usize)> {
        Some(("the observation window", self.select.window))
    }
    fn scores(&self, input: &HeadInput<'_>) -> Result<Vec<f32>, Error> {
        super::stat(input, Stat::Window, "snapkv").map(|v| self.select.scores(v))
    }
}
