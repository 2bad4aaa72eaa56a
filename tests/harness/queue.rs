//! RabbitMQ for one test: names of its own, its messages, its queues, and the worker.

use std::net::SocketAddr;

use k6_ingest::amqp::{self, Topology};
use k6_ingest::config::Settings;
use k6_ingest::consumer::{self, Running};
use k6_ingest::ingest::Ingestor;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, ExchangeDeleteOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection};
use serde_json::Value;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::{fixtures, settings, stored, wait_for};

pub fn amqp_url() -> String {
    std::env::var("K6_INGEST__AMQP__URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// Settings with this test's own exchange, queues and bucket (named after `tag`), and
/// retry and reconnect delays short enough for a test.
pub fn queue_settings(tag: &str) -> Settings {
    let mut s = settings();
    s.amqp.url = Some(amqp_url().into());
    s.amqp.exchange = format!("test.{tag}.runs");
    s.amqp.queue = format!("test.{tag}.work");
    s.amqp.prefetch = 8;
    s.amqp.concurrency = 8;
    s.amqp.max_attempts = 5;
    s.amqp.retry_base_ms = 200;
    s.amqp.retry_max_ms = 1000;
    s.amqp.reconnect_base_ms = 100;
    s.amqp.reconnect_max_ms = 1000;
    s.s3.bucket = Some(format!("q-{tag}"));
    s.s3.prefix = "runs".into();
    s.fetch.allowed_roots = vec![fixtures()];
    s.http.bind = "127.0.0.1:0".into();
    s.shutdown.grace_secs = 20;
    s.database.acquire_timeout_secs = 2;
    s
}

/// A worker running in this process, as `consume` runs it, on the test's own queues.
pub struct Consumer {
    pub running: Running,
    shutdown: CancellationToken,
    settings: Settings,
}

impl Consumer {
    pub async fn start(s: &Settings, ingestor: Ingestor) -> Self {
        let shutdown = CancellationToken::new();
        let running = consumer::start(s, ingestor, shutdown.clone())
            .await
            .unwrap();
        Self {
            running,
            shutdown,
            settings: s.clone(),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.running.addr
    }

    /// Asks the worker to stop, as SIGTERM does.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Stops the worker, which must end without an error, and deletes its queues.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.running.done.await.unwrap().unwrap();
        cleanup(&self.settings).await;
    }

    /// Waits until `received` deliveries came in and none is in flight.
    pub async fn wait_settled(&self, received: u64) {
        wait_for("every delivery settled", || async {
            let m = self.running.metrics.snapshot();
            (m.received == received && m.in_flight == 0).then_some(())
        })
        .await;
    }
}

/// Waits until every run of `msgs` has its rows.
pub async fn wait_stored(pool: &PgPool, msgs: &[Value], what: &str) {
    let ids = run_ids(msgs);
    wait_stored_count(pool, &ids, ids.len() as i64, what).await;
}

/// Waits until `n` of `ids` have their rows.
pub async fn wait_stored_count(pool: &PgPool, ids: &[uuid::Uuid], n: i64, what: &str) {
    wait_for(what, || async {
        (stored(pool, ids).await == n).then_some(())
    })
    .await;
}

/// Waits until `queue` holds `n` ready messages.
pub async fn wait_queue_len(conn: &Connection, queue: &str, n: u32, what: &str) {
    wait_for(what, || async {
        (queue_len(conn, queue).await == n).then_some(())
    })
    .await;
}

pub async fn connect() -> Connection {
    amqp::connect(&amqp_url(), "k6-ingest tests")
        .await
        .expect("RabbitMQ on K6_INGEST__AMQP__URL")
}

pub async fn declare(s: &Settings) {
    let conn = connect().await;
    let ch = conn.create_channel().await.unwrap();
    Topology::new(&s.amqp).declare(&ch).await.unwrap();
    let _ = conn.close(200, "ok".into()).await;
}

/// Ready messages in a queue (unacknowledged ones are not counted).
pub async fn queue_len(conn: &Connection, queue: &str) -> u32 {
    let ch = conn.create_channel().await.unwrap();
    let q = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let _ = ch.close(200, "ok".into()).await;
    q.message_count()
}

/// Takes every message from a queue: (body, properties).
pub async fn drain(conn: &Connection, queue: &str) -> Vec<(Vec<u8>, BasicProperties)> {
    let ch = conn.create_channel().await.unwrap();
    let mut out = Vec::new();
    while let Some(m) = ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: false })
        .await
        .unwrap()
    {
        m.delivery
            .acker
            .ack(BasicAckOptions::default())
            .await
            .unwrap();
        out.push((m.delivery.data.clone(), m.delivery.properties.clone()));
    }
    let _ = ch.close(200, "ok".into()).await;
    out
}

