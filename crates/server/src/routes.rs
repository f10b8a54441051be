//! Handlers: parse and check a request, turn it into a [`Job`], hand it to the
//! scheduler, and answer as JSON or as server-sent events.

use crate::api::{
    self, ChatRequest, CompletionRequest, DetokenizeRequest, Prompt, RawSampling, Sampling,
    TokenizeRequest, Unknown,
};
use crate::compression::{estimate, request_protocol, RequestRecipe};
use crate::error::ApiError;
use crate::scheduler::{Event, Finished, Job, PromptReport};
use crate::structured::{self, Tool, ToolChoice, ToolFormat};
use crate::App;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode, Uri};
use axum::response::sse::{self, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use kvmerger_compression::{Protocol, Recipe};
use kvmerger_engine::chat::{Message, RenderOptions};
use kvmerger_engine::compressor::Compressor;
use kvmerger_engine::generate::{GenerateParams, StopReason};
use kvmerger_engine::kvc;
use kvmerger_engine::load::LoadedModel;
use kvmerger_engine::sampling::{SamplingParams, TokenLogprobs};
use kvmerger_engine::sequence::Sequence;
use llguidance::api::TopLevelGrammar;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
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
    /// Messages that are a context to compress and keep (a handle): no generation
    /// prompt after them.
    Context(Vec<Message>),
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
    /// Report log-probabilities, with this many alternatives per token.
    logprobs: Option<usize>,
    /// How chat messages become the prompt.
    render: Render,
    /// The grammar the answer must follow, and the field that asked for it.
    grammar: Option<(TopLevelGrammar, &'static str)>,
    /// Tools the model may call (their calls are parsed out of the answer).
    tools: Option<ToolSetup>,
    /// Set by `prepare` for a constrained request: its mask timings.
    masks: Option<MaskStats>,
}

/// How a chat's messages are rendered (the template's options).
#[derive(Clone, Debug, Default)]
struct Render {
    tools: Option<Value>,
    continue_final: bool,
    add_generation_prompt: bool,
}

impl Render {
    fn options(&self) -> RenderOptions<'_> {
        RenderOptions {
            add_generation_prompt: self.add_generation_prompt,
            continue_final_message: self.continue_final,
            tools: self.tools.as_ref(),
        }
    }
}

/// The tools of a request whose answer may call them.
#[derive(Clone, Debug)]
struct ToolSetup {
    tools: Vec<Tool>,
    format: ToolFormat,
}

/// A chat message, checked: role, text, and the tool fields.
fn chat_message(i: usize, m: &api::ChatMessage) -> Result<Message, ApiError> {
    let role = api::message_role(i, &m.role)?;
    let mut out = Message::new(role, api::message_text(i, &m.content)?);
    if let Some(calls) = m.tool_calls.as_ref().filter(|c| !c.is_null()) {
        let param = format!("messages.{i}.tool_calls");
        let Some(list) = calls.as_array().filter(|_| role == "assistant") else {
            return Err(ApiError::param(
                param,
                "tool_calls must be an array, on an assistant message",
            ));
        };
        let mut parsed = Vec::with_capacity(list.len());
        for (j, c) in list.iter().enumerate() {
            let f = c.get("function");
            let name = f.and_then(|f| f.get("name")).and_then(Value::as_str);
            let args = f.and_then(|f| f.get("arguments"));
            let (Some(name), Some(args)) = (name, args) else {
                return Err(ApiError::param(
                    format!("{param}.{j}"),
                    "a tool call is {\"id\", \"type\": \"function\", \"function\": {\"name\", \"arguments\"}}",
                ));
            };
            // Templates write the arguments with `tojson`: give them the object.
            let args = match args {
                Value::String(s) => serde_json::from_str(s).unwrap_or_else(|_| args.clone()),
                other => other.clone(),
            };
            parsed.push(json!({
                "id": c.get("id").cloned().unwrap_or(Value::Null),
                "type": "function",
                "function": {"name": name, "arguments": args},
            }));
        }
        out.tool_calls = Some(Value::Array(parsed));
    }
    if role == "tool" {
        out.tool_call_id = m.tool_call_id.clone();
    }
    out.name = m.name.clone();
    Ok(out)
}

impl Request {
    /// A request of `kind` for `input`, with its checked sampling and compression; it
    /// neither streams nor reports log-probabilities, renders a chat as the template
    /// does by default, and has no grammar or tools (an endpoint sets what it takes).
    fn new(
        kind: Kind,
        input: Input,
        prompt_param: &'static str,
        sampling: Sampling,
        (spec, compressor, protocol): RequestCompression,
    ) -> Request {
        Request {
            kind,
            input,
            sampling,
            spec,
            compressor,
            protocol,
            stream: false,
            include_usage: false,
            prompt_param,
            logprobs: None,
            render: Render::default(),
            grammar: None,
            tools: None,
            masks: None,
        }
    }

    fn compress_only(&self) -> bool {
        matches!(self.input, Input::Context(_))
    }
}

pub async fn completions(State(app): AppState, body: Result<Bytes, BytesRejection>) -> Response {
    handle_json(
        app,
        body,
        Some("completions"),
        async |app, req: CompletionRequest, line| {
            check_model(&app, &req.model)?;
            if req.echo == Some(true) {
                return Err(api::unsupported("echo", "true"));
            }
            let logprobs = api::completion_logprobs(req.logprobs.as_ref())?;
            if req.best_of.is_some_and(|b| b != 1) {
                return Err(api::unsupported("best_of", "other than 1"));
            }
            if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
                return Err(api::unsupported("suffix", ""));
            }
            let sampling = sampling(&app, req.sampling()?)?;
            let prompt = api::parse_prompt(&req.prompt)?;
            let kv = compression(&app, req.kv_compression.as_ref())?;
            let (stream, include_usage) = streaming(req.stream, req.stream_options.as_ref());
            let request = Request {
                stream,
                include_usage,
                logprobs,
                ..Request::new(
                    Kind::Completion,
                    Input::Prompt(prompt),
                    "prompt",
                    sampling,
                    kv,
                )
            };
            run(app, line, request).await
        },
    )
    .await
}

