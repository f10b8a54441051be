//! The OpenAI request bodies this server accepts, checked field by field.
//!
//! Unknown fields are collected (each struct's `extra`) and, by default, ignored: the
//! handler names them in a warning and in the `x-kvmerger-ignored-fields` header; with
//! `--strict-api` they are errors naming the field. Known parameters whose OpenAI
//! meaning this engine does not implement (`echo`, `suffix`, `best_of` > 1, image
//! parts, ...) are always errors: silently ignoring them would return something other
//! than what was asked.
//! Extensions: `top_k`, `repetition_penalty`, `ignore_eos`, `kv_compression`,
//! `kv_context`, and vLLM's `continue_final_message` / `add_generation_prompt`.

use crate::error::ApiError;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

#[derive(Deserialize, Debug, Default)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
    #[serde(default)]
    pub continuous_usage_stats: Option<bool>,
    #[serde(flatten)]
    pub extra: Extra,
}

#[derive(Deserialize, Debug)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: Value,
    pub max_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub n: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub stop: Option<Value>,
    pub seed: Option<i64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub logit_bias: Option<Value>,
    pub logprobs: Option<Value>,
    pub echo: Option<bool>,
    pub best_of: Option<i64>,
    pub suffix: Option<String>,
    pub user: Option<String>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub ignore_eos: Option<bool>,
    pub kv_compression: Option<Value>,
    #[serde(flatten)]
    pub extra: Extra,
}

#[derive(Deserialize, Debug)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: Value,
    pub name: Option<String>,
    /// An assistant turn's calls (`[{"id", "type": "function", "function": {"name", "arguments"}}]`).
    pub tool_calls: Option<Value>,
    /// A tool turn answers this call.
    pub tool_call_id: Option<String>,
    #[serde(flatten)]
    pub extra: Extra,
}

#[derive(Deserialize, Debug)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub n: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub stop: Option<Value>,
    pub seed: Option<i64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub logit_bias: Option<Value>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
    pub user: Option<String>,
    pub response_format: Option<Value>,
    pub tools: Option<Vec<Value>>,
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
    pub store: Option<bool>,
    pub metadata: Option<Value>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub ignore_eos: Option<bool>,
    pub kv_compression: Option<Value>,
    /// A stored context (`POST /v1/contexts`) whose messages come before these.
    pub kv_context: Option<String>,
    /// Continue the final assistant message (vLLM's name; the default when the last
    /// message is the assistant's).
    pub continue_final_message: Option<bool>,
    /// Open a new assistant turn after the messages (vLLM's name; the default unless
    /// the last message is the assistant's).
    pub add_generation_prompt: Option<bool>,
    #[serde(flatten)]
    pub extra: Extra,
}

/// `POST /v1/contexts`: a document (a system message) or messages to compress and keep.
#[derive(Debug, Deserialize)]
pub struct ContextRequest {
    #[serde(default)]
    pub model: String,
    pub document: Option<String>,
    pub messages: Option<Vec<ChatMessage>>,
    pub kv_compression: Option<Value>,
    #[serde(flatten)]
    pub extra: Extra,
}

/// `POST /tokenize`: llama-server's shape (`content`, `add_special`, default false) or
/// vLLM's (`prompt`, `add_special_tokens`, default true).
#[derive(Debug, Deserialize)]
pub struct TokenizeRequest {
    pub model: Option<String>,
    pub content: Option<String>,
    pub prompt: Option<String>,
    pub add_special: Option<bool>,
    pub add_special_tokens: Option<bool>,
    #[serde(flatten)]
    pub extra: Extra,
}

/// `POST /detokenize`: `{"tokens": [ids]}`.
#[derive(Debug, Deserialize)]
pub struct DetokenizeRequest {
    pub model: Option<String>,
    pub tokens: Value,
    #[serde(flatten)]
    pub extra: Extra,
}

impl Unknown for TokenizeRequest {
    fn unknown_fields(&self) -> Vec<String> {
        self.extra.keys().cloned().collect()
    }
}

impl Unknown for DetokenizeRequest {
    fn unknown_fields(&self) -> Vec<String> {
        self.extra.keys().cloned().collect()
    }
}

