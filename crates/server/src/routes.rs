//! Handlers: parse and check a request, turn it into a [`Job`], hand it to the
//! scheduler, and answer as JSON or as server-sent events.

use crate::api::{self, ChatRequest, CompletionRequest, Prompt, RawSampling, Sampling};
use crate::compression::{estimate, request_protocol, RequestRecipe};
use crate::error::ApiError;
use crate::scheduler::{Event, Finished, Job, PromptReport};
use crate::App;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode, Uri};
use axum::response::sse::{self, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use kvmerger_compression::{Protocol, Recipe};
use kvmerger_engine::chat::Message;
use kvmerger_engine::compress::Compressor;
use kvmerger_engine::generate::{GenerateParams, StopReason};
use kvmerger_engine::sampling::SamplingParams;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

type AppState = State<Arc<App>>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Completion,
    Chat,
}

/// What the prompt is before tokenization.
enum Input {
    Prompt(Prompt),
    Messages(Vec<Message>),
}

/// A checked request, ready to queue.
struct Request {
    kind: Kind,
    input: Input,
    sampling: Sampling,
    spec: Recipe,
    compressor: Arc<Compressor>,
    /// The protocol the request named (`kv_compression.protocol`), if any.
    protocol: Option<Protocol>,
    stream: bool,
    include_usage: bool,
    /// The field the prompt came from, for errors about its length.
    prompt_param: &'static str,
}

pub async fn completions(State(app): AppState, body: Result<Bytes, BytesRejection>) -> Response {
    let r = async {
        let body = body.map_err(|e| body_error(&app, e))?;
        let req: CompletionRequest = api::parse(&body)?;
        check_model(&app, &req.model)?;
        if req.echo == Some(true) {
            return Err(api::unsupported("echo", "true"));
        }
        if req.logprobs.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(api::unsupported("logprobs", ""));
        }
        if req.best_of.is_some_and(|b| b != 1) {
            return Err(api::unsupported("best_of", "other than 1"));
        }
        if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(api::unsupported("suffix", ""));
        }
        let sampling = RawSampling {
            max_tokens: req.max_tokens,
            max_tokens_param: "max_tokens",
            temperature: req.temperature,
            top_p: req.top_p,
            top_k: req.top_k,
            repetition_penalty: req.repetition_penalty,
            presence_penalty: req.presence_penalty,
            frequency_penalty: req.frequency_penalty,
            seed: req.seed,
            stop: req.stop.as_ref(),
            n: req.n,
            logit_bias: req.logit_bias.as_ref(),
            ignore_eos: req.ignore_eos,
        }
        .validate(app.cfg.max_tokens_limit)?;
        let prompt = api::parse_prompt(&req.prompt)?;
        let (spec, compressor, protocol) = compression(&app, req.kv_compression.as_ref())?;
        let stream = req.stream.unwrap_or(false);
        run(
            app.clone(),
            Request {
                kind: Kind::Completion,
                input: Input::Prompt(prompt),
                sampling,
                spec,
                compressor,
                protocol,
                stream,
                include_usage: include_usage(stream, req.stream_options.as_ref()),
                prompt_param: "prompt",
            },
        )
        .await
    }
    .await;
    r.unwrap_or_else(IntoResponse::into_response)
}

