//! `kvmerger serve`: flags to a server configuration, then the server crate does the rest.

use crate::cli::{CompressArgs, ServeArgs};
use anyhow::{anyhow, bail, Context, Result};
use kvmerger_server::{parse_bytes, Recipe, RequestRecipe, ServerConfig};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

fn secs(name: &str, v: f64) -> Result<Duration> {
    if !(v.is_finite() && v > 0.0 && v <= 7.0 * 24.0 * 3600.0) {
        bail!("--{name} must be a number of seconds above 0 (and at most a week), got {v}");
    }
    Ok(Duration::from_secs_f64(v))
}

/// The default recipe from `--method`/`--budget`/`--opt`/`--schedule`/`--compress-config`.
fn default_recipe(a: &CompressArgs) -> Result<Recipe> {
    let r = crate::shared::recipe::recipe(a)?;
    let r = if r.method == "full" {
        Recipe::full()
    } else {
        r
    };
    r.build().map_err(|e| anyhow!(e.message))?;
    Ok(r)
}

pub fn run(a: ServeArgs, dir: &Path, threads: Option<usize>) -> Result<()> {
    let compression = default_recipe(&a.compress)?;
    let kv_memory = parse_bytes(&a.kv_memory).map_err(|e| anyhow!("--kv-memory: {e}"))?;
    let max_body = parse_bytes(&a.max_body).map_err(|e| anyhow!("--max-body: {e}"))?;
    let store_size =
        parse_bytes(&a.context_store_size).map_err(|e| anyhow!("--context-store-size: {e}"))?;
    let context_store = match &a.context_store {
        Some(s) => Some(
            kvmerger_server::store::StoreSpec::parse(s, store_size as u64, a.context_store_ttl)
                .map_err(|e| anyhow!("--context-store: {e}"))?,
        ),
        None => None,
    };
    let mut cfg = ServerConfig {
        addr: SocketAddr::new(a.host, a.port),
        model_id: String::new(),
        api_key: a.api_key.clone(),
        kv_memory,
        max_queue: a.max_queue,
        max_batch: a.max_batch,
        prefill_step: a.prefill_step,
        default_max_tokens: a.default_max_tokens,
        max_tokens_limit: a.max_tokens_limit,
        max_body_bytes: max_body,
        request_timeout: secs("timeout", a.timeout)?,
        header_timeout: secs("header-timeout", a.header_timeout)?,
        shutdown_grace: secs("shutdown-grace", a.shutdown_grace)?,
        compression,
        protocol: a.protocol.parse().map_err(|e| anyhow!("--protocol: {e}"))?,
        context_reuse: !a.no_context_reuse,
        context_store,
        handle_memory: store_size,
        kv_dtype: a.model.kv_dtype.parse().map_err(anyhow::Error::msg)?,
        threads,
        strict_api: a.strict_api,
        log: kvmerger_server::log::Logger::new(
            a.log_format
                .parse()
                .map_err(|e| anyhow!("--log-format: {e}"))?,
        ),
    };
    // Check everything but the model name before the (slow) model load.
    cfg.model_id = "pending".into();
    cfg.validate().map_err(anyhow::Error::msg)?;
    let (lm, _) = crate::shared::session::load_model(&a.model, dir)?;
    let looks_like_path = a.model.model.contains('/') || a.model.model.ends_with(".gguf");
    cfg.model_id = a.served_model_name.clone().unwrap_or(if looks_like_path {
        lm.name.clone()
    } else {
        a.model.model.clone()
    });
    kvmerger_server::run(cfg, lm)
        .map_err(anyhow::Error::msg)
        .context("serving")
}
