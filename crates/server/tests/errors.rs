//! Every refusal is an OpenAI error body with the right status code, and no request,
//! however broken, stops the server from serving the next one.

mod common;

use common::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

const COMPLETIONS: &str = "/v1/completions";
const CHAT: &str = "/v1/chat/completions";

fn assert_error(r: &Resp, status: u16, code: Option<&str>, param: Option<&str>) -> Value {
    assert_eq!(r.status, status, "{}", r.text());
    let e = r.error();
    if let Some(code) = code {
        assert_eq!(e["code"], code, "{e}");
    }
    if let Some(param) = param {
        assert_eq!(e["param"], param, "{e}");
    }
    e
}

#[test]
fn malformed_json_is_a_400_invalid_json() {
    let s = start(|_| {});
    for body in [
        &b"{"[..],
        b"not json",
        b"",
        b"{\"model\": \"smollm2-135m\",}",
        b"[1, 2, 3]",
        b"\"a string\"",
        b"\xff\xfe\x00garbage",
    ] {
        for path in [COMPLETIONS, CHAT] {
            let r = request(s.addr, "POST", path, &[], body);
            let e = assert_error(&r, 400, Some("invalid_json"), None);
            assert_eq!(e["type"], "invalid_request_error");
        }
    }
}

#[test]
fn an_unknown_model_is_a_404_model_not_found() {
    let s = start(|_| {});
    let mut c = completion("Hello", 2);
    c["model"] = json!("gpt-17");
    assert_error(
        &post(s.addr, COMPLETIONS, &c),
        404,
        Some("model_not_found"),
        Some("model"),
    );
    let mut c = chat("Hello", 2);
    c["model"] = json!("gpt-17");
    assert_error(
        &post(s.addr, CHAT, &c),
        404,
        Some("model_not_found"),
        Some("model"),
    );
    assert_error(
        &get(s.addr, "/v1/models/gpt-17"),
        404,
        Some("model_not_found"),
        None,
    );
    assert_eq!(get(s.addr, &format!("/v1/models/{MODEL}")).status, 200);
}

