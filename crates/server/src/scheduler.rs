//! The engine thread: admission by KV memory, chunked prefill, batched decoding.
//!
//! Handlers put [`Job`]s on a bounded queue. One thread owns every running sequence and
//! loops:
//! 1. drop queued or running requests whose client has gone (their receiver is closed)
//!    or whose deadline has passed; their caches are freed at once;
//! 2. admit queued requests in arrival order while each one's estimated peak (the whole
//!    prompt during prefill, see [`crate::compression::estimate`]) fits beside the
//!    reservations of those running, within the KV memory budget;
//! 3. build one batched forward pass: the pending token of every decoding sequence plus
//!    prompt chunks of prefilling sequences, up to `prefill_step` prompt tokens per pass,
//!    so a long prompt never stalls the others for more than one chunk;
//! 4. after the pass: a prefill that completed is compressed (its reservation falls to
//!    its compressed bound, making room for more); every sequence samples, streams its
//!    text over its channel, re-compresses when past its budget, or finishes.
//!
//! Weights are read once per pass for all sequences, which is where batching wins on CPU.

use crate::compression::KvEstimate;
use crate::contexts::ContextCache;
use crate::error::ApiError;
use crate::metrics::Metrics;
use kvmerger_compression::{KvDtype, Protocol};
use kvmerger_engine::compressor::{release_freed_memory, CompressReport, Compressor};
use kvmerger_engine::generate::{Decoder, GenerateParams, Step, StopReason, TokenConstraint};
use kvmerger_engine::load::LoadedModel;
use kvmerger_engine::sampling::TokenLogprobs;
use kvmerger_engine::sequence::Sequence;
use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedSender;

/// One request, ready for the engine.
pub struct Job {
    pub prompt: Vec<u32>,
    pub params: GenerateParams,
    pub compressor: Arc<Compressor>,
    /// Method and budget as the request resolved them (for usage reports).
    pub method: String,
    pub budget: String,
    pub estimate: KvEstimate,
    /// Where compression stops: the start of the question under the query-agnostic
    /// protocol (the rest is appended uncompressed), the prompt's end otherwise.
    pub context_end: usize,
    pub protocol: Protocol,
    /// The recipe as cached contexts are matched on (method, options, budget,
    /// schedule, protocol).
    pub cache_key: String,
    /// The context's key in the context store, when its compressed context is to be
    /// kept there ([`crate::store::key`]).
    pub store_key: Option<String>,
    /// The compressed context, read from the store before the job was queued.
    pub preloaded: Option<Sequence>,
    /// Compress the prompt and stop (an explicit context handle): nothing is
    /// generated, and the compressed context comes back in [`Finished::context`].
    pub compress_only: bool,
    /// Kept in the stored context's header (a handle's messages).
    pub context_extra: serde_json::Value,
    pub arrived: Instant,
    pub deadline: Instant,
    pub events: UnboundedSender<Event>,
    /// Report each generated token's log-probability and this many alternatives'
    /// ([`Event::Logprobs`], sent before the step's text).
    pub logprobs: Option<usize>,
    /// Only tokens this allows are sampled (structured outputs, forced tool calls).
    pub constraint: Option<Box<dyn TokenConstraint>>,
    /// Choices to generate (`n`): after the prompt is prefilled and compressed, its
    /// cache is copied for each further choice, never computed again.
    pub n: usize,
}

impl Job {
    /// The cache this job may hold at once: the prompt's peak, plus a compressed copy
    /// and its generation for every further choice.
    pub fn need(&self) -> usize {
        kv_need(&self.estimate, self.n)
    }

    /// The same request for choice `choice`, sharing its channel and deadline.
    fn fork(&self) -> Job {
        Job {
            prompt: self.prompt.clone(),
            params: self.params.clone(),
            compressor: self.compressor.clone(),
            method: self.method.clone(),
            budget: self.budget.clone(),
            estimate: self.estimate,
            context_end: self.context_end,
            protocol: self.protocol,
            cache_key: self.cache_key.clone(),
            store_key: None,
            preloaded: None,
            compress_only: false,
            context_extra: serde_json::Value::Null,
            arrived: self.arrived,
            deadline: self.deadline,
            events: self.events.clone(),
            logprobs: self.logprobs,
            constraint: None,
            n: 1,
        }
    }
}

