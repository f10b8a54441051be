//! # kvmerger-server
//!
//! An OpenAI-compatible HTTP server over the kvmerger engine, where each request may
//! choose how its KV cache is compressed, and the KV memory compression saves lets more
//! requests run at once.
//!
//! - [`routes`]: `POST /v1/completions` and `/v1/chat/completions` (JSON or server-sent
//!   events), `GET /v1/models`, `POST /tokenize` and `/detokenize`, `/health`, `/metrics`; [`api`]: the request bodies and
//!   their checks; [`error`]: OpenAI's error format;
//! - [`compression`]: the `kv_compression` request field over the server's default, and
//!   the KV bytes a request may need;
//! - [`scheduler`]: one engine thread that admits requests by KV memory, prefills in
//!   chunks and decodes every running request in one batched forward pass;
//! - [`metrics`]: Prometheus text; [`log`]: the log on stderr (a line per request).
//!
//! HTTP runs on tokio; compute runs on the engine thread (and its rayon pool), never on
//! the async runtime. Limits (body size, API key, request time) are middleware layers;
//! the time to send a request's head is bounded per connection ([`serve`]).

pub mod api;
pub mod compression;
pub mod config;
pub mod contexts;
pub mod error;
pub mod log;
pub mod metrics;
pub mod routes;
pub mod scheduler;
pub mod store;
pub mod structured;

pub use compression::RequestRecipe;
pub use config::{parse_bytes, ServerConfig};
pub use kvmerger_compression::Recipe;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::middleware::{from_fn_with_state, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use error::ApiError;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use kvmerger_engine::load::LoadedModel;
use metrics::Metrics;
use scheduler::{Limits, Scheduler};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

/// Everything handlers share.
pub struct App {
    pub cfg: ServerConfig,
    pub lm: Arc<LoadedModel>,
    pub sched: Arc<Scheduler>,
    pub metrics: Arc<Metrics>,
    pub shutting_down: AtomicBool,
    next_id: AtomicU64,
    /// Where compressed contexts are kept: the configured store (every finished
    /// context is written there), or, without one, memory for explicit handles only.
    pub store: Arc<dyn store::ContextStore>,
    /// Whether `store` is the configured (persistent, shared) one.
    pub persist: bool,
    /// Structured outputs' vocabulary and grammar compiler (built on first use).
    pub grammars: structured::Grammars,
}

/// The routes with their layers: request counting, API key, request time limit, body limit.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/completions", post(routes::completions))
        .route("/v1/chat/completions", post(routes::chat))
        .route("/v1/models", get(routes::models))
        .route("/v1/models/{id}", get(routes::model))
        .route(
            "/v1/contexts",
            post(routes::create_context).get(routes::list_contexts),
        )
        .route(
            "/v1/contexts/{id}",
            get(routes::get_context).delete(routes::delete_context),
        )
        .route("/tokenize", post(routes::tokenize))
        .route("/detokenize", post(routes::detokenize))
        .route("/health", get(routes::health))
        .route("/metrics", get(routes::metrics))
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .layer(DefaultBodyLimit::max(app.cfg.max_body_bytes))
        .layer(from_fn_with_state(app.clone(), time_limit))
        .layer(from_fn_with_state(app.clone(), api_key))
        .layer(from_fn_with_state(app.clone(), count))
        .with_state(app)
}

async fn count(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "other".into());
    let r = next.run(req).await;
    app.metrics.http_response(&route, r.status().as_u16());
    r
}

