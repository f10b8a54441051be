//! LongBench and ZeroSCROLLS JSONL readers.
//!
//! Both read a file line by line: a line that is not valid JSON, lacks a required
//! field or has one of the wrong type becomes a [`LineError`] with its 1-based line
//! number, and the other lines are still read. Blank lines are skipped. A missing file
//! or an unknown dataset name is an [`Error`] for the whole file.
//!
//! # LongBench
//!
//! [`read_longbench`] reads LongBench's format: one object per line with `input`,
//! `context`, `answers` (required), `all_classes` (required for `trec` and `lsht`),
//! `length`, `dataset`, `language`, `_id`. The dataset is the `dataset` argument, or
//! else each line's `dataset` field (a LongBench-E name such as `hotpotqa_e` counts as
//! `hotpotqa`); a line naming another dataset than the argument is an error. Each
//! dataset has its prompt (written here in our own words, keeping what each of
//! LongBench's asks for, including answer formats the metrics rely on such as
//! "Paragraph N" or "unanswerable"), its maximum generation length and its metric:
//!
//! | datasets | metric | new tokens |
//! |---|---|---|
//! | narrativeqa, qasper | QA F1 | 128 |
//! | multifieldqa_en, multifieldqa_zh | QA F1 (character-level for Chinese) | 64 |
//! | hotpotqa, 2wikimqa, musique | QA F1 | 32 |
//! | dureader | ROUGE-L (character-level) | 128 |
//! | gov_report, qmsum, multi_news, vcsum | ROUGE-L | 512 |
//! | trec, lsht | classification over `all_classes` (first line) | 64 |
//! | triviaqa | QA F1 (first line) | 32 |
//! | samsum | ROUGE-L (first line) | 128 |
//! | passage_count | count | 32 |
//! | passage_retrieval_en, passage_retrieval_zh | retrieval | 32 |
//! | lcc, repobench-p | code similarity | 64 |
//!
//! The whole prompt is the sample's `input` (`answer_prefix` is empty). Samples are
//! named `longbench/<dataset>`; `meta` holds `dataset`, `line`, `id`, `language`,
//! `words` (LongBench's `length`), `postprocess: "first_line"` for the four datasets
//! LongBench scores on the first line of the answer (see
//! [`crate::metrics::score_sample`]), and `chat_template: false` for the few-shot and
//! code-completion datasets (trec, triviaqa, samsum, lsht, lcc, repobench-p) that
//! LongBench feeds to chat models without their chat template.
//!
//! # ZeroSCROLLS
//!
//! [`read_zeroscrolls`] reads ZeroSCROLLS's format: `id`, `input` (the whole prompt:
//! instruction, document, query), `output` (required; the hidden test split has none)
//! and optionally `pid`, `document_start_index`, `document_end_index`,
//! `query_start_index`, `query_end_index`, `truncation_seperator` (kept in `meta` for
//! truncating the document to a model's length). Lines have no dataset field: the
//! dataset is the `dataset` argument, or else the file's name or its folder's name
//! (`gov_report.jsonl`, `qasper/validation.jsonl`). Lines with the same `id` are one
//! sample with several references (how SCROLLS stores multiple answers). Metrics:
//!
//! | datasets | metric | new tokens |
//! |---|---|---|
//! | gov_report | ROUGE-L | 1024 |
//! | summ_screen_fd, qmsum, squality | ROUGE-L | 512 |
//! | qasper | QA F1 | 128 |
//! | narrative_qa | QA F1 | 64 |
//! | musique | QA F1 | 32 |
//! | quality | exact match of the option letter | 16 |
//! | space_digest | exact match of the percentage | 32 |
//! | book_sum_sort | exact match of the order | 256 |
//!
//! Deviations: ZeroSCROLLS scores summaries by the geometric mean of ROUGE-1, -2 and -L
//! (here ROUGE-L alone); SpaceDigest by an exponential similarity of percentages and
//! BookSumSort by a concordance index (here exact match after normalization, which is
//! stricter). For QuALITY the references are the gold output and its option letter,
//! and `meta.postprocess = "choice_letter"` makes [`crate::metrics::score_sample`]
//! reduce a prediction such as "(B) the ship" to its letter first. The generation
//! lengths are ours, in line with the ZeroSCROLLS baselines.