#[test]
fn invalid_parameters_are_400s_naming_the_parameter() {
    let s = start(|c| c.max_tokens_limit = 1000);
    let with = |base: Value, k: &str, v: Value| {
        let mut b = base;
        if v.is_null() {
            b.as_object_mut().unwrap().remove(k);
        } else {
            b[k] = v;
        }
        b
    };
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            COMPLETIONS,
            with(completion("x", 2), "prompt", Value::Null),
            "prompt",
        ),
        (
            COMPLETIONS,
            with(completion("x", 2), "prompt", json!(7)),
            "prompt",
        ),
        (
            COMPLETIONS,
            with(completion("x", 2), "prompt", json!([])),
            "prompt",
        ),
        (
            COMPLETIONS,
            with(completion("x", 2), "prompt", json!([49152])),
            "prompt",
        ),
        (
            COMPLETIONS,
            with(completion("x", 2), "prompt", json!(["a", "b"])),
            "prompt",
        ),
        (
            COMPLETIONS,
            with(completion("x", 2), "max_tokens", json!(0)),
            "max_tokens",
        ),
        (
            COMPLETIONS,
            with(completion("x", 2), "max_tokens", json!(-5)),
            "max_tokens",
        ),
        (
            COMPLETIONS,
            with(completion("x", 2), "max_tokens", json!(1001)),
            "max_tokens",
        ),
        (
            COMPLETIONS,
            with(completion("x", 2), "max_tokens", json!("ten")),
            "max_tokens",
        ),
        (
            COMPLETIONS,
            with(completion("x", 2), "temperature", json!(-0.5)),
            "temperature",
        ),
        (
            COMPLETIONS,
            with(completion("x", 2), "temperature", json!(2.5)),
            "temperature",
        ),
        (
            COMPLETIONS,
            with(completion("x", 2), "top_p", json!(0)),
            "top_p",
        ),
        (
            COMPLETIONS,
            with(completion("x", 2), "top_p", json!(1.5)),
            "top_p",
        ),
        // Positive in f64 but 0 in the f32 the sampler works in.
        (
            COMPLETIONS,
            with(completion("x", 2), "top_p", json!(1e-300)),
            "top_p",
        ),
        (
            COMPLETIONS,
            with(completion("x", 2), "repetition_penalty", json!(1e-308)),
            "repetition_penalty",
        ),
        (COMPLETIONS, with(completion("x", 2), "n", json!(17)), "n"),
        (COMPLETIONS, with(completion("x", 2), "n", json!(0)), "n"),
        (
            COMPLETIONS,
            with(completion("x", 2), "echo", json!(true)),
            "echo",
        ),
        (
            COMPLETIONS,
            with(completion("x", 2), "logprobs", json!(6)),
            "logprobs",
        ),
        (
            COMPLETIONS,
            with(completion("x", 2), "logprobs", json!(true)),
            "logprobs",
        ),
        (
            CHAT,
            with(chat("x", 2), "logprobs", json!("yes")),
            "logprobs",
        ),
        (
            CHAT,
            with(chat("x", 2), "top_logprobs", json!(3)),
            "top_logprobs",
        ),
        (
            CHAT,
            with(
                with(chat("x", 2), "logprobs", json!(true)),
                "top_logprobs",
                json!(21),
            ),
            "top_logprobs",
        ),
        (
            CHAT,
            with(
                with(chat("x", 2), "logprobs", json!(true)),
                "top_logprobs",
                json!([1]),
            ),
            "top_logprobs",
        ),
        (
            COMPLETIONS,
            with(completion("x", 2), "stop", json!([1, 2])),
            "stop",
        ),
        (
            COMPLETIONS,
            with(completion("x", 2), "stream", json!("yes")),
            "stream",
        ),
        (
            COMPLETIONS,
            with(completion("x", 2), "frequency_penalty", json!(2.5)),
            "frequency_penalty",
        ),
        (
            CHAT,
            with(chat("x", 2), "presence_penalty", json!("high")),
            "presence_penalty",
        ),
        (
            CHAT,
            with(chat("x", 2), "presence_penalty", json!(-3)),
            "presence_penalty",
        ),
        (
            COMPLETIONS,
            with(completion("x", 2), "min_p", json!(2)),
            "min_p",
        ),
        (CHAT, with(chat("x", 2), "min_p", json!([0.1])), "min_p"),
        (
            COMPLETIONS,
            with(completion("x", 2), "logit_bias", json!([1, 2])),
            "logit_bias",
        ),
        (
            CHAT,
            with(chat("x", 2), "logit_bias", json!({"49152": 5})),
            "logit_bias.49152",
        ),
        (
            CHAT,
            with(chat("x", 2), "logit_bias", json!({"99999999999": 5})),
            "logit_bias.99999999999",
        ),
        (
            COMPLETIONS,
            with(completion("x", 2), "logit_bias", json!({"hello": 5})),
            "logit_bias.hello",
        ),
        (
            COMPLETIONS,
            with(completion("x", 2), "logit_bias", json!({"5": 1000})),
            "logit_bias.5",
        ),
        (
            COMPLETIONS,
            with(completion("x", 2), "logit_bias", json!({"5": null})),
            "logit_bias.5",
        ),
        (
            COMPLETIONS,
            with(
                completion("x", 2),
                "logit_bias",
                Value::Object((0..5000).map(|i| (i.to_string(), json!(1))).collect()),
            ),
            "logit_bias",
        ),
        (
            COMPLETIONS,
            with(
                completion("x", 2),
                "kv_compression",
                json!({"method": "nope", "budget": 0.5}),
            ),
            "kv_compression.method",
        ),
        (
            COMPLETIONS,
            with(
                completion("x", 2),
                "kv_compression",
                json!({"method": "kvmerger"}),
            ),
            "kv_compression.budget",
        ),
        (
            COMPLETIONS,
            with(
                completion("x", 2),
                "kv_compression",
                json!({"method": "kvmerger", "budget": 0}),
            ),
            "kv_compression.budget",
        ),
        (
            COMPLETIONS,
            with(
                completion("x", 2),
                "kv_compression",
                json!({"method": "kvmerger", "budget": 0.5, "colour": 1}),
            ),
            "kv_compression.options",
        ),
        (
            COMPLETIONS,
            with(
                completion("x", 2),
                "kv_compression",
                json!({"method": "h2o", "budget": 0.5, "schedule": [1.0, 2.0]}),
            ),
            "kv_compression.schedule",
        ),
        (
            COMPLETIONS,
            with(
                completion("x", 2),
                "kv_compression",
                json!({"method": "h2o", "budget": 0.5, "schedule": "/etc/hostname"}),
            ),
            "kv_compression.schedule",
        ),
        (
            COMPLETIONS,
            with(
                completion("x", 2),
                "kv_compression",
                json!({"method": "kvzip", "budget": 0.5, "recompress_margin": 16}),
            ),
            "kv_compression.recompress_margin",
        ),
        (
            COMPLETIONS,
            with(
                completion("x", 2),
                "kv_compression",
                json!({"method": "adakv", "budget": 0.5, "scorer": "kvmerger"}),
            ),
            "kv_compression.options",
        ),
        (CHAT, with(chat("x", 2), "messages", json!([])), "messages"),
        (
            CHAT,
            with(chat("x", 2), "messages", json!("hello")),
            "messages",
        ),
        (
            CHAT,
            with(
                chat("x", 2),
                "messages",
                json!([{"role": "wizard", "content": "x"}]),
            ),
            "messages.0.role",
        ),
        (
            CHAT,
            with(
                chat("x", 2),
                "messages",
                json!([{"role": "function", "content": "x"}]),
            ),
            "messages.0.role",
        ),
        (
            CHAT,
            with(
                chat("x", 2),
                "messages",
                json!([{"role": "user", "content": 5}]),
            ),
            "messages.0.content",
        ),
        (
            CHAT,
            with(
                chat("x", 2),
                "messages",
                json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
            ),
            "messages.0.content.0.type",
        ),
        (
            CHAT,
            with(chat("x", 2), "tools", json!([{"type": "retrieval"}])),
            "tools.0.type",
        ),
        (
            CHAT,
            with(chat("x", 2), "tool_choice", json!("required")),
            "tool_choice",
        ),
        (
            CHAT,
            with(
                chat("x", 2),
                "messages",
                json!([{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": 3}]),
            ),
            "messages.1.tool_calls",
        ),
        (
            CHAT,
            with(chat("x", 2), "continue_final_message", json!(true)),
            "continue_final_message",
        ),
        (
            CHAT,
            with(chat("x", 2), "max_completion_tokens", json!(4)),
            "max_completion_tokens",
        ),
        (
            CHAT,
            with(chat("x", 2), "response_format", json!({"type": "xml"})),
            "response_format.type",
        ),
        (
            CHAT,
            with(
                chat("x", 2),
                "response_format",
                json!({"type": "json_schema", "json_schema": {"name": "x"}}),
            ),
            "response_format.json_schema.schema",
        ),
        (CHAT, with(chat("x", 2), "model", Value::Null), "model"),
    ];
    for (path, body, param) in cases {
        let r = post(s.addr, path, &body);
        assert_eq!(r.status, 400, "{path} {body}: {}", r.text());
        let e = r.error();
        assert_eq!(e["type"], "invalid_request_error", "{body}");
        let got = e["param"].as_str().unwrap_or("");
        assert!(
            got == param || (param == "model" && e["message"].as_str().unwrap().contains("model")),
            "{path} {body}: param {got:?}, expected {param:?}: {e}"
        );
    }
}

/// Unknown fields are ignored, named in the `x-kvmerger-ignored-fields` header (and a
/// warning on stderr); `--strict-api` refuses them with a 400 naming the field.
#[test]
fn unknown_fields_are_ignored_and_named_unless_the_api_is_strict() {
    let s = start(|_| {});
    let mut c = completion("Hi", 1);
    c["colour"] = json!("blue");
    c["stream_options"] = json!({"shade": 1});
    let r = post(s.addr, COMPLETIONS, &c);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.header("x-kvmerger-ignored-fields"),
        Some("colour,stream_options.shade")
    );
    let mut ch = chat("Hi", 1);
    ch["messages"][0]["mood"] = json!("calm");
    ch["mystery"] = json!([1, 2, 3]);
    ch["stream"] = json!(true);
    let r = post(s.addr, CHAT, &ch);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.header("x-kvmerger-ignored-fields"),
        Some("mystery,messages.0.mood")
    );
    assert_eq!(r.events().last().map(String::as_str), Some("[DONE]"));
    // A request without unknown fields has no header.
    let r = post(s.addr, COMPLETIONS, &completion("Hi", 1));
    assert_eq!(r.header("x-kvmerger-ignored-fields"), None);
    // Known fields keep their checks; the header still names the unknown ones.
    let mut bad = completion("Hi", 1);
    bad["colour"] = json!(1);
    bad["temperature"] = json!("hot");
    let r = post(s.addr, COMPLETIONS, &bad);
    assert_error(&r, 400, Some("invalid_type"), Some("temperature"));
    // Thousands of unknown fields with hostile names: a bounded, printable header.
    let mut many = completion("Hi", 1);
    for i in 0..5000 {
        many[format!("f{i}\n\u{1F600},{}", "x".repeat(200))] = json!(i);
    }
    let r = post(s.addr, COMPLETIONS, &many);
    assert_eq!(r.status, 200, "{}", r.text());
    let h = r.header("x-kvmerger-ignored-fields").unwrap();
    assert!(h.len() < 2000 && h.ends_with("more"), "{h}");
    drop(s);

    let s = start(|c| c.strict_api = true);
    let mut c = completion("Hi", 1);
    c["colour"] = json!("blue");
    let e = assert_error(
        &post(s.addr, COMPLETIONS, &c),
        400,
        Some("unknown_parameter"),
        Some("colour"),
    );
    assert!(e["message"].as_str().unwrap().contains("colour"), "{e}");
    let mut ch = chat("Hi", 1);
    ch["messages"][0]["mood"] = json!("calm");
    assert_error(
        &post(s.addr, CHAT, &ch),
        400,
        Some("unknown_parameter"),
        Some("messages.0.mood"),
    );
    let ctx =
        json!({"document": "A text.", "kv_compression": {"method": "h2o", "budget": 0.5}, "x": 1});
    assert_error(
        &post(s.addr, "/v1/contexts", &ctx),
        400,
        Some("unknown_parameter"),
        Some("x"),
    );
    assert_eq!(post(s.addr, COMPLETIONS, &completion("Hi", 1)).status, 200);
}

