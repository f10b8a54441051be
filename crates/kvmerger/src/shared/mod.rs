//! What several commands share: loading a model, reading text, building a compressor
//! from flags, running a compressed sequence, the progress bar.

pub mod progress;
pub mod recipe;
pub mod session;
pub mod text;
