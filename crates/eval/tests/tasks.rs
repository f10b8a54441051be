//! The synthetic task generators: deterministic, independent per index, fitted to the
//! target length, with needles, chains, keys and gold documents where they say.
//!
//! Uses the real RULER data, fetched by the project's own code when it is not cached.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use kvmerger_eval::tasks::{self, Error, GenConfig, Generator, DEPTHS};
use kvmerger_eval::{Metric, Sample};

fn ruler_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let home = kvmerger_assets::data_dir(None);
        kvmerger_assets::fetch("ruler", &home, &kvmerger_assets::NoProgress)
            .unwrap_or_else(|e| panic!("could not fetch the RULER data: {e}"))
    })
}

/// A stand-in tokenizer: one token per four bytes.
fn quarter(s: &str) -> usize {
    s.len() / 4
}

/// Another: one token per whitespace-separated word.
fn words(s: &str) -> usize {
    s.split_whitespace().count()
}

fn cfg(length: usize, seed: u64) -> GenConfig<'static> {
    GenConfig {
        length,
        seed,
        data_dir: ruler_dir(),
        count_tokens: &quarter,
    }
}

fn gen(g: &Generator, task: &str, length: usize, index: usize) -> Sample {
    g.generate(task, &cfg(length, 42), index)
        .unwrap_or_else(|e| panic!("{task} at {length}, sample {index}: {e}"))
}

fn meta_usize(s: &Sample, key: &str) -> usize {
    s.meta[key].as_u64().unwrap_or_else(|| panic!("meta {key}")) as usize
}

fn meta_f64(s: &Sample, key: &str) -> f64 {
    s.meta[key].as_f64().unwrap_or_else(|| panic!("meta {key}"))
}

fn meta_list(s: &Sample, key: &str) -> Vec<serde_json::Value> {
    s.meta[key]
        .as_array()
        .unwrap_or_else(|| panic!("meta {key}"))
        .clone()
}

const NIAH: &[&str] = &[
    "niah_single_1",
    "niah_single_2",
    "niah_single_3",
    "niah_multikey_1",
    "niah_multikey_2",
    "niah_multikey_3",
    "niah_multivalue",
    "niah_multiquery",
];

#[test]
fn task_names_are_ruler_tasks_and_passkey() {
    let names = tasks::task_names();
    assert_eq!(names.len(), 14);
    for t in NIAH
        .iter()
        .chain(&["vt", "cwe", "fwe", "qa_1", "qa_2", "passkey"])
    {
        assert!(names.contains(t), "{t}");
    }
}

#[test]
fn unknown_task_is_an_error_listing_the_known_ones() {
    let err = tasks::generate("niah_single_9", &cfg(4096, 1), 0).unwrap_err();
    assert!(matches!(err, Error::UnknownTask { .. }));
    let msg = err.to_string();
    assert!(msg.contains("niah_single_9"), "{msg}");
    for t in tasks::task_names() {
        assert!(msg.contains(t), "{msg} lacks {t}");
    }
}

#[test]
fn samples_are_deterministic_and_differ_across_seeds() {
    let a = Generator::new();
    let b = Generator::new();
    for task in tasks::task_names() {
        let first = gen(&a, task, 4096, 2);
        assert_eq!(first, gen(&a, task, 4096, 2), "{task}: same generator");
        assert_eq!(first, gen(&b, task, 4096, 2), "{task}: fresh generator");
        assert_eq!(
            first,
            tasks::generate(task, &cfg(4096, 42), 2).unwrap(),
            "{task}: the free function"
        );
        let other = b.generate(task, &cfg(4096, 43), 2).unwrap();
        assert_ne!(
            first.input, other.input,
            "{task}: seed 43 gives the same input"
        );
        assert_eq!(first.task, *task);
        assert_eq!(first.index, 2);
    }
}