use std::collections::HashMap;
use std::path::Path;

use serde_json::{json, Map, Value};

use super::Error;
use crate::sample::{Metric, Sample};

/// One line that could not be read.
#[derive(Clone, Debug, PartialEq)]
pub struct LineError {
    /// 1-based line number.
    pub line: usize,
    pub message: String,
}

/// The samples of a file and the lines that could not be read.
#[derive(Clone, Debug, Default)]
pub struct JsonlSamples {
    pub samples: Vec<Sample>,
    pub errors: Vec<LineError>,
}

/// A 1-based line number and the line's text, or why it has none.
type Line = (usize, Result<String, String>);

/// The non-blank lines of a file; a line that is not UTF-8 is an error of its own.
fn lines(path: &Path) -> Result<Vec<Line>, Error> {
    let bytes = super::read_user_file(path)?;
    Ok(bytes
        .split(|&b| b == b'\n')
        .enumerate()
        .filter(|(_, l)| !l.iter().all(u8::is_ascii_whitespace))
        .map(|(i, l)| {
            let l = std::str::from_utf8(l)
                .map(|s| s.trim_end_matches('\r').to_string())
                .map_err(|e| format!("not UTF-8 (invalid byte at column {})", e.valid_up_to() + 1));
            (i + 1, l)
        })
        .collect())
}

fn parse_object(line: &str) -> Result<Map<String, Value>, String> {
    match serde_json::from_str::<Value>(line) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err("not a JSON object".into()),
        Err(e) => Err(format!("invalid JSON: {e}")),
    }
}

fn string(obj: &Map<String, Value>, field: &str) -> Result<String, String> {
    match obj.get(field) {
        None => Err(format!("missing field `{field}`")),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Null) => Err(format!("field `{field}` is null")),
        Some(_) => Err(format!("field `{field}` is not a string")),
    }
}

fn strings(obj: &Map<String, Value>, field: &str) -> Result<Vec<String>, String> {
    match obj.get(field) {
        None => Err(format!("missing field `{field}`")),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                Value::Number(n) => Ok(n.to_string()),
                _ => Err(format!("field `{field}` is not a list of strings")),
            })
            .collect(),
        Some(Value::Null) => Err(format!("field `{field}` is null")),
        Some(_) => Err(format!("field `{field}` is not a list of strings")),
    }
}

// ---------------------------------------------------------------------------------
// LongBench

struct LongBench {
    name: &'static str,
    template: &'static str,
    max_new_tokens: usize,
    metric: Kind,
    /// Scored on the first line of the answer, fed without a chat template.
    first_line: bool,
    chat_template: bool,
}

#[derive(Clone, Copy)]
enum Kind {
    QaF1,
    Rouge,
    Classification,
    Retrieval,
    Count,
    CodeSim,
}

const QA_PASSAGES: &str = "Answer the question using the passages below. Reply with the answer alone, without any other words.\n\nThe passages:\n{context}\n\nUsing the passages above, answer the question. Reply with the answer alone, without any other words.\n\nQuestion: {input}\nAnswer:";

/// The multi-document QA datasets (hotpotqa, 2wikimqa, musique): one prompt, short
/// answers scored by F1.
const fn passages_qa(name: &'static str) -> LongBench {
    LongBench {
        name,
        template: QA_PASSAGES,
        max_new_tokens: 32,
        metric: Kind::QaF1,
        first_line: false,
        chat_template: true,
    }
}

