//! `consume`: the RabbitMQ driver of `ingest_one`.
//!
//! Each delivery is handled in its own task (tracked, so shutdown can wait for them), up
//! to `amqp.concurrency` at once; the broker hands out at most `amqp.prefetch` unacked
//! deliveries, so a slow run holds one slot and never the others. A delivery is
//! acknowledged only after its outcome is durable: the run's transaction committed, or
//! the message confirmed by the broker in a retry delay queue or the dead-letter queue.
//! A crash at any point therefore loses nothing; it can only deliver a run again, and
//! `run_id` idempotence absorbs that.
//!
//! A lost connection ends the session: the worker reconnects with backoff, declares the
//! topology again and resumes. Deliveries of the lost session cannot be acknowledged any
//! more; the broker redelivers them. A topology the broker refuses (changed arguments,
//! or a missing queue with `amqp.declare = false`) is a configuration error and stops
//! the worker at once instead of retrying forever.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, field::Empty};

use crate::amqp::{
    self, ATTEMPTS_HEADER, FAILED_AT_HEADER, REASON_CLASS_HEADER, REASON_HEADER, Topology,
};
use crate::config::AmqpSettings;
use crate::http::Health;
use crate::ingest::{Disposition, IngestContext, Ingestor, Outcome};
use crate::message::RunCompleted;
use crate::metrics::Metrics;

/// Dead-letter and retry reasons are cut to this many characters: headers share the
/// frame with the body, and a reason never needs more.
const MAX_REASON_CHARS: usize = 2000;

/// The consumer and everything its delivery tasks share.
#[derive(Clone)]
pub struct Worker {
    inner: Arc<Shared>,
}

struct Shared {
    settings: AmqpSettings,
    url: String,
    topology: Topology,
    ingestor: Ingestor,
    metrics: Metrics,
    health: Health,
    slots: Arc<Semaphore>,
}

/// A session stopped by shutdown. Its channel and consumer must outlive the drain:
/// dropping them closes the channel, which hands every unacknowledged delivery back
/// to the broker even though the tasks working on it may still commit.
struct Draining {
    conn: Connection,
    consume_ch: Channel,
    publish_ch: Channel,
    _consumer: lapin::Consumer,
}

/// How a consuming session ended, when it did not end with shutdown.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    /// Connection or channel trouble: reconnect.
    #[error("{0:#}")]
    Lost(anyhow::Error),
    /// The broker refuses our topology: retrying cannot help.
    #[error("{0:#}")]
    Fatal(anyhow::Error),
}

