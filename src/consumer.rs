//! `consume`: the RabbitMQ driver of `Ingestor::ingest`.
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
//!
//! Outages pause the work instead of burning it. A failure whose [`Fault`] names a
//! dependency (PostgreSQL, S3, an artifact host) is confirmed with that dependency's
//! probe; if it is down, the delivery is held unacknowledged (no republish, no nack: a
//! quorum queue counts requeues against `x-delivery-limit`), its attempt is not counted,
//! and it is ingested again once the breaker closes. New deliveries wait for a slot and
//! for PostgreSQL and S3 before they start, so during an outage at most `amqp.prefetch`
//! deliveries are held and nothing spins. Only faults of the message (the dependency
//! answers its probe) spend `amqp.max_attempts`. A run that needs a lock another
//! session holds (a month's partitions behind a long transaction) is held the same way,
//! tried again with backoff, without spending an attempt. A delivery waits at most
//! `breaker.host_wait_secs` for an artifact host, then the failure counts as an attempt.
//! A delivery held longer than the broker's `consumer_timeout` (30 minutes by default)
//! makes the broker close the channel; the session reconnects and the delivery comes
//! again, which `run_id` idempotence absorbs. On shutdown held deliveries are handed
//! back at once.

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
use crate::breaker::{Breakers, Verdict};
use crate::config::AmqpSettings;
use crate::fault::{Dependency, Fault, ReasonClass};
use crate::http::Health;
use crate::ingest::{Disposition, IngestContext, IngestError, Ingestor, Outcome};
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
    breakers: Breakers,
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

/// A session's connection, consuming the queue under `tag`.
struct Session {
    conn: Connection,
    consume_ch: Channel,
    publish_ch: Channel,
    consumer: lapin::Consumer,
    tag: String,
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

/// How holding a delivery for a dependency ended.
enum Held {
    /// The dependency is back: ingest again, no attempt spent.
    Resume,
    /// The session ended (shutdown): hand the delivery back.
    Stopped,
    /// The fault is charged to the message (the dependency answers, or the wait for an
    /// artifact host ran out), with why.
    Spend(Option<String>),
}

/// A delivery at work: its slot and its share of the in-flight gauge.
struct Busy {
    _slot: tokio::sync::OwnedSemaphorePermit,
    _in_flight: crate::metrics::InFlight,
}

/// What to do with a delivery once its outcome is known.
enum Action {
    Ack,
    Retry { class: ReasonClass, reason: String },
    DeadLetter { class: ReasonClass, reason: String },
}

impl Worker {
    pub fn new(
        settings: &AmqpSettings,
        ingestor: Ingestor,
        metrics: Metrics,
        health: Health,
        breakers: Breakers,
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
                breakers,
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
        let session = self.open_session().await?;
        *connected = true;
        s.health.set_amqp(true);
        s.metrics.amqp_connected(true);
        tracing::info!(queue = %s.topology.queue, prefetch = s.settings.prefetch, concurrency = s.slots.available_permits(), "consuming");
        self.dispatch(session, tracker, shutdown).await
    }

    /// Connects, settles the topology, and starts consuming the queue.
    async fn open_session(&self) -> Result<Session, SessionError> {
        let s = &self.inner;
        let lost = |e: lapin::Error| SessionError::Lost(e.into());
        let conn = amqp::connect(&s.url, "k6-ingest consume")
            .await
            .map_err(lost)?;
        self.settle_topology(&conn).await?;
        let consume_ch = conn.create_channel().await.map_err(lost)?;
        consume_ch
            .basic_qos(s.settings.prefetch, BasicQosOptions::default())
            .await
            .map_err(lost)?;
        let publish_ch = amqp::confirm_channel(&conn).await.map_err(lost)?;
        let tag = format!("k6-ingest-{}", uuid::Uuid::now_v7());
        let consumer = consume_ch
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
        Ok(Session {
            conn,
            consume_ch,
            publish_ch,
            consumer,
            tag,
        })
    }