#[test]
fn a_sample_does_not_depend_on_which_samples_came_before() {
    for task in ["niah_single_2", "niah_multikey_2", "vt", "cwe", "qa_1"] {
        let alone = gen(&Generator::new(), task, 8192, 7);
        let g = Generator::new();
        for i in (0..7).rev() {
            gen(&g, task, 8192, i);
        }
        // A warmed-up cache for a neighbouring length does not matter either.
        gen(&g, task, 8000, 7);
        assert_eq!(alone, gen(&g, task, 8192, 7), "{task}");
    }
}

#[test]
fn a_generator_keeps_different_counters_apart() {
    let g = Generator::new();
    let with = |g: &Generator, counter: &'static (dyn Fn(&str) -> usize + Sync)| {
        let c = GenConfig {
            length: 4096,
            seed: 5,
            data_dir: ruler_dir(),
            count_tokens: counter,
        };
        g.generate("niah_single_2", &c, 3).unwrap()
    };
    let q = with(&g, &quarter);
    let w = with(&g, &words);
    assert_eq!(w, with(&Generator::new(), &words));
    assert_eq!(q, with(&Generator::new(), &quarter));
    assert_ne!(q.input, w.input);
}

#[test]
fn inputs_fit_the_length_and_nearly_fill_it() {
    let g = Generator::new();
    for &length in &[2048, 4096, 16384] {
        for task in tasks::task_names() {
            for index in 0..3 {
                let s = gen(&g, task, length, index);
                let counted = quarter(&format!("{}{}", s.input, s.answer_prefix));
                assert_eq!(meta_usize(&s, "tokens"), counted, "{task} {length}");
                assert_eq!(meta_usize(&s, "length"), length);
                assert!(
                    counted + s.max_new_tokens <= length,
                    "{task} at {length}: {counted} + {} tokens",
                    s.max_new_tokens
                );
                assert!(
                    counted as f64 >= 0.8 * length as f64,
                    "{task} at {length}: only {counted} tokens"
                );
            }
        }
    }
}

#[test]
fn ruler_generation_lengths_and_metrics() {
    let g = Generator::new();
    let expect: HashMap<&str, usize> = [
        ("vt", 30),
        ("cwe", 120),
        ("fwe", 50),
        ("qa_1", 32),
        ("qa_2", 32),
        ("passkey", 16),
    ]
    .into_iter()
    .chain(NIAH.iter().map(|t| (*t, 128)))
    .collect();
    for task in tasks::task_names() {
        let s = gen(&g, task, 4096, 0);
        assert_eq!(s.max_new_tokens, expect[task], "{task}");
        let metric = if task.starts_with("qa") {
            Metric::StringMatchPart
        } else {
            Metric::StringMatchAll
        };
        assert_eq!(s.metric, metric, "{task}");
        assert!(!s.references.is_empty(), "{task}");
        assert!(!s.answer_prefix.is_empty(), "{task}");
    }
}

#[test]
fn niah_needles_sit_at_their_recorded_positions_and_depths() {
    let g = Generator::new();
    for task in NIAH {
        let mut depths = HashSet::new();
        for index in 0..DEPTHS.len() {
            let s = gen(&g, task, 8192, index);
            for r in &s.references {
                assert!(
                    s.input.contains(r.as_str()),
                    "{task} {index}: {r} not in input"
                );
            }
            let positions = meta_list(&s, "needle_positions");
            let needle_depths = meta_list(&s, "needle_depths");
            assert_eq!(positions.len(), meta_usize(&s, "num_needles"));
            assert_eq!(positions.len(), needle_depths.len());
            for p in &positions {
                let p = p.as_u64().unwrap() as usize;
                assert!(
                    s.input[p..].starts_with("One of the special magic "),
                    "{task} {index}: no needle at {p}"
                );
            }
            // The first answer is in the needle at the recorded depth.
            let depth = meta_f64(&s, "depth");
            let target = meta_f64(&s, "depth_target");
            assert_eq!(target, DEPTHS[index % DEPTHS.len()]);
            assert!(
                (depth - target).abs() <= 0.03,
                "{task} {index}: depth {depth} for target {target}"
            );
            let at = needle_depths
                .iter()
                .position(|d| d.as_f64() == Some(depth))
                .expect("the answer's depth is a needle's depth");
            let p = positions[at].as_u64().unwrap() as usize;
            let line = &s.input[p..p + s.input[p..].find('.').unwrap()];
            assert!(
                s.input[p..].contains(&s.references[0])
                    && s.input[p..].find(&s.references[0]).unwrap() < 200,
                "{task} {index}: `{line}` does not hold {}",
                s.references[0]
            );
            depths.insert((target * 10.0).round() as i32);
        }
        assert_eq!(depths.len(), 11, "{task}: 11 samples cover all depths");
    }
}