/// The KV bytes a request of `n` choices may hold at once: the prompt's peak, plus a
/// compressed copy and its generation for every further choice.
pub fn kv_need(est: &KvEstimate, n: usize) -> usize {
    est.prefill_peak + n.saturating_sub(1) * est.steady.max(est.prefill_peak)
}

/// What a request's handler hears from the engine, in order: `Prefilled`, `Text`s (each
/// token's `Logprobs` before its text, when asked), then `Done` or `Failed`. Each
/// choice's events carry its index (0 to `n` - 1); a job ends after `n` `Done`s or
/// one `Failed`.
#[derive(Debug)]
pub enum Event {
    Prefilled(PromptReport),
    Text(usize, String),
    Logprobs(usize, TokenLogprobs),
    Done(usize, Finished),
    Failed(ApiError),
}

/// The prompt's cache after prefill and compression.
#[derive(Clone, Debug, PartialEq)]
pub struct PromptReport {
    pub method: String,
    pub budget: String,
    pub prompt_tokens: usize,
    /// Leading prompt tokens taken from a cached context instead of prefilled.
    pub cached_tokens: usize,
    pub protocol: Protocol,
    /// Slots over every (layer, KV head) without compression, and after it.
    pub slots_full: usize,
    pub slots_kept: usize,
    pub kv_bytes_full: usize,
    pub kv_bytes: usize,
    pub queue_ms: f64,
    pub prefill_ms: f64,
    pub compress_ms: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Finished {
    pub reason: StopReason,
    pub completion_tokens: usize,
    /// Cache bytes when the generation ended.
    pub kv_bytes_final: usize,
    /// Re-compressions during decoding.
    pub recompressions: usize,
    /// A compress-only job's compressed context, as a compressed-context file.
    pub context: Option<Vec<u8>>,
    /// From arrival to the first sampled token (none for a compress-only job).
    pub first_token_ms: Option<f64>,
    /// Tokens generated after the first, per second since the first (the decode rate;
    /// none with fewer than two tokens).
    pub tokens_per_s: Option<f64>,
}

/// Admission and batching settings.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub kv_memory: usize,
    pub max_queue: usize,
    pub max_batch: usize,
    pub prefill_step: usize,
    pub kv_dtype: KvDtype,
    /// Keep finished requests' contexts for later prompts that start with them.
    pub context_reuse: bool,
}

#[derive(Default)]
struct QueueState {
    jobs: VecDeque<Job>,
    /// No new jobs; finish those queued and running, then stop.
    closed: bool,
    /// Stop now: fail whatever is queued or running.
    abort: bool,
}

/// The handle handlers use: a bounded queue in front of the engine thread.
pub struct Scheduler {
    state: Mutex<QueueState>,
    wake: Condvar,
    /// Set by [`Scheduler::abort`]; long work on a sequence asks it between steps.
    aborted: Arc<std::sync::atomic::AtomicBool>,
    limits: Limits,
    metrics: Arc<Metrics>,
    /// Writes finished requests' compressed contexts to the context store.
    writer: Option<Arc<crate::store::Writer>>,
    /// Bytes of one slot in one head, and heads per token, for estimates.
    pub slot_bytes: usize,
    pub n_layers: usize,
    pub n_kv_heads: usize,
}

impl Scheduler {
    /// Start the engine thread on `pool`. The returned handle submits jobs; the join
    /// handle ends after [`Scheduler::close`] once the work is done.
    pub fn start(
        model: Arc<LoadedModel>,
        limits: Limits,
        metrics: Arc<Metrics>,
        pool: rayon::ThreadPool,
        writer: Option<Arc<crate::store::Writer>>,
    ) -> std::io::Result<(Arc<Scheduler>, std::thread::JoinHandle<()>)> {
        let probe = model.model.new_cache(limits.kv_dtype);
        let c = &model.model.cfg;
        let s = Arc::new(Scheduler {
            state: Mutex::new(QueueState::default()),
            wake: Condvar::new(),
            aborted: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            limits,
            metrics,
            writer,
            slot_bytes: probe.slot_bytes(),
            n_layers: c.n_layers,
            n_kv_heads: c.n_kv_heads,
        });
        let s2 = s.clone();
        let join = std::thread::Builder::new()
            .name("kvmerger-engine".into())
            .spawn(move || pool.install(|| Engine::new(&model, &s2).run()))?;
        Ok((s, join))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queue a job, or refuse it when the queue is full or the server is stopping.
    pub fn submit(&self, job: Job) -> Result<(), ApiError> {
        let mut st = self.lock();
        if st.closed || st.abort {
            return Err(ApiError::shutting_down());
        }
        if st.jobs.len() >= self.limits.max_queue {
            return Err(ApiError::overloaded(st.jobs.len(), 1));
        }
        st.jobs.push_back(job);
        self.metrics.queue_depth.store(st.jobs.len(), Relaxed);
        drop(st);
        self.wake.notify_one();
        Ok(())
    }

    /// Take no more jobs; the engine thread ends when the queued and running ones are done.
    pub fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_one();
    }

