//! `tova`: Token Omission Via Attention (Oren et al. 2024). Keeps the slots with the
//! highest attention from the newest query (summed over the query heads of the group)
//! and evicts the rest at once. No options.

use super::{OptionDoc, Stat};
use crate::method::{HeadInput, Method, Options, StatsNeeds};
use crate::store::HeadData;
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

impl Method for Tova {
    fn name(&self) -> &str {
        "tova"
    }
    fn needs(&self) -> StatsNeeds {
        StatsNeeds {
            last: true,
            ..Default::default()
        }
    }
    fn compress(&self, input: HeadInput<'_>) -> Result<HeadData, Error> {
        let (n, budget) = (input.data.len(), input.budget);
        if budget >= n {
            return Ok(input.data.clone());
        }
        let scores = super::stat(&input, Stat::Last, "tova")?;
        Ok(super::keep(
            input.data,
            super::top_k(scores, (0..n).collect(), budget),
        ))
    }
    fn scores(&self, input: &HeadInput<'_>) -> Option<Result<Vec<f32>, Error>> {
        Some(super::stat(input, Stat::Last, "tova").map(<[f32]>::to_vec))
    }
}
