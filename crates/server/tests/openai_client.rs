//! The server as the official `openai` Python package sees it: completions and chat,
//! streamed and not, with and without compression, and its error classes.
//!
//! Needs python3 with the `openai` package (pinned in scripts/requirements-reference.txt,
//! which scripts/test installs). Missing either is a failure with a message, not a skip.

mod common;

use common::*;
use serde_json::Value;
use std::process::Command;

const KEY: &str = "test-key-123";

fn run_client() -> Value {
    let s = start(|c| c.api_key = Some(KEY.into()));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/openai_client.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(format!("http://{}/v1", s.addr))
        .arg(MODEL)
        .arg(KEY)
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
