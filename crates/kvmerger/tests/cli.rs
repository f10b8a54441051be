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

/// Runs with `input` on standard input, expects success, and returns stdout and stderr.
fn succeeds_with_stdin(args: &[&str], input: &[u8]) -> (String, String) {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_kvmerger"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary runs");
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{err}");
    (String::from_utf8(out.stdout).unwrap(), err)
}

/// Runs with the kernel family `KVMERGER_KERNELS` names.
fn with_kernels(args: &[&str], family: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kvmerger"))
        .args(args)
        .env("KVMERGER_KERNELS", family)
        .output()
        .unwrap()
}

const P: &[&str] = &[
    "generate",
    "-m",
    "smollm2-135m",
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
    for (method, opt, want) in [
        ("kvmerger", "colour=blue", "has no option 'colour'"),
        ("kvmerger", "epsilon=lots", "epsilon"),
        ("h2o", "novalue", "key=value"),
    ] {
        let e = fails(&with(&[
            "--method", method, "--budget", "0.5", "--opt", opt,
        ]));
        assert!(e.contains(want), "{method} --opt {opt}: {e}");
    }
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
    let e = fails(&[
        "generate",
        "-m",
        "smollm2-135m",
        "-f",
        long.to_str().unwrap(),
    ]);
    assert!(
        e.contains("does not fit the model's context of 8192"),
        "{e}"
    );
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

#[test]
fn eval_names_unknown_tasks_methods_and_bad_grids() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("r");
    let out = out.to_str().unwrap();
    let e = fails(&["eval", "run", "--tasks", "niah_nope", "-o", out]);
    assert!(
        e.contains("unknown task 'niah_nope'") && e.contains("niah_single_1"),
        "{e}"
    );
    for (option, value, want) in [
        ("--methods", "zip", "unknown compression method 'zip'"),
        ("--budgets", "1.5", "budget"),
        ("--shard", "4/4", "0 <= i < n"),
    ] {
        let e = fails(&[
            "eval", "run", option, value, "--tasks", "passkey", "-o", out,
        ]);
        assert!(e.contains(want), "{option} {value}: {e}");
    }
    let grid = dir.path().join("grid.toml");
    std::fs::write(&grid, "tasks = [\"passkey\"]\nlenghts = [4096]\n").unwrap();
    let e = fails(&["eval", "run", "--config", grid.to_str().unwrap(), "-o", out]);
    assert!(e.contains("lenghts"), "{e}");
    let e = fails(&["eval", "report", dir.path().to_str().unwrap()]);
    assert!(e.contains("no results"), "{e}");
    let e = fails(&["analyze", "sparsity", "--tasks", "nope", "-o", out]);
    assert!(e.contains("unknown task 'nope'"), "{e}");
    let e = fails(&["analyze", "merge-map", "--budget", "0", "-o", out]);
    assert!(e.contains("budget"), "{e}");
}

#[test]
fn eval_reports_malformed_jsonl_lines_by_number_and_evaluates_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("lb.jsonl");
    let good = |id: &str, answer: &str| {
        format!(
            r#"{{"input": "What colour is the door?", "context": "The door of house {id} is painted {answer}. The garden is green.", "answers": ["{answer}"], "length": 12, "dataset": "hotpotqa", "language": "en", "all_classes": null, "_id": "{id}"}}"#
        )
    };
    let lines = [
        good("a", "red"),
        "{\"input\": \"broken".to_string(),
        r#"{"input": "q", "context": "c", "length": 1, "dataset": "hotpotqa", "language": "en", "all_classes": null, "_id": "x"}"#.to_string(),
        good("b", "blue"),
    ];
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    let out_dir = dir.path().join("out");
    let out = kvmerger(&[
        "eval",
        "run",
        "-m",
        "smollm2-135m",
        "--longbench",
        file.to_str().unwrap(),
        "--methods",
        "streaming",
        "--budgets",
        "0.5",
        "--lengths",
        "512",
        "-o",
        out_dir.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("lb.jsonl:2:"), "{err}");
    assert!(
        err.contains("lb.jsonl:3:") && err.contains("answers"),
        "{err}"
    );
    let records = std::fs::read_to_string(out_dir.join("samples.jsonl")).unwrap();
    // Two good samples, each with the full cache and streaming at 50%.
    assert_eq!(records.lines().count(), 4, "{records}");
    // `eval run` defaults to exact precision (the other commands to balanced), so
    // grids started before that default changed still resume.
    assert!(
        records
            .lines()
            .all(|l| l.contains("\"run\":\"smollm2-135m kv=f16 precision=exact\"")),
        "{records}"
    );
    let summary = std::fs::read_to_string(out_dir.join("summary.md")).unwrap();
    assert!(summary.contains("longbench/hotpotqa"), "{summary}");
    assert!(out_dir.join("summary.csv").exists() && out_dir.join("score_vs_budget.png").exists());
}

