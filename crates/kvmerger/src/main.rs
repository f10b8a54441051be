//! The `kvmerger` command line: thin wiring over the engine, compression and assets crates.

mod analyze;
mod bench;
mod cli;
mod compress;
mod context;
mod demo;
mod eval;
mod fetch;
mod run;
mod serve;
mod train;

use clap::Parser;

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
    if let Err(e) = run::dispatch(args) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
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
