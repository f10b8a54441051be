//! `pyramidkv`: PyramidKV (Cai et al. 2024). SnapKV's selection, with budgets that shrink
//! from the lower to the upper layers as an arithmetic progression whose mean is the
//! given budget. The observation window is kept in every layer; the rest of the budget
//! (`budget - window`, the selectable part) is scaled per layer by
//! `1 + beta * (1 - 2 * layer / (n_layers - 1))`, rounded down, so layer 0 gets
//! `(1 + beta)` times the mean and the top layer `(1 - beta)` times it, and the layer
//! budgets sum to at most `n_layers * budget`.
//!
//! This is the one method that may keep more than `input.budget` slots in a head: in
//! the lower layers, by design. [`PyramidKv::layer_budget`] says how many. A budget that
//! covers the whole head leaves every layer unchanged.
//!
//! Options: SnapKV's `window`, `kernel`, `pool`; `beta` (slope in [0, 1], default 0.95,
//! which is the official code's β = 20: the top layer gets 1/20 of the mean selectable
//! budget); `floor` (the least share of the mean selectable budget any layer gets,
//! default 0.05; the slope is reduced to `1 - floor` if needed, which keeps the mean).

use super::snapkv::{SnapSelect, SNAP_OPTIONS};
use super::{OptionDoc, Stat};
use crate::method::{HeadInput, Method, Options, StatsNeeds};
use crate::schedule::pyramid_weight;
use crate::store::HeadData;
use crate::Error;

pub const SUMMARY: &str =
    "PyramidKV: SnapKV selection with budgets shrinking from lower to upper layers";
pub const OPTIONS: &[OptionDoc] = &[
    SNAP_OPTIONS[0],
    SNAP_OPTIONS[1],
    SNAP_OPTIONS[2],
    OptionDoc {
        key: "beta",
        default: "0.95",
        help: "slope of the per-layer budgets, in [0, 1] (0 = uniform)",
    },
    OptionDoc {
        key: "floor",
        default: "0.05",
        help: "least share of the mean selectable budget a layer gets",
    },
];

#[derive(Clone, Debug)]
pub struct PyramidKv {
    pub select: SnapSelect,
    pub beta: f32,
    pub floor: f32,
}

impl PyramidKv {
    pub fn from_options(opts: &Options) -> Result<Self, Error> {
        super::check_options("pyramidkv", opts, OPTIONS)?;
        Ok(PyramidKv {
            select: SnapSelect::from_options(opts)?,
            beta: super::fraction_or(opts, "beta", 0.95)?,
            floor: super::fraction_or(opts, "floor", 0.05)?,
        })
    }

    /// Slots layer `layer` of `n_layers` keeps when the mean budget per head is `budget`.
    pub fn layer_budget(&self, budget: usize, layer: usize, n_layers: usize) -> usize {
        let window = self.select.window.min(budget);
        let selectable = (budget - window) as f64;
        let slope = self.beta.min(1.0 - self.floor) as f64;
        window + (selectable * pyramid_weight(layer, n_layers, slope) + 1e-9).floor() as usize
    }
}

impl Method for PyramidKv {
    fn name(&self) -> &str {
        "pyramidkv"
    }
    fn needs(&self) -> StatsNeeds {
        self.select.needs()
    }
    fn min_slots(&self) -> usize {
        self.select.window
    }
    fn compress(&self, input: HeadInput<'_>) -> Result<HeadData, Error> {
        let n = input.data.len();
        if input.budget >= n {
            // A mean budget that covers the head asks for no compression (as `compress_head`).
            return Ok(input.data.clone());
        }
        super::window_fits(
            "pyramidkv",
            "the observation window",
            self.select.window.min(n),
            input.budget,
        )?;
        let budget = self.layer_budget(input.budget, input.pos.layer, input.pos.n_layers);
        if budget >= n {
            return Ok(input.data.clone());
        }
        let votes = super::stat(&input, Stat::Window, "pyramidkv")?;
        let kept = self.select.select("pyramidkv", votes, budget)?;
        Ok(super::keep(input.data, kept))
    }
}