    /// Fail everything queued or running and end the engine thread.
    pub fn abort(&self) {
        let mut st = self.lock();
        st.closed = true;
        st.abort = true;
        drop(st);
        self.aborted.store(true, Relaxed);
        self.wake.notify_one();
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Bytes of one uncompressed token in every (layer, KV head).
    pub fn token_bytes(&self) -> usize {
        self.slot_bytes * self.n_layers * self.n_kv_heads
    }
}

enum Phase {
    /// `done` prompt tokens are in the cache.
    Prefill,
    /// `pending` was sampled and goes into the cache in the next pass.
    Decode { pending: u32 },
}

struct Seq<'m> {
    job: Job,
    /// The cache with its statistics, compression targets and re-compression state.
    seq: Sequence,
    phase: Phase,
    decoder: Decoder<'m>,
    reserved: usize,
    prefill_started: Option<Instant>,
    /// When the first token was sampled.
    first_token: Option<Instant>,
    /// The cached context this sequence started from, and the prompt tokens it held.
    source: Option<u64>,
    cached_tokens: usize,
    compress_ms: f64,
    /// Whether the context came from the context store (it is not written back).
    from_store: bool,
    /// Which of the request's `n` choices this is (0 prefills; the others are copies).
    choice: usize,
}

impl Seq<'_> {
    /// Where the prompt's prefill stops next: at the context's end while the context
    /// still has to be compressed, else at the prompt's end.
    fn prefill_end(&self) -> usize {
        if self.seq.awaits_compression() {
            self.job.context_end
        } else {
            self.job.prompt.len()
        }
    }
}

struct Engine<'m> {
    lm: &'m LoadedModel,
    sched: &'m Scheduler,
    running: Vec<Seq<'m>>,
    contexts: ContextCache,
}

/// How a sequence left the running set.
enum Exit {
    Finished(StopReason),
    Cancelled,
    Failed(ApiError),
}

impl<'m> Engine<'m> {
    fn new(lm: &'m LoadedModel, sched: &'m Scheduler) -> Self {
        Engine {
            lm,
            sched,
            running: Vec::new(),
            contexts: ContextCache::default(),
        }
    }

    fn run(mut self) {
        loop {
            if !self.intake() {
                break;
            }
            if self.running.is_empty() {
                continue;
            }
            let r = std::panic::catch_unwind(AssertUnwindSafe(|| self.step()));
            if r.is_err() {
                // A bug, not bad input (input is validated before it gets here): fail the
                // requests in flight and keep serving.
                let n = self.running.len();
                for s in self.running.drain(..) {
                    let _ = s.job.events.send(Event::Failed(ApiError::internal(
                        "the engine failed on this request's batch",
                    )));
                    self.sched.metrics.finished("error");
                }
                eprintln!("kvmerger-server: engine step panicked; {n} requests failed");
                release_freed_memory();
            }
            self.publish();
        }
        for s in self.running.drain(..) {
            let _ = s.job.events.send(Event::Failed(ApiError::shutting_down()));
        }
        self.publish();
    }

