//! The KV cache: one [`HeadStore`] per (layer, KV head), each at its own length.

use crate::config::RopeStyle;
use kvmerger_compression::{HeadStore, KvDtype};

#[derive(Clone, Debug)]
pub struct KvCache {
    /// `layers[l][h]`: the slots of KV head `h` in layer `l`.
    pub layers: Vec<Vec<HeadStore>>,
    /// Tokens seen so far; the next token's position. Not the number of slots kept.
    pub n_seen: usize,
    pub dtype: KvDtype,
}

impl KvCache {
    pub fn new(n_layers: usize, n_kv_heads: usize, head_dim: usize, dtype: KvDtype) -> Self {
        KvCache {
            layers: (0..n_layers)
                .map(|_| {
                    (0..n_kv_heads)
                        .map(|_| HeadStore::new(head_dim, dtype))
                        .collect()
                })
                .collect(),
            n_seen: 0,
            dtype,
        }
    }

    /// Make room for `extra` more tokens in every head.
    pub fn reserve(&mut self, extra: usize) {
        for l in &mut self.layers {
            for h in l {
                h.reserve(extra);
            }
        }
    }

    /// Give back the room reserved beyond the live slots, in every head.
    pub fn shrink_to_fit(&mut self) {
        for h in self.layers.iter_mut().flatten() {
            h.shrink_to_fit();
        }
    }

    /// Bytes held by live slots, in all heads.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| l.iter().map(|h| h.bytes()).sum::<usize>())
            .sum()
    }
    /// Bytes of one slot of one head in this cache (keys, values and metadata).
    pub fn slot_bytes(&self) -> usize {
        let Some(head) = self.layers.first().and_then(|l| l.first()) else {
            return 0;
        };
        let mut one = HeadStore::new(head.dim(), self.dtype);
        let zeros = vec![0.0f32; head.dim()];
        one.push(&zeros, &zeros, kvmerger_compression::SlotMeta::token(0));
        one.bytes()
    }

    /// Bytes of one token in every head: what an uncompressed token costs.
    pub fn token_bytes(&self) -> usize {
        self.slot_bytes() * self.layers.iter().map(|l| l.len()).sum::<usize>()
    }

    /// Bytes allocated, including room reserved for tokens to come.
    pub fn allocated_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| l.iter().map(|h| h.allocated_bytes()).sum::<usize>())
            .sum()
    }
    pub fn layer_bytes(&self, layer: usize) -> usize {
        self.layers[layer].iter().map(|h| h.bytes()).sum()
    }
    /// Slots kept per (layer, KV head).
    pub fn lengths(&self) -> Vec<Vec<usize>> {
        self.layers
            .iter()
            .map(|l| l.iter().map(|h| h.len()).collect())
            .collect()
    }
    /// Total slots over all heads.
    pub fn total_slots(&self) -> usize {
        self.layers
            .iter()
            .map(|l| l.iter().map(|h| h.len()).sum::<usize>())
            .sum()
    }
    pub fn clear(&mut self) {
        for l in &mut self.layers {
            for h in l {
                *h = HeadStore::new(h.dim(), self.dtype);
            }
        }
        self.n_seen = 0;
    }
}

/// Attention statistics collected while tokens are fed, for compression to read.
///
/// The accumulated attention (H2O's score) lives in each slot's metadata; the rest is
/// here. Window statistics are kept as rows, one per query, so that any window up to
/// the one collected can be summed later: an observation window over the end of a
/// context, or over a question appended to it (see [`PrefillStats::window`]).
#[derive(Clone, Debug, Default)]
pub struct PrefillStats {
    /// Per (layer, KV head).
    pub heads: Vec<Vec<HeadAccum>>,
    /// Per (layer, query head): moments of the queries before RoPE.
    pub queries: Vec<Vec<QueryAccum>>,
    /// Rows kept per head: the largest window asked for.
    pub window_rows: usize,
    /// How keys are rotated, per layer, to rotate the query moments the same way.
    pub rope: Vec<LayerRope>,
    /// The attention logit scale.
    pub scale: f32,
    /// Per layer, the model's query bias (all query heads), when it has one: the
    /// collected moments include it, and a method may ask for the mean without it.
    pub query_bias: Vec<Option<Vec<f32>>>,
    /// When set, every forward pass appends the attention blocks' normalized inputs
    /// here, per layer (`rows * hidden` values): the features a learned scorer is
    /// trained on ([`crate::learned`]).
    pub hidden: Option<Vec<Vec<f32>>>,
}

/// Statistics of one (layer, KV head).
#[derive(Clone, Debug, Default)]
pub struct HeadAccum {
    /// The newest queries' attention rows (summed over the group's query heads), oldest
    /// first; each as long as the head was when its query ran.
    pub window: std::collections::VecDeque<Vec<f32>>,
    /// The newest query's attention row.
    pub last: Option<Vec<f32>>,
    /// KVzip: the largest attention each slot received from a context reconstruction pass.
    pub reconstruction: Option<Vec<f32>>,
}

/// Running sums of one query head's queries (before RoPE).
#[derive(Clone, Debug, Default)]
pub struct QueryAccum {
    pub count: f64,
    /// `dim` values.
    pub sum: Vec<f64>,
    /// `dim * dim` values: the sum of outer products `q q^T`.
    pub outer: Vec<f64>,
}

/// The rotary embedding of one layer, as the forward pass applies it to keys.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerRope {
    /// Each rotated pair's angle per position (the layer's base and any scaling).
    pub inv_freq: Vec<f64>,
    /// The factor on the rotated vectors' length (YaRN's; 1 otherwise).
    pub mscale: f64,
    pub style: RopeStyle,
}

impl PrefillStats {
    /// The sum of the newest `window` attention rows of (layer, KV head), for a head of
    /// `len` slots (rows of queries that ran when the head was shorter end in zeros:
    /// those slots did not exist yet). None if no rows were kept, or if they belong to
    /// a longer head (the head was compressed since).
    pub fn window(
        &self,
        layer: usize,
        kv_head: usize,
        window: usize,
        len: usize,
    ) -> Option<Vec<f32>> {
        let h = self.heads.get(layer)?.get(kv_head)?;
        if h.window.is_empty() || h.window.iter().any(|r| r.len() > len) {
            return None;
        }
        let mut sum = vec![0.0f32; len];
        for row in h.window.iter().rev().take(window) {
            sum.iter_mut().zip(row).for_each(|(a, b)| *a += b);
        }
        Some(sum)
    }

    /// Forget the window rows, last row and reconstruction scores (after the cache
    /// they describe was compressed); the query moments stay: they describe queries,
    /// not slots.
    pub fn clear_slot_stats(&mut self) {
        for l in &mut self.heads {
            for h in l {
                *h = HeadAccum::default();
            }
        }
    }
}