/// Token ids to detokenize: an array of integers, each inside the vocabulary (an id
/// outside it is a 400 naming the id).
pub fn token_ids(v: &Value, vocab: usize) -> Result<Vec<u32>, ApiError> {
    let Value::Array(a) = v else {
        return Err(ApiError::param(
            "tokens",
            "tokens must be an array of token ids (integers)",
        ));
    };
    a.iter()
        .enumerate()
        .map(|(i, x)| match x.as_u64() {
            Some(t) if (t as u128) < vocab as u128 => Ok(t as u32),
            Some(_) | None if x.is_i64() || x.is_u64() => Err(ApiError::param(
                format!("tokens.{i}"),
                format!("token id {x} is outside the vocabulary of {vocab}"),
            )),
            _ => Err(ApiError::param(
                format!("tokens.{i}"),
                format!("tokens must be integers, got {}", short(x)),
            )),
        })
        .collect()
}

/// A value for an error message, cut to a readable length.
fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 40 {
        format!("{}...", s.chars().take(40).collect::<String>())
    } else {
        s
    }
}

/// Fields a request sent that this server does not know, kept to be reported.
pub type Extra = serde_json::Map<String, Value>;

/// Requests that report the unknown fields they carried, as dotted paths
/// (`colour`, `messages.0.x`, `stream_options.y`), in the order they came.
pub trait Unknown {
    fn unknown_fields(&self) -> Vec<String>;
}

fn push_extra(out: &mut Vec<String>, prefix: &str, extra: &Extra) {
    out.extend(extra.keys().map(|k| format!("{prefix}{k}")));
}

fn messages_unknown(out: &mut Vec<String>, messages: &[ChatMessage]) {
    for (i, m) in messages.iter().enumerate() {
        push_extra(out, &format!("messages.{i}."), &m.extra);
    }
}

impl Unknown for CompletionRequest {
    fn unknown_fields(&self) -> Vec<String> {
        let mut out = Vec::new();
        push_extra(&mut out, "", &self.extra);
        if let Some(o) = &self.stream_options {
            push_extra(&mut out, "stream_options.", &o.extra);
        }
        out
    }
}

impl Unknown for ChatRequest {
    fn unknown_fields(&self) -> Vec<String> {
        let mut out = Vec::new();
        push_extra(&mut out, "", &self.extra);
        messages_unknown(&mut out, &self.messages);
        if let Some(o) = &self.stream_options {
            push_extra(&mut out, "stream_options.", &o.extra);
        }
        out
    }
}

impl Unknown for ContextRequest {
    fn unknown_fields(&self) -> Vec<String> {
        let mut out = Vec::new();
        push_extra(&mut out, "", &self.extra);
        if let Some(m) = &self.messages {
            messages_unknown(&mut out, m);
        }
        out
    }
}

/// The most unknown field names reported, and the longest name, in the header and log.
const IGNORED_SHOWN: usize = 16;
const IGNORED_NAME_CHARS: usize = 64;

/// Unknown field names as a header value (and log text): printable ASCII only, each
/// name cut to 64 characters, at most 16 names then `+N more`.
pub fn ignored_list(fields: &[String]) -> String {
    let mut parts: Vec<String> = fields
        .iter()
        .take(IGNORED_SHOWN)
        .map(|f| {
            let mut s: String = f
                .chars()
                .take(IGNORED_NAME_CHARS)
                .map(|c| {
                    if c.is_ascii_graphic() && c != ',' {
                        c
                    } else {
                        '?'
                    }
                })
                .collect();
            if f.chars().count() > IGNORED_NAME_CHARS {
                s.push_str("...");
            }
            s
        })
        .collect();
    if fields.len() > IGNORED_SHOWN {
        parts.push(format!("+{} more", fields.len() - IGNORED_SHOWN));
    }
    parts.join(",")
}

