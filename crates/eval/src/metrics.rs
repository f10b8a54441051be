//! Scores for predictions, each in [0, 1].
//!
//! [`score`] dispatches on a [`Metric`]; [`score_sample`] also applies the
//! post-processing a sample asks for in its `meta` (see below). The building blocks
//! are public so reports can show them separately:
//!
//! - RULER ([`string_match_all`], [`string_match_part`]): case-insensitive substring
//!   tests of each reference against the prediction (RULER's `string_match_all` /
//!   `string_match_part`, as fractions instead of percentages);
//! - LongBench: [`normalize_answer`], [`token_f1`] / [`qa_f1`], [`rouge_l`],
//!   [`classification`], [`retrieval`], [`count`], [`code_sim`] (built on
//!   [`edit_similarity`]), and [`exact_match`].
//!
//! Every metric except [`Metric::StringMatchAll`] takes the best score over the
//! references, as LongBench does; no references scores 0.
//!
//! Deviations from the Python originals, all deliberate:
//!
//! - Chinese: LongBench segments Chinese text with `jieba` for `qa_f1_zh` and
//!   `rouge_zh`. Here every CJK character is its own token, in every metric, so one
//!   [`Metric::QaF1`] / [`Metric::RougeL`] serves both languages (character-level F1 is
//!   the usual dependency-free stand-in). English text is unaffected.
//! - Punctuation: [`normalize_answer`] removes ASCII punctuation (Python's
//!   `string.punctuation`, as LongBench) and also common Unicode punctuation (curly
//!   quotes, dashes, ellipses, CJK and full-width punctuation, as LongBench's
//!   `normalize_zh_answer` does for Chinese).
//! - ROUGE-L: LongBench calls the `rouge` package, which splits texts into
//!   sentences at `.` and computes a summary-level union LCS with an F-measure
//!   weighted by P/R. Here [`rouge_l`] is the plain ROUGE-L F1 of the two token
//!   sequences (`2·LCS / (|pred| + |ref|)`), tokenized as the reference
//!   `rouge-score` implementation does (lower-case, alphanumeric runs).
//! - Code similarity: LongBench uses `fuzz.ratio`; [`edit_similarity`] is the same
//!   quantity (the normalized Indel similarity `2·LCS / (|a| + |b|)` over
//!   characters) without rounding to whole percents.
//!
//! `meta` keys read by [`score_sample`]: `postprocess` = `"first_line"` keeps only the
//! first line of the prediction (after leading newlines), as LongBench does for
//! trec, triviaqa, samsum and lsht; `"choice_letter"` reduces a prediction that starts
//! with an option letter (`B`, `(B) ...`, `B. ...`) to that letter (QuALITY).

use std::collections::HashMap;

use crate::sample::{Metric, Sample};

/// Scores `prediction` against `references` with `metric`, in [0, 1].
pub fn score(metric: &Metric, prediction: &str, references: &[String]) -> f64 {
    let best = |f: &dyn Fn(&str) -> f64| references.iter().map(|r| f(r)).fold(0.0, f64::max);
    match metric {
        Metric::StringMatchAll => string_match_all(prediction, references),
        Metric::StringMatchPart => string_match_part(prediction, references),
        Metric::QaF1 => best(&|r| qa_f1(prediction, r)),
        Metric::RougeL => best(&|r| rouge_l(prediction, r)),
        Metric::Classification { classes } => best(&|r| classification(prediction, r, classes)),
        Metric::Retrieval => best(&|r| retrieval(prediction, r)),
        Metric::Count => best(&|r| count(prediction, r)),
        Metric::CodeSim => best(&|r| code_sim(prediction, r)),
        Metric::ExactMatch => best(&|r| exact_match(prediction, r)),
    }
}