#[test]
fn bench_defaults_to_balanced_precision_and_takes_the_others() {
    for (flag, name) in [
        (None, "precision Balanced"),
        (Some("exact"), "precision Exact"),
        (Some("fast"), "precision Fast"),
    ] {
        let mut args = vec![
            "bench",
            "-m",
            "smollm2-135m",
            "--pp",
            "8",
            "--tg",
            "2",
            "-t",
            "1",
        ];
        if let Some(f) = flag {
            args.extend(["--precision", f]);
        }
        let out = kvmerger(&args);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains(name), "{args:?}: {stdout}");
        assert!(stdout.contains("| tg2 |"), "{stdout}");
    }
    let e = fails(&["bench", "--precision", "int4"]);
    assert!(e.contains("unknown precision 'int4'"), "{e}");
    // A run past the context is refused before any work (smollm2's context is 8192).
    let t = std::time::Instant::now();
    let e = fails(&["bench", "-m", "smollm2-135m", "--pp", "8190", "--tg", "16"]);
    assert!(e.contains("past the model's context of 8192"), "{e}");
    assert!(t.elapsed().as_secs() < 60, "refused only after the work");
    // Compression during prefill that cannot work is refused with the flag named.
    let e = fails(&[
        "bench",
        "--method",
        "kvzip",
        "--budget",
        "512",
        "--prefill-chunk",
        "256",
    ]);
    assert!(
        e.contains("--prefill-chunk") && e.contains("reconstruction"),
        "{e}"
    );
}

/// `kvmerger generate ... | head -c5`: when the reader goes away, the process ends at
/// its next write, without a panic and without generating to the token limit first.
#[test]
fn a_closed_stdout_ends_generation_quietly() {
    use std::io::Read;
    use std::os::unix::process::ExitStatusExt;
    use std::process::Stdio;
    for (args, long) in [
        (
            vec![
                "generate",
                "-m",
                "smollm2-135m",
                "-p",
                "Once upon a time",
                "-n",
                "100000",
                "--ignore-eos",
            ],
            true,
        ),
        (vec!["fetch", "--list"], false),
    ] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kvmerger"))
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut first = [0u8; 1];
        child.stdout.take().unwrap().read_exact(&mut first).unwrap();
        // The pipe's reading end is dropped here.
        let t0 = std::time::Instant::now();
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        // A short output may fit in the pipe before the reader leaves.
        assert!(
            out.status.signal() == Some(SIGPIPE) || (!long && out.status.success()),
            "{args:?}: {:?}",
            out.status
        );
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(60),
            "{args:?} went on for {:?} after its reader left",
            t0.elapsed()
        );
    }
}

/// SIGPIPE's number on Linux.
const SIGPIPE: i32 = 13;

/// `chat` compresses the conversation once and then appends each turn to it: the
/// second turn is not prefilled and compressed again.
#[test]
fn chat_compresses_once_and_appends_later_turns() {
    let (out, err) = succeeds_with_stdin(
        &[
            "chat",
            "-m",
            "smollm2-135m",
            "--max-tokens",
            "6",
            "--temperature",
            "0",
            "--method",
            "keydiff",
            "--budget",
            "0.5",
            "--system",
            "You answer in one short sentence. The blue door's code is 4812; the red door's is 7730.",
        ],
        b"What is the blue door's code?\nAnd the red door's?\n",
    );
    let answers: Vec<&str> = out.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(answers.len(), 2, "{answers:?}\n{err}");
    assert_eq!(err.matches("[keydiff] KV cache").count(), 1, "{err}");
}

/// `--stop "\n\n"` as the README writes it stops at the blank line (the shell passes
/// a backslash and an n), and `-f -` reads the prompt from standard input.
#[test]
fn stop_escapes_are_understood_and_a_prompt_can_come_from_standard_input() {
    let (out, err) = succeeds_with_stdin(
        &[
            "generate",
            "-m",
            "smollm2-135m",
            "-f",
            "-",
            "-n",
            "16",
            "--stop",
            "\\n\\n",
        ],
        b"The capital of France is",
    );
    // Greedy: " Paris.\n\nThe answer is:" (the reference), cut at the blank line.
    assert_eq!(out, " Paris.\n", "{err}");
    assert!(err.contains("StopString"), "{err}");
    let e = fails(&with(&["--stop", "a\\q"]));
    assert!(e.contains("unknown escape"), "{e}");
}

#[test]
fn an_unknown_or_unsupported_kernel_family_is_refused_at_start() {
    let out = with_kernels(P, "avx9");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("KVMERGER_KERNELS=avx9: unknown kernel family"),
        "{err}"
    );
    // The portable family always exists, and gives the same greedy text as the
    // widest one (the integer sums are the same; only f32 rounding order differs).
    let plain = with_kernels(P, "plain");
    let widest = kvmerger(P);
    assert!(
        plain.status.success(),
        "{}",
        String::from_utf8_lossy(&plain.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&plain.stdout),
        String::from_utf8_lossy(&widest.stdout)
    );
}

/// Every `kvmerger ...` example in the README parses, and the cheap ones run
/// (scripts/check_readme.py, which lists them).
#[test]
fn the_readme_examples_parse_and_the_cheap_ones_run() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = Command::new("python3")
        .arg(root.join("scripts/check_readme.py"))
        .args(["--bin", env!("CARGO_BIN_EXE_kvmerger"), "--readme"])
        .arg(root.join("README.md"))
        .output()
        .expect("python3 runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("README commands parsed"), "{text}");
}
