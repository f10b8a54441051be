//! The RULER source data (Paul Graham essays, SQuAD, HotpotQA), loaded once per data
//! folder, and what is derived from it (the word list, sentence boundaries).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::Deserialize;

use super::Error;

pub(crate) const ESSAYS_FILE: &str = "PaulGrahamEssays.json";
pub(crate) const SQUAD_FILE: &str = "squad.json";
pub(crate) const HOTPOT_FILE: &str = "hotpotqa.json";

/// The essays as RULER uses them: all whitespace runs collapsed, split into words.
pub(crate) struct Essay {
    pub words: Vec<Box<str>>,
    /// `ends_sentence[i]`: a sentence ends after word `i` (the word after word `i` is
    /// word `(i + 1) % len`: a longer haystack wraps around to the first essay).
    pub ends_sentence: Vec<bool>,
    /// The word list that stands in for RULER's `wonderwords` lists (see
    /// [`vocabulary`]).
    pub vocab: Vec<String>,
}

impl Essay {
    /// Word `i` of the endless (wrapped) essay haystack.
    pub fn word(&self, i: usize) -> &str {
        &self.words[i % self.words.len()]
    }
}

/// The lower-case alphabetic words of 4 to 12 letters that occur at most 500 times in
/// the essays, sorted: about 12,000 English words (nouns, verbs, adjectives alike),
/// without the most frequent function words. (Enough for CWE's list to fill 128k
/// tokens, where RULER's lists run out.) RULER draws NIAH keys (`adjective-noun` pairs) and CWE words from
/// the `wonderwords` package's lists, which are not available here; this list plays
/// the same role and is derived deterministically from data RULER already ships.
pub(crate) fn vocabulary(words: &[Box<str>]) -> Vec<String> {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for w in words {
        let w = w.trim_matches(|c: char| c.is_ascii_punctuation() || !c.is_ascii());
        if (4..=12).contains(&w.len()) && w.bytes().all(|b| b.is_ascii_lowercase()) {
            *counts.entry(w).or_default() += 1;
        }
    }
    let set: BTreeSet<&str> = counts
        .into_iter()
        .filter(|(_, c)| *c <= 500)
        .map(|(w, _)| w)
        .collect();
    set.into_iter().map(str::to_string).collect()
}

const ABBREVIATIONS: &[&str] = &[
    "mr", "mrs", "ms", "dr", "st", "vs", "etc", "e.g", "i.e", "jr", "sr", "prof", "inc", "co",
    "no", "vol", "fig", "approx", "cf", "al",
];

/// Whether a sentence ends after `word` when `next` follows. A small stand-in for
/// NLTK's Punkt tokenizer, which RULER uses: a word ending in `.`, `!` or `?`
/// (possibly followed by closing quotes or brackets) ends a sentence when the next
/// word starts with an upper-case letter, a digit or an opening quote or bracket,
/// unless the word is a known abbreviation or a single-letter initial.
pub(crate) fn ends_sentence(word: &str, next: &str) -> bool {
    let core = word.trim_end_matches(['"', '\'', ')', ']', '\u{201d}', '\u{2019}']);
    let Some(last) = core.chars().last() else {
        return false;
    };
    if !matches!(last, '.' | '!' | '?') {
        return false;
    }
    if last == '.' {
        let stem = core
            .trim_end_matches('.')
            .trim_start_matches(['"', '\'', '(', '[', '\u{201c}', '\u{2018}'])
            .to_ascii_lowercase();
        if stem.chars().count() == 1 && stem.chars().all(char::is_alphabetic) {
            return false;
        }
        if ABBREVIATIONS.contains(&stem.as_str()) {
            return false;
        }
    }
    next.chars().next().is_some_and(|c| {
        c.is_uppercase()
            || c.is_ascii_digit()
            || matches!(c, '"' | '\'' | '(' | '[' | '\u{201c}' | '\u{2018}')
    })
}

fn read(path: &Path) -> Result<Vec<u8>, Error> {
    super::read_user_file(path)
}

fn parse<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, Error> {
    let bytes = read(path)?;
    serde_json::from_slice(&bytes).map_err(|e| Error::Data {
        path: path.to_path_buf(),
        message: format!("not the expected JSON: {e}"),
    })
}

pub(crate) fn load_essay(dir: &Path) -> Result<Essay, Error> {
    #[derive(Deserialize)]
    struct File {
        text: String,
    }
    let path = dir.join(ESSAYS_FILE);
    let file: File = parse(&path)?;
    let words: Vec<Box<str>> = file.text.split_whitespace().map(Box::from).collect();
    if words.len() < 1000 {
        return Err(Error::Data {
            path,
            message: format!("only {} words of essay text", words.len()),
        });
    }
    let n = words.len();
    let ends_sentence = (0..n)
        .map(|i| ends_sentence(&words[i], &words[(i + 1) % n]))
        .collect();
    let vocab = vocabulary(&words);
    if vocab.len() < 100 {
        return Err(Error::Data {
            path,
            message: format!("only {} distinct common words in the essays", vocab.len()),
        });
    }
    Ok(Essay {
        words,
        ends_sentence,
        vocab,
    })
}

/// A QA source: unique documents, and questions pointing into them.
pub(crate) struct QaSet {
    pub docs: Vec<String>,
    pub questions: Vec<Question>,
}

pub(crate) struct Question {
    pub query: String,
    pub answers: Vec<String>,
    /// Documents that always go with the question (RULER's `context`).
    pub context: Vec<usize>,
    /// Documents preferred as distractors before random ones (SQuAD: the other
    /// paragraphs of the same article; RULER's `more_context`).
    pub more: Vec<usize>,
    /// The documents that hold the answer (SQuAD: the one paragraph; HotpotQA: the
    /// paragraphs named by the supporting facts).
    pub gold: Vec<usize>,
}

