//! Sample generators and readers.
//!
//! # Synthetic tasks
//!
//! [`generate`] (or [`Generator::generate`], which holds the caches) makes sample
//! `index` of a task for a target prompt length, deterministically from
//! `(task, length, seed, index)` and independently of every other index, so a grid
//! can be sharded and resumed sample by sample. [`task_names`] lists the tasks:
//!
//! | task | what | haystack / context | metric | new tokens |
//! |---|---|---|---|---|
//! | `niah_single_1` | one needle, word key, 7-digit number | repeated noise sentences | string match (all) | 128 |
//! | `niah_single_2` | one needle, word key, number | essays | string match (all) | 128 |
//! | `niah_single_3` | one needle, word key, UUID | essays | string match (all) | 128 |
//! | `niah_multikey_1` | 4 needles with different keys, 1 asked | essays | string match (all) | 128 |
//! | `niah_multikey_2` | 1 needle among needles | distractor needles (word keys, numbers) | string match (all) | 128 |
//! | `niah_multikey_3` | 1 needle among needles | distractor needles (UUID keys and values) | string match (all) | 128 |
//! | `niah_multivalue` | 4 values for one key, all asked | essays | string match (all) | 128 |
//! | `niah_multiquery` | 4 keys, all asked | essays | string match (all) | 128 |
//! | `vt` | variable tracking: 1 chain of 4 hops, with one worked example | repeated noise | string match (all) | 30 |
//! | `cwe` | the 10 most common words of a numbered list, with one worked example | word list | string match (all) | 120 |
//! | `fwe` | the 3 most frequent coded words (Zipf, α = 2) | coded words | string match (all) | 50 |
//! | `qa_1` | SQuAD question | the gold paragraph among distractor paragraphs | string match (part) | 32 |
//! | `qa_2` | HotpotQA question | its 10 paragraphs among distractors | string match (part) | 32 |
//! | `passkey` | a 5-digit pass key in filler text | repeated noise | string match (all) | 16 |
//!
//! The RULER task templates and answer prefixes are reproduced verbatim (including
//! RULER's own spelling), since they define the benchmark; see each module.
//!
//! **Length fitting.** As in RULER, the haystack size is the largest one for which
//! `count_tokens(input + answer_prefix) + max_new_tokens <= length`. The search
//! uses secant steps and bisection instead of RULER's fixed increments, and stops
//! once a fitting input is within 2% of its budget or one more unit (sentence, word,
//! document) would not fit; so inputs use 98–100% of `length - max_new_tokens`
//! except where units are coarse (a QA document at short lengths) or the source runs
//! out (CWE's word list, QA's documents). As RULER sizes all samples from one, the size
//! found for sample 0 of `(task, length, seed, counter)` is cached and is where every
//! other index starts (typically one count when it still fits); sample 0 is made
//! first when needed, so results never depend on the order samples are asked for.
//! The counter is told apart by the count of a fixed text. Chat-template tokens are
//! not counted: pass a counter that adds them if they matter.
//!
//! **Needle depths.** NIAH and passkey sample `i` puts its (first answer) needle at
//! depth [`DEPTHS`]`[i % 11]`, the 11 depths 0, 0.1, ..., 1 in an order that spreads
//! any prefix of indices over the whole range (0, 1, .5, .2, .8, .1, .4, .6, .9, .3,
//! .7): every 11 consecutive samples of a length cover all 11 depths once. RULER
//! instead draws depths at random from 40 values; the other needles of multi-needle
//! tasks still are drawn from RULER's 40 depths.
//!
//! `meta` of every generated sample: `length` (target), `tokens` (counted input +
//! answer prefix), `budget` (tokens the input may use), `seed`, `haystack` (the
//! haystack size chosen: sentences, words, documents...). NIAH adds `depth` (relative
//! byte position, 0..1 within the context, of the first answer needle), `depth_target`,
//! `needle_positions` (byte offsets in `input` of every needle, in context order),
//! `needle_depths` (their relative positions), `num_needles`, `num_distractor_needles`
//! (needles whose key is not asked: 3 for `niah_multikey_1`, the whole haystack for
//! `niah_multikey_2/3`), `keys` (asked). Passkey adds `depth`, `depth_target`,
//! `needle_positions`. VT adds `depth` of the first assignment. QA adds `dataset`,
//! `question_index`, `gold_documents` (their 1-based numbers in the context) and
//! `depth` (relative position of the first gold document).
//!
//! Random streams are seeded by `(seed, task, index)`, not by the length, so sample `i`
//! has the same keys, values, depth and question at every length.
//!
//! # Readers and texts
//!
//! - [`jsonl`]: LongBench and ZeroSCROLLS JSONL files ([`read_longbench`],
//!   [`read_zeroscrolls`]), and samples made by RULER's own generators ([`read_ruler`]).
//! - [`split`]: where a sample's question starts, for the query-agnostic protocol
//!   (every generated sample carries it in `question_at`).
//! - [`text`]: long texts for perplexity (Jane Austen's novels from the R data base,
//!   plain text files).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use rand_chacha::ChaCha8Rng;
use serde_json::{json, Map, Value};

