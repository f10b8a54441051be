//! Applying a compression method to the whole cache: once after prefill, and again
//! during decoding whenever a head passes its budget by a margin.

use crate::cache::{KvCache, PrefillStats};
use crate::Error;
use kvmerger_compression::{
    registry, Budget, HeadData, HeadInput, HeadPos, HeadStats, HeadStore, Method, Options,
    QueryMoments, Recipe, Schedule, StatsNeeds,
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
    /// Seconds of the pass beyond the prefill the method needed (KVzip's
    /// reconstruction pass), which ran before `secs`; 0 for most methods.
    pub pass_secs: f64,
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
    /// Compress during prefill after every chunk of this many tokens (see
    /// [`crate::sequence::Sequence::feed_context`]).
    pub prefill_chunk: Option<usize>,
    /// The options the method was built from (for [`Compressor::recipe`]).
    options: Options,
}

impl std::fmt::Debug for Compressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compressor")
            .field("method", &self.method.name())
            .field("budget", &self.budget)
            .field("schedule", &self.schedule)
            .field("recompress_margin", &self.recompress_margin)
            .field("prefill_chunk", &self.prefill_chunk)
            .finish()
    }
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
            prefill_chunk: None,
            options: opts.clone(),
        })
    }

    /// The compressor of a recipe, validated (see [`Recipe::validate`]).
    pub fn from_recipe(recipe: &Recipe) -> Result<Compressor, Error> {
        let method = recipe.validate()?;
        Ok(Compressor {
            method,
            budget: recipe.budget.unwrap_or(Budget::Fraction(1.0)),
            schedule: recipe.schedule.clone(),
            recompress_margin: recipe.recompress_margin,
            prefill_chunk: recipe.prefill_chunk,
            options: recipe.options.clone(),
        })
    }

    /// The recipe this compressor carries out.
    pub fn recipe(&self) -> Recipe {
        if self.method.name() == "full" {
            return Recipe::full();
        }
        Recipe {
            method: self.method.name().to_string(),
            options: self.options.clone(),
            budget: Some(self.budget),
            schedule: self.schedule.clone(),
            recompress_margin: self.recompress_margin,
            prefill_chunk: self.prefill_chunk,
        }
    }

    /// No compression at all: every token keeps its slot.
    pub fn none() -> Compressor {
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

    /// Errors for settings that cannot work together, before any prefill.
    pub fn check(&self) -> Result<(), Error> {
        if self.is_noop() {
            return Ok(());
        }
        kvmerger_compression::recipe::check_timing(
            self.name(),
            self.method.as_ref(),
            self.recompress_margin,
            self.prefill_chunk,
        )?;
        Ok(())
    }

    /// The statistics the method reads from the forward pass: none for a compressor
    /// that changes nothing (a method at its whole budget gathers nothing either).
    pub fn needs(&self) -> StatsNeeds {
        if self.is_noop() {
            StatsNeeds::default()
        } else {
            self.method.needs()
        }
    }

    /// Whether this recipe compresses during prefill, chunk by chunk: its sequences
    /// cannot share a prefill with others.
    pub fn compresses_during_prefill(&self) -> bool {
        !self.is_noop() && self.prefill_chunk.is_some()
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

    /// Refuses, before any prefill, a prompt of `len` tokens that this compressor
    /// cannot bring to its budget (a window, sinks or protected shares larger than a
    /// layer's budget), naming the setting.
    pub fn check_prompt(&self, n_layers: usize, len: usize) -> Result<(), Error> {
        self.schedule.check(n_layers)?;
        if self.is_noop() {
            return Ok(());
        }
        self.method.check_layers(n_layers)?;
        let mut targets = self.targets(n_layers, len);
        targets.sort_unstable();
        targets.dedup();
        if let Some(chunk) = self.prefill_chunk {
            // The budget per head, before a schedule shares it between layers.
            let budget = self.budget.slots(len);
            if chunk < len && budget < chunk {
                return Err(Error::Recipe(kvmerger_compression::RecipeError::new(
                    "prefill_chunk",
                    format!(
                        "compressing during prefill in chunks of {chunk} tokens needs a budget of \
                         at least one chunk per head, but the budget is {budget} slots for this \
                         prompt of {len} tokens: lower prefill_chunk or raise the budget"
                    ),
                )));
            }
        }
        for t in targets {
            self.method.check_budget(len, t)?;
        }
        Ok(())
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

/// Upper bounds on the KV memory of one sequence, from the cache's exact per-slot size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvEstimate {
    /// While prefilling: the whole prompt before it is compressed, or with compression
    /// during prefill, every layer's target plus one chunk.
    pub prefill_peak: usize,
    /// After compression, with every generated token appended (bounded by re-compression).
    pub steady: usize,
    /// The same prompt and generation with no compression.
    pub uncompressed: usize,
}

/// Bytes bound for a sequence of `prompt` tokens generating up to `max_tokens`, in a
/// cache of `n_layers` × `n_kv_heads` heads whose slots take `slot_bytes` each.
pub fn estimate(
    comp: &Compressor,
    prompt: usize,
    max_tokens: usize,
    n_layers: usize,
    n_kv_heads: usize,
    slot_bytes: usize,
) -> KvEstimate {
    let per_token = n_layers * n_kv_heads * slot_bytes;
    let uncompressed = (prompt + max_tokens) * per_token;
    let Some(c) = Some(comp).filter(|c| !c.is_noop()) else {
        return KvEstimate {
            prefill_peak: uncompressed,
            steady: uncompressed,
            uncompressed,
        };
    };
    let targets = c.targets(n_layers, prompt);
    let steady = targets
        .iter()
        .map(|&t| head_bound(t.min(prompt), t, c.recompress_margin, max_tokens))
        .sum::<usize>()
        * n_kv_heads
        * slot_bytes;
    let prefill = match c.prefill_chunk {
        Some(chunk) => {
            targets
                .iter()
                .map(|&t| (t + chunk).min(prompt))
                .sum::<usize>()
                * n_kv_heads
                * slot_bytes
        }
        None => prompt * per_token,
    };
    KvEstimate {
        prefill_peak: prefill.max(steady),
        steady,
        uncompressed,
    }
}

/// Most slots a head holding `len` slots (target `target`) can reach with `remaining`
/// more tokens: each step appends one, and once a head holds more than target + margin
/// the step is followed by re-compression back to the target.
pub fn head_bound(len: usize, target: usize, margin: Option<usize>, remaining: usize) -> usize {
    match margin {
        None => len + remaining,
        Some(m) => (len + remaining).min(len.max(target + m) + 1),
    }
}

impl Compressor {
    /// Compression during prefill: after a chunk of a prompt of `total` tokens, bring
    /// every head back to its target for the whole prompt, and forget the statistics
    /// of the slots that changed. Does nothing without `prefill_chunk`.
    pub fn after_prefill_chunk(
        &self,
        cache: &mut KvCache,
        stats: &mut PrefillStats,
        total: usize,
    ) -> Result<Option<CompressReport>, Error> {
        if self.prefill_chunk.is_none() || self.is_noop() {
            return Ok(None);
        }
        let targets = self.targets(cache.layers.len(), total);
        let report = compress_cache(cache, self.method.as_ref(), stats, &|l, _| targets[l])?;
        stats.clear_slot_stats();
        Ok(Some(report))
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
/// each head's slot budget (methods that share budgets between heads spend their sum).
/// Statistics the method needs must have been collected.
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
    let n_seen = cache.n_seen;
    let heads: Vec<(usize, usize, usize)> = cache
        .layers
        .iter()
        .enumerate()
        .flat_map(|(layer, hs)| (0..hs.len()).map(move |g| (layer, g, hs.len())))
        .collect();
    if heads.iter().all(|&(layer, g, _)| {
        let n = cache.layers[layer][g].len();
        budget(layer, n) >= n
    }) {
        // Nothing to drop: leave the cache bit-identical.
        return Ok(report(cache, method, bytes_before, before, t0));
    }
    // Every head as f32 with its statistics: methods may share budgets between heads.
    let prepared: Vec<(HeadData, HeadStats)> = heads
        .par_iter()
        .map(|&(layer, g, _)| {
            let store = &cache.layers[layer][g];
            let data = store.to_data();
            let hs = head_stats(stats, needs, layer, g, &data, n_seen);
            (data, hs)
        })
        .collect();
    let inputs: Vec<HeadInput<'_>> = heads
        .iter()
        .zip(&prepared)
        .map(|(&(layer, kv_head, n_kv_heads), (data, hs))| HeadInput {
            data,
            stats: hs,
            pos: HeadPos {
                layer,
                n_layers,
                kv_head,
                n_kv_heads,
            },
            budget: budget(layer, data.len()),
        })
        .collect();
    let out = method.compress_all(&inputs)?;
    if out.len() != inputs.len() {
        return Err(Error::Invalid(format!(
            "compression method '{}' returned {} heads for {}",
            method.name(),
            out.len(),
            inputs.len()
        )));
    }
    drop(inputs);
    let dtype = cache.dtype;
    for (&(layer, g, _), data) in heads.iter().zip(&out) {
        cache.layers[layer][g] = HeadStore::from_data(data, dtype);
    }
    drop(prepared);
    drop(out);
    release_freed_memory();
    Ok(report(cache, method, bytes_before, before, t0))
}

fn report(
    cache: &KvCache,
    method: &dyn Method,
    bytes_before: usize,
    before: Vec<usize>,
    t0: Instant,
) -> CompressReport {
    let after: Vec<usize> = cache
        .layers
        .iter()
        .map(|l| l.iter().map(|h| h.len()).sum())
        .collect();
    CompressReport {
        method: method.name().to_string(),
        bytes_before,
        bytes_after: cache.bytes(),
        layer_slots: before.into_iter().zip(after).collect(),
        secs: t0.elapsed().as_secs_f64(),
        pass_secs: 0.0,
    }
}

/// The statistics `needs` asks for, of head (layer, g) holding `data`; those that were
/// not collected (or describe a longer head) are left out, for the method to report.
fn head_stats(
    stats: &PrefillStats,
    needs: StatsNeeds,
    layer: usize,
    g: usize,
    data: &HeadData,
    n_seen: usize,
) -> HeadStats {
    let len = data.len();
    let src = stats.heads.get(layer).and_then(|l| l.get(g));
    let mut hs = HeadStats::default();
    if needs.accumulated {
        hs.accumulated = Some(data.meta.iter().map(|m| m.score).collect());
    }
    if let Some(w) = needs.window {
        hs.window = stats.window(layer, g, w, len);
    }
    if needs.last {
        hs.last = src.and_then(|s| s.last.clone()).filter(|v| v.len() == len);
    }
    if needs.learned {
        hs.learned = Some(data.meta.iter().map(|m| m.learned).collect());
    }
    if needs.reconstruction {
        hs.reconstruction = src
            .and_then(|s| s.reconstruction.clone())
            .filter(|v| v.len() == len);
    }
    if let Some(q) = needs.queries {
        hs.queries = query_moments(stats, layer, g, n_seen, q.future, q.bias);
    }
    hs
}

/// The mean of `(cos pθ, sin pθ)` over the `n` positions `p = start .. start + n`, in
/// closed form (a geometric series), so that any horizon costs the same: the sum of
/// `e^{ipθ}` is `e^{i(start + (n-1)/2)θ} sin(nθ/2) / sin(θ/2)`.
pub fn mean_rotation(start: usize, n: usize, theta: f64) -> (f64, f64) {
    let n_f = n as f64;
    let half = (theta / 2.0).sin();
    if half.abs() < 1e-12 {
        // θ is a multiple of 2π (to rounding): every position turns alike.
        let a = start as f64 * theta;
        return (a.cos(), a.sin());
    }
    let ratio = (n_f * theta / 2.0).sin() / (n_f * half);
    let centre = (start as f64 + (n_f - 1.0) / 2.0) * theta;
    (ratio * centre.cos(), ratio * centre.sin())
}

/// The moments of the future queries of KV head `g`'s query heads in `layer`: the
/// collected mean and covariance rotated by RoPE's rotation averaged over positions
/// `n_seen .. n_seen + future` (Expected Attention's model of the next queries).
fn query_moments(
    stats: &PrefillStats,
    layer: usize,
    g: usize,
    n_seen: usize,
    future: usize,
    with_bias: bool,
) -> Option<Vec<QueryMoments>> {
    let heads = stats.queries.get(layer)?;
    let n_kv = stats.heads.get(layer)?.len().max(1);
    let group = heads.len() / n_kv;
    let rope = stats.rope.get(layer)?;
    let first = heads.first()?;
    let d = first.sum.len();
    // The mean rotation: per frequency, the mean cosine and sine over the positions.
    // It acts on each RoPE pair (a, b) as [[c, -s], [s, c]].
    let pairs = crate::model::rope_pairs(d, rope.style);
    let rot: Vec<(usize, usize, f64, f64)> = pairs
        .iter()
        .enumerate()
        .map(|(i, &(a, b))| {
            let inv = rope.inv_freq.get(i).copied().unwrap_or(0.0);
            let (c, s) = mean_rotation(n_seen, future.max(1), inv);
            (a, b, rope.mscale * c, rope.mscale * s)
        })
        .collect();
    // x -> R x on a strided vector (`at(i)` is element i).
    let rotate = |x: &mut [f64], stride: usize| {
        for &(a, b, c, s) in &rot {
            let (xa, xb) = (x[a * stride], x[b * stride]);
            x[a * stride] = c * xa - s * xb;
            x[b * stride] = s * xa + c * xb;
        }
    };
    let bias = stats
        .query_bias
        .get(layer)
        .and_then(|b| b.as_deref())
        .filter(|_| !with_bias);
    let out = heads[g * group..(g + 1) * group]
        .iter()
        .enumerate()
        .map(|(hi, h)| {
            if h.count < 1.0 {
                return QueryMoments {
                    mean: vec![0.0; d],
                    cov: vec![0.0; d * d],
                    scale: stats.scale,
                };
            }
            let mut mean: Vec<f64> = h.sum.iter().map(|s| s / h.count).collect();
            let mut cov = vec![0.0f64; d * d];
            for i in 0..d {
                for j in 0..d {
                    cov[i * d + j] = h.outer[i * d + j] / h.count - mean[i] * mean[j];
                }
            }
            // The covariance does not depend on the bias; the mean loses it.
            if let Some(b) = bias {
                let at = (g * group + hi) * d;
                for (m, &x) in mean.iter_mut().zip(&b[at..at + d]) {
                    *m -= x as f64;
                }
            }
            rotate(&mut mean, 1);
            // R cov R^T: rotate every column, then every row.
            for j in 0..d {
                rotate(&mut cov[j..], d);
            }
            for i in 0..d {
                rotate(&mut cov[i * d..(i + 1) * d], 1);
            }
            QueryMoments {
                mean: mean.iter().map(|&x| x as f32).collect(),
                cov: cov.iter().map(|&x| x as f32).collect(),
                scale: stats.scale,
            }
        })
        .collect();
    Some(out)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::{HeadAccum, LayerRope, QueryAccum};
    use crate::config::RopeStyle;

    #[test]
    fn recompression_bounds_a_head_by_target_plus_margin() {
        assert_eq!(head_bound(100, 100, None, 1000), 1100);
        assert_eq!(head_bound(100, 100, Some(16), 1000), 117);
        assert_eq!(head_bound(100, 100, Some(16), 5), 105);
        // A head already over its target (a method that keeps more) grows by the one
        // step that triggers re-compression.
        assert_eq!(head_bound(300, 100, Some(16), 1000), 301);
    }

    /// Expected Attention against the reference formula (kvpress's
    /// `ExpectedAttentionPress`, written here from it in f64): queries of a group of two
    /// query heads over a context, their mean and population covariance after the
    /// attention sinks, rotated by the mean RoPE rotation of the next `future`
    /// positions (NEOX pairs, as Qwen2's); each key's logit `mu.k/sqrt(d) +
    /// k^T Sigma k/(2d)`, a softmax over the keys past the sinks, the mean over the
    /// group's heads, times the value's norm. Our engine's statistics and method give
    /// the same scores to float precision. (kvpress builds the mean query from the
    /// hidden states and `q_proj.weight` alone, so for a model with a query bias,
    /// Qwen2's, its mean leaves the bias out; ours is the mean of the real queries.)
    #[test]
    // Over 100 lines on purpose: kvpress's computation is written out step by step in f64
    // beside ours, so that the two can be read side by side.
    fn expected_attention_equals_the_reference_formula() {
        use kvmerger_compression::{
            registry, HeadData, HeadInput, HeadPos, HeadStats, Options, SlotMeta,
        };
        let (d, heads, n, sinks, future) = (8usize, 2usize, 40usize, 4usize, 16usize);
        let pseudo = |i: usize| (((i * 2654435761) % 1000) as f64 / 500.0) - 1.0;
        // Queries (with a bias, as Qwen2's), before RoPE.
        let q: Vec<Vec<f64>> = (0..n * heads)
            .map(|r| {
                (0..d)
                    .map(|j| pseudo(r * d + j) + if j % 3 == 0 { 0.7 } else { -0.2 })
                    .collect()
            })
            .collect();
        let mut accum = vec![
            QueryAccum {
                count: 0.0,
                sum: vec![0.0; d],
                outer: vec![0.0; d * d]
            };
            heads
        ];
        for t in sinks..n {
            for (h, a) in accum.iter_mut().enumerate() {
                let x = &q[t * heads + h];
                a.count += 1.0;
                for i in 0..d {
                    a.sum[i] += x[i];
                    for j in 0..d {
                        a.outer[i * d + j] += x[i] * x[j];
                    }
                }
            }
        }
        let inv_freq: Vec<f64> = (0..d / 2)
            .map(|i| 1e4f64.powf(-2.0 * i as f64 / d as f64))
            .collect();
        let scale = 1.0 / (d as f32).sqrt();
        let stats = PrefillStats {
            heads: vec![vec![HeadAccum::default()]],
            queries: vec![accum],
            window_rows: 0,
            rope: vec![LayerRope {
                inv_freq: inv_freq.clone(),
                mscale: 1.0,
                style: RopeStyle::Neox,
            }],
            scale,
            hidden: None,
            query_bias: Vec::new(),
        };
        let moments = query_moments(&stats, 0, 0, n, future, true).unwrap();
        let mut data = HeadData::new(d);
        for t in 0..n {
            let k: Vec<f32> = (0..d).map(|j| pseudo(7 * t + 3 * j + 11) as f32).collect();
            let v: Vec<f32> = (0..d).map(|j| pseudo(5 * t + j + 1) as f32 * 2.0).collect();
            data.push(&k, &v, SlotMeta::token(t as u32));
        }
        let method = registry::build_scorer("expected_attention", &{
            let mut o = Options::new();
            o.set("future", future);
            o.set("sinks", sinks);
            o
        })
        .unwrap();
        let hs = HeadStats {
            queries: Some(moments),
            ..Default::default()
        };
        let input = HeadInput {
            data: &data,
            stats: &hs,
            pos: HeadPos {
                layer: 0,
                n_layers: 1,
                kv_head: 0,
                n_kv_heads: 1,
            },
            budget: n / 2,
        };
        let ours = method.scores(&input).unwrap();
        // The reference, in f64, step by step.
        let half = d / 2;
        let mut rbar = vec![0.0f64; d * d];
        for p in n..n + future {
            for i in 0..half {
                let (c, s) = (
                    (p as f64 * inv_freq[i]).cos(),
                    (p as f64 * inv_freq[i]).sin(),
                );
                // R = cos * I + sin * P, P[i+h][i] = 1, P[i][i+h] = -1 (rotate_half).
                rbar[i * d + i] += c / future as f64;
                rbar[(i + half) * d + i + half] += c / future as f64;
                rbar[(i + half) * d + i] += s / future as f64;
                rbar[i * d + i + half] -= s / future as f64;
            }
        }
        let mut reference = vec![0.0f64; n];
        for h in 0..heads {
            let m = (n - sinks) as f64;
            let mu: Vec<f64> = (0..d)
                .map(|i| (sinks..n).map(|t| q[t * heads + h][i]).sum::<f64>() / m)
                .collect();
            let mut cov = vec![0.0f64; d * d];
            for t in sinks..n {
                for i in 0..d {
                    for j in 0..d {
                        cov[i * d + j] +=
                            (q[t * heads + h][i] - mu[i]) * (q[t * heads + h][j] - mu[j]) / m;
                    }
                }
            }
            let mu_r: Vec<f64> = (0..d)
                .map(|i| (0..d).map(|j| rbar[i * d + j] * mu[j]).sum())
                .collect();
            let mut cov_r = vec![0.0f64; d * d];
            for i in 0..d {
                for j in 0..d {
                    for k in 0..d {
                        for l in 0..d {
                            cov_r[i * d + j] += rbar[i * d + k] * cov[k * d + l] * rbar[j * d + l];
                        }
                    }
                }
            }
            let logits: Vec<f64> = (sinks..n)
                .map(|t| {
                    let k: Vec<f64> = data.key(t).iter().map(|&x| x as f64).collect();
                    let lin: f64 = (0..d).map(|i| mu_r[i] * k[i]).sum::<f64>() / (d as f64).sqrt();
                    let quad: f64 = (0..d)
                        .flat_map(|i| (0..d).map(move |j| (i, j)))
                        .map(|(i, j)| k[i] * cov_r[i * d + j] * k[j])
                        .sum::<f64>()
                        / d as f64
                        / 2.0;
                    lin + quad
                })
                .collect();
            let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = logits.iter().map(|x| (x - max).exp()).sum();
            for (t, x) in (sinks..n).zip(&logits) {
                reference[t] += (x - max).exp() / z / heads as f64;
            }
        }
        for t in sinks..n {
            let vnorm: f64 = data
                .value(t)
                .iter()
                .map(|&x| (x as f64).powi(2))
                .sum::<f64>()
                .sqrt();
            let want = reference[t] * vnorm;
            assert!(
                (ours[t] as f64 - want).abs() <= 1e-5 * want.abs() + 1e-7,
                "slot {t}: ours {} reference {want}",
                ours[t]
            );
        }
        assert!(
            ours[..sinks].iter().all(|s| s.is_infinite()),
            "sinks are kept"
        );
    }

    #[test]
    fn the_mean_rotation_in_closed_form_equals_the_sum_over_positions() {
        for &theta in &[0.0, 1e-9, 0.3, 1.0, 2.0 * std::f64::consts::PI, 3.0, 1e-4] {
            for &(start, n) in &[(0usize, 1usize), (37, 5), (1000, 512), (5, 10_000)] {
                let (mut c, mut s) = (0.0f64, 0.0f64);
                for p in start..start + n {
                    c += (p as f64 * theta).cos();
                    s += (p as f64 * theta).sin();
                }
                let (gc, gs) = mean_rotation(start, n, theta);
                assert!(
                    (gc - c / n as f64).abs() < 1e-9,
                    "{theta} {start} {n}: {gc} vs {}",
                    c / n as f64
                );
                assert!(
                    (gs - s / n as f64).abs() < 1e-9,
                    "{theta} {start} {n}: {gs} vs {}",
                    s / n as f64
                );
            }
        }
        // A horizon of a trillion positions costs the same as one.
        let t = std::time::Instant::now();
        let (c, s) = mean_rotation(10, 1_000_000_000_000, 0.01);
        assert!(c.abs() < 1e-9 && s.abs() < 1e-9 && t.elapsed().as_millis() < 10);
    }

    /// The query moments rotated pair by pair equal the explicit products with the
    /// averaged d×d rotation matrix.
    #[test]
    fn query_moments_are_rotated_by_the_mean_rope_rotation() {
        let d = 8;
        for style in [RopeStyle::Neox, RopeStyle::Adjacent] {
            let val = |i: usize| ((i * 37 % 11) as f64 - 5.0) * 0.3;
            let acc = QueryAccum {
                count: 4.0,
                sum: (0..d).map(|i| val(i) * 4.0).collect(),
                outer: (0..d * d)
                    .map(|ij| {
                        let (i, j) = (ij / d, ij % d);
                        4.0 * (val(i) * val(j) + if i == j { 1.0 + i as f64 } else { 0.1 })
                    })
                    .collect(),
            };
            let stats = PrefillStats {
                heads: vec![vec![HeadAccum::default()]],
                queries: vec![vec![acc.clone(), acc]],
                window_rows: 0,
                rope: vec![LayerRope {
                    inv_freq: (0..d / 2)
                        .map(|i| 100f64.powf(-2.0 * i as f64 / d as f64))
                        .collect(),
                    mscale: 1.0,
                    style,
                }],
                scale: 0.25,
                hidden: None,
                query_bias: Vec::new(),
            };
            let (n_seen, future) = (37, 5);
            let got = query_moments(&stats, 0, 0, n_seen, future, true).unwrap();
            assert_eq!(got.len(), 2);
            // Explicit: the average of the rotation matrices, then R mu and R cov R^T.
            let pairs = crate::model::rope_pairs(d, style);
            let mut r = vec![0.0f64; d * d];
            for p in n_seen..n_seen + future {
                for (i, &(a, b)) in pairs.iter().enumerate() {
                    let angle = p as f64 * 100f64.powf(-2.0 * i as f64 / d as f64);
                    let (c, s) = (angle.cos() / future as f64, angle.sin() / future as f64);
                    r[a * d + a] += c;
                    r[a * d + b] -= s;
                    r[b * d + a] += s;
                    r[b * d + b] += c;
                }
            }
            let mean: Vec<f64> = (0..d).map(val).collect();
            let cov: Vec<f64> = (0..d * d)
                .map(|ij| {
                    if ij / d == ij % d {
                        1.0 + (ij / d) as f64
                    } else {
                        0.1
                    }
                })
                .collect();
            for i in 0..d {
                let want: f64 = (0..d).map(|j| r[i * d + j] * mean[j]).sum();
                assert!((got[0].mean[i] as f64 - want).abs() < 1e-5);
                for j in 0..d {
                    let want: f64 = (0..d)
                        .flat_map(|k| (0..d).map(move |l| (k, l)))
                        .map(|(k, l)| r[i * d + k] * cov[k * d + l] * r[j * d + l])
                        .sum();
                    assert!(
                        (got[1].cov[i * d + j] as f64 - want).abs() < 1e-5,
                        "{i},{j}"
                    );
                }
            }
            assert_eq!(got[0].scale, 0.25);
        }
    }
}
