//! Compression per request: the server's default recipe, a request's `kv_compression`
//! field laid over it, and the KV memory a request will need.
//!
//! ```json
//! "kv_compression": {"method": "kvmerger", "budget": 0.5, "epsilon": 0.6}
//! "kv_compression": {"method": "h2o", "budget": 512, "recompress_margin": 64,
//!                    "schedule": "pyramid", "options": {"recent": 64}}
//! "kv_compression": "none"
//! ```
//!
//! Fields the request leaves out come from the server's default. Method options only
//! carry over when the request keeps the default's method (they are per method).
//! A request cannot name a schedule file (the server does not read files for clients);
//! it can give the ratios inline as an array.

use crate::error::ApiError;
use kvmerger_compression::{Budget, Options, Schedule};
use kvmerger_engine::compress::Compressor;
use serde_json::Value;

/// Everything needed to build a [`Compressor`]; cloneable, so one default serves every
/// request.
#[derive(Clone, Debug, PartialEq)]
pub struct CompressionSpec {
    pub method: String,
    /// None only for `full`.
    pub budget: Option<Budget>,
    pub schedule: Schedule,
    pub recompress_margin: Option<usize>,
    pub options: Options,
}

const FIELDS: &[&str] = &[
    "method",
    "budget",
    "schedule",
    "recompress_margin",
    "options",
];

impl CompressionSpec {
    pub fn full() -> CompressionSpec {
        CompressionSpec {
            method: "full".into(),
            budget: None,
            schedule: Schedule::Uniform,
            recompress_margin: None,
            options: Options::new(),
        }
    }

    /// The compressor, or None when nothing would be compressed.
    pub fn build(&self) -> Result<Option<Compressor>, ApiError> {
        let p = "kv_compression";
        if self.method == "full" {
            return Ok(None);
        }
        let budget = self.budget.ok_or_else(|| {
            ApiError::param(
                format!("{p}.budget"),
                format!(
                    "method '{}' needs a budget: a fraction of the prompt (0.5), a percentage (\"35%\") or a token count per head (2048)",
                    self.method
                ),
            )
        })?;
        let mut c = Compressor::new(&self.method, &self.options, budget, self.schedule.clone())
            .map_err(|e| {
                let param = match &e {
                    kvmerger_engine::Error::Compression(
                        kvmerger_compression::Error::UnknownMethod(..),
                    ) => format!("{p}.method"),
                    _ => format!("{p}.options"),
                };
                ApiError::param(param, e.to_string())
            })?;
        c.recompress_margin = self.recompress_margin;
        if c.is_noop() {
            return Ok(None);
        }
        c.check()
            .map_err(|e| ApiError::param(format!("{p}.recompress_margin"), e.to_string()))?;
        Ok(Some(c))
    }

    /// A short description for usage reports and metrics labels.
    pub fn budget_text(&self) -> String {
        match self.budget {
            None => "1".into(),
            Some(Budget::Fraction(f)) => format!("{f}"),
            Some(Budget::Tokens(t)) => format!("{t}"),
        }
    }

    /// This recipe with a request's `kv_compression` value laid over it.
    pub fn with_request(&self, v: &Value) -> Result<CompressionSpec, ApiError> {
        let p = "kv_compression";
        match v {
            Value::Null => Ok(self.clone()),
            Value::Bool(false) => Ok(CompressionSpec::full()),
            Value::String(s) if s == "none" || s == "full" => Ok(CompressionSpec::full()),
            Value::String(s) => {
                let mut obj = serde_json::Map::new();
                obj.insert("method".into(), Value::String(s.clone()));
                self.with_object(&obj)
            }
            Value::Object(obj) => self.with_object(obj),
            _ => Err(ApiError::param(
                p,
                "kv_compression must be an object such as {\"method\": \"kvmerger\", \"budget\": 0.5}, a method name, \"none\" or null",
            )),
        }
    }

