//! `h2o`: Heavy-Hitter Oracle (Zhang et al. 2023). Keeps a recent window plus the slots
//! with the highest accumulated attention (column sums of the prefill attention, summed
//! over the query heads of the group) among the rest. Applied once to a prompt, this is
//! the same rule the original applies one token at a time while decoding.
//!
//! Options: `recent` (share of the budget given to the recent window, default 0.5 as
//! in the official scripts; heavy hitters fill the rest).

use super::{OptionDoc, Stat};
use crate::method::{HeadInput, Options, StatsNeeds};
use crate::scorer::Scorer;
use crate::Error;

pub const SUMMARY: &str = "H2O: recent window plus heavy hitters by accumulated attention";
pub const OPTIONS: &[OptionDoc] = &[OptionDoc {
    key: "recent",
    default: "0.5",
    help: "share of the budget kept as the recent window; heavy hitters fill the rest",
}];

#[derive(Clone, Debug)]
pub struct H2o {
    pub recent: f32,
}

impl H2o {
    pub fn from_options(opts: &Options) -> Result<Self, Error> {
        super::check_options("h2o", opts, OPTIONS)?;
        Ok(H2o {
            recent: super::fraction_or(opts, "recent", 0.5)?,
        })
    }
}

impl Scorer for H2o {
    fn name(&self) -> &str {
        "h2o"
    }
    fn needs(&self) -> StatsNeeds {
        StatsNeeds {
            accumulated: true,
            ..Default::default()
        }
    }
    /// The recent window scores infinity; the rest their accumulated attention.
    fn scores(&self, input: &HeadInput<'_>) -> Result<Vec<f32>, Error> {
        let s = super::stat(input, Stat::Accumulated, "h2o")?;
        Ok(super::recent_scores(
            s,
            super::share_of(input.budget, self.recent),
        ))
    }
}
