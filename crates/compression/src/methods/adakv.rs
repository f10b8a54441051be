//! `adakv`: Ada-KV's head-wise budgets (Feng et al. 2024, arXiv 2407.11550) over any
//! scorer. A layer's budget (its per-head budget times its KV heads) is filled by the
//! best scores over all its heads together, after every head has kept the best
//! `alpha` share of its even budget (the safeguard). Heads whose attention is spread
//! out keep more, heads that attend to a few slots keep fewer; unlike masking
//! implementations, every head's store holds exactly what it keeps, so the memory of
//! what is dropped is freed.
//!
//! Options: `scorer` (the method whose scores are used; default `expected_attention`;
//! any method `kvmerger methods` marks as a scorer), `alpha` (0.2, the reference
//! implementation's safeguard), `scope` (`layer`; `model` shares one budget over all
//! layers). Every other option is passed to the scorer, e.g.
//! `adakv:scorer=snapkv,window=16`.

use super::{OptionDoc, ScorerFactory};
use crate::method::{HeadInput, Method, Options, StatsNeeds};
use crate::scorer::{self, Scorer, Selection};
use crate::select::{self, Scope};
use crate::store::HeadData;
use crate::Error;

pub const SUMMARY: &str =
    "Ada-KV: a scorer's best slots over all heads of a layer, each head keeping a safeguard share";
pub const OPTIONS: &[OptionDoc] = &[
    OptionDoc {
        key: "scorer",
        default: "expected_attention",
        help: "method whose slot scores are used (other options go to it)",
    },
    OptionDoc {
        key: "alpha",
        default: "0.2",
        help: "safeguard: share of its even budget every head keeps",
    },
    OptionDoc {
        key: "scope",
        default: "layer",
        help: "who shares the budget: layer or model",
    },
];

pub struct AdaKv {
    pub scorer: Box<dyn Scorer>,
    pub alpha: f32,
    pub scope: Scope,
}

impl AdaKv {
    /// `make` builds the scorer named by `scorer` from the options that are not adakv's.
    pub fn from_options(opts: &Options, make: ScorerFactory<'_>) -> Result<Self, Error> {
        let scorer_name = opts.get("scorer").unwrap_or("expected_attention");
        let scorer = make(scorer_name, &super::passed_through(opts, OPTIONS))
            .map_err(|e| Error::InvalidOption(format!("adakv: scorer '{scorer_name}': {e}")))?;
        let scope = Scope::parse("scope", opts.get("scope").unwrap_or("layer"))?;
        if scope == Scope::Head {
            return Err(Error::InvalidOption(
                "adakv: scope=head is the scorer alone; use layer or model".into(),
            ));
        }
        Ok(AdaKv {
            scorer,
            alpha: super::fraction_or(opts, "alpha", 0.2)?,
            scope,
        })
    }
}

impl Method for AdaKv {
    fn name(&self) -> &str {
        "adakv"
    }
    fn needs(&self) -> StatsNeeds {
        self.scorer.needs()
    }
    fn min_slots(&self) -> usize {
        self.scorer.always_kept().map_or(0, |(_, k)| k)
    }
    /// One head alone has no other head to share with: the scorer's own selection.
    fn compress(&self, input: HeadInput<'_>) -> Result<HeadData, Error> {
        Selection::compress_head(self.scorer.as_ref(), input)
            .map_err(|e| scorer::missing_as("adakv", e))
    }
    fn compress_all(&self, inputs: &[HeadInput<'_>]) -> Result<Vec<HeadData>, Error> {
        select::check_min_slots(inputs, self.min_slots(), "adakv", "the scorer's window")?;
        let scores = scorer::all_scores(self.scorer.as_ref(), inputs)
            .map_err(|e| scorer::missing_as("adakv", e))?;
        Ok(select::keep_top_shared(
            inputs, &scores, self.scope, self.alpha,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::method::HeadStats;
    use crate::store::SlotMeta;
    use crate::HeadPos;

    fn head(n: usize, votes: impl Fn(usize) -> f32) -> (HeadData, HeadStats) {
        let mut d = HeadData::new(2);
        for i in 0..n {
            d.push(&[1.0, i as f32], &[0.0, 1.0], SlotMeta::token(i as u32));
        }
        let s = HeadStats {
            window: Some((0..n).map(votes).collect()),
            ..Default::default()
        };
        (d, s)
    }

    #[test]
    fn head_wise_budgets_spend_exactly_the_layer_budget_and_respect_the_safeguard() {
        let mut opts = Options::new();
        opts.parse_pair("scorer=snapkv").unwrap();
        opts.parse_pair("window=2").unwrap();
        opts.parse_pair("kernel=1").unwrap();
        opts.parse_pair("alpha=0.25").unwrap();
        let m = AdaKv::from_options(&opts, &crate::registry::build_scorer).unwrap();
        // Head 0 attends to everything a little; head 1 concentrates on a few slots
        // (with far higher votes): head 1's votes win the shared budget.
        let (d0, s0) = head(100, |_| 1.0);
        let (d1, s1) = head(100, |i| {
            if i % 10 == 0 {
                50.0
            } else {
                2.0 + i as f32 * 0.01
            }
        });
        let (d2, s2) = head(100, |i| i as f32 * 0.001);
        let pos = |layer, kv_head| HeadPos {
            layer,
            n_layers: 2,
            kv_head,
            n_kv_heads: 2,
        };
        let inputs = [
            HeadInput {
                data: &d0,
                stats: &s0,
                pos: pos(0, 0),
                budget: 40,
            },
            HeadInput {
                data: &d1,
                stats: &s1,
                pos: pos(0, 1),
                budget: 40,
            },
            HeadInput {
                data: &d2,
                stats: &s2,
                pos: pos(1, 0),
                budget: 40,
            },
            HeadInput {
                data: &d1,
                stats: &s1,
                pos: pos(1, 1),
                budget: 40,
            },
        ];
        let out = m.compress_all(&inputs).unwrap();
        let lens: Vec<usize> = out.iter().map(|o| o.len()).collect();
        assert_eq!(
            lens[0] + lens[1],
            80,
            "layer 0 spends its budget exactly: {lens:?}"
        );
        assert_eq!(lens[2] + lens[3], 80, "layer 1 too: {lens:?}");
        // Safeguard: at least floor(0.25 * 40) = 10 slots each; head 1 takes the rest.
        assert_eq!(lens[0], 10, "{lens:?}");
        assert_eq!(lens[1], 70, "{lens:?}");
        // Each head's window (its last 2 slots) is kept.
        for o in &out {
            let last: Vec<u32> = o.meta.iter().rev().take(2).map(|m| m.position).collect();
            assert_eq!(last, vec![99, 98]);
        }
    }

    #[test]
    fn a_method_that_does_not_score_is_refused_at_build_time() {
        let mut opts = Options::new();
        opts.parse_pair("scorer=kvmerger").unwrap();
        let e = AdaKv::from_options(&opts, &crate::registry::build_scorer)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("does not score slots"), "{e}");
        let mut opts = Options::new();
        opts.parse_pair("scorer=snapkv").unwrap();
        opts.parse_pair("colour=red").unwrap();
        let e = AdaKv::from_options(&opts, &crate::registry::build_scorer)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("colour"), "{e}");
    }
}