    fn with_object(
        &self,
        obj: &serde_json::Map<String, Value>,
    ) -> Result<CompressionSpec, ApiError> {
        let p = "kv_compression";
        let method = match obj.get("method") {
            None | Some(Value::Null) => self.method.clone(),
            Some(Value::String(m)) => m.trim().to_string(),
            Some(_) => {
                return Err(ApiError::param(
                    format!("{p}.method"),
                    "method must be a string (see GET /v1/models for the list)",
                ))
            }
        };
        let same = method == self.method;
        let mut out = CompressionSpec {
            method,
            budget: self.budget,
            schedule: self.schedule.clone(),
            recompress_margin: self.recompress_margin,
            options: if same {
                self.options.clone()
            } else {
                Options::new()
            },
        };
        if let Some(b) = obj.get("budget") {
            out.budget = match b {
                Value::Null => None,
                Value::Number(n) => Some(parse_budget(&n.to_string())?),
                Value::String(s) => Some(parse_budget(s)?),
                _ => {
                    return Err(ApiError::param(
                        format!("{p}.budget"),
                        "budget must be a number (0.5, 2048) or a string (\"35%\")",
                    ))
                }
            };
        }
        if let Some(s) = obj.get("schedule") {
            out.schedule = parse_schedule(s)?;
        }
        if let Some(m) = obj.get("recompress_margin") {
            out.recompress_margin = match m {
                Value::Null => None,
                Value::Number(n) => Some(n.as_u64().filter(|&x| x <= 1 << 20).ok_or_else(|| {
                    ApiError::param(
                        format!("{p}.recompress_margin"),
                        "recompress_margin must be an integer from 0 to 1048576",
                    )
                })? as usize),
                _ => {
                    return Err(ApiError::param(
                        format!("{p}.recompress_margin"),
                        "recompress_margin must be an integer or null",
                    ))
                }
            };
        }
        match obj.get("options") {
            None | Some(Value::Null) => {}
            Some(Value::Object(o)) => {
                for (k, v) in o {
                    out.options
                        .set(k, option_value(&format!("{p}.options.{k}"), v)?);
                }
            }
            Some(_) => {
                return Err(ApiError::param(
                    format!("{p}.options"),
                    "options must be an object of method options",
                ))
            }
        }
        // Any other key is a method option, so `{"method": "kvmerger", "epsilon": 0.6}` works.
        for (k, v) in obj {
            if !FIELDS.contains(&k.as_str()) {
                out.options.set(k, option_value(&format!("{p}.{k}"), v)?);
            }
        }
        if out.method == "full" {
            return Ok(CompressionSpec::full());
        }
        Ok(out)
    }
}

fn parse_budget(s: &str) -> Result<Budget, ApiError> {
    s.parse::<Budget>()
        .map_err(|e| ApiError::param("kv_compression.budget", e.to_string()))
}

fn parse_schedule(v: &Value) -> Result<Schedule, ApiError> {
    let param = "kv_compression.schedule";
    match v {
        Value::Null => Ok(Schedule::Uniform),
        Value::String(s) if s == "uniform" || s.starts_with("pyramid") => s
            .parse::<Schedule>()
            .map_err(|e| ApiError::param(param, e.to_string())),
        Value::Array(a) => {
            let text: Result<Vec<String>, ApiError> = a
                .iter()
                .map(|x| match x {
                    Value::Number(n) => Ok(n.to_string()),
                    _ => Err(ApiError::param(param, "schedule ratios must be numbers")),
                })
                .collect();
            Schedule::parse_ratios(&text?.join("\n"))
                .map_err(|e| ApiError::param(param, e.to_string()))
        }
        _ => Err(ApiError::param(
            param,
            "schedule must be \"uniform\", \"pyramid\", \"pyramid:<slope>\" or an array of per-layer ratios",
        )),
    }
}

fn option_value(param: &str, v: &Value) -> Result<String, ApiError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        _ => Err(ApiError::param(
            param,
            "a method option must be a string, number or boolean",
        )),
    }
}

/// Upper bounds on the KV memory of one request, from the cache's exact per-slot size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvEstimate {
    /// While prefilling: the whole prompt is in the cache before it is compressed.
    pub prefill_peak: usize,
    /// After compression, with every generated token appended (bounded by re-compression).
    pub steady: usize,
    /// The same prompt and generation with no compression.
    pub uncompressed: usize,
}

/// Bytes bound for a request of `prompt` tokens generating up to `max_tokens`, in a cache
/// of `n_layers` × `n_kv_heads` heads whose slots take `slot_bytes` each.
pub fn estimate(
    comp: Option<&Compressor>,
    prompt: usize,
    max_tokens: usize,
    n_layers: usize,
    n_kv_heads: usize,
    slot_bytes: usize,
) -> KvEstimate {
    let per_token = n_layers * n_kv_heads * slot_bytes;
    let uncompressed = (prompt + max_tokens) * per_token;
    let steady = match comp {
        None => uncompressed,
        Some(c) => {
            let slots: usize = c
                .targets(n_layers, prompt)
                .iter()
                .map(|&t| head_bound(t.min(prompt), t, c.recompress_margin, max_tokens))
                .sum();
            slots * n_kv_heads * slot_bytes
        }
    };
    KvEstimate {
        prefill_peak: (prompt * per_token).max(steady),
        steady,
        uncompressed,
    }
}

