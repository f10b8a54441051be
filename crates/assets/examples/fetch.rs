//! Fetches assets by hand: `cargo run --release -p kvmerger-assets --example
//! fetch -- [--dir DIR] [--list] [ID...]`. Prints each step, the time it took
//! in all, and the size of what is cached.

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::time::Instant;

use kvmerger_assets::{data_dir, fetch, list, Progress};

/// Prints stages, and byte progress in tenths.
#[derive(Default)]
struct Print {
    total: Cell<u64>,
    done: Cell<u64>,
    shown: Cell<u64>,
}

impl Progress for Print {
    fn stage(&self, msg: &str) {
        eprintln!("  {msg}");
    }
    fn start_bytes(&self, total: u64) {
        self.total.set(total);
        self.done.set(0);
        self.shown.set(0);
    }
    fn advance(&self, n: u64) {
        self.done.set(self.done.get() + n);
        let total = self.total.get().max(1);
        let tenth = self.done.get() * 10 / total;
        if tenth > self.shown.get() && tenth < 10 {
            self.shown.set(tenth);
            eprint!("    {}%\r", tenth * 10);
        }
    }
    fn finish(&self) {
        eprintln!("    {} bytes", self.done.get());
    }
}

fn size_of(path: &Path) -> u64 {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => std::fs::read_dir(path)
            .map(|rd| rd.filter_map(|e| e.ok()).map(|e| size_of(&e.path())).sum())
            .unwrap_or(0),
        Ok(m) => m.len(),
        Err(_) => 0,
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut dir: Option<PathBuf> = None;
    let mut ids = Vec::new();
    let mut show_list = false;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--dir" => dir = args.next().map(PathBuf::from),
            "--list" => show_list = true,
            _ => ids.push(arg),
        }
    }
    let dir = data_dir(dir.as_deref());
    eprintln!("data dir: {}", dir.display());
    if show_list {
        let started = Instant::now();
        for (asset, cached) in list(&dir) {
            println!(
                "{:<14} {:<5} {:<7} {} [{}; {}]",
                asset.id,
                asset.kind().to_string(),
                if cached { "cached" } else { "-" },
                asset.description,
                asset.source(),
                asset.licence
            );
        }
        eprintln!("listed in {:.2?}", started.elapsed());
    }
    let mut failed = false;
    for id in ids {
        eprintln!("{id}:");
        let started = Instant::now();
        match fetch(&id, &dir, &Print::default()) {
            Ok(path) => println!(
                "{id}: {} ({} bytes) in {:.2?}",
                path.display(),
                size_of(&path),
                started.elapsed()
            ),
            Err(e) => {
                failed = true;
                println!("{id}: error: {e}");
            }
        }
    }
    if failed {
        std::process::exit(1);
    }
}