/// Parse a request body and find its unknown fields: with `strict`, the first one is a
/// 400 naming it; otherwise they are returned for the caller to report and ignore.
pub fn parse_request<T: DeserializeOwned + Unknown>(
    body: &[u8],
    strict: bool,
) -> Result<(T, Vec<String>), ApiError> {
    let req: T = parse(body)?;
    let unknown = req.unknown_fields();
    if strict {
        if let Some(f) = unknown.first() {
            let shown = ignored_list(std::slice::from_ref(f));
            return Err(ApiError::invalid(format!(
                "Unrecognized request argument supplied: {shown} (this server runs with --strict-api)"
            ))
            .with_param(f.clone())
            .with_code("unknown_parameter"));
        }
    }
    Ok((req, unknown))
}

/// Parse a body: malformed JSON and wrong field types are 400s that name what is wrong.
pub fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let v: Value = serde_json::from_slice(body).map_err(ApiError::malformed_json)?;
    if !v.is_object() {
        return Err(ApiError::malformed_json("the body is not a JSON object"));
    }
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        let join = |field: &str| {
            if path == "." {
                field.to_string()
            } else {
                format!("{path}.{field}")
            }
        };
        let missing = inner
            .strip_prefix("missing field `")
            .and_then(|r| r.split('`').next());
        if let Some(field) = missing {
            let param = join(field);
            return ApiError::invalid(format!("Missing required parameter: '{param}'."))
                .with_param(param)
                .with_code("missing_required_parameter");
        }
        if inner.starts_with("unknown field") {
            return ApiError::invalid(format!("Unrecognized request argument: {inner}"))
                .with_param(path)
                .with_code("unknown_parameter");
        }
        let err = if path == "." {
            ApiError::invalid(inner)
        } else {
            ApiError::invalid(format!("Invalid value for '{path}': {inner}")).with_param(path)
        };
        err.with_code("invalid_type")
    })
}

/// Sampling and length parameters common to both endpoints, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampling {
    pub max_tokens: Option<usize>,
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
    pub min_p: f32,
    pub repetition_penalty: f32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// Token id and bias, in the order given (ids not yet checked against the vocabulary).
    pub logit_bias: Vec<(u32, f32)>,
    pub seed: u64,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    /// Choices to generate (`n`), 1 to [`MAX_N`].
    pub n: usize,
}

/// The raw common fields, from either request type.
#[derive(Default)]
pub struct RawSampling<'a> {
    pub max_tokens: Option<i64>,
    pub max_tokens_param: &'static str,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub seed: Option<i64>,
    pub stop: Option<&'a Value>,
    pub n: Option<i64>,
    pub logit_bias: Option<&'a Value>,
    pub ignore_eos: Option<bool>,
}

/// A known parameter this server does not implement; `what` qualifies it (`other
/// than 1`) and may be empty.
/// The sampling fields both request types share, by name: one place that reads them.
macro_rules! raw_sampling {
    ($req:expr, $max_tokens:expr, $param:expr) => {
        RawSampling {
            max_tokens: $max_tokens,
            max_tokens_param: $param,
            temperature: $req.temperature,
            top_p: $req.top_p,
            top_k: $req.top_k,
            min_p: $req.min_p,
            repetition_penalty: $req.repetition_penalty,
            presence_penalty: $req.presence_penalty,
            frequency_penalty: $req.frequency_penalty,
            seed: $req.seed,
            stop: $req.stop.as_ref(),
            n: $req.n,
            logit_bias: $req.logit_bias.as_ref(),
            ignore_eos: $req.ignore_eos,
        }
    };
}

impl CompletionRequest {
    pub fn sampling(&self) -> Result<RawSampling<'_>, ApiError> {
        Ok(raw_sampling!(self, self.max_tokens, "max_tokens"))
    }
}

impl ChatRequest {
    /// `max_completion_tokens` (OpenAI's newer name) or `max_tokens`, not both.
    pub fn sampling(&self) -> Result<RawSampling<'_>, ApiError> {
        if self.max_tokens.is_some() && self.max_completion_tokens.is_some() {
            return Err(ApiError::param(
                "max_completion_tokens",
                "give max_tokens or max_completion_tokens, not both",
            ));
        }
        Ok(match self.max_completion_tokens {
            Some(m) => raw_sampling!(self, Some(m), "max_completion_tokens"),
            None => raw_sampling!(self, self.max_tokens, "max_tokens"),
        })
    }
}