const LONGBENCH: &[LongBench] = &[
    LongBench {
        name: "narrativeqa",
        template: "Below is a story (from a novel or a film script) and a question about it. Answer the question as briefly as you can, in a single phrase if possible, and do not explain.\n\nStory: {context}\n\nNow answer the question about the story above as briefly as you can, in a single phrase if possible, and do not explain.\n\nQuestion: {input}\n\nAnswer:",
        max_new_tokens: 128,
        metric: Kind::QaF1,
        first_line: false,
        chat_template: true,
    },
    LongBench {
        name: "qasper",
        template: "Below is a scientific paper and a question about it. Answer as briefly as you can, in a single phrase or sentence if possible. If the paper does not let you answer, reply \"unanswerable\". If it is a yes/no question, reply \"yes\", \"no\" or \"unanswerable\". Do not explain.\n\nArticle: {context}\n\nNow answer the question about the paper above as briefly as you can, in a single phrase or sentence if possible. If the paper does not let you answer, reply \"unanswerable\". If it is a yes/no question, reply \"yes\", \"no\" or \"unanswerable\". Do not explain.\n\nQuestion: {input}\n\nAnswer:",
        max_new_tokens: 128,
        metric: Kind::QaF1,
        first_line: false,
        chat_template: true,
    },
    LongBench {
        name: "multifieldqa_en",
        template: "Read the text below and answer briefly.\n\n{context}\n\nNow answer the question below from the text above. Reply with the answer alone, without any other words.\n\nQuestion: {input}\nAnswer:",
        max_new_tokens: 64,
        metric: Kind::QaF1,
        first_line: false,
        chat_template: true,
    },
    LongBench {
        name: "multifieldqa_zh",
        template: "请阅读下面的文字，并用中文简要作答：\n\n{context}\n\n请根据上文回答下面的问题，只给出答案，不要写任何其他内容。\n\n问题：{input}\n回答：",
        max_new_tokens: 64,
        metric: Kind::QaF1,
        first_line: false,
        chat_template: true,
    },
    passages_qa("hotpotqa"),
    passages_qa("2wikimqa"),
    passages_qa("musique"),
    LongBench {
        name: "dureader",
        template: "请根据下面的若干篇文章回答问题。\n\n文章：{context}\n\n请根据以上文章回答问题。\n\n问题：{input}\n回答：",
        max_new_tokens: 128,
        metric: Kind::Rouge,
        first_line: false,
        chat_template: true,
    },
    LongBench {
        name: "gov_report",
        template: "Below is a report from a government agency. Write a summary of it, about one page long.\n\nReport:\n{context}\n\nNow write a summary of the report above, about one page long.\n\nSummary:",
        max_new_tokens: 512,
        metric: Kind::Rouge,
        first_line: false,
        chat_template: true,
    },
    LongBench {
        name: "qmsum",
        template: "Below is the transcript of a meeting, then a query (a question or an instruction). Answer the query in one or more sentences.\n\nTranscript:\n{context}\n\nNow answer the query about the meeting above in one or more sentences.\n\nQuery: {input}\nAnswer:",
        max_new_tokens: 512,
        metric: Kind::Rouge,
        first_line: false,
        chat_template: true,
    },
    LongBench {
        name: "multi_news",
        template: "Below are several news articles. Write a summary of all of them, about one page long.\n\nNews:\n{context}\n\nNow write a summary of all the news above, about one page long.\n\nSummary:",
        max_new_tokens: 512,
        metric: Kind::Rouge,
        first_line: false,
        chat_template: true,
    },
    LongBench {
        name: "vcsum",
        template: "下面是一段会议记录。请阅读后写一段总结，概括会议的内容。\n会议记录：\n{context}\n\n请写出上面这段会议记录的总结。\n会议总结：",
        max_new_tokens: 512,
        metric: Kind::Rouge,
        first_line: false,
        chat_template: true,
    },
    LongBench {
        name: "trec",
        template: "Say which type the question below belongs to. Some example questions with their types come first.\n\n{context}\n{input}",
        max_new_tokens: 64,
        metric: Kind::Classification,
        first_line: true,
        chat_template: false,
    },
    LongBench {
        name: "triviaqa",
        template: "Answer the question using the passage. Reply with the answer alone, without any other words. Some examples come first.\n\n{context}\n\n{input}",
        max_new_tokens: 32,
        metric: Kind::QaF1,
        first_line: true,
        chat_template: false,
    },
    LongBench {
        name: "samsum",
        template: "Sum up the dialogue in a few short sentences. Some examples come first.\n\n{context}\n\n{input}",
        max_new_tokens: 128,
        metric: Kind::Rouge,
        first_line: true,
        chat_template: false,
    },
    LongBench {
        name: "lsht",
        template: "请判断下面这则新闻属于哪一类。先给出一些例子。\n\n{context}\n{input}",
        max_new_tokens: 64,
        metric: Kind::Classification,
        first_line: true,
        chat_template: false,
    },
    LongBench {
        name: "passage_count",
        template: "Below are paragraphs taken from Wikipedia; some may appear more than once. Read them carefully and count how many different paragraphs there are once duplicates are removed.\n\n{context}\n\nGive the number of different paragraphs once duplicates are removed. Reply with the number alone, such as 1, 2, 3 and so on.\n\nThe final answer is: ",
        max_new_tokens: 32,
        metric: Kind::Count,
        first_line: false,
        chat_template: true,
    },
    LongBench {
        name: "passage_retrieval_en",
        template: "Below are 30 paragraphs from Wikipedia and then an abstract. Find the paragraph the abstract was written from.\n\n{context}\n\nThe abstract:\n\n{input}\n\nGive the number of the paragraph the abstract comes from, written like \"Paragraph 1\", \"Paragraph 2\" and so on.\n\nThe answer is: ",
        max_new_tokens: 32,
        metric: Kind::Retrieval,
        first_line: false,
        chat_template: true,
    },
    LongBench {
        name: "passage_retrieval_zh",
        template: "下面是若干段中文维基百科的段落，之后是一段摘要。请找出这段摘要出自哪一个段落。\n\n{context}\n\n摘要如下：\n\n{input}\n\n请给出摘要所在段落的编号，格式为“段落1”“段落2”等。\n\n答案是：",
        max_new_tokens: 32,
        metric: Kind::Retrieval,
        first_line: false,
        chat_template: true,
    },
    LongBench {
        name: "lcc",
        template: "Complete the code below.\n{context}Next line of code:\n",
        max_new_tokens: 64,
        metric: Kind::CodeSim,
        first_line: false,
        chat_template: false,
    },
    LongBench {
        name: "repobench-p",
        template: "Complete the code below.\n{context}{input}Next line of code:\n",
        max_new_tokens: 64,
        metric: Kind::CodeSim,
        first_line: false,
        chat_template: false,
    },
];

