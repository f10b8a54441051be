//! # kvmerger-compression
//!
//! KV cache compression methods over plain slots: keys, values and per-slot
//! metadata of one (layer, KV head) go in, a smaller set of slots comes out.
//! Nothing here knows about models, files or HTTP; the engine owns the cache
//! ([`HeadStore`] per layer and KV head) and calls [`compress_head`] on it.
//!
//! Pieces:
//! - [`store`]: the slot store ([`HeadStore`], f16, f32 or q8_0) and its f32 view ([`HeadData`]);
//! - [`method`]: the [`Method`] trait, the attention statistics it may read ([`HeadStats`]),
//!   and string options;
//! - [`scorer`]: the [`Scorer`] trait (one score per slot) and [`Selection`], which keeps
//!   the best-scoring slots for every scorer;
//! - [`budget`]: budgets as a fraction of the prompt or a token count, and
//!   [`should_recompress`] for decode-time re-compression;
//! - [`recipe`]: a method with its options, budget, schedule and when it compresses
//!   ([`Recipe`]), one parser for every surface;
//! - [`schedule`]: how one budget is shared between layers ([`Schedule`]);
//! - [`select`]: keeping the best-scoring slots when heads share one budget (Ada-KV,
//!   KVzip);
//! - [`methods`]: one file per method; [`registry`]: names, descriptions, options, [`registry::build`].
//!
//! Methods (`registry::names()`):
//!
//! | name | what it keeps | statistic |
//! |---|---|---|
//! | `full` | everything (the reference) | none |
//! | `streaming` | attention sinks + recent window (StreamingLLM) | none |
//! | `h2o` | recent window + heavy hitters (H2O) | accumulated |
//! | `tova` | what the newest query attends to most (TOVA) | last |
//! | `snapkv` | observation window + pooled window votes (SnapKV) | window |
//! | `pyramidkv` | SnapKV with budgets shrinking up the layers (PyramidKV) | window |
//! | `knorm` | smallest key norms (+ optional recent window) | none |
//! | `random` | seeded random subset + recent window | none |
//! | `cam` | streaming or H2O eviction, evicted values merged forward (CaM) | accumulated |
//! | `d2o` | H2O eviction, evicted slots merged into similar kept ones (D2O) | accumulated |
//! | `keydiff` | keys least similar to the head's mean key direction (KeyDiff) | none |
//! | `expected_attention` | attention expected from future queries (Expected Attention) | queries |
//! | `kvzip` | attention while the model repeats the context (KVzip), one threshold over all heads | reconstruction |
//! | `kvzap` | KVzip's scores predicted from hidden states by a trained per-layer model (KVzap) | learned |
//! | `adakv` | any scorer's best slots over all heads of a layer (Ada-KV) | the scorer's |
//! | `kvmerger` | recent + heavy hitters, similar consecutive keys merged (KVMerger) | accumulated, window, queries, reconstruction or none |
//! | `kvmerger+` | a scorer's selection (KVzip's by default) with sinks sized to the budget; `merge=values`: neighbours' values merged into kept keys, mass bias | the selector's |
//!
//! Every method returns at most its budget of slots except `full`, `pyramidkv` (whose
//! lower layers get more than the mean, by design) and `kvmerger` in `mode=paper`.
//! Methods that share a budget between heads ([`Method::compress_all`]: `adakv`,
//! `kvzip`, `kvmerger+` with `scope=layer|model`, `kvmerger` with `layers=sparsity`)
//! give some heads more than their even share and others less, spending exactly the
//! sum.
//!
//! Using it on your own tensors, without the engine:
//!
//! ```
//! use kvmerger_compression::*;
//! # fn main() -> Result<(), Error> {
//! let mut data = HeadData::new(4);
//! for pos in 0..256u32 {
//!     // one key (after RoPE) and value per token, with its position
//!     let key = [1.0, (pos as f32 * 0.01).sin(), 0.5, -0.5];
//!     data.push(&key, &[pos as f32; 4], SlotMeta::token(pos));
//! }
//! let mut opts = Options::new();
//! opts.parse_pair("sinks=4")?;
//! let method = registry::build("streaming", &opts)?;
//! let out = method.compress(HeadInput {
//!     data: &data,
//!     stats: &HeadStats::default(), // `method.needs()` says which statistics to fill
//!     pos: HeadPos { layer: 0, n_layers: 1, kv_head: 0, n_kv_heads: 1 },
//!     budget: 128,
//! })?;
//! assert_eq!(out.len(), 128);
//! # Ok(())
//! # }
//! ```

pub mod budget;
pub mod files;
pub mod method;
pub mod methods;
pub mod recipe;
pub mod registry;
pub mod schedule;
pub mod scorer;
pub mod select;
mod simd;
pub mod store;

pub use budget::{should_recompress, Budget};
pub use method::{
    HeadInput, HeadPos, HeadStats, MassCorrection, Method, Options, QueryMoments, QueryNeeds,
    StatsNeeds,
};
pub use recipe::{Protocol, Recipe, RecipeError, ScheduleFiles};
pub use schedule::Schedule;
pub use scorer::{Scorer, Selection};
pub use store::{
    dequantize_q8_0, quantize_q8_0, HeadData, HeadStore, KvDtype, KvSlice, SlotMeta, Q8_BLOCK,
};

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
    let out = method.compress(HeadInput {
        data: &data,
        stats,
        pos,
        budget,
    })?;
    *store = HeadStore::from_data(&out, store.dtype());
    Ok(())
}