    /// Drop what is cancelled or late, admit what fits. Waits while there is nothing to
    /// do. Returns false when the engine should stop.
    fn intake(&mut self) -> bool {
        let sched = self.sched;
        let mut st = sched.lock();
        loop {
            let now = Instant::now();
            st.jobs.retain(|j| {
                if j.events.is_closed() {
                    sched.metrics.finished("cancelled");
                    false
                } else if now >= j.deadline {
                    let secs = (j.deadline - j.arrived).as_secs_f64();
                    let _ = j.events.send(Event::Failed(ApiError::timeout(secs)));
                    sched.metrics.finished("timeout");
                    false
                } else {
                    true
                }
            });
            if st.abort {
                for j in st.jobs.drain(..) {
                    let _ = j.events.send(Event::Failed(ApiError::shutting_down()));
                }
                sched.metrics.queue_depth.store(0, Relaxed);
                return false;
            }
            self.drop_gone();
            self.admit(&mut st.jobs);
            // The gauges follow admissions at once, not only completions.
            self.publish();
            sched.metrics.queue_depth.store(st.jobs.len(), Relaxed);
            if !self.running.is_empty() {
                return true;
            }
            if st.closed && st.jobs.is_empty() {
                return false;
            }
            self.publish();
            // Idle: sleep until a job arrives (or a queued client's deadline may pass).
            st = sched
                .wake
                .wait_timeout(st, Duration::from_millis(250))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn admit(&mut self, queue: &mut VecDeque<Job>) {
        let l = self.sched.limits;
        let token_bytes = self.sched.token_bytes();
        while self.running.len() < l.max_batch {
            let Some(job) = queue.front() else { break };
            let reserved: usize = self.running.iter().map(|s| s.reserved).sum();
            let found = if l.context_reuse {
                self.contexts
                    .find(&job.cache_key, &job.prompt, job.context_end)
            } else {
                None
            };
            // A reused context needs its copy plus one slot a token for the rest.
            let need = match &found {
                Some(m) => m.bytes + (job.prompt.len() - m.tokens) * token_bytes,
                None => job.need(),
            };
            // Room comes first from cached contexts, least recently used first (the one
            // this job reuses last: its copy is taken before it can go).
            let keep = found.map(|m| m.id);
            while reserved + need + self.contexts.bytes_except(keep) > l.kv_memory
                && self.contexts.evict_one(keep)
            {
                self.sched.metrics.context_evictions.fetch_add(1, Relaxed);
            }
            // With nothing running, the first job always goes in (submission already
            // refused any that could never fit), so the queue cannot stall.
            if !self.running.is_empty()
                && reserved + need + self.contexts.bytes_except(keep) > l.kv_memory
            {
                break;
            }
            let job = queue.pop_front().expect("front exists");
            self.sched.metrics.queue_wait.observe(job.arrived.elapsed());
            let mut job = job;
            let decoder = match Decoder::new(&self.lm.tokenizer, &job.prompt, &job.params) {
                Ok(d) => match job.constraint.take() {
                    Some(c) => d.with_constraint(c),
                    None => d,
                },
                Err(e) => {
                    let _ = job
                        .events
                        .send(Event::Failed(ApiError::invalid(e.to_string())));
                    self.sched.metrics.finished("error");
                    continue;
                }
            };
            // A context read from the store serves the prompt unless the memory cache
            // serves more of it.
            let preloaded = job.preloaded.take();
            let found = found.filter(|f| {
                preloaded
                    .as_ref()
                    .is_none_or(|p| f.tokens > p.tokens().len())
            });
            let (seq, source, cached_tokens, from_store) =
                self.starting_cache(&job, found, preloaded);
            // Long work on it (a long prefill chunk, KVzip's pass) stops at its deadline
            // or when the server aborts, instead of holding the engine.
            let mut seq = seq;
            let (deadline, aborted) = (job.deadline, self.sched.aborted.clone());
            let limit = (job.deadline - job.arrived).as_secs_f64();
            seq.set_cancel(kvmerger_engine::Cancel(Arc::new(move || {
                if aborted.load(Relaxed) {
                    Some("the server is shutting down".into())
                } else if Instant::now() >= deadline {
                    Some(format!("the request's time limit of {limit:.0} s passed"))
                } else {
                    None
                }
            })));
            // The copy is taken: its entry can go too if room is still short.
            while reserved + need + self.contexts.bytes() > l.kv_memory
                && self.contexts.evict_one(None)
            {
                self.sched.metrics.context_evictions.fetch_add(1, Relaxed);
            }
            self.running.push(Seq {
                seq,
                phase: Phase::Prefill,
                decoder,
                reserved: need,
                prefill_started: None,
                first_token: None,
                source,
                cached_tokens,
                compress_ms: 0.0,
                from_store,
                choice: 0,
                job,
            });
        }
    }

    /// The cache a job starts from: a context cached in memory (`found`), one read from
    /// the store (`preloaded`), or a new one; with the cached context it came from, the
    /// prompt tokens it already holds, and whether it came from the store.
    fn starting_cache(
        &mut self,
        job: &Job,
        found: Option<crate::contexts::Match>,
        preloaded: Option<Sequence>,
    ) -> (Sequence, Option<u64>, usize, bool) {
        let l = self.sched.limits;
        let reused = found.and_then(|m| Some((m, self.contexts.take(&m)?)));
        let m = &self.sched.metrics;
        let from_store = reused.is_none() && preloaded.is_some();
        let (seq, source, cached_tokens) = match (reused, preloaded) {
            (None, Some(seq)) => {
                m.store_hits.fetch_add(1, Relaxed);
                m.context_tokens_reused
                    .fetch_add(seq.tokens().len() as u64, Relaxed);
                let n = seq.tokens().len();
                (seq, None, n)
            }
            (reused, _) => match reused {
                Some((found, mut seq)) => {
                    m.context_hits.fetch_add(1, Relaxed);
                    m.context_tokens_reused
                        .fetch_add(found.tokens as u64, Relaxed);
                    seq.cache.reserve(job.prompt.len() - found.tokens);
                    (seq, Some(found.id), found.tokens)
                }
                None => {
                    if l.context_reuse {
                        m.context_misses.fetch_add(1, Relaxed);
                    }
                    let mut seq = Sequence::new(&self.lm.model, l.kv_dtype, job.compressor.clone());
                    // Room for the prompt (or, compressing during prefill, one chunk
                    // past the budget): its rows are not moved as it grows.
                    seq.cache
                        .reserve(if job.compressor.compresses_during_prefill() {
                            0
                        } else {
                            job.prompt.len()
                        });
                    (seq, None, 0)
                }
            },
        };
        (seq, source, cached_tokens, from_store)
    }

    /// Remove sequences whose client went away or whose time is up.
    fn drop_gone(&mut self) {
        let now = Instant::now();
        let mut exits = Vec::new();
        for (i, s) in self.running.iter().enumerate() {
            if s.job.events.is_closed() {
                exits.push((i, Exit::Cancelled));
            } else if now >= s.job.deadline {
                let secs = (s.job.deadline - s.job.arrived).as_secs_f64();
                exits.push((i, Exit::Failed(ApiError::timeout(secs))));
            }
        }
        self.remove(exits);
    }

    /// One batched forward pass and what follows it.
    // Over 100 lines on purpose: the pass gathers segments that borrow the running
    // sequences, runs the model once, then hands each sequence its logits; the borrows
    // tie the gathering to the pass.
    fn step(&mut self) {
        let model = &self.lm.model;
        let mut chunk_left = self.sched.limits.prefill_step;
        let mut order = Vec::new();
        let mut segs = Vec::new();
        let mut prompt_tokens = 0;
        let mut pending_tokens: Vec<[u32; 1]> = self
            .running
            .iter()
            .map(|s| match s.phase {
                Phase::Decode { pending } => [pending],
                Phase::Prefill => [0],
            })
            .collect();
        for (i, (s, tok)) in self
            .running
            .iter_mut()
            .zip(pending_tokens.iter_mut())
            .enumerate()
        {
            match &mut s.phase {
                Phase::Decode { .. } => {
                    segs.push(s.seq.decode_segment(&tok[..]));
                    order.push((i, 0));
                }
                Phase::Prefill => {
                    if chunk_left == 0 {
                        continue;
                    }
                    s.prefill_started.get_or_insert_with(Instant::now);
                    // KVzip's reconstruction pass runs once the context is in (below).
                    let end = s.prefill_end();
                    let seg = s.seq.prefill_segment(&s.job.prompt[..end], chunk_left);
                    let n = seg.tokens.len();
                    chunk_left -= n;
                    prompt_tokens += n;
                    segs.push(seg);
                    order.push((i, n));
                }
            }
        }
        let n_seqs = segs.len();
        let result = model.forward_batch(&mut segs);
        drop(segs);
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                let exits = order
                    .iter()
                    .map(|&(i, _)| (i, Exit::Failed(ApiError::internal(e.to_string()))))
                    .collect();
                self.remove(exits);
                return;
            }
        };
        let mut generated = 0;
        let mut exits = Vec::new();
        let mut forks = Vec::new();
        for (&(i, n), mut l) in order.iter().zip(logits) {
            let s = &mut self.running[i];
            let after = match s.phase {
                Phase::Prefill => {
                    match prefilled(s, n, std::mem::take(&mut l), self.sched, self.lm) {
                        Prefilled::Sample => Ok(None),
                        Prefilled::Wait => continue,
                        Prefilled::Exit(e) => {
                            exits.push((i, e));
                            continue;
                        }
                    }
                }
                Phase::Decode { pending } => s
                    .seq
                    .after_decode_step(pending, std::mem::take(&mut l))
                    .map_err(|e| ApiError::internal(e.to_string())),
            };
            match after {
                Ok(Some(r)) => record(&self.sched.metrics, &r),
                Ok(None) => {}
                Err(e) => {
                    exits.push((i, Exit::Failed(e)));
                    continue;
                }
            }
            let l = s.seq.take_logits();
            // The prompt is in and compressed: further choices start from copies.
            if s.job.n > 1 && s.first_token.is_none() {
                match fork_choices(s, &l) {
                    Ok(f) => forks.extend(f),
                    Err(e) => {
                        exits.push((i, Exit::Failed(e)));
                        continue;
                    }
                }
            }
            let (drawn, exit) = sample(s, l, &self.sched.metrics, model.cfg.ctx_len);
            generated += drawn;
            if let Some(e) = exit {
                exits.push((i, e));
            }
        }
        for (mut f, l) in forks {
            let (drawn, exit) = sample(&mut f, l, &self.sched.metrics, model.cfg.ctx_len);
            generated += drawn;
            self.running.push(f);
            if let Some(e) = exit {
                exits.push((self.running.len() - 1, e));
            }
        }
        self.sched.metrics.step(n_seqs, prompt_tokens, generated);
        self.remove(exits);
    }

