//! Compressed contexts kept between requests, so that a new question about the same
//! document, or the next turn of a chat, prefills only what is new.
//!
//! When a request finishes, its sequence (the prompt's cache as its recipe compressed
//! it, with the generated answer appended) is kept here under the request's recipe. A
//! later request with the same recipe whose prompt starts with the same tokens takes a
//! copy, cut back to the shared prefix ([`Sequence::truncate`]), and prefills only the
//! rest, uncompressed. A cut can only fall after the part that was compressed (a
//! compressed slot may stand for several tokens), so a prompt that leaves a cached
//! context inside its compressed part does not reuse it.
//!
//! Matching is on token ids and the whole recipe (method, options, budget, schedule,
//! protocol): a request can only read a context through a prefix it sent itself.
//!
//! One entry per conversation: a request that reused an entry's whole context (its
//! prompt up to the question, or all of it without a split) replaces that entry (the
//! latest continuation wins), and so does a request whose tokens extend an entry's.
//! Entries
//! count toward the server's KV memory and are evicted least recently used when a new
//! request needs room; a running request works on its own copy, so eviction never
//! touches it.

use kvmerger_engine::sequence::{common_prefix, Sequence};

/// A context found for a prompt: which entry, and how many leading tokens it serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Match {
    pub id: u64,
    /// Prompt tokens the entry's cache already holds (at least one token is left to
    /// prefill, for the logits of the last one).
    pub tokens: usize,
    /// Bytes of the copy once cut back to those tokens.
    pub bytes: usize,
}

struct Entry {
    id: u64,
    key: String,
    seq: Sequence,
    /// Where the request that made it put the end of its context.
    context_end: usize,
    last_used: u64,
}

/// Totals for `/metrics`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub entries: usize,
    pub bytes: usize,
}

#[derive(Default)]
pub struct ContextCache {
    entries: Vec<Entry>,
    clock: u64,
    next_id: u64,
}

/// Memory an entry holds: its slots and the room reserved beside them.
fn held(seq: &Sequence) -> usize {
    seq.cache.allocated_bytes()
}

impl ContextCache {
    /// The entry of `key` that serves the most leading tokens of `prompt`, if any serves
    /// one. `context_end` is where the request's own compression would stop (the start
    /// of its question); an entry compressed past it compressed part of this request's
    /// question and is not used.
    pub fn find(&self, key: &str, prompt: &[u32], context_end: usize) -> Option<Match> {
        self.entries
            .iter()
            .filter(|e| e.key == key && e.seq.compressed_end() <= context_end)
            .filter_map(|e| {
                let n = e.seq.reusable_prefix(prompt);
                (n > 0).then(|| Match {
                    id: e.id,
                    tokens: n,
                    bytes: e.seq.kv_bytes_at(n),
                })
            })
            .max_by_key(|m| (m.tokens, m.id))
    }

    /// A copy of the entry `m` found, cut back to `m.tokens`; None if it was evicted
    /// since.
    pub fn take(&mut self, m: &Match) -> Option<Sequence> {
        self.clock += 1;
        let clock = self.clock;
        let e = self.entries.iter_mut().find(|e| e.id == m.id)?;
        e.last_used = clock;
        let mut seq = e.seq.clone();
        seq.truncate(m.tokens).ok()?;
        Some(seq)
    }

    /// Keep a finished request's sequence under `key`; its request's context ended at
    /// `context_end`, and it was built on `reused` tokens of the entry `source`. It
    /// replaces that entry when it reused the entry's whole context, and any entry
    /// whose tokens it extends, provided it was compressed no further than they were.
    pub fn store(
        &mut self,
        key: String,
        mut seq: Sequence,
        context_end: usize,
        source: Option<u64>,
        reused: usize,
    ) {
        if seq.tokens().is_empty() {
            return;
        }
        // Statistics were for compressing this context; a reuse only appends.
        seq.stats = Default::default();
        seq.cache.shrink_to_fit();
        let c = seq.compressed_end();
        self.entries.retain(|e| {
            let replaced = e.key == key
                && c <= e.seq.compressed_end()
                && ((Some(e.id) == source && reused >= e.context_end)
                    || common_prefix(e.seq.tokens(), seq.tokens()) == e.seq.tokens().len());
            !replaced
        });
        self.clock += 1;
        self.next_id += 1;
        self.entries.push(Entry {
            id: self.next_id,
            key,
            seq,
            context_end,
            last_used: self.clock,
        });
    }

    /// Evict the least recently used entry other than `keep`; false when there is none.
    pub fn evict_one(&mut self, keep: Option<u64>) -> bool {
        let Some(i) = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| Some(e.id) != keep)
            .min_by_key(|(_, e)| e.last_used)
            .map(|(i, _)| i)
        else {
            return false;
        };
        self.entries.swap_remove(i);
        true
    }

    pub fn bytes(&self) -> usize {
        self.bytes_except(None)
    }

    /// Bytes held by every entry but `keep`.
    pub fn bytes_except(&self, keep: Option<u64>) -> usize {
        self.entries
            .iter()
            .filter(|e| Some(e.id) != keep)
            .map(|e| held(&e.seq))
            .sum()
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            entries: self.entries.len(),
            bytes: self.bytes(),
        }
    }

    pub fn clear(&mut self) {
        self.entries.clear();
    }
}
