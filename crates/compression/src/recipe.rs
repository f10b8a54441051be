//! A compression recipe: the method with its options, the budget, how the budget is
//! spread over layers, the re-compression margin while decoding, and whether to
//! compress during prefill. One type for every surface (CLI flags, `--compress-config`
//! TOML, the server's `kv_compression` JSON, evaluation grid entries), parsed and
//! validated here, so every surface gives the same errors.
//!
//! The string form is `method[:key=value,...][@budget]`:
//!
//! ```
//! use kvmerger_compression::{Budget, Recipe};
//! let r = Recipe::parse("kvmerger:epsilon=0.6,schedule=pyramid,prefill_chunk=512@0.5").unwrap();
//! assert_eq!(r.method, "kvmerger");
//! assert_eq!(r.budget, Some(Budget::Fraction(0.5)));
//! assert_eq!(r.options.get("epsilon"), Some("0.6"));
//! assert_eq!(r.prefill_chunk, Some(512));
//! assert_eq!(Recipe::parse(&r.to_string()).unwrap(), r);
//! ```
//!
//! The map form (TOML or JSON) has the fields `method`, `budget`, `schedule`,
//! `recompress_margin`, `prefill_chunk` and `options` (a table of method options); any
//! other key is a method option too, so `{"method": "kvmerger", "epsilon": 0.6}` works.

use crate::budget::Budget;
use crate::method::{Method, Options};
use crate::registry;
use crate::schedule::Schedule;
use crate::Error;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// The largest re-compression margin and prefill chunk accepted (tokens).
pub const MAX_RECIPE_TOKENS: usize = 1 << 20;

/// Keys of the map form that are not method options.
pub const RECIPE_FIELDS: &[&str] = &[
    "method",
    "budget",
    "schedule",
    "recompress_margin",
    "prefill_chunk",
    "options",
];

/// A method with its options, budget, layer schedule and when it compresses.
#[derive(Clone, Debug, PartialEq)]
pub struct Recipe {
    pub method: String,
    pub options: Options,
    /// None only for `full`, which needs none.
    pub budget: Option<Budget>,
    pub schedule: Schedule,
    /// While decoding, re-compress once a head passes its budget by this many slots.
    pub recompress_margin: Option<usize>,
    /// Compress during prefill, after every chunk of this many tokens, so the cache
    /// never holds more than the budget plus one chunk.
    pub prefill_chunk: Option<usize>,
}

impl Default for Recipe {
    fn default() -> Self {
        Recipe::full()
    }
}

/// A recipe error with the field it concerns (`budget`, `options.epsilon`, `method`...),
/// so each surface can name it its own way (`--budget`, `kv_compression.budget`).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct RecipeError {
    pub field: String,
    pub message: String,
}

impl RecipeError {
    pub fn new(field: impl Into<String>, message: impl fmt::Display) -> RecipeError {
        RecipeError {
            field: field.into(),
            message: message.to_string(),
        }
    }
}

/// Whether a recipe may name a per-layer ratio file as its schedule. The server never
/// reads files for its clients; it takes the ratios inline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScheduleFiles {
    Read,
    Refuse,
}

/// One value of the map form, from any self-describing format (TOML, JSON).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    List(Vec<Value>),
    Map(BTreeMap<String, Value>),
}

impl Value {
    /// A string, number or boolean as option text (None for lists, tables and null).
    pub fn scalar_text(&self) -> Option<String> {
        match self {
            Value::Bool(b) => Some(b.to_string()),
            Value::Int(i) => Some(i.to_string()),
            // `{:?}` keeps the decimal point: 1.0 stays a fraction, not a token count.
            Value::Float(f) => Some(format!("{f:?}")),
            Value::Str(s) => Some(s.clone()),
            _ => None,
        }
    }
}

impl Recipe {
    /// No compression.
    pub fn full() -> Recipe {
        Recipe {
            method: "full".into(),
            options: Options::new(),
            budget: None,
            schedule: Schedule::Uniform,
            recompress_margin: None,
            prefill_chunk: None,
        }
    }