    /// Take sequences out of the running set, tell their clients, free their caches.
    fn remove(&mut self, mut exits: Vec<(usize, Exit)>) {
        if exits.is_empty() {
            return;
        }
        exits.sort_by_key(|e| std::cmp::Reverse(e.0));
        let m = &self.sched.metrics;
        for (i, exit) in exits {
            let mut s = self.running.swap_remove(i);
            match exit {
                Exit::Finished(reason) => {
                    let mut rest = String::new();
                    s.decoder.finish(reason, &mut rest);
                    if !rest.is_empty() {
                        let _ = s.job.events.send(Event::Text(s.choice, rest));
                    }
                    let context = s.job.compress_only.then(|| {
                        kvmerger_engine::kvc::encode(
                            &s.seq,
                            self.lm,
                            s.job.protocol.name(),
                            std::mem::take(&mut s.job.context_extra),
                        )
                    });
                    let n = s.decoder.tokens().len();
                    let rate = s.first_token.and_then(|t| {
                        let secs = t.elapsed().as_secs_f64();
                        (n > 1 && secs > 0.0).then(|| (n - 1) as f64 / secs)
                    });
                    let _ = s.job.events.send(Event::Done(
                        s.choice,
                        Finished {
                            first_token_ms: s
                                .first_token
                                .map(|t| (t - s.job.arrived).as_secs_f64() * 1e3),
                            tokens_per_s: rate,
                            reason,
                            completion_tokens: n,
                            kv_bytes_final: s.seq.kv_bytes(),
                            recompressions: s.seq.decode_passes(),
                            context,
                        },
                    ));
                    m.finished(match reason {
                        StopReason::Eos | StopReason::StopString | StopReason::Constraint => "stop",
                        _ => "length",
                    });
                    if s.choice == 0 {
                        m.request_latency.observe(s.job.arrived.elapsed());
                    }
                    if let (Some(t), true) = (s.first_token, n > 1) {
                        m.time_per_output_token
                            .observe(t.elapsed() / (n - 1) as u32);
                    }
                    if self.sched.limits.context_reuse && s.choice == 0 {
                        let key = std::mem::take(&mut s.job.cache_key);
                        let end = s.job.context_end;
                        self.contexts
                            .store(key, s.seq, end, s.source, s.cached_tokens);
                    }
                }
                Exit::Cancelled => m.finished("cancelled"),
                Exit::Failed(e) => {
                    m.finished(if e.code == Some("timeout") {
                        "timeout"
                    } else {
                        "error"
                    });
                    let _ = s.job.events.send(Event::Failed(e));
                }
            }
        }
        // Kept contexts stay within what the running requests leave of the budget.
        let reserved: usize = self.running.iter().map(|s| s.reserved).sum();
        while reserved + self.contexts.bytes() > self.sched.limits.kv_memory
            && self.contexts.evict_one(None)
        {
            m.context_evictions.fetch_add(1, Relaxed);
        }
        release_freed_memory();
        self.publish();
    }

