//! Per-layer budget schedules: how one overall budget is shared between layers.
//!
//! Every schedule keeps the overall budget: the layer budgets of a head position sum to
//! at most `n_layers` times the base budget (rounding goes down), each layer gets at
//! least one slot and at most the head's length.
//!
//! - [`Schedule::Uniform`]: every layer gets the base budget.
//! - [`Schedule::Pyramid`]: an arithmetic progression from `(1 + beta)` times the base in
//!   the first layer to `(1 - beta)` times it in the last (PyramidKV's shape; the
//!   `pyramidkv` method applies the same shape to its selectable part only).
//! - [`Schedule::File`]: one ratio per layer, e.g. measured offline from KVMerger's
//!   "persistent sparsity" (the per-layer compression a similarity threshold produces).
//!   The ratios are relative: they are normalised to mean 1 and scale the base budget.

use crate::budget::Budget;
use crate::Error;

/// The largest schedule file read (a ratio per layer: a few KiB at most).
pub const MAX_SCHEDULE_BYTES: u64 = 1 << 20;

/// The slope `beta = 0.95` corresponds to PyramidKV's official β = 20.
pub const DEFAULT_PYRAMID_BETA: f64 = 0.95;

#[derive(Clone, Debug, PartialEq, Default)]
pub enum Schedule {
    #[default]
    Uniform,
    /// Slope in [0, 1]; 0 is uniform.
    Pyramid { beta: f64 },
    /// One relative ratio per layer.
    File(Vec<f64>),
}

/// Weight of `layer` in a pyramid of `n_layers` with the given slope: the weights fall
/// linearly from `1 + slope` to `1 - slope` and average exactly 1.
pub fn pyramid_weight(layer: usize, n_layers: usize, slope: f64) -> f64 {
    if n_layers <= 1 {
        return 1.0;
    }
    let top = (n_layers - 1) as f64;
    let x = 1.0 - 2.0 * layer.min(n_layers - 1) as f64 / top;
    1.0 + slope.clamp(0.0, 1.0) * x
}

impl Schedule {
    /// Ratios from text: one per layer, in layer order. Accepts one number per line, or
    /// CSV/TSV rows whose last field is the ratio (`layer,ratio`), an optional header
    /// line, blank lines and `#` comments. Ratios must be finite and not negative, and
    /// not all zero.
    pub fn parse_ratios(text: &str) -> Result<Schedule, Error> {
        let mut ratios = Vec::new();
        let mut seen_line = false;
        for (no, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let first_line = !seen_line;
            seen_line = true;
            let field = line
                .split(|c: char| c == ',' || c == ';' || c.is_whitespace())
                .rfind(|f| !f.is_empty())
                .unwrap_or("");
            let ratio: f64 = match field.parse() {
                Ok(r) => r,
                Err(_) if first_line => continue, // a header such as "layer,ratio"
                Err(_) => {
                    return Err(Error::Invalid(format!(
                        "layer ratios, line {}: '{field}' is not a number",
                        no + 1
                    )))
                }
            };
            if !(ratio.is_finite() && ratio >= 0.0) {
                return Err(Error::Invalid(format!(
                    "layer ratios, line {}: a ratio must be a finite number >= 0, got {field}",
                    no + 1
                )));
            }
            ratios.push(ratio);
        }
        if ratios.is_empty() {
            return Err(Error::Invalid("layer ratios: no ratio found".into()));
        }
        if ratios.iter().all(|&r| r == 0.0) {
            return Err(Error::Invalid("layer ratios: all ratios are zero".into()));
        }
        Ok(Schedule::File(ratios))
    }

    /// A schedule as users write it: `uniform`, `pyramid`, `pyramid:<slope>`, or the
    /// path of a per-layer ratio file (read with [`Schedule::parse_ratios`]). Callers
    /// that must not read files (the server) parse names only, with `str::parse`.
    pub fn from_name_or_file(s: &str) -> Result<Schedule, Error> {
        let s = s.trim();
        if s == "uniform" || s.starts_with("pyramid") {
            return s.parse();
        }
        let text = crate::files::read_text_bounded(std::path::Path::new(s), MAX_SCHEDULE_BYTES)
            .map_err(|e| {
                Error::Invalid(format!(
                    "schedule '{s}' is neither uniform, pyramid[:slope] nor a readable ratio file ({})",
                    e.message
                ))
            })?;
        Schedule::parse_ratios(&text).map_err(|e| Error::Invalid(format!("schedule file {s}: {e}")))
    }

    /// Errors if the schedule cannot describe a model of `n_layers` layers exactly
    /// (a ratio file for another depth). [`Schedule::layer_budget`] still works then,
    /// by reading the ratios at the same relative depth, but callers usually want to know.
    pub fn check(&self, n_layers: usize) -> Result<(), Error> {
        match self {
            Schedule::File(r) if r.len() != n_layers => Err(Error::Invalid(format!(
                "the layer ratios list {} layers but the model has {n_layers}",
                r.len()
            ))),
            Schedule::Pyramid { beta } if !(0.0..=1.0).contains(beta) => Err(Error::Invalid(
                format!("pyramid slope {beta} must be in [0, 1]"),
            )),
            _ => Ok(()),
        }
    }

    fn weight(&self, layer: usize, n_layers: usize) -> f64 {
        match self {
            Schedule::Uniform => 1.0,
            Schedule::Pyramid { beta } => pyramid_weight(layer, n_layers, *beta),
            Schedule::File(r) => {
                // Relative to the largest ratio first, so that huge ratios (1e308) cannot
                // overflow the sum and shrink every layer's share.
                let max = r.iter().copied().fold(0.0f64, f64::max);
                if !(max.is_finite() && max > 0.0) {
                    return 1.0;
                }
                let mean = r.iter().map(|x| x / max).sum::<f64>() / r.len() as f64;
                let at = if r.len() == n_layers || n_layers <= 1 {
                    layer.min(r.len() - 1)
                } else {
                    // Same relative depth in a list written for another number of layers.
                    let rel = layer.min(n_layers - 1) as f64 / (n_layers - 1) as f64;
                    (rel * (r.len() - 1) as f64).round() as usize
                };
                (r[at] / max) / mean
            }
        }
    }

