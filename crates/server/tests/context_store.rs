//! Compressed contexts that outlive the process: a restarted server and a second
//! replica answer from a context another process compressed (disk and Redis), exactly
//! as that process would; corrupt, truncated, foreign and old entries are detected and
//! recomputed, never served; explicit handles.

mod common;

use common::*;
use kvmerger_server::store::StoreSpec;
use serde_json::{json, Value};
use std::path::Path;
use std::process::{Child, Command, Stdio};

const CHAT: &str = "/v1/chat/completions";

/// A question about the document, compressed by KeyDiff to half (agnostic protocol).
fn ask_keydiff(question: &str) -> Value {
    ask(
        &document(),
        question,
        json!({"method": "keydiff", "budget": 0.5, "protocol": "agnostic"}),
    )
}

/// A chat response's text and the prompt tokens it reused; the response must be a 200.
fn answer_cached(r: &Resp) -> (String, u64) {
    (answer(r), cached(r))
}

fn disk(dir: &Path) -> StoreSpec {
    StoreSpec::Disk {
        dir: dir.to_path_buf(),
        max_bytes: 1 << 30,
    }
}

/// The store's entries, waiting for the writer thread.
fn entries(dir: &Path, n: usize) -> Vec<std::path::PathBuf> {
    let list = || -> Vec<std::path::PathBuf> {
        std::fs::read_dir(dir)
            .map(|r| {
                r.flatten()
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "kvc"))
                    .collect()
            })
            .unwrap_or_default()
    };
    assert!(eventually(20, || list().len() >= n), "{:?}", list());
    list()
}

#[test]
fn a_restarted_server_answers_from_the_context_it_stored_as_before() {
    let dir = tempfile::tempdir().unwrap();
    let first = start(|c| c.context_store = Some(disk(dir.path())));
    let (a1, c1) = answer_cached(&post(
        first.addr,
        CHAT,
        &ask_keydiff("Which code opens the blue door of house 4?"),
    ));
    assert_eq!(c1, 0, "nothing stored yet");
    first.stop().unwrap();
    let files = entries(dir.path(), 1);
    assert_eq!(files.len(), 1, "one context, one file");
    // A fresh process: the same question and another one, both served from the file.
    let second = start(|c| c.context_store = Some(disk(dir.path())));
    let (a2, c2) = answer_cached(&post(
        second.addr,
        CHAT,
        &ask_keydiff("Which code opens the blue door of house 4?"),
    ));
    assert_eq!(a2, a1, "the stored context answers as the one computed");
    assert!(c2 > 500, "the document came from the store: {c2}");
    assert_eq!(
        metric(second.addr, "kvmerger_context_store_hits_total"),
        1.0
    );
    // Without a store, a cold server computes the same answer.
    let cold = start(|_| {});
    let (a3, c3) = answer_cached(&post(
        cold.addr,
        CHAT,
        &ask_keydiff("Which code opens the blue door of house 4?"),
    ));
    assert_eq!((a3, c3), (a1, 0));
}

#[test]
fn corrupt_truncated_and_foreign_entries_are_recomputed_never_served() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(|c| c.context_store = Some(disk(dir.path())));
    let (want, _) = answer_cached(&post(
        s.addr,
        CHAT,
        &ask_keydiff("What colour is the door of house 28?"),
    ));
    s.stop().unwrap();
    let file = entries(dir.path(), 1).remove(0);
    let good = std::fs::read(&file).unwrap();
    let mut flipped = good.clone();
    let at = flipped.len() / 2;
    flipped[at] ^= 0x10;
    let mut old_version = good.clone();
    old_version[7] = b'0'; // magic "KVCTX\0v1" -> "v0"
    for (what, bytes) in [
        ("a flipped byte", flipped),
        ("a truncated file", good[..good.len() / 3].to_vec()),
        ("another format version", old_version),
        ("not a context at all", b"hello".to_vec()),
    ] {
        std::fs::write(&file, &bytes).unwrap();
        let s = start(|c| c.context_store = Some(disk(dir.path())));
        let (got, cached) = answer_cached(&post(
            s.addr,
            CHAT,
            &ask_keydiff("What colour is the door of house 28?"),
        ));
        assert_eq!(got, want, "{what}");
        assert_eq!(cached, 0, "{what}: recomputed, not served");
        assert_eq!(
            metric(s.addr, "kvmerger_context_store_corrupt_total"),
            1.0,
            "{what}"
        );
        s.stop().unwrap();
        // The bad entry was replaced by a good one.
        assert!(
            eventually(20, || std::fs::read(&file)
                .is_ok_and(|b| kvmerger_engine::kvc::read_header(&b).is_ok())),
            "{what}: the entry is rewritten"
        );
    }
}

