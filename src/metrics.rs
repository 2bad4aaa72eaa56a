//! The worker's Prometheus metrics, served as OpenMetrics text on `GET /metrics`.
//!
//! Names follow `k6_ingest_<name>_<unit>`; counters get their `_total` suffix from the
//! encoder. Labels stay few and bounded: the reason class of a dead letter or retry
//! (a fixed set, from `IngestError::class` / `MessageError::class`), a dependency
//! (`database`, `s3`, `amqp`, `artifact_host`), an artifact host (only allow-listed hosts
//! are ever fetched from, so `fetch.allowed_hosts` bounds them), never an id.

use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

type ClassLabels = [(&'static str, &'static str); 1];
type HostLabels = [(&'static str, String); 1];

/// Shared handles to every metric; cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    received: Counter,
    ingested: Counter,
    duplicates: Counter,
    retried: Family<ClassLabels, Counter>,
    dead_lettered: Family<ClassLabels, Counter>,
    ingest_duration: Histogram,
    in_flight: Gauge,
    uploaded_bytes: Counter,
    amqp_connected: Gauge,
    amqp_connections: Counter,
    database_up: Gauge,
    dependency_up: Family<ClassLabels, Gauge>,
    artifact_host_up: Family<HostLabels, Gauge>,
    artifact_hosts_down: Gauge,
    breaker_openings: Family<ClassLabels, Counter>,
    held: Family<ClassLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("k6_ingest");
        let received = Counter::default();
        registry.register(
            "messages_received",
            "Deliveries taken from the work queue",
            received.clone(),
        );
        let ingested = Counter::default();
        registry.register(
            "messages_ingested",
            "Runs stored (new, or an error record replaced)",
            ingested.clone(),
        );
        let duplicates = Counter::default();
        registry.register(
            "messages_duplicate",
            "Deliveries of runs already stored: acknowledged, nothing written",
            duplicates.clone(),
        );
        let retried = Family::<ClassLabels, Counter>::default();
        registry.register(
            "messages_retried",
            "Deliveries sent to a retry delay queue, by reason class",
            retried.clone(),
        );
        let dead_lettered = Family::<ClassLabels, Counter>::default();
        registry.register(
            "messages_dead_lettered",
            "Deliveries sent to the dead-letter queue, by reason class",
            dead_lettered.clone(),
        );
        // 10 ms .. ~80 s: a run with a large raw-metrics file takes tens of seconds.
        let ingest_duration = Histogram::new(exponential_buckets(0.01, 2.0, 14));
        registry.register_with_unit(
            "ingest_duration",
            "Time spent ingesting one delivery (every step of its run), whatever the outcome",
            Unit::Seconds,
            ingest_duration.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "in_flight_messages",
            "Deliveries being processed now",
            in_flight.clone(),
        );
        let uploaded_bytes = Counter::default();
        registry.register_with_unit(
            "artifact_uploaded",
            "Artifact bytes uploaded to S3",
            Unit::Bytes,
            uploaded_bytes.clone(),
        );
        let amqp_connected = Gauge::default();
        registry.register(
            "amqp_connected",
            "1 while connected to RabbitMQ and consuming",
            amqp_connected.clone(),
        );
        let amqp_connections = Counter::default();
        registry.register(
            "amqp_connections",
            "Connections established to RabbitMQ (more than 1 means reconnects)",
            amqp_connections.clone(),
        );
        let database_up = Gauge::default();
        registry.register(
            "database_up",
            "1 while the last PostgreSQL probe succeeded",
            database_up.clone(),
        );
        let dependency_up = Family::<ClassLabels, Gauge>::default();
        registry.register(
            "dependency_up",
            "1 while the dependency (database, s3, amqp) answers, 0 while its breaker is open",
            dependency_up.clone(),
        );
        let artifact_host_up = Family::<HostLabels, Gauge>::default();
        registry.register(
            "artifact_host_up",
            "Per artifact host that has failed once: 1 while it answers, 0 while its breaker is open",
            artifact_host_up.clone(),
        );
        let artifact_hosts_down = Gauge::default();
        registry.register(
            "artifact_hosts_down",
            "Artifact hosts whose breaker is open",
            artifact_hosts_down.clone(),
        );
        let breaker_openings = Family::<ClassLabels, Counter>::default();
        registry.register(
            "breaker_openings",
            "Times a dependency was found down and its breaker opened",
            breaker_openings.clone(),
        );
        let held = Family::<ClassLabels, Counter>::default();
        registry.register(
            "deliveries_held",
            "Deliveries paused (held unacked, no attempt spent) until a dependency came back",
            held.clone(),
        );
        Self {
            inner: Arc::new(Inner {
                registry,
                received,
                ingested,
                duplicates,
                retried,
                dead_lettered,
                ingest_duration,
                in_flight,
                uploaded_bytes,
                amqp_connected,
                amqp_connections,
                database_up,
                dependency_up,
                artifact_host_up,
                artifact_hosts_down,
                breaker_openings,
                held,
            }),
        }
    }

    /// The OpenMetrics text exposition, which Prometheus scrapes natively.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.inner.registry);
        out
    }

    pub fn received(&self) {
        self.inner.received.inc();
    }

    pub fn ingested(&self, bytes_uploaded: u64) {
        self.inner.ingested.inc();
        self.inner.uploaded_bytes.inc_by(bytes_uploaded);
    }

    pub fn duplicate(&self) {
        self.inner.duplicates.inc();
    }

    pub fn retried(&self, class: &'static str) {
        self.inner.retried.get_or_create(&[("reason", class)]).inc();
    }

    pub fn dead_lettered(&self, class: &'static str) {
        self.inner
            .dead_lettered
            .get_or_create(&[("reason", class)])
            .inc();
    }

    pub fn observe_ingest(&self, seconds: f64) {
        self.inner.ingest_duration.observe(seconds);
    }

    /// Counts a delivery in flight until the guard is dropped (whatever path it takes).
    pub fn in_flight(&self) -> InFlight {
        self.inner.in_flight.inc();
        InFlight(self.inner.in_flight.clone())
    }

    pub fn amqp_connected(&self, up: bool) {
        self.inner.amqp_connected.set(i64::from(up));
        self.dependency_up("amqp", up);
        if up {
            self.inner.amqp_connections.inc();
        }
    }

    pub fn database_up(&self, up: bool) {
        self.inner.database_up.set(i64::from(up));
    }

    /// `dependency` is `database`, `s3` or `amqp`.
    pub fn dependency_up(&self, dependency: &'static str, up: bool) {
        if dependency == "database" {
            self.database_up(up);
        }
        self.inner
            .dependency_up
            .get_or_create(&[("dependency", dependency)])
            .set(i64::from(up));
    }

    /// One host's state, and how many hosts are down now.
    pub fn artifact_host_up(&self, host: &str, up: bool, hosts_down: usize) {
        self.inner
            .artifact_host_up
            .get_or_create(&[("host", host.to_string())])
            .set(i64::from(up));
        self.inner
            .artifact_hosts_down
            .set(i64::try_from(hosts_down).unwrap_or(i64::MAX));
    }

    pub fn breaker_opened(&self, dependency: &'static str) {
        self.inner
            .breaker_openings
            .get_or_create(&[("dependency", dependency)])
            .inc();
    }

    pub fn held(&self, dependency: &'static str) {
        self.inner
            .held
            .get_or_create(&[("dependency", dependency)])
            .inc();
    }

    pub fn held_count(&self, dependency: &'static str) -> u64 {
        self.inner
            .held
            .get_or_create(&[("dependency", dependency)])
            .get()
    }

    pub fn breaker_openings_count(&self, dependency: &'static str) -> u64 {
        self.inner
            .breaker_openings
            .get_or_create(&[("dependency", dependency)])
            .get()
    }

    /// Current values, for tests and logs.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            received: self.inner.received.get(),
            ingested: self.inner.ingested.get(),
            duplicates: self.inner.duplicates.get(),
            in_flight: self.inner.in_flight.get(),
            amqp_connections: self.inner.amqp_connections.get(),
        }
    }

    pub fn retried_count(&self, class: &'static str) -> u64 {
        self.inner.retried.get_or_create(&[("reason", class)]).get()
    }

    pub fn dead_lettered_count(&self, class: &'static str) -> u64 {
        self.inner
            .dead_lettered
            .get_or_create(&[("reason", class)])
            .get()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    pub received: u64,
    pub ingested: u64,
    pub duplicates: u64,
    pub in_flight: i64,
    pub amqp_connections: u64,
}

/// Decrements the in-flight gauge on drop.
pub struct InFlight(Gauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}
