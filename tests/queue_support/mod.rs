//! Helpers for the RabbitMQ tests: real RabbitMQ, PostgreSQL (a fresh database per test
//! via `#[sqlx::test]`) and the S3 server from `scripts/services-up.sh`. Every test gets
//! its own exchange, queues and bucket, so tests run in parallel; the ones that restart
//! the broker are named `serial_*` and run alone.
#![allow(dead_code)] // each test binary uses a different subset

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use k6_ingest::amqp::{self, Topology};
use k6_ingest::artifact::Fetcher;
use k6_ingest::config::Settings;
use k6_ingest::ingest::Ingestor;
use k6_ingest::s3::{ArtifactStore, build_client};
use lapin::options::{
    BasicAckOptions, BasicGetOptions, ExchangeDeleteOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection};
use serde_json::Value;
use sqlx::PgPool;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub const DEADLINE: Duration = Duration::from_secs(90);

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/k6")
}

pub fn amqp_url() -> String {
    std::env::var("K6_INGEST__AMQP__URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// A short unique tag for names.
pub fn tag() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..10].to_string()
}

/// Settings from the environment, with this test's own names and a bucket of its own.
pub fn settings(tag: &str) -> Settings {
    k6_ingest::telemetry::init_for_test();
    let mut s = Settings::load(None).expect("settings");
    assert!(
        s.s3.endpoint.is_some() && s.s3.bucket.is_some(),
        "K6_INGEST__S3__ENDPOINT / K6_INGEST__S3__BUCKET not set: run `eval \"$(scripts/services-up.sh)\"` first"
    );
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

pub async fn store(s: &Settings) -> ArtifactStore {
    let client = build_client(&s.s3).await;
    let bucket = s.s3.bucket().unwrap();
    if client.head_bucket().bucket(bucket).send().await.is_err() {
        client.create_bucket().bucket(bucket).send().await.unwrap();
    }
    ArtifactStore::new(client, &s.s3, bucket)
}

pub async fn ingestor(pool: &PgPool, s: &Settings) -> Ingestor {
    let store = store(s).await;
    let fetcher = Fetcher::new(&s.fetch, Some(store.client().clone()))
        .unwrap()
        .with_s3_sources(s.s3.sources().unwrap());
    Ingestor::new(pool.clone(), store, fetcher, s.s3.inline_summary_max_bytes)
}

/// The database URL of a `#[sqlx::test]` pool, for a worker in a child process.
pub fn database_url(pool: &PgPool) -> String {
    let db = pool.connect_options().get_database().unwrap().to_string();
    let base = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let mut url = url::Url::parse(&base).unwrap();
    url.set_path(&db);
    url.to_string()
}

/// Polls `check` until it returns `Some`, or panics with `what` after `DEADLINE`.
pub async fn wait_for<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let end = Instant::now() + DEADLINE;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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
pub fn message(case: &str) -> Value {
    let dir = fixtures().join("v1.1.0").join(case);
    let out = k6_ingest::publish::read_messages(&[dir.join("message.json")], 1 << 20).unwrap();
    let body = out.into_iter().next().unwrap().body.unwrap();
    let mut v: Value = serde_json::from_slice(&body).unwrap();
    v["run_id"] = Value::String(uuid::Uuid::now_v7().to_string());
    v["event_id"] = Value::String(uuid::Uuid::now_v7().to_string());
    v
}

/// `n` distinct runs, cycling through the fixture cases.
pub fn messages(n: usize) -> Vec<Value> {
    (0..n).map(|i| message(CASES[i % CASES.len()])).collect()
}

pub fn bodies(msgs: &[Value]) -> Vec<Vec<u8>> {
    msgs.iter()
        .map(|m| serde_json::to_vec(m).unwrap())
        .collect()
}

pub fn run_ids(msgs: &[Value]) -> Vec<uuid::Uuid> {
    msgs.iter()
        .map(|m| m["run_id"].as_str().unwrap().parse().unwrap())
        .collect()
}

/// How many of `ids` have their `runs` and `k6_performance_runs` rows.
pub async fn stored(pool: &PgPool, ids: &[uuid::Uuid]) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM runs r JOIN k6_performance_runs p ON p.run_id = r.id WHERE r.id = ANY($1)",
    )
    .bind(ids)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Every run written exactly once: one `runs` row, one `k6_performance_runs` row, and