pub async fn chat(State(app): AppState, body: Result<Bytes, BytesRejection>) -> Response {
    let r = async {
        let body = body.map_err(|e| body_error(&app, e))?;
        let req: ChatRequest = api::parse(&body)?;
        check_model(&app, &req.model)?;
        if req.messages.is_empty() {
            return Err(ApiError::param("messages", "messages must not be empty"));
        }
        if req.logprobs == Some(true) || req.top_logprobs.is_some_and(|n| n > 0) {
            return Err(api::unsupported("logprobs", "true"));
        }
        if req.tools.as_ref().is_some_and(|t| !t.is_empty()) {
            return Err(api::unsupported("tools", ""));
        }
        if req
            .tool_choice
            .as_ref()
            .is_some_and(|t| !(t.is_null() || t == "none" || t == "auto"))
        {
            return Err(api::unsupported("tool_choice", "other than none"));
        }
        if let Some(f) = &req.response_format {
            if !(f.is_null() || f.get("type").and_then(Value::as_str) == Some("text")) {
                return Err(api::unsupported("response_format", "other than text"));
            }
        }
        if req.max_tokens.is_some() && req.max_completion_tokens.is_some() {
            return Err(ApiError::param(
                "max_completion_tokens",
                "give max_tokens or max_completion_tokens, not both",
            ));
        }
        let (max_tokens, max_tokens_param) = match req.max_completion_tokens {
            Some(m) => (Some(m), "max_completion_tokens"),
            None => (req.max_tokens, "max_tokens"),
        };
        let sampling = RawSampling {
            max_tokens,
            max_tokens_param,
            temperature: req.temperature,
            top_p: req.top_p,
            top_k: req.top_k,
            repetition_penalty: req.repetition_penalty,
            presence_penalty: req.presence_penalty,
            frequency_penalty: req.frequency_penalty,
            seed: req.seed,
            stop: req.stop.as_ref(),
            n: req.n,
            logit_bias: req.logit_bias.as_ref(),
            ignore_eos: req.ignore_eos,
        }
        .validate(app.cfg.max_tokens_limit)?;
        let mut messages = Vec::with_capacity(req.messages.len());
        for (i, m) in req.messages.iter().enumerate() {
            let role = api::message_role(i, &m.role)?;
            messages.push(Message::new(role, api::message_text(i, &m.content)?));
        }
        let (spec, compressor, protocol) = compression(&app, req.kv_compression.as_ref())?;
        let stream = req.stream.unwrap_or(false);
        run(
            app.clone(),
            Request {
                kind: Kind::Chat,
                input: Input::Messages(messages),
                sampling,
                spec,
                compressor,
                protocol,
                stream,
                include_usage: include_usage(stream, req.stream_options.as_ref()),
                prompt_param: "messages",
            },
        )
        .await
    }
    .await;
    r.unwrap_or_else(IntoResponse::into_response)
}

fn include_usage(stream: bool, o: Option<&api::StreamOptions>) -> bool {
    stream && o.and_then(|o| o.include_usage).unwrap_or(false)
}

fn body_error(app: &App, e: BytesRejection) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::too_large(app.cfg.max_body_bytes)
    } else {
        ApiError::invalid(format!(
            "could not read the request body: {}",
            e.body_text()
        ))
    }
}

fn check_model(app: &App, model: &str) -> Result<(), ApiError> {
    if model == app.cfg.model_id {
        Ok(())
    } else {
        Err(ApiError::model_not_found(model, &app.cfg.model_id))
    }
}

type RequestCompression = (Recipe, Arc<Compressor>, Option<Protocol>);

fn compression(app: &App, v: Option<&Value>) -> Result<RequestCompression, ApiError> {
    let protocol = request_protocol(v)?;
    let spec = app
        .cfg
        .compression
        .with_request(v.unwrap_or(&Value::Null))?;
    let c = spec.build()?;
    c.schedule
        .check(app.sched.n_layers)
        .map_err(|e| ApiError::param("kv_compression.schedule", e.to_string()))?;
    Ok((spec, c, protocol))
}

