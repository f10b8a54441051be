//! Running a grid: each work item is prefilled once, collecting every statistic any
//! configuration needs, and every configuration is evaluated from its own copy of that
//! cache.

use crate::grid::{GridError, GridSpec, Protocol, RunConfig, Shard, WorkItem, TEXT_TASK};
use crate::records::{Record, RecordFile, Timing};
use crate::sample::Sample;
use crate::{metrics, Error};
use kvmerger_compression::KvDtype;
use kvmerger_engine::compressor::{CompressReport, Compressor};
use kvmerger_engine::generate::GenerateParams;
use kvmerger_engine::load::LoadedModel;
use kvmerger_engine::prompt::SplitPrompt;
use kvmerger_engine::sequence::Sequence;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// Where answer-task samples come from (the task generators, or a user's JSONL file).
pub trait SampleSource: Sync {
    fn sample(&self, task: &str, length: usize, index: usize) -> Result<Sample, Error>;
    /// How many samples `task` has, when it is a finite set (a file); None: unbounded.
    fn available(&self, _task: &str) -> Option<usize> {
        None
    }
}

/// Progress reports and cancellation.
pub trait Observer {
    /// Before the first item: how many items this run has and how many were already done.
    fn begin(&self, _total: usize, _already_done: usize) {}
    /// What is happening now, for a progress line.
    fn stage(&self, _item: &WorkItem, _what: &str) {}
    /// An item finished with these records.
    fn item_done(&self, _item: &WorkItem, _records: &[Record]) {}
    /// Checked between items: false stops the run (its finished items are kept).
    fn keep_going(&self) -> bool {
        true
    }
}

pub struct Quiet;
impl Observer for Quiet {}

/// A long text to score continuations of, split into documents (e.g. novels).
pub struct TextSource {
    pub documents: Vec<(String, String)>,
}

/// A configuration ready to run.
struct Prepared {
    config: RunConfig,
    compressor: Arc<Compressor>,
}

impl Prepared {
    fn aware(&self) -> bool {
        self.config.protocol == Protocol::Aware && !self.compressor.is_noop()
    }
}

/// A configuration's own copy of a prefilled sequence, compressed.
struct Compressed {
    seq: Sequence,
    compress_s: f64,
    /// KVzip's pass on the prefill this copy came from (0 for other methods).
    pass_s: f64,
    kv_bytes: usize,
    kv_slots: usize,
}

impl Compressed {
    fn new(seq: Sequence, report: &CompressReport) -> Compressed {
        Compressed {
            kv_bytes: seq.cache.bytes(),
            kv_slots: seq.cache.total_slots(),
            seq,
            compress_s: report.secs,
            pass_s: report.pass_secs,
        }
    }
}

fn compressed_copy(lm: &LoadedModel, base: &Sequence, p: &Prepared) -> Result<Compressed, Error> {
    let mut seq = base.clone();
    seq.set_compressor(p.compressor.clone())?;
    let report = seq.compress(lm)?;
    Ok(Compressed::new(seq, &report))
}

pub struct Runner<'a> {
    pub lm: &'a LoadedModel,
    pub dtype: KvDtype,
    /// Identifies the model and settings in every record.
    pub run: String,
    pub spec: &'a GridSpec,
    pub samples: &'a dyn SampleSource,
    pub text: Option<&'a TextSource>,
}

/// What a run did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct RunSummary {
    pub items: usize,
    pub skipped: usize,
    pub evaluated: usize,
    pub stopped_early: bool,
}