/// Unsupported parameters are named with a readable message (no blank qualifier).
#[test]
fn unsupported_parameters_have_readable_messages() {
    let s = start(|_| {});
    let mut ch = chat("Hi", 1);
    ch["messages"] = json!([{"role": "function", "content": "x"}]);
    let e = assert_error(
        &post(s.addr, CHAT, &ch),
        400,
        Some("unsupported_parameter"),
        Some("messages.0.role"),
    );
    let m = e["message"].as_str().unwrap();
    assert!(!m.contains("  "), "{m}");
    let mut c = completion("Hi", 1);
    c["suffix"] = json!("end");
    let e = assert_error(
        &post(s.addr, COMPLETIONS, &c),
        400,
        Some("unsupported_parameter"),
        Some("suffix"),
    );
    assert!(!e["message"].as_str().unwrap().contains("  "), "{e}");
}

#[test]
fn a_prompt_longer_than_the_context_is_a_400_context_length_exceeded() {
    let s = start(|c| c.max_tokens_limit = 10_000);
    let ctx = 8192;
    let ids: Vec<u32> = (0..ctx).map(|i| 100 + (i % 1000)).collect();
    let body = json!({"model": MODEL, "prompt": ids, "max_tokens": 1});
    let e = assert_error(
        &post(s.addr, COMPLETIONS, &body),
        400,
        Some("context_length_exceeded"),
        Some("prompt"),
    );
    assert!(e["message"].as_str().unwrap().contains("8192"), "{e}");
    let long = chat(&long_text(9000), 1);
    assert_error(
        &post(s.addr, CHAT, &long),
        400,
        Some("context_length_exceeded"),
        Some("messages"),
    );
    // A short prompt but a completion that would run past the context.
    assert_error(
        &post(s.addr, COMPLETIONS, &completion("Hello", 8192)),
        400,
        Some("context_length_exceeded"),
        Some("max_tokens"),
    );
}