/// Tokenize (off the async threads), check lengths and memory, queue, answer.
async fn run(app: Arc<App>, req: Request) -> Result<Response, ApiError> {
    if app.shutting_down.load(Relaxed) {
        return Err(ApiError::shutting_down());
    }
    let arrived = Instant::now();
    let (tx, rx) = mpsc::unbounded_channel();
    let a = app.clone();
    let (job, req) = tokio::task::spawn_blocking(move || prepare(&a, req, arrived, tx))
        .await
        .map_err(|e| ApiError::internal(format!("request preparation failed: {e}")))??;
    let prompt_tokens = job.prompt.len();
    app.sched.submit(job)?;
    let id = format!(
        "{}-{:x}",
        match req.kind {
            Kind::Completion => "cmpl",
            Kind::Chat => "chatcmpl",
        },
        app.next_id.fetch_add(1, Relaxed)
    );
    let meta = Meta {
        id,
        kind: req.kind,
        model: app.cfg.model_id.clone(),
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        prompt_tokens,
    };
    if req.stream {
        Ok(stream_response(meta, rx, req.include_usage))
    } else {
        collect(meta, rx).await
    }
}

fn prepare(
    app: &App,
    req: Request,
    arrived: Instant,
    events: mpsc::UnboundedSender<Event>,
) -> Result<(Job, Request), ApiError> {
    let lm = &app.lm;
    let ctx = lm.model.cfg.ctx_len;
    // Tokenizing stops as soon as the prompt is known not to fit: a huge prompt costs
    // little before it is refused.
    let too_long = |param: &str, at_least: usize| {
        ApiError::context_length(
            param,
            format!(
                "This model's maximum context length is {ctx} tokens, and the prompt has \
                 at least {at_least}, leaving no room to generate. Shorten the prompt."
            ),
        )
    };
    let encode = |text: &str, param: &str| {
        lm.tokenizer
            .encode_within(text, true, ctx.saturating_sub(1))
            .map_err(|e| match e {
                kvmerger_engine::Error::ContextOverflow { prompt, .. } => too_long(param, prompt),
                e => ApiError::param(param, e.to_string()),
            })
    };
    let prompt = match &req.input {
        Input::Prompt(Prompt::Text(t)) => encode(t, "prompt")?,
        Input::Prompt(Prompt::Tokens(ids)) => {
            let vocab = lm.model.cfg.vocab;
            if let Some(&bad) = ids.iter().find(|&&t| t as usize >= vocab) {
                return Err(ApiError::param(
                    "prompt",
                    format!("token id {bad} is outside the vocabulary of {vocab}"),
                ));
            }
            ids.clone()
        }
        // Control tokens written inside messages stay text: a user cannot forge turns.
        Input::Messages(m) => lm
            .encode_conversation(m, true, ctx.saturating_sub(1))
            .map_err(|e| match e {
                kvmerger_engine::Error::ContextOverflow { prompt, .. } => {
                    too_long("messages", prompt)
                }
                e => ApiError::param("messages", e.to_string()),
            })?,
    };
    if prompt.is_empty() {
        return Err(ApiError::param(req.prompt_param, "the prompt is empty"));
    }
    let p = prompt.len();
    if p >= ctx {
        return Err(ApiError::context_length(
            req.prompt_param,
            format!(
                "This model's maximum context length is {ctx} tokens, and the prompt has {p}, \
                 leaving no room to generate. Shorten the prompt."
            ),
        ));
    }
    let max_tokens = match req.sampling.max_tokens {
        Some(m) if p + m > ctx => {
            return Err(ApiError::context_length(
                "max_tokens",
                format!(
                    "This model's maximum context length is {ctx} tokens. However, you requested \
                     {} tokens ({p} in the prompt, {m} in the completion). Reduce the prompt or max_tokens.",
                    p + m
                ),
            ))
        }
        Some(m) => m,
        None => app.cfg.default_max_tokens.min(ctx - p),
    };
    // Where compression stops (after the length checks: splitting a chat tokenizes
    // its context again).
    let (protocol, context_end) = context_split(app, &req, &prompt)?;
    // Settings that cannot bring this prompt to its budget are refused before the
    // prefill, not after it.
    let c = &req.compressor;
    c.check_prompt(lm.model.cfg.n_layers, context_end)
        .and_then(|_| match c.is_noop() {
            true => Ok(()),
            false => lm.model.check_learned(c.needs()),
        })
        .map_err(|e| match e {
            kvmerger_engine::Error::Recipe(e) => {
                ApiError::param(format!("kv_compression.{}", e.field), e.message)
            }
            e => ApiError::param("kv_compression", e.to_string()),
        })?;
    let s = &app.sched;
    let est = estimate(
        &req.compressor,
        p,
        max_tokens,
        s.n_layers,
        s.n_kv_heads,
        s.slot_bytes,
    );
    let budget = s.limits().kv_memory;
    if est.prefill_peak > budget {
        let mib = |b: usize| b as f64 / (1 << 20) as f64;
        return Err(ApiError::invalid(format!(
            "This request needs up to {:.1} MiB of KV cache ({p} prompt tokens, up to {max_tokens} generated), \
             more than this server's KV memory budget of {:.1} MiB. Shorten the prompt, lower max_tokens{}.",
            mib(est.prefill_peak),
            mib(budget),
            match &req.compressor {
                c if c.is_noop() => " or ask for kv_compression",
                c if c.prefill_chunk.is_none() => " or compress during prefill (kv_compression.prefill_chunk)",
                _ => "",
            }
        ))
        .with_param(req.prompt_param)
        .with_code("kv_memory_exceeded"));
    }
    let sampling = SamplingParams {
        temperature: req.sampling.temperature,
        top_k: req.sampling.top_k,
        top_p: req.sampling.top_p,
        repetition_penalty: req.sampling.repetition_penalty,
        repeat_last_n: 64,
        seed: req.sampling.seed,
    };
    sampling
        .validate()
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    // Cached contexts are matched on everything that shapes a compressed cache.
    let cache_key = if req.compressor.is_noop() {
        "full".into()
    } else {
        format!("{}|{:?}|{}", req.spec, req.spec.schedule, protocol.name())
    };
    let job = Job {
        prompt,
        params: GenerateParams {
            max_tokens,
            sampling,
            stop: req.sampling.stop.clone(),
            ignore_eos: req.sampling.ignore_eos,
        },
        compressor: req.compressor.clone(),
        method: req.spec.method.clone(),
        budget: req.spec.budget_text(),
        estimate: est,
        context_end,
        protocol,
        cache_key,
        arrived,
        deadline: arrived + app.cfg.request_timeout,
        events,
    };
    Ok((job, req))
}