use crate::sample::{Metric, Sample};

mod data;
pub mod jsonl;
mod passkey;
pub(crate) mod rdata;
mod ruler;
pub mod split;
pub mod text;
pub(crate) mod util;

pub use jsonl::{
    longbench_datasets, read_longbench, read_ruler, read_zeroscrolls, zeroscrolls_datasets,
    JsonlSamples, LineError,
};

/// What a generated sample must fit and where its data lives.
pub struct GenConfig<'a> {
    /// Target prompt length in tokens: the input, its answer prefix and the tokens to
    /// generate together.
    pub length: usize,
    pub seed: u64,
    /// The RULER data folder (`PaulGrahamEssays.json`, `squad.json`, `hotpotqa.json`).
    pub data_dir: &'a Path,
    /// Counts the tokens of a text with the model's tokenizer.
    pub count_tokens: &'a (dyn Fn(&str) -> usize + Sync),
}

/// Why a sample, a file or a text could not be produced.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("unknown task `{name}`; known tasks: {}", known.join(", "))]
    UnknownTask { name: String, known: Vec<String> },
    #[error("unknown {benchmark} dataset `{name}`; known datasets: {}", known.join(", "))]
    UnknownDataset {
        benchmark: &'static str,
        name: String,
        known: Vec<String>,
    },
    #[error("task `{task}` does not fit in {length} tokens{}", match needed {
        Some(n) => format!(" (its smallest prompt with the tokens to generate needs {n})"),
        None => String::new(),
    })]
    TooShort {
        task: String,
        length: usize,
        needed: Option<usize>,
    },
    #[error("{}: {error}", path.display())]
    Io {
        path: PathBuf,
        /// Not a `source`: the message already holds it, and chains would repeat it.
        error: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Data { path: PathBuf, message: String },
}

/// The largest data file read (a RULER or LongBench JSONL file, a haystack, a novel).
pub const MAX_DATA_BYTES: u64 = 1 << 30;

/// A user-named or fetched data file: a regular file of at most [`MAX_DATA_BYTES`].
pub(crate) fn read_user_file(path: &Path) -> Result<Vec<u8>, Error> {
    kvmerger_compression::files::read_bounded(path, MAX_DATA_BYTES).map_err(|e| match e.kind {
        Some(kind) => Error::Io {
            path: path.to_path_buf(),
            error: std::io::Error::new(kind, e.message),
        },
        None => Error::Data {
            path: path.to_path_buf(),
            message: e.message,
        },
    })
}

/// RULER's 13 tasks and passkey retrieval, in RULER's order.
pub const TASKS: &[&str] = &[
    "niah_single_1",
    "niah_single_2",
    "niah_single_3",
    "niah_multikey_1",
    "niah_multikey_2",
    "niah_multikey_3",
    "niah_multivalue",
    "niah_multiquery",
    "vt",
    "cwe",
    "fwe",
    "qa_1",
    "qa_2",
    "passkey",
];

/// The names [`generate`] accepts.
pub fn task_names() -> &'static [&'static str] {
    TASKS
}

/// Needle depth of sample `i` is `DEPTHS[i % DEPTHS.len()]`: 0, 0.1, ..., 1 ordered so
/// that every prefix is spread over the whole range.
pub const DEPTHS: [f64; 11] = [0.0, 1.0, 0.5, 0.2, 0.8, 0.1, 0.4, 0.6, 0.9, 0.3, 0.7];

/// Text counted to tell token counters apart in the haystack-size cache.
const FINGERPRINT: &str = "Fingerprint: The quick brown fox (jumps) over 13 lazy dogs; \
     0x1F 3.14159 naïve café — «déjà vu» 東京 ünïcödé\n\tVAR ABCDE = 12345 \
     a4f1c2d3-5e6f-4a7b-8c9d-0e1f2a3b4c5d";

/// Holds loaded data (per data folder, each file on first use) and the haystack sizes
/// found for sample 0 of each task and length (see the module documentation); share one across
/// threads and calls. What it caches never changes a sample.
#[derive(Default)]
pub struct Generator {
    dirs: Mutex<HashMap<PathBuf, Arc<data::DataDir>>>,
    sizes: Mutex<HashMap<SizeKey, usize>>,
}

/// What the haystack size of sample 0 depends on.
#[derive(Clone, PartialEq, Eq, Hash)]
struct SizeKey {
    part: String,
    length: usize,
    seed: u64,
    fingerprint: u64,
    dir: PathBuf,
}

