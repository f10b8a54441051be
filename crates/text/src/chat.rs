//! Chat templates: a conversation to the prompt text a model was trained on.
//!
//! A model's template is the Jinja source in GGUF's `tokenizer.chat_template`,
//! run by `minijinja` the way Hugging Face `transformers` runs it: blocks trim
//! their newline and left-strip their indentation, loop controls
//! (`break`/`continue`) and `namespace` work, Python string and dict methods
//! (`.strip()`, `.startswith()`, `.items()`, …) are available, and so are
//! `raise_exception(msg)`, `strftime_now(fmt)` and a `tojson` filter that
//! writes JSON as Python's `json.dumps(ensure_ascii=False)` does. The
//! variables are `messages` (each with `role` and `content`),
//! `add_generation_prompt`, `bos_token` and `eos_token`.
//!
//! When the file has no template, or its template cannot be used, a built-in
//! one stands in and [`ChatTemplate::is_fallback`] says so: Gemma's
//! `<start_of_turn>` format when the vocabulary has those tokens, ChatML
//! otherwise.

use crate::Error;
use kvmerger_tensors::gguf::{GgufFile, Value as GgufValue};
use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{context, Environment, ErrorKind};
use std::collections::BTreeMap;

type Result<T, E = Error> = std::result::Result<T, E>;

/// One turn of a conversation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// `system`, `user`, `assistant` (or whatever else the template knows).
    pub role: String,
    pub content: String,
    /// An assistant turn's tool calls, as OpenAI's API gives them (`[{"id", "type":
    /// "function", "function": {"name", "arguments"}}]`, with `arguments` parsed into
    /// JSON where it parses, since templates write it with `tojson`).
    pub tool_calls: Option<serde_json::Value>,
    /// A tool turn's answer is to this call.
    pub tool_call_id: Option<String>,
    /// A tool turn's function name.
    pub name: Option<String>,
}

/// How [`ChatTemplate::render_with`] renders a conversation.
#[derive(Clone, Copy, Debug, Default)]
pub struct RenderOptions<'a> {
    /// End with the opening of a new assistant turn.
    pub add_generation_prompt: bool,
    /// Continue the final (assistant) message instead: the text ends where that
    /// message's content ends, with no end-of-turn after it (assistant prefill).
    pub continue_final_message: bool,
    /// Tools (OpenAI's `tools` array) for templates that describe them to the model.
    pub tools: Option<&'a serde_json::Value>,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
            tool_calls: None,
            tool_call_id: None,
            name: None,
        }
    }
    pub fn system(content: impl Into<String>) -> Message {
        Message::new("system", content)
    }
    pub fn user(content: impl Into<String>) -> Message {
        Message::new("user", content)
    }
    pub fn assistant(content: impl Into<String>) -> Message {
        Message::new("assistant", content)
    }
}

/// A message as templates see it: `role`, `content`, and the tool fields when set.
fn message_value(m: &Message) -> Value {
    let mut v = serde_json::json!({"role": m.role, "content": m.content});
    if let Some(calls) = &m.tool_calls {
        v["tool_calls"] = calls.clone();
    }
    if let Some(id) = &m.tool_call_id {
        v["tool_call_id"] = serde_json::json!(id);
    }
    if let Some(n) = &m.name {
        v["name"] = serde_json::json!(n);
    }
    Value::from(minijinja::value::Serde(v))
}

/// Which template a [`ChatTemplate`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TemplateKind {
    /// The model's own (or one given to [`ChatTemplate::new`]).
    Model,
    /// Built-in Gemma format (`<start_of_turn>user … <end_of_turn>`).
    Gemma,
    /// Built-in ChatML (`<|im_start|>role … <|im_end|>`).
    ChatMl,
}

const NAME: &str = "chat";

/// Built-in ChatML.
const CHATML: &str =
    "{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}\
{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Built-in Gemma format: system messages go in front of the next user turn,
/// `assistant` is called `model`, contents are trimmed.
const GEMMA: &str = "{{ bos_token }}{% set ns = namespace(system='') %}{% for m in messages %}\
{% if m.role == 'system' %}{% set ns.system = ns.system + (m.content | trim) + '\\n\\n' %}\
{% else %}{% set role = 'model' if m.role == 'assistant' else m.role %}\
{{ '<start_of_turn>' + role + '\\n' }}{% if role == 'user' %}{{ ns.system }}{% set ns.system = '' %}{% endif %}\
{{ (m.content | trim) + '<end_of_turn>\\n' }}{% endif %}{% endfor %}\
{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}";

/// Marks errors raised on purpose by a template's `raise_exception`.
const RAISED: &str = "the template refused the conversation: ";

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    kind: TemplateKind,
    source: String,
    fallback_reason: Option<String>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("kind", &self.kind)
            .field("fallback_reason", &self.fallback_reason)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish()
    }
}

