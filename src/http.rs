//! `GET /livez`, `/readyz` and `/metrics` for the orchestrator and Prometheus.
//!
//! `/livez` only says the process answers: restarting a worker because the broker or
//! the database is away would not bring them back. `/readyz` says whether the worker is
//! doing its job (RabbitMQ, PostgreSQL and S3 up, not shutting down) and, in a small JSON
//! body, which dependency is down, so an outage shows on dashboards and a rollout waits
//! for a new pod to really consume. An artifact host that is down is listed but does not
//! make the worker unready: it is one tenant's host, and the other runs go on.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// What `/readyz` reports: each dependency's state and whether the worker is stopping.
#[derive(Clone, Default)]
pub struct Health {
    inner: Arc<HealthInner>,
}

#[derive(Default)]
struct HealthInner {
    amqp: AtomicBool,
    database: AtomicBool,
    s3: AtomicBool,
    stopping: AtomicBool,
    hosts_down: Mutex<BTreeSet<String>>,
}

impl Health {
    pub fn set_amqp(&self, up: bool) {
        self.inner.amqp.store(up, Ordering::SeqCst);
    }

    pub fn set_database(&self, up: bool) {
        self.inner.database.store(up, Ordering::SeqCst);
    }

    pub fn set_s3(&self, up: bool) {
        self.inner.s3.store(up, Ordering::SeqCst);
    }

    pub fn set_host(&self, host: &str, up: bool) {
        let mut down = self.hosts();
        if up {
            down.remove(host);
        } else {
            down.insert(host.to_string());
        }
    }

    pub fn set_stopping(&self) {
        self.inner.stopping.store(true, Ordering::SeqCst);
    }

    pub fn amqp(&self) -> bool {
        self.inner.amqp.load(Ordering::SeqCst)
    }

    pub fn database(&self) -> bool {
        self.inner.database.load(Ordering::SeqCst)
    }

    pub fn s3(&self) -> bool {
        self.inner.s3.load(Ordering::SeqCst)
    }

    pub fn stopping(&self) -> bool {
        self.inner.stopping.load(Ordering::SeqCst)
    }

    /// Artifact hosts whose breaker is open.
    pub fn hosts_down(&self) -> Vec<String> {
        self.hosts().iter().cloned().collect()
    }

    pub fn ready(&self) -> bool {
        self.amqp() && self.database() && self.s3() && !self.stopping()
    }

    fn hosts(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.inner
            .hosts_down
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The `/readyz` body: `{"ready":false,"amqp":"up","database":"down","s3":"up",
    /// "artifact_hosts_down":[],"stopping":false}`.
    pub fn report(&self) -> serde_json::Value {
        let state = |up: bool| if up { "up" } else { "down" };
        serde_json::json!({
            "ready": self.ready(),
            "amqp": state(self.amqp()),
            "database": state(self.database()),
            "s3": state(self.s3()),
            "artifact_hosts_down": self.hosts_down(),
            "stopping": self.stopping(),
        })
    }
}

#[derive(Clone)]
struct AppState {
    health: Health,
    metrics: Metrics,
}

pub fn router(health: Health, metrics: Metrics) -> Router {
    Router::new()
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(AppState { health, metrics })
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let h = &state.health;
    let code = if h.ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut body = h.report().to_string();
    body.push('\n');
    (code, [(header::CONTENT_TYPE, "application/json")], body)
}

async fn metrics_text(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}

/// Binds the listener (port 0 picks a free one) and serves until `stop` is cancelled.
/// Returns the bound address and the server task.
pub async fn serve(
    bind: &str,
    health: Health,
    metrics: Metrics,
    stop: CancellationToken,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(bind)
        .await
        .with_context(|| format!("Failed to listen on {bind} (http.bind)"))?;
    let addr = listener.local_addr()?;
    let app = router(health, metrics);
    let task = tokio::spawn(async move {
        let server = axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned());
        if let Err(e) = server.await {
            tracing::error!(error = %e, "HTTP server failed");
        }
    });
    Ok((addr, task))
}