/// The most `logit_bias` entries a request may give.
pub const MAX_LOGIT_BIAS: usize = 1024;

/// `logit_bias`: an object from token ids (as strings, OpenAI's form) to biases in
/// [-100, 100].
fn parse_logit_bias(v: Option<&Value>) -> Result<Vec<(u32, f32)>, ApiError> {
    let o = match v {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Object(o)) => o,
        Some(other) => {
            return Err(ApiError::param(
                "logit_bias",
                format!(
                    "logit_bias must be an object from token ids to biases, like {{\"50256\": -100}}, got {}",
                    short(other)
                ),
            ))
        }
    };
    if o.len() > MAX_LOGIT_BIAS {
        return Err(ApiError::param(
            "logit_bias",
            format!(
                "logit_bias has {} entries, more than this server's limit of {MAX_LOGIT_BIAS}",
                o.len()
            ),
        ));
    }
    o.iter()
        .map(|(k, b)| {
            let shown = ignored_list(std::slice::from_ref(k));
            let param = format!("logit_bias.{shown}");
            let id: u32 = k.parse().map_err(|_| {
                ApiError::param(
                    param.clone(),
                    format!(
                        "logit_bias keys must be token ids (integers as strings), got '{shown}'"
                    ),
                )
            })?;
            match b.as_f64() {
                Some(x) if (-100.0..=100.0).contains(&x) => Ok((id, x as f32)),
                _ => Err(ApiError::param(
                    param,
                    format!(
                        "a logit bias must be a number in [-100, 100], got {}",
                        short(b)
                    ),
                )),
            }
        })
        .collect()
}

/// The most alternatives per token: chat's `top_logprobs`, completions' `logprobs`.
pub const MAX_TOP_LOGPROBS_CHAT: i64 = 20;
pub const MAX_LOGPROBS_COMPLETION: i64 = 5;

/// Chat's `logprobs` (true: report them) and `top_logprobs` (0 to 20 alternatives,
/// with `logprobs` true): the alternatives per token when reported.
pub fn chat_logprobs(logprobs: Option<bool>, top: Option<i64>) -> Result<Option<usize>, ApiError> {
    let on = logprobs == Some(true);
    match top {
        Some(n) if !(0..=MAX_TOP_LOGPROBS_CHAT).contains(&n) => Err(ApiError::param(
            "top_logprobs",
            format!("top_logprobs must be between 0 and {MAX_TOP_LOGPROBS_CHAT}, got {n}"),
        )),
        Some(n) if n > 0 && !on => Err(ApiError::param(
            "top_logprobs",
            "top_logprobs needs logprobs set to true",
        )),
        _ => Ok(on.then_some(top.unwrap_or(0) as usize)),
    }
}

/// Completions' `logprobs`: null (off) or an integer 0 to 5, the alternatives per token.
pub fn completion_logprobs(v: Option<&Value>) -> Result<Option<usize>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(x) => match x.as_i64() {
            Some(n) if (0..=MAX_LOGPROBS_COMPLETION).contains(&n) => Ok(Some(n as usize)),
            _ => Err(ApiError::param(
                "logprobs",
                format!(
                    "logprobs must be null or an integer between 0 and {MAX_LOGPROBS_COMPLETION} (the alternatives per token), got {}",
                    short(x)
                ),
            )),
        },
    }
}

/// The most choices one request may ask for (`n`).
pub const MAX_N: usize = 16;

pub fn unsupported(param: &str, what: &str) -> ApiError {
    let what = if what.is_empty() {
        String::new()
    } else {
        format!(" {what}")
    };
    ApiError::param(
        param,
        format!("'{param}'{what} is not supported by this server"),
    )
    .with_code("unsupported_parameter")
}

