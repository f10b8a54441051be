//! `POST /tokenize` and `/detokenize` in llama-server's and vLLM's shapes, and their
//! refusals.

mod common;

use common::*;
use serde_json::json;

#[test]
fn tokenize_and_detokenize_round_trip_in_both_shapes() {
    let s = start(|_| {});
    // llama-server's shape.
    let r = post(
        s.addr,
        "/tokenize",
        &json!({"content": "Hello world, again."}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let tokens = v["tokens"].as_array().unwrap().clone();
    assert!(!tokens.is_empty());
    assert_eq!(v["count"], tokens.len());
    assert_eq!(v["max_model_len"], 8192);
    let r = post(s.addr, "/detokenize", &json!({"tokens": tokens}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["content"], "Hello world, again.");
    assert_eq!(r.json()["prompt"], "Hello world, again.");
    // vLLM's shape, with the model named; the same ids as the completion prompt uses.
    let r = post(
        s.addr,
        "/tokenize",
        &json!({"model": MODEL, "prompt": "Hello world, again.", "add_special_tokens": false}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["tokens"].as_array().unwrap(), &tokens);
    // Control tokens written in the text are single tokens.
    let r = post(s.addr, "/tokenize", &json!({"content": "<|im_start|>"}));
    assert_eq!(r.json()["count"], 1, "{}", r.text());
    let r = post(s.addr, "/detokenize", &json!({"tokens": []}));
    assert_eq!(r.json()["content"], "");
}

#[test]
fn bad_tokenize_and_detokenize_requests_are_400s_naming_the_field() {
    let s = start(|c| c.max_body_bytes = 1 << 20);
    let cases = [
        ("/tokenize", json!({}), "content"),
        (
            "/tokenize",
            json!({"content": "a", "prompt": "b"}),
            "content",
        ),
        ("/tokenize", json!({"content": 5}), "content"),
        ("/tokenize", json!({"prompt": ["a"]}), "prompt"),
        (
            "/tokenize",
            json!({"content": "a", "add_special": "yes"}),
            "add_special",
        ),
        ("/detokenize", json!({}), "tokens"),
        ("/detokenize", json!({"tokens": "1 2"}), "tokens"),
        ("/detokenize", json!({"tokens": [1, 49152]}), "tokens.1"),
        ("/detokenize", json!({"tokens": [-1]}), "tokens.0"),
        ("/detokenize", json!({"tokens": [1.5]}), "tokens.0"),
        ("/detokenize", json!({"tokens": [[1]]}), "tokens.0"),
        (
            "/detokenize",
            json!({"tokens": [18446744073709551615u64]}),
            "tokens.0",
        ),
    ];
    for (path, body, param) in cases {
        let r = post(s.addr, path, &body);
        assert_eq!(r.status, 400, "{path} {body}: {}", r.text());
        let e = r.error();
        assert_eq!(e["param"], param, "{path} {body}: {e}");
    }
    let e = post(s.addr, "/detokenize", &json!({"tokens": [49152]})).error();
    assert!(e["message"].as_str().unwrap().contains("49152"), "{e}");
    let r = post(
        s.addr,
        "/tokenize",
        &json!({"model": "gpt-17", "content": "a"}),
    );
    assert_eq!(r.status, 404);
    // A text of more tokens than the context, within the body limit.
    let r = post(s.addr, "/tokenize", &json!({"content": long_text(20_000)}));
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.error()["code"], "context_length_exceeded");
    // A body over the limit, of either kind.
    let r = post(
        s.addr,
        "/tokenize",
        &json!({"content": "word ".repeat(300_000)}),
    );
    assert_eq!(r.status, 413);
    let ids: Vec<u32> = vec![7; 600_000];
    let r = post(s.addr, "/detokenize", &json!({"tokens": ids}));
    assert_eq!(r.status, 413);
    // A large array inside the limit is fine.
    let ids: Vec<u32> = vec![7; 100_000];
    let r = post(s.addr, "/detokenize", &json!({"tokens": ids}));
    assert_eq!(r.status, 200);
    // Wrong methods and the server still answering.
    assert_eq!(get(s.addr, "/tokenize").status, 405);
    assert_eq!(get(s.addr, "/health").json()["status"], "ok");
}

#[test]
fn tokenize_needs_the_api_key_when_one_is_set() {
    let s = start(|c| c.api_key = Some("k".into()));
    let r = post(s.addr, "/tokenize", &json!({"content": "a"}));
    assert_eq!(r.status, 401);
    let r = request(
        s.addr,
        "POST",
        "/tokenize",
        &[("Authorization", "Bearer k")],
        json!({"content": "a"}).to_string().as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
}