    /// Declares the topology (`amqp.declare`) or verifies it. A channel error on a live
    /// connection is the broker refusing the topology: fatal, and the connection closed.
    async fn settle_topology(&self, conn: &Connection) -> Result<(), SessionError> {
        let s = &self.inner;
        let setup = conn
            .create_channel()
            .await
            .map_err(|e| SessionError::Lost(e.into()))?;
        let topology = if s.settings.declare {
            s.topology.declare(&setup).await
        } else {
            s.topology.verify(conn).await
        };
        match topology {
            Ok(()) => {
                let _ = setup.close(200, "declared".into()).await;
                Ok(())
            }
            Err(e) => {
                let fatal = conn.status().connected();
                let _ = conn.close(200, "topology refused".into()).await;
                Err(if fatal {
                    SessionError::Fatal(e)
                } else {
                    SessionError::Lost(e)
                })
            }
        }
    }

    /// Hands each delivery to a task of its own until shutdown (the session is kept for
    /// the drain) or until the session is lost (its connection closed).
    async fn dispatch(
        &self,
        session: Session,
        tracker: &TaskTracker,
        shutdown: &CancellationToken,
    ) -> Result<Draining, SessionError> {
        let Session {
            conn,
            consume_ch,
            publish_ch,
            mut consumer,
            tag,
        } = session;
        // Set by a delivery task whose publish failed: the channel is in doubt, start over.
        let broken = CancellationToken::new();
        // Ends the waits of held deliveries when the session ends: on shutdown they are
        // handed back, on a lost connection the broker redelivers them anyway.
        let session_over = shutdown.child_token();
        let _session_over = session_over.clone().drop_guard();
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
                        let session_over = session_over.clone();
                        tracker.spawn(async move { worker.handle(delivery, publish_ch, broken, session_over).await });
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
        session_over: CancellationToken,
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
            match self.decide(&delivery, attempt, &session_over).await {
                // The slot is kept until the outcome is durable.
                Some((action, _busy)) => {
                    self.settle(&delivery, attempt, action, &publish_ch, &broken)
                        .await;
                }
                None => hand_back(&delivery).await,
            }
        }
        .instrument(span)
        .await;
    }

    /// Ingests the delivery once a slot is free and PostgreSQL and S3 are up, holding
    /// it through a dependency's outage, and says what to do with it (with the slot, if
    /// it still holds one). `None`: the session ended first, hand the delivery back.
    async fn decide(
        &self,
        delivery: &Delivery,
        attempt: u32,
        session_over: &CancellationToken,
    ) -> Option<(Action, Option<Busy>)> {
        let s = &self.inner;
        // When the wait for an artifact host ends; set at the first wait for one.
        let mut host_deadline: Option<Instant> = None;
        // How many times the run found a lock it needs held by another session.
        let mut lock_waits = 0;
        loop {
            let permit = tokio::select! {
                biased;
                () = session_over.cancelled() => None,
                permit = s.slots.clone().acquire_owned() => permit.ok(),
            }?;
            if let Some(down) = s.breakers.global_down() {
                s.metrics.held(down.label());
                tracing::debug!(dependency = %down, "waiting for a dependency before starting");
            }
            if !s.breakers.wait_global(session_over).await {
                return None;
            }
            let busy = Busy {
                _slot: permit,
                _in_flight: s.metrics.in_flight(),
            };
            let e = match self.process(delivery).await {
                Ok(action) => return Some((action, Some(busy))),
                Err(e) => e,
            };
            let dependency = match e.fault() {
                Fault::Dependency(dependency) => dependency,
                Fault::Contended => {
                    drop(busy);
                    lock_waits += 1;
                    if !self.wait_for_lock(&e, lock_waits, session_over).await {
                        return None;
                    }
                    continue;
                }
                _ => return Some((self.failed(&e, attempt, None), Some(busy))),
            };
            drop(busy);
            match self
                .hold(&dependency, &e, &mut host_deadline, session_over)
                .await
            {
                Held::Resume => {}
                Held::Stopped => return None,
                Held::Spend(why) => return Some((self.failed(&e, attempt, why), None)),
            }
        }
    }

