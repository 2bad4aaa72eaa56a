//! RabbitMQ plumbing shared by `consume`, `publish` and `requeue`: the connection, the
//! topology the worker relies on, and publishing with publisher confirms.
//!
//! Topology, from the settings `exchange`, `queue` and `routing_key` (defaults shown):
//!
//! ```text
//! runner ─▶ k6.runs (topic) ──run.completed──▶ k6-ingest.run-completed (quorum, work queue)
//!                                               │  x-delivery-limit, dead-letters to ─┐
//!   worker: transient fault, attempt n ─▶ k6-ingest.run-completed.retry.<delay>ms    │
//!              (quorum, x-message-ttl = delay; expired messages dead-letter straight  │
//!               back to the work queue through the default exchange)               │
//!   worker: poison / out of attempts ─▶ k6-ingest.run-completed.dlx (fanout) ◀───────┘
//!                                        └─▶ k6-ingest.run-completed.dead (quorum, DLQ)
//! ```
//!
//! Retries go back to the work queue directly rather than through the main exchange, so
//! other queues bound to `run.completed` never see a retried run twice. One delay queue
//! per distinct delay (not per message expiration) because a queue expires only its head:
//! a 60 s message would hold back a 1 s one behind it. Every queue dead-letters
//! at-least-once, so a broker-side dead letter (delivery limit, expiry) is never dropped.

use std::time::Duration;

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind,
};

use crate::config::AmqpSettings;

/// Header holding how many ingest attempts a message has had (set when republishing).
pub const ATTEMPTS_HEADER: &str = "x-k6-ingest-attempts";
/// Dead letters: the error message, and its stable class (as in the metrics).
pub const REASON_HEADER: &str = "x-k6-ingest-reason";
pub const REASON_CLASS_HEADER: &str = "x-k6-ingest-reason-class";
/// Dead letters and retries: when the worker gave up on the attempt (RFC 3339).
pub const FAILED_AT_HEADER: &str = "x-k6-ingest-failed-at";

/// Why a publish did not land; every case means "not stored by the broker".
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("the broker refused the message (nack) on {exchange:?} / {routing_key:?}")]
    Nacked {
        exchange: String,
        routing_key: String,
    },
    #[error(
        "no queue is bound for {exchange:?} / {routing_key:?}: the message was returned unrouted"
    )]
    Unroutable {
        exchange: String,
        routing_key: String,
    },
    #[error("publisher confirms are not enabled on this channel")]
    NotConfirmed,
    #[error("publish to {exchange:?} / {routing_key:?} failed: {source}")]
    Amqp {
        exchange: String,
        routing_key: String,
        #[source]
        source: lapin::Error,
    },
}

/// Opens a connection; the name shows in the management UI next to the connection.
pub async fn connect(url: &str, name: &str) -> Result<Connection, lapin::Error> {
    let props =
        ConnectionProperties::default().with_connection_name(LongString::from(name.to_string()));
    Connection::connect(url, props).await
}

/// Connects and makes sure the topology is there (declared, or with `declare = false`
/// checked), so nothing is published before its queue exists.
pub async fn connect_ready(
    settings: &crate::config::AmqpSettings,
    name: &str,
) -> anyhow::Result<(Connection, Topology)> {
    use anyhow::Context as _;
    let topology = Topology::new(settings);
    let conn = connect(settings.url()?, name)
        .await
        .context("Failed to connect to RabbitMQ (amqp.url)")?;
    if settings.declare {
        let ch = conn.create_channel().await?;
        topology.declare(&ch).await?;
    } else {
        topology.verify(&conn).await?;
    }
    Ok((conn, topology))
}

/// A channel with publisher confirms on.
pub async fn confirm_channel(conn: &Connection) -> Result<Channel, lapin::Error> {
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    Ok(ch)
}

/// Publishes persistently and waits for the broker's confirm. `mandatory` is always set:
/// a message no queue takes is an error, not a silent success.
pub async fn publish_confirmed(
    ch: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    props: BasicProperties,
) -> Result<(), PublishError> {
    let err = |source| PublishError::Amqp {
        exchange: exchange.into(),
        routing_key: routing_key.into(),
        source,
    };
    let confirm = ch
        .basic_publish(
            ShortString::from(exchange),
            ShortString::from(routing_key),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            body,
            props.with_delivery_mode(2),
        )
        .await
        .map_err(err)?
        .await
        .map_err(err)?;
    match confirm {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(_)) => Err(PublishError::Unroutable {
            exchange: exchange.into(),
            routing_key: routing_key.into(),
        }),
        Confirmation::Nack(_) => Err(PublishError::Nacked {
            exchange: exchange.into(),
            routing_key: routing_key.into(),
        }),
        Confirmation::NotRequested => Err(PublishError::NotConfirmed),
    }
}