/// A prompt of megabytes is refused as soon as tokenizing it passes the context, not
/// after tokenizing all of it (seconds of CPU and a gigabyte per request before).
#[test]
fn a_huge_text_prompt_is_refused_without_tokenizing_all_of_it() {
    let s = start(|c| c.max_tokens_limit = 10_000);
    // About 3.5 MB of distinct made-up words, so no tokenizer cache helps.
    let mut text = String::with_capacity(3_600_000);
    let mut x = 12345u64;
    while text.len() < 3_500_000 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let n = 3 + (x >> 60) as usize;
        for k in 0..n {
            text.push((b'a' + ((x >> ((8 * k) % 64)) % 26) as u8) as char);
        }
        text.push(' ');
    }
    let t0 = std::time::Instant::now();
    let e = assert_error(
        &post(s.addr, COMPLETIONS, &completion(&text, 1)),
        400,
        Some("context_length_exceeded"),
        Some("prompt"),
    );
    let took = t0.elapsed();
    assert!(e["message"].as_str().unwrap().contains("at least"), "{e}");
    assert!(took < std::time::Duration::from_secs(5), "took {took:?}");
    let e = assert_error(
        &post(s.addr, CHAT, &chat(&text, 1)),
        400,
        Some("context_length_exceeded"),
        Some("messages"),
    );
    assert!(e["message"].as_str().unwrap().contains("8192"), "{e}");
}