#[test]
fn a_context_handle_answers_chats_and_can_be_listed_and_deleted() {
    let s = start(|_| {});
    let doc = document();
    let r = post(
        s.addr,
        "/v1/contexts",
        &json!({"document": doc, "kv_compression": {"method": "keydiff", "budget": 0.5}}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let card = r.json();
    let id = card["id"].as_str().unwrap().to_string();
    assert!(card["tokens"].as_u64().unwrap() > 500);
    assert!(card["kv_bytes"].as_u64().unwrap() * 2 <= card["kv_bytes_full"].as_u64().unwrap() + 64);
    let q = "Which code opens the blue door of house 4?";
    let by_handle = post(
        s.addr,
        CHAT,
        &json!({"model": MODEL, "kv_context": id, "messages": [{"role": "user", "content": q}],
                "max_tokens": 8, "temperature": 0}),
    );
    let (a, cached) = answer_cached(&by_handle);
    assert!(cached >= card["tokens"].as_u64().unwrap(), "{cached}");
    // The same document and question sent whole get the same answer.
    let whole = post(
        s.addr,
        CHAT,
        &json!({"model": MODEL, "messages": [{"role": "system", "content": doc}, {"role": "user", "content": q}],
                "max_tokens": 8, "temperature": 0,
                "kv_compression": {"method": "keydiff", "budget": 0.5, "protocol": "agnostic"}}),
    );
    assert_eq!(answer_cached(&whole).0, a);
    let list = get(s.addr, "/v1/contexts").json();
    assert!(list["data"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["id"] == id));
    assert_eq!(get(s.addr, &format!("/v1/contexts/{id}")).json()["id"], id);
    // A handle carries its own compression; an unknown one is a 404.
    let both = post(
        s.addr,
        CHAT,
        &json!({"model": MODEL, "kv_context": id, "messages": [{"role": "user", "content": q}],
                "kv_compression": "none"}),
    );
    assert_eq!(both.status, 400, "{}", both.text());
    let del = request(s.addr, "DELETE", &format!("/v1/contexts/{id}"), &[], b"");
    assert_eq!(del.status, 200, "{}", del.text());
    for path in [
        format!("/v1/contexts/{id}"),
        "/v1/contexts/../../etc".to_string(),
    ] {
        assert_eq!(get(s.addr, &path).status, 404, "{path}");
    }
    let gone = post(
        s.addr,
        CHAT,
        &json!({"model": MODEL, "kv_context": id, "messages": [{"role": "user", "content": q}]}),
    );
    assert_eq!(gone.status, 404);
    assert_eq!(gone.error()["code"], "context_not_found");
}

/// A Redis server on a free loopback port, stopped when dropped.
struct Redis {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Redis {
    fn start() -> Option<Redis> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        let dir = tempfile::tempdir().ok()?;
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(["--appendonly", "no", "--dir"])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let up = eventually(10, || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        up.then_some(Redis {
            child,
            port,
            _dir: dir,
        })
    }
    fn spec(&self) -> StoreSpec {
        StoreSpec::Redis {
            url: format!("redis://127.0.0.1:{}/", self.port),
            ttl: 0,
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn two_replicas_share_contexts_through_redis_and_survive_its_loss() {
    let redis = Redis::start().expect("redis-server (Debian's package) must be installed");
    let a = start(|c| c.context_store = Some(redis.spec()));
    let b = start(|c| c.context_store = Some(redis.spec()));
    let q = "Which code opens the white door of house 10?";
    let (first, c0) = answer_cached(&post(a.addr, CHAT, &ask_keydiff(q)));
    assert_eq!(c0, 0);
    // Replica b finds what a stored (once a's writer has written it).
    assert!(eventually(20, || metric(
        a.addr,
        "kvmerger_context_store_writes_total"
    ) == 1.0));
    let (second, c1) = answer_cached(&post(b.addr, CHAT, &ask_keydiff(q)));
    assert_eq!(second, first);
    assert!(c1 > 500, "{c1}");
    assert_eq!(metric(b.addr, "kvmerger_context_store_hits_total"), 1.0);
    // Redis goes away: both keep answering, from what they compute themselves.
    drop(redis);
    let other = json!({
        "model": MODEL,
        "messages": [{"role": "system", "content": "Bees live in hives."}, {"role": "user", "content": "Where do bees live?"}],
        "max_tokens": 4, "kv_compression": {"method": "keydiff", "budget": 0.5, "protocol": "agnostic"},
    });
    for s in [&a, &b] {
        assert_eq!(post(s.addr, CHAT, &other).status, 200);
    }
    assert!(metric(b.addr, "kvmerger_context_store_errors_total") >= 1.0);
}
