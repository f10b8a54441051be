//! # kvmerger-text
//!
//! Text to token ids and back, and conversations to prompts.
//!
//! - [`tokenizer`]: byte-level BPE and SentencePiece vocabularies from GGUF metadata,
//!   and Hugging Face `tokenizer.json` files;
//! - [`chat`]: chat templates (the model's own Jinja template), tools and assistant
//!   prefill.

pub mod chat;
pub mod tokenizer;

pub use kvmerger_tensors::Error;