impl ChatTemplate {
    /// The template of a GGUF file (`tokenizer.chat_template`), with
    /// `bos_token`/`eos_token` taken from its vocabulary; a built-in fallback
    /// when it has none or it does not work.
    pub fn from_gguf(f: &GgufFile) -> ChatTemplate {
        ChatTemplate::from_metadata(&f.metadata)
    }

    /// [`from_gguf`](Self::from_gguf) over GGUF-style metadata.
    pub fn from_metadata(meta: &BTreeMap<String, GgufValue>) -> ChatTemplate {
        let tokens: Vec<&str> = meta
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.as_array())
            .map(|a| a.iter().map(|t| t.as_str().unwrap_or("")).collect())
            .unwrap_or_default();
        let token = |key: &str| {
            let id = meta.get(key).and_then(|v| v.as_u64())?;
            tokens.get(usize::try_from(id).ok()?).map(|t| t.to_string())
        };
        let bos = token("tokenizer.ggml.bos_token_id").unwrap_or_default();
        let eos = token("tokenizer.ggml.eos_token_id").unwrap_or_default();
        let source = meta.get("tokenizer.chat_template").and_then(|v| v.as_str());
        ChatTemplate::or_fallback(source, &bos, &eos, |t| tokens.contains(&t))
    }

    /// The template of a Hugging Face model directory's
    /// `tokenizer_config.json` (`chat_template`, either a string or a list of
    /// named templates, of which `default` is used), with its `bos_token` and
    /// `eos_token`; a built-in fallback when the file or the template is
    /// missing or does not work.
    pub fn from_tokenizer_config(path: &std::path::Path) -> ChatTemplate {
        let config: Option<serde_json::Value> =
            kvmerger_tensors::files::read_text_file(path, 64 << 20)
                .ok()
                .and_then(|s| serde_json::from_str(&s).ok());
        let Some(config) = config else {
            let mut t = ChatTemplate::builtin(TemplateKind::ChatMl, "", "");
            t.fallback_reason = Some(format!("{} could not be read as JSON", path.display()));
            return t;
        };
        let token = |key: &str| -> String {
            let v = config.get(key);
            let s = v.and_then(|v| v.as_str().or_else(|| v.get("content")?.as_str()));
            s.unwrap_or_default().to_string()
        };
        let source = match config.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.as_str()),
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template")?.as_str()),
            _ => None,
        };
        let added: Vec<&str> = config
            .get("added_tokens_decoder")
            .and_then(|d| d.as_object())
            .map(|d| {
                d.values()
                    .filter_map(|t| t.get("content")?.as_str())
                    .collect()
            })
            .unwrap_or_default();
        ChatTemplate::or_fallback(source, &token("bos_token"), &token("eos_token"), |t| {
            added.contains(&t)
        })
    }

    /// Compiles `source`, or stands in a built-in template (see
    /// [`is_fallback`](Self::is_fallback)) when `source` is `None`, fails to
    /// compile, or fails on a plain user/assistant conversation.
    /// `has_token` tells whether the vocabulary has a token, to pick the
    /// built-in format.
    pub fn or_fallback(
        source: Option<&str>,
        bos_token: &str,
        eos_token: &str,
        has_token: impl Fn(&str) -> bool,
    ) -> ChatTemplate {
        let reason = match source {
            None => "the model has no chat template".to_string(),
            Some(src) => match ChatTemplate::new(src, bos_token, eos_token) {
                Ok(t) => match t.smoke_test() {
                    Ok(()) => return t,
                    Err(e) => format!("the model's chat template does not work: {e}"),
                },
                Err(e) => format!("the model's chat template does not compile: {e}"),
            },
        };
        let kind = if has_token("<start_of_turn>") && has_token("<end_of_turn>") {
            TemplateKind::Gemma
        } else {
            TemplateKind::ChatMl
        };
        let mut t = ChatTemplate::builtin(kind, bos_token, eos_token);
        t.fallback_reason = Some(reason);
        t
    }

    /// Compiles a template; errors if it does not compile.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<ChatTemplate> {
        ChatTemplate::compile(TemplateKind::Model, source, bos_token, eos_token)
    }

    /// A built-in template ([`TemplateKind::Gemma`] or
    /// [`TemplateKind::ChatMl`]; `Model` gives ChatML).
    pub fn builtin(kind: TemplateKind, bos_token: &str, eos_token: &str) -> ChatTemplate {
        let (kind, source) = match kind {
            TemplateKind::Gemma => (TemplateKind::Gemma, GEMMA),
            _ => (TemplateKind::ChatMl, CHATML),
        };
        match ChatTemplate::compile(kind, source, bos_token, eos_token) {
            Ok(t) => t,
            // The built-in sources are constants that the tests compile.
            Err(e) => unreachable!("built-in chat template: {e}"),
        }
    }

    fn compile(
        kind: TemplateKind,
        source: &str,
        bos_token: &str,
        eos_token: &str,
    ) -> Result<ChatTemplate> {
        let mut env = environment();
        env.add_template_owned(NAME, source.to_string())
            .map_err(|e| Error::Template(describe(&e)))?;
        Ok(ChatTemplate {
            env,
            kind,
            source: source.to_string(),
            fallback_reason: None,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    /// Renders a user/assistant exchange; a deliberate `raise_exception`
    /// (say, a template that wants a system message) does not count.
    fn smoke_test(&self) -> Result<()> {
        let msgs = [
            Message::user("Hi"),
            Message::assistant("Hello"),
            Message::user("Bye"),
        ];
        match self.render(&msgs, true) {
            Err(Error::Template(e)) if e.contains(RAISED) => Ok(()),
            other => other.map(drop),
        }
    }

    /// Renders a conversation; with `add_generation_prompt` the text ends
    /// with the opening of an assistant turn.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.render_with(
            messages,
            &RenderOptions {
                add_generation_prompt,
                ..Default::default()
            },
        )
    }

    /// Renders a conversation with tools, or continuing its final assistant message.
    pub fn render_with(&self, messages: &[Message], opts: &RenderOptions) -> Result<String> {
        if opts.continue_final_message {
            if opts.add_generation_prompt {
                return Err(Error::Invalid(
                    "continue_final_message and add_generation_prompt cannot both be set".into(),
                ));
            }
            return self.render_continued(messages, opts);
        }
        self.render_raw(messages, opts)
    }

    /// The conversation cut right after the final assistant message's content.
    fn render_continued(&self, messages: &[Message], opts: &RenderOptions) -> Result<String> {
        let last =
            match messages.last() {
                Some(m) if m.role == "assistant" && !m.content.trim().is_empty() => m,
                _ => return Err(Error::Invalid(
                    "continue_final_message needs a final assistant message with text to continue"
                        .into(),
                )),
            };
        let text = self.render_raw(messages, opts)?;
        let content = last.content.as_str();
        let end = text
            .rfind(content)
            .map(|at| at + content.len())
            .or_else(|| {
                let t = content.trim();
                text.rfind(t).map(|at| at + t.len())
            })
            .ok_or_else(|| {
                Error::Template(
                    "the chat template does not show the final assistant message verbatim,                      so it cannot be continued"
                        .into(),
                )
            })?;
        Ok(text[..end].to_string())
    }

    fn render_raw(&self, messages: &[Message], opts: &RenderOptions) -> Result<String> {
        let add_generation_prompt = opts.add_generation_prompt;
        let input: usize = messages.iter().map(|m| m.content.len()).sum::<usize>()
            + opts.tools.map_or(0, |t| t.to_string().len());
        let count = messages.len();
        let messages: Vec<Value> = messages.iter().map(message_value).collect();
        let tools = opts.tools.map(|t| Value::from(minijinja::value::Serde(t)));
        let base = context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone(),
            eos_token => self.eos_token.clone(),
        };
        // `tools` is left undefined without tools, as templates test it both ways.
        let ctx = match tools {
            Some(tools) => context! { tools => tools, ..base },
            None => base,
        };
        // The budget grows with the conversation; it also bounds the bytes the template
        // may allocate (minijinja charges every byte a string operation produces), so
        // a template that doubles a string in a variable stops before it holds much.
        let fuel = TEMPLATE_FUEL
            .saturating_add(TEMPLATE_FUEL_PER_BYTE.saturating_mul(input as u64))
            .saturating_add(TEMPLATE_FUEL_PER_MESSAGE.saturating_mul(count as u64));
        let mut env = self.env.clone();
        env.set_fuel(Some(fuel));
        let tmpl = env
            .get_template(NAME)
            .map_err(|e| Error::Template(describe(&e)))?;
        let limit = TEMPLATE_OUTPUT_BASE + TEMPLATE_OUTPUT_FACTOR * input;
        let mut out = CappedWriter {
            buf: Vec::new(),
            limit,
        };
        let rendered = tmpl.render_captured_to(ctx, &mut out).map(drop);
        match rendered {
            Ok(()) => String::from_utf8(out.buf)
                .map_err(|_| Error::Template("the chat template wrote invalid UTF-8".into())),
            Err(_) if out.buf.len() >= limit => Err(Error::Template(format!(
                "the chat template's output passed {limit} bytes ({TEMPLATE_OUTPUT_BASE} plus \
                 {TEMPLATE_OUTPUT_FACTOR} times the {input} bytes of the messages)"
            ))),
            Err(e) => Err(Error::Template(describe(&e))),
        }
    }

    /// Whether a built-in template stands in for the model's.
    pub fn is_fallback(&self) -> bool {
        self.fallback_reason.is_some()
    }

    /// Why a built-in template stands in, if one does.
    pub fn fallback_reason(&self) -> Option<&str> {
        self.fallback_reason.as_deref()
    }

    /// Which template runs.
    pub fn kind(&self) -> TemplateKind {
        self.kind
    }

    /// The Jinja source that runs.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The text of the BOS token the template sees as `bos_token`.
    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }

    /// The text of the EOS token the template sees as `eos_token`.
    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }
}

