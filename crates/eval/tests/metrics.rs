//! Metrics against examples computed by hand.

use kvmerger_eval::metrics::{self, *};
use kvmerger_eval::{Metric, Sample};

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

#[test]
fn string_match_all_is_the_fraction_of_references_found_ignoring_case() {
    let refs = s(&["1234567", "ABC-def", "999"]);
    // 1234567 and abc-DEF are there, 999 is not: 2/3.
    let pred = "The numbers are 1234567 and abc-DEF.";
    assert!(close(string_match_all(pred, &refs), 2.0 / 3.0));
    assert!(close(
        score(&Metric::StringMatchAll, pred, &refs),
        2.0 / 3.0
    ));
    assert_eq!(string_match_all("nothing", &refs), 0.0);
    assert_eq!(string_match_all("1234567 abc-def 999", &refs), 1.0);
    assert_eq!(string_match_all("anything", &[]), 0.0);
}

#[test]
fn string_match_part_is_one_if_any_reference_is_found() {
    let refs = s(&["Rollo", "Rolf"]);
    assert_eq!(string_match_part("It was ROLLO.", &refs), 1.0);
    assert_eq!(score(&Metric::StringMatchPart, "rolf", &refs), 1.0);
    assert_eq!(string_match_part("Harald", &refs), 0.0);
}

#[test]
fn normalization_drops_case_punctuation_articles_and_extra_space() {
    assert_eq!(
        normalize_answer("  The Cat, an owl & a DOG!  "),
        "cat owl dog"
    );
    assert_eq!(normalize_answer("theatre"), "theatre");
    assert_eq!(normalize_answer("“Quoted” — text…"), "quoted text");
    assert_eq!(normalize_answer("北京，中国。"), "北京中国");
}

#[test]
fn qa_f1_by_hand() {
    // pred "the cat sat on the mat" -> [cat, sat, on, mat] (4 tokens)
    // ref  "A cat on a mat."       -> [cat, on, mat]      (3 tokens)
    // common 3: P = 3/4, R = 3/3, F1 = 2·0.75·1/1.75 = 6/7.
    assert!(close(
        qa_f1("the cat sat on the mat", "A cat on a mat."),
        6.0 / 7.0
    ));
    // Repeated tokens count as a multiset: pred [go, go, go], ref [go, home]:
    // common 1, P = 1/3, R = 1/2, F1 = 2·(1/6)/(5/6) = 0.4.
    assert!(close(qa_f1("go go go", "go home"), 0.4));
    assert_eq!(qa_f1("Paris", "London"), 0.0);
    assert_eq!(qa_f1("", "London"), 0.0);
    // Best over references.
    let refs = s(&["London", "Paris, France"]);
    // vs "Paris, France": pred [paris] ref [paris, france]: P 1, R 1/2, F1 2/3.
    assert!(close(score(&Metric::QaF1, "Paris", &refs), 2.0 / 3.0));
    // Chinese: one token per character. pred 北京市 [北,京,市], ref 北京 [北,京]:
    // common 2, P 2/3, R 1, F1 = 2·(2/3)/(5/3) = 0.8.
    assert!(close(qa_f1("北京市", "北京"), 0.8));
    assert!(close(token_f1(&["a", "b"], &["b", "c"]), 0.5));
}

#[test]
fn rouge_l_by_hand() {
    // pred [the, cat, was, found, under, the, bed] (7)
    // ref  [the, cat, was, under, the, bed]        (6)
    // LCS = the cat was under the bed = 6; F1 = 2·6/(7+6) = 12/13.
    assert!(close(
        rouge_l(
            "The cat was found under the bed.",
            "the cat was under the bed"
        ),
        12.0 / 13.0
    ));
    // pred [police, killed, the, gunman] ref [the, gunman, killed, police]:
    // LCS 2 (e.g. "the gunman"), F1 = 2·2/8 = 0.5.
    assert!(close(
        rouge_l("police killed the gunman", "the gunman killed police"),
        0.5
    ));
    assert_eq!(rouge_l("", "anything"), 0.0);
    assert_eq!(lcs_len(&[1, 2, 3, 4], &[2, 4, 3]), 2);
    assert!(close(
        score(&Metric::RougeL, "a b c", &s(&["x y", "a b d"])),
        2.0 * 2.0 / 6.0
    ));
    // CJK characters are tokens: 今天天气好 vs 今天好: LCS 3 (今,天,好), F1 = 6/8.
    assert!(close(rouge_l("今天天气好", "今天好"), 0.75));
}