    /// A freshly compressed context to the store's writer (not one taken from the
    /// memory cache or the store: those were written when they were computed).
    fn store_context(sched: &Scheduler, lm: &LoadedModel, s: &mut Seq<'_>) {
        let fresh = s.source.is_none() && !s.from_store;
        if !fresh || s.seq.compressed_end() == 0 {
            return;
        }
        let (Some(w), Some(key)) = (&sched.writer, s.job.store_key.take()) else {
            return;
        };
        let bytes = kvmerger_engine::kvc::encode(
            &s.seq,
            lm,
            s.job.protocol.name(),
            std::mem::take(&mut s.job.context_extra),
        );
        if !w.write(key, bytes) {
            sched.metrics.store_errors.fetch_add(1, Relaxed);
        }
    }

    /// KV gauges from the running caches.
    fn publish(&self) {
        let sched = self.sched;
        let per_token = sched.token_bytes();
        let (mut in_use, mut reserved, mut saved) = (0, 0, 0);
        for s in &self.running {
            let b = s.seq.kv_bytes();
            in_use += b;
            reserved += s.reserved;
            saved += (s.seq.cache.n_seen * per_token).saturating_sub(b);
        }
        sched.metrics.set_kv(in_use, reserved, saved);
        let cached = self.contexts.stats();
        sched.metrics.context_entries.store(cached.entries, Relaxed);
        sched.metrics.context_bytes.store(cached.bytes, Relaxed);
        sched.metrics.running.store(self.running.len(), Relaxed);
        sched
            .metrics
            .running_peak
            .fetch_max(self.running.len(), Relaxed);
    }
}

