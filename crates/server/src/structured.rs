//! Structured outputs and tool calls: `response_format` (JSON object, JSON schema) and
//! `tools` / `tool_choice`, enforced while sampling by llguidance (the constrained
//! decoding library llama.cpp and vLLM use), and tool calls parsed out of the text.
//!
//! The tokenizer's vocabulary becomes llguidance's token trie once per server, on the
//! first request that needs it. Each constrained request gets its own matcher; the
//! decoder asks it for a mask before every sample (see
//! [`kvmerger_engine::generate::TokenConstraint`]). Requests without a constraint
//! never touch any of this.

use crate::error::ApiError;
use kvmerger_engine::generate::TokenConstraint;
use kvmerger_engine::load::LoadedModel;
use kvmerger_engine::tokenizer::TokenType;
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

/// The model's vocabulary as llguidance sees it, and the compiled-grammar factory.
pub struct Grammars {
    factory: OnceLock<Result<Arc<ParserFactory>, String>>,
}

/// llguidance's view of the tokenizer: each token's bytes (control tokens marked as
/// special, so that text can never spell them) and our own encoder.
struct Vocabulary {
    trie: TokTrie,
    lm: Arc<LoadedModel>,
}

impl TokenizerEnv for Vocabulary {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        let text = String::from_utf8_lossy(s);
        self.lm
            .tokenizer
            .encode(&text, false)
            .unwrap_or_else(|_| self.trie.greedy_tokenize(s))
    }
}

impl Default for Grammars {
    fn default() -> Self {
        Grammars {
            factory: OnceLock::new(),
        }
    }
}

impl Grammars {
    /// The grammar factory for `lm`, built on first use (a few hundred milliseconds for
    /// a 150k vocabulary).
    pub fn factory(&self, lm: &Arc<LoadedModel>) -> Result<Arc<ParserFactory>, ApiError> {
        self.factory
            .get_or_init(|| build_factory(lm).map(Arc::new))
            .clone()
            .map_err(|e| {
                ApiError::internal(format!(
                    "structured outputs are unavailable for this model: {e}"
                ))
            })
    }

    /// A constraint for `grammar`, or a 400 naming `param` when it does not compile.
    pub fn constraint(
        &self,
        lm: &Arc<LoadedModel>,
        grammar: TopLevelGrammar,
        param: &str,
    ) -> Result<Llg, ApiError> {
        let factory = self.factory(lm)?;
        let parser = factory
            .create_parser(grammar)
            .map_err(|e| ApiError::param(param, format!("cannot be enforced: {e}")))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(ApiError::param(param, format!("cannot be enforced: {e}")));
        }
        Ok(Llg {
            matcher,
            stops: lm.tokenizer.stop_ids().to_vec(),
            eos: factory.tok_env().tok_trie().eos_token(),
            mask_nanos: Arc::new(AtomicU64::new(0)),
            masks: Arc::new(AtomicU64::new(0)),
        })
    }
}

fn build_factory(lm: &Arc<LoadedModel>) -> Result<ParserFactory, String> {
    let tok = &lm.tokenizer;
    let n = lm.model.cfg.vocab.max(tok.vocab_size());
    let mut words = Vec::with_capacity(n);
    for id in 0..n as u32 {
        let bytes = tok.token_bytes(id).unwrap_or(&[]);
        let word = match tok.token_type(id) {
            Some(TokenType::Control) => {
                let mut w = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                w.extend_from_slice(bytes);
                w
            }
            Some(TokenType::Unused) | None => Vec::new(),
            _ => bytes.to_vec(),
        };
        words.push(word);
    }
    let stops = tok.stop_ids();
    let eos = *stops
        .first()
        .ok_or("the tokenizer has no end-of-sequence token")?;
    let info = TokRxInfo::new(n as u32, eos);
    let trie = TokTrie::from(&info, &words).with_eos_tokens(stops);
    let env: TokEnv = Arc::new(Vocabulary {
        trie,
        lm: lm.clone(),
    });
    let mut f = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
    f.quiet();
    Ok(f)
}