/// Most slots a head holding `len` slots (target `target`) can reach with `remaining`
/// more tokens: each step appends one, and once a head holds more than target + margin
/// the step is followed by re-compression back to the target.
pub fn head_bound(len: usize, target: usize, margin: Option<usize>, remaining: usize) -> usize {
    match margin {
        None => len + remaining,
        Some(m) => (len + remaining).min(len.max(target + m) + 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn default_kvmerger() -> CompressionSpec {
        let mut options = Options::new();
        options.set("epsilon", "0.6");
        CompressionSpec {
            method: "kvmerger".into(),
            budget: Some(Budget::Fraction(0.5)),
            schedule: Schedule::Uniform,
            recompress_margin: Some(32),
            options,
        }
    }

    #[test]
    fn absent_or_null_keeps_the_server_default() {
        let d = default_kvmerger();
        assert_eq!(d.with_request(&Value::Null).unwrap(), d);
        assert_eq!(d.with_request(&json!({})).unwrap(), d);
    }

    #[test]
    fn none_and_false_turn_compression_off() {
        let d = default_kvmerger();
        for v in [json!("none"), json!(false), json!({"method": "full"})] {
            let s = d.with_request(&v).unwrap();
            assert_eq!(s, CompressionSpec::full());
            assert!(s.build().unwrap().is_none());
        }
    }

    #[test]
    fn request_fields_override_and_extra_keys_are_options() {
        let d = CompressionSpec::full();
        let s = d
            .with_request(
                &json!({"method": "kvmerger", "budget": 0.35, "epsilon": 0.7,
                                   "options": {"mass": "bias"}, "schedule": "pyramid"}),
            )
            .unwrap();
        assert_eq!(s.method, "kvmerger");
        assert_eq!(s.budget, Some(Budget::Fraction(0.35)));
        assert_eq!(s.options.get("epsilon"), Some("0.7"));
        assert_eq!(s.options.get("mass"), Some("bias"));
        assert!(matches!(s.schedule, Schedule::Pyramid { .. }));
        let c = s.build().unwrap().unwrap();
        assert_eq!(c.name(), "kvmerger");
    }

    #[test]
    fn options_carry_over_only_for_the_same_method() {
        let d = default_kvmerger();
        let same = d.with_request(&json!({"budget": "25%"})).unwrap();
        assert_eq!(same.options.get("epsilon"), Some("0.6"));
        assert_eq!(same.budget, Some(Budget::Fraction(0.25)));
        let other = d.with_request(&json!({"method": "h2o"})).unwrap();
        assert_eq!(other.options.get("epsilon"), None);
        assert_eq!(other.budget, d.budget, "the budget is not per method");
        other.build().unwrap().unwrap();
    }

    #[test]
    fn bad_values_name_their_field() {
        let d = CompressionSpec::full();
        let cases = [
            (
                json!({"method": "nope", "budget": 0.5}),
                "kv_compression.method",
            ),
            (json!({"method": "kvmerger"}), "kv_compression.budget"),
            (
                json!({"method": "kvmerger", "budget": 1.5}),
                "kv_compression.budget",
            ),
            (
                json!({"method": "kvmerger", "budget": -3}),
                "kv_compression.budget",
            ),
            (
                json!({"method": "kvmerger", "budget": [1]}),
                "kv_compression.budget",
            ),
            (
                json!({"method": "kvmerger", "budget": 0.5, "colour": "blue"}),
                "kv_compression.options",
            ),
            (
                json!({"method": "kvmerger", "budget": 0.5, "epsilon": "x"}),
                "kv_compression.options",
            ),
            (
                json!({"method": "h2o", "budget": 0.5, "schedule": "/etc/passwd"}),
                "kv_compression.schedule",
            ),
            (
                json!({"method": "h2o", "budget": 0.5, "schedule": [0, 0]}),
                "kv_compression.schedule",
            ),
            (
                json!({"method": "h2o", "budget": 0.5, "recompress_margin": -1}),
                "kv_compression.recompress_margin",
            ),
            (json!({"method": 3}), "kv_compression.method"),
            (json!([1, 2]), "kv_compression"),
            (
                json!({"method": "h2o", "budget": 0.5, "options": {"recent": {"a": 1}}}),
                "kv_compression.options.recent",
            ),
        ];
        for (v, param) in cases {
            let e = d
                .with_request(&v)
                .and_then(|s| s.build().map(|_| ()))
                .expect_err(&v.to_string());
            assert_eq!(e.status, 400, "{v}");
            assert_eq!(e.param.as_deref(), Some(param), "{v}: {}", e.message);
        }
    }

    #[test]
    fn compression_shrinks_the_steady_estimate_but_not_the_prefill_peak() {
        let spec = CompressionSpec::full()
            .with_request(&json!({"method": "streaming", "budget": 0.25}))
            .unwrap();
        let c = spec.build().unwrap().unwrap();
        let (l, h, slot) = (30, 3, 272);
        let full = estimate(None, 1000, 100, l, h, slot);
        assert_eq!(full.steady, 1100 * l * h * slot);
        assert_eq!(full.prefill_peak, full.steady);
        let comp = estimate(Some(&c), 1000, 100, l, h, slot);
        assert_eq!(comp.steady, (250 + 100) * l * h * slot);
        assert_eq!(comp.prefill_peak, 1000 * l * h * slot);
        assert_eq!(comp.uncompressed, full.steady);
    }

    #[test]
    fn recompression_bounds_a_head_by_target_plus_margin() {
        assert_eq!(head_bound(100, 100, None, 1000), 1100);
        assert_eq!(head_bound(100, 100, Some(16), 1000), 117);
        assert_eq!(head_bound(100, 100, Some(16), 5), 105);
        // A head already over its target (a method that keeps more) grows by the one
        // step that triggers re-compression.
        assert_eq!(head_bound(300, 100, Some(16), 1000), 301);
    }
}