/// What a prefill chunk's pass leaves a sequence to do.
enum Prefilled {
    /// More prompt to feed (chunks, or the question after a compressed context).
    Wait,
    /// The prompt is in: sample the first token.
    Sample,
    Exit(Exit),
}

/// After a pass over `n` prompt tokens of `s` with logits `l`: record its statistics,
/// and once the context is in, compress it, keep it in the store, and report the prompt.
fn prefilled(
    s: &mut Seq<'_>,
    n: usize,
    l: Vec<f32>,
    sched: &Scheduler,
    lm: &LoadedModel,
) -> Prefilled {
    let end = s.prefill_end();
    match s.seq.after_prefill_segment(&s.job.prompt[..end], n, l) {
        Ok(Some(r)) => record(&sched.metrics, &r),
        Ok(None) => {}
        Err(e) => return Prefilled::Exit(Exit::Failed(ApiError::internal(e.to_string()))),
    }
    if s.seq.tokens().len() < end {
        // More prompt chunks to come.
        return Prefilled::Wait;
    }
    if let Err(e) = compress_context(s, sched, lm) {
        return Prefilled::Exit(Exit::Failed(e));
    }
    // Stored as soon as it is compressed: a question to another replica can find it
    // while this one is still answering.
    if !s.job.compress_only {
        Engine::store_context(sched, lm, s);
    }
    if s.seq.tokens().len() < s.job.prompt.len() {
        // The question, appended uncompressed in the next passes.
        s.reserved = reservation(s);
        return Prefilled::Wait;
    }
    report_prompt(s);
    if s.job.compress_only {
        return Prefilled::Exit(Exit::Finished(StopReason::MaxTokens));
    }
    Prefilled::Sample
}

/// Copies of `s` for its request's further choices, each to sample its first token
/// from `logits` (the prompt's last), with its own seed and constraint.
fn fork_choices<'m>(s: &Seq<'m>, logits: &[f32]) -> Result<Vec<(Seq<'m>, Vec<f32>)>, ApiError> {
    let seed = s.job.params.sampling.seed;
    (1..s.job.n)
        .map(|k| {
            let decoder = s
                .decoder
                .fork(&s.job.prompt, seed.wrapping_add(k as u64))
                .map_err(|e| ApiError::internal(e.to_string()))?;
            let f = Seq {
                job: s.job.fork(),
                seq: s.seq.clone(),
                phase: Phase::Prefill,
                decoder,
                reserved: 0,
                prefill_started: s.prefill_started,
                first_token: None,
                source: None,
                cached_tokens: s.cached_tokens,
                compress_ms: s.compress_ms,
                // Not kept as a context of its own (choice 0 is).
                from_store: true,
                choice: k,
            };
            Ok((f, logits.to_vec()))
        })
        .collect()
}

