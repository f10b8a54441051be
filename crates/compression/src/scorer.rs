//! Scorers: methods that rank a head's slots and keep the best, with the selection
//! written once (kvpress's `ScorerPress`).
//!
//! A [`Scorer`] returns one score per slot (higher is kept first; slots it always
//! keeps, such as sinks or an observation window, score `f32::INFINITY`). [`Selection`]
//! turns any scorer into a [`Method`]: each head keeps its `budget` best slots, or,
//! where the scorer's [`Scorer::scope`] shares the budget between heads (KVzip's one
//! threshold over the whole cache), the best slots over the heads that share it.
//! Composites (`adakv`, `kvmerger+`) take a scorer as a value and decide the rest.

use crate::method::{HeadInput, Method, StatsNeeds};
use crate::select::{self, Scope};
use crate::store::HeadData;
use crate::Error;

/// Ranks the slots of one head.
pub trait Scorer: Send + Sync {
    /// The registry name.
    fn name(&self) -> &str;
    /// The statistics the scores read.
    fn needs(&self) -> StatsNeeds;
    /// One score per slot of `input.data`; slots always kept score infinity.
    fn scores(&self, input: &HeadInput<'_>) -> Result<Vec<f32>, Error>;
    /// The slots always kept whatever the scores (`("sinks", 4)`), so that a budget
    /// below them is refused rather than silently exceeded.
    fn always_kept(&self) -> Option<(&'static str, usize)> {
        None
    }
    /// Who shares one budget when the scorer selects alone.
    fn scope(&self) -> Scope {
        Scope::Head
    }
}

/// A scorer as a compression method: the best-scoring slots of each head, or of the
/// heads its scope groups together.
pub struct Selection(pub Box<dyn Scorer>);

impl Selection {
    /// One head's best `budget` slots.
    pub fn compress_head(scorer: &dyn Scorer, input: HeadInput<'_>) -> Result<HeadData, Error> {
        let n = input.data.len();
        if input.budget >= n {
            return Ok(input.data.clone());
        }
        if let Some((what, k)) = scorer.always_kept() {
            select::window_fits(scorer.name(), what, k.min(n), input.budget)?;
        }
        let scores = scorer.scores(&input)?;
        check_len(scorer.name(), &scores, n)?;
        Ok(select::keep_top(input.data, &scores, input.budget))
    }
}

impl Method for Selection {
    fn name(&self) -> &str {
        self.0.name()
    }
    fn needs(&self) -> StatsNeeds {
        self.0.needs()
    }
    fn min_slots(&self) -> usize {
        self.0.always_kept().map_or(0, |(_, k)| k)
    }
    fn compress(&self, input: HeadInput<'_>) -> Result<HeadData, Error> {
        Selection::compress_head(self.0.as_ref(), input)
    }
    fn compress_all(&self, inputs: &[HeadInput<'_>]) -> Result<Vec<HeadData>, Error> {
        use rayon::prelude::*;
        let scope = self.0.scope();
        if scope == Scope::Head {
            return inputs
                .par_iter()
                .map(|i| Selection::compress_head(self.0.as_ref(), *i))
                .collect();
        }
        let (what, k) = self.0.always_kept().unwrap_or(("slots always kept", 0));
        select::check_min_slots(inputs, k, self.0.name(), what)?;
        let scores = all_scores(self.0.as_ref(), inputs)?;
        Ok(select::keep_top_shared(inputs, &scores, scope, 0.0))
    }
}

/// The scores `scorer` gives every input, in parallel, each checked to have one entry
/// per slot.
pub fn all_scores(scorer: &dyn Scorer, inputs: &[HeadInput<'_>]) -> Result<Vec<Vec<f32>>, Error> {
    use rayon::prelude::*;
    inputs
        .par_iter()
        .map(|i| {
            let s = scorer.scores(i)?;
            check_len(scorer.name(), &s, i.data.len())?;
            Ok(s)
        })
        .collect()
}

fn check_len(name: &str, scores: &[f32], n: usize) -> Result<(), Error> {
    if scores.len() != n {
        return Err(Error::Invalid(format!(
            "{name}: {} scores for {n} slots",
            scores.len()
        )));
    }
    Ok(())
}

/// A missing statistic is reported as the composite's (`adakv`, `kvmerger+`): the
/// method the user asked for.
pub(crate) fn missing_as(method: &str, e: Error) -> Error {
    match e {
        Error::MissingStats { stat, .. } => Error::MissingStats {
            method: method.into(),
            stat,
        },
        e => e,
    }
}