/// One request's llguidance matcher, as the decoder's [`TokenConstraint`].
pub struct Llg {
    matcher: Matcher,
    stops: Vec<u32>,
    eos: u32,
    /// Time spent in llguidance (masks, applying them, advancing the parser with each
    /// drawn token), and how many masks (for the log and the docs' cost).
    pub mask_nanos: Arc<AtomicU64>,
    pub masks: Arc<AtomicU64>,
}

impl TokenConstraint for Llg {
    fn mask(&mut self, logits: &mut [f32]) -> Result<(), String> {
        let t0 = Instant::now();
        let m = self.matcher.compute_mask().map_err(|e| e.to_string())?;
        let eos_ok = m.is_allowed(self.eos);
        // 32 tokens a word: most words allow none (or all) of theirs.
        for (w, chunk) in m.as_slice().iter().zip(logits.chunks_mut(32)) {
            match *w {
                u32::MAX => {}
                0 => chunk.fill(f32::NEG_INFINITY),
                w => {
                    for (b, l) in chunk.iter_mut().enumerate() {
                        if w >> b & 1 == 0 {
                            *l = f32::NEG_INFINITY;
                        }
                    }
                }
            }
        }
        // Logits past the mask's words (none when the sizes agree) are not allowed.
        let covered = m.as_slice().len() * 32;
        if logits.len() > covered {
            logits[covered..].fill(f32::NEG_INFINITY);
        }
        for &s in &self.stops {
            if let Some(l) = logits.get_mut(s as usize) {
                if !eos_ok {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
        self.mask_nanos
            .fetch_add(t0.elapsed().as_nanos() as u64, Relaxed);
        self.masks.fetch_add(1, Relaxed);
        Ok(())
    }

    fn accept(&mut self, token: u32) -> Result<(), String> {
        let t0 = Instant::now();
        let r = self.matcher.consume_token(token).map_err(|e| e.to_string());
        self.mask_nanos
            .fetch_add(t0.elapsed().as_nanos() as u64, Relaxed);
        r
    }

    fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }

    fn fork(&self) -> Box<dyn TokenConstraint> {
        Box::new(Llg {
            matcher: self.matcher.deep_clone(),
            stops: self.stops.clone(),
            eos: self.eos,
            mask_nanos: self.mask_nanos.clone(),
            masks: self.masks.clone(),
        })
    }
}

/// `schema` with llguidance's JSON layout set, unless the schema sets its own: one
/// line, `", "` and `": "` between items. Free whitespace lets a small model pad
/// forever instead of writing the next required key.
fn compact(mut schema: Value) -> Value {
    if let Some(o) = schema.as_object_mut() {
        o.entry("x-guidance").or_insert_with(
            || json!({"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": false}),
        );
    }
    schema
}

/// `response_format`: None for text, else the grammar it asks for.
pub fn response_format(v: Option<&Value>) -> Result<Option<TopLevelGrammar>, ApiError> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let kind = v.get("type").and_then(Value::as_str).ok_or_else(|| {
        ApiError::param(
            "response_format.type",
            "response_format needs a type: text, json_object or json_schema",
        )
    })?;
    match kind {
        "text" => Ok(None),
        "json_object" => Ok(Some(TopLevelGrammar::from_json_schema(compact(
            json!({"type": "object"}),
        )))),
        "json_schema" => {
            let schema = v
                .get("json_schema")
                .and_then(|s| s.get("schema"))
                .filter(|s| s.is_object() || s.is_boolean())
                .ok_or_else(|| {
                    ApiError::param(
                        "response_format.json_schema.schema",
                        "a json_schema response format needs json_schema.schema, a JSON schema object",
                    )
                })?;
            Ok(Some(TopLevelGrammar::from_json_schema(compact(
                schema.clone(),
            ))))
        }
        other => Err(ApiError::param(
            "response_format.type",
            format!("unknown response_format type '{other}' (expected text, json_object or json_schema)"),
        )),
    }
}

/// A function the request offers: its name and its parameters' schema.
#[derive(Clone, Debug)]
pub struct Tool {
    pub name: String,
    pub parameters: Value,
}

/// How the model writes a tool call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToolFormat {
    /// `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>` (Qwen2.5,
    /// Hermes): templates whose text mentions `<tool_call>`.
    Tagged,
    /// A bare JSON object `{"name": ..., "arguments": {...}}` (others; the tools are
    /// described in a system message when the template does not render them).
    Json,
}