/// The names and arguments of everything the worker declares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    pub exchange: String,
    pub routing_key: String,
    pub queue: String,
    pub dead_letter_exchange: String,
    pub dead_letter_queue: String,
    pub delivery_limit: u32,
    pub max_attempts: u32,
    retry_base_ms: u64,
    retry_max_ms: u64,
}

impl Topology {
    pub fn new(s: &AmqpSettings) -> Self {
        Self {
            exchange: s.exchange.clone(),
            routing_key: s.routing_key.clone(),
            queue: s.queue.clone(),
            dead_letter_exchange: format!("{}.dlx", s.queue),
            dead_letter_queue: format!("{}.dead", s.queue),
            delivery_limit: s.delivery_limit,
            max_attempts: s.max_attempts,
            retry_base_ms: s.retry_base_ms,
            retry_max_ms: s.retry_max_ms,
        }
    }

    /// The wait after failed attempt `attempt` (1-based): base × 2^(attempt-1), capped.
    /// No jitter: each distinct delay is a queue, and the queue's FIFO order is what
    /// keeps expiry prompt.
    pub fn retry_delay(&self, attempt: u32) -> Duration {
        let factor = 1u64
            .checked_shl(attempt.saturating_sub(1))
            .unwrap_or(u64::MAX);
        Duration::from_millis(
            self.retry_base_ms
                .saturating_mul(factor)
                .min(self.retry_max_ms),
        )
    }

    /// The delay queue a message waits in after failed attempt `attempt`.
    pub fn retry_queue(&self, attempt: u32) -> String {
        format!(
            "{}.retry.{}ms",
            self.queue,
            self.retry_delay(attempt).as_millis()
        )
    }

    /// Every delay queue needed for `max_attempts` (one per distinct delay).
    pub fn retry_queues(&self) -> Vec<(String, Duration)> {
        let mut out: Vec<(String, Duration)> = Vec::new();
        for attempt in 1..self.max_attempts {
            let q = (self.retry_queue(attempt), self.retry_delay(attempt));
            if !out.contains(&q) {
                out.push(q);
            }
        }
        out
    }

    fn work_queue_args(&self) -> FieldTable {
        let mut args = quorum_args();
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(i64::from(self.delivery_limit)),
        );
        args.insert(
            "x-dead-letter-exchange".into(),
            long(&self.dead_letter_exchange),
        );
        args
    }

    fn retry_queue_args(&self, delay: Duration) -> FieldTable {
        let mut args = quorum_args();
        args.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX)),
        );
        // Back to the work queue through the default exchange (see the module docs).
        args.insert("x-dead-letter-exchange".into(), long(""));
        args.insert("x-dead-letter-routing-key".into(), long(&self.queue));
        args
    }

    /// Declares everything; idempotent while the arguments stay the same. Changed
    /// arguments on an existing queue fail with PRECONDITION_FAILED, naming the queue.
    pub async fn declare(&self, ch: &Channel) -> anyhow::Result<()> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        let ctx = |what: &str| format!("Failed to declare {what}");
        ch.exchange_declare(
            self.exchange.as_str().into(),
            ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        )
        .await
        .map_err(|e| anyhow::anyhow!("{}: {e}", ctx(&format!("exchange {:?}", self.exchange))))?;
        ch.exchange_declare(
            self.dead_letter_exchange.as_str().into(),
            ExchangeKind::Fanout,
            durable,
            FieldTable::default(),
        )
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "{}: {e}",
                ctx(&format!("exchange {:?}", self.dead_letter_exchange))
            )
        })?;
        let qd = QueueDeclareOptions::durable();
        ch.queue_declare(self.dead_letter_queue.as_str().into(), qd, quorum_args())
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "{}: {e}",
                    ctx(&format!("queue {:?}", self.dead_letter_queue))
                )
            })?;
        ch.queue_bind(
            self.dead_letter_queue.as_str().into(),
            self.dead_letter_exchange.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        ch.queue_declare(self.queue.as_str().into(), qd, self.work_queue_args())
            .await
            .map_err(|e| anyhow::anyhow!("{}: {e}", ctx(&format!("queue {:?}", self.queue))))?;
        ch.queue_bind(
            self.queue.as_str().into(),
            self.exchange.as_str().into(),
            self.routing_key.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        for (name, delay) in self.retry_queues() {
            ch.queue_declare(name.as_str().into(), qd, self.retry_queue_args(delay))
                .await
                .map_err(|e| anyhow::anyhow!("{}: {e}", ctx(&format!("queue {name:?}"))))?;
        }
        Ok(())
    }

    /// Checks that everything exists, declaring nothing (for brokers managed elsewhere).
    pub async fn verify(&self, conn: &Connection) -> anyhow::Result<()> {
        // A failed passive declare closes its channel: one channel per check.
        let passive = ExchangeDeclareOptions {
            passive: true,
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        for (name, kind) in [
            (&self.exchange, ExchangeKind::Topic),
            (&self.dead_letter_exchange, ExchangeKind::Fanout),
        ] {
            let ch = conn.create_channel().await?;
            ch.exchange_declare(name.as_str().into(), kind, passive, FieldTable::default())
                .await
                .map_err(|e| {
                    anyhow::anyhow!("exchange {name:?} is missing (amqp.declare is false): {e}")
                })?;
            let _ = ch.close(200, "checked".into()).await;
        }
        let mut queues = vec![self.queue.clone(), self.dead_letter_queue.clone()];
        queues.extend(self.retry_queues().into_iter().map(|q| q.0));
        for name in queues {
            let ch = conn.create_channel().await?;
            ch.queue_declare(
                name.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| {
                anyhow::anyhow!("queue {name:?} is missing (amqp.declare is false): {e}")
            })?;
            let _ = ch.close(200, "checked".into()).await;
        }
        Ok(())
    }
}

fn quorum_args() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), long("quorum"));
    // at-least-once dead-lettering needs reject-publish; without it a broker-side dead
    // letter whose target is unavailable would be dropped.
    args.insert("x-dead-letter-strategy".into(), long("at-least-once"));
    args.insert("x-overflow".into(), long("reject-publish"));
    args
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.to_string()))
}

