//! The ceilings `scripts/bench-e2e.sh` sets the end-to-end rate against, each measured
//! with the worker's own code on the services it uses:
//!
//! - `store C SECS`: `Db::store_run` of the bundled v1.1.0 fixtures (extracted once,
//!   as the worker extracts them), with fresh run ids, at concurrency C: runs/s;
//! - `s3 C SECS`: `ArtifactStore::upload_file` of the fixtures' artifacts (the files a
//!   run uploads, in the same mix) at concurrency C: PutObject/s, and uploads per run;
//! - `amqp C SECS`: confirmed publishes from C tasks while one consumer acks: messages/s
//!   through the broker;
//! - `amqp-cleanup`: deletes the exchanges and queues of the configured topology;
//!   `s3-cleanup`: deletes every object under the configured `s3.prefix`.
//!
//! Settings come from `K6_INGEST__*` as for the worker. Every mode prints one
//! `ceiling <name> <value>` line for the script, after a line for people.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use k6_ingest::amqp::{self, Topology};
use k6_ingest::artifact::open_lines;
use k6_ingest::config::Settings;
use k6_ingest::db::{self, Db, NewRun};
use k6_ingest::message::RunCompleted;
use k6_ingest::s3::{ArtifactStore, build_client, content_type_for};
use k6_ingest::summary::parse::parse_summary_value;
use k6_ingest::summary::samples::collect_samples;
use k6_ingest::summary::{Extraction, extract, extract_without_summary, wanted_samples};
use lapin::BasicProperties;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, ExchangeDeleteOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use serde_json::{Value, json};
use uuid::Uuid;

/// One fixture run as the worker would store it, and the files it would upload.
struct Case {
    msg: RunCompleted,
    extraction: Extraction,
    has_summary: bool,
    summary_json: Option<Value>,
    uploads: Vec<PathBuf>,
}

fn fixtures_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/k6/v1.1.0")
}

fn load_case(dir: &Path) -> Option<Case> {
    let msg_bytes = std::fs::read(dir.join("message.json")).ok()?;
    let msg = RunCompleted::decode(&msg_bytes).expect("fixture message decodes");
    let artifact = |name: &Option<String>| name.as_deref().map(|n| dir.join(n));
    let uploads: Vec<PathBuf> = [
        &msg.artifacts.logs,
        &msg.artifacts.report_html,
        &msg.artifacts.metrics,
    ]
    .into_iter()
    .filter_map(artifact)
    .filter(|p| p.is_file())
    .collect();
    let doc = artifact(&msg.artifacts.summary)
        .and_then(|p| std::fs::read(p).ok())
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok());
    let summary = doc.as_ref().and_then(|d| parse_summary_value(d).ok());
    let (extraction, summary_json) = match summary {
        Some(s) => {
            let requests = wanted_samples(&s);
            let samples = artifact(&msg.artifacts.metrics)
                .filter(|p| p.is_file() && !requests.is_empty())
                .map(|p| collect_samples(open_lines(&p).unwrap(), &requests, usize::MAX).unwrap());
            (extract(&s, msg.exit_code, samples.as_ref()), doc)
        }
        None => (
            extract_without_summary(msg.exit_code, "no summary in the fixture"),
            None,
        ),
    };
    Some(Case {
        has_summary: summary_json.is_some(),
        msg,
        extraction,
        summary_json,
        uploads,
    })
}

fn cases() -> Vec<Case> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(fixtures_root())
        .expect("fixtures/k6/v1.1.0")
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("message.json").is_file())
        .collect();
    dirs.sort();
    dirs.iter().filter_map(|d| load_case(d)).collect()
}

/// Runs `work(i)` from `concurrency` tasks until `secs` have passed; returns the calls
/// completed and the time they took.
async fn tight_loop<F, Fut>(concurrency: usize, secs: f64, work: F) -> (u64, f64)
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let work = Arc::new(work);
    let next = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (work, next, done, stop) = (work.clone(), next.clone(), done.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    work(next.fetch_add(1, Ordering::Relaxed)).await;
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.expect("bench task");
    }
    (done.load(Ordering::Relaxed), start.elapsed().as_secs_f64())
}