impl ToolFormat {
    pub fn of(template_source: &str) -> ToolFormat {
        if template_source.contains("<tool_call>") {
            ToolFormat::Tagged
        } else {
            ToolFormat::Json
        }
    }
}

/// `tools`, checked: each `{"type": "function", "function": {"name", "parameters"}}`.
pub fn tools(v: &[Value]) -> Result<Vec<Tool>, ApiError> {
    let mut out: Vec<Tool> = Vec::with_capacity(v.len());
    for (i, t) in v.iter().enumerate() {
        let p = format!("tools.{i}");
        if t.get("type").and_then(Value::as_str) != Some("function") {
            return Err(ApiError::param(
                format!("{p}.type"),
                "only tools of type 'function' are supported",
            ));
        }
        let f = t.get("function").filter(|f| f.is_object()).ok_or_else(|| {
            ApiError::param(format!("{p}.function"), "a tool needs a function object")
        })?;
        let name = f
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty() && n.len() <= 64)
            .ok_or_else(|| {
                ApiError::param(
                    format!("{p}.function.name"),
                    "a function needs a name (1 to 64 characters)",
                )
            })?;
        if out.iter().any(|o| o.name == name) {
            return Err(ApiError::param(
                format!("{p}.function.name"),
                format!("two tools are named '{name}'"),
            ));
        }
        let parameters = match f.get("parameters") {
            None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
            Some(s) if s.is_object() => s.clone(),
            Some(_) => {
                return Err(ApiError::param(
                    format!("{p}.function.parameters"),
                    "parameters must be a JSON schema object",
                ))
            }
        };
        out.push(Tool {
            name: name.to_string(),
            parameters,
        });
    }
    Ok(out)
}

/// What `tool_choice` asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToolChoice {
    None,
    Auto,
    Required,
    Named(String),
}

pub fn tool_choice(v: Option<&Value>, tools: &[Tool]) -> Result<ToolChoice, ApiError> {
    let default = if tools.is_empty() {
        ToolChoice::None
    } else {
        ToolChoice::Auto
    };
    let choice = match v {
        None | Some(Value::Null) => default,
        Some(Value::String(s)) => match s.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            other => {
                return Err(ApiError::param(
                    "tool_choice",
                    format!("unknown tool_choice '{other}' (expected none, auto, required or {{\"type\": \"function\", \"function\": {{\"name\": ...}}}})"),
                ))
            }
        },
        Some(o) => {
            let name = o
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    ApiError::param(
                        "tool_choice.function.name",
                        "a named tool_choice is {\"type\": \"function\", \"function\": {\"name\": ...}}",
                    )
                })?;
            ToolChoice::Named(name.to_string())
        }
    };
    match &choice {
        ToolChoice::Required | ToolChoice::Named(_) if tools.is_empty() => Err(ApiError::param(
            "tool_choice",
            "tool_choice asks for a tool call, but the request has no tools",
        )),
        ToolChoice::Named(n) if !tools.iter().any(|t| &t.name == n) => Err(ApiError::param(
            "tool_choice.function.name",
            format!("no tool is named '{n}'"),
        )),
        _ => Ok(choice),
    }
}

/// The schema of one call to any of `tools`: `{"name": <one of them>, "arguments": {...}}`.
fn call_schema(tools: &[&Tool]) -> Value {
    let one = |t: &Tool| {
        json!({
            "type": "object",
            "properties": {"name": {"const": t.name}, "arguments": t.parameters},
            "required": ["name", "arguments"],
            "additionalProperties": false,
        })
    };
    match tools {
        [t] => one(t),
        _ => json!({"anyOf": tools.iter().map(|t| one(t)).collect::<Vec<_>>()}),
    }
}

