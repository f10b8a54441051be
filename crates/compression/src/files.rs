//! The one way a user-named file is read, by every crate and every command: a regular
//! file only (a FIFO would block, a device never end), opened without blocking, its size
//! checked against a limit named in the error before anything is read, and the read
//! itself bounded.

use std::io::Read;
use std::path::Path;

/// Why a user-named file was not read; the message names the file.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct FileError {
    pub path: String,
    pub message: String,
    /// The I/O error kind, when an I/O call failed (e.g. `NotFound`).
    pub kind: Option<std::io::ErrorKind>,
}

fn fail(path: &Path, message: impl Into<String>, kind: Option<std::io::ErrorKind>) -> FileError {
    FileError {
        path: path.display().to_string(),
        message: message.into(),
        kind,
    }
}

/// A limit in words: `64 MiB`, `512 KiB`, `100 bytes`.
pub fn size_text(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{} GiB", b >> 30),
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{} KiB", b >> 10),
        b => format!("{b} bytes"),
    }
}

/// Opens `path` for reading if it is a regular file of at most `limit` bytes; returns
/// the file and its length.
pub fn open_regular(path: &Path, limit: u64) -> Result<(std::fs::File, u64), FileError> {
    let io = |e: std::io::Error| fail(path, e.to_string(), Some(e.kind()));
    let meta = std::fs::metadata(path).map_err(io)?;
    if !meta.is_file() {
        return Err(fail(
            path,
            "not a regular file (a directory, FIFO, socket or device): refusing to read it",
            None,
        ));
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true);
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // O_NONBLOCK: a file swapped for a FIFO after the check cannot block the open.
        opts.custom_flags(0o4000);
    }
    let file = opts.open(path).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(fail(path, "not a regular file: refusing to read it", None));
    }
    if meta.len() > limit {
        return Err(fail(
            path,
            format!(
                "{} bytes is more than the {} such a file may have",
                meta.len(),
                size_text(limit)
            ),
            None,
        ));
    }
    Ok((file, meta.len()))
}

/// The bytes of the regular file `path`, at most `limit` of them (see the module).
pub fn read_bounded(path: &Path, limit: u64) -> Result<Vec<u8>, FileError> {
    let (file, len) = open_regular(path, limit)?;
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| fail(path, e.to_string(), Some(e.kind())))?;
    if bytes.len() as u64 > limit {
        return Err(fail(
            path,
            format!(
                "grew past the {} such a file may have while it was read",
                size_text(limit)
            ),
            None,
        ));
    }
    Ok(bytes)
}

/// The UTF-8 text of the regular file `path`, at most `limit` bytes.
pub fn read_text_bounded(path: &Path, limit: u64) -> Result<String, FileError> {
    let bytes = read_bounded(path, limit)?;
    String::from_utf8(bytes).map_err(|e| {
        fail(
            path,
            format!(
                "not UTF-8 text (invalid byte at offset {})",
                e.utf8_error().valid_up_to()
            ),
            None,
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifos_devices_directories_and_oversized_files_are_refused_without_blocking() {
        let dir = std::env::temp_dir().join(format!("kvmerger-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo");
        let _ = std::fs::remove_file(&fifo);
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        if made.is_ok_and(|s| s.success()) {
            let t = std::time::Instant::now();
            let e = read_bounded(&fifo, 100).unwrap_err();
            assert!(e.to_string().contains("not a regular file"), "{e}");
            assert!(t.elapsed().as_secs() < 5);
        }
        for p in [Path::new("/dev/zero"), dir.as_path()] {
            assert!(read_bounded(p, 100)
                .unwrap_err()
                .message
                .contains("regular"));
        }
        let big = dir.join("big");
        std::fs::write(&big, vec![b'x'; 2048]).unwrap();
        let e = read_bounded(&big, 1024).unwrap_err().to_string();
        assert!(e.contains("2048 bytes") && e.contains("1 KiB"), "{e}");
        assert_eq!(read_bounded(&big, 4096).unwrap().len(), 2048);
        std::fs::write(&big, [0xff, 0xfe]).unwrap();
        assert!(read_text_bounded(&big, 100)
            .unwrap_err()
            .message
            .contains("UTF-8"));
        let missing = read_bounded(&dir.join("missing"), 10).unwrap_err();
        assert_eq!(missing.kind, Some(std::io::ErrorKind::NotFound));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
