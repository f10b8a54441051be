//! # kvmerger-engine
//!
//! Runs Llama-family models on CPU over a KV cache the engine owns and that
//! compression (the `kvmerger-compression` crate) can reshape.
//!
//! - [`gguf`] (and `safetensors` directories): model files; [`config`]: hyperparameters;
//! - [`quant`]: block formats and the quantized matrix kernels;
//! - [`tokenizer`] and [`chat`]: text to ids and back, chat templates;
//! - [`model`]: the forward pass (llama, qwen2, qwen3, gemma3), [`attention`] and [`kernels`];
//! - [`cache`]: the KV cache, one store per (layer, KV head);
//! - [`sampling`] and [`generate`]: decoding;
//! - [`sequence`]: one sequence's cache, statistics and compression, fed a context and
//!   then a question ([`prompt`] cuts prompts there; [`reconstruct`] is KVzip's pass).

pub mod attention;
pub mod cache;
pub mod chat;
pub mod compress;
pub mod config;
mod gemm;
pub mod generate;
pub mod gguf;
pub mod kernels;
pub mod kvc;
pub mod learned;
pub mod load;
pub mod model;
pub mod precision;
pub mod prompt;
pub mod quant;
pub mod reconstruct;
pub mod safetensors;
pub mod sampling;
pub mod sequence;
pub mod tokenizer;

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

fn file_error(e: kvmerger_compression::files::FileError, path: &std::path::Path) -> Error {
    match e.kind {
        Some(kind) => Error::Io {
            path: path.to_path_buf(),
            error: std::io::Error::new(kind, e.message),
        },
        None => Error::Format {
            path: path.to_path_buf(),
            msg: e.message,
        },
    }
}

/// Refuses anything but a regular file (or a link to one) of at most `limit` bytes
/// before it is read: a FIFO would block `open` forever, a device would never end.
/// Returns the file's length.
pub(crate) fn check_regular_file(path: &std::path::Path, limit: u64) -> Result<u64, Error> {
    kvmerger_compression::files::open_regular(path, limit)
        .map(|(_, len)| len)
        .map_err(|e| file_error(e, path))
}

/// The bytes of a regular file of at most `limit` bytes.
pub(crate) fn read_file(path: &std::path::Path, limit: u64) -> Result<Vec<u8>, Error> {
    kvmerger_compression::files::read_bounded(path, limit).map_err(|e| file_error(e, path))
}

/// Reads a text file of at most `limit` bytes, refusing anything but a regular file.
pub(crate) fn read_text_file(path: &std::path::Path, limit: u64) -> Result<String, Error> {
    kvmerger_compression::files::read_text_bounded(path, limit).map_err(|e| file_error(e, path))
}

/// Writes `bytes` to `path` so that a reader sees the old file or the whole new one,
/// never a part: a temporary file beside it, flushed to disk, then renamed over it.
pub fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> Result<(), Error> {
    use std::io::Write;
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let io = |e: std::io::Error| Error::Io {
        path: path.to_path_buf(),
        error: e,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = dir.join(format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // The rename itself reaches the disk with the directory.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}

/// The first two byte ranges `(start, end, name)` of a file's tensors that share bytes,
/// if any: a directory whose entries overlap is corrupt.
pub(crate) fn first_overlap(mut extents: Vec<(usize, usize, &str)>) -> Option<(&str, &str)> {
    extents.sort_unstable();
    extents
        .windows(2)
        .find(|w| w[1].0 < w[0].1)
        .map(|w| (w[0].2, w[1].2))
}