/// The grammar that makes the model call a tool (`required`: any of them; named: that
/// one); None when the model chooses (`auto`) or calls none.
pub fn tool_grammar(
    tools: &[Tool],
    choice: &ToolChoice,
    format: ToolFormat,
) -> Option<TopLevelGrammar> {
    let offered: Vec<&Tool> = match choice {
        ToolChoice::None | ToolChoice::Auto => return None,
        ToolChoice::Required => tools.iter().collect(),
        ToolChoice::Named(n) => tools.iter().filter(|t| &t.name == n).collect(),
    };
    let schema = compact(call_schema(&offered));
    Some(match format {
        ToolFormat::Json => TopLevelGrammar::from_json_schema(schema),
        ToolFormat::Tagged => TopLevelGrammar::from_lark(format!(
            "start: \"<tool_call>\\n\" call \"\\n</tool_call>\"\ncall: %json {schema}\n"
        )),
    })
}

/// How [`tools_system_text`] opens.
const TOOLS_PREAMBLE: &str = "You can call these functions. To call one, answer with only a JSON object {\"name\": <function name>, \"arguments\": <arguments object>}.\n";

/// A system message that describes `tools` to a model whose template does not.
pub fn tools_system_text(tools: &[Tool]) -> String {
    let mut s = String::from(TOOLS_PREAMBLE);
    for t in tools {
        s.push_str(&json!({"name": t.name, "parameters": t.parameters}).to_string());
        s.push('\n');
    }
    s
}

/// A tool call found in the model's text.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolCall {
    pub name: String,
    /// The arguments as a JSON text (OpenAI's `arguments` is a string).
    pub arguments: String,
}

fn call_from(v: &Value, tools: &[Tool]) -> Option<ToolCall> {
    let name = v.get("name")?.as_str()?;
    if !tools.iter().any(|t| t.name == name) {
        return None;
    }
    let args = v.get("arguments").or_else(|| v.get("parameters"))?;
    let arguments = match args {
        Value::String(s) if serde_json::from_str::<Value>(s).is_ok() => s.clone(),
        Value::Object(_) => args.to_string(),
        _ => return None,
    };
    Some(ToolCall {
        name: name.to_string(),
        arguments,
    })
}

/// The text before any tool call (None when blank) and the tool calls in `text`.
/// Text that does not hold a well-formed call to an offered tool is all content.
pub fn parse_tool_calls(
    text: &str,
    tools: &[Tool],
    format: ToolFormat,
) -> (Option<String>, Vec<ToolCall>) {
    let whole = || (Some(text.to_string()), Vec::new());
    if format == ToolFormat::Tagged && text.contains("<tool_call>") {
        return parse_tagged(text, tools).unwrap_or_else(whole);
    }
    // A bare call, also in a Markdown code block (small models write one even when
    // their template asks for tags).
    let t = text.trim();
    let t = t
        .strip_prefix("```json")
        .or_else(|| t.strip_prefix("```"))
        .and_then(|b| b.strip_suffix("```"))
        .unwrap_or(t);
    match serde_json::from_str::<Value>(t.trim())
        .ok()
        .and_then(|v| call_from(&v, tools))
    {
        Some(c) => (None, vec![c]),
        None => whole(),
    }
}

