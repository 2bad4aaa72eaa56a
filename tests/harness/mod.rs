//! The one test harness: real PostgreSQL (a fresh database per test via `#[sqlx::test]`),
//! the real S3-compatible server and RabbitMQ started by `scripts/services-up.sh`, the
//! k6 fixtures, and the queries tests assert with. Every test gets a bucket and queue
//! names of its own, so tests run in parallel; the ones that restart a shared service
//! are named `serial_*` and run alone.
#![allow(dead_code)] // each test binary uses a different subset

mod bin;
mod db;
mod extract;
mod net;
mod queue;
mod s3;

#[allow(unused_imports)] // each test binary uses a different subset
pub use {bin::*, db::*, extract::*, net::*, queue::*, s3::*};

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k6_ingest::artifact::Fetcher;
use k6_ingest::config::Settings;
use k6_ingest::ingest::{IngestContext, Ingestor};
use k6_ingest::message::RunCompleted;
use k6_ingest::s3::{ArtifactStore, build_client};
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

/// How long a test waits for something that should happen soon before it fails.
pub const DEADLINE: Duration = Duration::from_secs(90);

pub const MIB: u64 = 1024 * 1024;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/k6")
}

/// The runs k6 wrote split across runners (`--execution-segment`).
pub fn split_fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/k6-split")
}

pub fn fixture_dir(version: &str, case: &str) -> PathBuf {
    fixtures().join(version).join(case)
}

/// Every fixture run directory, as (version, case).
pub fn all_fixture_runs() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for v in std::fs::read_dir(fixtures()).unwrap() {
        let v = v.unwrap();
        let name = v.file_name().to_string_lossy().into_owned();
        if !name.starts_with('v') || !v.file_type().unwrap().is_dir() {
            continue;
        }
        for c in std::fs::read_dir(v.path()).unwrap() {
            let c = c.unwrap();
            if c.path().join("message.json").is_file() {
                out.push((name.clone(), c.file_name().to_string_lossy().into_owned()));
            }
        }
    }
    out.sort();
    out
}

pub fn message(dir: &Path) -> RunCompleted {
    RunCompleted::decode(&std::fs::read(dir.join("message.json")).unwrap()).unwrap()
}

/// The same message as another run (fresh run and event ids), so one fixture can be
/// ingested many times.
pub fn with_fresh_ids(msg: &RunCompleted) -> RunCompleted {
    let mut m = msg.clone();
    m.run_id = Uuid::now_v7();
    m.event_id = Uuid::now_v7();
    m
}

/// The fixture's message as JSON with a fresh run and event id, for tests that change
/// what the typed message cannot hold.
pub fn fresh_message_json(dir: &Path) -> Value {
    let mut m = read_json(&dir.join("message.json"));
    m["run_id"] = json!(Uuid::now_v7());
    m["event_id"] = json!(Uuid::now_v7());
    m
}

pub fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

