//! One sequence's cache with what its compression needs: the statistics collected as
//! tokens are fed, the tokens themselves (KVzip repeats them), and whether it has been
//! compressed. Cloning a sequence is how one prefill serves several compressions (the
//! evaluation harness) or several questions.
//!
//! The lifecycle of a question about a document (the query-agnostic protocol):
//!
//! ```text
//! let mut seq = Sequence::new(&model, dtype, compressor.needs());
//! seq.feed(&model, &split.context)?;             // collecting statistics
//! seq.score_reconstruction(&model, &prompts)?;   // only if the method is KVzip
//! seq.compress(&compressor)?;                    // the context, before any question
//! seq.append(&model, &split.question)?;          // uncompressed
//! // decode from seq.logits()
//! ```
//!
//! Feeding the question before compressing instead gives the query-aware protocol.
//!
//! With a recipe that compresses during prefill (`prefill_chunk`), `feed_within` feeds
//! the context in chunks and compresses back to the budget after each one, so the cache
//! never holds more than the budget plus one chunk, whatever the prompt's length:
//!
//! ```text
//! seq.feed_within(&model, &split.context, &compressor)?; // compressed as it goes
//! seq.append(&model, &split.question)?;
//! ```

use crate::cache::{KvCache, PrefillStats};
use crate::compress::{CompressReport, Compressor};
use crate::generate::{GenerateParams, Generation};
use crate::model::{Logits, Model, Segment};
use crate::prompt::RepeatPrompts;
use crate::tokenizer::Tokenizer;
use crate::Error;
use kvmerger_compression::{KvDtype, StatsNeeds};
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct Sequence {
    pub cache: KvCache,
    pub stats: PrefillStats,
    /// What feeding collects (the reconstruction pass is separate).
    needs: StatsNeeds,
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
}

impl Sequence {
    /// An empty sequence that will collect the statistics `needs` asks for.
    pub fn new(model: &Model, dtype: KvDtype, needs: StatsNeeds) -> Sequence {
        Sequence {
            cache: model.new_cache(dtype),
            stats: PrefillStats::default(),
            needs: StatsNeeds {
                reconstruction: false,
                ..needs
            },
            tokens: Vec::new(),
            protect: 0,
            logits: Vec::new(),
            compressed_at: None,
            targets: Vec::new(),
            peak_bytes: 0,
            prefill_passes: 0,
            decode_stats: PrefillStats::default(),
            decode_passes: 0,
        }
    }

    /// An empty sequence that collects what `compressor` needs (nothing for None or a
    /// compressor that changes nothing).
    pub fn for_compressor(
        model: &Model,
        dtype: KvDtype,
        compressor: Option<&Compressor>,
    ) -> Sequence {
        let needs = compressor
            .filter(|c| !c.is_noop())
            .map(|c| c.needs())
            .unwrap_or_default();
        Sequence::new(model, dtype, needs)
    }

