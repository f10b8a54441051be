//! Scheduling as clients see it: batching, admission by KV memory, a full queue,
//! disconnects, deadlines and shutdown.

mod common;

use common::*;
use kvmerger_server::RequestRecipe;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const COMPLETIONS: &str = "/v1/completions";
const CHAT: &str = "/v1/chat/completions";

fn long_completion(max_tokens: usize, stream: bool) -> Value {
    json!({
        "model": MODEL, "prompt": "Once upon a time", "max_tokens": max_tokens,
        "ignore_eos": true, "stream": stream, "temperature": 0,
    })
}

#[test]
fn concurrent_requests_share_batched_decode_steps_and_get_their_own_answers() {
    let s = start(|_| {});
    let prompts = [
        "The capital of France is",
        "def fibonacci(n):",
        "Water boils at a temperature of",
        "The three primary colours are",
    ];
    // Each prompt alone first: greedy answers to compare with.
    let alone: Vec<String> = prompts
        .iter()
        .map(|p| {
            post(s.addr, COMPLETIONS, &completion(p, 12)).json()["choices"][0]["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let steps0 = metric(s.addr, "kvmerger_engine_steps_total");
    let seqs0 = metric(s.addr, "kvmerger_engine_step_sequences_total");
    let addr = s.addr;
    let together: Vec<String> = std::thread::scope(|sc| {
        let hs: Vec<_> = prompts
            .iter()
            .map(|p| sc.spawn(move || post(addr, COMPLETIONS, &completion(p, 12))))
            .collect();
        hs.into_iter()
            .map(|h| {
                let r = h.join().unwrap();
                assert_eq!(r.status, 200, "{}", r.text());
                r.json()["choices"][0]["text"].as_str().unwrap().to_string()
            })
            .collect()
    });
    let steps = metric(s.addr, "kvmerger_engine_steps_total") - steps0;
    let seqs = metric(s.addr, "kvmerger_engine_step_sequences_total") - seqs0;
    assert!(
        seqs / steps > 1.5,
        "mean batch {:.2} over {steps} steps: requests were not batched",
        seqs / steps
    );
    assert!(metric(s.addr, "kvmerger_running_requests_peak") >= 2.0);
    // Batched logits equal single-sequence logits to rounding, so greedy text agrees.
    assert_eq!(together, alone);
}

#[test]
fn a_client_that_disconnects_stops_its_generation_and_frees_its_cache() {
    let s = start(|_| {});
    for stream in [true, false] {
        let cancelled0 = metric(s.addr, "kvmerger_generations_total{reason=\"cancelled\"}");
        let mut st = Stream::open(s.addr, COMPLETIONS, &long_completion(4000, stream));
        if stream {
            assert!(st.wait_for("\"text\""), "no token streamed");
        } else {
            assert!(eventually(60, || metric(
                s.addr,
                "kvmerger_kv_bytes_in_use"
            ) > 0.0));
        }
        let generated = metric(s.addr, "kvmerger_generated_tokens_total");
        drop(st);
        // The gauges can read 0 before the engine has published the request as running
        // (a token is sent mid-step), so wait for the cancellation itself too.
        let cancelled = || metric(s.addr, "kvmerger_generations_total{reason=\"cancelled\"}");
        assert!(
            eventually(30, || cancelled() == cancelled0 + 1.0
                && metric(s.addr, "kvmerger_running_requests") == 0.0
                && metric(s.addr, "kvmerger_kv_bytes_in_use") == 0.0),
            "the cache of a vanished client was not freed (stream: {stream})"
        );
        assert_eq!(cancelled(), cancelled0 + 1.0);
        // Far fewer than the 4000 asked for were generated.
        assert!(metric(s.addr, "kvmerger_generated_tokens_total") < generated + 200.0);
    }
    assert_eq!(post(s.addr, COMPLETIONS, &completion("Hi", 2)).status, 200);
}

/// The running-requests gauge counts a request from its admission: while its first
/// tokens stream, /metrics says it runs (it read 0 until a request finished).
#[test]
fn the_running_gauge_counts_a_request_while_it_generates() {
    let s = start(|_| {});
    let mut st = Stream::open(s.addr, COMPLETIONS, &long_completion(4000, true));
    assert!(st.wait_for("\"text\""), "no token streamed");
    assert_eq!(metric(s.addr, "kvmerger_running_requests"), 1.0);
    // KV bytes are published after each engine step (the first token is sent mid-step).
    assert!(eventually(30, || metric(
        s.addr,
        "kvmerger_kv_bytes_in_use"
    ) > 0.0));
    drop(st);
    assert!(eventually(30, || metric(
        s.addr,
        "kvmerger_running_requests"
    ) == 0.0));
}

#[test]
fn past_a_full_queue_requests_get_503_with_retry_after() {
    let s = start(|c| {
        c.max_batch = 1;
        c.max_queue = 1;
    });
    // One running (it fills the batch), one queued (it fills the queue).
    let mut running = Stream::open(s.addr, COMPLETIONS, &long_completion(4000, true));
    assert!(running.wait_for("\"text\""));
    let addr = s.addr;
    let queued = std::thread::spawn(move || post(addr, COMPLETIONS, &completion("Hi", 2)));
    assert!(eventually(30, || metric(addr, "kvmerger_queue_depth") == 1.0));
    let r = post(s.addr, CHAT, &chat("Hi", 2));
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.error()["code"], "server_overloaded");
    let retry: u64 = r
        .header("retry-after")
        .expect("Retry-After header")
        .parse()
        .unwrap();
    assert!(retry >= 1);
    // The running one leaves; the queued one is served.
    drop(running);
    let q = queued.join().unwrap();
    assert_eq!(q.status, 200, "{}", q.text());
}

/// The KV budget fits one uncompressed request beside another's prefill only when the
/// first is compressed: with compression two run at once, without it one at a time.
#[test]
fn compression_lets_more_requests_in_within_the_same_kv_memory() {
    let prompt = long_text(110);
    let m = 8usize;
    // Bytes per token of this model's cache, from a request's usage report.
    let per_token = {
        let s = start(|_| {});
        let u = post(s.addr, COMPLETIONS, &completion(&prompt, 1)).json()["usage"].clone();
        u["kv_cache"]["kv_bytes_full"].as_u64().unwrap() as usize
            / u["prompt_tokens"].as_u64().unwrap() as usize
    };
    let s0 = start(|_| {});
    let p = post(s0.addr, COMPLETIONS, &completion(&prompt, 1)).json()["usage"]["prompt_tokens"]
        .as_u64()
        .unwrap() as usize;
    drop(s0);
    let quarter = (p as f64 * 0.25).round() as usize;
    // Room for one compressed request (quarter + m) beside a prefill (p), not for two
    // uncompressed ones (2 (p + m)).
    let budget = (p + quarter + m + p / 8) * per_token;
    assert!(budget < 2 * (p + m) * per_token);
    let s = start(|c| c.kv_memory = budget);
    let run4 = |kv: Value| {
        let addr = s.addr;
        let prompt = &prompt;
        std::thread::scope(|sc| {
            let hs: Vec<_> = (0..4)
                .map(|_| {
                    let kv = kv.clone();
                    sc.spawn(move || {
                        let mut b = completion(prompt, m);
                        b["ignore_eos"] = json!(true);
                        b["kv_compression"] = kv;
                        post(addr, COMPLETIONS, &b)
                    })
                })
                .collect();
            for h in hs {
                let r = h.join().unwrap();
                assert_eq!(r.status, 200, "{}", r.text());
            }
        });
    };
    run4(json!("none"));
    assert_eq!(metric(s.addr, "kvmerger_running_requests_peak"), 1.0);
    run4(json!({"method": "streaming", "budget": 0.25}));
    assert!(metric(s.addr, "kvmerger_running_requests_peak") >= 2.0);
    assert!(
        metric(
            s.addr,
            "kvmerger_kv_bytes_saved_total{method=\"streaming\"}"
        ) > 0.0
    );
    assert!(metric(s.addr, "kvmerger_kv_bytes_peak") <= budget as f64);
}

#[test]
fn compression_during_prefill_serves_a_prompt_larger_than_the_kv_memory() {
    let prompt = long_text(400);
    let (p, per_token) = {
        let s = start(|_| {});
        let u = post(s.addr, COMPLETIONS, &completion(&prompt, 1)).json()["usage"].clone();
        let p = u["prompt_tokens"].as_u64().unwrap() as usize;
        (
            p,
            u["kv_cache"]["kv_bytes_full"].as_u64().unwrap() as usize / p,
        )
    };
    assert!(p > 400, "{p}");
    // Room for half the prompt's full cache: enough for 64 slots per head plus one
    // chunk of 64, never for the whole prompt.
    let budget = p / 2 * per_token;
    let s = start(|c| c.kv_memory = budget);
    let ask = |kv: Value| {
        let mut b = completion(&prompt, 4);
        b["kv_compression"] = kv;
        post(s.addr, COMPLETIONS, &b)
    };
    let r = ask(json!({"method": "streaming", "budget": 64}));
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.error()["code"], "kv_memory_exceeded");
    assert!(r.text().contains("prefill_chunk"), "{}", r.text());
    for method in ["streaming", "snapkv", "expected_attention"] {
        let r = ask(json!({"method": method, "budget": 64, "prefill_chunk": 64}));
        assert_eq!(r.status, 200, "{method}: {}", r.text());
        let u = r.json()["usage"]["kv_cache"].clone();
        let full = u["slots_full"].as_u64().unwrap();
        let kept = u["slots_kept"].as_u64().unwrap();
        assert_eq!(full % p as u64, 0, "{u}");
        let heads = full / p as u64;
        assert_eq!(kept, 64 * heads, "{method}: {u}");
        assert_eq!(
            u["kv_bytes_full"].as_u64().unwrap() as usize,
            p * per_token,
            "{u}"
        );
    }
    assert!(metric(s.addr, "kvmerger_kv_bytes_peak") <= budget as f64);
    // Recipes that cannot compress during prefill are refused before any work.
    for (kv, param) in [
        (
            json!({"method": "kvzip", "budget": 64, "prefill_chunk": 64}),
            "kv_compression.prefill_chunk",
        ),
        (
            json!({"method": "snapkv", "budget": 64, "prefill_chunk": 128}),
            "kv_compression.prefill_chunk",
        ),
        (
            json!({"method": "snapkv", "budget": 64, "prefill_chunk": 0}),
            "kv_compression.prefill_chunk",
        ),
    ] {
        let r = ask(kv.clone());
        assert_eq!(r.status, 400, "{kv}: {}", r.text());
        assert_eq!(r.error()["param"], param, "{kv}: {}", r.text());
    }
}

#[test]
fn usage_reports_slots_kept_and_kv_bytes_per_request() {
    let s = start(|_| {});
    let prompt = long_text(60);
    let full = post(s.addr, COMPLETIONS, &completion(&prompt, 4)).json()["usage"].clone();
    let mut b = completion(&prompt, 4);
    b["kv_compression"] = json!({"method": "kvmerger", "budget": 0.5});
    let half = post(s.addr, COMPLETIONS, &b).json()["usage"].clone();
    let (f, h) = (&full["kv_cache"], &half["kv_cache"]);
    assert_eq!(full["prompt_tokens"], half["prompt_tokens"]);
    assert_eq!(f["method"], "full");
    assert_eq!(f["slots_kept"], f["slots_full"]);
    assert_eq!(h["method"], "kvmerger");
    assert_eq!(h["slots_full"], f["slots_full"]);
    let kept = h["kept_fraction"].as_f64().unwrap();
    assert!((0.4..0.6).contains(&kept), "kvmerger at 0.5 kept {kept}");
    assert!(h["kv_bytes"].as_u64() < f["kv_bytes"].as_u64());
    assert_eq!(h["kv_bytes_full"], f["kv_bytes_full"]);
    assert!(h["kv_bytes_final"].as_u64() > h["kv_bytes"].as_u64());
}

#[test]
fn query_agnostic_scorers_work_per_request_kvzip_with_its_reconstruction_pass() {
    let s = start(|_| {});
    let prompt = long_text(60);
    for method in [
        "kvzip",
        "expected_attention",
        "keydiff",
        "adakv",
        "kvmerger+",
    ] {
        let mut b = completion(&prompt, 4);
        b["kv_compression"] = json!({"method": method, "budget": 0.5});
        let r = post(s.addr, COMPLETIONS, &b);
        let u = r.json()["usage"]["kv_cache"].clone();
        assert_eq!(u["method"], method, "{method}: {}", r.json());
        let kept = u["kept_fraction"].as_f64().unwrap();
        // KVzip shares one budget over all heads: the total is half, exactly.
        assert!((0.45..0.55).contains(&kept), "{method} at 0.5 kept {kept}");
    }
}

#[test]
fn the_server_default_compression_applies_unless_a_request_overrides_it() {
    let s = start(|c| {
        c.compression = kvmerger_server::Recipe::full()
            .with_request(&json!({"method": "h2o", "budget": 0.5}))
            .unwrap();
    });
    let prompt = long_text(40);
    let d = post(s.addr, COMPLETIONS, &completion(&prompt, 2)).json()["usage"]["kv_cache"].clone();
    assert_eq!(d["method"], "h2o");
    assert!(d["slots_kept"].as_u64() < d["slots_full"].as_u64());
    let mut b = completion(&prompt, 2);
    b["kv_compression"] = json!("none");
    let n = post(s.addr, COMPLETIONS, &b).json()["usage"]["kv_cache"].clone();
    assert_eq!(n["method"], "full");
    assert_eq!(n["slots_kept"], n["slots_full"]);
}

#[test]
fn a_request_past_its_time_limit_ends_with_a_timeout_error() {
    let s = start(|c| {
        c.request_timeout = Duration::from_secs(2);
        c.max_tokens_limit = 8000;
    });
    let t = Instant::now();
    let r = post(s.addr, COMPLETIONS, &long_completion(7000, false));
    assert_eq!(r.status, 504, "{}", r.text());
    assert_eq!(r.error()["code"], "timeout");
    assert!(t.elapsed() < Duration::from_secs(20));
    let st = Stream::open(s.addr, COMPLETIONS, &long_completion(7000, true));
    let r = st.finish();
    assert_eq!(r.status, 200);
    let last = r.events().last().cloned().unwrap_or_default();
    let v: Value = serde_json::from_str(&last).expect("last event is JSON");
    assert_eq!(v["error"]["code"], "timeout", "{last}");
    assert!(eventually(10, || metric(
        s.addr,
        "kvmerger_kv_bytes_in_use"
    ) == 0.0));
    assert_eq!(
        metric(s.addr, "kvmerger_generations_total{reason=\"timeout\"}"),
        2.0
    );
}

#[test]
fn shutdown_lets_running_requests_finish_and_refuses_new_ones() {
    let s = start(|_| {});
    let addr = s.addr;
    let mut st = Stream::open(addr, COMPLETIONS, &long_completion(40, true));
    assert!(st.wait_for("\"text\""));
    let stopper = std::thread::spawn(move || s.stop());
    // While shutting down: new requests are refused (503) or find the port closed.
    assert!(eventually(10, || {
        let body = completion("Hi", 2).to_string();
        match try_raw(
            addr,
            &request_bytes("POST", COMPLETIONS, &[], body.as_bytes()),
        ) {
            None => true,
            Some(r) => r.status == 503,
        }
    }));
    let r = st.finish();
    let events = r.events();
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{}",
        r.text()
    );
    assert!(r.text().contains("\"finish_reason\":\"length\""));
    stopper.join().unwrap().unwrap();
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "still listening"
    );
}

#[test]
fn health_models_and_metrics_describe_the_server() {
    let s = start(|c| c.kv_memory = 64 << 20);
    let h = get(s.addr, "/health").json();
    assert_eq!(h["status"], "ok");
    assert_eq!(h["model"], MODEL);
    let m = get(s.addr, "/v1/models").json();
    assert_eq!(m["object"], "list");
    assert_eq!(m["data"][0]["id"], MODEL);
    let methods = m["data"][0]["kv_compression"]["methods"]
        .as_array()
        .unwrap();
    assert!(methods.iter().any(|x| x == "kvmerger"));
    let r = get(s.addr, "/metrics");
    assert!(r.header("content-type").unwrap().starts_with("text/plain"));
    assert_eq!(
        metric(s.addr, "kvmerger_kv_memory_budget_bytes"),
        (64u64 << 20) as f64
    );
    for name in [
        "kvmerger_queue_depth",
        "kvmerger_kv_bytes_in_use",
        "kvmerger_kv_bytes_saved",
        "kvmerger_generated_tokens_per_second",
        "kvmerger_prompt_tokens_total",
    ] {
        assert!(r.text().contains(&format!("# TYPE {name} ")), "{name}");
    }
}