/// detail rows identical to what a single ingest writes for that fixture (compared
/// between runs of the same case).
pub async fn assert_each_stored_once(pool: &PgPool, msgs: &[Value]) {
    let ids = run_ids(msgs);
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM runs WHERE id = ANY($1)")
        .bind(&ids)
        .fetch_one(pool)
        .await
        .unwrap();
    let perf: i64 =
        sqlx::query_scalar("SELECT count(*) FROM k6_performance_runs WHERE run_id = ANY($1)")
            .bind(&ids)
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(
        (runs, perf),
        (ids.len() as i64, ids.len() as i64),
        "one runs row and one k6_performance_runs row per run"
    );
    let mut per_case = std::collections::BTreeMap::<String, i64>::new();
    for m in msgs {
        let case = m["metadata"]["case"].as_str().unwrap().to_string();
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM k6_metrics_history h JOIN k6_performance_runs p ON p.id = h.k6_run_id WHERE p.run_id = $1",
        )
        .bind(m["run_id"].as_str().unwrap().parse::<uuid::Uuid>().unwrap())
        .fetch_one(pool)
        .await
        .unwrap();
        let expected = *per_case.entry(case.clone()).or_insert(n);
        assert_eq!(
            n, expected,
            "metric rows of a {case} run differ from another {case} run"
        );
        assert!(n > 0, "{case} has metric rows");
    }
}

/// Lists the keys in the test's bucket under a run.
pub async fn s3_keys(store: &ArtifactStore, run_id: &str) -> Vec<String> {
    let out = store
        .client()
        .list_objects_v2()
        .bucket(store.bucket())
        .prefix("runs/")
        .send()
        .await
        .unwrap();
    out.contents()
        .iter()
        .filter_map(|o| o.key())
        .filter(|k| k.contains(run_id))
        .map(str::to_string)
        .collect()
}

/// The `/metrics` value of one sample line, 0 when absent.
pub async fn scrape(addr: SocketAddr, sample: &str) -> f64 {
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| {
            l.strip_prefix(sample)
                .and_then(|rest| rest.strip_prefix(' '))
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or(0.0)
}

pub async fn readyz(addr: SocketAddr) -> Option<u16> {
    reqwest::get(format!("http://{addr}/readyz"))
        .await
        .ok()
        .map(|r| r.status().as_u16())
}

/// A TCP proxy a test can cut and restore: a fault (a service going away and coming
/// back) that a shared real service cannot be made to show on cue for one test alone.
/// Cut, it stops listening (new connections are refused, as with a stopped service) and
/// drops the open ones; restored, it listens again on the same port.
#[derive(Clone)]
pub struct Proxy {
    pub addr: SocketAddr,
    up: watch::Sender<bool>,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (up, rx) = watch::channel(true);
        tokio::spawn(async move {
            let mut listener = Some(listener);
            let mut state = rx.clone();
            loop {
                let Some(l) = &listener else {
                    if state.wait_for(|up| *up).await.is_err() {
                        return;
                    }
                    listener = Some(rebind(addr).await);
                    continue;
                };
                let accepted = tokio::select! {
                    a = l.accept() => a.ok(),
                    r = state.wait_for(|up| !*up) => {
                        if r.is_err() {
                            return;
                        }
                        None
                    }
                };
                let Some((client, _)) = accepted else {
                    listener = None; // cut: refuse new connections
                    continue;
                };
                let mut rx = rx.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let a = async { tokio::io::copy(&mut cr, &mut sw).await };
                    let b = async { tokio::io::copy(&mut sr, &mut cw).await };
                    tokio::select! {
                        _ = async { tokio::join!(a, b) } => {}
                        _ = rx.wait_for(|up| !*up) => {} // cut: drop both sides
                    }
                });
            }
        });
        Self { addr, up }
    }

    pub fn cut(&self) {
        self.up.send_replace(false);
    }

    pub fn restore(&self) {
        self.up.send_replace(true);
    }
}