fn dedup(v: Vec<String>) -> Vec<String> {
    let mut seen = HashSet::new();
    v.into_iter().filter(|s| seen.insert(s.clone())).collect()
}

/// The documents once each, sorted (a document's id is its index, whatever the order
/// of the file).
fn distinct(docs: impl Iterator<Item = String>) -> Vec<String> {
    docs.collect::<BTreeSet<_>>().into_iter().collect()
}

/// Each document's id.
fn ids(docs: &[String]) -> HashMap<&str, usize> {
    docs.iter()
        .enumerate()
        .map(|(i, d)| (d.as_str(), i))
        .collect()
}

/// SQuAD 2.0 (dev): answerable questions, one paragraph each, the rest of the article
/// as preferred distractors — as RULER's `read_squad`.
pub(crate) fn load_squad(dir: &Path) -> Result<QaSet, Error> {
    #[derive(Deserialize)]
    struct File {
        data: Vec<Article>,
    }
    #[derive(Deserialize)]
    struct Article {
        paragraphs: Vec<Paragraph>,
    }
    #[derive(Deserialize)]
    struct Paragraph {
        context: String,
        qas: Vec<Qa>,
    }
    #[derive(Deserialize)]
    struct Qa {
        question: String,
        answers: Vec<Answer>,
        #[serde(default)]
        is_impossible: bool,
    }
    #[derive(Deserialize)]
    struct Answer {
        text: String,
    }
    let path = dir.join(SQUAD_FILE);
    let file: File = parse(&path)?;
    let docs = distinct(
        file.data
            .iter()
            .flat_map(|a| a.paragraphs.iter().map(|p| p.context.clone())),
    );
    let id = ids(&docs);
    let mut questions = Vec::new();
    for a in &file.data {
        let article: Vec<usize> = a
            .paragraphs
            .iter()
            .map(|p| id[p.context.as_str()])
            .collect();
        for p in &a.paragraphs {
            let me = id[p.context.as_str()];
            for q in &p.qas {
                if q.is_impossible || q.answers.is_empty() {
                    continue;
                }
                questions.push(Question {
                    query: q.question.clone(),
                    answers: dedup(q.answers.iter().map(|a| a.text.clone()).collect()),
                    context: vec![me],
                    more: article.iter().copied().filter(|&d| d != me).collect(),
                    gold: vec![me],
                });
            }
        }
    }
    Ok(QaSet { docs, questions })
}

/// HotpotQA (distractor dev set): each question with its ten paragraphs (two gold,
/// eight distractors) as the documents that always go with it, as RULER's
/// `read_hotpotqa`; a document is `title\ntext`.
pub(crate) fn load_hotpot(dir: &Path) -> Result<QaSet, Error> {
    #[derive(Deserialize)]
    struct Item {
        question: String,
        answer: String,
        context: Vec<(String, Vec<String>)>,
        #[serde(default)]
        supporting_facts: Vec<(String, serde_json::Value)>,
    }
    let path = dir.join(HOTPOT_FILE);
    let items: Vec<Item> = parse(&path)?;
    let doc = |t: &str, p: &[String]| format!("{t}\n{}", p.concat());
    let docs = distinct(
        items
            .iter()
            .flat_map(|d| d.context.iter().map(|(t, p)| doc(t, p))),
    );
    let id = ids(&docs);
    let questions = items
        .iter()
        .map(|d| {
            let context: Vec<usize> = d
                .context
                .iter()
                .map(|(t, p)| id[doc(t, p).as_str()])
                .collect();
            let titles: HashSet<&str> =
                d.supporting_facts.iter().map(|(t, _)| t.as_str()).collect();
            let gold = d
                .context
                .iter()
                .zip(&context)
                .filter(|((t, _), _)| titles.contains(t.as_str()))
                .map(|(_, &i)| i)
                .collect();
            Question {
                query: d.question.clone(),
                answers: vec![d.answer.clone()],
                context,
                more: Vec::new(),
                gold,
            }
        })
        .collect();
    Ok(QaSet { docs, questions })
}

/// The data of one folder, each file loaded on first use.
#[derive(Default)]
pub(crate) struct DataDir {
    pub dir: PathBuf,
    essay: Mutex<Option<Arc<Essay>>>,
    squad: Mutex<Option<Arc<QaSet>>>,
    hotpot: Mutex<Option<Arc<QaSet>>>,
}

fn cached<T>(
    slot: &Mutex<Option<Arc<T>>>,
    load: impl FnOnce() -> Result<T, Error>,
) -> Result<Arc<T>, Error> {
    let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(v) = &*slot {
        return Ok(v.clone());
    }
    let v = Arc::new(load()?);
    *slot = Some(v.clone());
    Ok(v)
}

impl DataDir {
    pub fn new(dir: &Path) -> Self {
        DataDir {
            dir: dir.to_path_buf(),
            ..Default::default()
        }
    }
    pub fn essay(&self) -> Result<Arc<Essay>, Error> {
        cached(&self.essay, || load_essay(&self.dir))
    }
    pub fn squad(&self) -> Result<Arc<QaSet>, Error> {
        cached(&self.squad, || load_squad(&self.dir))
    }
    pub fn hotpot(&self) -> Result<Arc<QaSet>, Error> {
        cached(&self.hotpot, || load_hotpot(&self.dir))
    }
}