pub async fn chat(State(app): AppState, body: Result<Bytes, BytesRejection>) -> Response {
    handle_json(app, body, Some("chat"), async |app, req: ChatRequest, line| {
        check_model(&app, &req.model)?;
        if req.messages.is_empty() {
            return Err(ApiError::param("messages", "messages must not be empty"));
        }
        let logprobs = api::chat_logprobs(req.logprobs, req.top_logprobs)?;
        let sampling = sampling(&app, req.sampling()?)?;
        let tools = structured::tools(req.tools.as_deref().unwrap_or(&[]))?;
        let choice = structured::tool_choice(req.tool_choice.as_ref(), &tools)?;
        let format = ToolFormat::of(app.lm.template.source());
        let grammar = match structured::tool_grammar(&tools, &choice, format) {
            Some(g) => Some((g, "tools")),
            None => structured::response_format(req.response_format.as_ref())?
                .map(|g| (g, "response_format")),
        };
        let mut messages = Vec::with_capacity(req.messages.len());
        for (i, m) in req.messages.iter().enumerate() {
            messages.push(chat_message(i, m)?);
        }
        let last_is_assistant = messages.last().is_some_and(|m| m.role == "assistant");
        let continue_final = req.continue_final_message.unwrap_or(
            last_is_assistant && req.add_generation_prompt != Some(true),
        );
        if continue_final && !last_is_assistant {
            return Err(ApiError::param(
                "continue_final_message",
                "continue_final_message needs the last message to be the assistant's",
            ));
        }
        if continue_final && req.add_generation_prompt == Some(true) {
            return Err(ApiError::param(
                "add_generation_prompt",
                "add_generation_prompt and continue_final_message cannot both be true",
            ));
        }
        let template_tools = !tools.is_empty() && choice != ToolChoice::None;
        if template_tools && !app.lm.template.source().contains("tools") {
            // The template cannot show the tools: a system message describes them.
            let text = structured::tools_system_text(&tools);
            match messages.first_mut() {
                Some(m) if m.role == "system" => m.content = format!("{}\n\n{text}", m.content),
                _ => messages.insert(0, Message::system(text)),
            }
        }
        let render = Render {
            tools: template_tools.then(|| Value::Array(req.tools.clone().unwrap_or_default())),
            continue_final,
            add_generation_prompt: !continue_final && req.add_generation_prompt != Some(false),
        };
        let tool_setup = (template_tools).then_some(ToolSetup { tools, format });
        let kv = match &req.kv_context {
            // A stored context's messages come first, compressed as they were.
            Some(id) => {
                if req.kv_compression.is_some() {
                    return Err(ApiError::param(
                        "kv_compression",
                        "a request with kv_context is compressed as its context was: drop kv_compression",
                    ));
                }
                let (before, recipe) = context_messages(&app, id).await?;
                messages.splice(0..0, before);
                let c = recipe.build()?;
                (recipe, c, Some(Protocol::Agnostic))
            }
            None => compression(&app, req.kv_compression.as_ref())?,
        };
        let (stream, include_usage) = streaming(req.stream, req.stream_options.as_ref());
        let request = Request {
            stream,
            include_usage,
            logprobs,
            render,
            grammar,
            tools: tool_setup,
            ..Request::new(Kind::Chat, Input::Messages(messages), "messages", sampling, kv)
        };
        run(app, line, request).await
    })
    .await
}

/// A handler of a JSON body: read the body as a `T` and `handle` it, then name the
/// unknown fields it carried and finish the request's log line, where it has one
/// (`endpoint`: completions and chat are logged).
async fn handle_json<T: DeserializeOwned + Unknown>(
    app: Arc<App>,
    body: Result<Bytes, BytesRejection>,
    endpoint: Option<&'static str>,
    handle: impl AsyncFnOnce(Arc<App>, T, &mut Option<LogLine>) -> Result<Response, ApiError>,
) -> Response {
    let mut ignored = Vec::new();
    let mut line = endpoint.map(|e| LogLine::new(&app, e));
    let r = async {
        let req = read_request(&app, body, &mut ignored)?;
        handle(app.clone(), req, &mut line).await
    }
    .await;
    conclude(&app, line, &ignored, r)
}

/// A request body, read and parsed as a `T` ([`api::parse_request`]); the unknown
/// fields it carried go to `ignored`.
fn read_request<T: DeserializeOwned + Unknown>(
    app: &App,
    body: Result<Bytes, BytesRejection>,
    ignored: &mut Vec<String>,
) -> Result<T, ApiError> {
    let body = body.map_err(|e| body_error(app, e))?;
    let (req, unknown) = api::parse_request(&body, app.cfg.strict_api)?;
    *ignored = unknown;
    Ok(req)
}

/// The response of a handler, with its ignored fields named and its log line (if any)
/// finished: the warning first, then the request's line.
fn conclude(
    app: &App,
    mut line: Option<LogLine>,
    ignored: &[String],
    r: Result<Response, ApiError>,
) -> Response {
    if let Some(l) = line.as_mut() {
        l.ignored = ignored.len();
        if let Err(e) = &r {
            l.failed(e);
        }
    }
    let response = report_ignored(app, r.unwrap_or_else(IntoResponse::into_response), ignored);
    drop(line);
    response
}

/// Unknown fields a request carried (not refused: `--strict-api` is off) are named in a
/// warning on stderr and in the `x-kvmerger-ignored-fields` response header.
fn report_ignored(app: &App, mut r: Response, ignored: &[String]) -> Response {
    if ignored.is_empty() {
        return r;
    }
    let list = api::ignored_list(ignored);
    app.cfg.log.line(
        "warn",
        "ignored_fields",
        &[
            ("fields", json!(list)),
            (
                "note",
                json!("unknown request fields, ignored (--strict-api refuses them)"),
            ),
        ],
    );
    if let Ok(v) = header::HeaderValue::from_str(&list) {
        r.headers_mut().insert(IGNORED_FIELDS, v);
    }
    r
}

