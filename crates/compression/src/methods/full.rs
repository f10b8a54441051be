//! `full`: no compression. Every slot is returned unchanged, whatever the budget: it is
//! the reference every other method is measured against. No options.

use super::OptionDoc;
use crate::method::{HeadInput, Method, Options, StatsNeeds};
use crate::store::HeadData;
use crate::Error;

pub const SUMMARY: &str = "no compression: the full cache, the reference (ignores the budget)";
pub const OPTIONS: &[OptionDoc] = &[];

#[derive(Clone, Debug, Default)]
pub struct Full;

impl Full {
    pub fn from_options(opts: &Options) -> Result<Self, Error> {
        super::check_options("full", opts, OPTIONS)?;
        Ok(Full)
    }
}

impl Method for Full {
    fn name(&self) -> &str {
        "full"
    }
    fn needs(&self) -> StatsNeeds {
        StatsNeeds::default()
    }
    fn compress(&self, input: HeadInput<'_>) -> Result<HeadData, Error> {
        Ok(input.data.clone())
    }
}
