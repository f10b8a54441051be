//! Applying a compression method to the whole cache: once after prefill, and again
//! during decoding whenever a head passes its budget by a margin.

use crate::cache::{KvCache, PrefillStats};
use crate::Error;
use kvmerger_compression::{
    compress_head, registry, Budget, HeadPos, HeadStats, Method, Options, Schedule, StatsNeeds,
};
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
    /// Bytes after over bytes before.
    pub fn ratio(&self) -> f64 {
        if self.bytes_before == 0 {
            1.0
        } else {
            self.bytes_after as f64 / self.bytes_before as f64
        }
    }
    /// Slots kept over slots before, per layer.
    pub fn layer_ratios(&self) -> Vec<f64> {
        self.layer_slots
            .iter()
            .map(|&(b, a)| if b == 0 { 1.0 } else { a as f64 / b as f64 })
            .collect()
    }
}

/// A method with its budget and schedule, ready to compress caches.
pub struct Compressor {
    pub method: Box<dyn Method>,
    pub budget: Budget,
    pub schedule: Schedule,
    /// During decoding, re-compress once a head holds this many slots over its budget.
    pub recompress_margin: Option<usize>,
}

impl Compressor {
    pub fn new(
        name: &str,
        opts: &Options,
        budget: Budget,
        schedule: Schedule,
    ) -> Result<Compressor, Error> {
        Ok(Compressor {
            method: registry::build(name, opts)?,
            budget,
            schedule,
            recompress_margin: None,
        })
    }

    /// No compression at all.
    pub fn full() -> Compressor {
        Compressor::new(
            "full",
            &Options::new(),
            Budget::Fraction(1.0),
            Schedule::Uniform,
        )
        .expect("full always builds")
    }

    pub fn name(&self) -> &str {
        self.method.name()
    }

    pub fn needs(&self) -> StatsNeeds {
        self.method.needs()
    }

    /// Whether this compressor can change anything.
    pub fn is_noop(&self) -> bool {
        self.method.name() == "full"
            || self.budget == Budget::Fraction(1.0) && self.schedule == Schedule::Uniform
    }

    /// Slot budget of each layer's heads for a prompt of `len` tokens; a schedule gives
    /// no layer less than the method's fixed window.
    pub fn targets(&self, n_layers: usize, len: usize) -> Vec<usize> {
        self.schedule
            .layer_budgets(self.budget, n_layers, len, self.method.min_slots())
    }

    /// Compress a freshly prefilled cache. Returns the report and the per-layer slot
    /// targets, which bound the cache during decoding.
    pub fn compress_prompt(
        &self,
        cache: &mut KvCache,
        stats: &PrefillStats,
    ) -> Result<(CompressReport, Vec<usize>), Error> {
        self.schedule.check(cache.layers.len())?;
        let targets = self.targets(cache.layers.len(), cache.n_seen);
        let report = compress_cache(cache, self.method.as_ref(), stats, &|l, _| targets[l])?;
        Ok((report, targets))
    }
}

/// Re-compression state carried through a decode loop.
pub struct DecodeCompression<'a> {
    pub compressor: &'a Compressor,
    pub targets: Vec<usize>,
    /// Statistics of the decode steps since the last compression.
    pub stats: PrefillStats,
    pub passes: usize,
    pub secs: f64,
}

impl<'a> DecodeCompression<'a> {
    pub fn new(compressor: &'a Compressor, targets: Vec<usize>) -> Self {
        DecodeCompression {
            compressor,
            targets,
            stats: PrefillStats::default(),
            passes: 0,
            secs: 0.0,
        }
    }

    /// Statistics each decode step must collect.
    pub fn needs(&self) -> StatsNeeds {
        self.compressor.decode_needs()
    }

    /// Re-compress if some head passed its budget by the margin.
    pub fn after_step(&mut self, cache: &mut KvCache) -> Result<(), Error> {
        if let Some(report) =
            self.compressor
                .recompress_if_over(cache, &self.targets, &self.stats)?
        {
            self.stats = PrefillStats::default();
            self.passes += 1;
            self.secs += report.secs;
        }
        Ok(())
    }
}

impl Compressor {
    /// Statistics each decode step must collect for re-compression (none without a margin).
    pub fn decode_needs(&self) -> StatsNeeds {
        match self.recompress_margin {
            Some(_) => self.needs(),
            None => StatsNeeds::default(),
        }
    }

    /// During decoding: re-compress `cache` to its per-layer `targets` once some head
    /// holds more than its target plus the margin. `stats` are the statistics of the
    /// decode steps since the last compression; the caller resets them when this
    /// returns a report.
    pub fn recompress_if_over(
        &self,
        cache: &mut KvCache,
        targets: &[usize],
        stats: &PrefillStats,
    ) -> Result<Option<CompressReport>, Error> {
        let Some(margin) = self.recompress_margin else {
            return Ok(None);
        };
        let over = cache
            .layers
            .iter()
            .zip(targets)
            .any(|(heads, &t)| heads.iter().any(|h| h.len() > t + margin));
        if !over {
            return Ok(None);
        }
        compress_cache(cache, self.method.as_ref(), stats, &|l, _| targets[l]).map(Some)
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
    let before: Vec<usize> = cache
        .layers
        .iter()
        .map(|l| l.iter().map(|h| h.len()).sum())
        .collect();
    let needs = method.needs();
    let n_layers = cache.layers.len();
    let results: Vec<Result<(), Error>> = cache
        .layers
        .par_iter_mut()
        .enumerate()
        .flat_map_iter(|(layer, heads)| {
            let n_kv = heads.len();
            heads
                .iter_mut()
                .enumerate()
                .map(move |(kv_head, store)| (layer, n_kv, kv_head, store))
        })
        .map(|(layer, n_kv_heads, kv_head, store)| {
            let src = stats.heads.get(layer).and_then(|l| l.get(kv_head));
            let mut hs = HeadStats::default();
            if needs.accumulated {
                hs.accumulated = Some(store.meta().iter().map(|m| m.score).collect());
            }
            if needs.window.is_some() {
                hs.window = src
                    .and_then(|s| s.window.clone())
                    .filter(|w| w.len() == store.len());
            }
            if needs.last {
                hs.last = src
                    .and_then(|s| s.last.clone())
                    .filter(|w| w.len() == store.len());
            }
            let pos = HeadPos {
                layer,
                n_layers,
                kv_head,
                n_kv_heads,
            };
            let b = budget(layer, store.len());
            compress_head(store, method, &hs, pos, b).map_err(Error::from)
        })
        .collect();
    for r in results {
        r?;
    }
    release_freed_memory();
    let after: Vec<usize> = cache
        .layers
        .iter()
        .map(|l| l.iter().map(|h| h.len()).sum())
        .collect();
    Ok(CompressReport {
        method: method.name().to_string(),
        bytes_before,
        bytes_after: cache.bytes(),
        layer_slots: before.into_iter().zip(after).collect(),
        secs: t0.elapsed().as_secs_f64(),
    })
}

/// Give the memory of dropped slots back to the operating system: glibc keeps freed
/// heap pages for reuse otherwise, and the process's resident memory would not fall.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}
