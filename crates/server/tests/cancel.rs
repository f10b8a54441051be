//! Long work is cancelled at its deadline: a request made slow on purpose (KVzip's
//! second pass over a long prompt) is stopped by its time limit within a moment, the
//! next request is served, and a shutdown ends in time whatever is running.

mod common;

use common::*;
use serde_json::json;
use std::time::{Duration, Instant};

/// A prompt of about `tokens` tokens of varied text.
fn long_prompt(tokens: usize) -> String {
    (0..tokens / 15)
        .map(|i| {
            format!(
                "Line {i}: the {} fox counted {} stones. ",
                ["red", "grey", "old"][i % 3],
                i * 7 % 13
            )
        })
        .collect()
}

fn slow_request() -> serde_json::Value {
    json!({
        "model": MODEL, "max_tokens": 4,
        "messages": [{"role": "user", "content": long_prompt(5400)}],
        "kv_compression": {"method": "kvzip", "budget": 0.25},
    })
}

#[test]
fn a_slow_request_is_stopped_at_its_time_limit_and_the_next_one_is_served() {
    let s = start(|c| c.request_timeout = Duration::from_secs(3));
    let t0 = Instant::now();
    let r = post(s.addr, "/v1/chat/completions", &slow_request());
    let took = t0.elapsed();
    assert_eq!(r.status, 504, "{}", r.text());
    assert_eq!(r.error()["code"], "timeout");
    // Stopped within a prefill chunk or a pass chunk of its deadline, not at its end.
    assert!(took < Duration::from_secs(12), "answered after {took:?}");
    // The engine is free: a short request is answered at once.
    let t1 = Instant::now();
    let ok = post(
        s.addr,
        "/v1/chat/completions",
        &json!({"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}),
    );
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert!(t1.elapsed() < Duration::from_secs(10), "{:?}", t1.elapsed());
}

#[test]
fn a_shutdown_ends_in_time_whatever_is_running() {
    let s = start(|c| {
        c.request_timeout = Duration::from_secs(600);
        c.shutdown_grace = Duration::from_secs(1);
    });
    let addr = s.addr;
    let client = std::thread::spawn(move || post(addr, "/v1/chat/completions", &slow_request()));
    // The request is in its prefill or KVzip's pass when the server is told to stop.
    std::thread::sleep(Duration::from_millis(1500));
    let t0 = Instant::now();
    s.stop().unwrap();
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "shutdown took {:?}",
        t0.elapsed()
    );
    let r = client.join().unwrap();
    assert!(r.status >= 500, "{}", r.text());
}