#[test]
fn niah_keys_and_distractors_are_as_ruler_defines() {
    let g = Generator::new();
    let needles = |s: &Sample| s.input.matches("One of the special magic ").count();
    let asked = |s: &Sample| -> Vec<String> {
        meta_list(s, "keys")
            .iter()
            .map(|k| k.as_str().unwrap().to_string())
            .collect()
    };
    for index in 0..4 {
        // multikey_1: four keys, one asked, three distractor keys in the essays.
        let s = gen(&g, "niah_multikey_1", 8192, index);
        assert_eq!(needles(&s), 4);
        assert_eq!(meta_usize(&s, "num_distractor_needles"), 3);
        let key = &asked(&s)[0];
        let with_key = format!("One of the special magic numbers for {key} is:");
        assert_eq!(s.input.matches(&with_key).count(), 1);
        assert_eq!(s.references.len(), 1);

        // multikey_2/3: the haystack is made of distractor needles.
        for task in ["niah_multikey_2", "niah_multikey_3"] {
            let s = gen(&g, task, 8192, index);
            let hay = meta_usize(&s, "haystack");
            assert!(hay > 50, "{task}: {hay} distractors");
            assert_eq!(needles(&s), hay + 1, "{task}");
            assert_eq!(meta_usize(&s, "num_distractor_needles"), hay);
            let key = &asked(&s)[0];
            assert_eq!(s.input.matches(&format!("for {key} is:")).count(), 1);
        }
        let s = gen(&g, "niah_multikey_3", 4096, index);
        let uuid = |x: &str| {
            x.len() == 36
                && x.chars().filter(|&c| c == '-').count() == 4
                && x.as_bytes()[14] == b'4'
        };
        assert!(
            uuid(&asked(&s)[0]) && uuid(&s.references[0]),
            "{:?}",
            s.references
        );

        // multivalue: one key, four values, all asked.
        let s = gen(&g, "niah_multivalue", 8192, index);
        assert_eq!(needles(&s), 4);
        assert_eq!(s.references.len(), 4);
        assert_eq!(asked(&s).len(), 1);

        // multiquery: four keys, all asked, one value each.
        let s = gen(&g, "niah_multiquery", 8192, index);
        assert_eq!(needles(&s), 4);
        assert_eq!(s.references.len(), 4);
        let keys = asked(&s);
        assert_eq!(keys.len(), 4);
        assert!(s
            .answer_prefix
            .contains(&format!("{}, and {}", keys[2], keys[3])));
    }
    // One asked value: RULER's singular template; several: plural.
    let one = gen(&g, "niah_single_1", 4096, 0);
    assert!(one
        .input
        .starts_with("A special magic number is hidden within the following text."));
    assert!(one
        .input
        .contains("\nWhat is the special magic number for "));
    assert!(one
        .answer_prefix
        .ends_with("mentioned in the provided text is"));
    let many = gen(&g, "niah_multivalue", 4096, 0);
    assert!(many
        .input
        .starts_with("Some special magic numbers are hidden within the following text."));
    assert!(many
        .answer_prefix
        .ends_with("mentioned in the provided text are"));
    let num = &one.references[0];
    assert!(num.len() == 7 && num.bytes().all(|b| b.is_ascii_digit()));
    // Word keys are two lower-case words joined by a hyphen.
    let key = meta_list(&one, "keys")[0].as_str().unwrap().to_string();
    let parts: Vec<&str> = key.split('-').collect();
    assert_eq!(parts.len(), 2, "{key}");
    assert!(parts
        .iter()
        .all(|p| p.len() >= 4 && p.bytes().all(|b| b.is_ascii_lowercase())));
}

