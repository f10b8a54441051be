//! `keydiff`: KeyDiff (Park et al. 2025, arXiv 2504.15364). Keys that point away from
//! the head's average direction carry what the rest do not: the anchor is the mean of
//! the head's L2-normalised keys, and each slot scores `-cos(k_i, anchor)`; the
//! highest scores are kept. Reads no attention statistics, so it is query-agnostic by
//! construction and costs one pass over the keys.
//!
//! Options: `sinks` (the first slots always kept, default 0: the paper's rule alone).

use super::OptionDoc;
use crate::method::{HeadInput, Options, StatsNeeds};
use crate::scorer::Scorer;
use crate::store::HeadData;
use crate::Error;

pub const SUMMARY: &str = "KeyDiff: keep the keys least similar to the head's mean key direction";
pub const OPTIONS: &[OptionDoc] = &[OptionDoc {
    key: "sinks",
    default: "0",
    help: "number of initial slots always kept",
}];

#[derive(Clone, Debug)]
pub struct KeyDiff {
    pub sinks: usize,
}

impl KeyDiff {
    pub fn from_options(opts: &Options) -> Result<Self, Error> {
        super::check_options("keydiff", opts, OPTIONS)?;
        Ok(KeyDiff {
            sinks: opts.usize_or("sinks", 0)?,
        })
    }

    /// `-cos(k_i, anchor)` for every slot (0 for a zero key), sinks at infinity.
    pub fn key_scores(&self, data: &HeadData) -> Vec<f32> {
        let (n, d) = (data.len(), data.dim);
        let norms = super::key_norms(data);
        let mut anchor = vec![0.0f64; d];
        for (i, &norm) in norms.iter().enumerate() {
            if norm > 0.0 {
                for (a, &k) in anchor.iter_mut().zip(data.key(i)) {
                    *a += (k / norm) as f64;
                }
            }
        }
        let anchor: Vec<f32> = anchor
            .iter()
            .map(|&a| (a / n.max(1) as f64) as f32)
            .collect();
        let anchor_norm = super::dot(&anchor, &anchor).sqrt();
        (0..n)
            .map(|i| {
                if i < self.sinks {
                    return f32::INFINITY;
                }
                let den = norms[i] * anchor_norm;
                if den > 0.0 {
                    -super::dot(data.key(i), &anchor) / den
                } else {
                    0.0
                }
            })
            .collect()
    }
}

impl Scorer for KeyDiff {
    fn name(&self) -> &str {
        "keydiff"
    }
    fn needs(&self) -> StatsNeeds {
        StatsNeeds::default()
    }
    fn always_kept(&self) -> Option<(&'static str, usize)> {
        Some(("sinks", self.sinks))
    }
    fn scores(&self, input: &HeadInput<'_>) -> Result<Vec<f32>, Error> {
        Ok(self.key_scores(input.data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SlotMeta;
    use crate::Method;

    #[test]
    fn the_key_that_points_elsewhere_is_kept() {
        let mut d = HeadData::new(2);
        for i in 0..8u32 {
            // Seven keys along x (of different lengths: only direction counts), one along y.
            let k = if i == 3 {
                [0.0, 1.0]
            } else {
                [1.0 + i as f32, 0.1]
            };
            d.push(&k, &[i as f32, 0.0], SlotMeta::token(i));
        }
        let m = KeyDiff { sinks: 0 };
        let s = m.key_scores(&d);
        let best = (0..8).max_by(|&a, &b| s[a].total_cmp(&s[b])).unwrap();
        assert_eq!(best, 3);
        let out = crate::Selection(Box::new(m))
            .compress(HeadInput {
                data: &d,
                stats: &Default::default(),
                pos: crate::HeadPos::SINGLE,
                budget: 2,
            })
            .unwrap();
        assert_eq!(out.len(), 2);
        assert!(out.meta.iter().any(|m| m.position == 3));
        // With a sink, slot 0 is always kept.
        let s = KeyDiff { sinks: 1 }.key_scores(&d);
        assert_eq!(s[0], f32::INFINITY);
    }
}
