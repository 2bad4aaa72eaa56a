//! `GET /livez`, `/readyz` and `/metrics` for the orchestrator and Prometheus.
//!
//! `/livez` only says the process answers: restarting a worker because the broker or
//! the database is away would not bring them back. `/readyz` says whether the worker is
//! doing its job (connected to RabbitMQ and PostgreSQL, not shutting down), so an outage
//! shows on dashboards and a rollout waits for a new pod to really consume.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// What `/readyz` reports: connected to both RabbitMQ and PostgreSQL, not shutting down.
#[derive(Clone, Default)]
pub struct Health {
    inner: Arc<HealthInner>,
}

#[derive(Default)]
struct HealthInner {
    amqp: AtomicBool,
    database: AtomicBool,
    stopping: AtomicBool,
}

impl Health {
    pub fn set_amqp(&self, up: bool) {
        self.inner.amqp.store(up, Ordering::SeqCst);
    }

    pub fn set_database(&self, up: bool) {
        self.inner.database.store(up, Ordering::SeqCst);
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

    pub fn stopping(&self) -> bool {
        self.inner.stopping.load(Ordering::SeqCst)
    }

    pub fn ready(&self) -> bool {
        self.amqp() && self.database() && !self.stopping()
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
    let body = format!(
        "ready: {}\namqp: {}\ndatabase: {}\nstopping: {}\n",
        h.ready(),
        if h.amqp() {
            "connected"
        } else {
            "disconnected"
        },
        if h.database() { "up" } else { "down" },
        h.stopping()
    );
    let code = if h.ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, body)
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
