//! Prometheus metrics of the operator.

use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use rm_crds::{InferenceWorkload, Phase};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub error: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeviceLabels {
    pub device_type: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriteLabels {
    pub kind: String,
}

pub struct Metrics {
    pub registry: Registry,
    reconciles: Counter,
    errors: Family<ErrorLabels, Counter>,
    duration: Histogram,
    selections: Family<DeviceLabels, Counter>,
    writes: Family<WriteLabels, Counter>,
    workloads: Family<PhaseLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("rm_operator");
        let reconciles = Counter::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        let duration = Histogram::new(exponential_buckets(0.0005, 2.0, 14));
        let selections = Family::<DeviceLabels, Counter>::default();
        let writes = Family::<WriteLabels, Counter>::default();
        let workloads = Family::<PhaseLabels, Gauge>::default();
        registry.register("reconciles", "Reconciles run", reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Reconciles that failed, by error",
            errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Duration of a reconcile",
            duration.clone(),
        );
        registry.register(
            "device_selections",
            "Device decisions that changed a workload's device, by type and reason",
            selections.clone(),
        );
        registry.register(
            "api_writes",
            "Writes to the apiserver made by reconciles, by kind",
            writes.clone(),
        );
        registry.register(
            "workloads",
            "InferenceWorkloads by phase",
            workloads.clone(),
        );
        Self {
            registry,
            reconciles,
            errors,
            duration,
            selections,
            writes,
            workloads,
        }
    }
}

/// Observes the duration of one reconcile when dropped.
pub struct ReconcileTimer<'a> {
    start: Instant,
    histogram: &'a Histogram,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.histogram.observe(self.start.elapsed().as_secs_f64());
    }
}

impl Metrics {
    pub fn reconcile(&self) -> ReconcileTimer<'_> {
        self.reconciles.inc();
        ReconcileTimer {
            start: Instant::now(),
            histogram: &self.duration,
        }
    }

    pub fn error(&self, error: &str) {
        self.errors
            .get_or_create(&ErrorLabels {
                error: error.into(),
            })
            .inc();
    }

    pub fn selection(&self, device_type: &str, reason: &str) {
        self.selections
            .get_or_create(&DeviceLabels {
                device_type: device_type.into(),
                reason: reason.into(),
            })
            .inc();
    }

    pub fn write(&self, kind: &str) {
        self.writes
            .get_or_create(&WriteLabels { kind: kind.into() })
            .inc();
    }

    /// Recounts the workloads by phase (at scrape time, from the cache).
    pub fn count_phases<'a>(&self, workloads: impl IntoIterator<Item = &'a InferenceWorkload>) {
        let phases = [
            Phase::Pending,
            Phase::Progressing,
            Phase::Running,
            Phase::Degraded,
            Phase::Failed,
        ];
        let mut counts = [0i64; 5];
        for iw in workloads {
            let phase = iw
                .status
                .as_ref()
                .and_then(|s| s.phase)
                .unwrap_or(Phase::Pending);
            if let Some(i) = phases.iter().position(|p| *p == phase) {
                counts[i] += 1;
            }
        }
        for (phase, n) in phases.iter().zip(counts) {
            self.workloads
                .get_or_create(&PhaseLabels {
                    phase: format!("{phase:?}"),
                })
                .set(n);
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
