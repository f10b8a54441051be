//! Contexts kept between requests: a document compressed once and asked several
//! questions, the turns of a chat, eviction under memory pressure, and what must never
//! be reused.

mod common;

use common::*;
use serde_json::{json, Value};

const CHAT: &str = "/v1/chat/completions";
const COMPLETIONS: &str = "/v1/completions";

/// Whether gauge `name` shows `v` within a few seconds (the engine publishes its gauges
/// just after it answers).
fn gauge(addr: std::net::SocketAddr, name: &str, v: f64) -> bool {
    eventually(10, || metric(addr, name) == v)
}

fn usage(r: &Resp) -> Value {
    r.json()["usage"].clone()
}

const QUESTIONS: [&str; 3] = [
    "Which code opens the blue door of house 4?",
    "Which code opens the white door of house 10?",
    "What colour is the door of house 28?",
];

#[test]
fn questions_about_a_compressed_document_reuse_it_and_answer_as_a_fresh_run() {
    let doc = document();
    let reuse = start(|_| {});
    let fresh = start(|c| c.context_reuse = false);
    for kv in [
        json!({"method": "keydiff", "budget": 0.5, "protocol": "agnostic"}),
        json!({"method": "kvzip", "budget": 0.25, "protocol": "agnostic"}),
        json!("none"),
    ] {
        let hits0 = metric(reuse.addr, "kvmerger_context_cache_hits_total");
        for (i, q) in QUESTIONS.iter().enumerate() {
            let r = post(reuse.addr, CHAT, &ask(&doc, q, kv.clone()));
            let f = post(fresh.addr, CHAT, &ask(&doc, q, kv.clone()));
            assert_eq!(answer(&r), answer(&f), "{kv} question {i}");
            assert_eq!(cached(&f), 0);
            let u = usage(&r);
            if kv.is_object() {
                assert_eq!(u["kv_cache"]["protocol"], "agnostic");
                // The same compressed context, whether reused or not.
                assert_eq!(u["kv_cache"]["kv_bytes"], usage(&f)["kv_cache"]["kv_bytes"]);
            }
            if i == 0 {
                assert_eq!(cached(&r), 0, "{kv}");
            } else {
                let n = cached(&r);
                // The whole document (system message) is reused, the question is not.
                assert!(n > 500, "{kv}: {n} tokens reused");
                assert!(n < u["prompt_tokens"].as_u64().unwrap() - 5);
            }
        }
        let hits = metric(reuse.addr, "kvmerger_context_cache_hits_total") - hits0;
        assert_eq!(hits, 2.0, "{kv}");
    }
    // A compressed document is one entry per recipe: each question reused all of the
    // first one's context and replaced it. Without compression the context is the
    // whole prompt, which a new question does not share: one entry per question.
    assert!(gauge(reuse.addr, "kvmerger_context_cache_entries", 5.0));
    assert!(metric(reuse.addr, "kvmerger_context_cache_bytes") > 0.0);
    assert!(metric(reuse.addr, "kvmerger_context_cache_reused_tokens_total") > 3000.0);
}

#[test]
fn each_turn_of_a_chat_prefills_only_what_is_new() {
    let s = start(|_| {});
    let fresh = start(|c| c.context_reuse = false);
    let doc = document();
    for kv in [
        json!("none"),
        json!({"method": "snapkv", "budget": 0.5, "protocol": "agnostic"}),
    ] {
        let mut messages = vec![json!({"role": "system", "content": doc.clone()})];
        let mut last_prompt = 0;
        for (turn, q) in QUESTIONS.iter().enumerate() {
            messages.push(json!({"role": "user", "content": q}));
            let body = json!({
                "model": MODEL, "messages": messages, "max_tokens": 6,
                "temperature": 0, "kv_compression": kv,
            });
            let r = post(s.addr, CHAT, &body);
            let text = answer(&r);
            let n = cached(&r);
            if turn == 0 {
                assert_eq!(n, 0);
            } else {
                // Everything up to this turn's question: the previous prompt and answer.
                assert!(n >= last_prompt, "turn {turn}: {n} < {last_prompt}");
            }
            if kv == json!("none") {
                // Without compression, reuse is plain prefix caching: the same text.
                assert_eq!(text, answer(&post(fresh.addr, CHAT, &body)), "turn {turn}");
            }
            last_prompt = usage(&r)["prompt_tokens"].as_u64().unwrap();
            messages.push(json!({"role": "assistant", "content": text}));
        }
    }
}

