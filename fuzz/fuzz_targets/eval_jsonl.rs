//! Any bytes as an evaluation JSONL file (RULER's generator output, LongBench,
//! ZeroSCROLLS) or a grid's records: reading is samples or an error naming the line,
//! never a crash.
#![no_main]
use kvmerger_eval::tasks::jsonl;
use libfuzzer_sys::fuzz_target;
include!("scratch.rs");

fuzz_target!(|data: &[u8]| {
    let p = scratch("samples.jsonl", data);
    let _ = jsonl::read_ruler(&p, Some("niah_single_1"));
    let _ = jsonl::read_ruler(&p, None);
    let _ = jsonl::read_longbench(&p, None);
    let _ = jsonl::read_zeroscrolls(&p, None);
    let _ = kvmerger_eval::records::read_records(&p);
});
