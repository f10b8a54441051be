//! The command line on bad input: a clear error and a non-zero exit, never a panic.

use std::process::{Command, Output};

fn kvmerger(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kvmerger"))
        .args(args)
        .output()
        .expect("the binary runs")
}

/// Runs, expects failure, and returns stderr.
fn fails(args: &[&str]) -> String {
    let out = kvmerger(args);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{args:?} should fail");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    err
}

const P: &[&str] = &[
    "generate",
    "-n",
    "2",
    "-p",
    "One two three four five six seven eight nine ten eleven twelve",
];

fn with<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    P.iter().copied().chain(extra.iter().copied()).collect()
}

#[test]
fn unknown_methods_and_options_are_named() {
    assert!(fails(&with(&["--method", "nope", "--budget", "0.5"]))
        .contains("unknown compression method 'nope'"));
    let e = fails(&with(&[
        "--method",
        "kvmerger",
        "--budget",
        "0.5",
        "--opt",
        "colour=blue",
    ]));
    assert!(e.contains("has no option 'colour'"), "{e}");
    let e = fails(&with(&[
        "--method",
        "kvmerger",
        "--budget",
        "0.5",
        "--opt",
        "epsilon=lots",
    ]));
    assert!(e.contains("epsilon"), "{e}");
    assert!(fails(&with(&[
        "--method", "h2o", "--budget", "0.5", "--opt", "novalue"
    ]))
    .contains("key=value"));
}

#[test]
fn budgets_out_of_range_are_refused() {
    for (b, why) in [
        ("0", "above 0"),
        ("0.0", "(0, 1]"),
        ("1.5", "(0, 1]"),
        ("-3", "negative"),
        ("lots", "not a number"),
    ] {
        let e = fails(&with(&["--method", "h2o", "--budget", b]));
        assert!(
            e.contains("invalid budget") && e.contains(why),
            "budget {b}: {e}"
        );
    }
    assert!(fails(&with(&["--method", "h2o"])).contains("--budget is required"));
}

#[test]
fn windows_larger_than_the_budget_are_refused() {
    let e = fails(&with(&[
        "--method",
        "streaming",
        "--budget",
        "6",
        "--opt",
        "sinks=10",
    ]));
    assert!(e.contains("sinks") || e.contains("budget"), "{e}");
    let e = fails(&with(&[
        "--method", "snapkv", "--budget", "6", "--opt", "window=8",
    ]));
    assert!(e.contains("window"), "{e}");
}

#[test]
fn invalid_sampling_values_are_refused() {
    assert!(fails(&with(&["--temperature", "-1"])).contains("temperature"));
    assert!(fails(&with(&["--top-p", "0"])).contains("top-p"));
    assert!(fails(&with(&["--top-p", "1.5"])).contains("top-p"));
    assert!(fails(&with(&["--repeat-penalty", "0"])).contains("repetition penalty"));
    assert!(fails(&["generate", "-p", "x", "-n", "0"]).contains("max-tokens"));
    assert!(fails(&["generate", "-p", "x", "--threads", "0"]).contains("threads"));
}

#[test]
fn bad_prompt_files_and_models_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bad.txt");
    std::fs::write(&bin, b"hello \xff\xfe world").unwrap();
    let e = fails(&["generate", "-f", bin.to_str().unwrap()]);
    assert!(e.contains("not valid UTF-8"), "{e}");
    let e = fails(&["generate", "-f", "/nonexistent/prompt.txt"]);
    assert!(e.contains("/nonexistent/prompt.txt"), "{e}");
    assert!(fails(&["generate"]).contains("--prompt"));
    let e = fails(&["generate", "-p", "x", "-m", "no-such-model"]);
    assert!(
        e.contains("no-such-model") && e.contains("smollm2-135m"),
        "{e}"
    );
    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"GGUF\x03\x00\x00\x00 short").unwrap();
    let e = fails(&["generate", "-p", "x", "-m", junk.to_str().unwrap()]);
    assert!(e.contains("truncated"), "{e}");
    let toml = dir.path().join("c.toml");
    std::fs::write(&toml, "method = 'h2o'\nbudjet = 0.5\n").unwrap();
    let e = fails(&with(&["--compress-config", toml.to_str().unwrap()]));
    assert!(e.contains("budjet"), "{e}");
}

#[test]
fn a_prompt_longer_than_the_context_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let long = dir.path().join("long.txt");
    std::fs::write(&long, "word ".repeat(9000)).unwrap();
    let e = fails(&["generate", "-f", long.to_str().unwrap()]);
    assert!(e.contains("does not fit the context of 8192"), "{e}");
}

#[test]
fn generation_with_compression_reports_the_kv_bytes_saved() {
    let out = kvmerger(&with(&["--method", "kvmerger", "--budget", "0.5"]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("[kvmerger] KV cache") && err.contains("kept per layer"),
        "{err}"
    );
}