async fn store(settings: Settings, concurrency: usize, secs: f64) {
    let mut dbs = settings.database.clone();
    dbs.max_connections = concurrency as u32;
    let pool = db::connect(&dbs).await.expect("database");
    let db = Db::new(pool, dbs.prepared_statements);
    let cases = Arc::new(cases());
    // The first write of a month creates its partitions; keep that out of the loop.
    for c in cases.iter() {
        db.ensure_month(c.msg.started_at).await.expect("partitions");
    }
    let (n, t) = tight_loop(concurrency, secs, move |i| {
        let (db, cases) = (db.clone(), cases.clone());
        async move {
            let c = &cases[i as usize % cases.len()];
            let mut msg = c.msg.clone();
            msg.run_id = Uuid::new_v4();
            msg.event_id = Uuid::new_v4();
            let new = NewRun {
                msg: &msg,
                extraction: &c.extraction,
                has_summary: c.has_summary,
                duration_ms: c.extraction.columns.duration_ms,
                artifact_paths: json!({"logs": {"s3": "s3://bench/k6.log", "bytes": 0}}),
                logs_s3_url: Some("s3://bench/k6.log".into()),
                summary_json: c.summary_json.clone(),
                summary_s3_url: None,
            };
            db.store_run(&new).await.expect("store_run");
        }
    })
    .await;
    println!(
        "store (Db::store_run, {} fixture runs in turn) at concurrency {concurrency}: {n} runs in {t:.2} s = {:.1} runs/s",
        cases_len(),
        n as f64 / t
    );
    println!("ceiling store_c{concurrency} {:.3}", n as f64 / t);
}

fn cases_len() -> usize {
    std::fs::read_dir(fixtures_root())
        .map(|d| {
            d.filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.path().join("message.json").is_file())
            })
            .count()
        })
        .unwrap_or(0)
}

async fn s3(settings: Settings, concurrency: usize, secs: f64) {
    let s = &settings.s3;
    let client = build_client(s).await;
    let store = Arc::new(ArtifactStore::new(
        client,
        s,
        s.bucket().expect("s3.bucket"),
    ));
    let cases = cases();
    let files: Arc<Vec<PathBuf>> = Arc::new(cases.iter().flat_map(|c| c.uploads.clone()).collect());
    let per_run = files.len() as f64 / cases.len() as f64;
    let bytes: u64 = files.iter().map(|f| f.metadata().unwrap().len()).sum();
    let prefix = Uuid::new_v4();
    let keys = Arc::new(std::sync::Mutex::new(Vec::new()));
    let kept = keys.clone();
    let (n, t) = tight_loop(concurrency, secs, move |i| {
        let (store, files, keys) = (store.clone(), files.clone(), keys.clone());
        async move {
            let f = &files[i as usize % files.len()];
            let name = f.file_name().unwrap().to_string_lossy().into_owned();
            let key = store.key_for(prefix, prefix, Uuid::new_v4(), &name);
            store
                .upload_file(f, &key, content_type_for(&name))
                .await
                .expect("upload");
            keys.lock().unwrap().push(key);
        }
    })
    .await;
    println!(
        "s3 (ArtifactStore::upload_file, the fixtures' {} artifacts, {} bytes on average) at concurrency {concurrency}: {n} PutObject in {t:.2} s = {:.1}/s; {per_run:.3} uploads per run",
        cases.iter().map(|c| c.uploads.len()).sum::<usize>(),
        bytes
            / cases
                .iter()
                .map(|c| c.uploads.len() as u64)
                .sum::<u64>()
                .max(1),
        n as f64 / t
    );
    println!("ceiling s3_put {:.3}", n as f64 / t);
    println!("ceiling uploads_per_run {per_run:.4}");
    let store = ArtifactStore::new(build_client(s).await, s, s.bucket().unwrap());
    let keys = std::mem::take(&mut *kept.lock().unwrap());
    for chunk in keys.chunks(64) {
        futures_util::future::join_all(chunk.iter().map(|k| store.delete(k))).await;
    }
}

