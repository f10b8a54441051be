//! Any bytes as a GGUF model: loading (metadata, tensor directory, hyperparameters,
//! tokenizer, chat template, weights) is an error or a model, never a crash.
#![no_main]
use libfuzzer_sys::fuzz_target;
include!("scratch.rs");

fuzz_target!(|data: &[u8]| {
    let p = scratch("model.gguf", data);
    if let Ok(lm) = kvmerger_engine::load::LoadedModel::open(&p) {
        let ids = lm.tokenizer.encode("Hello world", true).unwrap_or_default();
        let _ = lm.tokenizer.decode(&ids);
    }
});