    /// Slots each head of `layer` may keep, for a head of `len` slots under `base`.
    pub fn layer_budget(&self, base: Budget, layer: usize, n_layers: usize, len: usize) -> usize {
        let b = base.slots(len) as f64;
        // The tiny allowance keeps products like 100 * 0.2 / 0.4 from rounding down to 49.
        let scaled = (b * self.weight(layer, n_layers) + 1e-9).floor() as usize;
        scaled.clamp(1.min(len), len)
    }

    /// Every layer's budget for heads of `len` slots, spending exactly the uniform
    /// total (`base` slots times `n_layers`, at most every slot). Layers get shares in
    /// proportion to the schedule's weights, but none fewer than `min_slots` (a
    /// method's fixed window, [`crate::Method::min_slots`]; at least 1, at most `len`) and none
    /// more than `len`: what a capped layer cannot use, or a raised one needs, is
    /// shared by the others in proportion to their weights (water-filling), so a
    /// schedule moves memory between layers and never changes how much is used. A
    /// uniform schedule is left as it is (a budget below the window is the method's
    /// error to report); if the total cannot give every layer the minimum, every layer
    /// gets the minimum.
    pub fn layer_budgets(
        &self,
        base: Budget,
        n_layers: usize,
        len: usize,
        min_slots: usize,
    ) -> Vec<usize> {
        let each = base.slots(len).clamp(1.min(len), len);
        if *self == Schedule::Uniform || n_layers == 0 {
            return vec![each; n_layers];
        }
        // At least one slot: a head with none could not be attended to.
        let floor = min_slots.max(1).min(len);
        let w: Vec<f64> = (0..n_layers).map(|l| self.weight(l, n_layers)).collect();
        water_fill(&w, each * n_layers, floor, len)
    }
}

/// Whole shares of `total` in proportion to `weights`, none below `floor` nor above
/// `cap`: what a capped share cannot use, or a raised one needs, is shared by the
/// others in proportion to their weights (water-filling). The shares add up to
/// `total` when it lies between `floor` and `cap` times the number of shares; below
/// that every share is `floor`, above it every share is `cap`.
pub fn water_fill(weights: &[f64], total: usize, floor: usize, cap: usize) -> Vec<usize> {
    let n = weights.len();
    let floor = floor.min(cap);
    if n == 0 {
        return Vec::new();
    }
    if total <= floor * n {
        return vec![floor; n];
    }
    if total >= cap * n {
        return vec![cap; n];
    }
    let w: Vec<f64> = weights
        .iter()
        .map(|&x| if x.is_finite() && x > 0.0 { x } else { 0.0 })
        .collect();
    let fill = |level: f64| -> Vec<f64> {
        w.iter()
            .map(|&x| (x * level).clamp(floor as f64, cap as f64))
            .collect()
    };
    // The level at which the clamped shares add up to the total: their sum grows
    // with the level, from n·floor to n·cap, so bisection finds it.
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    while fill(hi).iter().sum::<f64>() < total as f64 && hi < 1e300 {
        hi *= 2.0;
    }
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if fill(mid).iter().sum::<f64>() < total as f64 {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let exact = fill(hi);
    let mut out: Vec<usize> = exact.iter().map(|&x| x.floor() as usize).collect();
    // Whole slots: the shortfall goes, one slot each, to the shares with the largest
    // fractional parts (never past `cap`), then to any share with room; an excess is
    // taken back from the largest shares above `floor`.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| {
        let fa = exact[a] - exact[a].floor();
        let fb = exact[b] - exact[b].floor();
        fb.total_cmp(&fa).then(a.cmp(&b))
    });
    let mut left = total.saturating_sub(out.iter().sum::<usize>());
    for &l in order.iter().chain(order.iter()) {
        if left == 0 {
            break;
        }
        if out[l] < cap {
            out[l] += 1;
            left -= 1;
        }
    }
    let mut over = out.iter().sum::<usize>().saturating_sub(total);
    while over > 0 {
        match (0..n)
            .filter(|&l| out[l] > floor)
            .max_by_key(|&l| (out[l], l))
        {
            Some(l) => {
                out[l] -= 1;
                over -= 1;
            }
            None => break,
        }
    }
    out
}

impl std::str::FromStr for Schedule {
    type Err = Error;
    /// `uniform`, `pyramid` (slope 0.95) or `pyramid:<slope>`. Ratio files are read by
    /// the caller and given to [`Schedule::parse_ratios`].
    fn from_str(s: &str) -> Result<Self, Error> {
        let t = s.trim();
        match t.split_once(':') {
            None if t == "uniform" => Ok(Schedule::Uniform),
            None if t == "pyramid" => Ok(Schedule::Pyramid {
                beta: DEFAULT_PYRAMID_BETA,
            }),
            Some(("pyramid", b)) => {
                let beta: f64 = b
                    .trim()
                    .parse()
                    .map_err(|_| Error::Invalid(format!("pyramid slope '{b}' is not a number")))?;
                let s = Schedule::Pyramid { beta };
                s.check(0)?;
                Ok(s)
            }
            _ => Err(Error::Invalid(format!(
                "unknown layer schedule '{t}' (expected uniform, pyramid or pyramid:<slope>)"
            ))),
        }
    }
}