    /// Whether this recipe can change nothing: `full`, or everything kept everywhere.
    pub fn is_noop(&self) -> bool {
        self.method == "full"
            || matches!(self.budget, None | Some(Budget::Fraction(1.0)))
                && self.schedule == Schedule::Uniform
    }

    /// The string form, `method[:key=value,...][@budget]`, read and validated.
    pub fn parse(text: &str) -> Result<Recipe, RecipeError> {
        let (head, budget) = match text.rsplit_once('@') {
            Some((h, b)) => (h, Some(b)),
            None => (text, None),
        };
        let (name, pairs) = match head.split_once(':') {
            Some((n, p)) => (n, p),
            None => (head, ""),
        };
        let mut r = Recipe::full();
        r.set_method(name)?;
        for pair in pairs.split(',').filter(|p| !p.trim().is_empty()) {
            let (k, v) = pair.split_once('=').ok_or_else(|| {
                RecipeError::new("options", format!("'{pair}' is not of the form key=value"))
            })?;
            r.set(k, v, ScheduleFiles::Read)?;
        }
        if let Some(b) = budget {
            r.set("budget", b, ScheduleFiles::Read)?;
        }
        r.validate()?;
        Ok(r)
    }

    /// Switch to method `name`; the options are per method, so they are dropped when
    /// the method changes.
    pub fn set_method(&mut self, name: &str) -> Result<(), RecipeError> {
        let name = name.trim();
        if registry::info(name).is_none() {
            return Err(RecipeError::new(
                "method",
                Error::UnknownMethod(name.to_string(), registry::names().join(", ")),
            ));
        }
        if name != self.method {
            self.options = Options::new();
            self.method = name.to_string();
        }
        Ok(())
    }

    /// Set one field from text: `method`, `budget`, `schedule`, `recompress_margin`,
    /// `prefill_chunk`, or else a method option.
    pub fn set(&mut self, key: &str, value: &str, files: ScheduleFiles) -> Result<(), RecipeError> {
        let key = key.trim();
        let value = value.trim();
        match key {
            "" => Err(RecipeError::new(
                "options",
                format!("'={value}' has an empty key"),
            )),
            "method" => self.set_method(value),
            "budget" => {
                self.budget = Some(
                    value
                        .parse::<Budget>()
                        .map_err(|e| RecipeError::new("budget", e))?,
                );
                Ok(())
            }
            "schedule" => {
                self.schedule = match files {
                    ScheduleFiles::Read => Schedule::from_name_or_file(value),
                    ScheduleFiles::Refuse => value.parse(),
                }
                .map_err(|e| RecipeError::new("schedule", e))?;
                Ok(())
            }
            "recompress_margin" | "prefill_chunk" => {
                let n = tokens(key, value, key == "prefill_chunk")?;
                if key == "prefill_chunk" {
                    self.prefill_chunk = Some(n);
                } else {
                    self.recompress_margin = Some(n);
                }
                Ok(())
            }
            _ => {
                self.options.set(key, value);
                Ok(())
            }
        }
    }

