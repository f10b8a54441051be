//! Counters and gauges, rendered in Prometheus' text format at `GET /metrics`.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Window over which tokens per second are measured.
const RATE_WINDOW: Duration = Duration::from_secs(10);

#[derive(Default)]
pub struct Metrics {
    /// HTTP responses by (route, status).
    http: Mutex<BTreeMap<(String, u16), u64>>,
    /// Generations by how they ended (stop, length, cancelled, timeout, error).
    finished: Mutex<BTreeMap<&'static str, u64>>,
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub queue_depth: AtomicUsize,
    pub running: AtomicUsize,
    pub running_peak: AtomicUsize,
    /// Bytes held by the caches of running requests (exact slot accounting).
    pub kv_bytes_in_use: AtomicUsize,
    /// Bytes admission has set aside for running requests (their bounds).
    pub kv_bytes_reserved: AtomicUsize,
    /// What the running requests' caches would hold uncompressed, minus what they hold.
    pub kv_bytes_saved: AtomicUsize,
    pub kv_bytes_peak: AtomicUsize,
    pub steps: AtomicU64,
    /// Sequences summed over steps (mean batch = this / steps).
    pub step_sequences: AtomicU64,
    /// Arrival to the first sampled token.
    pub time_to_first_token: Histogram,
    /// Arrival to the last token of a finished generation.
    pub request_latency: Histogram,
    /// A finished generation's mean time between output tokens (from its first).
    pub time_per_output_token: Histogram,
    /// Arrival to admission (the wait in the queue, tokenizing included).
    pub queue_wait: Histogram,
    /// Requests that reused a cached context, and those that found none.
    pub context_hits: AtomicU64,
    pub context_misses: AtomicU64,
    /// Prompt tokens not prefilled because a cached context held them.
    pub context_tokens_reused: AtomicU64,
    pub context_evictions: AtomicU64,
    /// Cached contexts and the bytes they hold.
    pub context_entries: AtomicUsize,
    pub context_bytes: AtomicUsize,
    /// The context store: contexts found there, written there, bytes written, entries
    /// found corrupt (deleted and recomputed), and failed reads or writes.
    pub store_hits: AtomicU64,
    pub store_writes: AtomicU64,
    pub store_bytes_written: AtomicU64,
    pub store_corrupt: AtomicU64,
    pub store_errors: AtomicU64,
    /// Time spent reading and checking stored contexts that were used, in µs.
    pub store_read_us: AtomicU64,
    compression: Mutex<BTreeMap<String, MethodStats>>,
    /// (when, prompt tokens, generated tokens) per engine step, for rates.
    recent: Mutex<VecDeque<(Instant, u64, u64)>>,
}

/// Bucket bounds in seconds: 5 ms to 10 minutes, about three per decade.
const LATENCY_BOUNDS: [f64; 16] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 600.0,
];

