//! The `kvmerger` command line: thin wiring over the engine, compression and assets crates.

mod analyze;
mod bench;
mod cli;
mod compress;
mod demo;
mod eval;
mod fetch;
mod run;
mod serve;

use clap::Parser;

fn main() {
    let args = cli::Cli::parse();
    if let Err(e) = run::dispatch(args) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