/// What to do with a delivery once its outcome is known.
enum Action {
    Ack,
    Retry { class: &'static str, reason: String },
    DeadLetter { class: &'static str, reason: String },
}

impl Worker {
    pub fn new(
        settings: &AmqpSettings,
        ingestor: Ingestor,
        metrics: Metrics,
        health: Health,
    ) -> anyhow::Result<Self> {
        let url = settings.url()?.to_string();
        let concurrency = settings
            .concurrency
            .min(usize::from(settings.prefetch))
            .max(1);
        if settings.concurrency > usize::from(settings.prefetch) {
            tracing::warn!(
                amqp.concurrency = settings.concurrency,
                amqp.prefetch = settings.prefetch,
                "amqp.concurrency is above amqp.prefetch; at most prefetch runs are ingested at once"
            );
        }
        Ok(Self {
            inner: Arc::new(Shared {
                settings: settings.clone(),
                url,
                topology: Topology::new(settings),
                ingestor,
                metrics,
                health,
                slots: Arc::new(Semaphore::new(concurrency)),
            }),
        })
    }

    pub fn topology(&self) -> &Topology {
        &self.inner.topology
    }

    /// Consumes until `shutdown` is cancelled, then stops taking deliveries, lets the ones
    /// in flight finish for up to `grace`, and hands back whatever is left unacked.
    pub async fn run(&self, shutdown: CancellationToken, grace: Duration) -> anyhow::Result<()> {
        let s = &self.inner;
        let tracker = TaskTracker::new();
        let base = Duration::from_millis(s.settings.reconnect_base_ms);
        let max = Duration::from_millis(s.settings.reconnect_max_ms);
        let mut backoff = base;
        let mut draining: Option<Draining> = None;
        while !shutdown.is_cancelled() {
            let mut connected = false;
            match self.session(&tracker, &shutdown, &mut connected).await {
                Ok(d) => {
                    draining = Some(d);
                    break;
                }
                Err(SessionError::Fatal(e)) => {
                    s.health.set_amqp(false);
                    s.metrics.amqp_connected(false);
                    tracker.close();
                    return Err(e);
                }
                Err(SessionError::Lost(e)) => {
                    s.health.set_amqp(false);
                    s.metrics.amqp_connected(false);
                    if connected {
                        backoff = base;
                    }
                    tracing::warn!(error = %format!("{e:#}"), retry_in_ms = backoff.as_millis() as u64, "RabbitMQ connection lost or refused; reconnecting");
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(max);
                }
            }
        }
        s.health.set_stopping();
        tracker.close();
        let in_flight = tracker.len();
        tracing::info!(
            in_flight,
            grace_secs = grace.as_secs(),
            "shutting down: no new deliveries; waiting for the ones in flight"
        );
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            tracing::warn!(
                unfinished = tracker.len(),
                "grace period over: unfinished deliveries go back to the queue unacknowledged"
            );
        }
        if let Some(d) = draining {
            // Closing returns every unacknowledged delivery to the queue at once.
            let _ = d.consume_ch.close(200, "shutting down".into()).await;
            let _ = d.publish_ch.close(200, "shutting down".into()).await;
            let _ = d.conn.close(200, "shutting down".into()).await;
        }
        s.health.set_amqp(false);
        s.metrics.amqp_connected(false);
        tracing::info!("stopped");
        Ok(())
    }

    /// One connection's worth of consuming. Returns the connection on shutdown, so the
    /// deliveries still in flight can be acknowledged on it.
    async fn session(
        &self,
        tracker: &TaskTracker,
        shutdown: &CancellationToken,
        connected: &mut bool,
    ) -> Result<Draining, SessionError> {
        let s = &self.inner;
        let lost = |e: lapin::Error| SessionError::Lost(e.into());
        let conn = amqp::connect(&s.url, "k6-ingest consume")
            .await
            .map_err(lost)?;
        let setup = conn.create_channel().await.map_err(lost)?;
        let topology = if s.settings.declare {
            s.topology.declare(&setup).await
        } else {
            s.topology.verify(&conn).await
        };
        if topology.is_ok() {
            let _ = setup.close(200, "declared".into()).await;
        }
        if let Err(e) = topology {
            // A channel error on a live connection is the broker refusing the topology.
            let fatal = conn.status().connected();
            let _ = conn.close(200, "topology refused".into()).await;
            return Err(if fatal {
                SessionError::Fatal(e)
            } else {
                SessionError::Lost(e)
            });
        }
        let consume_ch = conn.create_channel().await.map_err(lost)?;
        consume_ch
            .basic_qos(s.settings.prefetch, BasicQosOptions::default())
            .await
            .map_err(lost)?;
        let publish_ch = amqp::confirm_channel(&conn).await.map_err(lost)?;
        let tag = format!("k6-ingest-{}", uuid::Uuid::now_v7());
        let mut consumer = consume_ch
            .basic_consume(
                s.topology.queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| {
                SessionError::Lost(anyhow::anyhow!(
                    "Failed to consume from {:?}: {e}",
                    s.topology.queue
                ))
            })?;
        *connected = true;
        s.health.set_amqp(true);
        s.metrics.amqp_connected(true);
        tracing::info!(queue = %s.topology.queue, prefetch = s.settings.prefetch, concurrency = s.slots.available_permits(), "consuming");

        // Set by a delivery task whose publish failed: the channel is in doubt, start over.
        let broken = CancellationToken::new();
        let end = loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => {
                    let _ = consume_ch.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()).await;
                    return Ok(Draining { conn, consume_ch, publish_ch, _consumer: consumer });
                }
                () = broken.cancelled() => break anyhow::anyhow!("publishing a retry or dead letter failed"),
                next = consumer.next() => match next {
                    Some(Ok(delivery)) => {
                        let worker = self.clone();
                        let publish_ch = publish_ch.clone();
                        let broken = broken.clone();
                        let shutdown = shutdown.clone();
                        tracker.spawn(async move { worker.handle(delivery, publish_ch, broken, shutdown).await });
                    }
                    Some(Err(e)) => break anyhow::anyhow!("the consumer stopped: {e}"),
                    None => break anyhow::anyhow!("the broker cancelled the consumer (queue deleted?)"),
                },
            }
        };
        let _ = conn.close(200, "reconnecting".into()).await;
        Err(SessionError::Lost(end))
    }

    async fn handle(
        &self,
        delivery: Delivery,
        publish_ch: Channel,
        broken: CancellationToken,
        shutdown: CancellationToken,
    ) {
        let s = &self.inner;
        s.metrics.received();
        let previous = amqp::header_u64(&delivery.properties, ATTEMPTS_HEADER).unwrap_or(0);
        let attempt = u32::try_from(previous)
            .unwrap_or(u32::MAX)
            .saturating_add(1);
        let span = tracing::info_span!(
            "delivery",
            delivery.tag = delivery.delivery_tag,
            redelivered = delivery.redelivered,
            attempt,
            event.id = Empty,
            run.id = Empty,
            organization.id = Empty,
            project.id = Empty,
        );
        async {
            // Wait for a slot; on shutdown hand the delivery back rather than start it.
            let permit = tokio::select! {
                biased;
                permit = s.slots.clone().acquire_owned() => permit.ok(),
                () = shutdown.cancelled() => None,
            };
            let Some(_permit) = permit else {
                hand_back(&delivery).await;
                return;
            };
            let _in_flight = s.metrics.in_flight();
            let action = self.process(&delivery, attempt).await;
            self.settle(&delivery, attempt, action, &publish_ch, &broken)
                .await;
        }
        .instrument(span)
        .await;
    }

    /// Decodes and ingests; says what to do with the delivery.
    async fn process(&self, delivery: &Delivery, attempt: u32) -> Action {
        let s = &self.inner;
        let size = delivery.data.len() as u64;
        if size > s.settings.max_message_bytes {
            return Action::DeadLetter {
                class: "too_large",
                reason: format!(
                    "message is {size} bytes, over the limit of {} (amqp.max_message_bytes)",
                    s.settings.max_message_bytes
                ),
            };
        }
        let msg = match RunCompleted::decode(&delivery.data) {
            Ok(m) => m,
            Err(e) => {
                return Action::DeadLetter {
                    class: e.class(),
                    reason: e.to_string(),
                };
            }
        };
        let span = tracing::Span::current();
        span.record("event.id", tracing::field::display(msg.event_id));
        span.record("run.id", tracing::field::display(msg.run_id));
        span.record(
            "organization.id",
            tracing::field::display(msg.organization_id),
        );
        span.record("project.id", tracing::field::display(msg.project_id));

        let started = Instant::now();
        let result = s.ingestor.ingest_one(&msg, &IngestContext::default()).await;
        let elapsed = started.elapsed();
        s.metrics.observe_ingest(elapsed.as_secs_f64());
        let duration_ms = elapsed.as_millis() as u64;
        match result {
            Ok(report) => {
                match report.outcome {
                    Outcome::AlreadyPresent => {
                        s.metrics.duplicate();
                        tracing::info!(
                            duration_ms,
                            "run already stored; acknowledged without writing"
                        );
                    }
                    _ => {
                        s.metrics.ingested(report.bytes_uploaded);
                        tracing::info!(
                            outcome = report.outcome.as_str(),
                            status = report.line.status.as_deref().unwrap_or("-"),
                            bytes_uploaded = report.bytes_uploaded,
                            warnings = report.warnings.len(),
                            duration_ms,
                            "run ingested"
                        );
                    }
                }
                Action::Ack
            }
            Err(e) => match e.disposition() {
                Disposition::Ack => Action::Ack,
                Disposition::Retry if attempt < s.settings.max_attempts => Action::Retry {
                    class: e.class(),
                    reason: e.to_string(),
                },
                Disposition::Retry => Action::DeadLetter {
                    class: e.class(),
                    reason: format!("gave up after {attempt} attempts: {e}"),
                },
                Disposition::DeadLetter => Action::DeadLetter {
                    class: e.class(),
                    reason: e.to_string(),
                },
            },
        }
    }

    /// Acknowledges, or republishes (confirmed) and then acknowledges. If the republish
    /// fails the delivery is handed back instead, and the session restarts.
    async fn settle(
        &self,
        delivery: &Delivery,
        attempt: u32,
        action: Action,
        publish_ch: &Channel,
        broken: &CancellationToken,
    ) {
        let s = &self.inner;
        let (class, reason, exchange, routing_key, retry) = match action {
            Action::Ack => {
                if let Err(e) = delivery.acker.ack(BasicAckOptions::default()).await {
                    tracing::warn!(error = %e, "ack failed; the broker will redeliver and the stored run absorbs it");
                }
                return;
            }
            Action::Retry { class, reason } => {
                let delay = s.topology.retry_delay(attempt);
                tracing::warn!(reason.class = class, error = %reason, retry_in_ms = delay.as_millis() as u64, "transient failure; retrying later");
                (
                    class,
                    reason,
                    String::new(),
                    s.topology.retry_queue(attempt),
                    true,
                )
            }
            Action::DeadLetter { class, reason } => {
                tracing::error!(reason.class = class, error = %reason, "message dead-lettered");
                (
                    class,
                    reason,
                    s.topology.dead_letter_exchange.clone(),
                    delivery.routing_key.to_string(),
                    false,
                )
            }
        };
        let reason: String = reason.chars().take(MAX_REASON_CHARS).collect();
        let props = amqp::with_headers(
            &delivery.properties,
            &[
                (ATTEMPTS_HEADER, AMQPValue::LongLongInt(i64::from(attempt))),
                (REASON_HEADER, amqp::text(&reason)),
                (REASON_CLASS_HEADER, amqp::text(class)),
                (
                    FAILED_AT_HEADER,
                    amqp::text(&chrono::Utc::now().to_rfc3339()),
                ),
            ],
            &[],
        );
        match amqp::publish_confirmed(publish_ch, &exchange, &routing_key, &delivery.data, props)
            .await
        {
            Ok(()) => {
                if retry {
                    s.metrics.retried(class);
                } else {
                    s.metrics.dead_lettered(class);
                }
                if let Err(e) = delivery.acker.ack(BasicAckOptions::default()).await {
                    tracing::warn!(error = %e, "ack after republish failed; the broker will redeliver (a duplicate, never a loss)");
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "could not republish; handing the delivery back and reconnecting");
                hand_back(delivery).await;
                broken.cancel();
            }
        }
    }
}

