//! Test support: the real default model, a server on an ephemeral loopback port, and a
//! small HTTP/1.1 client (raw sockets, so tests can also send what no client library
//! would: broken JSON, wrong lengths, a disconnect halfway).
#![allow(dead_code)]

use kvmerger_engine::load::LoadedModel;
use kvmerger_server::{RunningServer, ServerConfig};
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

pub const MODEL: &str = "smollm2-135m";

pub fn model() -> LoadedModel {
    model_named(MODEL)
}

/// A model of the project's catalogue, fetched on first use.
pub fn model_named(name: &str) -> LoadedModel {
    let dir = kvmerger_assets::data_dir(None);
    let path = kvmerger_assets::fetch(name, &dir, &kvmerger_assets::NoProgress)
        .unwrap_or_else(|e| panic!("could not fetch test model {name}: {e}"));
    LoadedModel::open(&path).unwrap()
}

/// A server on 127.0.0.1 with a free port, configured by `f`.
pub fn start(f: impl FnOnce(&mut ServerConfig)) -> RunningServer {
    start_model(MODEL, f)
}

/// [`start`] with another model of the catalogue (served under its name).
pub fn start_model(name: &str, f: impl FnOnce(&mut ServerConfig)) -> RunningServer {
    let mut cfg = ServerConfig {
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        model_id: name.into(),
        ..ServerConfig::default()
    };
    f(&mut cfg);
    RunningServer::start(cfg, model_named(name)).expect("server starts")
}

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.text()))
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    /// The `data:` payloads of a server-sent event stream.
    pub fn events(&self) -> Vec<String> {
        self.text()
            .lines()
            .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
            .map(str::to_string)
            .collect()
    }
    /// An OpenAI error body's `error` object, checking its shape.
    pub fn error(&self) -> Value {
        let v = self.json();
        let e = v
            .get("error")
            .unwrap_or_else(|| panic!("no error object: {v}"))
            .clone();
        for k in ["message", "type", "param", "code"] {
            assert!(e.get(k).is_some(), "error lacks '{k}': {e}");
        }
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
        e
    }
}

pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
    s
}

/// Send raw bytes and read the whole response (the connection is closed after it).
pub fn raw(addr: SocketAddr, bytes: &[u8]) -> Resp {
    let mut s = connect(addr);
    s.write_all(bytes).expect("send");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).expect("read response");
    parse_response(&buf)
}

/// [`raw`], but None when the server is not there (or closes without answering).
pub fn try_raw(addr: SocketAddr, bytes: &[u8]) -> Option<Resp> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(60))).ok()?;
    s.write_all(bytes).ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    buf.windows(4)
        .any(|w| w == b"\r\n\r\n")
        .then(|| parse_response(&buf))
}

pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Resp {
    raw(addr, &request_bytes(method, path, headers, body))
}

pub fn request_bytes(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
    {
        req.push_str("Content-Type: application/json\r\n");
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

pub fn post(addr: SocketAddr, path: &str, body: &Value) -> Resp {
    request(addr, "POST", path, &[], body.to_string().as_bytes())
}

pub fn get(addr: SocketAddr, path: &str) -> Resp {
    request(addr, "GET", path, &[], b"")
}

pub fn parse_response(buf: &[u8]) -> Resp {
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(buf)));
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut body = buf[end + 4..].to_vec();
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    if chunked {
        body = dechunk(&body);
    }
    Resp {
        status,
        headers,
        body,
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(nl) = b.windows(2).position(|w| w == b"\r\n") {
        let size_text = String::from_utf8_lossy(&b[..nl]);
        let size =
            usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16).unwrap_or(0);
        if size == 0 || b.len() < nl + 2 + size {
            break;
        }
        out.extend_from_slice(&b[nl + 2..nl + 2 + size]);
        b = &b[(nl + 4 + size).min(b.len())..];
    }
    out
}

/// A streaming request read piece by piece.
pub struct Stream {
    pub sock: TcpStream,
    pub seen: Vec<u8>,
}

impl Stream {
    pub fn open(addr: SocketAddr, path: &str, body: &Value) -> Stream {
        let mut sock = connect(addr);
        sock.write_all(&request_bytes(
            "POST",
            path,
            &[],
            body.to_string().as_bytes(),
        ))
        .unwrap();
        Stream {
            sock,
            seen: Vec::new(),
        }
    }
    /// Read until `pat` has been received (or the connection ends); whether it was.
    pub fn wait_for(&mut self, pat: &str) -> bool {
        let mut buf = [0u8; 4096];
        loop {
            if String::from_utf8_lossy(&self.seen).contains(pat) {
                return true;
            }
            match self.sock.read(&mut buf) {
                Ok(0) | Err(_) => return false,
                Ok(n) => self.seen.extend_from_slice(&buf[..n]),
            }
        }
    }
    pub fn finish(mut self) -> Resp {
        let mut rest = Vec::new();
        let _ = self.sock.read_to_end(&mut rest);
        self.seen.extend_from_slice(&rest);
        parse_response(&self.seen)
    }
}

/// The value of one metric line (`name` with its labels, as printed).
pub fn metric(addr: SocketAddr, name: &str) -> f64 {
    let text = get(addr, "/metrics").text();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            (k == name).then(|| v.parse().ok())?
        })
        .unwrap_or(0.0)
}

/// Poll `cond` until it holds, for at most `secs`.
pub fn eventually(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(secs) {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    cond()
}

pub fn completion(prompt: &str, max_tokens: usize) -> Value {
    serde_json::json!({
        "model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
    })
}

pub fn chat(content: &str, max_tokens: usize) -> Value {
    serde_json::json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
    })
}

/// A prose prompt of about `words` words.
pub fn long_text(words: usize) -> String {
    let base = "The river bends twice before it reaches the old mill, where the miller keeps \
                a ledger of every sack of grain that passes through his doors. ";
    let mut s = String::new();
    while s.split_whitespace().count() < words {
        s.push_str(base);
    }
    s
}

/// A document of numbered facts, about 600 tokens: a context to compress and keep.
pub fn document() -> String {
    (0..30)
        .map(|i| {
            format!(
                "Fact {i}: the {} door of house {} opens with code {}.\n",
                ["red", "blue", "green", "white", "black"][i % 5],
                i * 3 + 1,
                1000 + i * 37
            )
        })
        .collect()
}

/// A chat asking `question` about `doc` (in the system message), greedy, 8 tokens, with
/// `kv` as its `kv_compression`.
pub fn ask(doc: &str, question: &str, kv: Value) -> Value {
    serde_json::json!({
        "model": MODEL,
        "messages": [
            {"role": "system", "content": format!("Answer from this document.\n{doc}")},
            {"role": "user", "content": question},
        ],
        "max_tokens": 8, "temperature": 0, "kv_compression": kv,
    })
}

/// A chat response's text; the response must be a 200.
pub fn answer(r: &Resp) -> String {
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The prompt tokens a response reused from a kept context.
pub fn cached(r: &Resp) -> u64 {
    r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap()
}