/// [`score`] for a sample, after the post-processing its `meta` asks for
/// (`postprocess`: `"first_line"` or `"choice_letter"`).
pub fn score_sample(sample: &Sample, prediction: &str) -> f64 {
    let letter;
    let prediction = match sample.meta.get("postprocess").and_then(|v| v.as_str()) {
        Some("first_line") => first_line(prediction),
        Some("choice_letter") => match choice_letter(prediction) {
            Some(c) => {
                letter = c.to_string();
                letter.as_str()
            }
            None => prediction,
        },
        _ => prediction,
    };
    score(&sample.metric, prediction, &sample.references)
}

/// The option letter a multiple-choice answer starts with: `B`, `(B) the ship`,
/// `B. the ship`, `B: ...` give `B`; anything else `None`.
pub fn choice_letter(s: &str) -> Option<char> {
    let t = s.trim_start();
    let t = t.strip_prefix('(').unwrap_or(t);
    let mut chars = t.chars();
    let letter = chars.next().filter(|c| c.is_ascii_uppercase())?;
    match chars.next() {
        None => Some(letter),
        Some(c) if c == ')' || c == '.' || c == ':' || c.is_whitespace() => Some(letter),
        _ => None,
    }
}

/// The first line of `s` after any leading newlines.
pub fn first_line(s: &str) -> &str {
    let s = s.trim_start_matches('\n');
    s.split('\n').next().unwrap_or("")
}

/// RULER `string_match_all`: the fraction of references that occur in the prediction,
/// ignoring case.
pub fn string_match_all(prediction: &str, references: &[String]) -> f64 {
    if references.is_empty() {
        return 0.0;
    }
    let pred = prediction.to_lowercase();
    let found = references
        .iter()
        .filter(|r| pred.contains(&r.to_lowercase()))
        .count();
    found as f64 / references.len() as f64
}

/// RULER `string_match_part`: 1 if any reference occurs in the prediction, ignoring
/// case.
pub fn string_match_part(prediction: &str, references: &[String]) -> f64 {
    let pred = prediction.to_lowercase();
    let any = references.iter().any(|r| pred.contains(&r.to_lowercase()));
    if any {
        1.0
    } else {
        0.0
    }
}

/// Whether `c` is a CJK ideograph, kana or hangul syllable: such characters are one
/// token each.
pub fn is_cjk(c: char) -> bool {
    matches!(c as u32,
        0x3040..=0x30FF      // hiragana, katakana
        | 0x3400..=0x4DBF    // CJK extension A
        | 0x4E00..=0x9FFF    // CJK unified ideographs
        | 0xAC00..=0xD7AF    // hangul syllables
        | 0xF900..=0xFAFF    // CJK compatibility ideographs
        | 0x20000..=0x2FA1F) // CJK extensions B.. and compatibility supplement
}

/// Punctuation removed by [`normalize_answer`]: ASCII punctuation plus general,
/// CJK and full-width punctuation.
pub fn is_punctuation(c: char) -> bool {
    c.is_ascii_punctuation()
        || matches!(c as u32,
            0x00A1..=0x00BF      // Latin-1 punctuation and signs
            | 0x2010..=0x205E    // dashes, quotes, ellipsis, ...
            | 0x3000..=0x303F    // CJK symbols and punctuation
            | 0xFE30..=0xFE4F    // CJK compatibility forms
            | 0xFF01..=0xFF0F    // full-width ASCII punctuation ...
            | 0xFF1A..=0xFF20
            | 0xFF3B..=0xFF40
            | 0xFF5B..=0xFF65)
}

