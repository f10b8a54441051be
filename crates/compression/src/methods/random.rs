//! `random`: a seeded random subset plus a recent window: the floor every method must
//! beat. The seed is mixed with the layer and KV head, so heads draw different subsets,
//! and the same seed always gives the same result.
//!
//! Options: `seed` (default 0), `recent` (share of the budget kept as the recent window,
//! default 0.5, the same split as `h2o`, so the two differ only in how the rest is chosen).

use super::OptionDoc;
use crate::method::{HeadInput, Method, Options, StatsNeeds};
use crate::store::HeadData;
use crate::Error;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

pub const SUMMARY: &str = "random: a seeded random subset plus a recent window (the floor)";
pub const OPTIONS: &[OptionDoc] = &[
    OptionDoc {
        key: "seed",
        default: "0",
        help: "random seed (mixed with the layer and KV head)",
    },
    OptionDoc {
        key: "recent",
        default: "0.5",
        help: "share of the budget kept as the recent window",
    },
];

#[derive(Clone, Debug)]
pub struct Random {
    pub seed: u64,
    pub recent: f32,
}

impl Random {
    pub fn from_options(opts: &Options) -> Result<Self, Error> {
        super::check_options("random", opts, OPTIONS)?;
        Ok(Random {
            seed: opts.u64_or("seed", 0)?,
            recent: super::fraction_or(opts, "recent", 0.5)?,
        })
    }
}

impl Method for Random {
    fn name(&self) -> &str {
        "random"
    }
    fn needs(&self) -> StatsNeeds {
        StatsNeeds::default()
    }
    fn compress(&self, input: HeadInput<'_>) -> Result<HeadData, Error> {
        let (n, budget) = (input.data.len(), input.budget);
        if budget >= n {
            return Ok(input.data.clone());
        }
        let recent = super::share_of(budget, self.recent);
        let mut rng = ChaCha8Rng::seed_from_u64(super::head_seed(self.seed, input.pos));
        let mut kept = rand::seq::index::sample(&mut rng, n - recent, budget - recent).into_vec();
        kept.extend(n - recent..n);
        Ok(super::keep(input.data, kept))
    }
}
