//! The progress bar the assets crate reports to.

use indicatif::{ProgressBar, ProgressStyle};
use kvmerger_assets::Progress;
use std::time::Duration;

/// A terminal progress bar: a spinner while a stage runs, a byte bar while bytes are counted.
pub struct Bar {
    bar: ProgressBar,
}

impl Bar {
    pub fn new() -> Bar {
        let bar = ProgressBar::new_spinner();
        bar.enable_steady_tick(Duration::from_millis(120));
        Bar { bar }
    }
}

impl Progress for Bar {
    fn stage(&self, msg: &str) {
        self.bar
            .set_style(ProgressStyle::with_template("{spinner} {msg} [{elapsed}]").unwrap());
        self.bar.set_message(msg.to_string());
    }
    fn start_bytes(&self, total: u64) {
        self.bar.set_length(total);
        self.bar.set_position(0);
        self.bar.set_style(
            ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta})",
            )
            .unwrap()
            .progress_chars("=> "),
        );
    }
    fn advance(&self, n: u64) {
        self.bar.inc(n);
    }
    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