/// `s` in lower case with the accents of Latin letters removed (`Reykjavík` ->
/// `reykjavik`, `Kraków` -> `krakow`): for matching answers that a model may spell with
/// or without them.
pub fn fold_case_and_accents(s: &str) -> String {
    s.to_lowercase()
        .chars()
        .map(|c| match c {
            'à'..='å' | 'ā' | 'ă' | 'ą' => 'a',
            'ç' | 'ć' | 'ĉ' | 'ċ' | 'č' => 'c',
            'ď' | 'đ' => 'd',
            'è'..='ë' | 'ē' | 'ĕ' | 'ė' | 'ę' | 'ě' => 'e',
            'ĝ' | 'ğ' | 'ġ' | 'ģ' => 'g',
            'ì'..='ï' | 'ĩ' | 'ī' | 'ĭ' | 'į' | 'ı' => 'i',
            'ñ' | 'ń' | 'ņ' | 'ň' => 'n',
            'ò'..='ö' | 'ø' | 'ō' | 'ŏ' | 'ő' => 'o',
            'ś' | 'ŝ' | 'ş' | 'š' => 's',
            'ţ' | 'ť' => 't',
            'ù'..='ü' | 'ũ' | 'ū' | 'ŭ' | 'ů' | 'ű' | 'ų' => 'u',
            'ý' | 'ÿ' => 'y',
            'ź' | 'ż' | 'ž' => 'z',
            'ł' => 'l',
            c => c,
        })
        .collect()
}

