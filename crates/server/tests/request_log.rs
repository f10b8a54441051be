//! One log line per finished request (text or JSON), with what an operator needs:
//! id, model, method and kept share, prompt and cached tokens, time to first token,
//! tokens/s and status; refusals and vanished clients included.

mod common;

use common::*;
use kvmerger_server::log::{LogFormat, Logger};
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};

const CHAT: &str = "/v1/chat/completions";
const COMPLETIONS: &str = "/v1/completions";

fn lines(buf: &Arc<Mutex<Vec<String>>>) -> Vec<String> {
    buf.lock().unwrap().clone()
}

/// The JSON request lines logged so far.
fn requests(buf: &Arc<Mutex<Vec<String>>>) -> Vec<Value> {
    lines(buf)
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .filter(|v| v["event"] == "request")
        .collect()
}

#[test]
fn json_request_lines_carry_the_request_story() {
    let (log, buf) = Logger::capturing(LogFormat::Json);
    let s = start(|c| c.log = log);
    // A compressed chat, streamed, then the same again (its prompt cached).
    let mut body = chat("What does the miller keep?", 5);
    body["messages"] = json!([
        {"role": "system", "content": long_text(200)},
        {"role": "user", "content": "What does the miller keep?"},
    ]);
    body["kv_compression"] = json!({"method": "kvmerger", "budget": 0.5, "protocol": "agnostic"});
    body["stream"] = json!(true);
    for _ in 0..2 {
        let r = post(s.addr, CHAT, &body);
        assert_eq!(r.events().last().map(String::as_str), Some("[DONE]"));
    }
    assert!(
        eventually(10, || requests(&buf).len() == 2),
        "{:?}",
        lines(&buf)
    );
    let r = requests(&buf);
    let first = &r[0];
    assert_eq!(first["level"], "info");
    assert_eq!(first["endpoint"], "chat");
    assert_eq!(first["model"], MODEL);
    assert_eq!(first["status"], 200);
    assert!(
        first["id"].as_str().unwrap().starts_with("chatcmpl-"),
        "{first}"
    );
    assert_eq!(first["method"], "kvmerger");
    let kept = first["kept"].as_f64().unwrap();
    assert!((0.3..0.7).contains(&kept), "{first}");
    assert!(first["prompt_tokens"].as_u64().unwrap() > 200, "{first}");
    assert_eq!(first["cached_tokens"], 0);
    assert_eq!(first["completion_tokens"], 5);
    assert!(first["ttft_ms"].as_f64().unwrap() > 0.0, "{first}");
    assert!(first["tokens_per_s"].as_f64().unwrap() > 0.0, "{first}");
    assert!(first["duration_ms"].as_f64().unwrap() >= first["ttft_ms"].as_f64().unwrap());
    assert_eq!(first["finish_reason"], "length");
    assert!(r[1]["cached_tokens"].as_u64().unwrap() > 0, "{}", r[1]);
    assert!(r[0]["ts"].as_f64().unwrap() > 1.6e9);

    // A refusal: status and the field at fault, no id (it never ran).
    let mut bad = completion("Hi", 2);
    bad["temperature"] = json!(9);
    bad["mystery"] = json!(1);
    assert_eq!(post(s.addr, COMPLETIONS, &bad).status, 400);
    assert!(eventually(5, || requests(&buf).len() == 3));
    let refused = &requests(&buf)[2];
    assert_eq!(refused["status"], 400, "{refused}");
    assert_eq!(refused["level"], "warn");
    assert_eq!(refused["param"], "temperature");
    assert_eq!(refused["ignored_fields"], 1);
    assert!(refused.get("id").is_none(), "{refused}");
    // The ignored-fields warning is a JSON line too.
    assert!(lines(&buf).iter().any(|l| {
        let v: Value = serde_json::from_str(l).unwrap();
        v["level"] == "warn" && v["fields"] == "mystery"
    }));

    // A client that goes away mid-stream: its line says cancelled.
    let mut st = Stream::open(
        s.addr,
        COMPLETIONS,
        &json!({"model": MODEL, "prompt": "Count:", "max_tokens": 200, "stream": true,
                "ignore_eos": true, "temperature": 0}),
    );
    assert!(st.wait_for("data: {"));
    drop(st);
    assert!(
        eventually(20, || requests(&buf).len() == 4),
        "{:?}",
        lines(&buf)
    );
    let gone = &requests(&buf)[3];
    assert_eq!(gone["status"], "cancelled", "{gone}");
    assert_eq!(gone["endpoint"], "completions");
}

#[test]
fn text_request_lines_are_key_value() {
    let (log, buf) = Logger::capturing(LogFormat::Text);
    let s = start(|c| c.log = log);
    let r = post(
        s.addr,
        COMPLETIONS,
        &completion("The capital of France is", 3),
    );
    assert_eq!(r.status, 200);
    assert!(eventually(5, || !lines(&buf).is_empty()));
    let l = lines(&buf)[0].clone();
    assert!(l.starts_with("kvmerger: request id=cmpl-"), "{l}");
    for k in [
        " endpoint=completions",
        " model=smollm2-135m",
        " status=200",
        " method=full",
        " kept=1",
        " prompt_tokens=",
        " cached_tokens=0",
        " completion_tokens=3",
        " ttft_ms=",
        " tokens_per_s=",
        " finish_reason=length",
    ] {
        assert!(l.contains(k), "{k} in {l}");
    }
    assert!(!l.contains('\n') && !l.contains("error="), "{l}");
}
