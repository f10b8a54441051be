//! One sequence's cache with its compression: the compressor it owns, the statistics
//! collected as tokens are fed, the tokens themselves (KVzip repeats them), and whether
//! it has been compressed. "No compression" is a compressor that changes nothing
//! ([`Compressor::none`]), so every caller runs the same lifecycle. Cloning a sequence
//! is how one prefill serves several compressions (the evaluation harness) or several
//! questions.
//!
//! The lifecycle of a question about a document (the query-agnostic protocol):
//!
//! ```text
//! let mut seq = Sequence::new(&lm.model, dtype, compressor);
//! seq.protect(split.prefix);                    // the chat template's opening
//! let report = seq.feed_context(&lm, &split.context)?; // prefill, any pass, compress
//! seq.append(&lm.model, &split.question)?;       // uncompressed
//! let gen = seq.generate(&lm.model, &lm.tokenizer, &params, &mut on_text)?;
//! ```
//!
//! `feed_context` prefills in chunks and compresses after each one when the recipe
//! says so (`prefill_chunk`), runs KVzip's reconstruction pass when the method needs
//! it (the only place it is started), and compresses. Feeding the question before
//! compressing instead gives the query-aware protocol. The batched forms
//! ([`Sequence::prefill_segment`], [`Sequence::decode_segment`] and their `after_`
//! calls) run the same steps over a pass shared with other sequences.

use crate::cache::{KvCache, PrefillStats};
use crate::compressor::{CompressReport, Compressor};
use crate::generate::{GenerateParams, Generation};
use crate::load::LoadedModel;
use crate::model::{Logits, Model, Segment};
use crate::prompt::RepeatPrompts;
use crate::tokenizer::Tokenizer;
use crate::Error;
use kvmerger_compression::{KvDtype, StatsNeeds};
use std::sync::Arc;
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct Sequence {
    pub cache: KvCache,
    pub stats: PrefillStats,
    compressor: Arc<Compressor>,
    /// What feeding collects (the reconstruction pass is separate).
    needs: StatsNeeds,
    /// Whether some compressor this sequence's prefill serves needs KVzip's pass.
    needs_pass: bool,
    /// Seconds KVzip's pass took on this sequence's prefill.
    pass_secs: f64,
    tokens: Vec<u32>,
    /// Leading tokens KVzip does not score (the chat template's opening).
    protect: usize,
    logits: Vec<f32>,
    /// Tokens fed when the cache was last compressed (None before any compression):
    /// everything from here on is held one slot per token, exactly as fed (see
    /// [`Sequence::truncate`]).
    compressed_at: Option<usize>,
    /// Per-layer slot targets of the last compression (they bound re-compression).
    targets: Vec<usize>,
    /// The most KV bytes the cache has held after a forward pass.
    peak_bytes: usize,
    /// Compression passes run during prefill.
    prefill_passes: usize,
    /// Statistics of the decode steps since the last compression (re-compression).
    decode_stats: PrefillStats,
    /// Re-compression passes while decoding.
    decode_passes: usize,
    /// Asked between steps of long work (see [`Sequence::set_cancel`]).
    cancel: Option<crate::Cancel>,
}

/// What [`Sequence::feed_context`] did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ContextReport {
    /// Seconds of the prefill (with compression during prefill, its passes included).
    pub prefill_s: f64,
    /// The compression (during prefill: every pass together; KVzip's pass in its
    /// `pass_secs`); empty without one.
    pub compress: CompressReport,
}

impl Sequence {
    /// An empty sequence compressed by `compressor`, collecting what it needs.
    pub fn new(model: &Model, dtype: KvDtype, compressor: Arc<Compressor>) -> Sequence {
        let needs = compressor.needs();
        Sequence::with_needs(model, dtype, compressor, needs)
    }

    /// An empty sequence that keeps every token (no compression).
    pub fn uncompressed(model: &Model, dtype: KvDtype) -> Sequence {
        Sequence::new(model, dtype, Arc::new(Compressor::none()))
    }

