//! One evaluation sample, independent of any model.

use serde::{Deserialize, Serialize};

/// How a prediction is scored against a sample's references. Every score is in [0, 1].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Metric {
    /// RULER: the fraction of references found in the prediction (case-insensitive).
    StringMatchAll,
    /// RULER: 1 if any reference is found in the prediction (case-insensitive).
    StringMatchPart,
    /// SQuAD-style token F1 after normalization, best over references (LongBench qa_f1_score).
    QaF1,
    /// ROUGE-L F-measure, best over references.
    RougeL,
    /// LongBench classification_score over the sample's class names.
    Classification { classes: Vec<String> },
    /// LongBench retrieval_score ("Paragraph N").
    Retrieval,
    /// LongBench count_score.
    Count,
    /// LongBench code_sim_score (edit similarity of the first code line).
    CodeSim,
    /// Normalized exact match, best over references.
    ExactMatch,
}

/// A prompt and what a correct answer looks like.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Task name, e.g. `niah_single_2` or `longbench/hotpotqa`.
    pub task: String,
    /// Index of this sample within its task (stable for a seed).
    pub index: usize,
    /// The whole user message: the task's template filled with context and question.
    pub input: String,
    /// Where the question starts in `input` (a byte offset): `input[..at]` is the
    /// context, compressed before the question is seen in the query-agnostic protocol,
    /// and `input[at..]` the question. None when the sample's source does not say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub question_at: Option<usize>,
    /// Text the answer starts with, placed after the assistant turn opens (may be empty).
    pub answer_prefix: String,
    /// Gold answers.
    pub references: Vec<String>,
    pub metric: Metric,
    /// Tokens to generate for the answer.
    pub max_new_tokens: usize,
    /// Facts about the sample a report may group by: `depth` (0..1, where the needle
    /// sits), `length` (target tokens), dataset ids, ...
    #[serde(default)]
    pub meta: serde_json::Map<String, serde_json::Value>,
}

impl Sample {
    /// The context and the question, if the sample says where one ends and the other
    /// begins (at a character boundary, inside the input).
    pub fn split(&self) -> Option<(&str, &str)> {
        let at = self.question_at?;
        (at <= self.input.len() && self.input.is_char_boundary(at)).then(|| self.input.split_at(at))
    }
}
