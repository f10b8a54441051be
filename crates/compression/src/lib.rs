//! # kvmerger-compression
//!
//! KV cache compression methods over plain slots: keys, values and per-slot
//! metadata of one (layer, KV head) go in, a smaller set of slots comes out.
//! Nothing here knows about models, files or HTTP; the engine owns the cache
//! ([`HeadStore`] per layer and KV head) and calls [`compress_head`] on it.
//!
//! Pieces:
//! - [`store`]: the slot store ([`HeadStore`], f16 or f32) and its f32 view ([`HeadData`]);
//! - [`method`]: the [`Method`] trait, the attention statistics it may read ([`HeadStats`]),
//!   and string options;
//! - [`budget`]: budgets as a fraction of the prompt or a token count.
//!
//! Using it on your own tensors, without the engine:
//!
//! ```ignore
//! use kvmerger_compression::*;
//! let mut data = HeadData::new(64);
//! // push one key/value per token (keys after RoPE) with its position
//! // data.push(&key, &value, SlotMeta::token(pos));
//! let method = registry::build("streaming", &Options::new())?;
//! let out = method.compress(HeadInput { data: &data, stats: &HeadStats::default(),
//!     pos: HeadPos { layer: 0, n_layers: 1, kv_head: 0, n_kv_heads: 1 }, budget: 128 })?;
//! ```

pub mod budget;
pub mod method;
pub mod store;

pub use budget::Budget;
pub use method::{HeadInput, HeadPos, HeadStats, MassCorrection, Method, Options, StatsNeeds};
pub use store::{HeadData, HeadStore, KvDtype, KvSlice, SlotMeta};

/// Errors from building or running a compression method.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("unknown compression method '{0}' (known: {1})")]
    UnknownMethod(String, String),
    #[error("invalid option: {0}")]
    InvalidOption(String),
    #[error("invalid budget {0}")]
    InvalidBudget(String),
    #[error("method '{method}' needs the '{stat}' attention statistic, which the engine did not collect")]
    MissingStats { method: String, stat: &'static str },
    #[error("{0}")]
    Invalid(String),
}

/// Compress one stored head in place with `method`, keeping at most `budget` slots.
/// The new store holds exactly the kept slots, so the dropped ones' memory is freed.
pub fn compress_head(
    store: &mut HeadStore,
    method: &dyn Method,
    stats: &HeadStats,
    pos: HeadPos,
    budget: usize,
) -> Result<(), Error> {
    if budget >= store.len() {
        // Nothing to drop: leave the store bit-identical.
        return Ok(());
    }
    let data = store.to_data();
    let out = method.compress(HeadInput { data: &data, stats, pos, budget })?;
    *store = HeadStore::from_data(&out, store.dtype());
    Ok(())
}