    /// Lay a map (a TOML table, a JSON object) over this recipe: the fields it names
    /// replace these, and a `null` clears an optional one. Not validated: call
    /// [`Recipe::validate`] once everything is laid.
    pub fn apply(
        &mut self,
        map: &BTreeMap<String, Value>,
        files: ScheduleFiles,
    ) -> Result<(), RecipeError> {
        // The method first: changing it drops the old method's options.
        match map.get("method") {
            None | Some(Value::Null) => {}
            Some(Value::Str(m)) => self.set_method(m)?,
            Some(_) => {
                return Err(RecipeError::new(
                    "method",
                    "method must be a string (the list: `kvmerger methods`)",
                ))
            }
        }
        for (key, v) in map {
            match key.as_str() {
                "method" => {}
                "budget" => match v {
                    Value::Null => self.budget = None,
                    Value::Int(_) | Value::Float(_) | Value::Str(_) => {
                        let text = v.scalar_text().unwrap_or_default();
                        self.set("budget", &text, files)?
                    }
                    _ => {
                        return Err(RecipeError::new(
                            "budget",
                            "budget must be a number (0.5, 2048) or a string (\"35%\")",
                        ))
                    }
                },
                "schedule" => {
                    self.schedule = match v {
                        Value::Null => Schedule::Uniform,
                        Value::Str(s) => {
                            self.set("schedule", s, files)?;
                            continue;
                        }
                        Value::List(items) => {
                            let mut ratios = Vec::with_capacity(items.len());
                            for x in items {
                                match x {
                                    Value::Int(_) | Value::Float(_) => {
                                        ratios.push(x.scalar_text().unwrap_or_default())
                                    }
                                    _ => {
                                        return Err(RecipeError::new(
                                            "schedule",
                                            "schedule ratios must be numbers",
                                        ))
                                    }
                                }
                            }
                            Schedule::parse_ratios(&ratios.join("\n"))
                                .map_err(|e| RecipeError::new("schedule", e))?
                        }
                        _ => {
                            return Err(RecipeError::new(
                                "schedule",
                                "schedule must be \"uniform\", \"pyramid\", \"pyramid:<slope>\" or an array of per-layer ratios",
                            ))
                        }
                    }
                }
                "recompress_margin" | "prefill_chunk" => match v {
                    Value::Null if key == "prefill_chunk" => self.prefill_chunk = None,
                    Value::Null => self.recompress_margin = None,
                    Value::Int(i) => self.set(key, &i.to_string(), files)?,
                    _ => {
                        return Err(RecipeError::new(
                            key.as_str(),
                            format!("{key} must be an integer or null"),
                        ))
                    }
                },
                "options" => match v {
                    Value::Null => {}
                    Value::Map(o) => {
                        for (k, x) in o {
                            self.set_option(&format!("options.{k}"), k, x)?;
                        }
                    }
                    _ => {
                        return Err(RecipeError::new(
                            "options",
                            "options must be a table of method options",
                        ))
                    }
                },
                // Any other key is a method option.
                k => self.set_option(k, k, v)?,
            }
        }
        Ok(())
    }

    fn set_option(&mut self, field: &str, key: &str, v: &Value) -> Result<(), RecipeError> {
        let text = v.scalar_text().ok_or_else(|| {
            RecipeError::new(field, "a method option must be a string, number or boolean")
        })?;
        if RECIPE_FIELDS.contains(&key) {
            return Err(RecipeError::new(
                field,
                format!("'{key}' is a field of the recipe, not a method option"),
            ));
        }
        self.options.set(key, text);
        Ok(())
    }

    /// Build the method, checking everything that can be checked without a model:
    /// the method and its options, that a budget is given, and that the margin and
    /// compression during prefill suit the method.
    pub fn validate(&self) -> Result<Box<dyn Method>, RecipeError> {
        let method = registry::build(&self.method, &self.options).map_err(|e| {
            let field = match e {
                Error::UnknownMethod(..) => "method",
                _ => "options",
            };
            RecipeError::new(field, e)
        })?;
        if self.method == "full" {
            return Ok(method);
        }
        if self.budget.is_none() {
            return Err(RecipeError::new(
                "budget",
                format!(
                    "method '{}' needs a budget: a fraction of the prompt (0.5), a percentage (\"35%\") or a token count per head (2048)",
                    self.method
                ),
            ));
        }
        if self.is_noop() {
            return Ok(method);
        }
        check_timing(
            &self.method,
            method.as_ref(),
            self.recompress_margin,
            self.prefill_chunk,
        )?;
        Ok(method)
    }

    /// The budget as a short text for reports (`0.5`, `2048`, `1` for everything).
    pub fn budget_text(&self) -> String {
        match self.budget {
            None => "1".into(),
            Some(Budget::Fraction(f)) => format!("{f}"),
            Some(Budget::Tokens(t)) => format!("{t}"),
        }
    }
}

