//! Applying a compression method to the whole cache, and what it saved.

use crate::cache::{KvCache, PrefillStats};
use crate::Error;
use kvmerger_compression::{compress_head, Budget, HeadPos, HeadStats, Method};
use rayon::prelude::*;
use std::time::Instant;

/// What one compression pass did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CompressReport {
    pub method: String,
    pub bytes_before: usize,
    pub bytes_after: usize,
    /// Slots per layer (summed over KV heads) before and after.
    pub layer_slots: Vec<(usize, usize)>,
    pub secs: f64,
}

impl CompressReport {
    pub fn ratio(&self) -> f64 {
        if self.bytes_before == 0 {
            1.0
        } else {
            self.bytes_after as f64 / self.bytes_before as f64
        }
    }
}

/// Per-layer budget: how many slots a head of `len` slots in `layer` may keep.
pub type LayerBudget<'a> = &'a (dyn Fn(usize, usize) -> usize + Sync);

/// Compress every (layer, KV head) of `cache` with `method`. `budget(layer, len)` gives
/// each head's slot budget. Statistics the method needs must have been collected.
pub fn compress_cache(
    cache: &mut KvCache,
    method: &dyn Method,
    stats: &PrefillStats,
    budget: LayerBudget<'_>,
) -> Result<CompressReport, Error> {
    let t0 = Instant::now();
    let bytes_before = cache.bytes();
    let before: Vec<usize> = cache.layers.iter().map(|l| l.iter().map(|h| h.len()).sum()).collect();
    let needs = method.needs();
    let n_layers = cache.layers.len();
    let results: Vec<Result<(), Error>> = cache
        .layers
        .par_iter_mut()
        .enumerate()
        .flat_map_iter(|(layer, heads)| {
            let n_kv = heads.len();
            heads.iter_mut().enumerate().map(move |(kv_head, store)| (layer, n_kv, kv_head, store))
        })
        .map(|(layer, n_kv_heads, kv_head, store)| {
            let src = stats.heads.get(layer).and_then(|l| l.get(kv_head));
            let mut hs = HeadStats::default();
            if needs.accumulated {
                hs.accumulated = Some(store.meta().iter().map(|m| m.score).collect());
            }
            if needs.window.is_some() {
                hs.window = src.and_then(|s| s.window.clone()).filter(|w| w.len() == store.len());
            }
            if needs.last {
                hs.last = src.and_then(|s| s.last.clone()).filter(|w| w.len() == store.len());
            }
            let pos = HeadPos { layer, n_layers, kv_head, n_kv_heads };
            let b = budget(layer, store.len());
            compress_head(store, method, &hs, pos, b).map_err(Error::from)
        })
        .collect();
    for r in results {
        r?;
    }
    let after: Vec<usize> = cache.layers.iter().map(|l| l.iter().map(|h| h.len()).sum()).collect();
    Ok(CompressReport {
        method: method.name().to_string(),
        bytes_before,
        bytes_after: cache.bytes(),
        layer_slots: before.into_iter().zip(after).collect(),
        secs: t0.elapsed().as_secs_f64(),
    })
}

/// A uniform budget for every layer.
pub fn uniform(b: Budget) -> impl Fn(usize, usize) -> usize + Sync {
    move |_, len| b.slots(len)
}
