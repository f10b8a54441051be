//! LongBench and ZeroSCROLLS readers: good lines become samples, bad lines errors
//! with their line numbers, unknown datasets clear errors.

use std::path::{Path, PathBuf};

use kvmerger_eval::metrics::score_sample;
use kvmerger_eval::tasks::{self, read_longbench, read_zeroscrolls, Error, JsonlSamples};
use kvmerger_eval::Metric;
use serde_json::json;

fn write(dir: &Path, name: &str, lines: &[String]) -> PathBuf {
    let path = dir.join(name);
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).unwrap();
    }
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

/// The ids of the samples read, in order.
fn ids(read: &JsonlSamples) -> Vec<&str> {
    read.samples
        .iter()
        .map(|s| s.meta["id"].as_str().unwrap())
        .collect()
}

/// The numbers of the lines that could not be read.
fn error_lines(read: &JsonlSamples) -> Vec<usize> {
    read.errors.iter().map(|e| e.line).collect()
}

fn longbench_line(dataset: &str, id: &str) -> String {
    json!({
        "input": format!("What is {id}?"),
        "context": format!("Some context about {id} {{with braces}}."),
        "answers": [format!("answer {id}")],
        "length": 42,
        "dataset": dataset,
        "language": "en",
        "all_classes": null,
        "_id": id,
    })
    .to_string()
}

#[test]
fn longbench_reads_good_lines_and_reports_bad_ones_by_number() {
    let dir = tempfile::tempdir().unwrap();
    let mut missing =
        serde_json::from_str::<serde_json::Value>(&longbench_line("hotpotqa", "c")).unwrap();
    missing.as_object_mut().unwrap().remove("answers");
    let lines = vec![
        longbench_line("hotpotqa", "a"),    // 1
        "{\"input\": \"broken".to_string(), // 2: malformed
        longbench_line("hotpotqa", "b"),    // 3
        String::new(),                      // 4: blank, skipped
        missing.to_string(),                // 5: no answers
        longbench_line("hotpotqa", "d"),    // 6
        "[1, 2]".to_string(),               // 7: not an object
    ];
    let path = write(dir.path(), "hotpotqa.jsonl", &lines);
    let read = read_longbench(&path, None).unwrap();
    assert_eq!(ids(&read), ["a", "b", "d"]);
    assert_eq!(error_lines(&read), [2, 5, 7]);
    assert!(
        read.errors[0].message.contains("JSON"),
        "{}",
        read.errors[0].message
    );
    assert!(
        read.errors[1].message.contains("`answers`"),
        "{}",
        read.errors[1].message
    );
    let s = &read.samples[1];
    assert_eq!(s.task, "longbench/hotpotqa");
    assert_eq!(s.index, 1);
    assert_eq!(s.meta["line"], 3);
    assert_eq!(s.meta["words"], 42);
    assert_eq!(s.metric, Metric::QaF1);
    assert_eq!(s.max_new_tokens, 32);
    assert_eq!(s.references, vec!["answer b".to_string()]);
    // Context and question are both in the prompt, braces and all.
    assert!(s.input.contains("Some context about b {with braces}."));
    assert!(s.input.contains("Question: What is b?"));
    assert!(s.input.ends_with("Answer:"));
    assert_eq!(score_sample(s, "answer b"), 1.0);
}

