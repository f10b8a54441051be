//! Long texts.
