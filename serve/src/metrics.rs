//! Prometheus metrics of the serving endpoint, rendered as text: requests
//! and errors by route and status, time to first token, inter-token
//! latency, generated tokens, requests in flight.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Seconds; from a fast CPU token to a long queue.
const BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

#[derive(Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    /// Sum in microseconds (integers add without a lock).
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, secs: f64) {
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                self.counts[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add((secs * 1e6) as u64, Ordering::Relaxed);
    }

    fn render(&self, name: &str, help: &str, out: &mut String) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{b}\"}} {}",
                self.counts[i].load(Ordering::Relaxed)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_us.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {count}");
    }
}

#[derive(Default)]
pub struct Metrics {
    /// (route, status) → requests.
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    pub generated_tokens: AtomicU64,
    pub in_flight: AtomicU64,
    /// Generations stopped because their client went away.
    pub cancelled: AtomicU64,
}

impl Metrics {
    pub fn request(&self, route: &str, status: u16) {
        *self
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((route.to_string(), status))
            .or_default() += 1;
    }

    pub fn render(&self, ready: bool) -> String {
        let mut out = String::new();
        let requests = self
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        out.push_str("# HELP rm_serve_requests_total HTTP requests by route and status.\n# TYPE rm_serve_requests_total counter\n");
        for ((route, status), n) in &requests {
            let _ = writeln!(
                out,
                "rm_serve_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        out.push_str("# HELP rm_serve_request_errors_total Requests answered 4xx or 5xx, by route and status.\n# TYPE rm_serve_request_errors_total counter\n");
        for ((route, status), n) in requests.iter().filter(|((_, s), _)| *s >= 400) {
            let _ = writeln!(
                out,
                "rm_serve_request_errors_total{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        self.time_to_first_token.render(
            "rm_serve_time_to_first_token_seconds",
            "From a generation's request to its first token.",
            &mut out,
        );
        self.inter_token_latency.render(
            "rm_serve_inter_token_latency_seconds",
            "Between consecutive tokens of a streamed generation.",
            &mut out,
        );
        let gauge = |out: &mut String, name: &str, kind: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        };
        gauge(
            &mut out,
            "rm_serve_generated_tokens_total",
            "counter",
            "Tokens generated (rate() of it is tokens per second).",
            self.generated_tokens.load(Ordering::Relaxed),
        );
        gauge(
            &mut out,
            "rm_serve_requests_in_flight",
            "gauge",
            "Inference requests being answered (queued in the agent or generating).",
            self.in_flight.load(Ordering::Relaxed),
        );
        gauge(
            &mut out,
            "rm_serve_generations_cancelled_total",
            "counter",
            "Generations stopped because their client went away.",
            self.cancelled.load(Ordering::Relaxed),
        );
        gauge(
            &mut out,
            "rm_serve_model_ready",
            "gauge",
            "1 when the model is compiled and loaded.",
            u64::from(ready),
        );
        out
    }
}

/// Counts a request in flight while it lives.
pub struct InFlight<'a>(&'a AtomicU64);

impl<'a> InFlight<'a> {
    pub fn start(g: &'a AtomicU64) -> Self {
        g.fetch_add(1, Ordering::Relaxed);
        InFlight(g)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_histograms_and_gauges() {
        let m = Metrics::default();
        m.request("/v1/completions", 200);
        m.request("/v1/completions", 404);
        m.time_to_first_token.observe(0.02);
        m.generated_tokens.fetch_add(5, Ordering::Relaxed);
        {
            let _a = InFlight::start(&m.in_flight);
            assert!(m.render(true).contains("rm_serve_requests_in_flight 1"));
        }
        let t = m.render(false);
        assert!(
            t.contains("rm_serve_requests_total{route=\"/v1/completions\",status=\"200\"} 1"),
            "{t}"
        );
        assert!(
            t.contains("rm_serve_request_errors_total{route=\"/v1/completions\",status=\"404\"} 1")
        );
        assert!(
            !t.contains("rm_serve_request_errors_total{route=\"/v1/completions\",status=\"200\"}")
        );
        assert!(t.contains("rm_serve_time_to_first_token_seconds_bucket{le=\"0.025\"} 1"));
        assert!(t.contains("rm_serve_time_to_first_token_seconds_bucket{le=\"0.01\"} 0"));
        assert!(t.contains("rm_serve_generated_tokens_total 5"));
        assert!(t.contains("rm_serve_requests_in_flight 0"));
        assert!(t.contains("rm_serve_model_ready 0"));
    }
}