#[test]
fn vt_hides_the_whole_chain_and_asks_for_its_value() {
    let g = Generator::new();
    for index in 0..5 {
        let s = gen(&g, "vt", 8192, index);
        assert_eq!(s.references.len(), 5);
        let value = s
            .answer_prefix
            .split("assgined the value ")
            .nth(1)
            .and_then(|t| t.split(',').next())
            .unwrap()
            .to_string();
        assert!(s
            .input
            .contains(&format!("VAR {} = {value}", s.references[0])));
        for w in s.references.windows(2) {
            assert!(s.input.contains(&format!("VAR {} = VAR {}", w[1], w[0])));
        }
        assert!(s.input.ends_with(&format!(
            "Question: Find all variables that are assigned the value {value} in the text above."
        )));
        // With RULER's worked example (3-letter variables) in front.
        assert_eq!(
            s.input
                .matches("Memorize and track the chain(s) of variable assignment")
                .count(),
            2
        );
        assert!(s.answer_prefix.contains("5 variables"));
    }
}

#[test]
fn passkey_is_at_its_depth() {
    let g = Generator::new();
    for (index, &target) in DEPTHS.iter().enumerate() {
        let s = gen(&g, "passkey", 8192, index);
        let key = &s.references[0];
        assert_eq!(key.len(), 5);
        let p = meta_list(&s, "needle_positions")[0].as_u64().unwrap() as usize;
        assert!(s.input[p..].starts_with(&format!(
            "The pass key is {key}. Remember it. {key} is the pass key."
        )));
        let depth = meta_f64(&s, "depth");
        assert!((depth - target).abs() < 0.02, "{index}: {depth}");
        assert!(s.input.ends_with("What is the pass key?"));
        assert_eq!(s.answer_prefix, " The pass key is");
    }
}

#[test]
fn cwe_references_are_the_ten_most_common_words() {
    let g = Generator::new();
    for &length in &[2048, 8192] {
        let s = gen(&g, "cwe", length, 1);
        assert_eq!(s.references.len(), 10);
        // The question's list follows the worked example.
        let list = s
            .input
            .rsplit("Memorize the ones that appear most often.\n")
            .next()
            .unwrap();
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for item in list
            .split(|c: char| c.is_whitespace())
            .filter(|w| !w.is_empty() && w.bytes().all(|b| b.is_ascii_lowercase()))
        {
            *counts.entry(item).or_default() += 1;
        }
        let (common, rare) = if length < 4096 { (6, 1) } else { (30, 3) };
        for r in &s.references {
            assert!(counts[r.as_str()] >= common, "{r}: {}", counts[r.as_str()]);
        }
        let words_in_question = [
            "question", "what", "are", "the", "most", "common", "words", "in", "above", "list",
        ];
        let others = counts
            .iter()
            .filter(|(w, _)| {
                !s.references.iter().any(|r| r == *w) && !words_in_question.contains(w)
            })
            .map(|(_, &c)| c)
            .max()
            .unwrap();
        assert!(
            others <= rare + 1,
            "an uncommon word appears {others} times"
        );
    }
}

#[test]
fn fwe_references_are_the_most_frequent_coded_words() {
    let s = gen(&Generator::new(), "fwe", 8192, 0);
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for w in s.input.split_whitespace() {
        if w.len() == 6 && w.bytes().all(|b| b.is_ascii_lowercase()) {
            *counts.entry(w).or_default() += 1;
        }
    }
    let mut ranked: Vec<(&str, usize)> = counts.into_iter().collect();
    ranked.sort_by_key(|x| std::cmp::Reverse(x.1));
    let top: Vec<&str> = ranked[..3].iter().map(|x| x.0).collect();
    assert_eq!(top, s.references);
    assert!(ranked[2].1 > ranked[3].1);
    assert!(s.input.matches("...").count() > ranked[0].1);
}