/// Compression settings that cannot bring this prompt to its budget (a window or sinks
/// above it, kvmerger's protected shares over it) are a 400 before the prefill, not a
/// 500 after it.
#[test]
fn compression_settings_the_prompt_cannot_meet_are_refused_before_prefill() {
    let s = start(|_| {});
    let prompt = long_text(300);
    let with = |mut base: Value, k: &str, v: Value| {
        base[k] = v;
        base
    };
    for kv in [
        json!({"method": "snapkv", "budget": 0.5, "options": {"window": 100000}}),
        json!({"method": "streaming", "budget": 0.5, "options": {"sinks": 1000}}),
        json!({"method": "kvmerger", "budget": 0.5, "options": {"recent": 0.5, "heavy": 0.4}}),
    ] {
        let body = with(completion(&prompt, 2), "kv_compression", kv.clone());
        let e = assert_error(
            &post(s.addr, COMPLETIONS, &body),
            400,
            None,
            Some("kv_compression"),
        );
        let msg = e["message"].as_str().unwrap();
        assert!(msg.contains("budget"), "{kv}: {msg}");
    }
    // The same settings on a budget they fit are served.
    let ok = with(
        completion(&prompt, 2),
        "kv_compression",
        json!({"method": "snapkv", "budget": 0.5, "options": {"window": 16}}),
    );
    assert_eq!(post(s.addr, COMPLETIONS, &ok).status, 200);
}

#[test]
fn a_request_that_can_never_fit_the_kv_memory_is_refused_at_once() {
    let s = start(|c| c.kv_memory = 1 << 20);
    let e = assert_error(
        &post(s.addr, COMPLETIONS, &completion(&long_text(200), 16)),
        400,
        Some("kv_memory_exceeded"),
        Some("prompt"),
    );
    assert!(e["message"].as_str().unwrap().contains("MiB"), "{e}");
}

