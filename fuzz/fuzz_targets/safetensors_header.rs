//! Any bytes as a safetensors file beside a valid config.json: opening the directory
//! and loading the weights is an error or a model, never a crash.
#![no_main]
use libfuzzer_sys::fuzz_target;
include!("scratch.rs");

const CONFIG: &str = r#"{"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 1,
  "num_attention_heads": 2, "intermediate_size": 16, "vocab_size": 4}"#;

fuzz_target!(|data: &[u8]| {
    let p = scratch("model.safetensors", data);
    let dir = p.parent().unwrap();
    let cfg_path = dir.join("config.json");
    std::fs::write(&cfg_path, CONFIG).unwrap();
    let cfg = kvmerger_engine::safetensors::config_from_json(&cfg_path).unwrap();
    if let Ok(w) = kvmerger_engine::safetensors::SafetensorsDir::open(dir, cfg.arch) {
        let _ = kvmerger_engine::model::Model::load(cfg, &w);
    }
});
