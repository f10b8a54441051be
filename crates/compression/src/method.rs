//! The one interface every compression method implements.

use crate::store::HeadData;
use crate::Error;
use std::collections::BTreeMap;

/// Attention statistics the engine collects for one (layer, KV head) during prefill.
/// Each vector has one entry per slot; with grouped-query attention, entries are
/// summed over the query heads that share the KV head.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HeadStats {
    /// Column sums of the softmax attention over every prompt query (H2O's score).
    pub accumulated: Option<Vec<f32>>,
    /// Attention of the last `window` prompt queries, summed over those queries (SnapKV).
    pub window: Option<Vec<f32>>,
    /// Attention row of the newest query (TOVA).
    pub last: Option<Vec<f32>>,
    /// The distribution of future queries, one entry per query head of the group
    /// (Expected Attention).
    pub queries: Option<Vec<QueryMoments>>,
    /// KVzip's score: the largest attention each slot received from the queries of a
    /// pass that repeats the context (max over those queries and the group's heads).
    pub reconstruction: Option<Vec<f32>>,
    /// A learned scorer's prediction for each slot (KVzap: the log of its KVzip score),
    /// computed from the slot's hidden state during the forward pass.
    pub learned: Option<Vec<f32>>,
}

/// Mean and covariance of one query head's future queries, as they will meet the
/// stored keys (RoPE applied: rotated by the mean rotation of the positions to come).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct QueryMoments {
    /// `dim` values.
    pub mean: Vec<f32>,
    /// `dim * dim` values, row-major (symmetric).
    pub cov: Vec<f32>,
    /// The attention logit scale of the model (`1/sqrt(dim)` for most).
    pub scale: f32,
}

/// Which statistics a method reads, so the engine collects only those.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsNeeds {
    pub accumulated: bool,
    /// Size of the observation window, if the method needs one.
    pub window: Option<usize>,
    pub last: bool,
    /// Moments of the queries, for queries this many positions ahead on average
    /// (Expected Attention's `future`), leaving out the first `sinks` positions.
    pub queries: Option<QueryNeeds>,
    /// KVzip's context reconstruction pass.
    pub reconstruction: bool,
    /// A learned scorer's prediction per token, from the forward pass (KVzap).
    pub learned: bool,
}

/// What Expected Attention asks of the query statistics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueryNeeds {
    /// Future positions the rotation is averaged over.
    pub future: usize,
    /// Leading positions left out of the moments (attention sinks, outliers).
    pub sinks: usize,
    /// Whether the mean includes the model's query bias (the mean of the real
    /// queries); without it, the mean of `W_q h` alone, as kvpress builds it.
    pub bias: bool,
}

impl StatsNeeds {
    pub fn union(self, other: StatsNeeds) -> StatsNeeds {
        StatsNeeds {
            accumulated: self.accumulated || other.accumulated,
            window: match (self.window, other.window) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            },
            last: self.last || other.last,
            queries: match (self.queries, other.queries) {
                (Some(a), Some(b)) => Some(QueryNeeds {
                    future: a.future.max(b.future),
                    sinks: a.sinks.min(b.sinks),
                    // The collected statistics serve both: the bias is added or not
                    // when each method's moments are made.
                    bias: a.bias || b.bias,
                }),
                (a, b) => a.or(b),
            },
            reconstruction: self.reconstruction || other.reconstruction,
            learned: self.learned || other.learned,
        }
    }
    pub fn any(&self) -> bool {
        self.accumulated
            || self.window.is_some()
            || self.last
            || self.queries.is_some()
            || self.reconstruction
            || self.learned
    }
}

/// In words, for reports: "accumulated attention, a 64-query window", or "nothing".
impl std::fmt::Display for StatsNeeds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if self.accumulated {
            parts.push("accumulated attention".to_string());
        }
        if let Some(w) = self.window {
            parts.push(format!("a {w}-query window"));
        }
        if self.last {
            parts.push("the last query's attention".to_string());
        }
        if let Some(q) = self.queries {
            parts.push(format!(
                "query moments ({} positions ahead, {} sinks left out)",
                q.future, q.sinks
            ));
        }
        if self.reconstruction {
            parts.push("a reconstruction pass".to_string());
        }
        if self.learned {
            parts.push("a learned scorer's predictions".to_string());
        }
        if parts.is_empty() {
            f.write_str("nothing")
        } else {
            f.write_str(&parts.join(", "))
        }
    }
}

/// Where a head sits in the model, for methods whose behaviour depends on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeadPos {
    pub layer: usize,
    pub n_layers: usize,
    pub kv_head: usize,
    pub n_kv_heads: usize,
}

impl HeadPos {
    /// The only KV head of a one-layer model: where a head compressed on its own (an
    /// example, a benchmark, a test) sits.
    pub const SINGLE: HeadPos = HeadPos {
        layer: 0,
        n_layers: 1,
        kv_head: 0,
        n_kv_heads: 1,
    };
}

/// Everything a method reads to compress one head.
#[derive(Clone, Copy, Debug)]
pub struct HeadInput<'a> {
    pub data: &'a HeadData,
    pub stats: &'a HeadStats,
    pub pos: HeadPos,
    /// Number of slots this head may keep.
    pub budget: usize,
}

/// How the engine must treat a merged slot's attention (see spec: attention mass).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum MassCorrection {
    #[default]
    None,
    /// Merged values were scaled by their member count.
    ValueScale,
    /// A logit bias (stored in `SlotMeta::bias`) was set on merged slots.
    LogitBias,
}