impl Runner<'_> {
    fn prepare(&self) -> Result<Vec<Prepared>, Error> {
        // Lengths past the model's context are refused before any sample is made: a
        // sample of 10^8 tokens would be generated and rendered before its length was
        // checked.
        let ctx = self.lm.model.cfg.ctx_len;
        for &len in &self.spec.lengths {
            if len >= ctx {
                return Err(Error::Grid(GridError(format!(
                    "length {len} does not fit the model's context of {ctx} tokens"
                ))));
            }
        }
        let mut out = Vec::new();
        for config in self.spec.configs()? {
            let compressor = match config.budget {
                None => Arc::new(Compressor::none()),
                Some(_) => {
                    let bad = |e: &dyn std::fmt::Display| {
                        Error::Grid(GridError(format!("method '{}': {e}", config.label)))
                    };
                    // A ratio file for another depth is an error before the first prefill,
                    // not in the middle of the grid.
                    config
                        .recipe
                        .schedule
                        .check(self.lm.model.cfg.n_layers)
                        .map_err(|e| bad(&e))?;
                    let mut recipe = config.recipe.clone();
                    if recipe.recompress_margin.is_none() {
                        recipe.recompress_margin = self.spec.recompress_margin;
                    }
                    let c = Compressor::from_recipe(&recipe).map_err(|e| bad(&e))?;
                    // A budget below the method's fixed window fails at the first
                    // compression; say so before the first prefill (prompt lengths are
                    // about the grid's lengths).
                    let min = c.method.min_slots();
                    for &len in &self.spec.lengths {
                        let least = c
                            .targets(self.lm.model.cfg.n_layers, len)
                            .into_iter()
                            .min()
                            .unwrap_or(len);
                        if least < min && least < len {
                            return Err(Error::Grid(GridError(format!(
                                "method '{}': a budget of {least} slots per head at length {len} \
                                 is below the method's fixed window of {min} slots",
                                config.label
                            ))));
                        }
                    }
                    Arc::new(c)
                }
            };
            out.push(Prepared { config, compressor });
        }
        Ok(out)
    }

    /// Run this shard of the grid, appending to `out_dir/<shard file>` and skipping
    /// items already recorded there.
    pub fn run(
        &self,
        out_dir: &Path,
        shard: Shard,
        obs: &dyn Observer,
    ) -> Result<RunSummary, Error> {
        let prepared = self.prepare()?;
        let path = out_dir.join(shard.file_name());
        let mut file =
            RecordFile::open(&path).map_err(|e| Error::msg(format!("{}: {e}", path.display())))?;
        let all: Vec<WorkItem> = self
            .spec
            .items()
            .into_iter()
            .filter(|it| {
                self.samples
                    .available(&it.task)
                    .is_none_or(|n| it.index < n)
            })
            .collect();
        let items = shard.select(&all);
        let todo: Vec<(WorkItem, Vec<usize>)> = items
            .iter()
            .map(|it| {
                let missing = (0..prepared.len())
                    .filter(|&c| !file.has(&self.key(it, &prepared[c].config)))
                    .collect();
                (it.clone(), missing)
            })
            .collect();
        let mut summary = RunSummary {
            items: items.len(),
            skipped: todo.iter().filter(|(_, m)| m.is_empty()).count(),
            ..Default::default()
        };
        obs.begin(items.len(), summary.skipped);
        for (item, missing) in todo {
            if missing.is_empty() {
                continue;
            }
            if !obs.keep_going() {
                summary.stopped_early = true;
                break;
            }
            let configs: Vec<&Prepared> = missing.iter().map(|&c| &prepared[c]).collect();
            let records = if item.task == TEXT_TASK {
                self.text_item(&item, &configs, obs)?
            } else {
                self.answer_item(&item, &configs, obs)?
            };
            file.append(&records)
                .map_err(|e| Error::msg(format!("{}: {e}", file.path().display())))?;
            summary.evaluated += 1;
            obs.item_done(&item, &records);
        }
        Ok(summary)
    }

    fn key(&self, it: &WorkItem, c: &RunConfig) -> crate::records::RecordKey {
        (
            self.run.clone(),
            it.task.clone(),
            it.length,
            it.index,
            c.label.clone(),
            c.protocol.name().to_string(),
        )
    }

    /// A sequence whose prefill serves every configuration in `configs`.
    fn shared_sequence(&self, configs: &[&Prepared]) -> Sequence {
        Sequence::shared(
            &self.lm.model,
            self.dtype,
            configs.iter().map(|p| p.compressor.as_ref()),
        )
    }

    fn check_fits(&self, tokens: usize) -> Result<(), Error> {
        let ctx = self.lm.model.cfg.ctx_len;
        if tokens >= ctx {
            return Err(Error::msg(format!(
                "a prompt of {tokens} tokens does not fit the model's context of {ctx}"
            )));
        }
        Ok(())
    }

    fn record(&self, item: &WorkItem, c: &RunConfig, prompt_tokens: usize) -> Record {
        Record {
            run: self.run.clone(),
            task: item.task.clone(),
            length: item.length,
            index: item.index,
            config: c.label.clone(),
            method: c.method.clone(),
            budget: c.budget_label.clone(),
            protocol: c.protocol.name().to_string(),
            prompt_tokens,
            kv_bytes_full: 0,
            kv_bytes: 0,
            kv_slots_full: 0,
            kv_slots: 0,
            score: None,
            prediction: None,
            references: Vec::new(),
            ppl: None,
            kl: None,
            top1: None,
            meta: Default::default(),
            timing: Timing::default(),
        }
    }

    fn answer_item(
        &self,
        item: &WorkItem,
        configs: &[&Prepared],
        obs: &dyn Observer,
    ) -> Result<Vec<Record>, Error> {
        obs.stage(item, "generating the sample");
        let sample = self.samples.sample(&item.task, item.length, item.index)?;
        let lm = self.lm;
        let model = &lm.model;
        let split = self.split_sample(item, &sample, configs)?;
        self.check_fits(split.context.len() + split.question.len())?;
        let (base, full, prefill_s, aware_question_s) =
            self.prefill_and_pass(item, configs, &split, obs)?;
        let params = GenerateParams {
            max_tokens: sample.max_new_tokens.max(1),
            ..Default::default()
        };
        let mut out = Vec::new();
        for p in configs {
            obs.stage(item, &p.config.label);
            let from = if p.aware() {
                full.as_ref().expect("made above")
            } else {
                &base
            };
            // Compression during prefill cannot share the prefill: the configuration
            // feeds its own copy of the prompt, compressing as it goes.
            let (mut c, own_prefill_s) = if p.compressor.compresses_during_prefill() {
                let mut seq = Sequence::new(model, self.dtype, p.compressor.clone());
                seq.protect(split.prefix);
                let ids = if p.aware() {
                    split.joined()
                } else {
                    split.context.clone()
                };
                let done = seq.feed_context(lm, &ids)?;
                (Compressed::new(seq, &done.compress), Some(done.prefill_s))
            } else {
                (compressed_copy(lm, from, p)?, None)
            };
            let question_s = match (p.aware(), own_prefill_s) {
                (true, Some(_)) => 0.0,
                (true, None) => aware_question_s,
                (false, _) => c.seq.append(model, &split.question)?,
            };
            let gen = c
                .seq
                .generate(model, &lm.tokenizer, &params, &mut |_| true)?;
            let mut r = self.record(item, &p.config, from.tokens().len());
            r.kv_bytes_full = from.cache.bytes();
            r.kv_bytes = c.kv_bytes;
            r.kv_slots_full = from.cache.total_slots();
            r.kv_slots = c.kv_slots;
            r.score = Some(metrics::score_sample(&sample, &gen.text));
            r.prediction = Some(gen.text);
            r.references = sample.references.clone();
            r.meta = sample.meta.clone();
            r.meta
                .insert("question_tokens".into(), split.question.len().into());
            r.timing = Timing {
                prefill_s: own_prefill_s.unwrap_or(prefill_s),
                compress_s: c.compress_s,
                decode_s: gen.decode_secs,
                reconstruct_s: c.pass_s,
                question_s,
            };
            out.push(r);
        }
        Ok(out)
    }

    /// The sample's prompt cut after its context (the whole prompt is the context when
    /// the sample has no question and every configuration is query-aware).
    fn split_sample(
        &self,
        item: &WorkItem,
        sample: &Sample,
        configs: &[&Prepared],
    ) -> Result<SplitPrompt, Error> {
        let lm = self.lm;
        // LongBench feeds its few-shot and code datasets as raw text.
        let chat = sample.meta.get("chat_template") != Some(&serde_json::Value::Bool(false));
        let agnostic = configs.iter().any(|p| !p.aware());
        let split = match sample.split() {
            Some((context, question)) => {
                lm.split_prompt(context, question, &sample.answer_prefix, chat)?
            }
            None if agnostic => {
                return Err(Error::msg(format!(
                    "{} sample {}: the sample does not say where its question starts, which \
                     the query-agnostic protocol needs (run it with --protocol aware)",
                    item.task, item.index
                )))
            }
            // Query-aware only: the whole prompt is the context.
            None => lm.split_prompt(&sample.input, "", &sample.answer_prefix, chat)?,
        };
        Ok(split)
    }

    /// Prefills the context and runs the configurations' passes; returns the shared
    /// sequence, its query-aware copy (if any configuration is query-aware), the
    /// prefill time and the query-aware copy's question time.
    fn prefill_and_pass(
        &self,
        item: &WorkItem,
        configs: &[&Prepared],
        split: &SplitPrompt,
        obs: &dyn Observer,
    ) -> Result<(Sequence, Option<Sequence>, f64, f64), Error> {
        let lm = self.lm;
        let model = &lm.model;
        obs.stage(item, &format!("prefilling {} tokens", split.context.len()));
        let mut base = self.shared_sequence(configs);
        base.protect(split.prefix);
        let prefill_s = base.feed(model, &split.context)?;
        // Query-aware configurations compress context and question together: their
        // copy is fed the question before any pass runs.
        let mut full = None;
        let mut aware_question_s = 0.0;
        if configs.iter().any(|p| p.aware()) {
            let mut f = base.clone();
            aware_question_s = f.feed(model, &split.question)?;
            obs.stage(item, "passes over the context and question (query-aware)");
            f.score_for(
                lm,
                configs
                    .iter()
                    .filter(|p| p.aware())
                    .map(|p| p.compressor.as_ref()),
            )?;
            full = Some(f);
        }
        obs.stage(item, "passes over the context");
        base.score_for(
            lm,
            configs
                .iter()
                .filter(|p| !p.aware())
                .map(|p| p.compressor.as_ref()),
        )?;
        Ok((base, full, prefill_s, aware_question_s))
    }

    /// The token ids of text-task sample `index`: `length` context tokens followed by
    /// `ppl_tokens + 1` continuation tokens.
    pub fn text_ids(&self, item: &WorkItem) -> Result<(Vec<u32>, String), Error> {
        let text = self
            .text
            .ok_or_else(|| Error::msg("the grid has a ppl task but no text was loaded"))?;
        text_window(
            &self.lm.tokenizer,
            text,
            item.index,
            item.length + self.spec.ppl_tokens + 1,
        )
    }

    fn text_item(
        &self,
        item: &WorkItem,
        configs: &[&Prepared],
        obs: &dyn Observer,
    ) -> Result<Vec<Record>, Error> {
        obs.stage(item, "tokenizing the text");
        let (ids, doc) = self.text_ids(item)?;
        let (context, cont) = ids.split_at(item.length);
        self.check_fits(ids.len())?;
        let model = &self.lm.model;
        obs.stage(item, &format!("prefilling {} tokens", context.len()));
        // The full cache is always the reference, even when only other configs are missing.
        let full_prep = Prepared {
            config: RunConfig::full(),
            compressor: Arc::new(Compressor::none()),
        };
        let mut all: Vec<&Prepared> = vec![&full_prep];
        all.extend(configs.iter().filter(|p| !p.compressor.is_noop()));
        let mut base = self.shared_sequence(&all);
        // A text has no template; a beginning-of-sequence token is not repeated.
        base.protect(self.lm.tokenizer.encode("", true)?.len());
        let prefill_s = base.feed(model, context)?;
        obs.stage(item, "passes over the context");
        base.score(self.lm)?;
        let mut reference: Vec<Vec<f32>> = Vec::new();
        let mut out = Vec::new();
        for (ci, p) in all.iter().enumerate() {
            obs.stage(
                item,
                &format!("{} (scoring {} tokens)", p.config.label, cont.len() - 1),
            );
            let mut c = compressed_copy(self.lm, &base, p)?;
            let t0 = Instant::now();
            let mut nll = 0.0f64;
            let (mut kl, mut agree) = (0.0f64, 0usize);
            // Feed the true continuation; each step's logits predict the next true token.
            for step in 0..cont.len() - 1 {
                c.seq.step(model, cont[step])?;
                let logits = c.seq.logits();
                let lp = log_softmax(logits);
                nll -= lp[cont[step + 1] as usize] as f64;
                if ci == 0 {
                    reference.push(lp);
                } else {
                    let r = &reference[step];
                    kl += kl_divergence(r, &lp);
                    agree += (argmax(r) == argmax(&lp)) as usize;
                }
            }
            let steps = (cont.len() - 1) as f64;
            let decode_s = t0.elapsed().as_secs_f64();
            if ci == 0 && !configs.iter().any(|c| c.compressor.is_noop()) {
                continue; // the reference was only needed, not asked for
            }
            let mut r = self.record(item, &p.config, context.len());
            r.kv_bytes_full = base.cache.bytes();
            r.kv_bytes = c.kv_bytes;
            r.kv_slots_full = base.cache.total_slots();
            r.kv_slots = c.kv_slots;
            r.ppl = Some((nll / steps).exp());
            r.kl = Some(if ci == 0 { 0.0 } else { kl / steps });
            r.top1 = Some(if ci == 0 { 1.0 } else { agree as f64 / steps });
            r.meta.insert("document".into(), doc.clone().into());
            r.meta
                .insert("scored_tokens".into(), (steps as usize).into());
            r.timing = Timing {
                prefill_s,
                compress_s: c.compress_s,
                decode_s,
                reconstruct_s: c.pass_s,
                question_s: 0.0,
            };
            out.push(r);
        }
        Ok(out)
    }
}

