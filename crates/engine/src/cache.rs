//! The KV cache: one [`HeadStore`] per (layer, KV head), each at its own length.

use kvmerger_compression::{HeadStats, HeadStore, KvDtype};

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

    /// Bytes held by live slots, in all heads.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| l.iter().map(|h| h.bytes()).sum::<usize>())
            .sum()
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

/// Attention statistics collected during prefill, per (layer, KV head).
#[derive(Clone, Debug, Default)]
pub struct PrefillStats {
    pub heads: Vec<Vec<HeadStats>>,
}
