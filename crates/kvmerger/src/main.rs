//! The `kvmerger` command line: thin wiring over the engine, compression and assets crates.

mod analyze;
mod bench;
mod chat;
mod cli;
mod context;
mod demo;
mod eval;
mod fetch;
mod generate;
mod serve;
mod shared;
mod train;

use anyhow::{bail, Context, Result};
use clap::Parser;
use cli::{Cli, Command};
use kvmerger_assets as assets;

fn main() {
    let args = cli::Cli::parse();
    // For scripts/check_readme.py: every example in the README must at least parse.
    if std::env::var_os("KVMERGER_PARSE_ONLY").is_some() {
        println!("parsed");
        return;
    }
    if !matches!(args.command, cli::Command::Serve(_)) {
        stop_quietly_when_stdout_closes();
    }
    if let Err(e) = dispatch(args) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn dispatch(cli: Cli) -> Result<()> {
    // A kernel family forced in the environment must exist and run on this CPU.
    kvmerger_engine::kernels::Family::requested().map_err(anyhow::Error::msg)?;
    if let Command::Serve(a) = cli.command {
        // The server runs its engine on a thread pool of its own.
        let dir = assets::data_dir(cli.data_dir.as_deref());
        return crate::serve::run(a, &dir, cli.threads);
    }
    let mut pool = rayon::ThreadPoolBuilder::new();
    if let Some(n) = cli.threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        pool = pool.num_threads(n);
    }
    // The whole command runs on a pool thread: handing work to the pool from outside
    // costs microseconds per matrix product, from inside a fraction of one.
    let pool = pool.build().context("starting the thread pool")?;
    pool.install(|| dispatch_in_pool(cli))
}

fn dispatch_in_pool(cli: Cli) -> Result<()> {
    let dir = assets::data_dir(cli.data_dir.as_deref());
    match cli.command {
        Command::Fetch(a) => crate::fetch::run(a.id.as_deref(), a.list, &dir),
        Command::Generate(a) => crate::generate::run(a, &dir),
        Command::Chat(a) => crate::chat::run(a, &dir),
        Command::Bench(a) => crate::bench::run(a, &dir),
        Command::Demo(a) => crate::demo::run(a, &dir),
        Command::Eval(a) => crate::eval::run(a, &dir),
        Command::Analyze(a) => crate::analyze::run(a, &dir),
        Command::TrainScorer(a) => crate::train::run(a, &dir),
        Command::Compress(a) => crate::context::compress(a, &dir),
        Command::Inspect(a) => crate::context::inspect(a, &dir),
        Command::Methods => {
            crate::shared::recipe::print_methods();
            Ok(())
        }
        Command::Serve(_) => unreachable!("dispatched before the pool"),
    }
}

/// `kvmerger generate ... | head -c5` ends when `head` does, as other command-line
/// tools do: a write to a closed pipe ends the process (SIGPIPE's default) instead of
/// a panic in `println!` after generating to the token limit. The server keeps Rust's
/// default (ignored; a closed connection is an error on that connection only).
fn stop_quietly_when_stdout_closes() {
    #[cfg(unix)]
    // SAFETY: restores the default disposition of one signal before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
