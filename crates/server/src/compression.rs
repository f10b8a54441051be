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
use kvmerger_compression::recipe::Value as RecipeValue;
use kvmerger_compression::{Protocol, Recipe, RecipeError, ScheduleFiles};
use kvmerger_engine::compressor::Compressor;
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::Arc;

/// The recipe of one request: the server's default with the request's `kv_compression`
/// laid over it. The recipe type and its parsing are the compression crate's
/// ([`Recipe`]); this only reads the request's JSON and names fields as the API does.
pub trait RequestRecipe: Sized {
    /// This recipe with a request's `kv_compression` value laid over it.
    fn with_request(&self, v: &Value) -> Result<Self, ApiError>;
    /// The compressor ([`Compressor::none`] when nothing would be compressed).
    fn build(&self) -> Result<Arc<Compressor>, ApiError>;
}

fn param_error(e: RecipeError) -> ApiError {
    ApiError::param(format!("kv_compression.{}", e.field), e.message)
}

impl RequestRecipe for Recipe {
    fn with_request(&self, v: &Value) -> Result<Recipe, ApiError> {
        let map: BTreeMap<String, RecipeValue> = match v {
            Value::Null => return Ok(self.clone()),
            Value::Bool(false) => return Ok(Recipe::full()),
            Value::String(s) if s == "none" || s == "full" => return Ok(Recipe::full()),
            Value::String(s) => {
                BTreeMap::from([("method".to_string(), RecipeValue::Str(s.clone()))])
            }
            Value::Object(_) => serde_json::from_value(v.clone()).map_err(|e| {
                ApiError::param("kv_compression", format!("kv_compression: {e}"))
            })?,
            _ => {
                return Err(ApiError::param(
                    "kv_compression",
                    "kv_compression must be an object such as {\"method\": \"kvmerger\", \"budget\": 0.5}, a method name, \"none\" or null",
                ))
            }
        };
        let mut map = map;
        // When to compress is the request's, not the recipe's: see `request_protocol`.
        map.remove("protocol");
        let mut out = self.clone();
        out.apply(&map, ScheduleFiles::Refuse)
            .map_err(param_error)?;
        if out.method == "full" {
            return Ok(Recipe::full());
        }
        Ok(out)
    }

    fn build(&self) -> Result<Arc<Compressor>, ApiError> {
        if self.method == "full" {
            return Ok(Arc::new(Compressor::none()));
        }
        let c = Compressor::from_recipe(self).map_err(|e| match e {
            kvmerger_engine::Error::Recipe(e) => param_error(e),
            e => ApiError::param("kv_compression", e.to_string()),
        })?;
        Ok(Arc::new(c))
    }
}

pub use kvmerger_engine::compressor::{estimate, KvEstimate};

/// The protocol a request's `kv_compression` names, if it names one:
/// `{"protocol": "agnostic"}` compresses a chat's messages before its last user message
/// and appends that message uncompressed; `"aware"` compresses the whole prompt.
pub fn request_protocol(v: Option<&Value>) -> Result<Option<Protocol>, ApiError> {
    let Some(p) = v.and_then(|v| v.get("protocol")) else {
        return Ok(None);
    };
    match p {
        Value::Null => Ok(None),
        Value::String(s) => s
            .parse()
            .map(Some)
            .map_err(|e: RecipeError| ApiError::param("kv_compression.protocol", e.message)),
        _ => Err(ApiError::param(
            "kv_compression.protocol",
            "kv_compression.protocol must be \"agnostic\" or \"aware\"",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvmerger_compression::{Budget, Schedule};
    use serde_json::json;

    fn default_kvmerger() -> Recipe {
        Recipe::parse("kvmerger:epsilon=0.6,recompress_margin=32@0.5").unwrap()
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
            assert_eq!(s, Recipe::full());
            assert!(s.build().unwrap().is_noop());
        }
    }

    #[test]
    fn request_fields_override_and_extra_keys_are_options() {
        let d = Recipe::full();
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
        let c = s.build().unwrap();
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
        other.build().unwrap();
    }

    #[test]
    fn bad_values_name_their_field() {
        let d = Recipe::full();
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
        let spec = Recipe::full()
            .with_request(&json!({"method": "streaming", "budget": 0.25}))
            .unwrap();
        let c = spec.build().unwrap();
        let (l, h, slot) = (30, 3, 272);
        let full = estimate(&Compressor::none(), 1000, 100, l, h, slot);
        assert_eq!(full.steady, 1100 * l * h * slot);
        assert_eq!(full.prefill_peak, full.steady);
        let comp = estimate(&c, 1000, 100, l, h, slot);
        assert_eq!(comp.steady, (250 + 100) * l * h * slot);
        assert_eq!(comp.prefill_peak, 1000 * l * h * slot);
        assert_eq!(comp.uncompressed, full.steady);
        // Compressing during prefill: every layer's target plus one chunk.
        let within = Recipe::full()
            .with_request(&json!({"method": "streaming", "budget": 0.25, "prefill_chunk": 200}))
            .unwrap()
            .build()
            .unwrap();
        let est = estimate(&within, 1000, 100, l, h, slot);
        assert_eq!(est.prefill_peak, (250 + 200) * l * h * slot);
        assert_eq!(est.steady, comp.steady);
    }
}
