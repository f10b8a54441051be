//! `streaming`: StreamingLLM (Xiao et al. 2023). Keeps the first `sinks` slots (the
//! attention sinks) and fills the rest of the budget with the most recent slots; the
//! middle is dropped. Reads no attention statistics.
//!
//! Options: `sinks` (token count, default 4; more sinks than the budget is an error).

use super::OptionDoc;
use crate::method::{HeadInput, Method, Options, StatsNeeds};
use crate::store::HeadData;
use crate::Error;

pub const SUMMARY: &str = "StreamingLLM: attention sinks plus a recent window";
pub const OPTIONS: &[OptionDoc] = &[OptionDoc {
    key: "sinks",
    default: "4",
    help: "number of initial tokens always kept (the rest of the budget is the recent window)",
}];

#[derive(Clone, Debug)]
pub struct Streaming {
    pub sinks: usize,
}

impl Streaming {
    pub fn from_options(opts: &Options) -> Result<Self, Error> {
        super::check_options("streaming", opts, OPTIONS)?;
        Ok(Streaming {
            sinks: opts.usize_or("sinks", 4)?,
        })
    }
}

impl Method for Streaming {
    fn name(&self) -> &str {
        "streaming"
    }
    fn needs(&self) -> StatsNeeds {
        StatsNeeds::default()
    }
    fn min_slots(&self) -> usize {
        self.sinks
    }
    fn compress(&self, input: HeadInput<'_>) -> Result<HeadData, Error> {
        let (n, budget) = (input.data.len(), input.budget);
        if budget >= n {
            return Ok(input.data.clone());
        }
        super::window_fits("streaming", "sinks", self.sinks, budget)?;
        let recent = budget - self.sinks;
        let kept: Vec<usize> = (0..self.sinks).chain(n - recent..n).collect();
        Ok(super::keep(input.data, kept))
    }
}