#[test]
fn cached_contexts_are_evicted_least_recently_used_when_memory_runs_short() {
    // Room for two uncompressed documents and a bit, not three.
    let (per_token, p) = {
        let s = start(|_| {});
        let u = usage(&post(
            s.addr,
            CHAT,
            &ask(&document(), QUESTIONS[0], json!("none")),
        ));
        let p = u["prompt_tokens"].as_u64().unwrap();
        (u["kv_cache"]["kv_bytes_full"].as_u64().unwrap() / p, p)
    };
    let budget = per_token * (2 * p + 150);
    let s = start(|c| c.kv_memory = budget as usize);
    let doc_a = document();
    let doc_b = document().replace("door", "gate");
    let doc_c = document().replace("door", "window");
    // Different documents share only the system prompt's opening (a few tokens, reused
    // from whichever entry has it: plain prefix caching).
    let ask_none = |doc: &str, q: &str| cached(&post(s.addr, CHAT, &ask(doc, q, json!("none"))));
    for doc in [&doc_a, &doc_b] {
        assert!(ask_none(doc, QUESTIONS[0]) < 50);
    }
    assert!(gauge(s.addr, "kvmerger_context_cache_entries", 2.0));
    // A is used again, so B is now the least recently used.
    assert!(ask_none(&doc_a, QUESTIONS[1]) > 500);
    assert!(ask_none(&doc_c, QUESTIONS[0]) < 50);
    assert!(metric(s.addr, "kvmerger_context_cache_evictions_total") >= 1.0);
    assert!(
        metric(s.addr, "kvmerger_context_cache_bytes") <= budget as f64,
        "cached contexts past the KV memory"
    );
    assert!(ask_none(&doc_a, QUESTIONS[2]) > 500);
    assert!(ask_none(&doc_b, QUESTIONS[2]) < 50);
}

#[test]
fn a_request_that_fails_or_disconnects_leaves_the_cache_as_it_was() {
    let s = start(|_| {});
    let doc = document();
    let kv = json!({"method": "keydiff", "budget": 0.5, "protocol": "agnostic"});
    let first = answer(&post(s.addr, CHAT, &ask(&doc, QUESTIONS[0], kv.clone())));
    assert!(eventually(10, || metric(
        s.addr,
        "kvmerger_context_cache_bytes"
    ) > 0.0));
    let bytes = metric(s.addr, "kvmerger_context_cache_bytes");
    // A reused request whose client goes away mid-generation.
    let mut body = ask(&doc, QUESTIONS[1], kv.clone());
    body["max_tokens"] = json!(400);
    body["ignore_eos"] = json!(true);
    body["stream"] = json!(true);
    let mut st = Stream::open(s.addr, CHAT, &body);
    assert!(st.wait_for("\"content\""), "no token streamed");
    drop(st);
    assert!(eventually(60, || metric(
        s.addr,
        "kvmerger_generations_total{reason=\"cancelled\"}"
    ) >= 1.0));
    assert!(gauge(s.addr, "kvmerger_context_cache_bytes", bytes));
    assert!(gauge(s.addr, "kvmerger_context_cache_entries", 1.0));
    // The first question again: reused, and the same answer.
    let r = post(s.addr, CHAT, &ask(&doc, QUESTIONS[0], kv));
    assert!(cached(&r) > 500);
    assert_eq!(answer(&r), first);
}