#[test]
fn longbench_datasets_have_their_metric_length_and_scoring() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, Metric, usize)] = &[
        ("narrativeqa", Metric::QaF1, 128),
        ("qasper", Metric::QaF1, 128),
        ("multifieldqa_zh", Metric::QaF1, 64),
        ("gov_report", Metric::RougeL, 512),
        ("dureader", Metric::RougeL, 128),
        ("samsum", Metric::RougeL, 128),
        ("passage_count", Metric::Count, 32),
        ("passage_retrieval_en", Metric::Retrieval, 32),
        ("passage_retrieval_zh", Metric::Retrieval, 32),
        ("lcc", Metric::CodeSim, 64),
        ("repobench-p", Metric::CodeSim, 64),
    ];
    for (name, metric, max_new) in cases {
        let path = write(
            dir.path(),
            &format!("{name}.jsonl"),
            &[longbench_line(name, "x")],
        );
        let read = read_longbench(&path, Some(name)).unwrap();
        assert!(read.errors.is_empty(), "{name}: {:?}", read.errors);
        let s = &read.samples[0];
        assert_eq!(&s.metric, metric, "{name}");
        assert_eq!(s.max_new_tokens, *max_new, "{name}");
        assert!(s.input.contains("Some context about x"), "{name}");
    }
    // LongBench-E names are the same datasets.
    let path = write(dir.path(), "e.jsonl", &[longbench_line("hotpotqa_e", "x")]);
    assert_eq!(
        read_longbench(&path, None).unwrap().samples[0].task,
        "longbench/hotpotqa"
    );

    // Classification needs the classes, and scores the first line only.
    let trec = json!({"input": "Question: Who?\nType:", "context": "examples", "answers": ["Human being"],
                      "dataset": "trec", "all_classes": ["Human being", "Location", "Entity"], "_id": "t"});
    let mut no_classes = trec.clone();
    no_classes.as_object_mut().unwrap().remove("all_classes");
    let path = write(
        dir.path(),
        "trec.jsonl",
        &[trec.to_string(), no_classes.to_string()],
    );
    let read = read_longbench(&path, Some("trec")).unwrap();
    assert_eq!(read.samples.len(), 1);
    assert_eq!(read.errors.len(), 1);
    assert_eq!(read.errors[0].line, 2);
    assert!(read.errors[0].message.contains("`all_classes`"));
    let s = &read.samples[0];
    assert_eq!(
        s.metric,
        Metric::Classification {
            classes: vec!["Human being".into(), "Location".into(), "Entity".into()]
        }
    );
    assert_eq!(s.meta["chat_template"], false);
    assert_eq!(
        score_sample(s, "\nHuman being\nQuestion: Where? Type: Location"),
        1.0
    );
}

#[test]
fn longbench_dataset_names_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "mixed.jsonl",
        &[
            longbench_line("qmsum", "a"),
            longbench_line("no_such_set", "b"),
            json!({"input": "q", "context": "c", "answers": ["x"]}).to_string(),
        ],
    );
    // Unknown dataset argument: an error for the whole file, listing the known ones.
    let err = read_longbench(&path, Some("hotpot_qa")).unwrap_err();
    assert!(matches!(err, Error::UnknownDataset { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains("hotpot_qa") && msg.contains("hotpotqa") && msg.contains("repobench-p"),
        "{msg}"
    );
    // From the lines: an unknown name and a missing one are line errors.
    let read = read_longbench(&path, None).unwrap();
    assert_eq!(read.samples.len(), 1);
    assert_eq!(read.samples[0].task, "longbench/qmsum");
    assert_eq!(error_lines(&read), [2, 3]);
    assert!(read.errors[0].message.contains("no_such_set"));
    assert!(read.errors[1].message.contains("`dataset`"));
    // A line of another dataset than the one asked for is an error too.
    let read = read_longbench(&path, Some("qmsum")).unwrap();
    assert_eq!(read.samples.len(), 2);
    assert_eq!(read.errors.len(), 1);
    assert_eq!(read.errors[0].line, 2);
    assert!(tasks::longbench_datasets().contains(&"passage_retrieval_zh"));
}

#[test]
fn a_missing_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = read_longbench(&dir.path().join("nope.jsonl"), None).unwrap_err();
    assert!(matches!(err, Error::Io { .. }));
    assert!(err.to_string().contains("nope.jsonl"));
    let err = read_zeroscrolls(&dir.path().join("qasper.jsonl"), None).unwrap_err();
    assert!(err.to_string().contains("qasper.jsonl"));
}