/// The LongBench dataset names [`read_longbench`] knows.
pub fn longbench_datasets() -> Vec<&'static str> {
    LONGBENCH.iter().map(|d| d.name).collect()
}

fn longbench(name: &str) -> Option<&'static LongBench> {
    let base = name.strip_suffix("_e").unwrap_or(name);
    LONGBENCH.iter().find(|d| d.name == base)
}

/// Fills `{context}` and `{input}` in one pass, so that braces inside the texts stay
/// as they are.
/// Returns the text and where the context ends in it (the question starts there).
fn fill(template: &str, context: &str, input: &str) -> (String, usize) {
    let mut out = String::with_capacity(template.len() + context.len() + input.len());
    let mut rest = template;
    let mut context_end = 0;
    while let Some(at) = rest.find('{') {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        if let Some(t) = tail.strip_prefix("{context}") {
            out.push_str(context);
            context_end = out.len();
            rest = t;
        } else if let Some(t) = tail.strip_prefix("{input}") {
            out.push_str(input);
            rest = t;
        } else {
            out.push('{');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    (out, context_end)
}

fn longbench_line(
    obj: &Map<String, Value>,
    forced: Option<&'static LongBench>,
    line: usize,
    index: usize,
) -> Result<Sample, String> {
    let field = obj.get("dataset").and_then(Value::as_str);
    let ds = match (forced, field) {
        (Some(d), Some(f)) if longbench(f).is_none_or(|x| x.name != d.name) => {
            return Err(format!(
                "line is from dataset `{f}`, not `{}` as asked",
                d.name
            ))
        }
        (Some(d), _) => d,
        (None, Some(f)) => longbench(f).ok_or_else(|| {
            format!(
                "unknown LongBench dataset `{f}`; known datasets: {}",
                longbench_datasets().join(", ")
            )
        })?,
        (None, None) => return Err("missing field `dataset` (or pass the dataset to read)".into()),
    };
    let input = string(obj, "input")?;
    let context = string(obj, "context")?;
    let answers = strings(obj, "answers")?;
    let metric = match ds.metric {
        Kind::QaF1 => Metric::QaF1,
        Kind::Rouge => Metric::RougeL,
        Kind::Retrieval => Metric::Retrieval,
        Kind::Count => Metric::Count,
        Kind::CodeSim => Metric::CodeSim,
        Kind::Classification => Metric::Classification {
            classes: strings(obj, "all_classes")?,
        },
    };
    let mut meta = Map::new();
    meta.insert("dataset".into(), json!(ds.name));
    meta.insert("line".into(), json!(line));
    for (from, to) in [("_id", "id"), ("language", "language"), ("length", "words")] {
        if let Some(v) = obj.get(from).filter(|v| !v.is_null()) {
            meta.insert(to.into(), v.clone());
        }
    }
    if ds.first_line {
        meta.insert("postprocess".into(), json!("first_line"));
    }
    if !ds.chat_template {
        meta.insert("chat_template".into(), json!(false));
    }
    let (input, context_end) = fill(ds.template, &context, &input);
    Ok(Sample {
        task: format!("longbench/{}", ds.name),
        index,
        input,
        question_at: Some(context_end),
        answer_prefix: String::new(),
        references: answers,
        metric,
        max_new_tokens: ds.max_new_tokens,
        meta,
    })
}

/// Reads a LongBench JSONL file; `dataset` names the dataset of every line, or `None`
/// to take it from each line's `dataset` field. See the module documentation.
pub fn read_longbench(path: &Path, dataset: Option<&str>) -> Result<JsonlSamples, Error> {
    let forced = match dataset {
        None => None,
        Some(name) => Some(longbench(name).ok_or_else(|| Error::UnknownDataset {
            benchmark: "LongBench",
            name: name.to_string(),
            known: longbench_datasets().iter().map(|s| s.to_string()).collect(),
        })?),
    };
    let mut out = JsonlSamples::default();
    for (line, text) in lines(path)? {
        let sample = text
            .and_then(|t| parse_object(&t))
            .and_then(|obj| longbench_line(&obj, forced, line, out.samples.len()));
        match sample {
            Ok(s) => out.samples.push(s),
            Err(message) => out.errors.push(LineError { line, message }),
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------
// ZeroSCROLLS

const ZEROSCROLLS: &[(&str, usize)] = &[
    ("gov_report", 1024),
    ("summ_screen_fd", 512),
    ("qmsum", 512),
    ("squality", 512),
    ("qasper", 128),
    ("narrative_qa", 64),
    ("quality", 16),
    ("musique", 32),
    ("space_digest", 32),
    ("book_sum_sort", 256),
];

/// The file's name (without extension) or its folder's, whichever is in `known`.
fn name_in_path(path: &Path, known: &[&str]) -> Option<String> {
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    let parent = path
        .parent()
        .and_then(|p| p.file_name())
        .and_then(|s| s.to_str())
        .unwrap_or("");
    [stem, parent]
        .into_iter()
        .find(|n| known.contains(n))
        .map(str::to_string)
}

/// The byte offset of character `c` of `s` (its end for `c` = the character count).
fn char_to_byte(s: &str, c: usize) -> Option<usize> {
    s.char_indices()
        .map(|(b, _)| b)
        .chain(std::iter::once(s.len()))
        .nth(c)
}

/// The ZeroSCROLLS dataset names [`read_zeroscrolls`] knows.
pub fn zeroscrolls_datasets() -> Vec<&'static str> {
    ZEROSCROLLS.iter().map(|d| d.0).collect()
}

fn zeroscrolls_metric(name: &str) -> Metric {
    match name {
        "gov_report" | "summ_screen_fd" | "qmsum" | "squality" => Metric::RougeL,
        "qasper" | "narrative_qa" | "musique" => Metric::QaF1,
        _ => Metric::ExactMatch,
    }
}

/// Reads a ZeroSCROLLS JSONL file; `dataset` names its dataset, or `None` to take it
/// from the file's or folder's name. See the module documentation.
pub fn read_zeroscrolls(path: &Path, dataset: Option<&str>) -> Result<JsonlSamples, Error> {
    let known = || {
        zeroscrolls_datasets()
            .iter()
            .map(|s| s.to_string())
            .collect()
    };
    let name = match dataset {
        Some(d) => d.to_string(),
        None => {
            name_in_path(path, &zeroscrolls_datasets()).ok_or_else(|| Error::UnknownDataset {
                benchmark: "ZeroSCROLLS",
                name: format!("(none in the path {}; pass one)", path.display()),
                known: known(),
            })?
        }
    };
    let Some(&(ds, max_new_tokens)) = ZEROSCROLLS.iter().find(|d| d.0 == name) else {
        return Err(Error::UnknownDataset {
            benchmark: "ZeroSCROLLS",
            name,
            known: known(),
        });
    };
    let mut out = JsonlSamples::default();
    let mut by_id: HashMap<String, usize> = HashMap::new();
    for (line, text) in lines(path)? {
        let read = text
            .and_then(|t| parse_object(&t))
            .and_then(zeroscrolls_fields);
        let (id, input, output, obj) = match read {
            Ok(x) => x,
            Err(message) => {
                out.errors.push(LineError { line, message });
                continue;
            }
        };
        let mut refs = vec![output.clone()];
        if ds == "quality" {
            if let Some(l) = crate::metrics::choice_letter(&output) {
                refs.push(l.to_string());
            }
        }
        if let Some(&at) = by_id.get(&id) {
            let s: &mut Sample = &mut out.samples[at];
            if s.input != input {
                out.errors.push(LineError {
                    line,
                    message: format!("id `{id}` repeats with a different input"),
                });
                continue;
            }
            for r in refs {
                if !s.references.contains(&r) {
                    s.references.push(r);
                }
            }
            continue;
        }
        let meta = zeroscrolls_meta(ds, line, &id, &obj);
        by_id.insert(id, out.samples.len());
        // ZeroSCROLLS gives the query's start as a character index.
        let question_at = obj
            .get("query_start_index")
            .and_then(Value::as_u64)
            .and_then(|c| char_to_byte(&input, c as usize));
        out.samples.push(Sample {
            task: format!("zeroscrolls/{ds}"),
            index: out.samples.len(),
            question_at,
            input,
            answer_prefix: String::new(),
            references: refs,
            metric: zeroscrolls_metric(ds),
            max_new_tokens,
            meta,
        });
    }
    Ok(out)
}

/// The id, input and output of a parsed ZeroSCROLLS line, and the object itself.
fn zeroscrolls_fields(
    obj: Map<String, Value>,
) -> Result<(String, String, String, Map<String, Value>), String> {
    let id = match obj.get("id") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(_) => return Err("field `id` is not a string".to_string()),
        None => return Err("missing field `id`".to_string()),
    };
    let input = string(&obj, "input")?;
    let output = match obj.get("output") {
        None => return Err("missing field `output`".to_string()),
        Some(Value::Null) => {
            return Err("field `output` is null (the test split has no answers)".into())
        }
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err("field `output` is not a string".into()),
    };
    Ok((id, input, output, obj))
}

/// The metadata of a ZeroSCROLLS sample: its dataset, line, id and the file's indices.
fn zeroscrolls_meta(
    ds: &str,
    line: usize,
    id: &str,
    obj: &Map<String, Value>,
) -> Map<String, Value> {
    let mut meta = Map::new();
    meta.insert("dataset".into(), json!(ds));
    meta.insert("line".into(), json!(line));
    meta.insert("id".into(), json!(id));
    for f in [
        "pid",
        "document_start_index",
        "document_end_index",
        "query_start_index",
        "query_end_index",
        "truncation_seperator",
    ] {
        if let Some(v) = obj.get(f).filter(|v| !v.is_null()) {
            meta.insert(f.into(), v.clone());
        }
    }
    if ds == "quality" {
        meta.insert("postprocess".into(), json!("choice_letter"));
    }
    meta
}

// ---------------------------------------------------------------------------------
// RULER's own generators

/// Reads samples made by RULER's generators (the `nvidia-long-context-eval` package's
/// `prepare.py`): one object per line with `index`, `input` (the task's text, its
/// question, then the answer prefix), `outputs` (the gold answers) and `length`. The
/// task is the file's name or its folder's (`niah_single_2.jsonl`,
/// `niah_single_2/validation.jsonl`), or `task` when given. Each input is cut as the
/// field's tools cut it: the question starts at the last match of the task's question
/// ("What is the special magic ...", "Question: Find all variables ...", ...), and the
/// answer prefix at the first "The special magic" (NIAH) or "Answer:" after it. Scores
/// use RULER's metrics (string match, any reference for QA, all otherwise) and its
/// generation lengths. An input without its task's question or answer prefix is a line
/// error.
pub fn read_ruler(path: &Path, task: Option<&str>) -> Result<JsonlSamples, Error> {
    let known = || {
        super::split::RULER_TASKS
            .iter()
            .map(|s| s.to_string())
            .collect()
    };
    let name = match task {
        Some(t) => t.to_string(),
        None => {
            name_in_path(path, super::split::RULER_TASKS).ok_or_else(|| Error::UnknownDataset {
                benchmark: "RULER",
                name: format!("(no task in the path {}; pass one)", path.display()),
                known: known(),
            })?
        }
    };
    if !super::split::RULER_TASKS.contains(&name.as_str()) {
        return Err(Error::UnknownDataset {
            benchmark: "RULER",
            name,
            known: known(),
        });
    }
    let (metric, max_new_tokens) = super::split::ruler_scoring(&name);
    let mut out = JsonlSamples::default();
    for (line, text) in lines(path)? {
        let read = text.and_then(|t| parse_object(&t)).and_then(|obj| {
            let raw = string(&obj, "input")?;
            let outputs = strings(&obj, "outputs")?;
            if outputs.is_empty() {
                // Every answer would score 0: a sample without a reference is refused.
                return Err("field `outputs` is an empty list (no reference answer)".to_string());
            }
            let (question_at, answer_at) =
                super::split::ruler_cut(&name, &raw).ok_or_else(|| {
                    format!("the input has no {name} question and answer prefix to cut at")
                })?;
            let index = match obj.get("index") {
                Some(Value::Number(n)) => n.as_u64().map(|i| i as usize),
                _ => None,
            };
            let mut meta = Map::new();
            meta.insert("line".into(), json!(line));
            if let Some(v) = obj.get("length").filter(|v| !v.is_null()) {
                meta.insert("tokens".into(), v.clone());
            }
            if let Some(i) = index {
                meta.insert("ruler_index".into(), json!(i));
            }
            Ok(Sample {
                task: format!("ruler/{name}"),
                index: 0,
                input: raw[..answer_at].to_string(),
                question_at: Some(question_at),
                answer_prefix: raw[answer_at..].to_string(),
                references: outputs,
                metric: metric.clone(),
                max_new_tokens,
                meta,
            })
        });
        match read {
            Ok(mut s) => {
                s.index = out.samples.len();
                out.samples.push(s);
            }
            Err(message) => out.errors.push(LineError { line, message }),
        }
    }
    Ok(out)
}