/// A minijinja error with its chain of causes, on one line.
fn describe(e: &minijinja::Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(cause) = src {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        src = cause.source();
    }
    s
}

/// The fuel of one render of a chat template, before it grows with the conversation:
/// one unit per template instruction, and one per 64 bytes that string operations
/// produce (minijinja's accounting). So a render with no messages may run 2 million
/// instructions or build 128 MiB of strings, and a runaway template stops within a
/// fraction of a second. Real templates spend a few dozen instructions per message.
pub const TEMPLATE_FUEL: u64 = 2_000_000;
/// Fuel added per byte of the messages (each byte may be copied 64 times) ...
pub const TEMPLATE_FUEL_PER_BYTE: u64 = 1;
/// ... and per message (a thousand instructions each).
pub const TEMPLATE_FUEL_PER_MESSAGE: u64 = 1_000;

/// A render writes at most this many bytes plus [`TEMPLATE_OUTPUT_FACTOR`] times the
/// messages' own: real templates write each message once with a few dozen bytes
/// around it, so a template that writes far more is broken or hostile.
pub const TEMPLATE_OUTPUT_BASE: usize = 1 << 20;
pub const TEMPLATE_OUTPUT_FACTOR: usize = 4;

/// Collects a render's output and fails once it would pass `limit` bytes.
struct CappedWriter {
    buf: Vec<u8>,
    limit: usize,
}