#[test]
fn a_context_is_reused_only_by_the_same_recipe_and_a_prefix_outside_its_compressed_part() {
    let s = start(|_| {});
    let doc = document();
    let kv = json!({"method": "keydiff", "budget": 0.5, "protocol": "agnostic"});
    post(s.addr, CHAT, &ask(&doc, QUESTIONS[0], kv.clone()));
    // Another budget, method option or protocol: another compressed cache.
    for other in [
        json!({"method": "keydiff", "budget": 0.25, "protocol": "agnostic"}),
        json!({"method": "snapkv", "budget": 0.5, "protocol": "agnostic"}),
        json!({"method": "keydiff", "budget": 0.5, "protocol": "aware"}),
        json!("none"),
    ] {
        let r = post(s.addr, CHAT, &ask(&doc, QUESTIONS[1], other.clone()));
        assert_eq!(cached(&r), 0, "{other}");
    }
    // A document that differs near its end shares a prefix inside the compressed part:
    // its slots may stand for tokens this prompt does not have.
    let changed = doc.replace("Fact 29", "Fact 99");
    let r = post(s.addr, CHAT, &ask(&changed, QUESTIONS[1], kv.clone()));
    assert_eq!(cached(&r), 0);
    // The query-aware protocol compressed the question too: a new question cannot
    // reuse it, the next turn of the same conversation can.
    let aware = json!({"method": "keydiff", "budget": 0.5, "protocol": "aware"});
    let r1 = post(s.addr, CHAT, &ask(&doc, QUESTIONS[2], aware.clone()));
    let a1 = answer(&r1);
    let r2 = post(s.addr, CHAT, &ask(&doc, QUESTIONS[0], aware.clone()));
    assert_eq!(cached(&r2), 0);
    let mut next = ask(&doc, QUESTIONS[2], aware);
    next["messages"].as_array_mut().unwrap().extend([
        json!({"role": "assistant", "content": a1}),
        json!({"role": "user", "content": QUESTIONS[1]}),
    ]);
    let r3 = post(s.addr, CHAT, &next);
    assert!(cached(&r3) >= usage(&r1)["prompt_tokens"].as_u64().unwrap());
}

#[test]
fn the_agnostic_protocol_needs_a_context_before_the_question() {
    let s = start(|_| {});
    let kv = json!({"method": "keydiff", "budget": 0.5, "protocol": "agnostic"});
    let r = post(s.addr, CHAT, &{
        let mut b = chat("What is the capital of France?", 4);
        b["kv_compression"] = kv.clone();
        b
    });
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.error()["param"], "kv_compression.protocol");
    let r = post(s.addr, COMPLETIONS, &{
        let mut b = completion("The capital of France is", 4);
        b["kv_compression"] = kv;
        b
    });
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.error()["message"].as_str().unwrap().contains("chat"));
    let r = post(s.addr, CHAT, &{
        let mut b = chat("Hello", 4);
        b["kv_compression"] = json!({"method": "keydiff", "protocol": "sideways"});
        b
    });
    assert_eq!(r.status, 400);
    assert_eq!(r.error()["param"], "kv_compression.protocol");
    // A server whose default is agnostic compresses a prompt it cannot split whole,
    // and says so.
    let s = start(|c| {
        c.protocol = kvmerger_compression::Protocol::Agnostic;
        c.compression = kvmerger_compression::Recipe::parse("keydiff@0.5").unwrap();
    });
    let r = post(s.addr, CHAT, &chat("What is the capital of France?", 4));
    assert_eq!(usage(&r)["kv_cache"]["protocol"], "aware");
    let r = post(s.addr, CHAT, &ask(&document(), QUESTIONS[0], Value::Null));
    assert_eq!(usage(&r)["kv_cache"]["protocol"], "agnostic");
}
