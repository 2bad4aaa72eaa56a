//! Circuit breakers, one per dependency: while PostgreSQL, S3 or an artifact host is
//! down the worker pauses and probes it instead of burning deliveries through the retry
//! queues, whose attempt budget is for faults of the message.
//!
//! A breaker is closed (the dependency is up) or open (down). It opens when a delivery
//! reports a [`Fault::Dependency`](crate::fault::Fault) and the dependency's own probe
//! confirms it, or when the periodic check of PostgreSQL and S3 fails; it closes when a
//! probe succeeds. While open, a probe runs with backoff (`breaker.probe_base_ms` doubling
//! up to `breaker.probe_max_ms`). Probes are cheap and answer only "does it answer":
//! PostgreSQL a new connection and `SELECT 1` (a simple query, so it also works through a
//! transaction pooler), S3 HeadBucket on the worker's bucket (one try; any non-5xx answer
//! is up), an artifact host a TCP connect.
//!
//! Opening logs one warning and closing one info line, from the same place that sets the
//! metrics and `/readyz`, never once per delivery.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_s3::error::SdkError;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::config::BreakerSettings;
use crate::fault::Dependency;
use crate::http::Health;
use crate::metrics::Metrics;

/// How a dependency is asked whether it answers.
enum Probe {
    Database(sqlx::PgPool),
    Store {
        client: aws_sdk_s3::Client,
        bucket: String,
    },
    /// `host:port`, connected to over TCP.
    Host(String),
}

struct Breaker {
    dependency: Dependency,
    probe: Probe,
    up: watch::Sender<bool>,
    /// One confirming probe at a time: deliveries failing together wait for its verdict.
    confirming: tokio::sync::Mutex<()>,
    /// Wakes the periodic check of a global dependency so it probes with backoff now.
    wake: Notify,
}

/// What [`Breakers::confirm`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The dependency is down: hold the delivery until it is back; no attempt is spent.
    Down,
    /// The dependency answers its probe, so the fault is the message's.
    Up,
}

/// The worker's breakers; cheap to clone.
#[derive(Clone)]
pub struct Breakers {
    inner: Arc<Inner>,
}

struct Inner {
    database: Option<Arc<Breaker>>,
    store: Option<Arc<Breaker>>,
    hosts: Mutex<HashMap<String, Arc<Breaker>>>,
    settings: BreakerSettings,
    metrics: Metrics,
    health: Health,
    stop: CancellationToken,
}

impl Breakers {
    /// Breakers for the dependencies the worker has; a missing one counts as up. The
    /// probes stop with `stop`.
    pub fn new(
        settings: &BreakerSettings,
        pool: Option<sqlx::PgPool>,
        store: Option<(aws_sdk_s3::Client, String)>,
        metrics: Metrics,
        health: Health,
        stop: CancellationToken,
    ) -> Self {
        let make = |dependency, probe| {
            Arc::new(Breaker {
                dependency,
                probe,
                // Up until a probe says otherwise: `/readyz` waits for the first check.
                up: watch::Sender::new(true),
                confirming: tokio::sync::Mutex::new(()),
                wake: Notify::new(),
            })
        };
        let database = pool.map(|p| make(Dependency::Database, Probe::Database(p)));
        let store = store.map(|(client, bucket)| {
            make(Dependency::ArtifactStore, Probe::Store { client, bucket })
        });
        if database.is_none() {
            health.set_database(true);
        }
        if store.is_none() {
            health.set_s3(true);
        }
        Self {
            inner: Arc::new(Inner {
                database,
                store,
                hosts: Mutex::new(HashMap::new()),
                settings: settings.clone(),
                metrics,
                health,
                stop,
            }),
        }
    }

    /// Starts the periodic checks of PostgreSQL and S3 (until `stop`).
    pub fn spawn_checks(&self) {
        for b in [&self.inner.database, &self.inner.store]
            .into_iter()
            .flatten()
        {
            tokio::spawn(self.clone().check_loop(b.clone()));
        }
    }

    /// Waits until PostgreSQL and S3 are both up; `false` if `cancel` came first.
    pub async fn wait_global(&self, cancel: &CancellationToken) -> bool {
        for b in [&self.inner.database, &self.inner.store]
            .into_iter()
            .flatten()
        {
            if !wait_up(b, cancel).await {
                return false;
            }
        }
        true
    }

    /// Whether a global dependency is down now.
    pub fn global_down(&self) -> Option<Dependency> {
        [&self.inner.database, &self.inner.store]
            .into_iter()
            .flatten()
            .find(|b| !*b.up.borrow())
            .map(|b| b.dependency.clone())
    }

    /// Checks a dependency a delivery suspects: down already, or down by its probe now,
    /// opens (or keeps open) its breaker. A dependency the worker does not have (no
    /// database configured) cannot be down.
    pub async fn confirm(&self, dependency: &Dependency) -> Verdict {
        let Some(b) = self.breaker(dependency) else {
            return Verdict::Up;
        };
        let _one = b.confirming.lock().await;
        if !*b.up.borrow() {
            return Verdict::Down;
        }
        if self.probe(&b).await {
            return Verdict::Up;
        }
        if self.set(&b, false) {
            match b.dependency {
                // An artifact host has no periodic check: probe it until it is back.
                Dependency::ArtifactHost(_) => {
                    tokio::spawn(self.clone().until_up(b.clone()));
                }
                _ => b.wake.notify_one(),
            }
        }
        Verdict::Down
    }