/// Whether `method` (named `name`) can re-compress while decoding (`margin`) and
/// compress during prefill (`chunk`): a method that scores with a reconstruction pass
/// over the whole prompt can do neither.
pub fn check_timing(
    name: &str,
    method: &dyn Method,
    margin: Option<usize>,
    chunk: Option<usize>,
) -> Result<(), RecipeError> {
    if !method.needs().reconstruction {
        return Ok(());
    }
    if margin.is_some() {
        return Err(RecipeError::new(
            "recompress_margin",
            format!(
                "{name} scores slots with a reconstruction pass over the prompt, which decoding \
                 does not have: it cannot re-compress while decoding (drop the re-compression margin)"
            ),
        ));
    }
    if chunk.is_some() {
        return Err(RecipeError::new(
            "prefill_chunk",
            format!(
                "{name} scores slots with a reconstruction pass over the whole prompt, so it \
                 cannot compress during prefill (drop prefill_chunk, or choose a scorer \
                 such as expected_attention, keydiff or snapkv)"
            ),
        ));
    }
    Ok(())
}

fn tokens(key: &str, value: &str, positive: bool) -> Result<usize, RecipeError> {
    let least = usize::from(positive);
    value
        .parse::<usize>()
        .ok()
        .filter(|n| (least..=MAX_RECIPE_TOKENS).contains(n))
        .ok_or_else(|| {
            RecipeError::new(
                key,
                format!(
                    "{key} must be an integer from {least} to {MAX_RECIPE_TOKENS}, got '{value}'"
                ),
            )
        })
}

impl fmt::Display for Recipe {
    /// The string form, readable by [`Recipe::parse`] (a ratio schedule is written as
    /// `schedule=file` only when it came from one; inline ratios cannot be written).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.method)?;
        let mut pairs: Vec<String> = self
            .options
            .keys()
            .map(|k| format!("{k}={}", self.options.get(k).unwrap_or_default()))
            .collect();
        match &self.schedule {
            Schedule::Uniform => {}
            Schedule::Pyramid { beta } => pairs.push(format!("schedule=pyramid:{beta}")),
            Schedule::File(r) => pairs.push(format!("schedule=<{} layer ratios>", r.len())),
        }
        if let Some(m) = self.recompress_margin {
            pairs.push(format!("recompress_margin={m}"));
        }
        if let Some(c) = self.prefill_chunk {
            pairs.push(format!("prefill_chunk={c}"));
        }
        if !pairs.is_empty() {
            write!(f, ":{}", pairs.join(","))?;
        }
        if self.budget.is_some() {
            write!(f, "@{}", self.budget_text())?;
        }
        Ok(())
    }
}

/// When a context is compressed: before its question is seen (the field's query-agnostic
/// protocol), or with the question inside what is compressed.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Prefill the context, compress it, then append the question and answer prefix
    /// uncompressed (the field's query-agnostic protocol).
    #[default]
    Agnostic,
    /// Prefill context and question, then compress both (the question is visible to
    /// the method, as in an observation window).
    Aware,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Agnostic => "agnostic",
            Protocol::Aware => "aware",
        }
    }
}