#[test]
fn edit_similarity_and_code_sim_by_hand() {
    // "kitten" / "sitting": LCS "ittn" = 4, similarity 2·4/(6+7) = 8/13.
    assert!(close(edit_similarity("kitten", "sitting"), 8.0 / 13.0));
    assert_eq!(edit_similarity("", ""), 1.0);
    assert_eq!(edit_similarity("abc", ""), 0.0);
    // The first line without a comment or code fence is compared:
    // "x = 1" vs "x = 2": LCS "x = " = 4, 2·4/10 = 0.8.
    let pred = "\n```python\n# set x\nx = 1\ny = 2";
    assert!(close(code_sim(pred, "x = 2"), 0.8));
    assert!(close(score(&Metric::CodeSim, pred, &s(&["x = 2"])), 0.8));
    // Nothing usable: the empty string against the reference.
    assert_eq!(code_sim("// only a comment", "x = 2"), 0.0);
}

#[test]
fn classification_by_hand() {
    let classes = s(&["Entity", "Location", "Human being", "Human"]);
    // "Human being" matches "Human being" and "Human"; "Human" is a part of the
    // reference, so it is dropped: 1 match, the right one: 1.
    assert_eq!(
        classification("Type: Human being", "Human being", &classes),
        1.0
    );
    // Two classes named, one right: 1/2.
    assert_eq!(
        classification("Location or Entity", "Location", &classes),
        0.5
    );
    assert_eq!(classification("Entity", "Location", &classes), 0.0);
    let m = Metric::Classification { classes };
    assert_eq!(score(&m, "Location", &s(&["Location"])), 1.0);
}

#[test]
fn retrieval_and_count_by_hand() {
    // Numbers in the prediction: 3, 12 -> one of two is 12: 0.5.
    assert_eq!(
        retrieval("Paragraph 3 or Paragraph 12", "Paragraph 12"),
        0.5
    );
    assert_eq!(retrieval("Paragraph 12", "Paragraph 12"), 1.0);
    assert_eq!(retrieval("no idea", "Paragraph 12"), 0.0);
    assert_eq!(retrieval("段落5", "段落5"), 1.0);
    assert_eq!(score(&Metric::Retrieval, "12", &s(&["Paragraph 12"])), 1.0);
    // Numbers 7, 8, 7: two of three equal 7.
    assert!(close(count("7 or 8, I say 7", "7"), 2.0 / 3.0));
    assert_eq!(count("seven", "7"), 0.0);
    assert_eq!(score(&Metric::Count, "There are 7.", &s(&["7"])), 1.0);
}

#[test]
fn exact_match_after_normalization() {
    assert_eq!(exact_match("The Answer!", "answer"), 1.0);
    assert_eq!(exact_match("an answer here", "answer"), 0.0);
    assert_eq!(score(&Metric::ExactMatch, "(B)", &s(&["A", "b"])), 1.0);
}

#[test]
fn every_score_is_in_the_unit_interval() {
    let metrics = [
        Metric::StringMatchAll,
        Metric::StringMatchPart,
        Metric::QaF1,
        Metric::RougeL,
        Metric::Classification {
            classes: s(&["a", "b"]),
        },
        Metric::Retrieval,
        Metric::Count,
        Metric::CodeSim,
        Metric::ExactMatch,
    ];
    let preds = ["", "a", "Paragraph 1 a b", "1 1 1", "北京 a"];
    let refs = [
        s(&[]),
        s(&["a"]),
        s(&["Paragraph 1", "b"]),
        s(&["1", "北京"]),
    ];
    for m in &metrics {
        for p in preds {
            for r in &refs {
                let x = score(m, p, r);
                assert!((0.0..=1.0).contains(&x), "{m:?} {p:?} {r:?}: {x}");
            }
        }
    }
}

#[test]
fn score_sample_keeps_the_first_line_when_asked() {
    let mut sample = Sample {
        task: "longbench/triviaqa".into(),
        index: 0,
        input: String::new(),
        question_at: None,
        answer_prefix: String::new(),
        references: s(&["Paris"]),
        metric: Metric::QaF1,
        max_new_tokens: 32,
        meta: Default::default(),
    };
    let pred = "\nParis\nQuestion: what else? London";
    // Whole prediction: [paris, question, what, else, london]: P 1/5, R 1, F1 1/3.
    assert!(close(metrics::score_sample(&sample, pred), 1.0 / 3.0));
    sample
        .meta
        .insert("postprocess".into(), serde_json::json!("first_line"));
    assert_eq!(metrics::score_sample(&sample, pred), 1.0);
    assert_eq!(first_line("\n\nab\ncd"), "ab");
}

#[test]
fn folding_ignores_case_and_the_accents_of_latin_letters() {
    use kvmerger_eval::metrics::fold_case_and_accents as fold;
    assert_eq!(fold("Reykjavík"), "reykjavik");
    assert_eq!(
        fold("KRAKÓW, Tromsø, Valparaíso"),
        "krakow, tromso, valparaiso"
    );
    assert_eq!(fold("東京 Osaka"), "東京 osaka");
}