pub const IGNORED_FIELDS: &str = "x-kvmerger-ignored-fields";

/// The sampling settings of a request (either endpoint), checked: ranges, and
/// `logit_bias` ids inside the vocabulary.
fn sampling(app: &App, raw: RawSampling<'_>) -> Result<Sampling, ApiError> {
    let s = raw.validate(app.cfg.max_tokens_limit)?;
    let vocab = app.lm.model.cfg.vocab;
    if let Some((id, _)) = s.logit_bias.iter().find(|(t, _)| *t as usize >= vocab) {
        return Err(ApiError::param(
            format!("logit_bias.{id}"),
            format!("token id {id} is outside the vocabulary of {vocab}"),
        ));
    }
    Ok(s)
}

/// `stream`, and whether the stream ends with a usage chunk
/// (`stream_options.include_usage`).
fn streaming(stream: Option<bool>, o: Option<&api::StreamOptions>) -> (bool, bool) {
    let stream = stream.unwrap_or(false);
    (
        stream,
        stream && o.and_then(|o| o.include_usage).unwrap_or(false),
    )
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
async fn run(
    app: Arc<App>,
    line: &mut Option<LogLine>,
    req: Request,
) -> Result<Response, ApiError> {
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
        logprobs: req.logprobs,
        lm: app.lm.clone(),
        tools: req.tools.clone(),
        n: req.sampling.n,
    };
    if let Some(l) = line.as_mut() {
        l.id = Some(meta.id.clone());
        l.masks = req.masks.clone();
    }
    if req.stream {
        Ok(stream_response(meta, rx, req.include_usage, line.take()))
    } else {
        collect(meta, rx, line).await
    }
}

fn prepare(
    app: &App,
    mut req: Request,
    arrived: Instant,
    events: mpsc::UnboundedSender<Event>,
) -> Result<(Job, Request), ApiError> {
    let prompt = prompt_tokens(app, &req)?;
    let p = prompt.len();
    let max_tokens = check_lengths(app, &req, p)?;
    // Where compression stops (after the length checks: splitting a chat tokenizes
    // its context again).
    let (protocol, context_end) = context_split(app, &req, &prompt)?;
    check_compression(app, &req, context_end)?;
    let est = check_memory(app, &req, p, max_tokens)?;
    let sampling = sampling_params(&req.sampling)?;
    let constraint = match &req.grammar {
        Some((g, param)) => {
            let c = app.grammars.constraint(&app.lm, g.clone(), param)?;
            req.masks = Some((c.mask_nanos.clone(), c.masks.clone()));
            Some(Box::new(c) as Box<dyn kvmerger_engine::generate::TokenConstraint>)
        }
        None => None,
    };
    let (cache_key, store_key) = cache_keys(app, &req, protocol, &prompt, context_end);
    let preloaded = store_key
        .as_deref()
        .and_then(|k| load_stored(app, k, &prompt[..context_end]));
    // The context's messages go with it: a stored context is also a handle.
    let context_extra = match &req.input {
        Input::Context(m) => json!({"messages": messages_json(m)}),
        Input::Messages(m) if protocol == Protocol::Agnostic => {
            let last_user = m.iter().rposition(|m| m.role == "user").unwrap_or(0);
            json!({"messages": messages_json(&m[..last_user]), "tokens": context_end})
        }
        _ => Value::Null,
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
        store_key,
        preloaded,
        compress_only: req.compress_only(),
        context_extra,
        arrived,
        deadline: arrived + app.cfg.request_timeout,
        events,
        logprobs: req.logprobs,
        constraint,
        n: req.sampling.n,
    };
    Ok((job, req))
}

/// The request's prompt as token ids, refused (naming its field) as soon as it is known
/// not to fit the context.
fn prompt_tokens(app: &App, req: &Request) -> Result<Vec<u32>, ApiError> {
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
            .encode_chat(m, &req.render.options(), ctx.saturating_sub(1))
            .map_err(|e| match e {
                kvmerger_engine::Error::ContextOverflow { prompt, .. } => {
                    too_long("messages", prompt)
                }
                e => ApiError::param("messages", e.to_string()),
            })?,
        Input::Context(m) => lm
            .encode_conversation(m, false, ctx.saturating_sub(1))
            .map_err(|e| match e {
                kvmerger_engine::Error::ContextOverflow { prompt, .. } => {
                    too_long("messages", prompt)
                }
                e => ApiError::param("messages", e.to_string()),
            })?,
    };
    Ok(prompt)
}

/// A prompt of `p` tokens checked against the context: the tokens to generate at most.
fn check_lengths(app: &App, req: &Request, p: usize) -> Result<usize, ApiError> {
    let ctx = app.lm.model.cfg.ctx_len;
    if p == 0 {
        return Err(ApiError::param(req.prompt_param, "the prompt is empty"));
    }
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
    Ok(max_tokens)
}

/// Settings that cannot bring this prompt to its budget are refused before the
/// prefill, not after it.
fn check_compression(app: &App, req: &Request, context_end: usize) -> Result<(), ApiError> {
    let lm = &app.lm;
    let c = &req.compressor;
    c.check_prompt(lm.model.cfg.n_layers, context_end)
        .and_then(|_| lm.model.check_learned(c.needs()))
        .map_err(|e| match e {
            kvmerger_engine::Error::Recipe(e) => {
                ApiError::param(format!("kv_compression.{}", e.field), e.message)
            }
            e => ApiError::param("kv_compression", e.to_string()),
        })?;
    Ok(())
}

