//! Prometheus metrics, kept as plain atomics and rendered in the text format.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default)]
pub struct Metrics {
    pub prepare_requests: AtomicU64,
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    pub compiles_started: AtomicU64,
    pub compiles_failed: AtomicU64,
    pub generate_requests: AtomicU64,
    pub generate_errors: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub forward_requests: AtomicU64,
    pub forward_errors: AtomicU64,
    pub refused_requests: AtomicU64,
    /// Refused with 429/503: a namespace's or the node's queue was full.
    pub refused_busy: AtomicU64,
    pub request_timeouts: AtomicU64,
    /// Stopped because their client went away.
    pub requests_cancelled: AtomicU64,
    /// Model files refused as malformed: by the in-process header walk or
    /// because they crashed or failed the isolated check (`cpu::probe`).
    pub models_malformed: AtomicU64,
    /// Uploaded blobs removed to keep within `--uploads-max-bytes`.
    pub uploads_evicted: AtomicU64,
}

/// Gauges read at scrape time.
pub struct Gauges {
    pub cache_bytes: u64,
    pub cache_max_bytes: u64,
    pub cache_entries: usize,
    pub compiles_running: usize,
    pub evictions: u64,
    pub worker_restarts: Vec<(String, u64)>,
    pub requests_waiting: usize,
    pub requests_running: usize,
    pub compiles_waiting: usize,
    pub hub_evictions: u64,
    /// Worker processes stopped because their allocation ended, by backend.
    pub workers_released: Vec<(String, u64)>,
}

impl Metrics {
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> serde_json::Value {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        serde_json::json!({
            "prepare_requests": g(&self.prepare_requests),
            "cache_hits": g(&self.cache_hits),
            "cache_misses": g(&self.cache_misses),
            "compiles_started": g(&self.compiles_started),
            "compiles_failed": g(&self.compiles_failed),
            "generate_requests": g(&self.generate_requests),
            "generated_tokens": g(&self.generated_tokens),
            "forward_requests": g(&self.forward_requests),
            "refused_requests": g(&self.refused_requests),
            "refused_busy": g(&self.refused_busy),
            "request_timeouts": g(&self.request_timeouts),
            "requests_cancelled": g(&self.requests_cancelled),
            "models_malformed": g(&self.models_malformed),
        })
    }

    pub fn render(&self, gauges: &Gauges) -> String {
        let mut s = String::new();
        let counters: [(&str, &str, &AtomicU64); 16] = [
            (
                "rm_agent_prepare_requests_total",
                "prepare requests",
                &self.prepare_requests,
            ),
            (
                "rm_agent_cache_hits_total",
                "prepares served from the cache",
                &self.cache_hits,
            ),
            (
                "rm_agent_cache_misses_total",
                "prepares that needed a compile",
                &self.cache_misses,
            ),
            (
                "rm_agent_compiles_started_total",
                "compiles started (one per missing entry)",
                &self.compiles_started,
            ),
            (
                "rm_agent_compiles_failed_total",
                "compiles that failed",
                &self.compiles_failed,
            ),
            (
                "rm_agent_generate_requests_total",
                "generate requests",
                &self.generate_requests,
            ),
            (
                "rm_agent_generate_errors_total",
                "generate requests that failed",
                &self.generate_errors,
            ),
            (
                "rm_agent_generated_tokens_total",
                "tokens generated",
                &self.generated_tokens,
            ),
            (
                "rm_agent_forward_requests_total",
                "forward (logits) requests",
                &self.forward_requests,
            ),
            (
                "rm_agent_forward_errors_total",
                "forward (logits) requests that failed",
                &self.forward_errors,
            ),
            (
                "rm_agent_refused_requests_total",
                "requests refused for their token or device",
                &self.refused_requests,
            ),
            (
                "rm_agent_refused_busy_total",
                "requests refused because a namespace's or the node's queue was full (429/503)",
                &self.refused_busy,
            ),
            (
                "rm_agent_request_timeouts_total",
                "generate/forward requests stopped at the request timeout, the agent's or a worker's (504)",
                &self.request_timeouts,
            ),
            (
                "rm_agent_requests_cancelled_total",
                "generate/forward requests stopped because their client went away",
                &self.requests_cancelled,
            ),
            (
                "rm_agent_models_malformed_total",
                "model files refused as malformed (header checks, or a crash of the isolated loader check)",
                &self.models_malformed,
            ),
            (
                "rm_agent_uploads_evicted_total",
                "uploaded blobs removed to keep within --uploads-max-bytes",
                &self.uploads_evicted,
            ),
        ];
        for (name, help, c) in counters {
            let _ = writeln!(
                s,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                c.load(Ordering::Relaxed)
            );
        }
        let gauges_list = [
            (
                "rm_agent_cache_bytes",
                "bytes in cache entries",
                gauges.cache_bytes,
            ),
            (
                "rm_agent_cache_max_bytes",
                "cache size limit",
                gauges.cache_max_bytes,
            ),
            (
                "rm_agent_cache_entries",
                "cache entries",
                gauges.cache_entries as u64,
            ),
            (
                "rm_agent_compiles_running",
                "compiles in progress",
                gauges.compiles_running as u64,
            ),
            (
                "rm_agent_cache_evictions",
                "cache entries evicted since start",
                gauges.evictions,
            ),
            (
                "rm_agent_requests_waiting",
                "generate/forward requests waiting for a slot",
                gauges.requests_waiting as u64,
            ),
            (
                "rm_agent_requests_running",
                "generate/forward requests running",
                gauges.requests_running as u64,
            ),
            (
                "rm_agent_hub_evictions",
                "hub downloads removed to keep within --hub-max-bytes since start",
                gauges.hub_evictions,
            ),
            (
                "rm_agent_compiles_waiting",
                "compiles waiting for a compile slot",
                gauges.compiles_waiting as u64,
            ),
        ];
        for (name, help, v) in gauges_list {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        let _ = writeln!(
            s,
            "# HELP rm_agent_worker_restarts_total worker process restarts\n# TYPE rm_agent_worker_restarts_total counter"
        );
        for (backend, n) in &gauges.worker_restarts {
            let _ = writeln!(
                s,
                "rm_agent_worker_restarts_total{{backend=\"{backend}\"}} {n}"
            );
        }
        let _ = writeln!(
            s,
            "# HELP rm_agent_workers_released_total worker processes stopped because their allocation ended (pod gone, lease lapsed, or devices given to another pod)\n# TYPE rm_agent_workers_released_total counter"
        );
        for (backend, n) in &gauges.workers_released {
            let _ = writeln!(
                s,
                "rm_agent_workers_released_total{{backend=\"{backend}\"}} {n}"
            );
        }
        s
    }
}
