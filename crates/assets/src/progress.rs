//! How long-running work reports what it is doing.

/// Receives progress reports. `stage` announces each step (a download, an
/// extraction, a verification); `start_bytes`, `advance` and `finish` bracket
/// a byte count for the step that just started. Implementations decide how to
/// show them; every method has to be cheap.
pub trait Progress {
    /// A new step begins; `msg` says what it is.
    fn stage(&self, msg: &str);
    /// The current step will process `total` bytes (0 when unknown).
    fn start_bytes(&self, total: u64);
    /// `n` more bytes were processed.
    fn advance(&self, n: u64);
    /// The byte count of the current step is complete.
    fn finish(&self);
}

/// Ignores every report.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn stage(&self, _msg: &str) {}
    fn start_bytes(&self, _total: u64) {}
    fn advance(&self, _n: u64) {}
    fn finish(&self) {}
}
