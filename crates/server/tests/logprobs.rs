//! `logprobs` / `top_logprobs` in OpenAI's shapes, streamed and not, for chat and
//! completions.

mod common;

use common::*;
use serde_json::{json, Value};

const CHAT: &str = "/v1/chat/completions";
const COMPLETIONS: &str = "/v1/completions";

fn ok(r: &Resp) -> Value {
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

/// The chunks of a stream, parsed (without `[DONE]`).
fn chunks(r: &Resp) -> Vec<Value> {
    assert_eq!(r.status, 200, "{}", r.text());
    let ev = r.events();
    assert_eq!(ev.last().map(String::as_str), Some("[DONE]"));
    ev[..ev.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect()
}

/// Equal JSON, but numbers only within 1e-2: a request that reuses a cached prefix
/// computes the same logits along another path (batching, the cache's precision).
fn assert_close(a: &Value, b: &Value) {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            assert!((x - y).abs() < 1e-2, "{x} vs {y}");
        }
        (Value::Array(x), Value::Array(y)) => {
            assert_eq!(x.len(), y.len(), "{a} vs {b}");
            x.iter().zip(y).for_each(|(x, y)| assert_close(x, y));
        }
        (Value::Object(x), Value::Object(y)) => {
            assert_eq!(x.keys().collect::<Vec<_>>(), y.keys().collect::<Vec<_>>());
            x.iter().for_each(|(k, v)| assert_close(v, &y[k]));
        }
        _ => assert_eq!(a, b),
    }
}

#[test]
fn chat_logprobs_in_openai_shape_streamed_or_not() {
    let s = start(|_| {});
    let mut body = chat("Name three colours.", 8);
    body["logprobs"] = json!(true);
    body["top_logprobs"] = json!(3);
    let v = ok(&post(s.addr, CHAT, &body));
    let choice = &v["choices"][0];
    let content = choice["logprobs"]["content"].as_array().unwrap();
    assert_eq!(
        content.len() as u64,
        v["usage"]["completion_tokens"].as_u64().unwrap()
    );
    let mut joined = Vec::new();
    for t in content {
        let lp = t["logprob"].as_f64().unwrap();
        assert!(lp <= 0.0, "{t}");
        let top = t["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3, "{t}");
        // Greedy: the chosen token is the most likely one.
        assert_eq!(top[0]["token"], t["token"], "{t}");
        assert!((top[0]["logprob"].as_f64().unwrap() - lp).abs() < 1e-6);
        let ps: Vec<f64> = top.iter().map(|x| x["logprob"].as_f64().unwrap()).collect();
        assert!(ps.windows(2).all(|w| w[0] >= w[1]), "{ps:?}");
        assert!(
            ps.iter().map(|p| p.exp()).sum::<f64>() <= 1.0 + 1e-6,
            "{ps:?}"
        );
        joined.extend(
            t["bytes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b.as_u64().unwrap() as u8),
        );
    }
    assert_eq!(
        String::from_utf8(joined).unwrap(),
        choice["message"]["content"].as_str().unwrap()
    );
    // Without logprobs: null, as before.
    let v = ok(&post(s.addr, CHAT, &chat("Name three colours.", 2)));
    assert!(v["choices"][0]["logprobs"].is_null());

    // Streamed: the same tokens, spread over the chunks that carry their text.
    body["stream"] = json!(true);
    let streamed: Vec<Value> = chunks(&post(s.addr, CHAT, &body))
        .iter()
        .filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array().cloned())
        .flatten()
        .collect();
    assert_close(&Value::Array(streamed), &Value::Array(content.clone()));
}

#[test]
fn completion_logprobs_in_openai_shape_streamed_or_not() {
    let s = start(|_| {});
    let mut body = completion("The capital of France is", 6);
    body["logprobs"] = json!(2);
    let v = ok(&post(s.addr, COMPLETIONS, &body));
    let choice = &v["choices"][0];
    let lp = &choice["logprobs"];
    let tokens: Vec<&str> = lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(tokens.len(), 6);
    assert_eq!(tokens.concat(), choice["text"].as_str().unwrap());
    let offsets: Vec<u64> = lp["text_offset"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_u64().unwrap())
        .collect();
    assert_eq!(offsets[0], 0);
    for i in 1..6 {
        assert_eq!(
            offsets[i],
            offsets[i - 1] + tokens[i - 1].chars().count() as u64
        );
    }
    for (i, top) in lp["top_logprobs"].as_array().unwrap().iter().enumerate() {
        let top = top.as_object().unwrap();
        assert!(!top.is_empty() && top.len() <= 2, "{top:?}");
        // Greedy: the chosen token is among the top and has the largest log-probability.
        let best = top
            .values()
            .map(|x| x.as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        let chosen = lp["token_logprobs"][i].as_f64().unwrap();
        assert!((best - chosen).abs() < 1e-6, "{top:?} {chosen}");
        assert!(top.contains_key(tokens[i]));
    }
    // logprobs: 0 gives the chosen tokens' log-probabilities and no alternatives.
    body["logprobs"] = json!(0);
    let v0 = ok(&post(s.addr, COMPLETIONS, &body));
    assert_close(
        &v0["choices"][0]["logprobs"]["token_logprobs"],
        &lp["token_logprobs"],
    );
    assert!(v0["choices"][0]["logprobs"]["top_logprobs"][0]
        .as_object()
        .unwrap()
        .is_empty());

    // Streamed: the chunks' lists concatenate to the whole, offsets included.
    body["logprobs"] = json!(2);
    body["stream"] = json!(true);
    let mut got =
        json!({"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []});
    for c in chunks(&post(s.addr, COMPLETIONS, &body)) {
        let l = &c["choices"][0]["logprobs"];
        if l.is_null() {
            continue;
        }
        for k in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
            let more = l[k].as_array().unwrap().clone();
            got[k].as_array_mut().unwrap().extend(more);
        }
    }
    assert_close(&got, lp);
}

#[test]
fn sampled_logprobs_follow_temperature_and_bias() {
    let s = start(|_| {});
    // A token forced by logit_bias has probability about 1.
    let id = post(s.addr, "/tokenize", &json!({"content": " banana"})).json()["tokens"][0].clone();
    let mut body = chat("Hi", 3);
    body["logprobs"] = json!(true);
    body["logit_bias"] = json!({ id.to_string(): 100 });
    let v = ok(&post(s.addr, CHAT, &body));
    for t in v["choices"][0]["logprobs"]["content"].as_array().unwrap() {
        assert_eq!(t["token"], " banana");
        assert!(t["logprob"].as_f64().unwrap() > -1e-3, "{t}");
        assert_eq!(t["top_logprobs"], json!([]));
    }
    // Sampled at a temperature: valid log-probabilities, alternatives sorted.
    let mut body = completion("Once upon a time", 8);
    body["temperature"] = json!(1.3);
    body["seed"] = json!(4);
    body["logprobs"] = json!(5);
    let v = ok(&post(s.addr, COMPLETIONS, &body));
    let lp = &v["choices"][0]["logprobs"];
    for (i, top) in lp["top_logprobs"].as_array().unwrap().iter().enumerate() {
        let chosen = lp["token_logprobs"][i].as_f64().unwrap();
        let sum: f64 = top
            .as_object()
            .unwrap()
            .values()
            .map(|x| x.as_f64().unwrap().exp())
            .sum();
        assert!(chosen <= 0.0 && sum <= 1.0 + 1e-6, "{chosen} {sum}");
    }
}