impl std::io::Write for CappedWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + data.len() > self.limit {
            self.buf
                .extend_from_slice(&data[..self.limit - self.buf.len()]);
            return Err(std::io::Error::other("chat template output limit"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    // As `transformers` renders chat templates.
    if let Ok(syntax) = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()
    {
        env.set_syntax(syntax);
    }
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    // Templates come from model files: a render may run at most this many template
    // instructions, so a template that loops (nearly) forever fails instead of hanging
    // `generate` or keeping `serve` from listening.
    env.set_fuel(Some(TEMPLATE_FUEL));
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env.add_filter("tojson", tojson);
    env
}

fn raise_exception(msg: String) -> Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(
        ErrorKind::InvalidOperation,
        format!("{RAISED}{msg}"),
    ))
}

fn strftime_now(format: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    strftime_utc(&format, secs)
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// (year, month 1-12, day 1-31) of a count of days since 1970-01-01, in the
/// proleptic Gregorian calendar: 400-year eras of 146097 days, counted from
/// 0000-03-01 so that the leap day ends each year.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468; // days from 0000-03-01
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // day of era, 0..=146096
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // year of era, 0..=399
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // day of year from March 1st
    let mp = (5 * doy + 2) / 153; // month from March, 0..=11
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The subset of C `strftime` that chat templates use, in UTC: `%Y %y %m %d
/// %e %H %M %S %b %B %a %A %j %%`; other directives are kept as written.
fn strftime_utc(format: &str, secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let jan1 = {
        // days since the epoch of January 1st of `y`
        let mut lo = days - 366;
        while civil_from_days(lo).0 < y {
            lo += 1;
        }
        lo
    };
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let Some(spec) = chars.next() else {
            out.push('%');
            break;
        };
        let month = MONTHS[(m - 1) as usize];
        match spec {
            'Y' => out.push_str(&y.to_string()),
            'y' => out.push_str(&format!("{:02}", y.rem_euclid(100))),
            'm' => out.push_str(&format!("{m:02}")),
            'd' => out.push_str(&format!("{d:02}")),
            'e' => out.push_str(&format!("{d:2}")),
            'H' => out.push_str(&format!("{:02}", tod / 3600)),
            'M' => out.push_str(&format!("{:02}", tod / 60 % 60)),
            'S' => out.push_str(&format!("{:02}", tod % 60)),
            'b' => out.push_str(&month[..3]),
            'B' => out.push_str(month),
            'a' => out.push_str(&WEEKDAYS[weekday][..3]),
            'A' => out.push_str(WEEKDAYS[weekday]),
            'j' => out.push_str(&format!("{:03}", days - jan1 + 1)),
            '%' => out.push('%'),
            other => {
                out.push('%');
                out.push(other);
            }
        }
    }
    out
}