pub fn write_json(path: &Path, v: &Value) {
    std::fs::write(path, serde_json::to_vec_pretty(v).unwrap()).unwrap();
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

/// Copies every file of `src` into `dst` (created if missing).
pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

/// Copies a fixture run directory somewhere a test may change it.
pub fn copy_fixture(version: &str, case: &str) -> tempfile::TempDir {
    let dst = tempfile::tempdir().unwrap();
    copy_dir(&fixture_dir(version, case), dst.path());
    dst
}

/// A copy of a fixture run whose message names a fresh run: (directory, run id).
pub fn fresh_run_dir(version: &str, case: &str) -> (tempfile::TempDir, Uuid) {
    let dir = copy_fixture(version, case);
    let path = dir.path().join("message.json");
    let msg = fresh_message_json(dir.path());
    std::fs::write(&path, msg.to_string()).unwrap();
    let run_id = msg["run_id"].as_str().unwrap().parse().unwrap();
    (dir, run_id)
}

/// A short unique tag for names.
pub fn tag() -> String {
    Uuid::new_v4().simple().to_string()[..10].to_string()
}

/// Settings from the environment `scripts/services-up.sh` exports, with a bucket of the
/// test's own and no prefix: the test server (s3s-fs) keeps per-object metadata in files
/// named after the base64 of bucket and key, which caps keys near 120 bytes for
/// multipart uploads there (S3 itself allows 1024), so a bucket keeps tests apart
/// where a prefix would cost key length.
pub fn settings() -> Settings {
    k6_ingest::telemetry::init_for_test();
    let mut s = Settings::load(None).expect("settings");
    assert!(
        s.s3.endpoint.is_some() && s.s3.bucket.is_some(),
        "K6_INGEST__S3__ENDPOINT / K6_INGEST__S3__BUCKET not set: run `eval \"$(scripts/services-up.sh)\"` first"
    );
    s.s3.bucket = Some(format!("t-{}", &tag()[..8]));
    s.s3.prefix = String::new();
    s
}

/// The store of the settings' bucket, creating the bucket on first use.
pub async fn store(s: &Settings) -> ArtifactStore {
    let client = build_client(&s.s3).await;
    let bucket = s.s3.bucket().unwrap();
    if client.head_bucket().bucket(bucket).send().await.is_err() {
        client.create_bucket().bucket(bucket).send().await.unwrap();
    }
    ArtifactStore::new(client, &s.s3, bucket)
}

/// One test's world: its database (the fresh one `#[sqlx::test]` made), its bucket, its
/// settings (with queue names of its own for the queue tests) and an ingestor on them.
pub struct TestEnv {
    pub pool: PgPool,
    pub s: Settings,
    pub store: ArtifactStore,
    pub ing: Ingestor,
}

impl TestEnv {
    pub async fn new(pool: &PgPool) -> Self {
        Self::with_settings(pool, settings()).await
    }

    /// With an exchange, queues and bucket named after a fresh tag.
    pub async fn queued(pool: &PgPool) -> Self {
        Self::with_settings(pool, queue_settings(&tag())).await
    }

    pub async fn with_settings(pool: &PgPool, s: Settings) -> Self {
        let store = store(&s).await;
        let client = store.client().clone();
        let ing = assemble(pool, &s, store.clone(), client, vec![fixtures()]);
        Self {
            pool: pool.clone(),
            s,
            store,
            ing,
        }
    }
}

/// An ingestor on the test's database and bucket that reads the bundled fixtures.
pub async fn ingestor(pool: &PgPool, s: &Settings) -> Ingestor {
    ingestor_with_roots(pool, s, vec![fixtures()]).await
}

/// An ingestor that may also read local artifacts under `roots`.
pub async fn ingestor_with_roots(pool: &PgPool, s: &Settings, roots: Vec<PathBuf>) -> Ingestor {
    let store = store(s).await;
    let client = store.client().clone();
    assemble(pool, s, store, client, roots)
}

/// An ingestor whose fetches of `s3://` sources go to `endpoint` (a proxy in front of
/// the S3 server, say) while its uploads go straight to the server.
pub async fn ingestor_fetching_via(pool: &PgPool, s: &Settings, endpoint: String) -> Ingestor {
    let mut via = s.s3.clone();
    via.endpoint = Some(endpoint);
    assemble(
        pool,
        s,
        store(s).await,
        build_client(&via).await,
        Vec::new(),
    )
}

/// The ingestor a dry run uses, made here only, so a change in how a dry run is set up
/// touches this one function. It keeps the database and the store, so a test can show
/// that neither is written to.
pub async fn dry_run_ingestor(pool: &PgPool, s: &Settings) -> Ingestor {
    ingestor(pool, s).await
}

/// The one place an ingestor is put together from its parts.
fn assemble(
    pool: &PgPool,
    s: &Settings,
    store: ArtifactStore,
    fetch_client: aws_sdk_s3::Client,
    roots: Vec<PathBuf>,
) -> Ingestor {
    let fetcher = Fetcher::new(&s.fetch, Some(fetch_client))
        .unwrap()
        .with_roots(roots)
        .with_s3_sources(s.s3.sources().unwrap());
    Ingestor::new(pool.clone(), store, fetcher, s.s3.inline_summary_max_bytes)
}

/// How a replay ingests a run whose message lies in `dir`.
pub fn ctx(dir: &Path) -> IngestContext {
    IngestContext {
        base_dir: Some(dir.to_path_buf()),
    }
}

/// Ingests the run whose message lies in `dir`, as a replay does, and asserts it was
/// stored as new; returns its message.
pub async fn ingest_dir(ing: &Ingestor, dir: &Path) -> RunCompleted {
    let msg = message(dir);
    let report = ing
        .ingest_one(&msg, &ctx(dir))
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    assert_eq!(
        report.outcome,
        k6_ingest::ingest::Outcome::Ingested,
        "{}",
        dir.display()
    );
    msg
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