/// Probes PostgreSQL every `every` until `stop`, for `/readyz` and `database_up`.
pub async fn watch_database(
    pool: sqlx::PgPool,
    health: Health,
    metrics: Metrics,
    every: Duration,
    stop: CancellationToken,
) {
    loop {
        let ok = matches!(
            tokio::time::timeout(every.max(Duration::from_secs(1)), crate::db::probe(&pool)).await,
            Ok(Ok(_))
        );
        if ok != health.database() {
            if ok {
                tracing::info!("PostgreSQL reachable");
            } else {
                tracing::warn!("PostgreSQL unreachable");
            }
        }
        health.set_database(ok);
        metrics.database_up(ok);
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}

/// A worker started by [`start`]: its HTTP address, metrics, health and completion.
pub struct Running {
    pub addr: std::net::SocketAddr,
    pub metrics: Metrics,
    pub health: Health,
    pub done: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// Starts the worker with its HTTP endpoints; it runs until `shutdown` and its drain end.
/// Tests pass their own ingestor (pool, bucket prefix) and trigger `shutdown` themselves.
pub async fn start(
    settings: &crate::config::Settings,
    ingestor: Ingestor,
    shutdown: CancellationToken,
) -> anyhow::Result<Running> {
    use anyhow::Context as _;
    let pool = ingestor
        .pool()
        .cloned()
        .context("consume needs database.url")?;
    let metrics = Metrics::new();
    let health = Health::default();
    let worker = Worker::new(&settings.amqp, ingestor, metrics.clone(), health.clone())?;
    // The HTTP server outlives the drain, so /readyz can say "stopping" meanwhile.
    let http_stop = CancellationToken::new();
    let (addr, http) = crate::http::serve(
        &settings.http.bind,
        health.clone(),
        metrics.clone(),
        http_stop.clone(),
    )
    .await?;
    tracing::info!(%addr, "serving /livez, /readyz and /metrics");
    tokio::spawn(watch_database(
        pool,
        health.clone(),
        metrics.clone(),
        Duration::from_secs(1),
        http_stop.clone(),
    ));
    tokio::spawn({
        let (health, shutdown) = (health.clone(), shutdown.clone());
        async move {
            shutdown.cancelled().await;
            health.set_stopping();
        }
    });
    let grace = Duration::from_secs(settings.shutdown.grace_secs);
    let done = tokio::spawn(async move {
        let result = worker.run(shutdown, grace).await;
        http_stop.cancel();
        let _ = http.await;
        result
    });
    Ok(Running {
        addr,
        metrics,
        health,
        done,
    })
}

/// The `consume` command: the worker until SIGTERM (or Ctrl-C) and the end of its drain.
pub async fn consume(
    settings: &crate::config::Settings,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let needs = crate::app::Needs {
        database: true,
        s3: true,
    };
    let ingestor = crate::app::build_ingestor(settings, needs, Vec::new()).await?;
    let running = start(settings, ingestor, shutdown).await?;
    running.done.await?
}

/// Returns a delivery to the queue unacknowledged, for this or another worker to take.
/// Best effort: if the channel is gone the broker requeues it anyway.
async fn hand_back(delivery: &lapin::message::Delivery) {
    let _ = delivery
        .acker
        .nack(BasicNackOptions {
            requeue: true,
            ..BasicNackOptions::default()
        })
        .await;
}