/// An integer header, whatever integer type the publisher chose.
pub fn header_u64(props: &BasicProperties, name: &str) -> Option<u64> {
    let value = props.headers().as_ref()?.inner().get(name)?;
    match value {
        AMQPValue::ShortShortUInt(v) => Some(u64::from(*v)),
        AMQPValue::ShortUInt(v) => Some(u64::from(*v)),
        AMQPValue::LongUInt(v) => Some(u64::from(*v)),
        AMQPValue::ShortShortInt(v) => u64::try_from(*v).ok(),
        AMQPValue::ShortInt(v) => u64::try_from(*v).ok(),
        AMQPValue::LongInt(v) => u64::try_from(*v).ok(),
        AMQPValue::LongLongInt(v) => u64::try_from(*v).ok(),
        AMQPValue::Timestamp(v) => Some(*v),
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok()?.trim().parse().ok(),
        AMQPValue::ShortString(s) => s.as_str().trim().parse().ok(),
        _ => None,
    }
}

/// A string header, if present.
pub fn header_str(props: &BasicProperties, name: &str) -> Option<String> {
    match props.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

/// `props` with the given headers set (others kept).
pub fn with_headers(
    props: &BasicProperties,
    set: &[(&str, AMQPValue)],
    remove: &[&str],
) -> BasicProperties {
    let mut table = FieldTable::default();
    if let Some(h) = props.headers() {
        for (k, v) in h.inner() {
            if !remove.contains(&k.as_str()) && !set.iter().any(|(n, _)| *n == k.as_str()) {
                table.insert(k.clone(), v.clone());
            }
        }
    }
    for (k, v) in set {
        table.insert((*k).into(), v.clone());
    }
    props.clone().with_headers(table)
}

/// A string header value.
pub fn text(s: &str) -> AMQPValue {
    long(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> AmqpSettings {
        crate::config::Settings::load(None).unwrap().amqp
    }

    #[test]
    fn retry_delays_grow_and_cap() {
        let mut s = settings();
        s.retry_base_ms = 1000;
        s.retry_max_ms = 5000;
        s.max_attempts = 6;
        let t = Topology::new(&s);
        let delays: Vec<u128> = (1..6).map(|a| t.retry_delay(a).as_millis()).collect();
        assert_eq!(delays, [1000, 2000, 4000, 5000, 5000]);
        let names: Vec<String> = t.retry_queues().into_iter().map(|q| q.0).collect();
        assert_eq!(names.len(), 4, "one queue per distinct delay: {names:?}");
        assert_eq!(t.retry_queue(1), format!("{}.retry.1000ms", s.queue));
        assert_eq!(t.retry_delay(200).as_millis(), 5000, "no overflow");
    }

    #[test]
    fn headers_read_any_integer_type() {
        let mut table = FieldTable::default();
        table.insert(ATTEMPTS_HEADER.into(), AMQPValue::LongInt(3));
        let props = BasicProperties::default().with_headers(table);
        assert_eq!(header_u64(&props, ATTEMPTS_HEADER), Some(3));
        let props = with_headers(&props, &[(REASON_HEADER, text("why"))], &[ATTEMPTS_HEADER]);
        assert_eq!(header_u64(&props, ATTEMPTS_HEADER), None);
        assert_eq!(header_str(&props, REASON_HEADER).as_deref(), Some("why"));
    }
}