/// LongBench / SQuAD answer normalization: lower-case, remove punctuation, drop the
/// articles `a`, `an`, `the`, and collapse whitespace to single spaces.
pub fn normalize_answer(s: &str) -> String {
    let lower = s.to_lowercase();
    let no_punct: String = lower.chars().filter(|&c| !is_punctuation(c)).collect();
    no_punct
        .split_whitespace()
        .filter(|w| !matches!(*w, "a" | "an" | "the"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Whitespace tokens of a normalized text, with each CJK character split off as a
/// token of its own.
fn f1_tokens(normalized: &str) -> Vec<String> {
    let mut out = Vec::new();
    for word in normalized.split_whitespace() {
        let mut cur = String::new();
        for c in word.chars() {
            if is_cjk(c) {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
                out.push(c.to_string());
            } else {
                cur.push(c);
            }
        }
        if !cur.is_empty() {
            out.push(cur);
        }
    }
    out
}

/// Token-level F1 of two token sequences as multisets (SQuAD's `f1_score`):
/// `common = |pred ∩ ref|`, `P = common/|pred|`, `R = common/|ref|`, `F1 = 2PR/(P+R)`;
/// 0 when nothing is in common.
pub fn token_f1<S: AsRef<str>>(prediction: &[S], reference: &[S]) -> f64 {
    let mut counts: HashMap<&str, isize> = HashMap::new();
    for t in reference {
        *counts.entry(t.as_ref()).or_default() += 1;
    }
    let mut common = 0usize;
    for t in prediction {
        if let Some(c) = counts.get_mut(t.as_ref()) {
            if *c > 0 {
                *c -= 1;
                common += 1;
            }
        }
    }
    if common == 0 {
        return 0.0;
    }
    let p = common as f64 / prediction.len() as f64;
    let r = common as f64 / reference.len() as f64;
    2.0 * p * r / (p + r)
}

/// LongBench `qa_f1_score`: [`token_f1`] of the [`normalize_answer`]ed texts
/// (character-level for CJK text).
pub fn qa_f1(prediction: &str, reference: &str) -> f64 {
    token_f1(
        &f1_tokens(&normalize_answer(prediction)),
        &f1_tokens(&normalize_answer(reference)),
    )
}

/// ROUGE tokens: lower-cased runs of alphanumeric characters, every CJK character a
/// token of its own, everything else a separator.
pub fn rouge_tokens(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for c in s.chars() {
        if is_cjk(c) {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
            out.push(c.to_string());
        } else if c.is_alphanumeric() {
            cur.extend(c.to_lowercase());
        } else if !cur.is_empty() {
            out.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Length of the longest common subsequence of `a` and `b`.
pub fn lcs_len<T: PartialEq>(a: &[T], b: &[T]) -> usize {
    let (a, b) = if a.len() < b.len() { (b, a) } else { (a, b) };
    let mut prev = vec![0u32; b.len() + 1];
    let mut cur = vec![0u32; b.len() + 1];
    for x in a {
        for (j, y) in b.iter().enumerate() {
            cur[j + 1] = if x == y {
                prev[j] + 1
            } else {
                cur[j].max(prev[j + 1])
            };
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()] as usize
}

/// ROUGE-L F1 over [`rouge_tokens`]: `P = LCS/|pred|`, `R = LCS/|ref|`,
/// `F1 = 2PR/(P+R) = 2·LCS/(|pred|+|ref|)`; 0 if either side has no tokens.
pub fn rouge_l(prediction: &str, reference: &str) -> f64 {
    let p = rouge_tokens(prediction);
    let r = rouge_tokens(reference);
    if p.is_empty() || r.is_empty() {
        return 0.0;
    }
    2.0 * lcs_len(&p, &r) as f64 / (p.len() + r.len()) as f64
}

/// Normalized Indel similarity of two strings over characters:
/// `2·LCS / (|a| + |b|)` (1 for two empty strings). This is what `fuzz.ratio`
/// computes, as a fraction.
pub fn edit_similarity(a: &str, b: &str) -> f64 {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    if a.is_empty() && b.is_empty() {
        return 1.0;
    }
    2.0 * lcs_len(&a, &b) as f64 / (a.len() + b.len()) as f64
}

/// LongBench `code_sim_score`: the first line of the prediction (after leading
/// newlines) that holds no backtick, `#` or `//` — or nothing if there is none — is
/// compared to the reference with [`edit_similarity`].
pub fn code_sim(prediction: &str, reference: &str) -> f64 {
    let line = prediction
        .trim_start_matches('\n')
        .split('\n')
        .find(|l| !l.contains('`') && !l.contains('#') && !l.contains("//"))
        .unwrap_or("");
    edit_similarity(line, reference)
}

/// LongBench `classification_score`: the classes named in the prediction, less those
/// that are merely substrings of the reference; `1/|matches|` if the reference is
/// among them, else 0.
pub fn classification(prediction: &str, reference: &str, classes: &[String]) -> f64 {
    let matches: Vec<&String> = classes
        .iter()
        .filter(|c| prediction.contains(c.as_str()))
        .filter(|c| !(reference.contains(c.as_str()) && c.as_str() != reference))
        .collect();
    if matches.iter().any(|c| c.as_str() == reference) {
        1.0 / matches.len() as f64
    } else {
        0.0
    }
}

/// Runs of ASCII digits in `s`.
fn numbers(s: &str) -> Vec<&str> {
    s.split(|c: char| !c.is_ascii_digit())
        .filter(|t| !t.is_empty())
        .collect()
}

/// LongBench `retrieval_score`: the paragraph number in the reference (`Paragraph N`,
/// or `段落N` for the Chinese set), and the fraction of numbers in the prediction
/// that equal it (0 if the prediction holds no number).
pub fn retrieval(prediction: &str, reference: &str) -> f64 {
    let id = ["Paragraph ", "段落"].iter().find_map(|marker| {
        let at = reference.find(marker)?;
        let digits: String = reference[at + marker.len()..]
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect();
        (!digits.is_empty()).then_some(digits)
    });
    match id {
        Some(id) => fraction_equal(prediction, &id),
        None => 0.0,
    }
}

/// LongBench `count_score`: the fraction of numbers in the prediction equal to the
/// reference (0 if the prediction holds no number).
pub fn count(prediction: &str, reference: &str) -> f64 {
    fraction_equal(prediction, reference.trim())
}

fn fraction_equal(prediction: &str, target: &str) -> f64 {
    let nums = numbers(prediction);
    if nums.is_empty() {
        return 0.0;
    }
    nums.iter().filter(|n| **n == target).count() as f64 / nums.len() as f64
}

/// 1 if the [`normalize_answer`]ed texts are equal.
pub fn exact_match(prediction: &str, reference: &str) -> f64 {
    if normalize_answer(prediction) == normalize_answer(reference) {
        1.0
    } else {
        0.0
    }
}