impl Generator {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sample `index` of `task`, fitted to `cfg.length` tokens.
    pub fn generate(&self, task: &str, cfg: &GenConfig, index: usize) -> Result<Sample, Error> {
        if !TASKS.contains(&task) {
            return Err(Error::UnknownTask {
                name: task.to_string(),
                known: TASKS.iter().map(|s| s.to_string()).collect(),
            });
        }
        let data = {
            let mut dirs = self.dirs.lock().unwrap_or_else(|e| e.into_inner());
            dirs.entry(cfg.data_dir.to_path_buf())
                .or_insert_with(|| Arc::new(data::DataDir::new(cfg.data_dir)))
                .clone()
        };
        let ctx = Ctx {
            gen: self,
            cfg,
            task,
            index,
            data,
            fingerprint: (cfg.count_tokens)(FINGERPRINT) as u64,
        };
        match task {
            "passkey" => passkey::generate(&ctx),
            _ => ruler::generate(&ctx),
        }
    }
}

/// [`Generator::generate`] on a process-wide generator.
pub fn generate(task: &str, cfg: &GenConfig, index: usize) -> Result<Sample, Error> {
    static GEN: OnceLock<Generator> = OnceLock::new();
    GEN.get_or_init(Generator::new).generate(task, cfg, index)
}

/// Everything one generation call needs.
pub(crate) struct Ctx<'a> {
    gen: &'a Generator,
    pub cfg: &'a GenConfig<'a>,
    pub task: &'a str,
    pub index: usize,
    pub data: Arc<data::DataDir>,
    fingerprint: u64,
}

impl Ctx<'_> {
    pub fn rng(&self, stream: u64) -> ChaCha8Rng {
        util::rng_for(self.cfg.seed, self.task, self.index, stream)
    }

    pub fn count(&self, text: &str) -> usize {
        (self.cfg.count_tokens)(text)
    }

    /// The input budget for a task generating `max_new_tokens`.
    pub fn budget(&self, max_new_tokens: usize) -> Result<usize, Error> {
        self.cfg
            .length
            .checked_sub(max_new_tokens)
            .filter(|&b| b > 0)
            .ok_or_else(|| Error::TooShort {
                task: self.task.to_string(),
                length: self.cfg.length,
                needed: None,
            })
    }

    /// [`util::fit`] for part `part` of the task (the task itself, or a worked
    /// example fitted to its own `length`), starting from the size found for sample 0
    /// of the same task, length, seed, counter and data (as RULER sizes every sample's
    /// haystack from one example). Sample 0 starts from nothing; the size it finds is
    /// cached, and computed first when another index asks for it. So the result
    /// depends only on `(task, length, seed, index)` and the counter, never on which
    /// samples were made before.
    pub fn fit<T>(
        &self,
        part: &str,
        length: usize,
        min: usize,
        max: usize,
        budget: usize,
        eval: impl FnMut(usize) -> Result<(T, usize), Error>,
    ) -> Result<util::Fitted<T>, Error> {
        let key = SizeKey {
            part: part.to_string(),
            length,
            seed: self.cfg.seed,
            fingerprint: self.fingerprint,
            dir: self.data.dir.clone(),
        };
        let cached = || {
            self.gen
                .sizes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&key)
                .copied()
        };
        let guess = if self.index == 0 {
            None
        } else {
            match cached() {
                Some(g) => Some(g),
                // Sample 0 may fail (say, too short): it does so the same way every
                // time, having cached the same parts, so what is cached after it is
                // deterministic either way.
                None => {
                    let _ = self.gen.generate(self.task, self.cfg, 0);
                    cached()
                }
            }
        };
        let fitted = util::fit(self.task, self.cfg.length, min, max, guess, budget, eval)?;
        if self.index == 0 {
            self.gen
                .sizes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(key, fitted.n);
        }
        Ok(fitted)
    }

    /// A sample with the common `meta` (`length`, `tokens`, `budget`, `seed`,
    /// `haystack`) and the task's own.
    #[allow(clippy::too_many_arguments)]
    pub fn sample(
        &self,
        input: String,
        answer_prefix: String,
        references: Vec<String>,
        metric: Metric,
        max_new_tokens: usize,
        tokens: usize,
        haystack: usize,
        extra: Map<String, Value>,
    ) -> Sample {
        let mut meta = Map::new();
        meta.insert("length".into(), json!(self.cfg.length));
        meta.insert("tokens".into(), json!(tokens));
        meta.insert("budget".into(), json!(self.cfg.length - max_new_tokens));
        meta.insert("seed".into(), json!(self.cfg.seed));
        meta.insert("haystack".into(), json!(haystack));
        meta.extend(extra);
        Sample {
            task: self.task.to_string(),
            index: self.index,
            question_at: split::question_start(self.task, &input),
            input,
            answer_prefix,
            references,
            metric,
            max_new_tokens,
            meta,
        }
    }
}
