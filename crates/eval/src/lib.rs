//! # kvmerger-eval
//!
//! Measures what compression costs in quality, against how much memory it saves.
//!
//! - [`sample`]: one evaluation sample (a prompt, its references, how to score it);
//! - [`tasks`]: generators and readers that produce samples: RULER's synthetic tasks
//!   (needle in a haystack, variable tracking, word extraction, QA), passkey retrieval,
//!   and users' LongBench / ZeroSCROLLS JSONL files; plus the long texts for perplexity;
//! - [`metrics`]: the scores those benchmarks define (string match, F1, ROUGE-L, ...).
//!
//! The harness itself (grids that prefill each sample once and evaluate every
//! method and budget from a copy of that cache, reports and plots) builds on these.

pub mod metrics;
pub mod sample;
pub mod tasks;

pub use sample::{Metric, Sample};