fn question_of(s: &Sample) -> String {
    s.input.rsplit("\n\nQuestion: ").next().unwrap().to_string()
}

#[test]
fn qa_squad_input_holds_the_gold_paragraph_and_its_article() {
    let raw: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ruler_dir().join("squad.json")).unwrap()).unwrap();
    let g = Generator::new();
    for index in [0, 5, 40] {
        let s = gen(&g, "qa_1", 4096, index);
        let q = question_of(&s);
        let mut found = false;
        for article in raw["data"].as_array().unwrap() {
            for p in article["paragraphs"].as_array().unwrap() {
                let asks = p["qas"].as_array().unwrap().iter().any(|x| {
                    x["question"] == q.as_str()
                        && x["answers"].as_array().unwrap().iter().any(|a| {
                            s.references
                                .contains(&a["text"].as_str().unwrap().to_string())
                        })
                });
                if asks {
                    let context = p["context"].as_str().unwrap();
                    if s.input.contains(context) {
                        found = true;
                        let gold = meta_list(&s, "gold_documents")[0].as_u64().unwrap();
                        assert!(s.input.contains(&format!("Document {gold}:\n{context}")));
                    }
                }
            }
        }
        assert!(found, "sample {index}: no gold paragraph for `{q}`");
        assert!(s
            .input
            .starts_with("Answer the question based on the given documents."));
        assert_eq!(s.answer_prefix, " Answer:");
        let docs = meta_usize(&s, "haystack");
        assert!(s.input.contains(&format!("Document {docs}:\n")));
        assert!(!s.input.contains(&format!("Document {}:\n", docs + 1)));
    }
}

#[test]
fn qa_hotpot_input_holds_both_supporting_paragraphs() {
    let raw: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ruler_dir().join("hotpotqa.json")).unwrap()).unwrap();
    let g = Generator::new();
    for index in [0, 7] {
        let s = gen(&g, "qa_2", 4096, index);
        let item = &raw[index];
        assert_eq!(question_of(&s), item["question"].as_str().unwrap());
        assert_eq!(
            s.references,
            vec![item["answer"].as_str().unwrap().to_string()]
        );
        // All ten paragraphs of the question are there, the supporting ones marked gold.
        for para in item["context"].as_array().unwrap() {
            let title = para[0].as_str().unwrap();
            let text: String = para[1]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_str().unwrap())
                .collect();
            assert!(s.input.contains(&format!("{title}\n{text}")), "{title}");
        }
        let gold = meta_list(&s, "gold_documents");
        assert_eq!(gold.len(), 2, "{gold:?}");
        let supporting: HashSet<&str> = item["supporting_facts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f[0].as_str().unwrap())
            .collect();
        for n in gold {
            let at = s.input.find(&format!("Document {n}:\n")).unwrap();
            let title = s.input[at..].lines().nth(1).unwrap();
            assert!(supporting.contains(title), "{title}");
        }
    }
}

#[test]
fn a_length_too_small_for_the_task_is_an_error() {
    let err = Generator::new()
        .generate("qa_2", &cfg(300, 1), 0)
        .unwrap_err();
    assert!(matches!(err, Error::TooShort { .. }), "{err}");
    assert!(err.to_string().contains("qa_2"));
    let err = Generator::new()
        .generate("niah_single_1", &cfg(100, 1), 0)
        .unwrap_err();
    assert!(matches!(err, Error::TooShort { .. }), "{err}");
}