    /// An empty sequence whose prefill serves several compressors: it collects the union
    /// of what they need, and each copy takes its own with [`Sequence::set_compressor`].
    pub fn shared<'c>(
        model: &Model,
        dtype: KvDtype,
        compressors: impl IntoIterator<Item = &'c Compressor>,
    ) -> Sequence {
        let needs = compressors
            .into_iter()
            .filter(|c| !c.is_noop())
            .fold(StatsNeeds::default(), |all, c| all.union(c.needs()));
        Sequence::with_needs(model, dtype, Arc::new(Compressor::none()), needs)
    }

    fn with_needs(
        model: &Model,
        dtype: KvDtype,
        compressor: Arc<Compressor>,
        needs: StatsNeeds,
    ) -> Sequence {
        Sequence {
            cache: model.new_cache(dtype),
            stats: PrefillStats::default(),
            compressor,
            needs: StatsNeeds {
                reconstruction: false,
                ..needs
            },
            needs_pass: needs.reconstruction,
            pass_secs: 0.0,
            tokens: Vec::new(),
            protect: 0,
            logits: Vec::new(),
            compressed_at: None,
            targets: Vec::new(),
            peak_bytes: 0,
            prefill_passes: 0,
            decode_stats: PrefillStats::default(),
            decode_passes: 0,
            cancel: None,
        }
    }

    /// A sequence from its parts, as [`crate::kvc`] stores them: the cache holding
    /// `tokens` (compressed up to token `compressed_end`, with the per-layer `targets`
    /// of that compression), its first `protect` tokens a template's opening. Ready to
    /// be appended a question.
    pub fn restore(
        compressor: Arc<Compressor>,
        cache: KvCache,
        tokens: Vec<u32>,
        compressed_end: usize,
        targets: Vec<usize>,
        protect: usize,
    ) -> Result<Sequence, Error> {
        if cache.n_seen != tokens.len() || compressed_end > tokens.len() {
            return Err(Error::Invalid(format!(
                "a cache of {} tokens compressed up to {compressed_end} does not hold {} tokens",
                cache.n_seen,
                tokens.len()
            )));
        }
        if !targets.is_empty() && targets.len() != cache.layers.len() {
            return Err(Error::Invalid(format!(
                "{} layer targets for {} layers",
                targets.len(),
                cache.layers.len()
            )));
        }
        let bytes = cache.bytes();
        Ok(Sequence {
            cache,
            stats: PrefillStats::default(),
            compressor,
            needs: StatsNeeds::default(),
            needs_pass: false,
            pass_secs: 0.0,
            tokens,
            protect,
            logits: Vec::new(),
            compressed_at: (compressed_end > 0).then_some(compressed_end),
            targets,
            peak_bytes: bytes,
            prefill_passes: 0,
            decode_stats: PrefillStats::default(),
            decode_passes: 0,
            cancel: None,
        })
    }

    /// How many leading tokens are a template's opening (see [`Sequence::protect`]).
    pub fn protected(&self) -> usize {
        self.protect
    }

    /// Per-layer slot targets of the last compression (empty before any).
    pub fn targets(&self) -> &[usize] {
        &self.targets
    }

    /// Long work on this sequence (a prefill, KVzip's pass) asks `cancel` between its
    /// steps and stops with [`Error::Cancelled`] when it says so.
    pub fn set_cancel(&mut self, cancel: crate::Cancel) {
        self.cancel = Some(cancel);
    }

    /// The compressor of this copy of a shared prefill ([`Sequence::shared`]), which
    /// must have collected what it needs; before compression only.
    pub fn set_compressor(&mut self, compressor: Arc<Compressor>) -> Result<(), Error> {
        if self.is_compressed() {
            return Err(Error::Invalid(
                "a compressed sequence keeps the compressor that compressed it".into(),
            ));
        }
        if !compressor.is_noop() {
            let want = compressor.needs();
            let have = StatsNeeds {
                reconstruction: self.needs_pass,
                ..self.needs
            };
            if have.union(want) != have {
                return Err(Error::Invalid(format!(
                    "{}: this prefill did not collect what it needs ({want})",
                    compressor.name()
                )));
            }
        }
        self.compressor = compressor;
        Ok(())
    }

    /// The compressor this sequence compresses with.
    pub fn compressor(&self) -> &Compressor {
        &self.compressor
    }

    /// A shared handle on the compressor (for a sequence built from this one).
    pub fn compressor_handle(&self) -> Arc<Compressor> {
        self.compressor.clone()
    }

    /// The first `n` tokens (a chat template's opening) are kept by KVzip whatever
    /// they score, and not repeated by its reconstruction pass.
    pub fn protect(&mut self, n: usize) {
        self.protect = n;
    }

    /// Feed `ids`, collecting statistics, without compressing (a context to compress
    /// later, or in the query-aware protocol the question too). Returns the seconds it
    /// took.
    pub fn feed(&mut self, model: &Model, ids: &[u32]) -> Result<f64, Error> {
        if self.is_compressed() {
            return Err(Error::Invalid(
                "statistics are collected before compression; use append after it".into(),
            ));
        }
        let t0 = Instant::now();
        self.forward_collecting(model, ids)?;
        // Reconstruction scores described the shorter sequence.
        for h in self.stats.heads.iter_mut().flatten() {
            h.reconstruction = None;
        }
        Ok(t0.elapsed().as_secs_f64())
    }

    /// Append `ids` without collecting statistics (a question after compression).
    pub fn append(&mut self, model: &Model, ids: &[u32]) -> Result<f64, Error> {
        let t0 = Instant::now();
        self.cache.reserve(ids.len() + 1);
        self.logits = model.forward(
            ids,
            &mut self.cache,
            StatsNeeds::default(),
            None,
            Logits::Last,
        )?;
        self.tokens.extend_from_slice(ids);
        self.note_peak();
        Ok(t0.elapsed().as_secs_f64())
    }

    /// A context's whole lifecycle: everything that can be refused is refused first;
    /// then `ids` are prefilled (in chunks, compressing back to the budget after each,
    /// when the recipe compresses during prefill, so the cache never holds more than
    /// the budget plus one chunk), KVzip's pass runs when the method needs it, and the
    /// cache is compressed. Positions stay the original ones.
    pub fn feed_context(&mut self, lm: &LoadedModel, ids: &[u32]) -> Result<ContextReport, Error> {
        let model = &lm.model;
        let total = self.cache.n_seen + ids.len();
        if total > model.cfg.ctx_len {
            return Err(Error::ContextOverflow {
                prompt: total,
                ctx: model.cfg.ctx_len,
            });
        }
        let c = self.compressor.clone();
        c.check()?;
        c.check_prompt(model.cfg.n_layers, total)?;
        model.check_learned(self.needs)?;
        if self.is_compressed() {
            return Err(Error::Invalid(
                "statistics are collected before compression; use append after it".into(),
            ));
        }
        let Some(chunk) = self.within_chunk() else {
            let prefill_s = self.feed(model, ids)?;
            let compress = self.compress(lm)?;
            return Ok(ContextReport {
                prefill_s,
                compress,
            });
        };
        let t0 = Instant::now();
        let mut report = CompressReport {
            method: c.name().to_string(),
            ..Default::default()
        };
        for part in ids.chunks(chunk) {
            self.forward_collecting(model, part)?;
            let pass = c
                .after_prefill_chunk(&mut self.cache, &mut self.stats, total)?
                .unwrap_or_default();
            if pass.bytes_after < pass.bytes_before {
                self.prefill_passes += 1;
            }
            report.secs += pass.secs;
        }
        // Every head was uncompressed once: the whole prompt's slots and bytes.
        let heads = model.cfg.n_kv_heads;
        report.layer_slots = self
            .cache
            .layers
            .iter()
            .map(|l| (total * heads, l.iter().map(|h| h.len()).sum()))
            .collect();
        report.bytes_before = total * self.cache.token_bytes();
        report.bytes_after = self.cache.bytes();
        self.compressed_at = Some(self.tokens.len());
        self.targets = c.targets(model.cfg.n_layers, total);
        Ok(ContextReport {
            prefill_s: t0.elapsed().as_secs_f64(),
            compress: report,
        })
    }

    /// Runs every pass beyond the prefill that the compressors this sequence serves
    /// need: KVzip's reconstruction pass, over everything fed so far, unless its scores
    /// are there already. Returns the seconds it took (0 when none ran).
    pub fn score(&mut self, lm: &LoadedModel) -> Result<f64, Error> {
        if !self.needs_pass || self.has_reconstruction() {
            return Ok(0.0);
        }
        self.score_with(&lm.model, &lm.repeat_prompts()?)
    }

    /// [`Sequence::score`] with KVzip's prompts given (another chunk size, say).
    pub fn score_with(&mut self, model: &Model, prompts: &RepeatPrompts) -> Result<f64, Error> {
        if self.is_compressed() {
            return Err(Error::Invalid(
                "KVzip's reconstruction pass scores a cache before it is compressed".into(),
            ));
        }
        let t0 = Instant::now();
        crate::reconstruct::reconstruction_scores(
            model,
            &self.cache,
            &self.tokens,
            self.protect,
            prompts,
            &mut self.stats,
            self.cancel.as_ref(),
        )?;
        self.pass_secs = t0.elapsed().as_secs_f64();
        Ok(self.pass_secs)
    }

    /// [`Sequence::score`] when one of `compressors` (those a shared prefill's copies
    /// will take) needs a pass: a pass none of them needs is not run.
    pub fn score_for<'c>(
        &mut self,
        lm: &LoadedModel,
        compressors: impl IntoIterator<Item = &'c Compressor>,
    ) -> Result<f64, Error> {
        if compressors.into_iter().any(|c| c.needs().reconstruction) {
            self.score(lm)
        } else {
            Ok(0.0)
        }
    }

    /// Whether KVzip's scores for the whole cache are there.
    pub fn has_reconstruction(&self) -> bool {
        !self.stats.heads.is_empty()
            && self
                .stats
                .heads
                .iter()
                .flatten()
                .all(|h| h.reconstruction.is_some())
    }

    /// Compress the cache with this sequence's compressor, after the passes it needs
    /// ([`Sequence::score`]): once, before any question under the query-agnostic
    /// protocol. Nothing changes without compression (an empty report).
    pub fn compress(&mut self, lm: &LoadedModel) -> Result<CompressReport, Error> {
        if self.compressor.is_noop() {
            return Ok(CompressReport::default());
        }
        let needs_pass = self.compressor.needs().reconstruction;
        if needs_pass {
            self.score(lm)?;
        }
        let (mut report, targets) = self
            .compressor
            .compress_prompt(&mut self.cache, &self.stats)?;
        if needs_pass {
            report.pass_secs = self.pass_secs;
        }
        self.stats.clear_slot_stats();
        self.compressed_at = Some(self.tokens.len());
        self.targets = targets;
        Ok(report)
    }

    /// The next prefill segment of `prompt` for a batched pass ([`Model::forward_batch`]):
    /// at most `max` tokens from where the last one ended, stopping at a chunk's end
    /// when the recipe compresses during prefill. Call
    /// [`Sequence::after_prefill_segment`] once the pass has run.
    pub fn prefill_segment<'a>(&'a mut self, prompt: &'a [u32], max: usize) -> Segment<'a> {
        let done = self.tokens.len().min(prompt.len());
        let total = prompt.len();
        let mut n = max.max(1).min(total - done);
        // Window statistics describe the end of the input they were collected for: the
        // whole prompt, or with compression during prefill the chunk that the next
        // compression ends.
        let (mut start, mut input) = (done, total);
        if let Some(c) = self.within_chunk() {
            n = n.min(c - done % c);
            let chunk_start = done - done % c;
            start = done - chunk_start;
            input = c.min(total - chunk_start);
        }
        // After compression, tokens are appended as they are (a question, a new turn):
        // no statistics.
        let needs = if self.is_compressed() {
            StatsNeeds::default()
        } else {
            self.needs
        };
        Segment {
            tokens: &prompt[done..done + n],
            cache: &mut self.cache,
            needs,
            stats: needs.any().then_some(&mut self.stats),
            start,
            total: input,
            logits: (done + n == total).then_some(Logits::Last),
        }
    }

    /// After a batched pass ran a prefill segment of `n` tokens of `prompt` (with its
    /// `logits`, empty until the last segment): record them, and at a chunk's end
    /// compress back to the budget when the recipe compresses during prefill.
    /// Returns the report of that compression, if one ran.
    pub fn after_prefill_segment(
        &mut self,
        prompt: &[u32],
        n: usize,
        logits: Vec<f32>,
    ) -> Result<Option<CompressReport>, Error> {
        let done = self.tokens.len();
        self.tokens.extend_from_slice(&prompt[done..done + n]);
        self.logits = logits;
        self.note_peak();
        let done = self.tokens.len();
        match self.within_chunk() {
            Some(k) if done.is_multiple_of(k) && done < prompt.len() => {
                let r = self.compressor.after_prefill_chunk(
                    &mut self.cache,
                    &mut self.stats,
                    prompt.len(),
                )?;
                if r.as_ref().is_some_and(|r| r.bytes_after < r.bytes_before) {
                    self.prefill_passes += 1;
                }
                Ok(r)
            }
            _ => Ok(None),
        }
    }

    /// A prompt prefilled through [`Sequence::prefill_segment`] reached the end of its
    /// context: compress it (after KVzip's pass, when the method needs one; with
    /// compression during prefill, the last chunk's), unless it already is.
    pub fn finish_context(&mut self, lm: &LoadedModel) -> Result<Option<CompressReport>, Error> {
        if self.is_compressed() || self.compressor.is_noop() {
            return Ok(None);
        }
        self.compress(lm).map(Some)
    }

    /// One decode step's segment for a batched pass: `token` appended, with the
    /// statistics re-compression needs when the recipe has a margin. Call
    /// [`Sequence::after_decode_step`] once the pass has run.
    pub fn decode_segment<'a>(&'a mut self, token: &'a [u32]) -> Segment<'a> {
        let needs = if self.is_compressed() && !self.compressor.is_noop() {
            self.compressor.decode_needs()
        } else {
            StatsNeeds::default()
        };
        let stats = needs.any().then_some(&mut self.decode_stats);
        Segment::decode(token, &mut self.cache, needs, stats)
    }

    /// After a decode step appended `token`: re-compress to the targets of the last
    /// compression once a head passed them by the recipe's margin. Returns the report
    /// of that compression, if one ran.
    pub fn after_decode_step(
        &mut self,
        token: u32,
        logits: Vec<f32>,
    ) -> Result<Option<CompressReport>, Error> {
        self.tokens.push(token);
        self.logits = logits;
        self.note_peak();
        if !self.is_compressed() || self.compressor.is_noop() {
            return Ok(None);
        }
        let r = self.compressor.recompress_if_over(
            &mut self.cache,
            &self.targets,
            &self.decode_stats,
        )?;
        if r.is_some() {
            self.decode_stats = PrefillStats::default();
            self.decode_passes += 1;
            self.compressed_at = Some(self.tokens.len());
        }
        Ok(r)
    }

    /// One decode step on its own: `token` appended (with what re-compression needs),
    /// then re-compression if a head passed its target by the margin. The new logits
    /// are in [`Sequence::logits`].
    pub fn step(&mut self, model: &Model, token: u32) -> Result<Option<CompressReport>, Error> {
        let tok = [token];
        let logits = {
            let mut seg = [self.decode_segment(&tok)];
            model.forward_batch(&mut seg)?.pop().unwrap_or_default()
        };
        self.after_decode_step(token, logits)
    }

    /// Generate from the last logits until a stop condition, stepping this sequence
    /// (re-compressing past the recipe's margin). `on_text` receives text as it
    /// becomes final and returns false to cancel.
    pub fn generate(
        &mut self,
        model: &Model,
        tok: &Tokenizer,
        params: &GenerateParams,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Generation, Error> {
        let prompt = self.tokens.clone();
        let logits = self.take_logits();
        crate::generate::generate_with(tok, &prompt, params, logits, on_text, &mut |next| {
            if self.cache.n_seen + 1 > model.cfg.ctx_len {
                return Ok(None);
            }
            self.step(model, next)?;
            Ok(Some(self.take_logits()))
        })
    }

    /// Re-compression passes while decoding.
    pub fn decode_passes(&self) -> usize {
        self.decode_passes
    }

    /// The most KV bytes this sequence can hold with `remaining` more tokens: each head
    /// grows by one slot a token, and with the recipe's re-compression margin falls
    /// back to its target once past target + margin.
    pub fn kv_bound(&self, remaining: usize) -> usize {
        let margin = if self.compressor.is_noop() {
            None
        } else {
            self.compressor.recompress_margin
        };
        let slots: usize = self
            .cache
            .layers
            .iter()
            .enumerate()
            .map(|(l, heads)| {
                heads
                    .iter()
                    .map(|h| match self.targets.get(l) {
                        Some(&t) => crate::compressor::head_bound(h.len(), t, margin, remaining),
                        None => h.len() + remaining,
                    })
                    .sum::<usize>()
            })
            .sum();
        slots * self.cache.slot_bytes()
    }

    /// Feed `ids` collecting this sequence's statistics; the last logits are kept.
    fn forward_collecting(&mut self, model: &Model, ids: &[u32]) -> Result<(), Error> {
        self.cache.reserve(ids.len() + 1);
        let needs = StatsNeeds {
            reconstruction: false,
            ..self.needs
        };
        self.logits = model.forward_within(
            ids,
            &mut self.cache,
            needs,
            Some(&mut self.stats),
            Logits::Last,
            self.cancel.as_ref(),
        )?;
        self.tokens.extend_from_slice(ids);
        self.note_peak();
        Ok(())
    }

    /// The chunk of compression during prefill, if the recipe has one, compresses, and
    /// the context is not compressed yet.
    fn within_chunk(&self) -> Option<usize> {
        if self.compressor.is_noop() || self.is_compressed() {
            return None;
        }
        self.compressor.prefill_chunk.filter(|&k| k > 0)
    }

    fn note_peak(&mut self) {
        self.peak_bytes = self.peak_bytes.max(self.cache.bytes());
    }

    /// The KV bytes the cache holds now.
    pub fn kv_bytes(&self) -> usize {
        self.cache.bytes()
    }

    /// The most KV bytes the cache has held after any forward pass of this sequence.
    pub fn peak_kv_bytes(&self) -> usize {
        self.peak_bytes
    }

    /// Compression passes that dropped slots during prefill.
    pub fn prefill_passes(&self) -> usize {
        self.prefill_passes
    }

    /// The last position's logits after the latest feed or append.
    pub fn logits(&self) -> &[f32] {
        &self.logits
    }

    /// Move the last position's logits out (a decoder samples from them in place).
    pub fn take_logits(&mut self) -> Vec<f32> {
        std::mem::take(&mut self.logits)
    }

    /// Every token fed or appended so far.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    pub fn is_compressed(&self) -> bool {
        self.compressed_at.is_some()
    }

    /// Whether the context still has to be compressed: the sequence's method compresses
    /// and has not yet done so. A caller that feeds a prompt in parts stops at the
    /// context's end while this holds.
    pub fn awaits_compression(&self) -> bool {
        !self.compressor.is_noop() && !self.is_compressed()
    }

    /// Tokens fed when the cache was last compressed (0 if never): the sequence can be
    /// cut back to any length from here on ([`Sequence::truncate`]).
    pub fn compressed_end(&self) -> usize {
        self.compressed_at.unwrap_or(0)
    }

    /// How many leading tokens of `prompt` this sequence can serve once cut back to them
    /// ([`Sequence::truncate`]): the prefix they share, leaving at least the prompt's
    /// last token to prefill (its logits start the answer), and never into the
    /// compressed part. 0 when it can serve none.
    pub fn reusable_prefix(&self, prompt: &[u32]) -> usize {
        let n = common_prefix(&self.tokens, prompt).min(prompt.len().saturating_sub(1));
        if n > 0 && n >= self.compressed_end() {
            n
        } else {
            0
        }
    }

    /// The KV bytes this sequence would hold cut back to its first `n` tokens.
    pub fn kv_bytes_at(&self, n: usize) -> usize {
        let slots: usize = self
            .cache
            .layers
            .iter()
            .flatten()
            .map(|h| slots_before(h, n))
            .sum();
        slots * self.cache.slot_bytes()
    }

    /// Forget every token from position `n` on, as if only the first `n` had been fed:
    /// how a cached context is reused by a prompt that shares its first `n` tokens and
    /// then goes another way. Only tokens appended since the last compression can be
    /// dropped (before it, slots may stand for several tokens), so `n` must be at least
    /// [`Sequence::compressed_end`]. The logits are gone until the next feed; the
    /// statistics of the dropped tokens too.
    pub fn truncate(&mut self, n: usize) -> Result<(), Error> {
        if n < self.compressed_end() || n > self.tokens.len() {
            return Err(Error::Invalid(format!(
                "a sequence of {} tokens, compressed up to token {}, cannot be cut back to {n}",
                self.tokens.len(),
                self.compressed_end()
            )));
        }
        if n == self.tokens.len() {
            return Ok(());
        }
        for head in self.cache.layers.iter_mut().flatten() {
            let keep = slots_before(head, n);
            head.truncate(keep);
        }
        self.cache.n_seen = n;
        self.tokens.truncate(n);
        self.logits.clear();
        self.stats.clear_slot_stats();
        self.decode_stats = PrefillStats::default();
        Ok(())
    }
}

/// How many leading tokens `a` and `b` share.
pub fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// The slots of `head` for positions before `n`: everything compressed, then the
/// single-token slots appended since, which are in position order.
fn slots_before(head: &kvmerger_compression::HeadStore, n: usize) -> usize {
    head.meta().partition_point(|m| (m.position as usize) < n)
}