/// Publishes raw bodies to the main exchange, confirmed (declaring the topology first,
/// as `publish` does, so a message never races the worker's own declaration).
pub async fn publish_bodies(s: &Settings, bodies: &[Vec<u8>]) {
    declare(s).await;
    let conn = connect().await;
    let ch = amqp::confirm_channel(&conn).await.unwrap();
    for b in bodies {
        amqp::publish_confirmed(
            &ch,
            &s.amqp.exchange,
            &s.amqp.routing_key,
            b,
            BasicProperties::default(),
        )
        .await
        .unwrap();
    }
    let _ = conn.close(200, "ok".into()).await;
}

/// Deletes the test's queues and exchanges (best effort; names are unique anyway).
pub async fn cleanup(s: &Settings) {
    let Ok(conn) = amqp::connect(&amqp_url(), "k6-ingest tests cleanup").await else {
        return;
    };
    let t = Topology::new(&s.amqp);
    let mut queues = vec![t.queue.clone(), t.dead_letter_queue.clone()];
    queues.extend(t.retry_queues().into_iter().map(|q| q.0));
    for q in queues {
        if let Ok(ch) = conn.create_channel().await {
            let _ = ch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
    }
    for x in [t.exchange.clone(), t.dead_letter_exchange.clone()] {
        if let Ok(ch) = conn.create_channel().await {
            let _ = ch
                .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
                .await;
        }
    }
    let _ = conn.close(200, "ok".into()).await;
}

/// The fixture cases the tests cycle through (each has a summary k6 wrote).
pub const CASES: [&str; 6] = [
    "thresholds-pass",
    "thresholds-fail",
    "groups-nested-checks",
    "custom-metrics",
    "scenarios",
    "no-http",
];

/// A fixture message as the consumer sees it (artifacts as `file://` URIs), with a
/// fresh run id and event id so many distinct runs can come from a few fixtures.
pub fn case_message(case: &str) -> Value {
    let dir = super::fixtures().join("v1.1.0").join(case);
    let out = k6_ingest::publish::read_messages(&[dir.join("message.json")], 1 << 20).unwrap();
    let body = out.into_iter().next().unwrap().body.unwrap();
    let mut v: Value = serde_json::from_slice(&body).unwrap();
    v["run_id"] = Value::String(uuid::Uuid::now_v7().to_string());
    v["event_id"] = Value::String(uuid::Uuid::now_v7().to_string());
    v
}

/// A fresh run of `thresholds-pass` whose only artifact is its summary at `uri`.
pub fn summary_message(uri: String) -> Value {
    let mut m = case_message("thresholds-pass");
    m["artifacts"] = serde_json::json!({ "summary": uri });
    m
}

/// `n` distinct runs, cycling through the fixture cases.
pub fn messages(n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| case_message(CASES[i % CASES.len()]))
        .collect()
}

pub fn bodies(msgs: &[Value]) -> Vec<Vec<u8>> {
    msgs.iter()
        .map(|m| serde_json::to_vec(m).unwrap())
        .collect()
}

pub fn run_id_of(msg: &Value) -> uuid::Uuid {
    msg["run_id"].as_str().unwrap().parse().unwrap()
}

pub fn run_ids(msgs: &[Value]) -> Vec<uuid::Uuid> {
    msgs.iter().map(run_id_of).collect()
}

/// Messages in the retry delay queues and the dead-letter queue (ready ones).
pub async fn retry_and_dead(conn: &Connection, topo: &Topology) -> (u32, u32) {
    let mut retry = 0;
    for (q, _) in topo.retry_queues() {
        retry += queue_len(conn, &q).await;
    }
    (retry, queue_len(conn, &topo.dead_letter_queue).await)
}

/// Runs `rabbitmqctl` with the environment it needs on these machines.
pub fn rabbitmqctl(args: &[&str]) {
    let status = std::process::Command::new("rabbitmqctl")
        .args(args)
        .env("ERL_EPMD_ADDRESS", "127.0.0.1")
        .status()
        .expect("rabbitmqctl on PATH");
    assert!(status.success(), "rabbitmqctl {args:?} failed");
}
