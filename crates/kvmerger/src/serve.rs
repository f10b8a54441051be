//! `kvmerger serve`: flags to a server configuration, then the server crate does the rest.

use crate::cli::{CompressArgs, ModelArgs};
use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use kvmerger_server::{parse_bytes, Recipe, RequestRecipe, ServerConfig};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

#[derive(Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The server's default compression; each request may choose its own with the
    /// `kv_compression` body field.
    #[command(flatten)]
    pub compress: CompressArgs,
    /// Address to listen on (loopback by default; 0.0.0.0 exposes the server to the network).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// Port (0 picks a free one and prints it).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on every route but /health.
    #[arg(long, env = "KVMERGER_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// The model's name in the API (default: the --model id, or the file name).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// KV cache memory shared by running requests (512MiB, 2GiB, ...): requests are
    /// admitted while their estimated peak fits, so compression lets more in.
    #[arg(long, default_value = "1GiB")]
    pub kv_memory: String,
    /// Requests waiting for KV memory before new ones get 503 with Retry-After.
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    /// Most requests decoded together in one batched step.
    #[arg(long, default_value_t = 32)]
    pub max_batch: usize,
    /// Prompt tokens prefilled per engine step, between decode steps of running
    /// requests (not compression during prefill: that is `--prefill-chunk`).
    #[arg(long, default_value_t = 128)]
    pub prefill_step: usize,
    /// max_tokens of requests that give none.
    #[arg(long, default_value_t = 256)]
    pub default_max_tokens: usize,
    /// The largest max_tokens a request may ask for.
    #[arg(long, default_value_t = 4096)]
    pub max_tokens_limit: usize,
    /// Largest request body.
    #[arg(long, default_value = "4MiB")]
    pub max_body: String,
    /// Seconds one request may take, queueing included.
    #[arg(long, default_value_t = 600.0, allow_negative_numbers = true)]
    pub timeout: f64,
    /// Seconds a connection has to send a request's headers (from when it opens or
    /// finishes its previous request) before it is closed.
    #[arg(long, default_value_t = 10.0, allow_negative_numbers = true)]
    pub header_timeout: f64,
    /// When a chat is compressed, for requests whose `kv_compression` does not say:
    /// `aware` compresses the whole prompt; `agnostic` compresses the messages before
    /// the last user message (a system message holding a document, earlier turns) and
    /// appends that message uncompressed, so the compressed context can serve other
    /// questions.
    #[arg(long, default_value = "aware")]
    pub protocol: String,
    /// Keep no contexts between requests (by default a finished request's cache is
    /// kept, within --kv-memory, for later prompts that start with the same tokens).
    #[arg(long)]
    pub no_context_reuse: bool,
    /// Keep every compressed context beyond this process: a directory (the contexts
    /// are found again after a restart) or redis://HOST:PORT (shared by every server
    /// that names it). Requests whose context is there skip its prefill and compression.
    #[arg(long, value_name = "DIR|redis://HOST:PORT")]
    pub context_store: Option<String>,
    /// The most a directory store holds (least recently used contexts go first); without
    /// --context-store, the memory kept for context handles (POST /v1/contexts).
    #[arg(long, default_value = "4GiB")]
    pub context_store_size: String,
    /// Seconds a context lives in Redis after its last use (0: until Redis evicts it).
    #[arg(long, default_value_t = 0)]
    pub context_store_ttl: u64,
    /// Seconds shutdown (SIGTERM, Ctrl-C) waits for running requests.
    #[arg(long, default_value_t = 30.0, allow_negative_numbers = true)]
    pub shutdown_grace: f64,
}

fn secs(name: &str, v: f64) -> Result<Duration> {
    if !(v.is_finite() && v > 0.0 && v <= 7.0 * 24.0 * 3600.0) {
        bail!("--{name} must be a number of seconds above 0 (and at most a week), got {v}");
    }
    Ok(Duration::from_secs_f64(v))
}

/// The default recipe from `--method`/`--budget`/`--opt`/`--schedule`/`--compress-config`.
fn default_recipe(a: &CompressArgs) -> Result<Recipe> {
    let r = crate::compress::recipe(a)?;
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
    };
    // Check everything but the model name before the (slow) model load.
    cfg.model_id = "pending".into();
    cfg.validate().map_err(anyhow::Error::msg)?;
    let (lm, _) = crate::run::load_model(&a.model, dir)?;
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