    /// Waits until the dependency's breaker closes; `false` if `cancel` came first.
    pub async fn wait_up(&self, dependency: &Dependency, cancel: &CancellationToken) -> bool {
        match self.breaker(dependency) {
            Some(b) => wait_up(&b, cancel).await,
            None => true,
        }
    }

    /// How long a delivery may wait for an artifact host (`breaker.host_wait_secs`).
    pub fn host_wait(&self) -> Duration {
        Duration::from_secs(self.inner.settings.host_wait_secs)
    }

    fn breaker(&self, dependency: &Dependency) -> Option<Arc<Breaker>> {
        match dependency {
            Dependency::Database => self.inner.database.clone(),
            Dependency::ArtifactStore => self.inner.store.clone(),
            Dependency::ArtifactHost(host) => {
                // Hosts come from messages, but only allow-listed ones reach a fetch, so
                // this map (and the metric labels) stays as small as fetch.allowed_hosts.
                let mut hosts = self
                    .inner
                    .hosts
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                Some(
                    hosts
                        .entry(host.clone())
                        .or_insert_with(|| {
                            Arc::new(Breaker {
                                dependency: dependency.clone(),
                                probe: Probe::Host(host.clone()),
                                up: watch::Sender::new(true),
                                confirming: tokio::sync::Mutex::new(()),
                                wake: Notify::new(),
                            })
                        })
                        .clone(),
                )
            }
        }
    }

    /// Probes while up every `check_interval_ms`, while down with backoff.
    async fn check_loop(self, b: Arc<Breaker>) {
        let s = &self.inner.settings;
        let interval = Duration::from_millis(s.check_interval_ms);
        let (base, max) = (
            Duration::from_millis(s.probe_base_ms),
            Duration::from_millis(s.probe_max_ms),
        );
        let mut backoff = base;
        loop {
            let ok = self.probe(&b).await;
            self.set(&b, ok);
            let wait = if ok {
                backoff = base;
                interval
            } else {
                let w = backoff;
                backoff = (backoff * 2).min(max);
                w
            };
            tokio::select! {
                () = self.inner.stop.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
                () = b.wake.notified() => {}
            }
        }
    }

    /// Probes an open breaker with backoff until it closes (or the worker stops).
    async fn until_up(self, b: Arc<Breaker>) {
        let s = &self.inner.settings;
        let max = Duration::from_millis(s.probe_max_ms);
        let mut backoff = Duration::from_millis(s.probe_base_ms);
        loop {
            tokio::select! {
                () = self.inner.stop.cancelled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            if self.probe(&b).await {
                self.set(&b, true);
                return;
            }
            backoff = (backoff * 2).min(max);
        }
    }

    async fn probe(&self, b: &Breaker) -> bool {
        let timeout = Duration::from_millis(self.inner.settings.probe_timeout_ms);
        let probe = async {
            match &b.probe {
                Probe::Database(pool) => {
                    crate::db::probe_new_connection(&pool.connect_options()).await
                }
                Probe::Store { client, bucket } => {
                    // One try: the SDK's own retries would only delay the verdict, and
                    // the breaker probes again anyway.
                    let once = aws_sdk_s3::config::Builder::default()
                        .retry_config(aws_sdk_s3::config::retry::RetryConfig::disabled());
                    match client
                        .head_bucket()
                        .bucket(bucket)
                        .customize()
                        .config_override(once)
                        .send()
                        .await
                    {
                        Ok(_) => true,
                        // The endpoint answered: a 403 or 404 is a configuration matter,
                        // not an outage, and deliveries will say so themselves.
                        Err(SdkError::ServiceError(se)) => se.raw().status().as_u16() < 500,
                        Err(_) => false,
                    }
                }
                Probe::Host(host) => tokio::net::TcpStream::connect(host.as_str()).await.is_ok(),
            }
        };
        matches!(tokio::time::timeout(timeout, probe).await, Ok(true))
    }

    /// Records the breaker's state; on a change logs once and updates metrics and
    /// `/readyz`. Returns whether the state changed.
    fn set(&self, b: &Breaker, up: bool) -> bool {
        let changed = b.up.send_if_modified(|state| {
            let changed = *state != up;
            *state = up;
            changed
        });
        let (metrics, health) = (&self.inner.metrics, &self.inner.health);
        match &b.dependency {
            Dependency::Database => {
                health.set_database(up);
                metrics.dependency_up("database", up);
            }
            Dependency::ArtifactStore => {
                health.set_s3(up);
                metrics.dependency_up("s3", up);
            }
            Dependency::ArtifactHost(host) => {
                health.set_host(host, up);
                metrics.artifact_host_up(host, up, health.hosts_down().len());
            }
        }
        if changed {
            if up {
                tracing::info!(dependency = %b.dependency, "dependency is back: breaker closed, resuming");
            } else {
                metrics.breaker_opened(b.dependency.label());
                tracing::warn!(
                    dependency = %b.dependency,
                    "dependency is down: breaker open, deliveries wait while it is probed"
                );
            }
        }
        changed
    }
}

async fn wait_up(b: &Breaker, cancel: &CancellationToken) -> bool {
    let mut rx = b.up.subscribe();
    tokio::select! {
        biased;
        () = cancel.cancelled() => false,
        r = rx.wait_for(|up| *up) => r.is_ok(),
    }
}
