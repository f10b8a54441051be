//! Connections that send no request cannot hold the server: a request's head (request
//! line and headers) must arrive within the header timeout, on a new connection and
//! between requests on a kept-alive one. Bodies and responses are not bound by it.

mod common;

use common::*;
use serde_json::{json, Value};
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// How long until the server closes `sock`, while `trickle` is sent one byte every
/// 300 ms (nothing when it is empty); None if it is still open after `limit`.
fn time_to_close(
    sock: &mut TcpStream,
    mut trickle: impl Iterator<Item = u8>,
    limit: Duration,
) -> Option<Duration> {
    sock.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let t = Instant::now();
    let mut buf = [0u8; 4096];
    while t.elapsed() < limit {
        if let Some(b) = trickle.next() {
            if sock.write_all(&[b]).is_err() {
                return Some(t.elapsed());
            }
        }
        match sock.read(&mut buf) {
            Ok(0) => return Some(t.elapsed()),
            Ok(_) => {} // an error response before the close is fine
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return Some(t.elapsed()),
        }
    }
    None
}

/// Read one response with a Content-Length from a kept-alive connection.
fn read_response(sock: &mut TcpStream) -> Resp {
    sock.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
            let r = parse_response(&seen);
            let len: usize = r
                .header("content-length")
                .and_then(|v| v.parse().ok())
                .expect("a content-length");
            if seen.len() >= end + 4 + len {
                return r;
            }
        }
        let n = sock.read(&mut buf).expect("read a response");
        assert!(
            n > 0,
            "closed mid-response: {:?}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
}

fn assert_closed_by_the_timeout(what: &str, closed: Option<Duration>) {
    let closed = closed.unwrap_or_else(|| panic!("{what}: still open after 5 s"));
    // Held for the timeout (1 s), then closed: not at once, not much later.
    assert!(
        closed >= Duration::from_millis(800) && closed <= Duration::from_secs(5),
        "{what}: closed after {closed:?}"
    );
}

#[test]
fn a_client_that_trickles_headers_or_sits_idle_is_disconnected() {
    let s = start(|c| c.header_timeout = Duration::from_secs(1));
    let limit = Duration::from_secs(5);

    // A request line, then headers one byte every 300 ms: the bytes keep coming, the
    // head never ends.
    let mut sock = connect(s.addr);
    sock.write_all(b"GET /v1/models HTTP/1.1\r\n").unwrap();
    let head = b"Host: localhost\r\nX-Slow: ".iter().copied();
    let closed = time_to_close(&mut sock, head.chain(std::iter::repeat(b'a')), limit);
    assert_closed_by_the_timeout("trickled headers", closed);

    // A connection that sends nothing.
    let mut sock = connect(s.addr);
    let closed = time_to_close(&mut sock, std::iter::empty(), limit);
    assert_closed_by_the_timeout("a silent connection", closed);

    // A kept-alive connection, idle after its first request.
    let mut sock = connect(s.addr);
    sock.write_all(b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut sock).status, 200);
    let closed = time_to_close(&mut sock, std::iter::empty(), limit);
    assert_closed_by_the_timeout("an idle kept-alive connection", closed);

    // The server still answers.
    let r = get(s.addr, "/v1/models");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["data"][0]["id"], MODEL);
}

#[test]
fn the_header_timeout_bounds_only_the_head_not_slow_bodies_or_long_streams() {
    let s = start(|c| {
        c.header_timeout = Duration::from_secs(1);
        c.request_timeout = Duration::from_secs(3);
        c.max_tokens_limit = 8000;
    });

    // The head at once, the body over 2 s: answered.
    let body = completion("The capital of France is", 3).to_string();
    let bytes = request_bytes("POST", "/v1/completions", &[], body.as_bytes());
    let split = bytes.len() - body.len();
    let mut sock = connect(s.addr);
    sock.write_all(&bytes[..split]).unwrap();
    for part in body.as_bytes().chunks(body.len().div_ceil(4)) {
        std::thread::sleep(Duration::from_millis(500));
        sock.write_all(part).unwrap();
    }
    let mut out = Vec::new();
    sock.read_to_end(&mut out).unwrap();
    let r = parse_response(&out);
    assert_eq!(r.status, 200, "{}", r.text());

    // A stream that runs to its 3 s deadline is not cut at 1 s: it ends with the
    // timeout event.
    let t = Instant::now();
    let st = Stream::open(
        s.addr,
        "/v1/completions",
        &json!({
            "model": MODEL, "prompt": "Once upon a time", "max_tokens": 7000,
            "ignore_eos": true, "stream": true, "temperature": 0,
        }),
    );
    let r = st.finish();
    assert_eq!(r.status, 200);
    assert!(
        t.elapsed() >= Duration::from_millis(2500),
        "{:?}",
        t.elapsed()
    );
    let last = r.events().last().cloned().unwrap_or_default();
    let v: Value = serde_json::from_str(&last).expect("last event is JSON");
    assert_eq!(v["error"]["code"], "timeout", "{last}");
}
