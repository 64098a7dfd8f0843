//! Prometheus metrics, served at `/metrics` in the OpenMetrics text format.
//!
//! Components get handles (counters, histograms) at startup and update them as they work; values
//! that are states rather than events (the audit queue depth) are read when scraped. No metric
//! carries a secret or an unbounded label: labels are surfaces, operation names, status codes and
//! reason codes, all from fixed sets.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of a finished request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `instance`, `compute`, `admin`, `ops`, `unknown`.
    pub surface: &'static str,
    /// The operation (`password:get`, ...).
    pub operation: &'static str,
    /// The HTTP status answered.
    pub status: u16,
}

/// Labels of a refused or failed request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// The audit reason code.
    pub reason: &'static str,
}

/// Labels by rate limiter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    /// `global`, `source`, `instance`, `project`.
    pub limit: &'static str,
}

/// Labels by store backend and operation.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreLabels {
    /// `sqlite` or `postgres`.
    pub backend: &'static str,
    /// The store operation (`register`, `password`, `set_password_once`, ...).
    pub operation: &'static str,
}

/// Latency of store calls, by backend and operation.
pub type StoreLatency = Family<StoreLabels, Histogram>;

/// Labels by API surface.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SurfaceLabels {
    /// The API surface.
    pub surface: &'static str,
}

/// The audit writer's metrics.
#[derive(Clone, Debug)]
pub struct AuditMetrics {
    /// Events written.
    pub events_written: Counter,
    /// Writes to the log: each holds one or more events (events per write is the group size).
    pub batches_written: Counter,
    /// Batches that could not be written or flushed.
    pub write_failures: Counter,
    /// Time spent in `fdatasync`.
    pub fsync_seconds: Histogram,
    /// Events waiting for the writer (set when scraped).
    pub queue_depth: Gauge,
}

impl Default for AuditMetrics {
    fn default() -> Self {
        Self {
            events_written: Counter::default(),
            batches_written: Counter::default(),
            write_failures: Counter::default(),
            fsync_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            queue_depth: Gauge::default(),
        }
    }
}

/// Latency buckets from 100 µs to about 13 s.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_1, 2.0, 18))
}

/// Every metric metapass exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Requests answered, by surface, operation and status.
    pub requests: Family<RequestLabels, Counter>,
    /// Request latency by surface, from arrival to the answer (audit included).
    pub request_seconds: Family<SurfaceLabels, Histogram>,
    /// Requests not answered with success, by reason.
    pub refusals: Family<ReasonLabels, Counter>,
    /// The audit writer.
    pub audit: AuditMetrics,
    /// TLS handshakes that failed or timed out.
    pub tls_handshake_failures: Counter,
    /// TCP connections accepted.
    pub connections: Counter,
    /// Connections closed at accept: their source held its share, the listener was full of busy
    /// connections, or a PROXY header was missing or bad.
    pub connections_refused: Counter,
    /// Connections closed to make room for a new one (they had no request in flight).
    pub connections_shed: Counter,
    /// Connections closed by the first-request or idle timer.
    pub connections_timed_out: Counter,
    /// Connections open now (TLS handshake included).
    pub connections_open: Gauge,
    /// Requests refused by each rate limiter.
    pub rate_limit_hits: Family<LimitLabels, Counter>,
    /// Keys each keyed rate limiter holds (set when scraped).
    pub rate_limit_keys: Family<LimitLabels, Gauge>,
    /// Store call latency (a mutation's includes waiting for its audit event to be durable).
    pub store_seconds: StoreLatency,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every metric registered.
    ///
    /// Long on purpose: it is the list of every metric, one registration each.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("metapass");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by surface, operation and status",
            requests.clone(),
        );
        let request_seconds =
            Family::<SurfaceLabels, Histogram>::new_with_constructor(latency_histogram);
        registry.register(
            "request_seconds",
            "Request latency from arrival to answer, audit included",
            request_seconds.clone(),
        );
        let refusals = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "refusals",
            "Requests not answered with success, by reason",
            refusals.clone(),
        );
        let audit = AuditMetrics::default();
        registry.register(
            "audit_events_written",
            "Audit events written",
            audit.events_written.clone(),
        );
        registry.register(
            "audit_batches_written",
            "Writes to the audit log, each of one or more events",
            audit.batches_written.clone(),
        );
        registry.register(
            "audit_write_failures",
            "Audit batches that could not be written or flushed (requests failed closed)",
            audit.write_failures.clone(),
        );
        registry.register(
            "audit_fsync_seconds",
            "Time spent in fdatasync of the audit log",
            audit.fsync_seconds.clone(),
        );
        registry.register(
            "audit_queue_depth",
            "Audit events waiting for the writer",
            audit.queue_depth.clone(),
        );
        let tls_handshake_failures = Counter::default();
        registry.register(
            "tls_handshake_failures",
            "TLS handshakes that failed or timed out",
            tls_handshake_failures.clone(),
        );
        let connections_open = Gauge::default();
        registry.register(
            "connections_open",
            "Connections open now",
            connections_open.clone(),
        );
        let connections_refused = Counter::default();
        registry.register(
            "connections_refused",
            "Connections closed at accept (source at its share, listener full of busy connections, bad PROXY header)",
            connections_refused.clone(),
        );
        let connections_shed = Counter::default();
        registry.register(
            "connections_shed",
            "Connections closed to make room for a new one on a full listener",
            connections_shed.clone(),
        );
        let connections_timed_out = Counter::default();
        registry.register(
            "connections_timed_out",
            "Connections closed by the first-request or idle timer",
            connections_timed_out.clone(),
        );
        let rate_limit_hits = Family::<LimitLabels, Counter>::default();
        registry.register(
            "rate_limit_hits",
            "Requests refused by each rate limiter",
            rate_limit_hits.clone(),
        );
        let rate_limit_keys = Family::<LimitLabels, Gauge>::default();
        registry.register(
            "rate_limit_keys",
            "Keys each keyed rate limiter holds",
            rate_limit_keys.clone(),
        );
        let connections = Counter::default();
        registry.register(
            "connections",
            "TCP connections accepted",
            connections.clone(),
        );
        let store_seconds = StoreLatency::new_with_constructor(latency_histogram);
        registry.register(
            "store_seconds",
            "Store call latency by backend and operation (mutations include their audit fsync)",
            store_seconds.clone(),
        );
        Self {
            registry,
            requests,
            request_seconds,
            refusals,
            audit,
            tls_handshake_failures,
            connections,
            connections_refused,
            connections_shed,
            connections_timed_out,
            connections_open,
            rate_limit_hits,
            store_seconds,
            rate_limit_keys,
        }
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("metrics encode");
        out
    }
}

/// Shared metrics.
pub type SharedMetrics = Arc<Metrics>;
