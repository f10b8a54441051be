//! The server as the official `openai` Python package sees it: completions and chat,
//! streamed and not, with and without compression, and its error classes.
//!
//! Needs python3 with the `openai` package (pinned in scripts/requirements-reference.txt,
//! which scripts/test installs). Missing either is a failure with a message, not a skip.

mod common;

use common::*;
use serde_json::{json, Value};
use std::process::Command;

const KEY: &str = "test-key-123";

fn run_client() -> Value {
    let s = start(|c| c.api_key = Some(KEY.into()));
    run_script("openai_client.py", &s, MODEL, &[KEY])
}

fn run_script(name: &str, s: &kvmerger_server::RunningServer, model: &str, args: &[&str]) -> Value {
    let script = format!("{}/tests/{name}", env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("python3")
        .arg(script)
        .arg(format!("http://{}/v1", s.addr))
        .arg(model)
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("could not run python3 ({e}): install Python 3 and `pip install -r scripts/requirements-reference.txt`")
        });
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the openai client script failed ({}):\n{stderr}",
        out.status
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("script output is not JSON ({e}): {stdout}\n{stderr}"))
}

#[test]
fn the_official_openai_client_works_against_the_server() {
    let o = run_client();
    eprintln!("openai {}", o["openai_version"]);
    assert_eq!(o["models"], serde_json::json!([MODEL]));

    // Completions: streamed text equals the non-streamed text (greedy), with usage.
    for (plain, streamed) in [
        ("completion", "completion_stream"),
        ("completion_kv", "completion_stream_kv"),
    ] {
        let (p, s) = (&o[plain], &o[streamed]);
        assert_eq!(o[plain]["object"], "text_completion");
        assert!(!p["text"].as_str().unwrap().is_empty(), "{p}");
        assert_eq!(p["text"], s["text"], "{plain} vs {streamed}");
        assert_eq!(p["finish_reason"], s["finish_reason"]);
        assert_eq!(p["completion_tokens"], s["completion_tokens"]);
        assert!(s["chunks"].as_u64().unwrap() > 2, "{s}");
        assert!(p["prompt_tokens"].as_u64().unwrap() > 100);
    }
    // Chat: the same, plus the assistant role announced once at the start of a stream.
    for (plain, streamed) in [("chat", "chat_stream"), ("chat_kv", "chat_stream_kv")] {
        let (p, s) = (&o[plain], &o[streamed]);
        assert_eq!(p["object"], "chat.completion");
        assert_eq!(p["role"], "assistant");
        assert!(!p["content"].as_str().unwrap().is_empty(), "{p}");
        assert_eq!(p["content"], s["content"], "{plain} vs {streamed}");
        assert_eq!(s["roles"], serde_json::json!(["assistant"]));
        assert_eq!(p["completion_tokens"], s["completion_tokens"]);
    }
    // Compression reaches the engine through extra_body and is reported in usage.
    for name in [
        "completion",
        "completion_stream",
        "chat",
        "chat_stream",
        "completion_kv",
        "completion_stream_kv",
        "chat_kv",
        "chat_stream_kv",
    ] {
        let kv = &o[name]["kv_cache"];
        let (kept, full) = (
            kv["slots_kept"].as_u64().unwrap(),
            kv["slots_full"].as_u64().unwrap(),
        );
        let (bytes, bytes_full) = (
            kv["kv_bytes"].as_u64().unwrap(),
            kv["kv_bytes_full"].as_u64().unwrap(),
        );
        if name.ends_with("_kv") {
            assert_eq!(kv["method"], "kvmerger", "{name}");
            assert!(kept < full && bytes < bytes_full, "{name}: {kv}");
            let f = kv["kept_fraction"].as_f64().unwrap();
            assert!((0.4..0.6).contains(&f), "{name}: kept {f}");
        } else {
            assert_eq!(kv["method"], "full", "{name}");
            assert!(kept == full && bytes == bytes_full, "{name}: {kv}");
        }
    }
    // Stop strings cut the text before the stop; seeded sampling repeats.
    assert_eq!(o["stop"]["finish_reason"], "stop");
    assert!(!o["stop"]["text"].as_str().unwrap().contains(" 7"));
    assert_eq!(o["seeded_equal"], true);
    // Log-probabilities: one per token, below 0, the greedy choice the most likely.
    let c = &o["chat_logprobs"];
    let tokens: Vec<&str> = c["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(tokens.concat(), c["content"].as_str().unwrap(), "{c}");
    for (lp, top) in c["logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .zip(c["top"].as_array().unwrap())
    {
        let lp = lp.as_f64().unwrap();
        assert!(lp <= 0.0, "{c}");
        assert_eq!(top.as_array().unwrap().len(), 2, "{c}");
        assert!((top[0].as_f64().unwrap() - lp).abs() < 1e-6, "{c}");
        // Alternatives are a distribution's most likely tokens: probabilities that
        // fall and sum to at most 1.
        let tops: Vec<f64> = top
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert!(tops.windows(2).all(|w| w[0] >= w[1]), "{c}");
        let mass: f64 = tops.iter().map(|x| x.exp()).sum();
        assert!(mass <= 1.0 + 1e-5, "{c}");
    }
    let p = &o["completion_logprobs"];
    assert_eq!(p["tokens"].as_array().unwrap().len(), 4, "{p}");
    assert_eq!(p["top"], serde_json::json!([3, 3, 3, 3]), "{p}");
    assert_eq!(p["text_offset"][0], 0, "{p}");
    // Errors arrive as the client's exception classes with OpenAI's codes.
    let e = &o["errors"];
    assert_eq!(e["unknown_model"]["status"], 404);
    assert_eq!(e["unknown_model"]["class"], "NotFoundError");
    assert_eq!(e["unknown_model"]["code"], "model_not_found");
    assert_eq!(e["bad_temperature"]["class"], "BadRequestError");
    assert_eq!(e["bad_temperature"]["param"], "temperature");
    assert_eq!(e["bad_compression"]["param"], "kv_compression.method");
    assert_eq!(e["too_long"]["code"], "context_length_exceeded");
    assert_eq!(o["wrong_key"], 401);

    // Context reuse, as the client reads it: a compressed document asked again, and
    // the next turn of the conversation.
    let r = &o["reuse"];
    let n = |k: &str, f: &str| r[k][f].as_u64().unwrap_or_else(|| panic!("{k}.{f}: {r}"));
    assert_eq!(n("first", "cached_tokens"), 0, "{r}");
    // The document (the system message) is reused; the new question is prefilled.
    assert!(n("second", "cached_tokens") > 500, "{r}");
    assert!(n("second", "cached_tokens") < n("second", "prompt_tokens"));
    // The same question again: the same answer from the reused compressed document.
    assert!(n("again", "cached_tokens") > 500, "{r}");
    assert_eq!(r["again"]["content"], r["first"]["content"]);
    // The next turn reuses everything before its new question.
    assert!(
        n("followup", "cached_tokens") >= n("first", "prompt_tokens"),
        "{r}"
    );
}

const QWEN: &str = "qwen2.5-0.5b";

fn parse(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

/// Structured outputs, tools, `n` and assistant prefill, as the official client sees
/// them, from qwen2.5 (whose chat template describes tools to the model).
#[test]
fn structured_outputs_tools_n_and_prefill_through_the_openai_client() {
    let s = start_model(QWEN, |c| c.context_reuse = false);
    let o = run_script("openai_structured.py", &s, QWEN, &[]);

    // A JSON schema with a nested object and an enum: the answer parses and follows it.
    for name in ["schema", "schema_stream"] {
        let r = &o[name];
        assert_eq!(r["finish_reason"], "stop", "{name}: {r}");
        let v = parse(r["content"].as_str().unwrap());
        let obj = v.as_object().unwrap_or_else(|| panic!("{v}"));
        let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        keys.sort();
        assert_eq!(keys, ["address", "age", "job", "name"], "{v}");
        assert!(v["name"].is_string() && v["age"].is_i64(), "{v}");
        assert!(
            v["address"]["city"].is_string() && v["address"]["country"].is_string(),
            "{v}"
        );
        assert!(
            ["student", "engineer", "artist"].contains(&v["job"].as_str().unwrap()),
            "{v}"
        );
    }
    assert_eq!(o["schema"]["content"], o["schema_stream"]["content"]);
    let v = parse(o["json_object"]["content"].as_str().unwrap());
    assert!(v.is_object(), "{v}");
    assert_eq!(o["json_object"]["finish_reason"], "stop");

    // Tools: a forced call names an offered function with arguments that parse and
    // follow its schema; a named choice calls that function.
    let t = &o["tools"];
    for name in ["tool_required", "tool_named"] {
        let r = &t[name];
        assert_eq!(r["finish_reason"], "tool_calls", "{name}: {r}");
        let call = &r["calls"][0];
        assert!(call["id"].as_str().is_some_and(|i| !i.is_empty()), "{r}");
        let args = parse(call["arguments"].as_str().unwrap());
        assert!(args["city"].is_string(), "{name}: {args}");
        if call["name"] == "get_weather" {
            assert!(
                ["celsius", "fahrenheit"].contains(&args["unit"].as_str().unwrap()),
                "{args}"
            );
        }
    }
    assert_eq!(t["tool_named"]["calls"][0]["name"], "get_time");
    // Streamed: the same call as tool_calls deltas.
    assert_eq!(t["tool_stream"]["finish_reason"], "tool_calls");
    assert_eq!(
        t["tool_stream"]["names"][0],
        t["tool_required"]["calls"][0]["name"]
    );
    assert_eq!(
        t["tool_stream"]["arguments"],
        t["tool_required"]["calls"][0]["arguments"]
    );
    // Left to choose, the model either calls a tool properly or answers in text.
    let auto = &t["tool_auto"];
    match auto["finish_reason"].as_str() {
        Some("tool_calls") => {
            assert!(parse(auto["calls"][0]["arguments"].as_str().unwrap()).is_object())
        }
        _ => assert!(
            auto["content"].as_str().is_some_and(|c| !c.is_empty()),
            "{auto}"
        ),
    }
    // The tool's result, sent back as a tool message, is answered in text.
    let back = &t["tool_result"];
    assert_eq!(back["finish_reason"], "stop", "{back}");
    assert!(
        back["content"].as_str().is_some_and(|c| c.contains("17")),
        "{back}"
    );

    // n = 3: three choices from one prompt, each counted in the usage.
    let n = &o["n"];
    assert_eq!(n["three"]["indexes"], json!([0, 1, 2]), "{n}");
    assert_eq!(n["three"]["prompt_tokens"], n["one"]["prompt_tokens"]);
    assert_eq!(n["three"]["kv_cache"]["choices"], 3);
    // Choice 0 has the request's seed: the same text as the single choice.
    assert_eq!(n["three"]["texts"][0], n["one"]["text"], "{n}");
    let texts: Vec<&str> = n["three"]["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert!(texts[1] != texts[0] || texts[2] != texts[0], "{n}");

    // Assistant prefill continues the message; a new turn does not.
    let p = o["prefill"]["content"].as_str().unwrap();
    assert!(p.to_lowercase().contains("blue"), "{p}");
    assert!(!p.to_lowercase().starts_with("red"), "{p}");
    assert!(o["new_turn"]["prompt_tokens"].as_u64() > o["prefill"]["prompt_tokens"].as_u64());

    // The prompt of an n = 3 request is prefilled once: the server's count of prompt
    // tokens grows by one prompt, and the three choices took about one prefill's time.
    let prompt_tokens = |s: &kvmerger_server::RunningServer| -> u64 {
        let m = get(s.addr, "/metrics").text();
        m.lines()
            .find_map(|l| l.strip_prefix("kvmerger_prompt_tokens_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no kvmerger_prompt_tokens_total in {m}")) as u64
    };
    let doc: String = (0..150).map(|i| format!("Item {i} is a box. ")).collect();
    let body = |n: u64| {
        json!({"model": QWEN, "messages": [{"role": "user", "content": doc.clone()}],
               "max_tokens": 2, "temperature": 1.0, "n": n,
               "kv_compression": {"method": "kvzip", "budget": 0.5}})
    };
    let before = prompt_tokens(&s);
    let t0 = std::time::Instant::now();
    let r = post(s.addr, "/v1/chat/completions", &body(3));
    let t3 = t0.elapsed().as_secs_f64();
    assert_eq!(r.status, 200, "{}", r.text());
    let r = r.json();
    let after = prompt_tokens(&s);
    assert_eq!(r["choices"].as_array().unwrap().len(), 3);
    let p = r["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(after - before, p, "{r}");
    let t0 = std::time::Instant::now();
    let r1 = post(s.addr, "/v1/chat/completions", &body(1));
    let t1 = t0.elapsed().as_secs_f64();
    assert_eq!(r1.status, 200);
    assert!(t3 < 1.5 * t1, "n=3 took {t3:.2} s against n=1's {t1:.2} s");
}