#[test]
fn a_missing_data_folder_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let c = GenConfig {
        length: 4096,
        seed: 1,
        data_dir: dir.path(),
        count_tokens: &quarter,
    };
    let err = Generator::new()
        .generate("niah_single_2", &c, 0)
        .unwrap_err();
    assert!(err.to_string().contains("PaulGrahamEssays.json"), "{err}");
    // The repeat haystack with number keys needs no data... but word keys do; passkey none.
    assert!(Generator::new().generate("passkey", &c, 0).is_ok());
}

fn austen_dir() -> PathBuf {
    let home = kvmerger_assets::data_dir(None);
    kvmerger_assets::fetch("austen", &home, &kvmerger_assets::NoProgress)
        .unwrap_or_else(|e| panic!("could not fetch the Austen data: {e}"))
}

#[test]
fn austen_has_six_novels() {
    let novels = tasks::text::austen(&austen_dir()).unwrap();
    let titles: Vec<&str> = novels.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(
        titles,
        [
            "Sense & Sensibility",
            "Pride & Prejudice",
            "Mansfield Park",
            "Emma",
            "Northanger Abbey",
            "Persuasion"
        ]
    );
    for (title, text) in &novels {
        assert!(text.len() > 100_000, "{title}: {} bytes", text.len());
        assert!(text.to_lowercase().contains("\nchapter "), "{title}");
    }
    let pride = &novels[1].1;
    assert!(pride.contains("It is a truth universally acknowledged"));
    assert!(novels[3]
        .1
        .contains("Emma Woodhouse, handsome, clever, and rich"));
}

#[test]
fn austen_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let err = tasks::text::austen(dir.path()).unwrap_err();
    assert!(err.to_string().contains("Rdata.rdx"), "{err}");
    std::fs::write(dir.path().join("Rdata.rdx"), b"not R data at all").unwrap();
    let err = tasks::text::austen(dir.path()).unwrap_err();
    assert!(err.to_string().contains("Rdata.rdx"), "{err}");
    // A good index with a damaged data file.
    let real = austen_dir();
    std::fs::copy(real.join("Rdata.rdx"), dir.path().join("Rdata.rdx")).unwrap();
    std::fs::write(dir.path().join("Rdata.rdb"), vec![0u8; 1000]).unwrap();
    let err = tasks::text::austen(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("Rdata.rdb") && err.contains("variable"),
        "{err}"
    );
}

#[test]
fn text_files_are_read_whole_with_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.txt");
    std::fs::write(&good, "héllo\nworld\n").unwrap();
    assert_eq!(
        tasks::text::read_text_file(&good).unwrap(),
        "héllo\nworld\n"
    );
    let missing = dir.path().join("missing.txt");
    let err = tasks::text::read_text_file(&missing).unwrap_err();
    assert!(matches!(err, Error::Io { .. }));
    assert!(err.to_string().contains("missing.txt"), "{err}");
    let latin1 = dir.path().join("latin1.txt");
    std::fs::write(&latin1, b"caf\xe9 au lait").unwrap();
    let err = tasks::text::read_text_file(&latin1)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("latin1.txt") && err.contains("UTF-8") && err.contains("offset 3"),
        "{err}"
    );
}

/// The query-agnostic protocol compresses the context before the question: every task
/// must cut its input where the question starts, after all of its context (needles,
/// chain, documents) and before anything that names what is asked.
#[test]
fn every_task_cuts_its_input_where_the_question_starts() {
    let g = Generator::new();
    for &task in tasks::task_names() {
        for index in 0..3 {
            let s = gen(&g, task, 2048, index);
            let (context, question) = s
                .split()
                .unwrap_or_else(|| panic!("{task} #{index} has no question split"));
            assert!(!context.is_empty() && !question.is_empty(), "{task}");
            // Every needle lies in the context.
            if let Some(pos) = s.meta.get("needle_positions").and_then(|v| v.as_array()) {
                for p in pos {
                    assert!(
                        (p.as_u64().unwrap() as usize) < context.len(),
                        "{task}: a needle in the question"
                    );
                }
            }
            // The question is short next to the context, and ends the input.
            assert!(question.len() * 10 < context.len(), "{task}: {question:?}");
            let starts = [
                "What is the special magic",
                "What are all the special magic",
                "Question: ",
                "Answer the question based on the given documents.",
                "What is the pass key?",
            ];
            assert!(
                starts.iter().any(|p| question.starts_with(p)),
                "{task}: {question:?}"
            );
            // Nothing the answer needs is in the question: no reference appears there
            // (except where a question restates part of a QA answer by chance).
            if !task.starts_with("qa") && task != "vt" {
                for r in &s.references {
                    assert!(
                        !question.contains(r.as_str()),
                        "{task}: {r} in {question:?}"
                    );
                }
            }
        }
    }
}