/// `<tool_call>{...}</tool_call>` blocks, after optional text; None unless every block
/// is a well-formed call and nothing follows them.
fn parse_tagged(text: &str, tools: &[Tool]) -> Option<(Option<String>, Vec<ToolCall>)> {
    const OPEN: &str = "<tool_call>";
    const CLOSE: &str = "</tool_call>";
    let first = text.find(OPEN)?;
    let mut calls = Vec::new();
    let mut rest = &text[first..];
    while let Some(body) = rest.strip_prefix(OPEN) {
        let (inside, after) = match body.find(CLOSE) {
            Some(end) => (&body[..end], &body[end + CLOSE.len()..]),
            None => (body, ""),
        };
        let v = serde_json::from_str::<Value>(inside.trim()).ok()?;
        calls.push(call_from(&v, tools)?);
        rest = after.trim_start();
    }
    if !rest.trim().is_empty() {
        return None;
    }
    let before = text[..first].trim();
    Some(((!before.is_empty()).then(|| before.to_string()), calls))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Vec<Tool> {
        tools(&[json!({"type": "function", "function": {"name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}})])
        .unwrap()
    }

    #[test]
    fn tagged_tool_calls_are_parsed_and_anything_else_stays_content() {
        let t = weather();
        let f = ToolFormat::Tagged;
        let (c, calls) = parse_tool_calls(
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>",
            &t,
            f,
        );
        assert_eq!(c, None);
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].name, "get_weather");
        assert_eq!(
            serde_json::from_str::<Value>(&calls[0].arguments).unwrap(),
            json!({"city": "Oslo"})
        );
        // Two calls, text before them, and a missing closing tag at the very end.
        let (c, calls) = parse_tool_calls(
            "Let me check.\n<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"A\"}}</tool_call>\n<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"B\"}}",
            &t,
            f,
        );
        assert_eq!(c.as_deref(), Some("Let me check."));
        assert_eq!(calls.len(), 2);
        // An unknown function, broken JSON, or text after the call: all content.
        for text in [
            "<tool_call>{\"name\": \"nope\", \"arguments\": {}}</tool_call>",
            "<tool_call>{\"name\": \"get_weather\", \"arguments\": </tool_call>",
            "<tool_call>{\"name\": \"get_weather\", \"arguments\": {}}</tool_call> and more",
            "The weather is fine.",
        ] {
            let (c, calls) = parse_tool_calls(text, &t, f);
            assert_eq!(c.as_deref(), Some(text));
            assert!(calls.is_empty(), "{text}");
        }
        let (c, calls) = parse_tool_calls(
            " {\"name\": \"get_weather\", \"parameters\": {\"city\": \"C\"}} ",
            &t,
            ToolFormat::Json,
        );
        assert_eq!((c, calls[0].arguments.as_str()), (None, "{\"city\":\"C\"}"));
        // A bare call in a code block counts in either format.
        let fenced = "```json\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"D\"}}\n```";
        for f in [ToolFormat::Tagged, ToolFormat::Json] {
            let (c, calls) = parse_tool_calls(fenced, &t, f);
            assert_eq!((c, calls.len()), (None, 1));
        }
    }

    #[test]
    fn tools_and_tool_choice_are_checked() {
        let t = weather();
        assert_eq!(tool_choice(None, &t).unwrap(), ToolChoice::Auto);
        assert_eq!(tool_choice(None, &[]).unwrap(), ToolChoice::None);
        assert_eq!(
            tool_choice(
                Some(&json!({"type": "function", "function": {"name": "get_weather"}})),
                &t
            )
            .unwrap(),
            ToolChoice::Named("get_weather".into())
        );
        for (v, param) in [
            (json!("sometimes"), "tool_choice"),
            (
                json!({"type": "function", "function": {"name": "x"}}),
                "tool_choice.function.name",
            ),
            (json!({"type": "function"}), "tool_choice.function.name"),
        ] {
            let e = tool_choice(Some(&v), &t).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{v}");
        }
        assert!(tool_choice(Some(&json!("required")), &[]).is_err());
        for (v, param) in [
            (json!({"type": "retrieval"}), "tools.0.type"),
            (json!({"type": "function"}), "tools.0.function"),
            (
                json!({"type": "function", "function": {"name": ""}}),
                "tools.0.function.name",
            ),
            (
                json!({"type": "function", "function": {"name": "f", "parameters": 3}}),
                "tools.0.function.parameters",
            ),
        ] {
            let e = tools(std::slice::from_ref(&v)).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{v}");
        }
        let dup = json!({"type": "function", "function": {"name": "f"}});
        assert!(tools(&[dup.clone(), dup]).is_err());
    }

    #[test]
    fn response_formats_are_checked() {
        assert!(response_format(None).unwrap().is_none());
        assert!(response_format(Some(&json!({"type": "text"})))
            .unwrap()
            .is_none());
        assert!(response_format(Some(&json!({"type": "json_object"})))
            .unwrap()
            .is_some());
        for (v, param) in [
            (json!({"type": "xml"}), "response_format.type"),
            (json!({}), "response_format.type"),
            (
                json!({"type": "json_schema"}),
                "response_format.json_schema.schema",
            ),
            (
                json!({"type": "json_schema", "json_schema": {"schema": 1}}),
                "response_format.json_schema.schema",
            ),
        ] {
            let e = response_format(Some(&v)).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{v}");
        }
    }
}