async fn amqp_rate(settings: Settings, concurrency: usize, secs: f64) {
    let (conn, topology) = amqp::connect_ready(&settings.amqp, "k6-ingest-bench")
        .await
        .expect("RabbitMQ");
    let body: Arc<Vec<u8>> =
        Arc::new(std::fs::read(fixtures_root().join("thresholds-fail/message.json")).unwrap());
    let consume_ch = conn.create_channel().await.unwrap();
    consume_ch
        .basic_qos(32, BasicQosOptions::default())
        .await
        .unwrap();
    let mut consumer = consume_ch
        .basic_consume(
            topology.queue.as_str().into(),
            "bench".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let acked = Arc::new(AtomicU64::new(0));
    let counter = acked.clone();
    let consuming = tokio::spawn(async move {
        while let Some(Ok(d)) = consumer.next().await {
            d.acker.ack(BasicAckOptions::default()).await.unwrap();
            counter.fetch_add(1, Ordering::Relaxed);
        }
    });
    let mut channels = Vec::new();
    for _ in 0..concurrency {
        channels.push(amqp::confirm_channel(&conn).await.unwrap());
    }
    let channels = Arc::new(channels);
    let (exchange, key) = (
        Arc::new(topology.exchange.clone()),
        Arc::new(topology.routing_key.clone()),
    );
    let start = Instant::now();
    let (published, _) = tight_loop(concurrency, secs, move |i| {
        let (channels, body, exchange, key) = (
            channels.clone(),
            body.clone(),
            exchange.clone(),
            key.clone(),
        );
        async move {
            let ch = &channels[i as usize % channels.len()];
            amqp::publish_confirmed(ch, &exchange, &key, &body, BasicProperties::default())
                .await
                .expect("publish");
        }
    })
    .await;
    while acked.load(Ordering::Relaxed) < published {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let t = start.elapsed().as_secs_f64();
    consuming.abort();
    println!(
        "amqp (publish_confirmed from {concurrency} channels + one consumer acking): {published} messages in {t:.2} s = {:.1}/s",
        published as f64 / t
    );
    println!("ceiling amqp {:.3}", published as f64 / t);
    cleanup(&conn, &topology).await;
}

async fn cleanup(conn: &lapin::Connection, t: &Topology) {
    let ch = conn.create_channel().await.unwrap();
    let mut queues = vec![t.queue.clone(), t.dead_letter_queue.clone()];
    queues.extend(t.retry_queues().into_iter().map(|(q, _)| q));
    for q in queues {
        let _ = ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    for x in [&t.exchange, &t.dead_letter_exchange] {
        let _ = ch
            .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
            .await;
    }
}

async fn amqp_cleanup(settings: Settings) {
    let conn = amqp::connect(settings.amqp.url().unwrap(), "k6-ingest-bench")
        .await
        .expect("RabbitMQ");
    cleanup(&conn, &Topology::new(&settings.amqp)).await;
}

async fn s3_cleanup(settings: Settings) {
    let s = &settings.s3;
    assert!(!s.prefix.is_empty(), "s3-cleanup needs a prefix of its own");
    let store = ArtifactStore::new(build_client(s).await, s, s.bucket().unwrap());
    let mut pages = store
        .client()
        .list_objects_v2()
        .bucket(store.bucket())
        .prefix(format!("{}/", s.prefix))
        .into_paginator()
        .send();
    let mut keys = Vec::new();
    while let Some(page) = pages.next().await {
        keys.extend(
            page.expect("ListObjectsV2")
                .contents()
                .iter()
                .filter_map(|o| o.key().map(str::to_string)),
        );
    }
    for chunk in keys.chunks(64) {
        futures_util::future::join_all(chunk.iter().map(|k| store.delete(k))).await;
    }
    println!(
        "s3-cleanup: {} objects under {}/ deleted",
        keys.len(),
        s.prefix
    );
}

#[tokio::main]
async fn main() {
    // `cargo bench` adds `--bench`.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let num = |i: usize, default: f64| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default);
    let settings = Settings::load(None).expect("settings (K6_INGEST__*)");
    match args.first().map(String::as_str) {
        Some("store") => store(settings, num(1, 8.0) as usize, num(2, 10.0)).await,
        Some("s3") => s3(settings, num(1, 8.0) as usize, num(2, 10.0)).await,
        Some("amqp") => amqp_rate(settings, num(1, 8.0) as usize, num(2, 10.0)).await,
        Some("amqp-cleanup") => amqp_cleanup(settings).await,
        Some("s3-cleanup") => s3_cleanup(settings).await,
        _ => eprintln!(
            "usage: store_loop store|s3|amqp [CONCURRENCY] [SECONDS] | amqp-cleanup | s3-cleanup"
        ),
    }
}