/// A compression method: reads one head's slots and statistics, returns a smaller set of slots.
pub trait Method: Send + Sync {
    /// The registry name.
    fn name(&self) -> &str;
    /// The statistics this method reads.
    fn needs(&self) -> StatsNeeds;
    /// The compressed head. Must not return more than `input.budget` slots unless the
    /// method's documented mode (e.g. KVMerger's paper mode) says its size is not enforced.
    fn compress(&self, input: HeadInput<'_>) -> Result<HeadData, Error>;
    /// Every head of a cache at once, in the order given (each input carries its
    /// [`HeadPos`]). Methods that share one budget between heads (Ada-KV, KVzip) or
    /// between layers override this; the sum of the inputs' budgets is what they may
    /// spend. By default each head is compressed on its own, in parallel.
    fn compress_all(&self, inputs: &[HeadInput<'_>]) -> Result<Vec<HeadData>, Error> {
        use rayon::prelude::*;
        inputs.par_iter().map(|i| self.compress(*i)).collect()
    }
    /// Slots the method keeps in a head whatever the budget (an observation window,
    /// attention sinks): a budget below it is an error. Layer schedules give no layer
    /// fewer slots than this when the mean budget allows (see `Schedule::layer_budgets`).
    fn min_slots(&self) -> usize {
        0
    }
    /// Whether a head of `len` slots can be compressed to `budget` slots, checked from
    /// the prompt's length alone, before any prefill, so that settings that cannot work
    /// (a window or sinks larger than the budget) are refused before the work is done.
    fn check_budget(&self, len: usize, budget: usize) -> Result<(), Error> {
        // Methods keep at most the whole prompt of their window or sinks.
        let min = self.min_slots().min(len);
        if budget < len && budget < min {
            return Err(Error::Invalid(format!(
                "{}: a budget of {budget} slots (for a prompt of {len} tokens) is below the {min} slots it always keeps (its window or sinks); raise the budget or lower them",
                self.name()
            )));
        }
        Ok(())
    }
    /// Errors for settings that name layers a model of `n_layers` layers does not have,
    /// checked before any prefill.
    fn check_layers(&self, _n_layers: usize) -> Result<(), Error> {
        Ok(())
    }
    /// How the engine must treat the slots this method merges (most methods merge none).
    fn mass_correction(&self) -> MassCorrection {
        MassCorrection::None
    }
}

/// Method options as `key=value` strings, checked by each method for unknown keys.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Options {
    map: BTreeMap<String, String>,
}

impl Options {
    pub fn new() -> Self {
        Self::default()
    }
    /// Parse `key=value`.
    pub fn parse_pair(&mut self, pair: &str) -> Result<(), Error> {
        let (k, v) = pair.split_once('=').ok_or_else(|| {
            Error::InvalidOption(format!("'{pair}' is not of the form key=value"))
        })?;
        let k = k.trim();
        if k.is_empty() {
            return Err(Error::InvalidOption(format!("'{pair}' has an empty key")));
        }
        self.map.insert(k.to_string(), v.trim().to_string());
        Ok(())
    }
    pub fn set(&mut self, key: &str, value: impl ToString) {
        self.map.insert(key.to_string(), value.to_string());
    }
    pub fn get(&self, key: &str) -> Option<&str> {
        self.map.get(key).map(|s| s.as_str())
    }
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.map.keys().map(|s| s.as_str())
    }
    /// Error on any key not in `allowed`.
    pub fn check_known(&self, method: &str, allowed: &[&str]) -> Result<(), Error> {
        for k in self.map.keys() {
            if !allowed.contains(&k.as_str()) {
                return Err(Error::InvalidOption(format!(
                    "method '{method}' has no option '{k}' (known: {})",
                    if allowed.is_empty() {
                        "none".to_string()
                    } else {
                        allowed.join(", ")
                    }
                )));
            }
        }
        Ok(())
    }
    pub fn f32_or(&self, key: &str, default: f32) -> Result<f32, Error> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .parse::<f32>()
                .ok()
                .filter(|x| x.is_finite())
                .ok_or_else(|| {
                    Error::InvalidOption(format!("option {key}='{v}' is not a finite number"))
                }),
        }
    }
    pub fn usize_or(&self, key: &str, default: usize) -> Result<usize, Error> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.parse::<usize>().map_err(|_| {
                Error::InvalidOption(format!("option {key}='{v}' is not a non-negative integer"))
            }),
        }
    }
    pub fn u64_or(&self, key: &str, default: u64) -> Result<u64, Error> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.parse::<u64>().map_err(|_| {
                Error::InvalidOption(format!("option {key}='{v}' is not a non-negative integer"))
            }),
        }
    }
    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool, Error> {
        match self.get(key) {
            None => Ok(default),
            Some("true" | "1" | "yes") => Ok(true),
            Some("false" | "0" | "no") => Ok(false),
            Some(v) => Err(Error::InvalidOption(format!(
                "option {key}='{v}' is not true or false"
            ))),
        }
    }
    /// One of `choices`, or `default`.
    pub fn choice_or<'a>(
        &'a self,
        key: &str,
        choices: &[&str],
        default: &'a str,
    ) -> Result<&'a str, Error> {
        match self.get(key) {
            None => Ok(default),
            Some(v) if choices.contains(&v) => Ok(v),
            Some(v) => Err(Error::InvalidOption(format!(
                "option {key}='{v}' must be one of: {}",
                choices.join(", ")
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_needs_read_as_words() {
        assert_eq!(StatsNeeds::default().to_string(), "nothing");
        let needs = StatsNeeds {
            accumulated: true,
            window: Some(64),
            reconstruction: true,
            ..Default::default()
        };
        assert_eq!(
            needs.to_string(),
            "accumulated attention, a 64-query window, a reconstruction pass"
        );
    }
}
