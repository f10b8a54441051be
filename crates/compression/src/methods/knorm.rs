//! `knorm`: the key-norm rule (Devoto et al. 2024): keys with a small L2 norm tend to
//! receive the most attention, so keep the slots whose keys have the smallest norms.
//! Reads no attention statistics.
//!
//! Options: `recent` (share of the budget kept as a recent window before the norm rule
//! fills the rest, default 0: the paper's rule alone).

use super::OptionDoc;
use crate::method::{HeadInput, Options, StatsNeeds};
use crate::scorer::Scorer;
use crate::Error;

pub const SUMMARY: &str = "KNorm: keep the keys with the smallest L2 norm";
pub const OPTIONS: &[OptionDoc] = &[OptionDoc {
    key: "recent",
    default: "0",
    help: "share of the budget kept as the recent window; the smallest key norms fill the rest",
}];

#[derive(Clone, Debug)]
pub struct KNorm {
    pub recent: f32,
}

impl KNorm {
    pub fn from_options(opts: &Options) -> Result<Self, Error> {
        super::check_options("knorm", opts, OPTIONS)?;
        Ok(KNorm {
            recent: super::fraction_or(opts, "recent", 0.0)?,
        })
    }
}

impl Scorer for KNorm {
    fn name(&self) -> &str {
        "knorm"
    }
    fn needs(&self) -> StatsNeeds {
        StatsNeeds::default()
    }
    /// The recent window scores infinity; the rest minus their key norm.
    fn scores(&self, input: &HeadInput<'_>) -> Result<Vec<f32>, Error> {
        let negative_norms: Vec<f32> = super::key_norms(input.data).iter().map(|x| -x).collect();
        let recent = super::share_of(input.budget, self.recent);
        Ok(super::recent_scores(&negative_norms, recent))
    }
}