#[test]
fn a_body_over_the_limit_is_a_413() {
    let s = start(|c| c.max_body_bytes = 2000);
    let r = post(s.addr, COMPLETIONS, &completion(&"word ".repeat(1000), 2));
    assert_error(&r, 413, Some("request_too_large"), None);
    assert_eq!(post(s.addr, COMPLETIONS, &completion("Hi", 1)).status, 200);
}

#[test]
fn the_api_key_is_required_everywhere_but_health() {
    let s = start(|c| c.api_key = Some("sekret".into()));
    for (path, method) in [
        ("/v1/models", "GET"),
        ("/metrics", "GET"),
        (COMPLETIONS, "POST"),
    ] {
        for auth in [None, Some("Bearer wrong"), Some("sekret"), Some("Bearer ")] {
            let headers: Vec<(&str, &str)> =
                auth.map(|a| ("Authorization", a)).into_iter().collect();
            let body = completion("Hi", 1).to_string();
            let r = request(s.addr, method, path, &headers, body.as_bytes());
            assert_error(&r, 401, Some("invalid_api_key"), None);
        }
    }
    assert_eq!(get(s.addr, "/health").status, 200);
    let ok = request(
        s.addr,
        "GET",
        "/v1/models",
        &[("Authorization", "Bearer sekret")],
        b"",
    );
    assert_eq!(ok.status, 200);
    assert_eq!(ok.json()["data"][0]["id"], MODEL);
}

#[test]
fn unknown_routes_and_methods_are_openai_errors() {
    let s = start(|_| {});
    assert_error(&get(s.addr, "/v2/anything"), 404, Some("unknown_url"), None);
    assert_error(
        &get(s.addr, COMPLETIONS),
        405,
        Some("method_not_allowed"),
        None,
    );
    assert_error(
        &request(s.addr, "DELETE", "/v1/models", &[], b""),
        405,
        Some("method_not_allowed"),
        None,
    );
}

/// A valid body to mutate, with lengths small enough that any valid mutation is quick.
fn base(rng: &mut ChaCha8Rng) -> (&'static str, Value) {
    if rng.gen_bool(0.5) {
        (
            COMPLETIONS,
            json!({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 2, "temperature": 0}),
        )
    } else {
        (
            CHAT,
            json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}),
        )
    }
}

fn random_value(rng: &mut ChaCha8Rng, depth: usize) -> Value {
    match rng.gen_range(0..10) {
        0 => Value::Null,
        1 => json!(rng.gen_bool(0.5)),
        2 => json!(rng.gen_range(-3i64..10)),
        3 => json!(rng.gen::<i64>()),
        4 => json!(rng.gen_range(-2.0f64..3.0)),
        5 => json!(
            [
                "",
                "none",
                "kvmerger",
                "0.5",
                "35%",
                "\u{0}",
                "é\u{1F600}",
                "user"
            ][rng.gen_range(0..8)]
        ),
        6 => json!((0..rng.gen_range(0..40))
            .map(|_| char::from_u32(rng.gen_range(0..0x11000)).unwrap_or('?'))
            .collect::<String>()),
        7 if depth < 3 => Value::Array(
            (0..rng.gen_range(0..4))
                .map(|_| random_value(rng, depth + 1))
                .collect(),
        ),
        8 if depth < 3 => {
            let keys = [
                "method", "budget", "role", "content", "type", "text", "x", "options", "epsilon",
            ];
            let mut m = serde_json::Map::new();
            for _ in 0..rng.gen_range(0..4) {
                m.insert(
                    keys[rng.gen_range(0..keys.len())].into(),
                    random_value(rng, depth + 1),
                );
            }
            Value::Object(m)
        }
        _ => json!(rng.gen_range(0u64..100_000)),
    }
}