impl RawSampling<'_> {
    /// `presence_penalty` and `frequency_penalty`, checked (-2 to 2, OpenAI's ranges).
    fn penalties(&self) -> Result<[f32; 2], ApiError> {
        let mut penalties = [0f32; 2];
        for (out, (name, v)) in penalties.iter_mut().zip([
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ]) {
            let x = v.unwrap_or(0.0);
            if !(-2.0..=2.0).contains(&x) {
                return Err(ApiError::param(
                    name,
                    format!("{name} must be between -2 and 2, got {x}"),
                ));
            }
            *out = x as f32;
        }
        Ok(penalties)
    }

    /// `n`, checked (1 to [`MAX_N`]).
    fn choices(&self) -> Result<usize, ApiError> {
        match self.n {
            None => Ok(1),
            Some(n) if (1..=MAX_N as i64).contains(&n) => Ok(n as usize),
            Some(n) => Err(ApiError::param(
                "n",
                format!("n must be between 1 and {MAX_N}, got {n}"),
            )),
        }
    }

    pub fn validate(&self, max_tokens_limit: usize) -> Result<Sampling, ApiError> {
        let max_tokens = match self.max_tokens {
            None => None,
            Some(m) if m < 1 => {
                return Err(ApiError::param(
                    self.max_tokens_param,
                    format!("{} must be at least 1, got {m}", self.max_tokens_param),
                ))
            }
            Some(m) if m as u64 > max_tokens_limit as u64 => {
                return Err(ApiError::param(
                    self.max_tokens_param,
                    format!(
                        "{} is {m}, above this server's limit of {max_tokens_limit}",
                        self.max_tokens_param
                    ),
                ))
            }
            Some(m) => Some(m as usize),
        };
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::param(
                "temperature",
                format!("temperature must be between 0 and 2, got {temperature}"),
            ));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        // As f32, where the sampler works: 1e-300 would become 0.
        if !((top_p as f32) > 0.0 && top_p <= 1.0) {
            return Err(ApiError::param(
                "top_p",
                format!("top_p must be in (0, 1] (and at least the smallest f32, about 1.2e-38), got {top_p}"),
            ));
        }
        let top_k = match self.top_k {
            None => 0,
            Some(k) if k < 0 => {
                return Err(ApiError::param(
                    "top_k",
                    format!("top_k must be 0 (off) or positive, got {k}"),
                ))
            }
            Some(k) => k as usize,
        };
        let repetition_penalty = self.repetition_penalty.unwrap_or(1.0);
        if !((repetition_penalty as f32).is_normal()
            && repetition_penalty > 0.0
            && repetition_penalty <= 10.0)
        {
            return Err(ApiError::param(
                "repetition_penalty",
                format!("repetition_penalty must be in (0, 10] (and at least about 1.2e-38), got {repetition_penalty}"),
            ));
        }
        let penalties = self.penalties()?;
        let min_p = self.min_p.unwrap_or(0.0);
        if !(0.0..=1.0).contains(&min_p) {
            return Err(ApiError::param(
                "min_p",
                format!("min_p must be between 0 (off) and 1, got {min_p}"),
            ));
        }
        let n = self.choices()?;
        let logit_bias = parse_logit_bias(self.logit_bias)?;
        let stop = parse_stop(self.stop)?;
        Ok(Sampling {
            max_tokens,
            temperature: temperature as f32,
            top_p: top_p as f32,
            top_k,
            min_p: min_p as f32,
            repetition_penalty: repetition_penalty as f32,
            presence_penalty: penalties[0],
            frequency_penalty: penalties[1],
            logit_bias,
            // Negative seeds are valid in OpenAI's API; any 64 bits make a seed here.
            seed: self.seed.unwrap_or(0) as u64,
            stop,
            ignore_eos: self.ignore_eos.unwrap_or(false),
            n,
        })
    }
}

fn parse_stop(v: Option<&Value>) -> Result<Vec<String>, ApiError> {
    let bad = || {
        ApiError::param(
            "stop",
            "stop must be a string or an array of up to 4 non-empty strings",
        )
    };
    let out = match v {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| x.as_str().map(str::to_string).ok_or_else(bad))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(bad()),
    };
    if out.len() > 4 || out.iter().any(|s| s.is_empty() || s.len() > 256) {
        return Err(bad());
    }
    Ok(out)
}

/// A completion prompt: text, or token ids.
#[derive(Clone, Debug, PartialEq)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
}

