//! # kvmerger-engine
//!
//! The session: one sequence's life from a prompt to its answer, over a KV cache that
//! compression (the `kvmerger-compression` crate) reshapes. Callers (the binary, the
//! evaluation harness, the server) use this crate; it re-exports the modules of the
//! crates below it that they need.
//!
//! - [`sequence`]: one sequence's cache, statistics and compression, fed a context and
//!   then a question ([`prompt`] cuts prompts there; [`reconstruct`] is KVzip's pass;
//!   [`compressor`] turns a recipe into the engine's compressor);
//! - [`sampling`] and [`generate`]: decoding, with an optional token constraint;
//! - [`load`]: a model with its tokenizer and chat template; [`kvc`]: compressed
//!   contexts in files; [`learned`]: KVzap's scorer and its training.
//!
//! Below it: `kvmerger-models` ([`model`], [`cache`], [`config`], [`safetensors`]),
//! `kvmerger-text` ([`tokenizer`], [`chat`]) and `kvmerger-tensors` ([`quant`],
//! [`gguf`], [`kernels`], [`attention`], [`precision`], [`Error`]).

pub mod compressor;
pub mod generate;
pub mod kvc;
pub mod learned;
pub mod load;
pub mod prompt;
pub mod reconstruct;
pub mod sampling;
pub mod sequence;

pub use kvmerger_models::{cache, config, model, safetensors};
pub use kvmerger_tensors::files::write_atomic;
pub use kvmerger_tensors::{attention, gguf, kernels, precision, quant};
pub use kvmerger_tensors::{check_cancel, Cancel, Error};
pub use kvmerger_text::{chat, tokenizer};