fn random_body(rng: &mut ChaCha8Rng) -> (&'static str, Vec<u8>) {
    let (path, mut v) = base(rng);
    let fields = [
        "model",
        "prompt",
        "messages",
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "n",
        "stream",
        "stop",
        "seed",
        "stream_options",
        "kv_compression",
        "logprobs",
        "top_logprobs",
        "echo",
        "repetition_penalty",
        "presence_penalty",
        "frequency_penalty",
        "min_p",
        "logit_bias",
        "ignore_eos",
        "max_completion_tokens",
        "response_format",
        "tools",
        "tool_choice",
        "continue_final_message",
        "add_generation_prompt",
        "user",
        "zzz",
    ];
    let body = match rng.gen_range(0..7) {
        // Random bytes.
        0 => (0..rng.gen_range(0..300)).map(|_| rng.gen()).collect(),
        // A valid body cut short.
        1 => {
            let t = v.to_string().into_bytes();
            let cut = rng.gen_range(0..t.len());
            t[..cut].to_vec()
        }
        // Deep nesting (past serde_json's recursion limit).
        2 => {
            let d = rng.gen_range(100..5000);
            format!("{}{}", "[".repeat(d), "]".repeat(d)).into_bytes()
        }
        // Numbers JSON cannot hold, and duplicate keys.
        3 => format!(
            "{{\"model\": \"{MODEL}\", \"prompt\": \"x\", \"max_tokens\": {}, \"max_tokens\": 1}}",
            ["1e400", "-0", "18446744073709551616", "1.5", "NaN"][rng.gen_range(0..5)]
        )
        .into_bytes(),
        // One to three fields set to random values.
        _ => {
            for _ in 0..rng.gen_range(1..4) {
                let f = fields[rng.gen_range(0..fields.len())];
                v[f] = random_value(rng, 0);
            }
            // Keep any valid mutation cheap: the server caps max_tokens at 8 anyway.
            v.to_string().into_bytes()
        }
    };
    (path, body)
}

#[test]
fn random_and_malformed_bodies_never_break_the_server() {
    let s = start(|c| {
        c.max_tokens_limit = 8;
        c.default_max_tokens = 4;
        c.request_timeout = std::time::Duration::from_secs(30);
    });
    let mut rng = ChaCha8Rng::seed_from_u64(20240801);
    let mut statuses = std::collections::BTreeMap::new();
    for i in 0..400 {
        let (path, body) = random_body(&mut rng);
        let r = request(s.addr, "POST", path, &[], &body);
        *statuses.entry(r.status).or_insert(0) += 1;
        assert!(
            r.status < 500,
            "body {i} got {}: {} (body: {})",
            r.status,
            r.text(),
            String::from_utf8_lossy(&body)
        );
        if r.status == 200 {
            let streamed = r
                .header("content-type")
                .is_some_and(|c| c.starts_with("text/event-stream"));
            if streamed {
                assert_eq!(
                    r.events().last().map(String::as_str),
                    Some("[DONE]"),
                    "{}",
                    r.text()
                );
            } else {
                assert!(r.json()["choices"][0].is_object(), "{}", r.text());
            }
        } else {
            r.error();
        }
    }
    // Broken HTTP, not just broken JSON.
    for junk in [
        &b"GARBAGE\r\n\r\n"[..],
        b"POST /v1/completions HTTP/1.1\r\nContent-Length: 99999\r\n\r\n{",
        b"POST /v1/completions HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        b"POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ] {
        let mut sock = connect(s.addr);
        sock.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        use std::io::{Read, Write};
        let _ = sock.write_all(junk);
        let _ = sock.shutdown(std::net::Shutdown::Write);
        let mut sink = Vec::new();
        let _ = sock.read_to_end(&mut sink);
    }
    eprintln!("statuses: {statuses:?}");
    assert!(
        statuses.get(&200).copied().unwrap_or(0) > 0,
        "some mutations are valid"
    );
    assert!(
        statuses.get(&400).copied().unwrap_or(0) > 100,
        "{statuses:?}"
    );
    assert_eq!(get(s.addr, "/health").json()["status"], "ok");
    let r = post(
        s.addr,
        COMPLETIONS,
        &completion("The capital of France is", 3),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(!r.json()["choices"][0]["text"].as_str().unwrap().is_empty());
    assert!(eventually(5, || metric(
        s.addr,
        "kvmerger_running_requests"
    ) == 0.0
        && metric(s.addr, "kvmerger_kv_bytes_in_use") == 0.0));
}