/// `tojson` as `transformers` defines it: `json.dumps(value,
/// ensure_ascii=False, indent=indent, sort_keys=sort_keys)`.
fn tojson(value: &Value, indent: Option<Value>, kwargs: Kwargs) -> Result<Value, minijinja::Error> {
    let indent = match indent.or(kwargs.get::<Option<Value>>("indent")?) {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => Some(usize::try_from(v.clone()).map_err(|_| {
            minijinja::Error::new(
                ErrorKind::InvalidOperation,
                "tojson: indent must be an integer",
            )
        })?),
    };
    let sort_keys: bool = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    // `separators` and `ensure_ascii` are accepted and ignored.
    let _ = kwargs.get::<Option<Value>>("separators")?;
    let _ = kwargs.get::<Option<Value>>("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_json(&mut out, value, indent, sort_keys, 0)?;
    Ok(Value::from_safe_string(out))
}

fn write_json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

fn newline(out: &mut String, indent: Option<usize>, depth: usize) {
    if let Some(n) = indent {
        out.push('\n');
        for _ in 0..n * depth {
            out.push(' ');
        }
    }
}

fn write_json(
    out: &mut String,
    v: &Value,
    indent: Option<usize>,
    sort_keys: bool,
    depth: usize,
) -> Result<(), minijinja::Error> {
    if depth > 64 {
        return Err(minijinja::Error::new(
            ErrorKind::InvalidOperation,
            "tojson: value nested too deeply",
        ));
    }
    let (item_sep, key_sep) = if indent.is_some() {
        (",", ": ")
    } else {
        (", ", ": ")
    };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if let Some(i) = v.as_i64() {
                out.push_str(&i.to_string());
            } else {
                let f = f64::try_from(v.clone()).unwrap_or(f64::NAN);
                if f.is_finite() {
                    // Python writes floats with a fraction or an exponent.
                    let s = format!("{f:?}");
                    out.push_str(&s);
                } else if f.is_nan() {
                    out.push_str("NaN");
                } else {
                    out.push_str(if f > 0.0 { "Infinity" } else { "-Infinity" });
                }
            }
        }
        ValueKind::String => write_json_str(out, v.as_str().unwrap_or_default()),
        ValueKind::Map => {
            let mut keys: Vec<Value> = v.try_iter()?.collect();
            if sort_keys {
                keys.sort();
            }
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, indent, depth + 1);
                match k.as_str() {
                    Some(s) => write_json_str(out, s),
                    None => write_json_str(out, &k.to_string()),
                }
                out.push_str(key_sep);
                write_json(out, &v.get_item(k)?, indent, sort_keys, depth + 1)?;
            }
            newline(out, indent, depth);
            out.push('}');
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, indent, depth + 1);
                write_json(out, item, indent, sort_keys, depth + 1)?;
            }
            newline(out, indent, depth);
            out.push(']');
        }
        _ => write_json_str(out, &v.to_string()),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// A real test model, fetched by the project's own fetch code on first use.
    fn model_path(id: &str) -> PathBuf {
        let dir = kvmerger_assets::data_dir(None);
        kvmerger_assets::fetch(id, &dir, &kvmerger_assets::NoProgress)
            .unwrap_or_else(|e| panic!("could not fetch test model {id}: {e}"))
    }

    fn load(id: &str) -> ChatTemplate {
        let path = model_path(id);
        ChatTemplate::from_gguf(&GgufFile::open(&path).expect("open gguf"))
    }

    fn convo() -> Vec<Message> {
        vec![
            Message::system("You are terse."),
            Message::user("What is 2+2?"),
        ]
    }

    const CHATML_EXPECTED: &str =
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n";

    #[test]
    fn tokenizer_chat_builtins_render() {
        let t = ChatTemplate::builtin(TemplateKind::ChatMl, "", "");
        assert_eq!(t.render(&convo(), true).unwrap(), CHATML_EXPECTED);
        assert_eq!(
            t.render(&[Message::user("x")], false).unwrap(),
            "<|im_start|>user\nx<|im_end|>\n"
        );
        let g = ChatTemplate::builtin(TemplateKind::Gemma, "<bos>", "<eos>");
        let mut msgs = convo();
        msgs.push(Message::assistant(" 4 "));
        msgs.push(Message::user("Thanks"));
        assert_eq!(
            g.render(&msgs, true).unwrap(),
            "<bos><start_of_turn>user\nYou are terse.\n\nWhat is 2+2?<end_of_turn>\n\
             <start_of_turn>model\n4<end_of_turn>\n<start_of_turn>user\nThanks<end_of_turn>\n<start_of_turn>model\n"
        );
    }

    /// A template from a model file that loops (nearly) forever runs out of its
    /// instruction budget: loading falls back to a built-in template at once, and a
    /// render is an error, never a hang.
    #[test]
    fn a_runaway_chat_template_stops_on_its_instruction_budget() {
        let src = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{{ messages[0].content }}";
        let t0 = std::time::Instant::now();
        let t = ChatTemplate::or_fallback(Some(src), "", "", |_| false);
        assert!(t.is_fallback());
        let reason = t.fallback_reason().unwrap();
        assert!(reason.contains("fuel"), "{reason}");
        let direct = ChatTemplate::new(src, "", "").unwrap();
        assert!(direct.render(&convo(), true).is_err());
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(30),
            "{:?}",
            t0.elapsed()
        );
        // A real template with a long conversation stays within the budget.
        let long: Vec<Message> = (0..2000)
            .map(|i| Message::user(format!("message {i}")))
            .collect();
        let chatml = ChatTemplate::builtin(TemplateKind::ChatMl, "", "");
        assert!(chatml.render(&long, true).unwrap().contains("message 1999"));
    }

    /// A template that builds a huge string in a variable without writing it (doubled
    /// forty times: terabytes) stops on its fuel, which minijinja charges per byte
    /// produced, before it holds more than about 128 MiB; long real conversations
    /// still render.
    #[test]
    fn a_chat_template_that_doubles_a_string_stops_on_its_fuel() {
        let src = "{% set ns = namespace(s='xxxxxxxx') %}{% for i in range(40) %}\
                   {% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s | length }}";
        let t0 = std::time::Instant::now();
        let t = ChatTemplate::new(src, "", "").unwrap();
        let e = t.render(&convo(), true).unwrap_err().to_string();
        assert!(e.contains("fuel"), "{e}");
        assert!(t0.elapsed() < std::time::Duration::from_secs(10));
        // Twenty doublings (8 MiB) are within the budget: the limit is on size, not
        // on the construct.
        let ok = src.replace("range(40)", "range(20)");
        let t = ChatTemplate::new(&ok, "", "").unwrap();
        assert_eq!(t.render(&convo(), true).unwrap(), (8u64 << 20).to_string());
        // A long conversation through real templates: 20,000 messages, 24 MiB.
        let long: Vec<Message> = (0..20_000)
            .map(|i| Message::user(format!("message {i} {}", "z".repeat(1200))))
            .collect();
        for kind in [TemplateKind::ChatMl, TemplateKind::Gemma] {
            let t = ChatTemplate::builtin(kind, "", "");
            assert!(t.render(&long, true).unwrap().contains("message 19999"));
        }
    }

    /// A template that writes without bound (a loop printing a 100 MB string) stops
    /// at its output limit with an error that says so, and loading falls back.
    #[test]
    fn a_chat_template_that_writes_without_bound_stops_at_its_output_limit() {
        let src = "{% for i in range(100000) %}{{ 'x' * 100000000 }}{% endfor %}";
        let t = ChatTemplate::new(src, "", "").unwrap();
        let e = t.render(&convo(), true).unwrap_err().to_string();
        assert!(e.contains("output passed"), "{e}");
        let t = ChatTemplate::or_fallback(Some(src), "", "", |_| false);
        assert!(t.is_fallback());
        // Long conversations are far within the limit.
        let big = "y".repeat(3 << 20);
        let chatml = ChatTemplate::builtin(TemplateKind::ChatMl, "", "");
        assert!(chatml.render(&[Message::user(big)], true).is_ok());
    }

    #[test]
    fn tokenizer_chat_fallbacks_say_so() {
        let t = ChatTemplate::or_fallback(None, "", "", |_| false);
        assert!(t.is_fallback());
        assert_eq!(t.kind(), TemplateKind::ChatMl);
        let t = ChatTemplate::or_fallback(Some("{% for %}"), "", "", |t| t.ends_with("_of_turn>"));
        assert!(t.is_fallback());
        assert_eq!(t.kind(), TemplateKind::Gemma);
        assert!(
            t.fallback_reason().unwrap().contains("does not compile"),
            "{:?}",
            t.fallback_reason()
        );
        let t =
            ChatTemplate::or_fallback(Some("{{ messages | no_such_filter }}"), "", "", |_| false);
        assert!(
            t.is_fallback(),
            "a template that fails to render falls back"
        );
        let e = ChatTemplate::new("{% if %}", "", "")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("chat template:"), "{e}");
        // A deliberate refusal keeps the template, and render reports it.
        let src = "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system role') }}\
                   {% endif %}{{ m.content }}{% endfor %}";
        let t = ChatTemplate::or_fallback(Some(src), "", "", |_| false);
        assert!(!t.is_fallback());
        let e = t.render(&convo(), true).unwrap_err().to_string();
        assert!(e.contains("no system role"), "{e}");
    }

    #[test]
    fn tokenizer_chat_helpers() {
        let t = ChatTemplate::new(
            "{{ {'b': [1, 2.5, none, true], 'a': 'x\"\\n'} | tojson }}|{{ [1] | tojson(indent=2) }}|\
             {{ '  hi  '.strip() }}|{% for i in range(5) %}{% if i == 3 %}{% break %}{% endif %}{{ i }}{% endfor %}|\
             {{ strftime_now('%Y') | length }}",
            "",
            "",
        )
        .unwrap();
        assert_eq!(
            t.render(&[], false).unwrap(),
            "{\"b\": [1, 2.5, null, true], \"a\": \"x\\\"\\n\"}|[\n  1\n]|hi|012|4"
        );
        assert_eq!(
            strftime_utc("%d %b %Y %H:%M:%S %A %j", 0),
            "01 Jan 1970 00:00:00 Thursday 001"
        );
        assert_eq!(strftime_utc("%Y-%m-%d %a", 1_709_251_200), "2024-03-01 Fri");
        assert_eq!(
            strftime_utc("%B %e, %y %j %%", 1_735_603_200),
            "December 31, 24 366 %"
        );
    }

    #[test]
    fn tokenizer_chat_jinja_features_templates_use() {
        let src = "{% set ns = namespace(sys=none, n=0) %}\
            {% if messages[0].role == 'system' %}{% set ns.sys = messages[0].content %}{% set rest = messages[1:] %}\
            {% else %}{% set rest = messages %}{% endif %}\
            {% macro turn(role, text) %}[{{ role | upper }}] {{ text }}{% endmacro %}\
            {% for m in rest %}{% if (m.role == 'user') != (loop.index0 % 2 == 0) %}\
            {{ raise_exception('roles must alternate') }}{% endif %}\
            {% set ns.n = ns.n + 1 %}{{ turn(m.role, m.content.strip()) }}{% if not loop.last %} {% endif %}\
            {% endfor %}{% if ns.sys is not none and ns.sys.startswith('Be') %} sys={{ ns.sys | length }}{% endif %}\
            {% for k, v in {'x': 1}.items() %} {{ k }}={{ v }}{% endfor %} n={{ ns.n }}\
            {% if m is defined %}!{% endif %}{% if tools is not defined %} no-tools{% endif %}";
        let t = ChatTemplate::new(src, "", "").unwrap();
        let msgs = [
            Message::system("Be brief"),
            Message::user(" hi "),
            Message::assistant("yo"),
        ];
        assert_eq!(
            t.render(&msgs, false).unwrap(),
            "[USER] hi [ASSISTANT] yo sys=8 x=1 n=2 no-tools"
        );
        let e = t
            .render(&[Message::assistant("x")], false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("roles must alternate"), "{e}");
    }

    #[test]
    fn tokenizer_chat_from_tokenizer_config() {
        let dir = std::env::temp_dir().join(format!("kvmerger-chat-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokenizer_config.json");
        std::fs::write(
            &path,
            r#"{"bos_token": {"content": "<s>"}, "eos_token": "</s>",
                "chat_template": [{"name": "default", "template": "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}{{ eos_token }}"}]}"#,
        )
        .unwrap();
        let t = ChatTemplate::from_tokenizer_config(&path);
        assert!(!t.is_fallback(), "{:?}", t.fallback_reason());
        assert_eq!(
            t.render(&[Message::user("a"), Message::assistant("b")], false)
                .unwrap(),
            "<s>ab</s>"
        );
        std::fs::write(&path, r#"{"added_tokens_decoder": {"105": {"content": "<start_of_turn>"}, "106": {"content": "<end_of_turn>"}}}"#).unwrap();
        let t = ChatTemplate::from_tokenizer_config(&path);
        assert_eq!((t.is_fallback(), t.kind()), (true, TemplateKind::Gemma));
        let t = ChatTemplate::from_tokenizer_config(&dir.join("absent.json"));
        assert_eq!((t.is_fallback(), t.kind()), (true, TemplateKind::ChatMl));
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn tokenizer_chat_smollm2_renders_chatml() {
        let t = load("smollm2-135m");
        assert!(!t.is_fallback(), "{:?}", t.fallback_reason());
        assert_eq!(t.render(&convo(), true).unwrap(), CHATML_EXPECTED);
        // Without a system message it adds its own.
        let s = t.render(&[Message::user("Hi")], false).unwrap();
        assert_eq!(
            s,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nHi<|im_end|>\n"
        );
    }

    #[test]
    fn tokenizer_chat_qwen25_renders_chatml() {
        let t = load("qwen2.5-0.5b");
        assert!(!t.is_fallback(), "{:?}", t.fallback_reason());
        assert_eq!(t.bos_token(), "<|endoftext|>");
        assert_eq!(t.eos_token(), "<|im_end|>");
        assert_eq!(t.render(&convo(), true).unwrap(), CHATML_EXPECTED);
        let s = t
            .render(&[Message::user("Hi"), Message::assistant("Hello!")], false)
            .unwrap();
        assert_eq!(
            s,
            "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n\
             <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        );
    }

    #[test]
    fn tokenizer_chat_gemma3_renders_turns() {
        let t = load("gemma3-270m");
        // This file carries no tokenizer.chat_template: the built-in Gemma
        // format stands in.
        assert_eq!(t.kind(), TemplateKind::Gemma);
        assert!(t.is_fallback());
        assert_eq!(
            t.render(&convo(), true).unwrap(),
            "<bos><start_of_turn>user\nYou are terse.\n\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n"
        );
    }

    /// A template in the style of Qwen2.5's: tools in the system turn, calls with
    /// `tojson`, tool answers in a user turn.
    const TOOLS_TEMPLATE: &str = "{%- if tools %}<|im_start|>system\nTools:{% for t in tools %}\n{{ t | tojson }}{% endfor %}<|im_end|>\n{%- endif %}\
{%- for m in messages %}{%- if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant\n{% for c in m.tool_calls %}<tool_call>{\"name\": \"{{ c.function.name }}\", \"arguments\": {{ c.function.arguments | tojson }}}</tool_call>{% endfor %}<|im_end|>\n\
{%- elif m.role == 'tool' %}<|im_start|>user\n<tool_response>{{ m.content }}</tool_response><|im_end|>\n\
{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endif %}{%- endfor %}\
{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}";

    #[test]
    fn tools_and_tool_calls_reach_the_template() {
        let t = ChatTemplate::new(TOOLS_TEMPLATE, "", "").unwrap();
        let tools = serde_json::json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]);
        let mut call = Message::assistant("");
        call.tool_calls = Some(serde_json::json!([{"id": "c1", "type": "function",
            "function": {"name": "f", "arguments": {"x": 1}}}]));
        let mut answer = Message::new("tool", "42");
        answer.tool_call_id = Some("c1".into());
        let msgs = [Message::user("go"), call, answer];
        let text = t
            .render_with(
                &msgs,
                &RenderOptions {
                    add_generation_prompt: true,
                    tools: Some(&tools),
                    ..Default::default()
                },
            )
            .unwrap();
        // The tool as JSON (its keys' order depends on serde_json's features).
        let shown = text
            .split_once("Tools:")
            .and_then(|(_, rest)| rest.split_once("<|im_end|>"))
            .map(|(json, _)| json)
            .unwrap_or_else(|| panic!("{text}"));
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(shown).unwrap(),
            tools[0],
            "{text}"
        );
        assert!(
            text.contains(r#"<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>"#),
            "{text}"
        );
        assert!(text.contains("<tool_response>42</tool_response>"), "{text}");
        assert!(text.ends_with("<|im_start|>assistant"), "{text}");
        // Without tools the section is absent.
        let plain = t.render(&msgs[..1], true).unwrap();
        assert!(!plain.contains("Tools:"), "{plain}");
    }

    #[test]
    fn a_final_assistant_message_is_continued_not_closed() {
        let t = ChatTemplate::builtin(TemplateKind::ChatMl, "", "");
        let msgs = [
            Message::user("List colours."),
            Message::assistant("Red, yellow,"),
        ];
        let cont = RenderOptions {
            continue_final_message: true,
            ..Default::default()
        };
        let text = t.render_with(&msgs, &cont).unwrap();
        assert!(
            text.ends_with("<|im_start|>assistant\nRed, yellow,"),
            "{text}"
        );
        // The same conversation closed and a new turn opened, for contrast.
        let closed = t.render(&msgs, true).unwrap();
        assert!(closed.starts_with(&text) && closed.len() > text.len());
        // Nothing to continue: a clear error.
        for bad in [
            &msgs[..1],
            &[Message::user("x"), Message::assistant("  ")][..],
        ] {
            let e = t.render_with(bad, &cont).unwrap_err();
            assert!(e.to_string().contains("final assistant message"), "{e}");
        }
        let both = RenderOptions {
            continue_final_message: true,
            add_generation_prompt: true,
            ..Default::default()
        };
        assert!(t.render_with(&msgs, &both).is_err());
    }
}
