//! `kvmerger serve` as a process: bad flags fail before anything starts, the server
//! binds loopback, answers, and exits cleanly on SIGTERM.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn kvmerger() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kvmerger"))
}

#[test]
fn bad_serve_flags_are_clear_errors() {
    for (args, want) in [
        (&["--kv-memory", "12parsecs"][..], "--kv-memory"),
        (&["--kv-memory", "0"], "--kv-memory"),
        (&["--max-body", "lots"], "--max-body"),
        (
            &["--method", "nope", "--budget", "0.5"],
            "unknown compression method",
        ),
        (&["--method", "kvmerger"], "--budget is required"),
        (&["--max-batch", "0"], "max batch"),
        (&["--max-queue", "0"], "max queue"),
        (&["--timeout", "-1"], "--timeout"),
        (&["--header-timeout", "0"], "--header-timeout"),
        (&["--default-max-tokens", "9000"], "max tokens limit"),
        (&["--api-key", ""], "API key"),
        (&["--host", "not-an-ip"], "host"),
    ] {
        let out = kvmerger()
            .arg("serve")
            .args(args)
            .output()
            .expect("the binary runs");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
        assert!(err.contains(want), "{args:?}: expected '{want}' in: {err}");
    }
}

fn http(addr: &str, req: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn serve_binds_loopback_answers_and_stops_on_sigterm() {
    let mut child = kvmerger()
        .args([
            "serve",
            "--port",
            "0",
            "-m",
            "smollm2-135m",
            "--method",
            "kvmerger",
        ])
        .args(["--budget", "0.5", "--api-key", "k1"])
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary runs");
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    let t = Instant::now();
    let addr = loop {
        line.clear();
        if err.read_line(&mut line).unwrap() == 0 || t.elapsed() > Duration::from_secs(300) {
            let _ = child.kill();
            panic!("the server did not start: {line}");
        }
        if let Some(i) = line.find("http://") {
            break line[i + 7..].split_whitespace().next().unwrap().to_string();
        }
    };
    assert!(
        addr.starts_with("127.0.0.1:"),
        "binds loopback by default: {addr}"
    );
    assert!(line.contains("kvmerger 0.5"), "{line}");
    let health = http(
        &addr,
        "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    let body = r#"{"model": "smollm2-135m", "prompt": "The capital of France is", "max_tokens": 3, "temperature": 0}"#;
    let req = |key: &str| {
        format!(
            "POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    assert!(http(&addr, &req("wrong")).starts_with("HTTP/1.1 401"));
    let ok = http(&addr, &req("k1"));
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert!(
        ok.contains("\"method\":\"kvmerger\""),
        "the default compression applies: {ok}"
    );

    let pid = child.id().to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(killed.success());
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "no exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut rest = String::new();
    let _ = err.read_to_string(&mut rest);
    assert!(status.success(), "exit {status}: {rest}");
    assert!(rest.contains("stopped"), "{rest}");
}
