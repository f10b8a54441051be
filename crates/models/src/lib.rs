//! # kvmerger-models
//!
//! Models as the engine runs them: read from a file, configured, and run forward over a
//! KV cache that compression can reshape.
//!
//! - [`config`]: hyperparameters from GGUF metadata or a Hugging Face `config.json`;
//!   [`safetensors`]: Hugging Face model directories (GGUF files are read by
//!   `kvmerger_tensors::gguf`);
//! - [`model`]: the weights and the forward pass (llama, qwen2, qwen3, gemma3, phi3),
//!   with the attention statistics compression methods ask for;
//! - [`cache`]: the KV cache, one store per (layer, KV head);
//! - [`learned`]: KVzap's learned scorer, applied inside the forward pass.

pub mod cache;
pub mod config;
pub mod learned;
pub mod model;
pub mod safetensors;

pub use kvmerger_tensors::Error;