async fn api_key(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    if let Some(key) = &app.cfg.api_key {
        if req.uri().path() != "/health" {
            let given = req
                .headers()
                .get(axum::http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .unwrap_or("");
            if !constant_time_eq(given.trim().as_bytes(), key.as_bytes()) {
                return ApiError::unauthorized().into_response();
            }
        }
    }
    next.run(req).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Bounds the time to a response (a slow upload, a stuck handler). Generation itself is
/// bounded by the engine, which ends a request at its deadline (streams included) and
/// frees its cache; this layer waits a little longer so that the engine's answer, with
/// its accounting, normally comes first.
async fn time_limit(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let limit = app.cfg.request_timeout;
    match tokio::time::timeout(limit + Duration::from_secs(2), next.run(req)).await {
        Ok(r) => r,
        Err(_) => ApiError::timeout(limit.as_secs_f64()).into_response(),
    }
}

/// Serve on `listener` until `shutdown` completes, then stop taking requests, let those
/// running finish (up to `cfg.shutdown_grace`), and return.
pub async fn serve(
    cfg: ServerConfig,
    lm: LoadedModel,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    cfg.validate()?;
    let mut pool = rayon::ThreadPoolBuilder::new().thread_name(|i| format!("kvmerger-rayon-{i}"));
    if let Some(n) = cfg.threads {
        pool = pool.num_threads(n);
    }
    let pool = pool
        .build()
        .map_err(|e| format!("starting the thread pool: {e}"))?;
    let lm = Arc::new(lm);
    let metrics = Arc::new(Metrics::default());
    let limits = Limits {
        kv_memory: cfg.kv_memory,
        max_queue: cfg.max_queue,
        max_batch: cfg.max_batch,
        prefill_step: cfg.prefill_step,
        kv_dtype: cfg.kv_dtype,
        context_reuse: cfg.context_reuse,
    };
    let (store, persist): (Arc<dyn store::ContextStore>, bool) = match &cfg.context_store {
        Some(spec) => (spec.open().map_err(|e| e.to_string())?, true),
        None => (
            Arc::new(store::MemoryStore::new(cfg.handle_memory as u64)),
            false,
        ),
    };
    let writer = persist.then(|| {
        let m = metrics.clone();
        Arc::new(store::Writer::start(store.clone(), 16, move |r| {
            match r {
                Ok(bytes) => m.store_written(bytes),
                Err(_) => m.store_errors.fetch_add(1, Relaxed),
            };
        }))
    });
    if persist {
        cfg.log
            .message("info", &format!("context store: {}", store.describe()));
    }
    let (sched, engine) =
        Scheduler::start(lm.clone(), limits, metrics.clone(), pool, writer.clone())
            .map_err(|e| format!("starting the engine thread: {e}"))?;
    let grace = cfg.shutdown_grace;
    let app = Arc::new(App {
        cfg,
        lm,
        sched: sched.clone(),
        metrics,
        shutting_down: AtomicBool::new(false),
        next_id: AtomicU64::new(1),
        store,
        persist,
        grammars: Default::default(),
    });
    let (fired_tx, fired_rx) = tokio::sync::oneshot::channel::<()>();
    let app2 = app.clone();
    let header_timeout = app.cfg.header_timeout;
    let log = app.cfg.log.clone();
    let server = serve_connections(
        listener,
        router(app.clone()),
        header_timeout,
        log,
        async move {
            shutdown.await;
            app2.shutting_down.store(true, Relaxed);
            app2.sched.close();
            let _ = fired_tx.send(());
        },
    );
    let mut server = std::pin::pin!(server);
    let result = tokio::select! {
        _ = &mut server => Ok(()),
        _ = async {
            let _ = fired_rx.await;
            tokio::time::sleep(grace).await;
        } => {
            // Past the grace period: fail what is still running so its streams end.
            sched.abort();
            let _ = tokio::time::timeout(Duration::from_secs(5), &mut server).await;
            Ok(())
        }
    };
    sched.abort();
    let _ = tokio::task::spawn_blocking(move || {
        let _ = engine.join();
        // What the engine queued for the store is written before the process ends.
        if let Some(w) = writer {
            w.finish();
        }
    })
    .await;
    result
}

/// Accept connections on `listener` and serve `router` over HTTP/1.1 until `shutdown`
/// completes; then stop accepting, let each connection finish the request it is
/// answering (idle ones close at once), and return when all are closed.
///
/// A request's head must arrive within `header_timeout` of the connection being ready
/// for it (just opened, or done with its previous request), else hyper closes the
/// connection: a client trickling headers or holding an idle connection cannot keep it.
async fn serve_connections(
    listener: tokio::net::TcpListener,
    router: Router,
    header_timeout: Duration,
    log: log::Logger,
    shutdown: impl Future<Output = ()>,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    accept_error(&log, e).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let service = TowerToHyperService::new(router.clone());
        let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            // An error here ends only this connection (a reset, a header timeout).
            let _ = conn.await;
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// A failed accept: a connection that went away before it was accepted is nothing; out
/// of file descriptors (or similar), wait a second so that connections can close rather
/// than spin.
async fn accept_error(log: &log::Logger, e: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        e.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    ) {
        return;
    }
    log.message(
        "error",
        &format!("kvmerger: accepting a connection failed: {e}"),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// A server on a background thread with its own runtime (for tests and embedding).
pub struct RunningServer {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<(), String>>>,
}

impl RunningServer {
    /// Bind `cfg.addr` (port 0 picks a free port) and serve in the background.
    pub fn start(cfg: ServerConfig, lm: LoadedModel) -> Result<RunningServer, String> {
        cfg.validate()?;
        let rt = runtime()?;
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(cfg.addr))
            .map_err(|e| format!("binding {}: {e}", cfg.addr))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("kvmerger-http".into())
            .spawn(move || {
                rt.block_on(serve(cfg, lm, listener, async move {
                    let _ = rx.await;
                }))
            })
            .map_err(|e| e.to_string())?;
        Ok(RunningServer {
            addr,
            stop: Some(tx),
            thread: Some(thread),
        })
    }

    /// Shut down as on SIGTERM and wait for it.
    pub fn stop(mut self) -> Result<(), String> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), String> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| "the server thread panicked".to_string())?,
            None => Ok(()),
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("kvmerger-http")
        .enable_all()
        .build()
        .map_err(|e| format!("starting the async runtime: {e}"))
}

/// Run until SIGTERM or Ctrl-C: bind, print where, serve, shut down gracefully.
pub fn run(cfg: ServerConfig, lm: LoadedModel) -> Result<(), String> {
    cfg.validate()?;
    let rt = runtime()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(cfg.addr)
            .await
            .map_err(|e| format!("binding {}: {e}", cfg.addr))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let log = cfg.log.clone();
        log.message(
            "info",
            &format!(
                "kvmerger: serving {} on http://{addr} (KV memory {:.0} MiB, compression {} {}{})",
                cfg.model_id,
                cfg.kv_memory as f64 / (1 << 20) as f64,
                cfg.compression.method,
                cfg.compression.budget_text(),
                if cfg.api_key.is_some() {
                    ", API key required"
                } else {
                    ""
                }
            ),
        );
        serve(cfg, lm, listener, shutdown_signal(log.clone())).await?;
        log.message("info", "kvmerger: stopped");
        Ok(())
    })
}

async fn shutdown_signal(log: log::Logger) {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    log.message(
        "info",
        "kvmerger: shutting down (finishing running requests)",
    );
}