/// Sample `index` of a text: document `index % n`, starting at a different place on
/// each pass over the documents, `tokens` token ids long.
pub fn text_window(
    tok: &kvmerger_engine::tokenizer::Tokenizer,
    text: &TextSource,
    index: usize,
    tokens: usize,
) -> Result<(Vec<u32>, String), Error> {
    if text.documents.is_empty() {
        return Err(Error::msg("the text has no documents"));
    }
    let (title, doc) = &text.documents[index % text.documents.len()];
    let pass = index / text.documents.len();
    // Skip front matter, then step through the document a different stretch per pass.
    let mut start = (doc.len() / 50 + pass * doc.len() / 7) % doc.len().max(1);
    let mut chars = tokens * 6;
    loop {
        while !doc.is_char_boundary(start) {
            start += 1;
        }
        // Begin at a word boundary so the first token is a whole word.
        if let Some(ws) = doc[start..].find(char::is_whitespace) {
            start += ws;
        }
        let mut end = (start + chars).min(doc.len());
        while !doc.is_char_boundary(end) {
            end -= 1;
        }
        let ids = tok.encode(doc[start..end].trim_start(), true)?;
        if ids.len() >= tokens {
            return Ok((ids[..tokens].to_vec(), title.clone()));
        }
        if end == doc.len() {
            if start == 0 {
                return Err(Error::msg(format!(
                    "'{title}' has only {} tokens; {tokens} are needed",
                    ids.len()
                )));
            }
            start = 0; // too near the end: start over from the beginning
        }
        chars *= 2;
    }
}