impl FromStr for Protocol {
    type Err = RecipeError;
    fn from_str(s: &str) -> Result<Protocol, RecipeError> {
        match s.trim() {
            "agnostic" => Ok(Protocol::Agnostic),
            "aware" => Ok(Protocol::Aware),
            other => Err(RecipeError::new(
                "protocol",
                format!("unknown protocol '{other}' (expected agnostic or aware)"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, Value)]) -> BTreeMap<String, Value> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    #[test]
    fn the_string_form_reads_every_field_and_writes_back() {
        let r = Recipe::parse("h2o:recent=0.25,schedule=pyramid:0.5,recompress_margin=16@2048")
            .unwrap();
        assert_eq!(r.method, "h2o");
        assert_eq!(r.options.get("recent"), Some("0.25"));
        assert_eq!(r.schedule, Schedule::Pyramid { beta: 0.5 });
        assert_eq!(r.recompress_margin, Some(16));
        assert_eq!(r.budget, Some(Budget::Tokens(2048)));
        assert_eq!(Recipe::parse(&r.to_string()).unwrap(), r);
        assert_eq!(Recipe::parse("full").unwrap(), Recipe::full());
        assert!(Recipe::parse("full").unwrap().is_noop());
        assert!(Recipe::parse("snapkv@1.0").unwrap().is_noop());
    }

    #[test]
    fn errors_name_the_field_at_fault() {
        let field = |s: &str| Recipe::parse(s).unwrap_err().field;
        assert_eq!(field("nope@0.5"), "method");
        assert_eq!(field("snapkv:colour=red@0.5"), "options");
        assert_eq!(field("snapkv"), "budget");
        assert_eq!(field("snapkv@1.5"), "budget");
        assert_eq!(field("snapkv:schedule=sideways@0.5"), "schedule");
        assert_eq!(field("snapkv:prefill_chunk=0@0.5"), "prefill_chunk");
        assert_eq!(
            field("snapkv:recompress_margin=-1@0.5"),
            "recompress_margin"
        );
        assert_eq!(field("kvzip:recompress_margin=8@0.5"), "recompress_margin");
        assert_eq!(field("kvzip:prefill_chunk=512@0.5"), "prefill_chunk");
        // kvmerger+ selects with KVzip by default; another selector can compress during prefill.
        assert_eq!(field("kvmerger+:prefill_chunk=512@0.5"), "prefill_chunk");
        Recipe::parse("kvmerger+:selector=expected_attention,prefill_chunk=512@0.5").unwrap();
        let e = Recipe::parse("snapkv:window=x@0.5").unwrap_err();
        assert!(e.message.contains("window"), "{e}");
    }

    #[test]
    fn a_map_lays_over_a_recipe_and_a_new_method_drops_the_old_options() {
        let base = Recipe::parse("kvmerger:epsilon=0.6@0.5").unwrap();
        let mut same = base.clone();
        same.apply(
            &map(&[("budget", Value::Int(512)), ("sigma", Value::Float(2.0))]),
            ScheduleFiles::Refuse,
        )
        .unwrap();
        assert_eq!(same.options.get("epsilon"), Some("0.6"));
        assert_eq!(same.options.get("sigma"), Some("2.0"));
        assert_eq!(same.budget, Some(Budget::Tokens(512)));
        let mut other = base.clone();
        other
            .apply(
                &map(&[
                    ("method", Value::Str("h2o".into())),
                    (
                        "options",
                        Value::Map(map(&[("recent", Value::Float(0.25))])),
                    ),
                    (
                        "schedule",
                        Value::List(vec![Value::Int(1), Value::Float(3.0)]),
                    ),
                    ("prefill_chunk", Value::Int(256)),
                ]),
                ScheduleFiles::Refuse,
            )
            .unwrap();
        assert_eq!(other.method, "h2o");
        assert_eq!(other.options.get("epsilon"), None);
        assert_eq!(other.options.get("recent"), Some("0.25"));
        assert_eq!(other.schedule, Schedule::File(vec![1.0, 3.0]));
        assert_eq!(other.prefill_chunk, Some(256));
        other.validate().unwrap();
        // A float budget of 1.0 is a fraction (everything), not one token.
        let mut one = base.clone();
        one.apply(&map(&[("budget", Value::Float(1.0))]), ScheduleFiles::Read)
            .unwrap();
        assert_eq!(one.budget, Some(Budget::Fraction(1.0)));
    }

    #[test]
    fn a_map_refuses_wrong_types_and_schedule_files_when_told() {
        let err = |pairs: &[(&str, Value)]| {
            let mut r = Recipe::parse("snapkv@0.5").unwrap();
            r.apply(&map(pairs), ScheduleFiles::Refuse)
                .unwrap_err()
                .field
        };
        assert_eq!(err(&[("method", Value::Int(3))]), "method");
        assert_eq!(err(&[("budget", Value::Bool(true))]), "budget");
        assert_eq!(
            err(&[("schedule", Value::Str("/etc/passwd".into()))]),
            "schedule"
        );
        assert_eq!(
            err(&[("schedule", Value::List(vec![Value::Str("x".into())]))]),
            "schedule"
        );
        assert_eq!(
            err(&[("recompress_margin", Value::Float(1.5))]),
            "recompress_margin"
        );
        assert_eq!(err(&[("prefill_chunk", Value::Int(-4))]), "prefill_chunk");
        assert_eq!(err(&[("options", Value::Int(1))]), "options");
        assert_eq!(
            err(&[("options", Value::Map(map(&[("budget", Value::Int(4))])))]),
            "options.budget"
        );
        assert_eq!(err(&[("window", Value::List(vec![]))]), "window");
    }
}
