//! What the operator decides: address, limits, KV memory budget, defaults.

use crate::compression::RequestRecipe;
use kvmerger_compression::Recipe;
use kvmerger_compression::{KvDtype, Protocol};
use std::net::SocketAddr;
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Where to listen; loopback by default (port 0 picks a free one).
    pub addr: SocketAddr,
    /// The model's name in the API (`model` field, `/v1/models`).
    pub model_id: String,
    /// When set, every route except `/health` requires `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// KV cache memory shared by all running requests, in bytes. A request is admitted
    /// when its estimated peak fits beside the reservations of those running.
    pub kv_memory: usize,
    /// Requests waiting for admission beyond which new ones get 503 with Retry-After.
    pub max_queue: usize,
    /// Sequences decoded together in one batched step.
    pub max_batch: usize,
    /// Prompt tokens prefilled per engine step, between decode steps of running requests.
    pub prefill_step: usize,
    /// `max_tokens` when a request gives none (clamped to the context left).
    pub default_max_tokens: usize,
    /// The largest `max_tokens` a request may ask for.
    pub max_tokens_limit: usize,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// Wall-clock limit of one request, from arrival to its last token.
    pub request_timeout: Duration,
    /// Time a connection has to send a request's head (request line and headers), from
    /// when it opens or finishes its previous request; past it the connection is closed.
    /// Bounds clients that trickle headers or hold an idle connection open.
    pub header_timeout: Duration,
    /// How long shutdown waits for running requests before closing them.
    pub shutdown_grace: Duration,
    /// Compression applied when a request does not choose (`full`: none).
    pub compression: Recipe,
    /// When a chat's context is compressed, for requests that do not say.
    pub protocol: Protocol,
    /// Keep finished requests' contexts for later prompts that start with them.
    pub context_reuse: bool,
    /// Where compressed contexts are kept beyond this process (a directory or a Redis
    /// server), so a restarted server or another replica reuses them.
    pub context_store: Option<crate::store::StoreSpec>,
    /// Bytes of context handles (`POST /v1/contexts`) kept in memory when no
    /// `context_store` is set.
    pub handle_memory: usize,
    pub kv_dtype: KvDtype,
    /// Engine threads (default: all cores).
    pub threads: Option<usize>,
    /// Refuse request fields this server does not know (a 400 naming the field)
    /// instead of ignoring them with a warning and an `x-kvmerger-ignored-fields` header.
    pub strict_api: bool,
    /// The log on stderr: one line per finished request, warnings (`text` or `json`).
    pub log: crate::log::Logger,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            model_id: "model".into(),
            api_key: None,
            kv_memory: 1 << 30,
            max_queue: 64,
            max_batch: 32,
            prefill_step: 128,
            default_max_tokens: 256,
            max_tokens_limit: 4096,
            max_body_bytes: 4 << 20,
            request_timeout: Duration::from_secs(600),
            header_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(30),
            compression: Recipe::full(),
            protocol: Protocol::Aware,
            context_reuse: true,
            context_store: None,
            handle_memory: 256 << 20,
            kv_dtype: KvDtype::F16,
            threads: None,
            strict_api: false,
            log: crate::log::Logger::default(),
        }
    }
}

impl ServerConfig {
    /// Errors for settings that would make the server useless or unsafe.
    pub fn validate(&self) -> Result<(), String> {
        if self.model_id.trim().is_empty() {
            return Err("the model id must not be empty".into());
        }
        if matches!(&self.api_key, Some(k) if k.is_empty()) {
            return Err("the API key must not be empty".into());
        }
        if self.kv_memory == 0 {
            return Err("the KV memory budget must be above 0".into());
        }
        for (name, v) in [
            ("max queue", self.max_queue),
            ("max batch", self.max_batch),
            ("prefill step", self.prefill_step),
            ("default max tokens", self.default_max_tokens),
            ("max tokens limit", self.max_tokens_limit),
            ("max body bytes", self.max_body_bytes),
        ] {
            if v == 0 {
                return Err(format!("the {name} must be at least 1"));
            }
        }
        if self.prefill_step > 4096 {
            return Err("the prefill step must be at most 4096 tokens".into());
        }
        if self.default_max_tokens > self.max_tokens_limit {
            return Err(format!(
                "the default max tokens ({}) exceeds the max tokens limit ({})",
                self.default_max_tokens, self.max_tokens_limit
            ));
        }
        if self.request_timeout.is_zero() {
            return Err("the request timeout must be above 0".into());
        }
        if self.header_timeout.is_zero() {
            return Err("the header timeout must be above 0".into());
        }
        if let Some(n) = self.threads {
            if n == 0 {
                return Err("threads must be at least 1".into());
            }
        }
        self.compression.build().map_err(|e| e.message)?;
        Ok(())
    }
}

/// Sizes like `512MiB`, `2G`, `1.5GiB`, `1000000` (bytes).
pub fn parse_bytes(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size (e.g. 512MiB, 2GiB, 1000000)"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "kib" => 1024.0,
        "m" | "mb" => 1e6,
        "mib" => 1024.0 * 1024.0,
        "g" | "gb" => 1e9,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tb" => 1e12,
        "tib" => 1024f64.powi(4),
        other => return Err(format!("unknown size unit '{other}' in '{s}'")),
    };
    let bytes = n * mult;
    if !bytes.is_finite() || bytes < 1.0 || bytes > usize::MAX as f64 / 2.0 {
        return Err(format!("size '{s}' is out of range"));
    }
    Ok(bytes as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_and_without_units() {
        assert_eq!(parse_bytes("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("2G").unwrap(), 2_000_000_000);
        assert_eq!(parse_bytes("1.5 GiB").unwrap(), 3 << 29);
        assert_eq!(parse_bytes("4096").unwrap(), 4096);
        for bad in ["", "MiB", "-1", "12 parsecs", "1e999", "0"] {
            assert!(parse_bytes(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_default_config_is_valid_and_binds_loopback() {
        let c = ServerConfig::default();
        c.validate().unwrap();
        assert!(c.addr.ip().is_loopback());
    }

    #[test]
    fn a_zero_header_timeout_is_refused() {
        let c = ServerConfig {
            header_timeout: Duration::ZERO,
            ..ServerConfig::default()
        };
        let e = c.validate().unwrap_err();
        assert!(e.contains("header timeout"), "{e}");
    }
}
