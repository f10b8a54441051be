//! `kvzip`: KVzip (Kim et al. 2025, arXiv 2505.23416). A slot matters if the model
//! needs it to *reconstruct the context*: after the prefill, the engine runs a second,
//! teacher-forced pass in which the model is asked to repeat the context and is fed
//! the context again, chunk by chunk; each slot scores the largest attention any query
//! of that pass (and any query head of its group) gave it. The pass's own tokens are
//! never kept. The score does not depend on any later question, so a context
//! compressed once serves any number of questions; the pass costs about one more
//! prefill.
//!
//! The budget is shared as the paper does: by default (`scope=model`) one threshold
//! over all layers and heads, so heads and layers end at different sizes (each head's
//! store holds exactly what it keeps); `scope=layer` shares each layer's budget among
//! its heads, `scope=head` keeps each head's own budget. The first `sinks` slots are
//! always kept, and so are the chat template's opening tokens (the engine scores them
//! as kept: they are not part of the context that is repeated).
//!
//! Options: `scope` (`model`), `sinks` (4).

use super::{OptionDoc, Stat};
use crate::method::{HeadInput, Options, StatsNeeds};
use crate::scorer::Scorer;
use crate::select::Scope;
use crate::Error;

pub const SUMMARY: &str =
    "KVzip: keep what the model attends to when asked to repeat the context (one extra pass)";
pub const OPTIONS: &[OptionDoc] = &[
    OptionDoc {
        key: "scope",
        default: "model",
        help: "who shares the budget: model (one threshold over all heads), layer or head",
    },
    OptionDoc {
        key: "sinks",
        default: "4",
        help: "initial slots always kept",
    },
];

/// KVzip's selection. `PREDICTED` says where the scores come from: KVzip's
/// reconstruction pass (`kvzip`), or KVzap's prediction of them from hidden states
/// (`kvzap`, [`KvZap`](super::kvzap::KvZap)); the options and the selection are the same.
#[derive(Clone, Debug)]
pub struct KvZip<const PREDICTED: bool = false> {
    pub scope: Scope,
    pub sinks: usize,
}

impl<const PREDICTED: bool> KvZip<PREDICTED> {
    const NAME: &'static str = if PREDICTED { "kvzap" } else { "kvzip" };

    pub fn from_options(opts: &Options) -> Result<Self, Error> {
        super::check_options(Self::NAME, opts, OPTIONS)?;
        Ok(Self {
            scope: Scope::parse("scope", opts.get("scope").unwrap_or("model"))?,
            sinks: opts.usize_or("sinks", 4)?,
        })
    }
}

impl<const PREDICTED: bool> Scorer for KvZip<PREDICTED> {
    fn name(&self) -> &str {
        Self::NAME
    }
    fn needs(&self) -> StatsNeeds {
        StatsNeeds {
            reconstruction: !PREDICTED,
            learned: PREDICTED,
            ..Default::default()
        }
    }
    fn always_kept(&self) -> Option<(&'static str, usize)> {
        Some(("sinks", self.sinks))
    }
    fn scope(&self) -> Scope {
        self.scope
    }
    fn scores(&self, input: &HeadInput<'_>) -> Result<Vec<f32>, Error> {
        let mut s: Vec<f32> = if PREDICTED {
            // KVzap predicts the log of KVzip's score.
            let predicted = super::stat(input, Stat::Learned, Self::NAME)?;
            predicted.iter().map(|p| p.exp()).collect()
        } else {
            super::stat(input, Stat::Reconstruction, Self::NAME)?.to_vec()
        };
        let sinks = self.sinks.min(s.len());
        s[..sinks].iter_mut().for_each(|x| *x = f32::INFINITY);
        Ok(s)
    }
}