pub fn parse_prompt(v: &Value) -> Result<Prompt, ApiError> {
    let bad = || {
        ApiError::param(
            "prompt",
            "prompt must be a string, an array of one string, or an array of token ids",
        )
    };
    let tokens = |a: &Vec<Value>| -> Result<Vec<u32>, ApiError> {
        a.iter()
            .map(|x| {
                x.as_u64()
                    .filter(|&t| t <= u32::MAX as u64)
                    .map(|t| t as u32)
                    .ok_or_else(bad)
            })
            .collect()
    };
    match v {
        Value::String(s) => Ok(Prompt::Text(s.clone())),
        Value::Array(a) if a.is_empty() => Err(ApiError::param("prompt", "prompt is empty")),
        Value::Array(a) if a.len() == 1 && a[0].is_string() => {
            Ok(Prompt::Text(a[0].as_str().unwrap_or_default().to_string()))
        }
        Value::Array(a) if a.iter().all(|x| x.is_number()) => Ok(Prompt::Tokens(tokens(a)?)),
        Value::Array(a) if a.len() == 1 && a[0].is_array() => match &a[0] {
            Value::Array(inner) => Ok(Prompt::Tokens(tokens(inner)?)),
            _ => Err(bad()),
        },
        Value::Array(a) if a.len() > 1 && a.iter().all(|x| x.is_string() || x.is_array()) => {
            Err(unsupported(
                "prompt",
                "with several prompts (batch them as separate requests)",
            ))
        }
        _ => Err(bad()),
    }
}

/// A chat message's text: a string, or an array of `{"type": "text", "text": ...}` parts.
pub fn message_text(i: usize, content: &Value) -> Result<String, ApiError> {
    let param = format!("messages.{i}.content");
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Null => Ok(String::new()),
        Value::Array(parts) => {
            let mut out = String::new();
            for (j, p) in parts.iter().enumerate() {
                let kind = p.get("type").and_then(Value::as_str);
                match (kind, p.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(t)) => out.push_str(t),
                    (Some(other), _) if other != "text" => {
                        return Err(unsupported(
                            &format!("{param}.{j}.type"),
                            &format!("'{other}' (only text parts)"),
                        ))
                    }
                    _ => {
                        return Err(ApiError::param(
                            format!("{param}.{j}"),
                            "a content part must be {\"type\": \"text\", \"text\": \"...\"}",
                        ))
                    }
                }
            }
            Ok(out)
        }
        _ => Err(ApiError::param(
            param,
            "content must be a string or an array of text parts",
        )),
    }
}

