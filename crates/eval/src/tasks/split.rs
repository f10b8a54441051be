//! Where a sample's question starts: the query-agnostic protocol compresses the
//! context before the question is seen, so every task must say where one ends.
//!
//! RULER's tasks are cut as the field cuts RULER's data (kvpress's dataset scripts,
//! after RULER's own task templates): the question starts at the *last* occurrence of
//! the task's question phrase (a worked example earlier in the input has its own), and
//! in RULER's raw files, where the answer prefix is part of the input, the answer
//! prefix starts at the first "The special magic" (NIAH) or "Answer:" after it. The
//! text between context and question (a newline) stays with the context.

use crate::sample::Metric;

/// RULER's task names, as its generators name their output: our tasks but passkey.
pub const RULER_TASKS: &[&str] = super::TASKS.split_at(13).0;

/// The question phrases of a task (any of them may start the question), and the
/// phrase that starts its answer prefix.
fn phrases(task: &str) -> Option<(&'static [&'static str], &'static str)> {
    let family = task.split('_').next().unwrap_or(task);
    Some(match family {
        "niah" => (
            &[
                "What is the special magic",
                "What are all the special magic",
            ][..],
            "The special magic",
        ),
        "vt" => (
            &["Question: Find all variables that are assigned the value"][..],
            "Answer:",
        ),
        "cwe" => (
            &["Question: What are the 10 most common words in the above list?"][..],
            "Answer:",
        ),
        "fwe" => (
            &["Question: Do not provide any explanation."][..],
            "Answer:",
        ),
        "qa" => (
            &["Answer the question based on the given documents."][..],
            "Answer:",
        ),
        "passkey" => (&["What is the pass key?"][..], "The pass key is"),
        _ => return None,
    })
}

/// Byte offset where the question of `task`'s `input` starts, if the task is known
/// and its question is there.
pub fn question_start(task: &str, input: &str) -> Option<usize> {
    let (questions, _) = phrases(task)?;
    questions.iter().filter_map(|q| input.rfind(q)).max()
}

/// For a RULER raw input (question and answer prefix included): where the question
/// starts and where the answer prefix starts.
pub fn ruler_cut(task: &str, input: &str) -> Option<(usize, usize)> {
    let q = question_start(task, input)?;
    let (_, answer) = phrases(task)?;
    let a = q + input[q..].find(answer)?;
    // The answer prefix keeps the space before it, as RULER writes it.
    let a = if input[..a].ends_with(' ') { a - 1 } else { a };
    Some((q, a))
}

/// RULER's metric and generation length for a task.
pub fn ruler_scoring(task: &str) -> (Metric, usize) {
    let family = task.split('_').next().unwrap_or(task);
    let max_new = match family {
        "niah" => 128,
        "vt" => 30,
        "cwe" => 120,
        "fwe" => 50,
        "qa" => 32,
        _ => 128,
    };
    let metric = if family == "qa" {
        Metric::StringMatchPart
    } else {
        Metric::StringMatchAll
    };
    (metric, max_new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rulers_tasks_are_ours_but_passkey() {
        assert_eq!(RULER_TASKS.len(), 13);
        assert!(!RULER_TASKS.contains(&"passkey"));
        assert_eq!(RULER_TASKS[12], "qa_2");
    }

    #[test]
    fn the_question_is_the_last_match_and_the_answer_prefix_follows_it() {
        let input = "Example. Question: Find all variables that are assigned the value 1 in the text above. Answer: A B\n\nText VAR X = 5\nQuestion: Find all variables that are assigned the value 5 in the text above. Answer: According to";
        let (q, a) = ruler_cut("vt", input).unwrap();
        assert!(input[..q].ends_with("VAR X = 5\n"));
        assert!(
            input[q..a].starts_with("Question: Find all variables that are assigned the value 5")
        );
        assert_eq!(&input[a..], " Answer: According to");
        assert_eq!(question_start("vt", input), Some(q));
        assert_eq!(question_start("niah_single_2", input), None);
        assert_eq!(question_start("unknown_task", input), None);
        let niah = "A special magic number is hidden.\ncontext\nWhat is the special magic number for a-b mentioned in the provided text? The special magic number for a-b mentioned in the provided text is";
        let (q, a) = ruler_cut("niah_single_2", niah).unwrap();
        assert_eq!(&niah[..q], "A special magic number is hidden.\ncontext\n");
        assert!(niah[a..].starts_with(" The special magic number for a-b"));
    }
}
