//! `tova`: Token Omission Via Attention (Oren et al. 2024). Keeps the slots with the
//! highest attention from the newest query (summed over the query heads of the group)
//! and evicts the rest at once. No options.

use super::{OptionDoc, Stat};
use crate::method::{HeadInput, Options, StatsNeeds};
use crate::scorer::Scorer;
use crate::Error;

pub const SUMMARY: &str = "TOVA: keep the slots the newest query attends to most";
pub const OPTIONS: &[OptionDoc] = &[];

#[derive(Clone, Debug, Default)]
pub struct Tova;

impl Tova {
    pub fn from_options(opts: &Options) -> Result<Self, Error> {
        super::check_options("tova", opts, OPTIONS)?;
        Ok(Tova)
    }
}

impl Scorer for Tova {
    fn name(&self) -> &str {
        "tova"
    }
    fn needs(&self) -> StatsNeeds {
        StatsNeeds {
            last: true,
            ..Default::default()
        }
    }
    fn scores(&self, input: &HeadInput<'_>) -> Result<Vec<f32>, Error> {
        super::stat(input, Stat::Last, "tova").map(<[f32]>::to_vec)
    }
}