    /// An empty sequence whose prefill serves several compressors (copies of it are
    /// compressed by each): it collects the union of what they need.
    pub fn shared<'c>(
        model: &Model,
        dtype: KvDtype,
        compressors: impl IntoIterator<Item = &'c Compressor>,
    ) -> Sequence {
        let needs = compressors
            .into_iter()
            .filter(|c| !c.is_noop())
            .fold(StatsNeeds::default(), |all, c| all.union(c.needs()));
        Sequence::new(model, dtype, needs)
    }

    /// The first `n` tokens (a chat template's opening) are kept by KVzip whatever
    /// they score, and not repeated by its reconstruction pass.
    pub fn protect(&mut self, n: usize) {
        self.protect = n;
    }

    /// Feed `ids`, collecting statistics (before compression: a context, or in the
    /// query-aware protocol the question too). Returns the seconds it took.
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

    /// Feed a prompt under `compressor`'s recipe. With `prefill_chunk`, the prompt goes
    /// in chunks of that many tokens, and after each chunk every head is compressed back
    /// to its share of the whole prompt's budget, so the cache holds at most the budget
    /// plus one chunk: a prompt of any length within the model's context can be read.
    /// Positions stay the original ones. Statistics are those of the queries since the
    /// last compression (H2O's accumulated scores travel with their slots). Without
    /// `prefill_chunk`, this is [`Sequence::feed`] followed by [`Sequence::compress`].
    /// Everything that can be refused is refused before the first chunk.
    pub fn feed_within(
        &mut self,
        model: &Model,
        ids: &[u32],
        compressor: &Compressor,
    ) -> Result<(f64, CompressReport), Error> {
        let t0 = Instant::now();
        let total = self.cache.n_seen + ids.len();
        if total > model.cfg.ctx_len {
            return Err(Error::ContextOverflow {
                prompt: total,
                ctx: model.cfg.ctx_len,
            });
        }
        compressor.check()?;
        compressor.check_prompt(model.cfg.n_layers, total)?;
        let chunk = match compressor.prefill_chunk {
            Some(c) if !compressor.is_noop() => c.max(1),
            _ => {
                let secs = self.feed(model, ids)?;
                let (report, _) = self.compress(compressor)?;
                return Ok((secs, report));
            }
        };
        if self.is_compressed() {
            return Err(Error::Invalid(
                "statistics are collected before compression; use append after it".into(),
            ));
        }
        // check() refused a reconstruction pass, which needs the whole prompt.
        self.needs = self.needs.union(compressor.needs());
        let mut report = CompressReport {
            method: compressor.name().to_string(),
            ..Default::default()
        };
        for part in ids.chunks(chunk) {
            self.forward_collecting(model, part)?;
            let pass = compressor
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
        self.targets = compressor.targets(model.cfg.n_layers, total);
        Ok((t0.elapsed().as_secs_f64(), report))
    }

    /// The next prefill segment of `prompt` for a batched pass ([`Model::forward_batch`]):
    /// at most `max` tokens from where the last one ended, stopping at a chunk's end
    /// when `compressor` compresses during prefill. Call
    /// [`Sequence::after_prefill_segment`] once the pass has run.
    pub fn prefill_segment<'a>(
        &'a mut self,
        prompt: &'a [u32],
        max: usize,
        compressor: Option<&Compressor>,
    ) -> Segment<'a> {
        let done = self.tokens.len().min(prompt.len());
        let total = prompt.len();
        let mut n = max.max(1).min(total - done);
        // After compression, tokens are appended as they are (a question, a new turn):
        // no statistics, no compression during prefill.
        let compressor = compressor.filter(|_| !self.is_compressed());
        // Window statistics describe the end of the input they were collected for: the
        // whole prompt, or with compression during prefill the chunk that the next
        // compression ends.
        let (mut start, mut input) = (done, total);
        if let Some(c) = within_chunk(compressor) {
            n = n.min(c - done % c);
            let chunk_start = done - done % c;
            start = done - chunk_start;
            input = c.min(total - chunk_start);
        }
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
    /// compress back to the budget when `compressor` compresses during prefill.
    /// Returns the report of that compression, if one ran.
    pub fn after_prefill_segment(
        &mut self,
        prompt: &[u32],
        n: usize,
        logits: Vec<f32>,
        compressor: Option<&Compressor>,
    ) -> Result<Option<CompressReport>, Error> {
        let done = self.tokens.len();
        self.tokens.extend_from_slice(&prompt[done..done + n]);
        self.logits = logits;
        self.note_peak();
        let done = self.tokens.len();
        let compressor = compressor.filter(|_| !self.is_compressed());
        match (compressor, within_chunk(compressor)) {
            (Some(c), Some(k)) if done.is_multiple_of(k) && done < prompt.len() => {
                let r = c.after_prefill_chunk(&mut self.cache, &mut self.stats, prompt.len())?;
                if r.as_ref().is_some_and(|r| r.bytes_after < r.bytes_before) {
                    self.prefill_passes += 1;
                }
                Ok(r)
            }
            _ => Ok(None),
        }
    }

    /// One decode step's segment for a batched pass: `token` appended, with the
    /// statistics re-compression needs when `compressor` has a margin. Call
    /// [`Sequence::after_decode_step`] once the pass has run.
    pub fn decode_segment<'a>(
        &'a mut self,
        token: &'a [u32],
        compressor: Option<&Compressor>,
    ) -> Segment<'a> {
        let needs = match compressor {
            Some(c) if self.is_compressed() => c.decode_needs(),
            _ => StatsNeeds::default(),
        };
        let stats = needs.any().then_some(&mut self.decode_stats);
        Segment::decode(token, &mut self.cache, needs, stats)
    }

    /// After a decode step appended `token`: re-compress to the targets of the last
    /// compression once a head passed them by `compressor`'s margin. Returns the report
    /// of that compression, if one ran.
    pub fn after_decode_step(
        &mut self,
        token: u32,
        logits: Vec<f32>,
        compressor: Option<&Compressor>,
    ) -> Result<Option<CompressReport>, Error> {
        self.tokens.push(token);
        self.logits = logits;
        self.note_peak();
        let Some(c) = compressor.filter(|_| self.is_compressed()) else {
            return Ok(None);
        };
        let r = c.recompress_if_over(&mut self.cache, &self.targets, &self.decode_stats)?;
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
    pub fn step(
        &mut self,
        model: &Model,
        token: u32,
        compressor: Option<&Compressor>,
    ) -> Result<Option<CompressReport>, Error> {
        let tok = [token];
        let logits = {
            let mut seg = [self.decode_segment(&tok, compressor)];
            model.forward_batch(&mut seg)?.pop().unwrap_or_default()
        };
        self.after_decode_step(token, logits, compressor)
    }

    /// Generate from the last logits until a stop condition, stepping this sequence
    /// (re-compressing past `compressor`'s margin). `on_text` receives text as it
    /// becomes final and returns false to cancel.
    pub fn generate(
        &mut self,
        model: &Model,
        tok: &Tokenizer,
        params: &GenerateParams,
        compressor: Option<&Compressor>,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Generation, Error> {
        let prompt = self.tokens.clone();
        let logits = self.take_logits();
        crate::generate::generate_with(tok, &prompt, params, logits, on_text, &mut |next| {
            if self.cache.n_seen + 1 > model.cfg.ctx_len {
                return Ok(None);
            }
            self.step(model, next, compressor)?;
            Ok(Some(self.take_logits()))
        })
    }

    /// Re-compression passes while decoding.
    pub fn decode_passes(&self) -> usize {
        self.decode_passes
    }

    /// The most KV bytes this sequence can hold with `remaining` more tokens: each head
    /// grows by one slot a token, and with `compressor`'s re-compression margin falls
    /// back to its target once past target + margin.
    pub fn kv_bound(&self, compressor: Option<&Compressor>, remaining: usize) -> usize {
        let margin = compressor.and_then(|c| c.recompress_margin);
        let slots: usize = self
            .cache
            .layers
            .iter()
            .enumerate()
            .map(|(l, heads)| {
                heads
                    .iter()
                    .map(|h| match self.targets.get(l) {
                        Some(&t) => crate::compress::head_bound(h.len(), t, margin, remaining),
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
        self.logits = model.forward(
            ids,
            &mut self.cache,
            self.needs,
            Some(&mut self.stats),
            Logits::Last,
        )?;
        self.tokens.extend_from_slice(ids);
        self.note_peak();
        Ok(())
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

    /// Run KVzip's reconstruction pass over everything fed so far, unless its scores
    /// are already there. Returns the seconds it took.
    pub fn score_reconstruction(
        &mut self,
        model: &Model,
        prompts: &RepeatPrompts,
    ) -> Result<f64, Error> {
        if self.has_reconstruction() {
            return Ok(0.0);
        }
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
        )?;
        Ok(t0.elapsed().as_secs_f64())
    }

    pub fn has_reconstruction(&self) -> bool {
        !self.stats.heads.is_empty()
            && self
                .stats
                .heads
                .iter()
                .flatten()
                .all(|h| h.reconstruction.is_some())
    }

    /// Compress the cache with `compressor` (a no-op for the full cache). Returns the
    /// report and the per-layer slot targets, which bound the cache during decoding.
    pub fn compress(
        &mut self,
        compressor: &Compressor,
    ) -> Result<(CompressReport, Vec<usize>), Error> {
        if compressor.is_noop() {
            return Ok((CompressReport::default(), Vec::new()));
        }
        let out = compressor.compress_prompt(&mut self.cache, &self.stats)?;
        self.stats.clear_slot_stats();
        self.compressed_at = Some(self.tokens.len());
        self.targets = out.1.clone();
        Ok(out)
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

/// The chunk of compression during prefill, if `compressor` has one and compresses.
fn within_chunk(compressor: Option<&Compressor>) -> Option<usize> {
    compressor
        .filter(|c| !c.is_noop())
        .and_then(|c| c.prefill_chunk)
        .filter(|&k| k > 0)
}