/// The request's KV memory bound, refused when it exceeds the server's budget.
fn check_memory(
    app: &App,
    req: &Request,
    p: usize,
    max_tokens: usize,
) -> Result<kvmerger_engine::compressor::KvEstimate, ApiError> {
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
    // Every further choice holds a copy of the compressed prompt and its generation.
    let need = crate::scheduler::kv_need(&est, req.sampling.n);
    if need > budget {
        let mib = |b: usize| b as f64 / (1 << 20) as f64;
        return Err(ApiError::invalid(format!(
            "This request needs up to {:.1} MiB of KV cache ({p} prompt tokens, up to {max_tokens} generated{}), \
             more than this server's KV memory budget of {:.1} MiB. Shorten the prompt, lower max_tokens{}.",
            mib(need),
            if req.sampling.n > 1 { format!(", {} choices", req.sampling.n) } else { String::new() },
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
    Ok(est)
}

/// The engine's sampling settings from the request's, checked.
fn sampling_params(r: &Sampling) -> Result<SamplingParams, ApiError> {
    let sampling = SamplingParams {
        temperature: r.temperature,
        top_k: r.top_k,
        top_p: r.top_p,
        repetition_penalty: r.repetition_penalty,
        repeat_last_n: 64,
        seed: r.seed,
        min_p: r.min_p,
        presence_penalty: r.presence_penalty,
        frequency_penalty: r.frequency_penalty,
        logit_bias: r.logit_bias.clone(),
    };
    sampling
        .validate()
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    Ok(sampling)
}

/// The keys the compressed context is matched on in memory and kept under in the store
/// (none when nothing is compressed or kept).
fn cache_keys(
    app: &App,
    req: &Request,
    protocol: Protocol,
    prompt: &[u32],
    context_end: usize,
) -> (String, Option<String>) {
    // Cached contexts are matched on everything that shapes a compressed cache.
    let cache_key = if req.compressor.is_noop() {
        "full".into()
    } else {
        format!("{}|{:?}|{}", req.spec, req.spec.schedule, protocol.name())
    };
    // The compressed context is kept in the store (every one when a store is
    // configured; a handle's always), under a key of everything that shapes it.
    let store_key =
        (!req.compressor.is_noop() && context_end > 0 && (app.persist || req.compress_only()))
            .then(|| {
                crate::store::key(
                    &app.lm.fingerprint,
                    &cache_key,
                    &format!("{:?}", app.cfg.kv_dtype),
                    &prompt[..context_end],
                )
            });
    (cache_key, store_key)
}

fn messages_json(m: &[Message]) -> Value {
    Value::Array(
        m.iter()
            .map(|m| json!({"role": m.role, "content": m.content}))
            .collect(),
    )
}

/// The compressed context stored under `key`, when it holds exactly `context`: read,
/// checked (checksum, model, shapes) and ready to be appended the rest of the prompt.
/// A stored entry that fails its checks is deleted (the request recomputes it); a
/// store that fails is counted and skipped.
fn load_stored(app: &App, key: &str, context: &[u32]) -> Option<Sequence> {
    let m = &app.metrics;
    let t0 = Instant::now();
    let bytes = match app.store.get(key) {
        Ok(Some(b)) => b,
        Ok(None) => return None,
        Err(_) => {
            m.store_errors.fetch_add(1, Relaxed);
            return None;
        }
    };
    match kvc::decode(&bytes, &app.lm) {
        Ok((seq, _)) if seq.tokens() == context && seq.is_compressed() => {
            m.store_read_us
                .fetch_add(t0.elapsed().as_micros() as u64, Relaxed);
            Some(seq)
        }
        bad => {
            if let Err(e) = bad {
                eprintln!("context store: entry {key} is unusable ({e}); recomputing it");
            }
            m.store_corrupt.fetch_add(1, Relaxed);
            let _ = app.store.delete(key);
            None
        }
    }
}

/// The protocol this request is compressed under, and where its compression stops:
/// under `agnostic` (chat only) at the start of the last user message, which is then
/// appended uncompressed; under `aware` (or without compression) at the prompt's end.
/// The server's default protocol applies where it can: a request that names
/// `agnostic` and cannot be split is refused, one that only inherits it is compressed
/// whole (and says so in its usage).
fn context_split(app: &App, req: &Request, prompt: &[u32]) -> Result<(Protocol, usize), ApiError> {
    if let Input::Context(_) = req.input {
        // A handle's context is compressed whole, as the context of the questions
        // that will follow it.
        return Ok((Protocol::Agnostic, prompt.len()));
    }
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
    let opts = RenderOptions {
        tools: req.render.tools.as_ref(),
        ..Default::default()
    };
    let context = app
        .lm
        .encode_chat(&m[..last_user], &opts, usize::MAX)
        .map_err(|e| ApiError::param("messages", e.to_string()))?;
    let end = kvmerger_engine::sequence::common_prefix(&context, prompt);
    if end == 0 || end >= prompt.len() {
        return whole("the conversation cannot be cut before its last user message");
    }
    Ok((Protocol::Agnostic, end))
}

/// The log line of one generation request, written once, when dropped: after the
/// answer (or the stream's last event), on a refusal, or when the client went away
/// first (`status=cancelled`).
struct LogLine {
    log: crate::log::Logger,
    endpoint: &'static str,
    model: String,
    arrived: Instant,
    id: Option<String>,
    report: Option<PromptReport>,
    done: Option<Finished>,
    error: Option<(u16, Option<&'static str>, Option<String>)>,
    ignored: usize,
    /// A constrained request's mask time (ns) and masks computed.
    masks: Option<MaskStats>,
}

type MaskStats = (Arc<AtomicU64>, Arc<AtomicU64>);

impl LogLine {
    fn new(app: &App, endpoint: &'static str) -> LogLine {
        LogLine {
            log: app.cfg.log.clone(),
            endpoint,
            model: app.cfg.model_id.clone(),
            arrived: Instant::now(),
            id: None,
            report: None,
            done: None,
            error: None,
            ignored: 0,
            masks: None,
        }
    }

    fn failed(&mut self, e: &ApiError) {
        self.error = Some((e.status.as_u16(), e.code, e.param.clone()));
    }
}

impl Drop for LogLine {
    fn drop(&mut self) {
        let (status, level) = match (&self.error, &self.done) {
            (Some((s, ..)), _) if *s >= 500 => (json!(s), "error"),
            (Some((s, ..)), _) => (json!(s), "warn"),
            (None, Some(_)) => (json!(200), "info"),
            (None, None) => (json!("cancelled"), "warn"),
        };
        let r = self.report.as_ref();
        let d = self.done.as_ref();
        let e = self.error.as_ref();
        let ms = |x: f64| (x * 10.0).round() / 10.0;
        self.log.line(
            level,
            "request",
            &[
                ("id", json!(self.id)),
                ("endpoint", json!(self.endpoint)),
                ("model", json!(self.model)),
                ("status", status),
                ("method", json!(r.map(|r| &r.method))),
                ("budget", json!(r.map(|r| &r.budget))),
                (
                    "kept",
                    json!(r.map(|r| if r.slots_full == 0 {
                        1.0
                    } else {
                        r.slots_kept as f64 / r.slots_full as f64
                    })),
                ),
                ("prompt_tokens", json!(r.map(|r| r.prompt_tokens))),
                ("cached_tokens", json!(r.map(|r| r.cached_tokens))),
                ("completion_tokens", json!(d.map(|d| d.completion_tokens))),
                ("ttft_ms", json!(d.and_then(|d| d.first_token_ms).map(ms))),
                (
                    "tokens_per_s",
                    json!(d.and_then(|d| d.tokens_per_s).map(ms)),
                ),
                (
                    "duration_ms",
                    json!(ms(self.arrived.elapsed().as_secs_f64() * 1e3)),
                ),
                ("finish_reason", json!(d.map(|d| finish_reason(d.reason)))),
                ("error", json!(e.and_then(|e| e.1))),
                ("param", json!(e.and_then(|e| e.2.as_deref()))),
                (
                    "ignored_fields",
                    json!((self.ignored > 0).then_some(self.ignored)),
                ),
                (
                    "mask_us_per_token",
                    json!(self.masks.as_ref().and_then(|(ns, n)| {
                        let n = n.load(Relaxed);
                        (n > 0).then(|| ms(ns.load(Relaxed) as f64 / n as f64 / 1e3))
                    })),
                ),
            ],
        );
    }
}

struct Meta {
    id: String,
    kind: Kind,
    model: String,
    created: u64,
    prompt_tokens: usize,
    /// Log-probabilities asked for (alternatives per token).
    logprobs: Option<usize>,
    /// For the text of tokens in log-probabilities.
    lm: Arc<LoadedModel>,
    /// Tools whose calls are parsed out of the answer.
    tools: Option<ToolSetup>,
    /// Choices.
    n: usize,
}

impl Meta {
    /// The answer's content and tool calls (OpenAI's shape), and whether there are any.
    fn answer(&self, text: &str) -> (Value, Option<Value>) {
        let Some(t) = &self.tools else {
            return (json!(text), None);
        };
        let (content, calls) = structured::parse_tool_calls(text, &t.tools, t.format);
        if calls.is_empty() {
            return (json!(text), None);
        }
        let calls = calls
            .iter()
            .enumerate()
            .map(|(i, c)| {
                json!({
                    "index": i,
                    "id": format!("call_{}_{i}", self.id),
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments},
                })
            })
            .collect();
        (json!(content), Some(Value::Array(calls)))
    }
}

impl Meta {
    /// A token's text and bytes (a piece of a UTF-8 character shows as U+FFFD in the
    /// text; its bytes are exact).
    fn token(&self, id: u32) -> (String, Vec<u8>) {
        let t = &self.lm.tokenizer;
        match t.token_bytes(id) {
            Some(b) => (String::from_utf8_lossy(b).into_owned(), b.to_vec()),
            None => {
                let s = t.decode(&[id]);
                let b = s.clone().into_bytes();
                (s, b)
            }
        }
    }

    /// The `logprobs` of a choice (or chunk) holding these tokens, in the endpoint's
    /// shape; `offset` is the text offset (characters) of the first one, advanced past
    /// them. Null when none were asked for.
    fn logprobs(&self, tokens: &[TokenLogprobs], offset: &mut usize) -> Value {
        if self.logprobs.is_none() {
            return Value::Null;
        }
        match self.kind {
            Kind::Chat => {
                let entry = |id: u32, lp: f32| {
                    let (text, bytes) = self.token(id);
                    json!({"token": text, "logprob": lp, "bytes": bytes})
                };
                let content: Vec<Value> = tokens
                    .iter()
                    .map(|t| {
                        let mut e = entry(t.token, t.logprob);
                        e["top_logprobs"] = t.top.iter().map(|&(id, lp)| entry(id, lp)).collect();
                        e
                    })
                    .collect();
                json!({"content": content, "refusal": null})
            }
            Kind::Completion => {
                let (mut texts, mut lps, mut tops, mut offsets) =
                    (Vec::new(), Vec::new(), Vec::new(), Vec::new());
                for t in tokens {
                    let text = self.token(t.token).0;
                    offsets.push(*offset);
                    *offset += text.chars().count();
                    texts.push(text);
                    lps.push(t.logprob);
                    let top: serde_json::Map<String, Value> = t
                        .top
                        .iter()
                        .map(|&(id, lp)| (self.token(id).0, json!(lp)))
                        .collect();
                    tops.push(Value::Object(top));
                }
                json!({"tokens": texts, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
            }
        }
    }
}

fn finish_reason(r: StopReason) -> &'static str {
    match r {
        StopReason::Eos
        | StopReason::StopString
        | StopReason::Cancelled
        | StopReason::Constraint => "stop",
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
            "choices": meta.n,
            "queue_ms": r.queue_ms,
            "prefill_ms": r.prefill_ms,
            "compress_ms": r.compress_ms,
        });
    }
    u
}

/// The choices' `Finished` as one, for usage: tokens and bytes summed over choices,
/// timings from choice 0.
fn combined(done: &[Option<Finished>]) -> Finished {
    let all: Vec<&Finished> = done.iter().flatten().collect();
    let mut f = all[0].clone();
    f.completion_tokens = all.iter().map(|d| d.completion_tokens).sum();
    f.kv_bytes_final = all.iter().map(|d| d.kv_bytes_final).sum();
    f.recompressions = all.iter().map(|d| d.recompressions).sum();
    f
}

impl Meta {
    /// One choice of a finished answer, in the endpoint's shape.
    fn choice(&self, index: usize, text: &str, logprobs: Value, reason: StopReason) -> Value {
        match self.kind {
            Kind::Completion => json!({
                "index": index, "text": text, "logprobs": logprobs,
                "finish_reason": finish_reason(reason),
            }),
            Kind::Chat => {
                let (content, calls) = self.answer(text);
                let mut message = json!({"role": "assistant", "content": content});
                let mut finish = finish_reason(reason);
                if let Some(mut calls) = calls {
                    // `index` belongs to streamed deltas only.
                    for c in calls.as_array_mut().into_iter().flatten() {
                        c.as_object_mut().map(|o| o.remove("index"));
                    }
                    message["tool_calls"] = calls;
                    finish = "tool_calls";
                }
                json!({
                    "index": index,
                    "message": message,
                    "logprobs": logprobs,
                    "finish_reason": finish,
                })
            }
        }
    }
}

async fn collect(
    meta: Meta,
    mut rx: mpsc::UnboundedReceiver<Event>,
    line: &mut Option<LogLine>,
) -> Result<Response, ApiError> {
    let n = meta.n;
    let mut texts = vec![String::new(); n];
    let mut lps = vec![Vec::new(); n];
    let mut done: Vec<Option<Finished>> = vec![None; n];
    let mut report = None;
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Prefilled(r) => {
                if let Some(l) = line.as_mut() {
                    l.report = Some(r.clone());
                }
                report = Some(r)
            }
            Event::Text(k, t) => texts[k].push_str(&t),
            Event::Logprobs(k, l) => lps[k].push(l),
            Event::Failed(e) => return Err(e),
            Event::Done(k, d) => {
                done[k] = Some(d);
                if done.iter().any(Option::is_none) {
                    continue;
                }
                let all = combined(&done);
                if let Some(l) = line.as_mut() {
                    l.done = Some(all.clone());
                }
                let choices: Vec<Value> = (0..n)
                    .map(|k| {
                        let lp = meta.logprobs(&lps[k], &mut 0);
                        let reason = done[k].as_ref().map_or(StopReason::Eos, |d| d.reason);
                        meta.choice(k, &texts[k], lp, reason)
                    })
                    .collect();
                let body = json!({
                    "id": meta.id,
                    "object": object(meta.kind, false),
                    "created": meta.created,
                    "model": meta.model,
                    "choices": choices,
                    "usage": usage(&meta, report.as_ref(), &all),
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
    /// Per choice: log-probabilities of tokens whose text has not been sent yet (held
    /// back while it may be part of a stop string).
    pending: Vec<Vec<TokenLogprobs>>,
    /// Per choice: text offset of the next token (completions' `text_offset`).
    offset: Vec<usize>,
    /// Written when the stream ends or is dropped (the client went away).
    line: Option<LogLine>,
    /// Per choice, with tools: the answer, held until it is known whether it calls them.
    held: Vec<String>,
    done: Vec<Option<Finished>>,
}

impl StreamState {
    /// A chunk of choice `k` with `text` (and its pending log-probabilities, unless it
    /// is the role's).
    fn chunk(
        &mut self,
        k: usize,
        text: Option<&str>,
        role: bool,
        finish: Option<&str>,
    ) -> sse::Event {
        let logprobs = if role || self.pending[k].is_empty() {
            Value::Null
        } else {
            let l = self.meta.logprobs(&self.pending[k], &mut self.offset[k]);
            self.pending[k].clear();
            l
        };
        let choice = match self.meta.kind {
            Kind::Completion => json!({
                "index": k, "text": text.unwrap_or(""), "logprobs": logprobs, "finish_reason": finish,
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
                json!({"index": k, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
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

    /// Choice `k` is over: its held answer (tool calls) and its finishing chunk.
    fn finish_choice(&mut self, k: usize, reason: StopReason) {
        let mut finish = finish_reason(reason);
        if self.meta.tools.is_some() {
            let held = std::mem::take(&mut self.held[k]);
            let (content, calls) = self.meta.answer(&held);
            if let Some(c) = content.as_str().filter(|c| !c.is_empty()) {
                let e = self.chunk(k, Some(c), false, None);
                self.out.push_back(e);
            }
            if let Some(calls) = calls {
                // One delta per call, each whole (name and all its arguments).
                for c in calls.as_array().into_iter().flatten() {
                    let e = self.data(json!({
                        "id": self.meta.id,
                        "object": object(self.meta.kind, true),
                        "created": self.meta.created,
                        "model": self.meta.model,
                        "choices": [{"index": k, "delta": {"tool_calls": [c]},
                                     "logprobs": null, "finish_reason": null}],
                    }));
                    self.out.push_back(e);
                }
                finish = "tool_calls";
            }
        }
        let e = self.chunk(k, None, false, Some(finish));
        self.out.push_back(e);
    }

    /// Turn the next engine event into SSE events; false when the stream is over.
    fn on(&mut self, ev: Option<Event>) {
        match ev {
            Some(Event::Prefilled(r)) => {
                if let Some(l) = self.line.as_mut() {
                    l.report = Some(r.clone());
                }
                self.report = Some(r);
                if self.meta.kind == Kind::Chat {
                    for k in 0..self.meta.n {
                        let e = self.chunk(k, None, true, None);
                        self.out.push_back(e);
                    }
                }
            }
            Some(Event::Text(k, t)) if self.meta.tools.is_some() => self.held[k].push_str(&t),
            Some(Event::Text(k, t)) => {
                let e = self.chunk(k, Some(&t), false, None);
                self.out.push_back(e);
            }
            Some(Event::Logprobs(k, l)) => self.pending[k].push(l),
            Some(Event::Done(k, d)) => {
                let reason = d.reason;
                self.done[k] = Some(d);
                self.finish_choice(k, reason);
                if self.done.iter().any(Option::is_none) {
                    return;
                }
                let all = combined(&self.done);
                if let Some(l) = self.line.as_mut() {
                    l.done = Some(all.clone());
                }
                if self.include_usage {
                    let u = usage(&self.meta, self.report.as_ref(), &all);
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
                if let Some(l) = self.line.as_mut() {
                    l.failed(&e);
                }
                let ev = self.data(e.body());
                self.out.push_back(ev);
                self.ended = true;
            }
            None => {
                let e = ApiError::internal("the engine stopped before the request finished");
                if let Some(l) = self.line.as_mut() {
                    l.failed(&e);
                }
                let ev = self.data(e.body());
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
    line: Option<LogLine>,
) -> Response {
    let n = meta.n;
    let state = StreamState {
        line,
        meta,
        rx,
        include_usage,
        report: None,
        out: VecDeque::new(),
        ended: false,
        pending: vec![Vec::new(); n],
        offset: vec![0; n],
        held: vec![String::new(); n],
        done: vec![None; n],
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

/// `POST /tokenize`: text to token ids, as llama-server (`content`, `add_special`) and
/// vLLM (`prompt`, `add_special_tokens`) take it; the answer carries both shapes
/// (`tokens`, and vLLM's `count` and `max_model_len`). A text of more tokens than the
/// context is refused as soon as that is known.
pub async fn tokenize(State(app): AppState, body: Result<Bytes, BytesRejection>) -> Response {
    handle_json(app, body, None, async |app, req: TokenizeRequest, _| {
        if let Some(m) = &req.model {
            check_model(&app, m)?;
        }
        let (text, param, add_special) = match (req.content, req.prompt) {
            (Some(t), None) => (
                t,
                "content",
                req.add_special.or(req.add_special_tokens).unwrap_or(false),
            ),
            (None, Some(t)) => (
                t,
                "prompt",
                req.add_special_tokens.or(req.add_special).unwrap_or(true),
            ),
            _ => {
                return Err(ApiError::param(
                    "content",
                    "give the text as content (llama-server) or prompt (vLLM), one of them",
                ))
            }
        };
        let a = app.clone();
        let ctx = app.lm.model.cfg.ctx_len;
        let tokens = tokio::task::spawn_blocking(move || {
            a.lm.tokenizer.encode_within(&text, add_special, ctx)
        })
        .await
        .map_err(|e| ApiError::internal(format!("tokenizing failed: {e}")))?
        .map_err(|e| match e {
            kvmerger_engine::Error::ContextOverflow { prompt, .. } => ApiError::context_length(
                param,
                format!(
                    "This model's maximum context length is {ctx} tokens, and the text has \
                     at least {prompt}."
                ),
            ),
            e => ApiError::param(param, e.to_string()),
        })?;
        Ok(Json(json!({
            "tokens": tokens,
            "count": tokens.len(),
            "max_model_len": ctx,
        }))
        .into_response())
    })
    .await
}

/// `POST /detokenize`: token ids to text (`content`, as llama-server answers, and
/// `prompt`, as vLLM does). Ids outside the vocabulary are a 400 naming the id.
pub async fn detokenize(State(app): AppState, body: Result<Bytes, BytesRejection>) -> Response {
    handle_json(app, body, None, async |app, req: DetokenizeRequest, _| {
        if let Some(m) = &req.model {
            check_model(&app, m)?;
        }
        let ids = api::token_ids(&req.tokens, app.lm.tokenizer.vocab_size())?;
        let text = app.lm.tokenizer.decode(&ids);
        Ok(Json(json!({"content": text, "prompt": text})).into_response())
    })
    .await
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

/// A stored context's header, by id (404 when there is none).
async fn stored_header(app: &Arc<App>, id: &str) -> Result<kvc::KvcHeader, ApiError> {
    if !crate::store::valid_key(id) {
        return Err(context_not_found(id));
    }
    let (a, key) = (app.clone(), id.to_string());
    let prefix = tokio::task::spawn_blocking(move || a.store.get_prefix(&key, kvc::HEADER_PEEK))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| ApiError::internal(e.to_string()))?
        .ok_or_else(|| context_not_found(id))?;
    kvc::peek_header(&prefix)
        .map_err(|e| ApiError::internal(format!("the stored context {id} is unreadable: {e}")))
}

fn context_not_found(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        format!("No stored context '{id}' (create one with POST /v1/contexts; it may have been evicted)."),
    )
    .with_param("kv_context")
    .with_code("context_not_found")
}

/// The messages and recipe of the stored context `id`.
async fn context_messages(app: &Arc<App>, id: &str) -> Result<(Vec<Message>, Recipe), ApiError> {
    let h = stored_header(app, id).await?;
    let messages = h.extra["messages"]
        .as_array()
        .filter(|m| !m.is_empty())
        .ok_or_else(|| {
            ApiError::param(
                "kv_context",
                format!("the stored context {id} holds no messages to continue"),
            )
        })?
        .iter()
        .map(|m| {
            Message::new(
                m["role"].as_str().unwrap_or("user"),
                m["content"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    Ok((messages, h.recipe))
}

fn context_card(app: &App, id: &str, h: &kvc::KvcHeader, bytes: Option<u64>) -> Value {
    json!({
        "id": id,
        "object": "kv_context",
        "created": h.created,
        "model": app.cfg.model_id,
        "tokens": h.tokens,
        "kv_compression": {
            "method": h.recipe.method,
            "budget": h.recipe.budget_text(),
            "recipe": h.recipe.to_string(),
            "protocol": h.protocol,
        },
        "kv_bytes": h.kv_bytes,
        "kv_bytes_full": h.kv_bytes_full,
        "bytes": bytes,
        "messages": h.extra["messages"].as_array().map_or(0, |m| m.len()),
    })
}

/// `POST /v1/contexts`: compress a document (or messages) once and keep it; the id
/// answers later chat requests (`kv_context`), on any server sharing the store.
/// The request that compresses a context handle's messages (nothing is generated).
fn context_job_request(
    app: &App,
    messages: Vec<Message>,
    spec: Recipe,
    compressor: Arc<Compressor>,
    prompt_param: &'static str,
) -> Result<Request, ApiError> {
    let sampling = sampling(
        app,
        RawSampling {
            max_tokens: Some(1),
            max_tokens_param: "max_tokens",
            ..RawSampling::default()
        },
    )?;
    Ok(Request::new(
        Kind::Chat,
        Input::Context(messages),
        prompt_param,
        sampling,
        (spec, compressor, Some(Protocol::Agnostic)),
    ))
}

/// A context request's messages: its `document` as a system message, or its `messages`.
fn context_request_messages(req: &api::ContextRequest) -> Result<Vec<Message>, ApiError> {
    match (&req.document, &req.messages) {
        (Some(d), None) => {
            if d.trim().is_empty() {
                return Err(ApiError::param("document", "the document is empty"));
            }
            Ok(vec![Message::new("system", d)])
        }
        (None, Some(ms)) if !ms.is_empty() => {
            let mut v = Vec::with_capacity(ms.len());
            for (i, m) in ms.iter().enumerate() {
                let role = api::message_role(i, &m.role)?;
                v.push(Message::new(role, api::message_text(i, &m.content)?));
            }
            Ok(v)
        }
        _ => Err(ApiError::param(
            "document",
            "give the context as document (text) or messages (a list), one of them",
        )),
    }
}

pub async fn create_context(State(app): AppState, body: Result<Bytes, BytesRejection>) -> Response {
    handle_json(app, body, None, async |app, req: api::ContextRequest, _| {
        if !req.model.is_empty() {
            check_model(&app, &req.model)?;
        }
        let messages = context_request_messages(&req)?;
        let (spec, compressor, _) = compression(&app, req.kv_compression.as_ref())?;
        if compressor.is_noop() {
            return Err(ApiError::param(
                "kv_compression",
                "a context handle keeps a compressed context: give kv_compression (the server's default compresses nothing)",
            ));
        }
        if app.shutting_down.load(Relaxed) {
            return Err(ApiError::shutting_down());
        }
        let param = if req.document.is_some() { "document" } else { "messages" };
        let request = context_job_request(&app, messages, spec, compressor, param)?;
        let arrived = Instant::now();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let a = app.clone();
        let (mut job, _) = tokio::task::spawn_blocking(move || prepare(&a, request, arrived, tx))
            .await
            .map_err(|e| ApiError::internal(format!("request preparation failed: {e}")))??;
        let key = job
            .store_key
            .clone()
            .ok_or_else(|| ApiError::internal("a context handle without a store key"))?;
        if let Some(seq) = job.preloaded.take() {
            // Stored already: the handle is its key.
            let bytes = kvc::encode(&seq, &app.lm, "agnostic", Value::Null);
            let h = kvc::read_header(&bytes)
                .map_err(|e| ApiError::internal(e.to_string()))?
                .0;
            let mut card = context_card(&app, &key, &h, None);
            card["cached_tokens"] = json!(h.tokens);
            card["stored_in"] = json!(app.store.describe());
            return Ok((StatusCode::OK, Json(card)).into_response());
        }
        app.sched.submit(job)?;
        let mut report = None;
        let context = loop {
            match rx.recv().await {
                Some(Event::Prefilled(r)) => report = Some(r),
                Some(Event::Text(..)) | Some(Event::Logprobs(..)) => {}
                Some(Event::Failed(e)) => return Err(e),
                Some(Event::Done(_, d)) => break d.context,
                None => return Err(ApiError::internal("the engine stopped before the context was compressed")),
            }
        };
        let bytes = context.ok_or_else(|| ApiError::internal("the engine kept no context"))?;
        let h = kvc::read_header(&bytes)
            .map_err(|e| ApiError::internal(e.to_string()))?
            .0;
        let (a, k, n) = (app.clone(), key.clone(), bytes.len());
        tokio::task::spawn_blocking(move || a.store.put(&k, &bytes))
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?
            .map_err(|e| ApiError::internal(e.to_string()))?;
        app.metrics.store_written(n);
        let mut card = context_card(&app, &key, &h, Some(n as u64));
        if let Some(r) = report {
            card["prefill_ms"] = json!(r.prefill_ms);
            card["compress_ms"] = json!(r.compress_ms);
            card["cached_tokens"] = json!(r.cached_tokens);
        }
        card["stored_in"] = json!(app.store.describe());
        Ok((StatusCode::CREATED, Json(card)).into_response())
    })
    .await
}

/// `GET /v1/contexts`: every stored context, most recently used first.
pub async fn list_contexts(State(app): AppState) -> Response {
    let a = app.clone();
    let r = tokio::task::spawn_blocking(move || -> Result<Vec<Value>, ApiError> {
        let listed = a
            .store
            .list()
            .map_err(|e| ApiError::internal(e.to_string()))?;
        Ok(listed
            .into_iter()
            .filter_map(|l| {
                let prefix = a.store.get_prefix(&l.key, kvc::HEADER_PEEK).ok()??;
                let h = kvc::peek_header(&prefix).ok()?;
                Some(context_card(&a, &l.key, &h, Some(l.bytes)))
            })
            .collect())
    })
    .await;
    match r {
        Ok(Ok(data)) => Json(json!({"object": "list", "data": data})).into_response(),
        Ok(Err(e)) => e.into_response(),
        Err(e) => ApiError::internal(e.to_string()).into_response(),
    }
}

/// `GET /v1/contexts/{id}`.
pub async fn get_context(State(app): AppState, Path(id): Path<String>) -> Response {
    match stored_header(&app, &id).await {
        Ok(h) => Json(context_card(&app, &id, &h, None)).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `DELETE /v1/contexts/{id}`.
pub async fn delete_context(State(app): AppState, Path(id): Path<String>) -> Response {
    if !crate::store::valid_key(&id) {
        return context_not_found(&id).into_response();
    }
    let (a, k) = (app.clone(), id.clone());
    match tokio::task::spawn_blocking(move || a.store.delete(&k)).await {
        Ok(Ok(true)) => {
            Json(json!({"id": id, "object": "kv_context", "deleted": true})).into_response()
        }
        Ok(Ok(false)) => context_not_found(&id).into_response(),
        Ok(Err(e)) => ApiError::internal(e.to_string()).into_response(),
        Err(e) => ApiError::internal(e.to_string()).into_response(),
    }
}
