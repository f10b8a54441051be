//! The compression methods, one file each, all behind the [`Method`](crate::Method)
//! interface. [`crate::registry`] maps names to them and lists their options.
//!
//! Shared conventions:
//! - a budget share (`recent=0.5`) is a fraction of the head's budget; a window
//!   (`sinks=4`, `window=32`) is a token count, and a window larger than the budget
//!   is an error, not a silent clamp;
//! - ties between equal scores are broken towards the newer slot, so every method is
//!   deterministic;
//! - kept slots are returned in their original (position) order.

pub mod adakv;
pub mod cam;
pub mod d2o;
pub mod expected_attention;
pub mod full;
pub mod h2o;
pub mod keydiff;
pub mod knorm;
pub mod kvmerger;
pub mod kvmerger_plus;
pub mod kvzap;
pub mod kvzip;
pub mod pyramidkv;
pub mod random;
pub mod snapkv;
pub mod streaming;
pub mod tova;

use crate::method::{HeadInput, HeadPos, Options};
pub use crate::select::top_k;
pub(crate) use crate::select::{keep, window_fits};
use crate::store::HeadData;
use crate::Error;

/// One option of a method, as shown in help text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionDoc {
    pub key: &'static str,
    /// The default as it would be written on the command line, or `auto` when it is
    /// derived from the budget.
    pub default: &'static str,
    pub help: &'static str,
}

pub(crate) fn check_options(method: &str, opts: &Options, docs: &[OptionDoc]) -> Result<(), Error> {
    let allowed: Vec<&str> = docs.iter().map(|d| d.key).collect();
    opts.check_known(method, &allowed)
}

/// Builds a scorer by name from its options: how composites (`adakv`, `kvmerger+`) get
/// the scorer they wrap without knowing the registry.
pub type ScorerFactory<'a> =
    &'a dyn Fn(&str, &Options) -> Result<Box<dyn crate::scorer::Scorer>, Error>;

/// The options of a composite's inner scorer: every key that is not one of the
/// composite's own (`docs`).
pub(crate) fn passed_through(opts: &Options, docs: &[OptionDoc]) -> Options {
    let mut inner = Options::new();
    for k in opts.keys() {
        if !docs.iter().any(|d| d.key == k) {
            inner.set(k, opts.get(k).unwrap_or_default());
        }
    }
    inner
}

/// Which per-slot statistic a method reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stat {
    Accumulated,
    Window,
    Last,
    Reconstruction,
    Learned,
}

/// The statistic `which`, checked to be present and one entry per slot.
pub(crate) fn stat<'a>(
    input: &HeadInput<'a>,
    which: Stat,
    method: &str,
) -> Result<&'a [f32], Error> {
    let (v, name) = match which {
        Stat::Accumulated => (&input.stats.accumulated, "accumulated"),
        Stat::Window => (&input.stats.window, "window"),
        Stat::Last => (&input.stats.last, "last"),
        Stat::Reconstruction => (&input.stats.reconstruction, "reconstruction"),
        Stat::Learned => (&input.stats.learned, "learned"),
    };
    let v = v.as_deref().ok_or_else(|| Error::MissingStats {
        method: method.to_string(),
        stat: name,
    })?;
    if v.len() != input.data.len() {
        return Err(Error::Invalid(format!(
            "{method}: the '{name}' statistic has {} entries for {} slots",
            v.len(),
            input.data.len()
        )));
    }
    Ok(v)
}

/// A share in [0, 1] from the options.
pub(crate) fn fraction_or(opts: &Options, key: &str, default: f32) -> Result<f32, Error> {
    let f = opts.f32_or(key, default)?;
    if !(0.0..=1.0).contains(&f) {
        return Err(Error::InvalidOption(format!(
            "option {key}={f} must be between 0 and 1"
        )));
    }
    Ok(f)
}

/// `share` of `budget`, rounded.
pub(crate) fn share_of(budget: usize, share: f32) -> usize {
    ((budget as f64 * share as f64).round() as usize).min(budget)
}

/// The last `recent` slots plus the `budget - recent` best-scoring of the others.
pub(crate) fn recent_plus_top(
    n: usize,
    scores: &[f32],
    recent: usize,
    budget: usize,
) -> Vec<usize> {
    let recent = recent.min(budget).min(n);
    let older: Vec<usize> = (0..n - recent).collect();
    let mut kept = top_k(scores, older, budget - recent);
    kept.extend(n - recent..n);
    kept
}

/// Scores for the top-k rule "the last `recent` slots, then the best `scores`": the
/// recent slots score infinity (always kept first).
pub(crate) fn recent_scores(scores: &[f32], recent: usize) -> Vec<f32> {
    let n = scores.len();
    let recent = recent.min(n);
    let mut s = scores.to_vec();
    s[n - recent..].iter_mut().for_each(|x| *x = f32::INFINITY);
    s
}

/// A per-head seed: the same `seed` gives every (layer, KV head) its own stream.
pub(crate) fn head_seed(seed: u64, pos: HeadPos) -> u64 {
    let mut x = seed
        ^ ((pos.layer as u64) << 32)
        ^ (pos.kv_head as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    // splitmix64 finaliser: nearby inputs give unrelated seeds.
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Inlined everywhere, so that callers compiled for wider vector units (Expected
/// Attention's AVX2 path) vectorise it for them.
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight partial sums let the compiler vectorise without reassociating floats itself.
    let mut acc = [0.0f32; 8];
    let (ca, ra) = a.split_at(a.len() / 8 * 8);
    let (cb, rb) = b.split_at(ca.len());
    for (x, y) in ca.chunks_exact(8).zip(cb.chunks_exact(8)) {
        for j in 0..8 {
            acc[j] += x[j] * y[j];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

pub(crate) fn squared_distance(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, ra) = a.split_at(a.len() / 8 * 8);
    let (cb, rb) = b.split_at(ca.len());
    for (x, y) in ca.chunks_exact(8).zip(cb.chunks_exact(8)) {
        for j in 0..8 {
            let d = x[j] - y[j];
            acc[j] += d * d;
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += (x - y) * (x - y);
    }
    s
}

/// L2 norm of every key.
pub(crate) fn key_norms(data: &HeadData) -> Vec<f32> {
    (0..data.len())
        .map(|i| dot(data.key(i), data.key(i)).sqrt())
        .collect()
}

/// Cosine similarity of the keys of slots `i` and `j`, given their norms (0 for a zero key).
pub(crate) fn key_cosine(data: &HeadData, norms: &[f32], i: usize, j: usize) -> f32 {
    let den = norms[i] * norms[j];
    if den > 0.0 {
        dot(data.key(i), data.key(j)) / den
    } else {
        0.0
    }
}

/// Natural log of sum(exp(b_i)): the combined logit bias of slots whose keys coincide.
pub(crate) fn log_sum_exp(biases: impl Iterator<Item = f32> + Clone) -> f32 {
    let m = biases.clone().fold(f32::NEG_INFINITY, f32::max);
    if !m.is_finite() {
        return m;
    }
    m + biases.map(|b| (b - m).exp()).sum::<f32>().ln()
}