/// The protocol this request is compressed under, and where its compression stops:
/// under `agnostic` (chat only) at the start of the last user message, which is then
/// appended uncompressed; under `aware` (or without compression) at the prompt's end.
/// The server's default protocol applies where it can: a request that names
/// `agnostic` and cannot be split is refused, one that only inherits it is compressed
/// whole (and says so in its usage).
fn context_split(app: &App, req: &Request, prompt: &[u32]) -> Result<(Protocol, usize), ApiError> {
    let asked = req.protocol;
    if req.compressor.is_noop() || asked.unwrap_or(app.cfg.protocol) == Protocol::Aware {
        return Ok((Protocol::Aware, prompt.len()));
    }
    let whole = |why: &str| {
        if asked.is_some() {
            Err(ApiError::param("kv_compression.protocol", why))
        } else {
            Ok((Protocol::Aware, prompt.len()))
        }
    };
    let Input::Messages(m) = &req.input else {
        return whole(
            "the agnostic protocol compresses the messages before the last user message, \
             so it needs /v1/chat/completions (or use \"aware\")",
        );
    };
    let last_user = m.iter().rposition(|m| m.role == "user").unwrap_or(0);
    if last_user == 0 {
        return whole(
            "the agnostic protocol compresses the messages before the last user message \
             (a system message holding a document, or earlier turns), and this conversation \
             has none: put the document in a message of its own, or use \"aware\"",
        );
    }
    let context = app
        .lm
        .encode_conversation(&m[..last_user], false, usize::MAX)
        .map_err(|e| ApiError::param("messages", e.to_string()))?;
    let end = kvmerger_engine::sequence::common_prefix(&context, prompt);
    if end == 0 || end >= prompt.len() {
        return whole("the conversation cannot be cut before its last user message");
    }
    Ok((Protocol::Agnostic, end))
}

