//! Any bytes as a tokenizer.json: loading is an error or a tokenizer that encodes and
//! decodes, never a crash or a huge allocation.
#![no_main]
use libfuzzer_sys::fuzz_target;
include!("scratch.rs");

fuzz_target!(|data: &[u8]| {
    let p = scratch("tokenizer.json", data);
    if let Ok(t) = kvmerger_engine::tokenizer::Tokenizer::from_tokenizer_json(&p) {
        if let Ok(ids) = t.encode("Hello world, ünïcödé 123", true) {
            let _ = t.decode(&ids);
        }
        let _ = t.encode_within("Hello world again and again", true, 4);
    }
});