    /// A delivery whose ingest failed on `dependency`: confirmed down, it waits (without
    /// a slot) until the breaker closes; the dependency answering means the fault is the
    /// message's.
    async fn hold(
        &self,
        dependency: &Dependency,
        error: &IngestError,
        host_deadline: &mut Option<Instant>,
        session_over: &CancellationToken,
    ) -> Held {
        let s = &self.inner;
        if s.breakers.confirm(dependency).await == Verdict::Up {
            return Held::Spend(None);
        }
        s.metrics.held(dependency.label());
        tracing::debug!(%dependency, error = %error, "held until the dependency is back; no attempt spent");
        let back = match dependency {
            Dependency::ArtifactHost(_) => {
                let deadline =
                    *host_deadline.get_or_insert_with(|| Instant::now() + s.breakers.host_wait());
                match tokio::time::timeout_at(
                    deadline.into(),
                    s.breakers.wait_up(dependency, session_over),
                )
                .await
                {
                    Ok(back) => back,
                    Err(_) => {
                        return Held::Spend(Some(format!(
                            "{dependency} down for more than {} s (breaker.host_wait_secs)",
                            s.breakers.host_wait().as_secs()
                        )));
                    }
                }
            }
            _ => s.breakers.wait_up(dependency, session_over).await,
        };
        if back { Held::Resume } else { Held::Stopped }
    }

    /// A delivery whose run needs a lock another session holds (see [`Fault::Contended`]):
    /// held without a slot for `amqp.retry_base_ms` doubling up to `amqp.retry_max_ms`,
    /// then tried again; no attempt spent, so a report or `pg_dump` of an hour delays a
    /// backfill instead of dead-lettering it. `false`: the session ended first.
    async fn wait_for_lock(
        &self,
        error: &IngestError,
        waits: u32,
        session_over: &CancellationToken,
    ) -> bool {
        let s = &self.inner;
        let delay = s.topology.retry_delay(waits);
        s.metrics.held("database_lock");
        tracing::warn!(
            error = %error,
            waits,
            retry_in_ms = delay.as_millis() as u64,
            "a lock this run needs is held by another session's transaction; held, no attempt spent"
        );
        tokio::select! {
            biased;
            () = session_over.cancelled() => false,
            () = tokio::time::sleep(delay) => true,
        }
    }