struct Meta {
    id: String,
    kind: Kind,
    model: String,
    created: u64,
    prompt_tokens: usize,
}

fn finish_reason(r: StopReason) -> &'static str {
    match r {
        StopReason::Eos | StopReason::StopString | StopReason::Cancelled => "stop",
        StopReason::MaxTokens | StopReason::Context => "length",
    }
}

fn usage(meta: &Meta, report: Option<&PromptReport>, done: &Finished) -> Value {
    let mut u = json!({
        "prompt_tokens": meta.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": meta.prompt_tokens + done.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": report.map_or(0, |r| r.cached_tokens)},
    });
    if let Some(r) = report {
        u["kv_cache"] = json!({
            "method": r.method,
            "budget": r.budget,
            "protocol": r.protocol.name(),
            "slots_full": r.slots_full,
            "slots_kept": r.slots_kept,
            "kept_fraction": if r.slots_full == 0 { 1.0 } else { r.slots_kept as f64 / r.slots_full as f64 },
            "kv_bytes_full": r.kv_bytes_full,
            "kv_bytes": r.kv_bytes,
            "kv_bytes_final": done.kv_bytes_final,
            "recompressions": done.recompressions,
            "queue_ms": r.queue_ms,
            "prefill_ms": r.prefill_ms,
            "compress_ms": r.compress_ms,
        });
    }
    u
}

async fn collect(meta: Meta, mut rx: mpsc::UnboundedReceiver<Event>) -> Result<Response, ApiError> {
    let mut text = String::new();
    let mut report = None;
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Prefilled(r) => report = Some(r),
            Event::Text(t) => text.push_str(&t),
            Event::Failed(e) => return Err(e),
            Event::Done(done) => {
                let choice = match meta.kind {
                    Kind::Completion => json!({
                        "index": 0, "text": text, "logprobs": null,
                        "finish_reason": finish_reason(done.reason),
                    }),
                    Kind::Chat => json!({
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": null,
                        "finish_reason": finish_reason(done.reason),
                    }),
                };
                let body = json!({
                    "id": meta.id,
                    "object": object(meta.kind, false),
                    "created": meta.created,
                    "model": meta.model,
                    "choices": [choice],
                    "usage": usage(&meta, report.as_ref(), &done),
                });
                return Ok(Json(body).into_response());
            }
        }
    }
    Err(ApiError::internal(
        "the engine stopped before the request finished",
    ))
}

fn object(kind: Kind, chunk: bool) -> &'static str {
    match (kind, chunk) {
        (Kind::Completion, _) => "text_completion",
        (Kind::Chat, false) => "chat.completion",
        (Kind::Chat, true) => "chat.completion.chunk",
    }
}

struct StreamState {
    meta: Meta,
    rx: mpsc::UnboundedReceiver<Event>,
    include_usage: bool,
    report: Option<PromptReport>,
    out: VecDeque<sse::Event>,
    ended: bool,
}

