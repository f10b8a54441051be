//! # kvmerger-eval
//!
//! Measures what compression costs in quality, against how much memory it saves.
//!
//! - [`sample`]: one evaluation sample (a prompt, its references, how to score it);
//! - [`tasks`]: generators and readers that produce samples: RULER's synthetic tasks
//!   (needle in a haystack, variable tracking, word extraction, QA), passkey retrieval,
//!   and users' LongBench / ZeroSCROLLS JSONL files; plus the long texts for perplexity;
//! - [`metrics`]: the scores those benchmarks define (string match, F1, ROUGE-L, ...);
//! - [`grid`]: methods × budgets × tasks × lengths, cut into work items and shards;
//! - [`runner`]: prefills each item once and evaluates every configuration from a copy
//!   of that cache; [`records`]: the resumable JSON-lines results;
//! - [`report`] and [`plot`]: summary tables (Markdown, CSV) and charts (SVG, PNG);
//!   [`stats`]: the bootstrap intervals and sign tests of its paired comparisons;
//! - [`analyze`]: the paper's observations (key similarity of neighbouring tokens, the
//!   per-layer sparsity of merging sets) and merge maps.

pub mod analyze;
pub mod grid;
pub mod metrics;
pub mod plot;
pub mod records;
pub mod report;
pub mod runner;
pub mod sample;
pub mod sources;
pub mod stats;
pub mod tasks;

pub use sample::{Metric, Sample};

/// Errors of the harness.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Engine(#[from] kvmerger_engine::Error),
    #[error(transparent)]
    Compression(#[from] kvmerger_compression::Error),
    #[error(transparent)]
    Grid(#[from] grid::GridError),
    #[error(transparent)]
    Task(#[from] tasks::Error),
    #[error("{0}")]
    Msg(String),
}

impl Error {
    pub fn msg(s: impl Into<String>) -> Error {
        Error::Msg(s.into())
    }
}
