//! llama.cpp's own tokenizer tests (`models/ggml-vocab-*.gguf` with `.inp` inputs and
//! `.out` expected ids, from the `llama-cpp-python` source package, which
//! scripts/fetch_vocab_tests.sh downloads into the data directory; nothing of it is
//! committed): every case of every vocabulary we load is encoded without special
//! tokens and compared with llama.cpp's ids.
//!
//! Every case must match. Vocabularies we refuse (BERT's WordPiece, Gemma 4's) must
//! be refused with an error that names the reason.

use kvmerger_engine::gguf::GgufFile;
use kvmerger_engine::tokenizer::Tokenizer;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Vocabularies we do not load (they are not used for generation), and what their
/// error must say.
const REFUSED: &[(&str, &str)] = &[
    ("bert-bge", "'bert' is not supported"),
    ("gemma-4", "'gemma4' is not supported"),
];

fn vocab_dir() -> PathBuf {
    kvmerger_assets::data_dir(None).join("llama-vocab")
}

/// The inputs of a `.inp` file and the ids of its `.out` file, case by case.
fn cases(name: &str) -> Vec<(String, Vec<u32>)> {
    let dir = vocab_dir();
    let inp = std::fs::read_to_string(dir.join(format!("ggml-vocab-{name}.gguf.inp"))).unwrap();
    let out = std::fs::read_to_string(dir.join(format!("ggml-vocab-{name}.gguf.out"))).unwrap();
    let mut inputs: Vec<String> = inp
        .split("\n__ggml_vocab_test__\n")
        .map(str::to_string)
        .collect();
    if inputs.last().is_some_and(|s| s.is_empty()) {
        inputs.pop();
    }
    let ids: Vec<Vec<u32>> = out
        .lines()
        .map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect())
        .collect();
    assert_eq!(
        inputs.len(),
        ids.len(),
        "{name}: inputs and outputs differ in count"
    );
    inputs.into_iter().zip(ids).collect()
}

#[test]
fn llama_cpp_vocabulary_tests_all_match() {
    let dir = vocab_dir();
    assert!(
        dir.is_dir(),
        "{} is missing: run scripts/fetch_vocab_tests.sh (scripts/test does)",
        dir.display()
    );
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| {
            let n = e.ok()?.file_name().into_string().ok()?;
            let stem = n.strip_prefix("ggml-vocab-")?.strip_suffix(".gguf.inp")?;
            Some(stem.to_string())
        })
        .collect();
    names.sort();
    assert!(
        names.len() >= 12,
        "only {} vocabularies in {}",
        names.len(),
        dir.display()
    );
    let mut mismatches = Vec::new();
    let mut refused = BTreeMap::new();
    let (mut total, mut passed) = (0, 0);
    for name in &names {
        let path = dir.join(format!("ggml-vocab-{name}.gguf"));
        let tok = GgufFile::open(&path).and_then(|f| Tokenizer::from_gguf(&f));
        let tok = match tok {
            Ok(t) => t,
            Err(e) => {
                refused.insert(name.clone(), e.to_string());
                continue;
            }
        };
        let cs = cases(name);
        let mut ok = 0;
        for (i, (text, want)) in cs.iter().enumerate() {
            match tok.encode(text, false) {
                Ok(got) if &got == want => ok += 1,
                _ => mismatches.push((name.clone(), i, text.clone())),
            }
        }
        eprintln!("{name}: {ok} of {}", cs.len());
        total += cs.len();
        passed += ok;
    }
    eprintln!("{passed} of {total} cases match llama.cpp; refused: {refused:?}");
    assert_eq!(passed + mismatches.len(), total);
    assert!(
        mismatches.is_empty(),
        "cases that do not match llama.cpp: {mismatches:?}"
    );
    let want_refused: BTreeMap<String, &str> =
        REFUSED.iter().map(|(n, w)| (n.to_string(), *w)).collect();
    assert_eq!(
        refused.keys().collect::<Vec<_>>(),
        want_refused.keys().collect::<Vec<_>>(),
        "{refused:?}"
    );
    for (name, e) in &refused {
        assert!(e.contains(want_refused[name]), "{name}: {e}");
    }
}