/// Listens on `addr` again (the port may take a moment to be free).
async fn rebind(addr: SocketAddr) -> TcpListener {
    let mut tries = 0;
    loop {
        match TcpListener::bind(addr).await {
            Ok(l) => return l,
            Err(e) => {
                tries += 1;
                assert!(tries < 200, "cannot listen on {addr} again: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// `/readyz`: its status and JSON body.
pub async fn readyz_report(addr: SocketAddr) -> (u16, Value) {
    let r = reqwest::get(format!("http://{addr}/readyz")).await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap())
}

/// Messages in the retry delay queues and the dead-letter queue (ready ones).
pub async fn retry_and_dead(conn: &Connection, topo: &Topology) -> (u32, u32) {
    let mut retry = 0;
    for (q, _) in topo.retry_queues() {
        retry += queue_len(conn, &q).await;
    }
    (retry, queue_len(conn, &topo.dead_letter_queue).await)
}

/// The socket address of a `#[sqlx::test]` pool's server.
pub async fn pg_addr(pool: &PgPool) -> SocketAddr {
    let opts = pool.connect_options();
    tokio::net::lookup_host((opts.get_host(), opts.get_port()))
        .await
        .unwrap()
        .next()
        .unwrap()
}

/// A pool to the same database through `proxy`, failing fast when it is cut.
pub fn proxied_pool(pool: &PgPool, proxy: &Proxy) -> PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(6)
        .acquire_timeout(Duration::from_secs(1))
        .connect_lazy_with(
            (*pool.connect_options())
                .clone()
                .host("127.0.0.1")
                .port(proxy.addr.port()),
        )
}

/// The S3 endpoint of the settings, as a socket address for a proxy.
pub fn s3_addr(s: &Settings) -> SocketAddr {
    url::Url::parse(s.s3.endpoint.as_deref().unwrap())
        .unwrap()
        .socket_addrs(|| None)
        .unwrap()[0]
}

/// An HTTP server for artifacts whose responses to `/slow/...` wait until released,
/// counting how many such requests are open at once; `/status/NNN/...` answers status
/// NNN and `/hangup/...` closes the connection without answering (faults of one path
/// while the host is up).
#[derive(Clone)]
pub struct SlowServer {
    pub addr: SocketAddr,
    pub open: Arc<AtomicUsize>,
    pub peak: Arc<AtomicUsize>,
    release: Arc<AtomicBool>,
    notify: Arc<tokio::sync::Notify>,
}

impl SlowServer {
    /// Serves `body` for every path; paths starting with `/slow/` wait for `release`.
    pub async fn start(body: Vec<u8>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = Self {
            addr: listener.local_addr().unwrap(),
            open: Arc::default(),
            peak: Arc::default(),
            release: Arc::default(),
            notify: Arc::default(),
        };
        let s = server.clone();
        let body = Arc::new(body);
        tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    return;
                };
                let (s, body) = (s.clone(), body.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 8192];
                    let mut got = Vec::new();
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                    let line = String::from_utf8_lossy(&got)
                        .lines()
                        .next()
                        .unwrap_or_default()
                        .to_string();
                    let path = line.split(' ').nth(1).unwrap_or("/").to_string();
                    if path.starts_with("/hangup/") {
                        return; // closes the connection without an answer
                    }
                    if let Some(code) = path.strip_prefix("/status/").and_then(|p| p.get(..3)) {
                        let head = format!(
                            "HTTP/1.1 {code} Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                        );
                        let _ = conn.write_all(head.as_bytes()).await;
                        let _ = conn.shutdown().await;
                        return;
                    }
                    if path.starts_with("/slow/") {
                        let now = s.open.fetch_add(1, Ordering::SeqCst) + 1;
                        s.peak.fetch_max(now, Ordering::SeqCst);
                        while !s.release.load(Ordering::SeqCst) {
                            let notified = s.notify.notified();
                            if s.release.load(Ordering::SeqCst) {
                                break;
                            }
                            notified.await;
                        }
                        s.open.fetch_sub(1, Ordering::SeqCst);
                    }
                    let head = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = conn.write_all(head.as_bytes()).await;
                    let _ = conn.write_all(&body).await;
                    let _ = conn.shutdown().await;
                });
            }
        });
        server
    }

    pub fn release(&self) {
        self.release.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }
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
