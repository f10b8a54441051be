//! Sampler settings over HTTP: `logit_bias` (greedy included), `min_p`, presence and
//! frequency penalties, on both endpoints.

mod common;

use common::*;
use serde_json::{json, Value};

fn token_id(addr: std::net::SocketAddr, text: &str) -> u64 {
    let r = post(addr, "/tokenize", &json!({"content": text}));
    let t = r.json()["tokens"].as_array().unwrap().clone();
    assert_eq!(t.len(), 1, "{text} is one token: {t:?}");
    t[0].as_u64().unwrap()
}

fn text(r: &Resp) -> String {
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let c = &v["choices"][0];
    c["text"]
        .as_str()
        .or(c["message"]["content"].as_str())
        .unwrap()
        .to_string()
}

#[test]
fn greedy_decoding_honours_logit_bias() {
    let s = start(|_| {});
    let id = token_id(s.addr, " banana");
    let mut c = completion("The capital of France is", 3);
    c["logit_bias"] = json!({ id.to_string(): 100 });
    assert_eq!(
        text(&post(s.addr, "/v1/completions", &c)),
        " banana banana banana"
    );
    let mut ch = chat("Say hello.", 2);
    ch["logit_bias"] = json!({ id.to_string(): 100 });
    assert_eq!(
        text(&post(s.addr, "/v1/chat/completions", &ch)),
        " banana banana"
    );
    // A bias of -100 on the greedy choice moves it.
    let plain = text(&post(
        s.addr,
        "/v1/completions",
        &completion("The capital of France is", 1),
    ));
    let first = token_id(s.addr, &plain);
    let mut c = completion("The capital of France is", 1);
    c["logit_bias"] = json!({ first.to_string(): -100 });
    assert_ne!(text(&post(s.addr, "/v1/completions", &c)), plain);
    // Sampled, the bias holds too.
    let mut c = completion("The capital of France is", 4);
    c["temperature"] = json!(1.2);
    c["seed"] = json!(9);
    c["logit_bias"] = json!({ id.to_string(): 100 });
    assert_eq!(
        text(&post(s.addr, "/v1/completions", &c)),
        " banana banana banana banana"
    );
}

#[test]
fn penalties_and_min_p_are_applied() {
    let s = start(|_| {});
    let prompt = "one one one one one one one one one one";
    let base = text(&post(s.addr, "/v1/completions", &completion(prompt, 8)));
    let mut c = completion(prompt, 8);
    c["frequency_penalty"] = json!(2);
    c["presence_penalty"] = json!(2);
    let penalised = text(&post(s.addr, "/v1/completions", &c));
    assert_ne!(
        base, penalised,
        "the penalties change a repetitive greedy answer"
    );
    // min_p = 1 keeps only the most likely token: sampling at any temperature is greedy.
    let mut c = completion("The capital of France is", 6);
    c["temperature"] = json!(2);
    c["min_p"] = json!(1);
    c["seed"] = json!(3);
    let greedy = text(&post(
        s.addr,
        "/v1/completions",
        &completion("The capital of France is", 6),
    ));
    assert_eq!(text(&post(s.addr, "/v1/completions", &c)), greedy);
    // Streamed chat with all of them at once.
    let mut ch = chat("Hi", 3);
    for (k, v) in [
        ("min_p", json!(0.05)),
        ("presence_penalty", json!(-1.5)),
        ("frequency_penalty", json!(0.5)),
        ("logit_bias", json!({"5": -3.5})),
        ("stream", json!(true)),
        ("temperature", json!(0.7)),
    ] {
        ch[k] = v;
    }
    let r = post(s.addr, "/v1/chat/completions", &ch);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.events().last().map(String::as_str), Some("[DONE]"));
    let _: Value = serde_json::from_str(&r.events()[0]).unwrap();
}
