//! Where a grid's samples come from: the task generators, fitted to a model's
//! tokenizer and chat template, and users' JSONL files.

use crate::runner::SampleSource;
use crate::sample::Sample;
use crate::tasks::{self, GenConfig, Generator};
use crate::Error;
use kvmerger_engine::chat::Message;
use kvmerger_engine::load::LoadedModel;
use std::collections::BTreeMap;
use std::path::PathBuf;

pub struct TaskSamples<'a> {
    pub lm: &'a LoadedModel,
    pub generator: Generator,
    /// The RULER data folder.
    pub data_dir: PathBuf,
    pub seed: u64,
    /// Samples read from files, by task name (`longbench/<dataset>`, `zeroscrolls/<dataset>`).
    pub files: BTreeMap<String, Vec<Sample>>,
}

impl<'a> TaskSamples<'a> {
    pub fn new(lm: &'a LoadedModel, data_dir: PathBuf, seed: u64) -> Self {
        TaskSamples {
            lm,
            generator: Generator::new(),
            data_dir,
            seed,
            files: BTreeMap::new(),
        }
    }

    /// Every task name this source can produce.
    pub fn task_names(&self) -> Vec<String> {
        let mut v: Vec<String> = tasks::task_names().iter().map(|s| s.to_string()).collect();
        v.extend(self.files.keys().cloned());
        v
    }

    /// Tokens of a user message as the model sees it: inside the chat template.
    pub fn count_tokens(&self, text: &str) -> usize {
        let rendered = self
            .lm
            .template
            .render(&[Message::user(text)], true)
            .unwrap_or_else(|_| text.to_string());
        self.lm
            .tokenizer
            .encode(&rendered, true)
            .map(|v| v.len())
            .unwrap_or(text.len())
    }

    /// Cut the middle out of a too-long file sample so that it fits `length` tokens with
    /// its answer, as LongBench does (the beginning and end of a prompt hold the
    /// instructions and the question).
    fn truncate(&self, mut s: Sample, length: usize) -> Result<Sample, Error> {
        let room = length.saturating_sub(s.max_new_tokens);
        let overhead = self.count_tokens("");
        let tok = &self.lm.tokenizer;
        let ids = tok.encode(&s.input, false)?;
        let keep = room.saturating_sub(overhead + 8);
        if ids.len() > keep {
            if keep < 16 {
                return Err(Error::msg(format!(
                    "{} sample {} cannot be cut to {length} tokens",
                    s.task, s.index
                )));
            }
            let half = keep / 2;
            let head = tok.decode(&ids[..half]);
            let tail = tok.decode(&ids[ids.len() - (keep - half)..]);
            s.input = format!("{head}{tail}");
            s.meta.insert("truncated_from".into(), ids.len().into());
        }
        Ok(s)
    }
}

impl SampleSource for TaskSamples<'_> {
    fn sample(&self, task: &str, length: usize, index: usize) -> Result<Sample, Error> {
        if let Some(samples) = self.files.get(task) {
            let s = samples.get(index).cloned().ok_or_else(|| {
                Error::msg(format!(
                    "{task} has {} samples; there is no sample {index}",
                    samples.len()
                ))
            })?;
            return self.truncate(s, length);
        }
        let count = |s: &str| self.count_tokens(s);
        let cfg = GenConfig {
            length,
            seed: self.seed,
            data_dir: &self.data_dir,
            count_tokens: &count,
        };
        Ok(self.generator.generate(task, &cfg, index)?)
    }
    fn available(&self, task: &str) -> Option<usize> {
        self.files.get(task).map(|v| v.len())
    }
}
