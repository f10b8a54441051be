//! Bounded reads of regular files (a FIFO or a device is refused before it is opened
//! for reading), with errors in the engine's [`Error`], and atomic writes.

use crate::Error;

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
pub fn check_regular_file(path: &std::path::Path, limit: u64) -> Result<u64, Error> {
    kvmerger_compression::files::open_regular(path, limit)
        .map(|(_, len)| len)
        .map_err(|e| file_error(e, path))
}

/// The bytes of a regular file of at most `limit` bytes.
pub fn read_file(path: &std::path::Path, limit: u64) -> Result<Vec<u8>, Error> {
    kvmerger_compression::files::read_bounded(path, limit).map_err(|e| file_error(e, path))
}

/// Reads a text file of at most `limit` bytes, refusing anything but a regular file.
pub fn read_text_file(path: &std::path::Path, limit: u64) -> Result<String, Error> {
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
pub fn first_overlap(mut extents: Vec<(usize, usize, &str)>) -> Option<(&str, &str)> {
    extents.sort_unstable();
    extents
        .windows(2)
        .find(|w| w[1].0 < w[0].1)
        .map(|w| (w[0].2, w[1].2))
}