impl StreamState {
    fn chunk(&self, text: Option<&str>, role: bool, finish: Option<&str>) -> sse::Event {
        let choice = match self.meta.kind {
            Kind::Completion => json!({
                "index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish,
            }),
            Kind::Chat => {
                let mut delta = json!({});
                if role {
                    delta["role"] = json!("assistant");
                    delta["content"] = json!("");
                }
                if let Some(t) = text {
                    delta["content"] = json!(t);
                }
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
        };
        self.data(json!({
            "id": self.meta.id,
            "object": object(self.meta.kind, true),
            "created": self.meta.created,
            "model": self.meta.model,
            "choices": [choice],
        }))
    }

    fn data(&self, v: Value) -> sse::Event {
        sse::Event::default().data(v.to_string())
    }

    /// Turn the next engine event into SSE events; false when the stream is over.
    fn on(&mut self, ev: Option<Event>) {
        match ev {
            Some(Event::Prefilled(r)) => {
                self.report = Some(r);
                if self.meta.kind == Kind::Chat {
                    let e = self.chunk(None, true, None);
                    self.out.push_back(e);
                }
            }
            Some(Event::Text(t)) => {
                let e = self.chunk(Some(&t), false, None);
                self.out.push_back(e);
            }
            Some(Event::Done(done)) => {
                let e = self.chunk(None, false, Some(finish_reason(done.reason)));
                self.out.push_back(e);
                if self.include_usage {
                    let u = usage(&self.meta, self.report.as_ref(), &done);
                    let e = self.data(json!({
                        "id": self.meta.id,
                        "object": object(self.meta.kind, true),
                        "created": self.meta.created,
                        "model": self.meta.model,
                        "choices": [],
                        "usage": u,
                    }));
                    self.out.push_back(e);
                }
                self.out.push_back(sse::Event::default().data("[DONE]"));
                self.ended = true;
            }
            Some(Event::Failed(e)) => {
                let ev = self.data(e.body());
                self.out.push_back(ev);
                self.ended = true;
            }
            None => {
                let ev = self.data(
                    ApiError::internal("the engine stopped before the request finished").body(),
                );
                self.out.push_back(ev);
                self.ended = true;
            }
        }
    }
}

/// Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`. Dropping the
/// stream (the client went away) drops the receiver, which cancels the generation.
fn stream_response(
    meta: Meta,
    rx: mpsc::UnboundedReceiver<Event>,
    include_usage: bool,
) -> Response {
    let state = StreamState {
        meta,
        rx,
        include_usage,
        report: None,
        out: VecDeque::new(),
        ended: false,
    };
    let stream = futures_util::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(e) = st.out.pop_front() {
                return Some((Ok::<_, Infallible>(e), st));
            }
            if st.ended {
                return None;
            }
            let ev = st.rx.recv().await;
            st.on(ev);
        }
    });
    // Comments every second keep proxies from timing out during long prefills, and make
    // a vanished client show up as a failed write even before the first token.
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(1)))
        .into_response()
}

pub async fn models(State(app): AppState) -> Json<Value> {
    Json(json!({"object": "list", "data": [model_card(&app)]}))
}

pub async fn model(State(app): AppState, Path(id): Path<String>) -> Response {
    if id == app.cfg.model_id {
        Json(model_card(&app)).into_response()
    } else {
        ApiError::model_not_found(&id, &app.cfg.model_id).into_response()
    }
}

fn model_card(app: &App) -> Value {
    let c = &app.lm.model.cfg;
    json!({
        "id": app.cfg.model_id,
        "object": "model",
        "created": 0,
        "owned_by": "kvmerger",
        "context_length": c.ctx_len,
        "kv_compression": {
            "default": {
                "method": app.cfg.compression.method,
                "budget": app.cfg.compression.budget_text(),
            },
            "methods": kvmerger_compression::registry::names(),
        },
    })
}

pub async fn health(State(app): AppState) -> Response {
    let m = &app.metrics;
    let body = json!({
        "status": if app.shutting_down.load(Relaxed) { "shutting_down" } else { "ok" },
        "model": app.cfg.model_id,
        "running": m.running.load(Relaxed),
        "queued": m.queue_depth.load(Relaxed),
    });
    let status = if app.shutting_down.load(Relaxed) {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (status, Json(body)).into_response()
}

pub async fn metrics(State(app): AppState) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        app.metrics.render(app.cfg.kv_memory),
    )
        .into_response()
}

pub async fn not_found(uri: Uri) -> ApiError {
    ApiError::not_found(uri.path())
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::method_not_allowed()
}
