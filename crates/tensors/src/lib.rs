//! # kvmerger-tensors
//!
//! The numeric floor of kvmerger: what turns a model file's bytes into products.
//!
//! - [`gguf`]: the GGUF container (metadata and tensor directory) and [`quant`]: its
//!   block formats (GGUF's type table), dequantization and the quantized matrix kernels;
//! - [`gemm`] and [`precision`]: several-token products at each precision;
//! - [`kernels`]: vector kernels (norms, activations, dot products, RoPE) and the
//!   kernel family chosen at run time; [`attention`]: attention over the
//!   compression crate's per-head KV stores;
//! - [`Error`], shared by every engine crate, and [`files`]: bounded, regular-file reads
//!   and atomic writes.

pub mod attention;
pub mod files;
mod gemm;
pub mod gguf;
pub mod kernels;
pub mod precision;
pub mod quant;

use std::path::PathBuf;

/// Errors from loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        /// Not a `source`: the message already holds it, and chains would repeat it.
        error: std::io::Error,
    },
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    #[error("{path}: tensor '{name}' is missing")]
    MissingTensor { path: PathBuf, name: String },
    #[error("tensor '{tensor}' has unsupported type {ty}")]
    UnsupportedTensorType { tensor: String, ty: String },
    #[error("unsupported architecture '{0}' (supported: llama, qwen2, qwen3, gemma3)")]
    UnsupportedArchitecture(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("prompt of {prompt} tokens does not fit the context of {ctx} tokens")]
    ContextOverflow { prompt: usize, ctx: usize },
    #[error("invalid sampling parameter: {0}")]
    Sampling(String),
    /// The message is shown once: the compression error is not also a `source`, which
    /// error reports that print the chain would repeat.
    #[error("compression: {0}")]
    Compression(kvmerger_compression::Error),
    /// A compression recipe's setting that cannot work (its field names the setting).
    #[error("compression {}: {}", .0.field, .0.message)]
    Recipe(kvmerger_compression::RecipeError),
    #[error("{0}")]
    Invalid(String),
    /// The work was stopped by its cancellation check (a deadline, a shutdown).
    #[error("cancelled: {0}")]
    Cancelled(String),
}

/// Asked between steps of work that can run long (a prefill chunk, a chunk of KVzip's
/// pass): `Some(reason)` stops it with [`Error::Cancelled`]. A server uses it for
/// request deadlines and shutdown.
#[derive(Clone)]
pub struct Cancel(pub std::sync::Arc<dyn Fn() -> Option<String> + Send + Sync>);

impl std::fmt::Debug for Cancel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cancel")
    }
}

/// Errors with [`Error::Cancelled`] when `cancel` says stop.
pub fn check_cancel(cancel: Option<&Cancel>) -> Result<(), Error> {
    match cancel.and_then(|c| (c.0)()) {
        Some(why) => Err(Error::Cancelled(why)),
        None => Ok(()),
    }
}

impl From<kvmerger_compression::RecipeError> for Error {
    fn from(e: kvmerger_compression::RecipeError) -> Error {
        Error::Recipe(e)
    }
}

impl From<kvmerger_compression::Error> for Error {
    fn from(e: kvmerger_compression::Error) -> Error {
        Error::Compression(e)
    }
}