/// OpenAI's roles, mapped to what chat templates know.
pub fn message_role(i: usize, role: &str) -> Result<&'static str, ApiError> {
    match role {
        "system" | "developer" => Ok("system"),
        "user" => Ok("user"),
        "assistant" => Ok("assistant"),
        "tool" => Ok("tool"),
        "function" => Err(unsupported(
            &format!("messages.{i}.role"),
            "'function' (deprecated by OpenAI: use 'tool')",
        )),
        other => Err(ApiError::param(
            format!("messages.{i}.role"),
            format!("unknown role '{other}' (expected system, developer, user, assistant or tool)"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn malformed_json_and_wrong_types_are_named() {
        let e = parse::<CompletionRequest>(b"{\"model\": ").unwrap_err();
        assert_eq!(e.status, 400);
        assert_eq!(e.code, Some("invalid_json"));
        let e = parse::<CompletionRequest>(b"[1, 2]").unwrap_err();
        assert_eq!(e.code, Some("invalid_json"));
        let e =
            parse::<CompletionRequest>(br#"{"model": "m", "prompt": "x", "max_tokens": "ten"}"#)
                .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("max_tokens"));
        let body = br#"{"model": "m", "prompt": "x", "colour": 1, "stream_options": {"y": 2}}"#;
        let e = parse_request::<CompletionRequest>(body, true).unwrap_err();
        assert_eq!(e.code, Some("unknown_parameter"));
        assert!(e.message.contains("colour"), "{}", e.message);
        let (_, unknown) = parse_request::<CompletionRequest>(body, false).unwrap();
        assert_eq!(unknown, vec!["colour", "stream_options.y"]);
        let body = br#"{"model": "m", "messages": [{"role": "user", "content": "hi", "x": 1}]}"#;
        let e = parse_request::<ChatRequest>(body, true).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages.0.x"), "{}", e.message);
        let (_, unknown) = parse_request::<ChatRequest>(body, false).unwrap();
        assert_eq!(unknown, vec!["messages.0.x"]);
        // Known fields keep their checks when unknown ones ride along.
        let e = parse_request::<CompletionRequest>(
            br#"{"model": "m", "prompt": "x", "zz": 1, "max_tokens": "ten"}"#,
            false,
        )
        .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("max_tokens"));
        let e = parse::<ChatRequest>(br#"{"model": "m"}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages"), "{}", e.message);
    }

    fn raw(v: &Value) -> RawSampling<'_> {
        RawSampling {
            max_tokens: v.get("max_tokens").and_then(Value::as_i64),
            max_tokens_param: "max_tokens",
            temperature: v.get("temperature").and_then(Value::as_f64),
            top_p: v.get("top_p").and_then(Value::as_f64),
            top_k: v.get("top_k").and_then(Value::as_i64),
            min_p: v.get("min_p").and_then(Value::as_f64),
            repetition_penalty: v.get("repetition_penalty").and_then(Value::as_f64),
            presence_penalty: v.get("presence_penalty").and_then(Value::as_f64),
            frequency_penalty: v.get("frequency_penalty").and_then(Value::as_f64),
            seed: v.get("seed").and_then(Value::as_i64),
            stop: v.get("stop"),
            n: v.get("n").and_then(Value::as_i64),
            logit_bias: v.get("logit_bias"),
            ignore_eos: None,
        }
    }

    #[test]
    fn token_ids_are_checked_against_the_vocabulary() {
        assert_eq!(token_ids(&json!([0, 5, 9]), 10).unwrap(), vec![0, 5, 9]);
        let e = token_ids(&json!([1, 10]), 10).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("tokens.1"));
        assert!(e.message.contains("10"), "{}", e.message);
        let e = token_ids(&json!([-3]), 10).unwrap_err();
        assert!(e.message.contains("-3"), "{}", e.message);
        for bad in [
            json!("1 2"),
            json!([1.5]),
            json!(["a"]),
            json!({"a": 1}),
            json!([[1]]),
        ] {
            assert!(token_ids(&bad, 10).is_err(), "{bad}");
        }
    }

    #[test]
    fn logprobs_settings_are_checked() {
        assert_eq!(chat_logprobs(None, None).unwrap(), None);
        assert_eq!(chat_logprobs(Some(true), None).unwrap(), Some(0));
        assert_eq!(chat_logprobs(Some(true), Some(20)).unwrap(), Some(20));
        assert_eq!(chat_logprobs(Some(false), Some(0)).unwrap(), None);
        for (on, top) in [
            (Some(true), Some(21)),
            (Some(true), Some(-1)),
            (None, Some(3)),
        ] {
            let e = chat_logprobs(on, top).unwrap_err();
            assert_eq!(e.param.as_deref(), Some("top_logprobs"));
        }
        assert_eq!(completion_logprobs(Some(&json!(5))).unwrap(), Some(5));
        assert_eq!(completion_logprobs(Some(&json!(null))).unwrap(), None);
        for bad in [
            json!(6),
            json!(-1),
            json!(true),
            json!("2"),
            json!(1.5),
            json!([1]),
        ] {
            let e = completion_logprobs(Some(&bad)).unwrap_err();
            assert_eq!(e.param.as_deref(), Some("logprobs"), "{bad}");
        }
    }

    #[test]
    fn ignored_field_lists_are_bounded_and_printable() {
        let many: Vec<String> = (0..40).map(|i| format!("f{i}")).collect();
        let l = ignored_list(&many);
        assert!(l.ends_with(",+24 more"), "{l}");
        let odd = vec!["a\nb,c\u{e9}".to_string(), "x".repeat(500)];
        let l = ignored_list(&odd);
        assert!(l.starts_with("a?b?c?,"), "{l}");
        assert!(l.len() < 80, "{l}");
        assert!(l.bytes().all(|b| b.is_ascii_graphic() || b == b' '));
    }

    #[test]
    fn sampling_parameters_are_checked() {
        let ok = raw(&json!({"max_tokens": 5, "temperature": 0, "stop": ["a", "b"], "seed": -3}))
            .validate(100)
            .unwrap();
        assert_eq!(ok.max_tokens, Some(5));
        assert_eq!(ok.stop, vec!["a", "b"]);
        let ok = raw(&json!({"logit_bias": {"5": -100, "7": 2.5}, "min_p": 0.1,
                             "presence_penalty": -2, "frequency_penalty": 1.5}))
        .validate(100)
        .unwrap();
        assert_eq!(ok.logit_bias, vec![(5, -100.0), (7, 2.5)]);
        assert_eq!((ok.presence_penalty, ok.frequency_penalty), (-2.0, 1.5));
        let many: serde_json::Map<String, Value> =
            (0..2000).map(|i| (i.to_string(), json!(1))).collect();
        let e = raw(&json!({"logit_bias": many})).validate(100).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("logit_bias"));
        let cases = [
            (json!({"max_tokens": 0}), "max_tokens"),
            (json!({"max_tokens": 101}), "max_tokens"),
            (json!({"temperature": -1}), "temperature"),
            (json!({"temperature": 7}), "temperature"),
            (json!({"top_p": 0}), "top_p"),
            (json!({"top_k": -2}), "top_k"),
            (json!({"repetition_penalty": 0}), "repetition_penalty"),
            (json!({"n": 0}), "n"),
            (json!({"n": 17}), "n"),
            (json!({"frequency_penalty": 2.5}), "frequency_penalty"),
            (json!({"presence_penalty": -2.01}), "presence_penalty"),
            (json!({"min_p": 1.5}), "min_p"),
            (json!({"min_p": -0.1}), "min_p"),
            (json!({"logit_bias": [5]}), "logit_bias"),
            (json!({"logit_bias": "5"}), "logit_bias"),
            (json!({"logit_bias": {"x": 10}}), "logit_bias.x"),
            (json!({"logit_bias": {"-1": 10}}), "logit_bias.-1"),
            (json!({"logit_bias": {"5": 101}}), "logit_bias.5"),
            (json!({"logit_bias": {"5": "1"}}), "logit_bias.5"),
            (json!({"stop": [1]}), "stop"),
            (json!({"stop": ["a", "b", "c", "d", "e"]}), "stop"),
            (json!({"stop": [""]}), "stop"),
        ];
        for (v, param) in cases {
            let e = raw(&v).validate(100).expect_err(&v.to_string());
            assert_eq!(e.status, 400);
            assert_eq!(e.param.as_deref(), Some(param), "{v}");
        }
    }

    #[test]
    fn prompts_take_openai_shapes() {
        assert_eq!(
            parse_prompt(&json!("hi")).unwrap(),
            Prompt::Text("hi".into())
        );
        assert_eq!(
            parse_prompt(&json!(["hi"])).unwrap(),
            Prompt::Text("hi".into())
        );
        assert_eq!(
            parse_prompt(&json!([1, 2])).unwrap(),
            Prompt::Tokens(vec![1, 2])
        );
        assert_eq!(
            parse_prompt(&json!([[3]])).unwrap(),
            Prompt::Tokens(vec![3])
        );
        for bad in [
            json!([]),
            json!(["a", "b"]),
            json!([-1]),
            json!({"a": 1}),
            json!(3),
            json!([1.5]),
        ] {
            assert!(parse_prompt(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn chat_content_parts_and_roles() {
        let parts = json!([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]);
        assert_eq!(message_text(0, &parts).unwrap(), "ab");
        let img = json!([{"type": "image_url", "image_url": {"url": "x"}}]);
        assert_eq!(
            message_text(2, &img).unwrap_err().param.as_deref(),
            Some("messages.2.content.0.type")
        );
        assert!(message_text(0, &json!(5)).is_err());
        assert_eq!(message_role(0, "developer").unwrap(), "system");
        assert_eq!(message_role(1, "tool").unwrap(), "tool");
        assert!(message_role(1, "function").is_err());
        assert!(message_role(1, "wizard").is_err());
    }
}