/// Sample `s`'s next token from `l` and send its text (and log-probabilities): how
/// many tokens were drawn, and the exit when the choice is over.
fn sample(s: &mut Seq<'_>, mut l: Vec<f32>, m: &Metrics, ctx_len: usize) -> (usize, Option<Exit>) {
    let mut piece = String::new();
    let before = s.decoder.tokens().len();
    let step = s.decoder.step(&mut l, &mut piece);
    let drawn = s.decoder.tokens().len() - before;
    if let (Some(top), 1) = (s.job.logprobs, drawn) {
        // `l` holds the logits the token was drawn from (adjusted in place).
        let token = s.decoder.tokens()[before];
        let lp =
            kvmerger_engine::sampling::logprobs(&l, s.job.params.sampling.temperature, token, top);
        if s.job.events.send(Event::Logprobs(s.choice, lp)).is_err() {
            return (drawn, Some(Exit::Cancelled));
        }
    }
    if s.first_token.is_none() {
        s.first_token = Some(Instant::now());
        if s.choice == 0 {
            m.time_to_first_token.observe(s.job.arrived.elapsed());
        }
    }
    if !piece.is_empty() && s.job.events.send(Event::Text(s.choice, piece)).is_err() {
        return (drawn, Some(Exit::Cancelled));
    }
    let exit = match step {
        Step::Stop(reason) => Some(Exit::Finished(reason)),
        Step::Token(t) => {
            if s.seq.cache.n_seen + 1 > ctx_len {
                Some(Exit::Finished(StopReason::Context))
            } else {
                s.phase = Phase::Decode { pending: t };
                s.reserved = reservation(s);
                None
            }
        }
    };
    (drawn, exit)
}

/// The context is in the cache: the sequence compresses it (after any pass its
/// method needs, on this sequence alone). Nothing to do without compression or once
/// compressed.
fn compress_context(s: &mut Seq<'_>, sched: &Scheduler, lm: &LoadedModel) -> Result<(), ApiError> {
    let report = s.seq.finish_context(lm).map_err(|e| match e {
        kvmerger_engine::Error::Cancelled(_) if Instant::now() >= s.job.deadline => {
            ApiError::timeout((s.job.deadline - s.job.arrived).as_secs_f64())
        }
        kvmerger_engine::Error::Cancelled(_) => ApiError::shutting_down(),
        e => ApiError::internal(e.to_string()),
    })?;
    if let Some(report) = report {
        s.compress_ms = (report.secs + report.pass_secs) * 1e3;
        record(&sched.metrics, &report);
    }
    Ok(())
}

/// The whole prompt is in the cache: report it and shrink the reservation to the
/// sequence's bound.
fn report_prompt(s: &mut Seq<'_>) {
    let prefill_ms = s
        .prefill_started
        .map(|t| t.elapsed().as_secs_f64() * 1e3)
        .unwrap_or(0.0);
    let queue_ms = s
        .prefill_started
        .map(|t| (t - s.job.arrived).as_secs_f64() * 1e3)
        .unwrap_or(0.0);
    // What the prompt would hold uncompressed (compression has dropped slots).
    let cache = &s.seq.cache;
    let heads: usize = cache.layers.iter().map(|l| l.len()).sum();
    let _ = s.job.events.send(Event::Prefilled(PromptReport {
        method: s.job.method.clone(),
        budget: s.job.budget.clone(),
        prompt_tokens: s.job.prompt.len(),
        cached_tokens: s.cached_tokens,
        protocol: s.job.protocol,
        slots_full: cache.n_seen * heads,
        slots_kept: cache.total_slots(),
        kv_bytes_full: cache.n_seen * cache.token_bytes(),
        kv_bytes: s.seq.kv_bytes(),
        queue_ms,
        prefill_ms,
        compress_ms: s.compress_ms,
    }));
    s.reserved = reservation(s);
}

fn record(m: &Metrics, r: &CompressReport) {
    m.compressed(&r.method, r.bytes_before, r.bytes_after, r.secs);
}

/// Upper bound of this sequence's cache from now to its last token.
fn reservation(s: &Seq<'_>) -> usize {
    let generated = s
        .job
        .params
        .max_tokens
        .saturating_sub(s.decoder.tokens().len());
    let prompt = s.job.prompt.len().saturating_sub(s.seq.tokens().len());
    s.seq.kv_bound(generated + prompt)
}