/// A latency histogram in Prometheus' form: counts per bucket (rendered cumulative,
/// with `+Inf`), the sum and the count.
#[derive(Default)]
pub struct Histogram {
    /// Observations at or below each bound (not cumulative), then above the last.
    buckets: [AtomicU64; LATENCY_BOUNDS.len() + 1],
    sum_us: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = LATENCY_BOUNDS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(LATENCY_BOUNDS.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_us
            .fetch_add(d.as_micros().min(u64::MAX as u128) as u64, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    /// The histogram's lines (`# HELP`, `# TYPE`, buckets, sum, count).
    fn render(&self, o: &mut String, name: &str, help: &str) {
        let _ = writeln!(o, "# HELP {name} {help}");
        let _ = writeln!(o, "# TYPE {name} histogram");
        let mut acc = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            acc += b.load(Relaxed);
            match LATENCY_BOUNDS.get(i) {
                Some(le) => {
                    let _ = writeln!(o, "{name}_bucket{{le=\"{le}\"}} {acc}");
                }
                None => {
                    let _ = writeln!(o, "{name}_bucket{{le=\"+Inf\"}} {acc}");
                }
            }
        }
        let _ = writeln!(o, "{name}_sum {}", self.sum_us.load(Relaxed) as f64 / 1e6);
        let _ = writeln!(o, "{name}_count {}", self.count.load(Relaxed));
    }
}

#[derive(Default, Clone, Copy)]
struct MethodStats {
    passes: u64,
    bytes_before: u64,
    bytes_after: u64,
    secs: f64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic elsewhere must not take the metrics down with it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Metrics {
    /// An entry of `bytes` reached the context store.
    pub fn store_written(&self, bytes: usize) -> u64 {
        self.store_bytes_written.fetch_add(bytes as u64, Relaxed);
        self.store_writes.fetch_add(1, Relaxed)
    }

    pub fn http_response(&self, route: &str, status: u16) {
        *lock(&self.http)
            .entry((route.to_string(), status))
            .or_default() += 1;
    }

    pub fn finished(&self, how: &'static str) {
        *lock(&self.finished).entry(how).or_default() += 1;
    }

    pub fn compressed(&self, method: &str, bytes_before: usize, bytes_after: usize, secs: f64) {
        let mut m = lock(&self.compression);
        let s = m.entry(method.to_string()).or_default();
        s.passes += 1;
        s.bytes_before += bytes_before as u64;
        s.bytes_after += bytes_after as u64;
        s.secs += secs;
    }

    pub fn step(&self, sequences: usize, prompt_tokens: usize, generated: usize) {
        self.steps.fetch_add(1, Relaxed);
        self.step_sequences.fetch_add(sequences as u64, Relaxed);
        self.prompt_tokens.fetch_add(prompt_tokens as u64, Relaxed);
        self.generated_tokens.fetch_add(generated as u64, Relaxed);
        let now = Instant::now();
        let mut r = lock(&self.recent);
        r.push_back((now, prompt_tokens as u64, generated as u64));
        while r.front().is_some_and(|e| now - e.0 > RATE_WINDOW) {
            r.pop_front();
        }
    }

    /// Prompt and generated tokens per second over the last [`RATE_WINDOW`].
    pub fn rates(&self) -> (f64, f64) {
        let now = Instant::now();
        let r = lock(&self.recent);
        let (p, g) = r
            .iter()
            .filter(|e| now - e.0 <= RATE_WINDOW)
            .fold((0, 0), |(p, g), e| (p + e.1, g + e.2));
        let w = RATE_WINDOW.as_secs_f64();
        (p as f64 / w, g as f64 / w)
    }

    pub fn set_kv(&self, in_use: usize, reserved: usize, saved: usize) {
        self.kv_bytes_in_use.store(in_use, Relaxed);
        self.kv_bytes_reserved.store(reserved, Relaxed);
        self.kv_bytes_saved.store(saved, Relaxed);
        self.kv_bytes_peak.fetch_max(in_use, Relaxed);
    }

    pub fn render(&self, kv_budget: usize) -> String {
        let mut o = String::new();
        self.render_traffic(&mut o);
        self.render_contexts(&mut o);
        self.render_engine(&mut o, kv_budget);
        self.render_compression(&mut o);
        self.render_latency(&mut o);
        o
    }

    /// HTTP responses, generations by ending, tokens and token rates.
    fn render_traffic(&self, o: &mut String) {
        let http: Vec<(String, f64)> = lock(&self.http)
            .iter()
            .map(|((route, status), n)| {
                (
                    format!("{{route=\"{route}\",status=\"{status}\"}}"),
                    *n as f64,
                )
            })
            .collect();
        metric(
            o,
            "kvmerger_http_requests_total",
            "counter",
            "HTTP responses by route and status code.",
            &http,
        );
        let fin: Vec<(String, f64)> = lock(&self.finished)
            .iter()
            .map(|(k, n)| (format!("{{reason=\"{k}\"}}"), *n as f64))
            .collect();
        metric(
            o,
            "kvmerger_generations_total",
            "counter",
            "Generations by how they ended: stop, length, cancelled (client gone), timeout, error.",
            &fin,
        );
        metric(
            o,
            "kvmerger_prompt_tokens_total",
            "counter",
            "Prompt tokens prefilled.",
            &one(c(&self.prompt_tokens)),
        );
        metric(
            o,
            "kvmerger_generated_tokens_total",
            "counter",
            "Tokens generated.",
            &one(c(&self.generated_tokens)),
        );
        let (pp, tg) = self.rates();
        metric(
            o,
            "kvmerger_prompt_tokens_per_second",
            "gauge",
            "Prompt tokens prefilled per second over the last 10 s.",
            &one(pp),
        );
        metric(
            o,
            "kvmerger_generated_tokens_per_second",
            "gauge",
            "Tokens generated per second over the last 10 s, all requests together.",
            &one(tg),
        );
    }

    /// The context cache in memory and the context store.
    fn render_contexts(&self, o: &mut String) {
        metric(
            o,
            "kvmerger_context_cache_hits_total",
            "counter",
            "Requests whose prompt started with a cached context (same recipe, same tokens).",
            &one(c(&self.context_hits)),
        );
        metric(
            o,
            "kvmerger_context_cache_misses_total",
            "counter",
            "Requests that found no cached context to reuse.",
            &one(c(&self.context_misses)),
        );
        metric(
            o,
            "kvmerger_context_cache_reused_tokens_total",
            "counter",
            "Prompt tokens not prefilled because a cached context held them.",
            &one(c(&self.context_tokens_reused)),
        );
        metric(
            o,
            "kvmerger_context_cache_evictions_total",
            "counter",
            "Cached contexts evicted (least recently used) to make room.",
            &one(c(&self.context_evictions)),
        );
        for (name, help, v) in [
            (
                "kvmerger_context_store_hits_total",
                "Requests whose context was read from the context store (disk or Redis).",
                &self.store_hits,
            ),
            (
                "kvmerger_context_store_writes_total",
                "Compressed contexts written to the context store.",
                &self.store_writes,
            ),
            (
                "kvmerger_context_store_written_bytes_total",
                "Bytes written to the context store.",
                &self.store_bytes_written,
            ),
            (
                "kvmerger_context_store_corrupt_total",
                "Stored contexts that failed their checks (deleted and recomputed).",
                &self.store_corrupt,
            ),
            (
                "kvmerger_context_store_read_microseconds_total",
                "Time spent reading and checking the stored contexts that were used (divide by the hits for the mean).",
                &self.store_read_us,
            ),
            (
                "kvmerger_context_store_errors_total",
                "Reads or writes the context store failed (the request went on without it).",
                &self.store_errors,
            ),
        ] {
            metric(o, name, "counter", help, &one(c(v)));
        }
        metric(
            o,
            "kvmerger_context_cache_entries",
            "gauge",
            "Cached contexts held.",
            &one(g(&self.context_entries)),
        );
        metric(
            o,
            "kvmerger_context_cache_bytes",
            "gauge",
            "Bytes held by cached contexts (part of the KV memory budget).",
            &one(g(&self.context_bytes)),
        );
    }

    /// The queue, the running batch, engine steps and KV memory.
    fn render_engine(&self, o: &mut String, kv_budget: usize) {
        metric(
            o,
            "kvmerger_queue_depth",
            "gauge",
            "Requests waiting for admission.",
            &one(g(&self.queue_depth)),
        );
        metric(
            o,
            "kvmerger_running_requests",
            "gauge",
            "Requests admitted (prefilling or decoding).",
            &one(g(&self.running)),
        );
        metric(
            o,
            "kvmerger_running_requests_peak",
            "gauge",
            "Most requests admitted at once since start.",
            &one(g(&self.running_peak)),
        );
        metric(
            o,
            "kvmerger_engine_steps_total",
            "counter",
            "Batched forward passes.",
            &one(c(&self.steps)),
        );
        metric(
            o,
            "kvmerger_engine_step_sequences_total",
            "counter",
            "Sequences summed over batched forward passes (divide by steps for the mean batch).",
            &one(c(&self.step_sequences)),
        );
        metric(
            o,
            "kvmerger_kv_memory_budget_bytes",
            "gauge",
            "KV cache memory shared by running requests.",
            &one(kv_budget as f64),
        );
        metric(
            o,
            "kvmerger_kv_bytes_in_use",
            "gauge",
            "Bytes held by the KV caches of running requests.",
            &one(g(&self.kv_bytes_in_use)),
        );
        metric(
            o,
            "kvmerger_kv_bytes_reserved",
            "gauge",
            "Bytes admission has reserved for running requests (upper bounds of their caches).",
            &one(g(&self.kv_bytes_reserved)),
        );
        metric(
            o,
            "kvmerger_kv_bytes_saved",
            "gauge",
            "Bytes the running requests' caches would hold more without compression.",
            &one(g(&self.kv_bytes_saved)),
        );
        metric(
            o,
            "kvmerger_kv_bytes_peak",
            "gauge",
            "Most bytes held by KV caches at once since start.",
            &one(g(&self.kv_bytes_peak)),
        );
    }

    /// Compression passes and what they released, by method.
    fn render_compression(&self, o: &mut String) {
        let comp = lock(&self.compression).clone();
        let rows = |f: &dyn Fn(&MethodStats) -> f64| -> Vec<(String, f64)> {
            comp.iter()
                .map(|(m, s)| (format!("{{method=\"{m}\"}}"), f(s)))
                .collect()
        };
        metric(
            o,
            "kvmerger_compression_passes_total",
            "counter",
            "Compression passes (after prefill, and re-compressions while decoding) by method.",
            &rows(&|s| s.passes as f64),
        );
        metric(
            o,
            "kvmerger_compression_bytes_before_total",
            "counter",
            "KV bytes going into compression passes, by method.",
            &rows(&|s| s.bytes_before as f64),
        );
        metric(
            o,
            "kvmerger_compression_bytes_after_total",
            "counter",
            "KV bytes coming out of compression passes, by method.",
            &rows(&|s| s.bytes_after as f64),
        );
        metric(
            o,
            "kvmerger_kv_bytes_saved_total",
            "counter",
            "KV bytes released by compression since start, by method.",
            &rows(&|s| (s.bytes_before - s.bytes_after) as f64),
        );
        metric(
            o,
            "kvmerger_compression_ratio",
            "gauge",
            "Achieved compression by method: bytes after over bytes before, over all passes.",
            &rows(&|s| {
                if s.bytes_before == 0 {
                    1.0
                } else {
                    s.bytes_after as f64 / s.bytes_before as f64
                }
            }),
        );
        metric(
            o,
            "kvmerger_compression_seconds_total",
            "counter",
            "Time spent compressing, by method.",
            &rows(&|s| s.secs),
        );
    }

    /// The latency histograms.
    fn render_latency(&self, o: &mut String) {
        for (h, name, help) in [
            (
                &self.time_to_first_token,
                "kvmerger_time_to_first_token_seconds",
                "Arrival to the first generated token, per request.",
            ),
            (
                &self.time_per_output_token,
                "kvmerger_time_per_output_token_seconds",
                "Mean time between output tokens after the first, per finished generation of two tokens or more.",
            ),
            (
                &self.queue_wait,
                "kvmerger_queue_wait_seconds",
                "Arrival to admission into the running batch (tokenizing and queueing), per request.",
            ),
            (
                &self.request_latency,
                "kvmerger_request_seconds",
                "Arrival to the last token, per finished generation.",
            ),
        ] {
            h.render(o, name, help);
        }
    }
}

/// One metric family in Prometheus' text format: help, type, and a line per label set.
fn metric(o: &mut String, name: &str, kind: &str, help: &str, rows: &[(String, f64)]) {
    let _ = writeln!(o, "# HELP {name} {help}");
    let _ = writeln!(o, "# TYPE {name} {kind}");
    for (labels, v) in rows {
        let _ = writeln!(o, "{name}{labels} {v}");
    }
}

fn one(v: f64) -> Vec<(String, f64)> {
    vec![(String::new(), v)]
}

fn g(a: &AtomicUsize) -> f64 {
    a.load(Relaxed) as f64
}

fn c(a: &AtomicU64) -> f64 {
    a.load(Relaxed) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_is_prometheus_text_with_labels() {
        let m = Metrics::default();
        m.http_response("/v1/completions", 200);
        m.compressed("kvmerger", 1000, 400, 0.01);
        m.compressed("kvmerger", 1000, 600, 0.01);
        m.step(2, 10, 2);
        let text = m.render(1 << 20);
        assert!(text
            .contains("kvmerger_http_requests_total{route=\"/v1/completions\",status=\"200\"} 1"));
        assert!(text.contains("kvmerger_compression_ratio{method=\"kvmerger\"} 0.5"));
        assert!(text.contains("kvmerger_kv_bytes_saved_total{method=\"kvmerger\"} 1000"));
        assert!(text.contains("kvmerger_generated_tokens_total 2"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }

    #[test]
    fn latency_histograms_are_cumulative_with_sum_and_count() {
        let m = Metrics::default();
        for ms in [3, 40, 40, 700, 2_000_000] {
            m.time_to_first_token.observe(Duration::from_millis(ms));
        }
        let text = m.render(1 << 20);
        let line = |k: &str| {
            text.lines()
                .find(|l| l.starts_with(k))
                .unwrap_or_else(|| panic!("{k} missing:\n{text}"))
                .rsplit(' ')
                .next()
                .unwrap()
                .parse::<f64>()
                .unwrap()
        };
        let name = "kvmerger_time_to_first_token_seconds";
        assert!(text.contains(&format!("# TYPE {name} histogram")));
        assert_eq!(line(&format!("{name}_bucket{{le=\"0.005\"}}")), 1.0);
        assert_eq!(line(&format!("{name}_bucket{{le=\"0.05\"}}")), 3.0);
        assert_eq!(line(&format!("{name}_bucket{{le=\"1\"}}")), 4.0);
        assert_eq!(line(&format!("{name}_bucket{{le=\"600\"}}")), 4.0);
        assert_eq!(line(&format!("{name}_bucket{{le=\"+Inf\"}}")), 5.0);
        assert_eq!(line(&format!("{name}_count")), 5.0);
        assert!((line(&format!("{name}_sum")) - 2000.783).abs() < 1e-6);
        // Buckets never fall.
        let mut last = 0.0;
        for l in text
            .lines()
            .filter(|l| l.starts_with(&format!("{name}_bucket")))
        {
            let v: f64 = l.rsplit(' ').next().unwrap().parse().unwrap();
            assert!(v >= last, "{l}");
            last = v;
        }
    }
}