    /// Decodes and ingests; says what to do with the delivery, or how ingesting failed.
    async fn process(&self, delivery: &Delivery) -> Result<Action, IngestError> {
        let s = &self.inner;
        let size = delivery.data.len() as u64;
        if size > s.settings.max_message_bytes {
            return Ok(Action::DeadLetter {
                class: ReasonClass::TooLarge,
                reason: format!(
                    "message is {size} bytes, over the limit of {} (amqp.max_message_bytes)",
                    s.settings.max_message_bytes
                ),
            });
        }
        let msg = match RunCompleted::decode(&delivery.data) {
            Ok(m) => m,
            Err(e) => {
                return Ok(Action::DeadLetter {
                    class: e.class(),
                    reason: e.to_string(),
                });
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
        let result = s.ingestor.ingest(&msg, &IngestContext::default()).await;
        let elapsed = started.elapsed();
        s.metrics.observe_ingest(elapsed.as_secs_f64());
        let duration_ms = elapsed.as_millis() as u64;
        // A run stored as error keeps its message: it is dead-lettered like a failure.
        let report = result?.into_result()?;
        if report.outcome == Outcome::AlreadyPresent {
            s.metrics.duplicate();
            tracing::info!(
                duration_ms,
                "run already stored; acknowledged without writing"
            );
        } else {
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
        Ok(Action::Ack)
    }

    /// What a failure that spends an attempt does: retry while attempts remain, then
    /// dead-letter with the count; a permanent fault is dead-lettered at once. `why`
    /// says why a dependency fault was charged to the message.
    fn failed(&self, e: &IngestError, attempt: u32, why: Option<String>) -> Action {
        let s = &self.inner;
        let reason = match why {
            Some(why) => format!("{e} ({why})"),
            None => e.to_string(),
        };
        match e.disposition() {
            Disposition::Retry if attempt < s.settings.max_attempts => Action::Retry {
                class: e.class(),
                reason,
            },
            Disposition::Retry => Action::DeadLetter {
                class: e.class(),
                reason: format!("gave up after {attempt} attempts: {reason}"),
            },
            Disposition::DeadLetter => Action::DeadLetter {
                class: e.class(),
                reason,
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
                tracing::warn!(reason.class = class.as_str(), error = %reason, retry_in_ms = delay.as_millis() as u64, "transient failure; retrying later");
                (
                    class,
                    reason,
                    String::new(),
                    s.topology.retry_queue(attempt),
                    true,
                )
            }
            Action::DeadLetter { class, reason } => {
                tracing::error!(reason.class = class.as_str(), error = %reason, "message dead-lettered");
                (
                    class,
                    reason,
                    s.topology.dead_letter_exchange.clone(),
                    delivery.routing_key.to_string(),
                    false,
                )
            }
        };
        let props = failure_headers(delivery, attempt, class, &reason);
        match amqp::publish_confirmed(publish_ch, &exchange, &routing_key, &delivery.data, props)
            .await
        {
            Ok(()) => {
                if retry {
                    s.metrics.retried(class.as_str());
                } else {
                    s.metrics.dead_lettered(class.as_str());
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
    let pool = ingestor.pool().clone();
    let metrics = Metrics::new();
    let health = Health::default();
    // The HTTP server and the probes outlive the drain, so /readyz can say "stopping"
    // meanwhile and held deliveries see a dependency come back.
    let http_stop = CancellationToken::new();
    let breakers = Breakers::new(
        &settings.breaker,
        Some(pool),
        Some((
            ingestor.artifact_store().client().clone(),
            ingestor.artifact_store().bucket().to_string(),
        )),
        metrics.clone(),
        health.clone(),
        http_stop.clone(),
    );
    breakers.spawn_checks();
    let worker = Worker::new(
        &settings.amqp,
        ingestor,
        metrics.clone(),
        health.clone(),
        breakers,
    )?;
    let (addr, http) = crate::http::serve(
        &settings.http.bind,
        health.clone(),
        metrics.clone(),
        http_stop.clone(),
    )
    .await?;
    tracing::info!(%addr, "serving /livez, /readyz and /metrics");
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
    let ingestor = crate::app::build_ingestor(settings, Vec::new()).await?;
    let interval = std::time::Duration::from_secs(settings.ingest.part_sweep_interval_secs.max(1));
    ingestor.spawn_part_sweep(interval, shutdown.clone());
    let running = start(settings, ingestor, shutdown).await?;
    running.done.await?
}

/// The delivery's properties with why it failed: the attempt count, the reason (cut to
/// [`MAX_REASON_CHARS`]), its class and when.
fn failure_headers(
    delivery: &Delivery,
    attempt: u32,
    class: ReasonClass,
    reason: &str,
) -> lapin::BasicProperties {
    let reason: String = reason.chars().take(MAX_REASON_CHARS).collect();
    amqp::with_headers(
        &delivery.properties,
        &[
            (ATTEMPTS_HEADER, AMQPValue::LongLongInt(i64::from(attempt))),
            (REASON_HEADER, amqp::text(&reason)),
            (REASON_CLASS_HEADER, amqp::text(class.as_str())),
            (
                FAILED_AT_HEADER,
                amqp::text(&chrono::Utc::now().to_rfc3339()),
            ),
        ],
        &[],
    )
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