fn zs_line(id: &str, output: serde_json::Value) -> String {
    json!({
        "id": id, "pid": format!("{id}_0"),
        "input": format!("Instruction.\n\nDocument {id}\n\nQuestion: ?\n\nAnswer:"),
        "output": output,
        "document_start_index": 14, "document_end_index": 24,
        "query_start_index": 26, "query_end_index": 37,
        "truncation_seperator": "... [The rest has been omitted]\n\n",
    })
    .to_string()
}

#[test]
fn zeroscrolls_reads_lines_groups_references_and_reports_errors() {
    let dir = tempfile::tempdir().unwrap();
    let no_input = {
        let mut v: serde_json::Value = serde_json::from_str(&zs_line("z", json!("x"))).unwrap();
        v.as_object_mut().unwrap().remove("input");
        v.to_string()
    };
    let path = write(
        dir.path(),
        "qasper/validation.jsonl",
        &[
            zs_line("a", json!("first answer")),  // 1
            zs_line("b", json!("yes")),           // 2
            zs_line("a", json!("second answer")), // 3: same id, another reference
            "not json".to_string(),               // 4
            no_input,                             // 5
            zs_line("c", json!(null)),            // 6: test split
            zs_line("d", json!("no")),            // 7
        ],
    );
    // The dataset comes from the folder's name.
    let read = read_zeroscrolls(&path, None).unwrap();
    assert_eq!(ids(&read), ["a", "b", "d"]);
    assert_eq!(
        read.samples[0].references,
        ["first answer", "second answer"]
    );
    assert_eq!(error_lines(&read), [4, 5, 6]);
    assert!(read.errors[1].message.contains("`input`"));
    assert!(read.errors[2].message.contains("`output`"));
    let s = &read.samples[2];
    assert_eq!(s.task, "zeroscrolls/qasper");
    assert_eq!(s.index, 2);
    assert_eq!(s.metric, Metric::QaF1);
    assert_eq!(s.meta["line"], 7);
    assert_eq!(s.meta["document_start_index"], 14);
    assert!(s.input.starts_with("Instruction."));
}

#[test]
fn zeroscrolls_datasets_and_their_metrics() {
    let dir = tempfile::tempdir().unwrap();
    for (name, metric) in [
        ("gov_report", Metric::RougeL),
        ("summ_screen_fd", Metric::RougeL),
        ("qmsum", Metric::RougeL),
        ("squality", Metric::RougeL),
        ("narrative_qa", Metric::QaF1),
        ("musique", Metric::QaF1),
        ("space_digest", Metric::ExactMatch),
        ("book_sum_sort", Metric::ExactMatch),
    ] {
        let path = write(dir.path(), "data.jsonl", &[zs_line("a", json!("x"))]);
        let read = read_zeroscrolls(&path, Some(name)).unwrap();
        assert_eq!(read.samples[0].metric, metric, "{name}");
        assert_eq!(read.samples[0].task, format!("zeroscrolls/{name}"));
    }
    // QuALITY: exact match on the option letter.
    let path = write(
        dir.path(),
        "quality.jsonl",
        &[zs_line("q", json!("(B) The captain"))],
    );
    let s = &read_zeroscrolls(&path, None).unwrap().samples[0];
    assert_eq!(s.metric, Metric::ExactMatch);
    assert_eq!(s.references, ["(B) The captain", "B"]);
    assert_eq!(score_sample(s, "(B) the captain."), 1.0);
    assert_eq!(score_sample(s, "B"), 1.0);
    assert_eq!(score_sample(s, "(C) The crew"), 0.0);

    // Unknown names, given or in the path.
    let err = read_zeroscrolls(&path, Some("quality_v2")).unwrap_err();
    assert!(matches!(err, Error::UnknownDataset { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains("quality_v2") && msg.contains("book_sum_sort"),
        "{msg}"
    );
    let anonymous = write(dir.path(), "validation.jsonl", &[zs_line("a", json!("x"))]);
    let err = read_zeroscrolls(&anonymous, None).unwrap_err().to_string();
    assert!(err.contains("gov_report"), "{err}");
    assert_eq!(tasks::zeroscrolls_datasets().len(), 10);
}