pub fn log_softmax(x: &[f32]) -> Vec<f32> {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = x.iter().map(|&v| ((v - m) as f64).exp()).sum();
    let lse = m + sum.ln() as f32;
    x.iter().map(|&v| v - lse).collect()
}

/// KL(p || q) from log-probabilities.
pub fn kl_divergence(log_p: &[f32], log_q: &[f32]) -> f64 {
    log_p
        .iter()
        .zip(log_q)
        .map(|(&a, &b)| {
            let p = (a as f64).exp();
            if p == 0.0 {
                0.0
            } else {
                p * (a as f64 - b as f64)
            }
        })
        .sum::<f64>()
        .max(0.0)
}

pub fn argmax(x: &[f32]) -> usize {
    x.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
            if v > bv {
                (i, v)
            } else {
                (bi, bv)
            }
        })
        .0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kl_of_a_distribution_with_itself_is_zero_and_positive_otherwise() {
        let p = log_softmax(&[1.0, 2.0, 3.0]);
        let q = log_softmax(&[3.0, 2.0, 1.0]);
        assert!(kl_divergence(&p, &p).abs() < 1e-9);
        // By hand: q reverses p, so ln(p_i/q_i) = x_i - y_i = (-2, 0, 2) and
        // KL(p||q) = 2 (p_3 - p_1).
        let expect = 2.0 * ((p[2] as f64).exp() - (p[0] as f64).exp());
        assert!((kl_divergence(&p, &q) - expect).abs() < 1e-6);
        assert_eq!(argmax(&[0.1, 0.7, 0.2]), 1);
    }
}