#[test]
fn samples_from_rulers_own_generator_are_cut_at_the_question_and_answer_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("niah_single_2.jsonl");
    let input = "Some special magic numbers are hidden within the following text. Make sure to memorize it. I will quiz you about the numbers afterwards.\nThe grass. One of the special magic numbers for sad-dog is: 1234567. More grass.\nWhat is the special magic number for sad-dog mentioned in the provided text? The special magic number for sad-dog mentioned in the provided text is";
    let line =
        serde_json::json!({"index": 7, "input": input, "outputs": ["1234567"], "length": 80});
    let no_reference = serde_json::json!({"index": 9, "input": input, "outputs": [], "length": 80});
    std::fs::write(&path, format!("{line}\n{{\"index\": 8, \"input\": \"no question here\", \"outputs\": [\"1\"]}}\nnot json\n{no_reference}\n")).unwrap();
    let read = tasks::read_ruler(&path, None).unwrap();
    assert_eq!(read.samples.len(), 1);
    // A line without a reference answer is refused, not scored 0.
    assert_eq!(read.errors.len(), 3, "{:?}", read.errors);
    assert!(
        read.errors[2].message.contains("outputs"),
        "{:?}",
        read.errors[2]
    );
    assert_eq!(read.errors[0].line, 2);
    let s = &read.samples[0];
    assert_eq!(s.task, "ruler/niah_single_2");
    assert_eq!(s.metric, Metric::StringMatchAll);
    assert_eq!(s.max_new_tokens, 128);
    assert_eq!(
        s.answer_prefix,
        " The special magic number for sad-dog mentioned in the provided text is"
    );
    let (context, question) = s.split().unwrap();
    assert!(context.ends_with("More grass.\n"));
    assert_eq!(
        question,
        "What is the special magic number for sad-dog mentioned in the provided text?"
    );
    // The task comes from the folder when the file name is not a task.
    let sub = dir.path().join("qa_1");
    std::fs::create_dir(&sub).unwrap();
    let qa = sub.join("validation.jsonl");
    let qa_input = "Answer the question based on the given documents. Only give me the answer.\n\nDocument 1:\nParis is in France.\n\nAnswer the question based on the given documents. Only give me the answer.\n\nQuestion: Where is Paris? Answer:";
    std::fs::write(
        &qa,
        format!(
            "{}\n",
            serde_json::json!({"index": 0, "input": qa_input, "outputs": ["France"]})
        ),
    )
    .unwrap();
    let read = tasks::read_ruler(&qa, None).unwrap();
    let s = &read.samples[0];
    assert_eq!(s.task, "ruler/qa_1");
    assert_eq!(s.metric, Metric::StringMatchPart);
    assert!(s.split().unwrap().0.contains("Paris is in France"));
    assert!(s
        .split()
        .unwrap()
        .1
        .starts_with("Answer the question based"));
    assert_eq!(s.answer_prefix, " Answer:");
    // A file that names no task is refused as a whole, with the known tasks.
    let other = dir.path().join("data.jsonl");
    std::fs::write(&other, "").unwrap();
    let e = tasks::read_ruler(&other, None).unwrap_err().to_string();
    assert!(e.contains("niah_single_1"), "{e}");
}
