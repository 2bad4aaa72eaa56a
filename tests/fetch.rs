//! Artifact fetching over real HTTP: a small HTTP/1.1 server on 127.0.0.1 plays the
//! artifact host a runner uploads to, including the ways such a host misbehaves (errors,
//! slowness, lying or missing lengths, endless bodies, redirects), and `ingest_one`
//! is driven end to end against it with the real PostgreSQL and S3 server.

mod harness;

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use harness::*;
use k6_ingest::artifact::{FetchError, Fetcher, LocalArtifact, Tenant};
use k6_ingest::config::{FetchSettings, Settings};
use k6_ingest::ingest::{ArtifactRole, Disposition, IngestError, Outcome};
use sqlx::PgPool;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

const MIB: u64 = 1024 * 1024;

/// What the artifact host answers on one path.
#[derive(Clone)]
enum Reply {
    /// 200 with this body and its Content-Length.
    Body(Vec<u8>),
    /// This status with a short text body.
    Status(u16),
    /// 200 with an empty JSON object, after waiting this long.
    AfterDelay(Duration),
    /// 200 announcing this Content-Length, then no body until the client hangs up.
    Announce(u64),
    /// 200 with this body, chunked, no Content-Length.
    Chunked(Vec<u8>),
    /// 200, chunked, a body that never ends.
    Endless,
    /// 200 announcing fewer bytes than the body that follows.
    Understated { announced: usize, body: Vec<u8> },
    /// 200 announcing `len` bytes, then one byte every `every`.
    Trickle { len: usize, every: Duration },
    /// 302 to this location.
    Redirect(String),
}

/// A connection-per-request HTTP/1.1 server on 127.0.0.1, port 0.
struct ArtifactHost {
    addr: SocketAddr,
    state: Arc<HostState>,
}

struct HostState {
    routes: HashMap<String, Reply>,
    /// Every request path, in arrival order.
    requests: Mutex<Vec<String>>,
    /// Every request's `Authorization` header, in arrival order.
    authorizations: Mutex<Vec<Option<String>>>,
    /// Body bytes the endless stream got onto the wire.
    streamed: AtomicU64,
    /// Signalled when a client hung up in the middle of a body.
    hung_up: Notify,
}

impl ArtifactHost {
    async fn start(routes: Vec<(&str, Reply)>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(HostState {
            routes: routes
                .into_iter()
                .map(|(path, reply)| (path.to_string(), reply))
                .collect(),
            requests: Mutex::default(),
            authorizations: Mutex::default(),
            streamed: AtomicU64::new(0),
            hung_up: Notify::new(),
        });
        let shared = state.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let state = shared.clone();
                tokio::spawn(async move {
                    let _ = answer(socket, &state).await;
                });
            }
        });
        Self { addr, state }
    }

    /// The `host:port` entry for `fetch.allowed_hosts`.
    fn host(&self) -> String {
        self.addr.to_string()
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn requests(&self) -> Vec<String> {
        self.state.requests.lock().unwrap().clone()
    }

    fn authorizations(&self) -> Vec<Option<String>> {
        self.state.authorizations.lock().unwrap().clone()
    }

    /// Waits until a client hung up in the middle of a body; a generous deadline turns
    /// a client that keeps reading into a failure instead of a hang.
    async fn client_hung_up(&self) {
        tokio::time::timeout(Duration::from_secs(20), self.state.hung_up.notified())
            .await
            .expect("the client kept the connection open and reading");
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        302 => "Found",
        403 => "Forbidden",
        404 => "Not Found",
        410 => "Gone",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Other",
    }
}

fn head(status: u16, headers: &[(&str, String)]) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\nConnection: close\r\n",
        reason(status)
    );
    for (name, value) in headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str("\r\n");
    out.into_bytes()
}

async fn answer(mut socket: TcpStream, state: &HostState) -> std::io::Result<()> {
    let mut request = Vec::new();
    let mut buf = [0u8; 4096];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = socket.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        request.extend_from_slice(&buf[..n]);
    }
    let request = String::from_utf8_lossy(&request);
    let target = request.split_whitespace().nth(1).unwrap_or("/");
    // Routes are paths; a query string (a presigned URL's) does not change the reply.
    let path = target.split('?').next().unwrap_or_default().to_string();
    let authorization = request.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("authorization")
            .then(|| value.trim().to_string())
    });
    state.requests.lock().unwrap().push(target.to_string());
    state.authorizations.lock().unwrap().push(authorization);
    let reply = state
        .routes
        .get(&path)
        .cloned()
        .unwrap_or(Reply::Status(404));
    match reply {
        Reply::Body(body) => {
            socket
                .write_all(&head(200, &[("Content-Length", body.len().to_string())]))
                .await?;
            socket.write_all(&body).await?;
        }
        Reply::Status(status) => {
            let body = format!("{status} {}\n", reason(status));
            socket
                .write_all(&head(
                    status,
                    &[
                        ("Content-Length", body.len().to_string()),
                        ("Retry-After", "1".into()),
                    ],
                ))
                .await?;
            socket.write_all(body.as_bytes()).await?;
        }
        Reply::AfterDelay(delay) => {
            tokio::time::sleep(delay).await;
            socket
                .write_all(&head(200, &[("Content-Length", "2".into())]))
                .await?;
            socket.write_all(b"{}").await?;
        }
        Reply::Announce(length) => {
            socket
                .write_all(&head(200, &[("Content-Length", length.to_string())]))
                .await?;
            // Send nothing: a client that waits for the body gets stuck here.
            while socket.read(&mut buf).await.is_ok_and(|n| n > 0) {}
            state.hung_up.notify_one();
        }
        Reply::Chunked(body) => {
            socket
                .write_all(&head(200, &[("Transfer-Encoding", "chunked".into())]))
                .await?;
            for chunk in body.chunks(8192) {
                socket
                    .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
                    .await?;
                socket.write_all(chunk).await?;
                socket.write_all(b"\r\n").await?;
            }
            socket.write_all(b"0\r\n\r\n").await?;
        }
        Reply::Endless => {
            socket
                .write_all(&head(200, &[("Transfer-Encoding", "chunked".into())]))
                .await?;
            let chunk = vec![b'x'; 64 * 1024];
            let size_line = format!("{:x}\r\n", chunk.len());
            loop {
                let sent = async {
                    socket.write_all(size_line.as_bytes()).await?;
                    socket.write_all(&chunk).await?;
                    socket.write_all(b"\r\n").await
                }
                .await;
                if sent.is_err() {
                    state.hung_up.notify_one();
                    return Ok(());
                }
                state
                    .streamed
                    .fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
        }
        Reply::Understated { announced, body } => {
            socket
                .write_all(&head(200, &[("Content-Length", announced.to_string())]))
                .await?;
            socket.write_all(&body).await?;
        }
        Reply::Trickle { len, every } => {
            socket
                .write_all(&head(200, &[("Content-Length", len.to_string())]))
                .await?;
            for _ in 0..len {
                tokio::time::sleep(every).await;
                socket.write_all(b"x").await?;
            }
        }
        Reply::Redirect(location) => {
            socket
                .write_all(&head(
                    302,
                    &[("Location", location), ("Content-Length", "0".into())],
                ))
                .await?;
        }
    }
    socket.shutdown().await
}

/// Fetch settings as the worker loads them, with `hosts` allow-listed and a timeout short
/// enough that a client waiting for a body that never comes fails the test quickly.
fn fetch_settings(hosts: &[&ArtifactHost]) -> FetchSettings {
    let mut fetch = Settings::load(None).expect("settings").fetch;
    fetch.allowed_hosts = hosts.iter().map(|h| h.host()).collect();
    fetch.timeout_secs = 10;
    fetch
}

fn fetcher(fetch: &FetchSettings) -> Fetcher {
    Fetcher::new(fetch, None).unwrap()
}

/// Whose artifacts these are; HTTP sources do not depend on it.
fn tenant() -> Tenant {
    Tenant {
        organization_id: uuid::Uuid::from_u128(1),
        project_id: uuid::Uuid::from_u128(2),
        run_id: uuid::Uuid::from_u128(3),
    }
}

async fn fetch_artifact(
    fetcher: &Fetcher,
    uri: &str,
    limit: u64,
) -> Result<LocalArtifact, FetchError> {
    let source = fetcher.resolve(uri, None, &tenant())?;
    fetcher.fetch_to_local(uri, &source, limit).await
}

async fn fetch_summary(fetcher: &Fetcher, uri: &str) -> Result<Vec<u8>, FetchError> {
    let source = fetcher.resolve(uri, None, &tenant())?;
    fetcher.fetch_summary(uri, &source).await
}

/// Bytes no compressor or buffer boundary makes special.
fn varied_bytes(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15_u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

fn fixture_summary() -> Vec<u8> {
    std::fs::read(fixture_dir("v1.1.0", "json-logs").join("summary.json")).unwrap()
}

/// The directory the fetcher's temporary files go to in this test process. nextest runs
/// every test in a process of its own, so nothing but the test calling this writes there.
fn private_temp_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("fetch-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        tempfile::env::override_temp_dir(&dir).expect("temp dir already overridden");
        dir
    })
}

fn temp_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
}

/// Peak resident memory of this process, where the platform reports it.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[tokio::test]
async fn a_200_body_arrives_byte_for_byte() {
    let body = varied_bytes(3 * MIB as usize + 17);
    let summary = fixture_summary();
    let host = ArtifactHost::start(vec![
        ("/runs/1/metrics.ndjson.gz", Reply::Body(body.clone())),
        ("/runs/1/chunked.bin", Reply::Chunked(body.clone())),
        ("/runs/1/summary.json", Reply::Body(summary.clone())),
    ])
    .await;
    let fetch = fetch_settings(&[&host]);
    let fetcher = fetcher(&fetch);

    for path in ["/runs/1/metrics.ndjson.gz", "/runs/1/chunked.bin"] {
        let local = fetch_artifact(&fetcher, &host.url(path), fetch.max_artifact_bytes)
            .await
            .unwrap();
        assert_eq!(local.size, body.len() as u64, "{path}");
        assert!(std::fs::read(&local.path).unwrap() == body, "{path}");
        // The copy is temporary: it goes with the value.
        let copy = local.path.clone();
        drop(local);
        assert!(!copy.exists(), "{path}: {} was left behind", copy.display());
    }

    let fetched = fetch_summary(&fetcher, &host.url("/runs/1/summary.json"))
        .await
        .unwrap();
    assert_eq!(fetched, summary);
}

#[tokio::test]
async fn a_gzip_compressed_summary_is_inflated() {
    let summary = fixture_summary();
    let compressed = gzip(&summary);
    assert_ne!(compressed, summary);
    let host = ArtifactHost::start(vec![(
        "/runs/1/summary.json.gz",
        Reply::Body(compressed.clone()),
    )])
    .await;
    let fetcher = fetcher(&fetch_settings(&[&host]));

    let fetched = fetch_summary(&fetcher, &host.url("/runs/1/summary.json.gz"))
        .await
        .unwrap();
    assert_eq!(fetched, summary);
    // Other artifacts are stored as they were sent.
    let local = fetch_artifact(&fetcher, &host.url("/runs/1/summary.json.gz"), MIB)
        .await
        .unwrap();
    assert_eq!(std::fs::read(&local.path).unwrap(), compressed);
}

#[tokio::test]
async fn a_gzip_bomb_summary_is_too_large_and_never_inflated_whole() {
    // 1 GiB of spaces in about 1 MiB: one compressed MiB, repeated as gzip members.
    let member = gzip(&vec![b' '; MIB as usize]);
    let bomb = member.repeat(1024);
    let inflated: u64 = 1024 * MIB;
    let host = ArtifactHost::start(vec![("/runs/1/summary.json", Reply::Body(bomb.clone()))]).await;
    let mut fetch = fetch_settings(&[&host]);
    fetch.max_inflated_bytes = 4 * MIB;
    assert!(
        (bomb.len() as u64) < fetch.max_summary_bytes,
        "the compressed bomb itself must pass the download limit"
    );
    let fetcher = fetcher(&fetch);

    let err = fetch_summary(&fetcher, &host.url("/runs/1/summary.json"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, FetchError::TooLarge { limit, .. } if limit == 4 * MIB),
        "{err:?}"
    );
    assert!(!err.fault().is_retryable());
    if let Some(peak) = peak_rss_bytes() {
        assert!(
            peak < inflated / 2,
            "peak memory {peak} bytes: the bomb was inflated far beyond the cap"
        );
    }
}

#[tokio::test]
async fn server_errors_and_too_many_requests_are_transient() {
    let statuses = [500u16, 502, 503, 504, 429];
    let paths: Vec<String> = statuses.iter().map(|s| format!("/s/{s}")).collect();
    let host = ArtifactHost::start(
        statuses
            .iter()
            .zip(&paths)
            .map(|(s, p)| (p.as_str(), Reply::Status(*s)))
            .collect(),
    )
    .await;
    let fetch = fetch_settings(&[&host]);
    let fetcher = fetcher(&fetch);

    for (expected, path) in statuses.iter().zip(&paths) {
        let uri = host.url(path);
        let err = fetch_artifact(&fetcher, &uri, fetch.max_artifact_bytes)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, FetchError::Status { status, uri: u } if status == expected && *u == uri),
            "{err:?}"
        );
        assert!(err.fault().is_retryable(), "{err}");
        let err = fetch_summary(&fetcher, &uri).await.unwrap_err();
        assert!(
            matches!(&err, FetchError::Status { status, .. } if status == expected),
            "{err:?}"
        );
        assert!(err.fault().is_retryable(), "{err}");
    }
}

#[tokio::test]
async fn not_found_and_forbidden_are_permanent() {
    let host = ArtifactHost::start(vec![
        ("/gone", Reply::Status(410)),
        ("/forbidden", Reply::Status(403)),
    ])
    .await;
    let fetch = fetch_settings(&[&host]);
    let fetcher = fetcher(&fetch);

    for path in ["/missing", "/gone"] {
        let uri = host.url(path);
        let err = fetch_artifact(&fetcher, &uri, fetch.max_artifact_bytes)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, FetchError::NotFound { uri: u } if *u == uri),
            "{err:?}"
        );
        assert!(!err.fault().is_retryable(), "{err}");
    }
    let err = fetch_summary(&fetcher, &host.url("/forbidden"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, FetchError::Status { status: 403, .. }),
        "{err:?}"
    );
    assert!(!err.fault().is_retryable(), "{err}");
    assert_eq!(host.requests(), ["/missing", "/gone", "/forbidden"]);
}

#[tokio::test]
async fn a_host_slower_than_the_timeout_is_a_transient_timeout() {
    let host = ArtifactHost::start(vec![
        ("/slow", Reply::AfterDelay(Duration::from_secs(60))),
        // Headers on time, then a body that never comes.
        ("/stalled", Reply::Announce(1000)),
    ])
    .await;
    let mut fetch = fetch_settings(&[&host]);
    fetch.timeout_secs = 1;
    let fetcher = fetcher(&fetch);

    for path in ["/slow", "/stalled"] {
        let started = Instant::now();
        let err = fetch_artifact(&fetcher, &host.url(path), fetch.max_artifact_bytes)
            .await
            .unwrap_err();
        assert!(
            matches!(err, FetchError::Timeout { secs: 1, .. }),
            "{path}: {err:?}"
        );
        assert!(err.fault().is_retryable(), "{err}");
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{path}: gave up only after {:?}",
            started.elapsed()
        );
    }
}

#[tokio::test]
async fn a_download_that_keeps_arriving_is_not_cut_off() {
    // A byte every 200 ms for 3 s: the host never goes quiet for as long as the timeout.
    let host = ArtifactHost::start(vec![(
        "/runs/1/metrics.ndjson",
        Reply::Trickle {
            len: 15,
            every: Duration::from_millis(200),
        },
    )])
    .await;
    let mut fetch = fetch_settings(&[&host]);
    fetch.timeout_secs = 1;
    let fetcher = fetcher(&fetch);
    let local = fetch_artifact(
        &fetcher,
        &host.url("/runs/1/metrics.ndjson"),
        fetch.max_artifact_bytes,
    )
    .await
    .unwrap();
    assert_eq!(std::fs::read(&local.path).unwrap(), vec![b'x'; 15]);
}

#[tokio::test]
async fn an_announced_length_over_the_limit_is_refused_before_downloading() {
    // The worker's own limits (10 GiB and 64 MiB by default).
    let defaults = Settings::load(None).expect("settings").fetch;
    let host = ArtifactHost::start(vec![
        (
            "/runs/1/metrics.ndjson",
            Reply::Announce(defaults.max_artifact_bytes * 5),
        ),
        (
            "/runs/1/summary.json",
            Reply::Announce(defaults.max_summary_bytes + 1),
        ),
    ])
    .await;
    let fetch = fetch_settings(&[&host]);
    let fetcher = fetcher(&fetch);

    // The host sends no body at all: waiting for one would end as a Timeout.
    let err = fetch_artifact(
        &fetcher,
        &host.url("/runs/1/metrics.ndjson"),
        fetch.max_artifact_bytes,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, FetchError::TooLarge { limit, .. } if limit == fetch.max_artifact_bytes),
        "{err:?}"
    );
    assert!(!err.fault().is_retryable());
    host.client_hung_up().await;

    let err = fetch_summary(&fetcher, &host.url("/runs/1/summary.json"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, FetchError::TooLarge { limit, .. } if limit == fetch.max_summary_bytes),
        "{err:?}"
    );
    assert!(!err.fault().is_retryable());
}

fn assert_too_large(err: &FetchError, limit: u64) {
    assert!(
        matches!(err, FetchError::TooLarge { limit: l, .. } if *l == limit),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_body_past_the_limit_stops_the_download_and_leaves_no_temp_file() {
    let temp = private_temp_dir();
    let limit = MIB;
    let exact = varied_bytes(limit as usize);
    let one_over = varied_bytes(limit as usize + 1);
    let host = ArtifactHost::start(vec![
        ("/exact", Reply::Chunked(exact.clone())),
        ("/one-over", Reply::Chunked(one_over)),
        ("/endless", Reply::Endless),
        (
            "/understated",
            Reply::Understated {
                announced: 1000,
                body: varied_bytes(8 * MIB as usize),
            },
        ),
    ])
    .await;
    let mut fetch = fetch_settings(&[&host]);
    fetch.max_summary_bytes = limit;
    let fetcher = fetcher(&fetch);

    // Exactly at the limit is fine, and the copy lives in the temp dir while held.
    let local = fetch_artifact(&fetcher, &host.url("/exact"), limit)
        .await
        .unwrap();
    assert_eq!(local.size, limit);
    assert_eq!(temp_files(temp), std::slice::from_ref(&local.path));
    drop(local);
    assert_eq!(temp_files(temp), Vec::<PathBuf>::new());

    let err = fetch_artifact(&fetcher, &host.url("/one-over"), limit)
        .await
        .unwrap_err();
    assert_too_large(&err, limit);
    assert_eq!(temp_files(temp), Vec::<PathBuf>::new());

    // A body without end: the fetcher stops at the limit and hangs up.
    let err = fetch_artifact(&fetcher, &host.url("/endless"), limit)
        .await
        .unwrap_err();
    assert_too_large(&err, limit);
    assert!(!err.fault().is_retryable());
    assert_eq!(temp_files(temp), Vec::<PathBuf>::new());
    host.client_hung_up().await;
    let streamed = host.state.streamed.load(Ordering::Relaxed);
    assert!(streamed >= limit, "only {streamed} bytes were streamed");

    let err = fetch_summary(&fetcher, &host.url("/endless"))
        .await
        .unwrap_err();
    assert_too_large(&err, limit);
    assert_eq!(temp_files(temp), Vec::<PathBuf>::new());

    // Bytes beyond the announced length are never read.
    let local = fetch_artifact(&fetcher, &host.url("/understated"), limit)
        .await
        .unwrap();
    assert_eq!(local.size, 1000);
    assert_eq!(std::fs::metadata(&local.path).unwrap().len(), 1000);
}

#[tokio::test]
async fn a_host_outside_the_allow_list_is_refused_without_a_request() {
    let allowed = ArtifactHost::start(vec![("/s.json", Reply::Body(b"{}".to_vec()))]).await;
    let other = ArtifactHost::start(vec![("/s.json", Reply::Body(b"{}".to_vec()))]).await;
    let fetch = fetch_settings(&[&allowed]);
    let fetcher = fetcher(&fetch);

    for uri in [
        other.url("/s.json"),
        format!("http://localhost:{}/s.json", allowed.addr.port()),
        "https://artifacts.example.com/s.json".to_string(),
    ] {
        let err = fetch_summary(&fetcher, &uri).await.unwrap_err();
        assert!(
            matches!(&err, FetchError::Refused { uri: u, reason } if *u == uri && reason.contains("allowed_hosts")),
            "{err:?}"
        );
        assert!(!err.fault().is_retryable());
    }
    assert_eq!(other.requests(), Vec::<String>::new());
    assert_eq!(allowed.requests(), Vec::<String>::new());
    assert_eq!(
        fetch_summary(&fetcher, &allowed.url("/s.json"))
            .await
            .unwrap(),
        b"{}"
    );
}

#[tokio::test]
async fn a_redirect_is_a_permanent_status_and_is_not_followed() {
    let other = ArtifactHost::start(vec![("/summary.json", Reply::Body(fixture_summary()))]).await;
    let host = ArtifactHost::start(vec![(
        "/runs/1/summary.json",
        Reply::Redirect(other.url("/summary.json")),
    )])
    .await;
    // Even with the other host allowed, the fetcher goes only where the message points.
    for allowed in [vec![&host], vec![&host, &other]] {
        let fetcher = fetcher(&fetch_settings(&allowed));
        let err = fetch_summary(&fetcher, &host.url("/runs/1/summary.json"))
            .await
            .unwrap_err();
        assert!(
            matches!(err, FetchError::Status { status: 302, .. }),
            "{err:?}"
        );
        assert!(!err.fault().is_retryable());
    }
    assert_eq!(host.requests().len(), 2);
    assert_eq!(other.requests(), Vec::<String>::new());
}

#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn a_run_whose_artifacts_are_served_over_http_is_ingested(pool: PgPool) {
    let dir = fixture_dir("v1.1.0", "json-logs");
    let logs = std::fs::read(dir.join("k6.log")).unwrap();
    assert!(!logs.is_empty());
    let host = ArtifactHost::start(vec![
        ("/runs/1/summary.json", Reply::Body(fixture_summary())),
        ("/runs/1/k6.log", Reply::Chunked(logs.clone())),
    ])
    .await;
    let mut s = settings();
    s.fetch.allowed_hosts.push(host.host());
    let env = TestEnv::with_settings(&pool, s).await;
    let ing = &env.ing;
    let mut msg = message(&dir);
    msg.artifacts.summary = Some(host.url("/runs/1/summary.json"));
    msg.artifacts.logs = Some(host.url("/runs/1/k6.log"));

    let report = ing.ingest_one(&msg, &ctx(&dir)).await.unwrap();
    assert_eq!(report.outcome, Outcome::Ingested);
    let (status, source, inline): (String, Option<String>, Option<serde_json::Value>) = row_of(
        &pool,
        "SELECT r.status, r.artifact_paths->'summary'->>'source', p.summary_json \
             FROM runs r JOIN k6_performance_runs p ON p.run_id = r.id WHERE r.id = $1",
        msg.run_id,
    )
    .await;
    assert_eq!(status, "passed");
    assert_eq!(source, msg.artifacts.summary);
    let expected: serde_json::Value = serde_json::from_slice(&fixture_summary()).unwrap();
    assert_eq!(inline, Some(expected));
    let store = &env.store;
    let key = run_key(store, &msg, "k6.log");
    assert_eq!(get_object(store, &key).await, logs);

    // A redelivery is recognised before anything is fetched again.
    let requests = host.requests().len();
    let again = ing.ingest_one(&msg, &ctx(&dir)).await.unwrap();
    assert_eq!(again.outcome, Outcome::AlreadyPresent);
    assert_eq!(host.requests().len(), requests);
}

#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn an_unavailable_artifact_host_is_retried_and_writes_nothing(pool: PgPool) {
    let dir = fixture_dir("v1.1.0", "json-logs");
    let host = ArtifactHost::start(vec![
        ("/down/summary.json", Reply::Status(503)),
        ("/up/summary.json", Reply::Body(fixture_summary())),
        ("/down/k6.log", Reply::Status(503)),
    ])
    .await;
    let mut s = settings();
    s.fetch.allowed_hosts.push(host.host());
    let env = TestEnv::with_settings(&pool, s).await;
    let ing = &env.ing;
    let store = &env.store;
    let mut msg = message(&dir);

    // The summary's host is down; then the summary arrives, but the logs' host is down:
    // nothing is stored either time.
    for (artifact, summary, logs) in [
        (ArtifactRole::Summary, "/down/summary.json", None),
        (ArtifactRole::Logs, "/up/summary.json", Some("/down/k6.log")),
    ] {
        msg.artifacts.summary = Some(host.url(summary));
        if let Some(logs) = logs {
            msg.artifacts.logs = Some(host.url(logs));
        }
        let err = ing.ingest_one(&msg, &ctx(&dir)).await.unwrap_err();
        assert!(
            matches!(
                &err,
                IngestError::Fetch {
                    artifact: a,
                    source: FetchError::Status { status: 503, .. },
                    ..
                } if *a == artifact
            ),
            "{err:?}"
        );
        assert_eq!(err.disposition(), Disposition::Retry, "{err}");
        assert_no_rows(&pool, "although the run will be retried").await;
        assert_eq!(
            all_keys(store).await,
            Vec::<String>::new(),
            "artifacts uploaded"
        );
    }
}

#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn a_summary_the_host_does_not_have_is_an_error_run_and_dead_lettered(pool: PgPool) {
    let dir = fixture_dir("v1.1.0", "json-logs");
    let host = ArtifactHost::start(vec![]).await;
    let mut s = settings();
    s.fetch.allowed_hosts.push(host.host());
    let env = TestEnv::with_settings(&pool, s).await;
    let ing = &env.ing;
    let mut msg = message(&dir);
    let uri = host.url("/runs/1/summary.json");
    msg.artifacts.summary = Some(uri.clone());

    let err = ing.ingest_one(&msg, &ctx(&dir)).await.unwrap_err();
    assert!(
        matches!(&err, IngestError::SummaryUnusable { reason, .. } if reason.contains("not found")),
        "{err:?}"
    );
    assert_eq!(err.disposition(), Disposition::DeadLetter, "{err}");
    let (status, details): (String, String) = run_status(&pool, msg.run_id).await;
    assert_eq!(status, "error");
    assert!(
        details.contains(&uri) && details.contains("not found") && details.contains("exit code 0"),
        "{details}"
    );
    let perf_status: String = value_of(
        &pool,
        "SELECT status FROM k6_performance_runs WHERE run_id = $1",
        msg.run_id,
    )
    .await;
    assert_eq!(perf_status, "error");
    assert_eq!(host.requests(), ["/runs/1/summary.json"]);
}

/// What a runner may put in a URI that must never be shown: basic-auth userinfo and
/// presigned query values.
const SECRETS: [&str; 4] = ["hunter2", "tok-123", "sig-456", "cred-789"];

fn assert_no_secret(what: &str, text: &str) {
    for secret in SECRETS {
        assert!(!text.contains(secret), "{what} shows {secret:?}: {text}");
    }
}

#[tokio::test]
async fn credentials_in_a_source_uri_are_used_for_the_fetch_but_never_shown() {
    let host = ArtifactHost::start(vec![(
        "/runs/1/summary.json",
        Reply::Body(fixture_summary()),
    )])
    .await;
    // A port where nothing listens, allow-listed: a transport error.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let mut fetch = fetch_settings(&[&host]);
    fetch.allowed_hosts.push(closed.to_string());
    let fetcher = fetcher(&fetch);

    let ok = format!(
        "http://runner:hunter2@{}/runs/1/summary.json?token=tok-123",
        host.addr
    );
    assert_eq!(
        fetch_summary(&fetcher, &ok).await.unwrap(),
        fixture_summary()
    );
    // Sent as basic auth (base64 of runner:hunter2), not in the request line.
    assert_eq!(
        host.authorizations(),
        [Some("Basic cnVubmVyOmh1bnRlcjI=".to_string())]
    );
    assert_eq!(host.requests(), ["/runs/1/summary.json?token=tok-123"]);

    let presigned = "?X-Amz-Credential=cred-789&X-Amz-Signature=sig-456";
    let missing = format!(
        "http://runner:hunter2@{}/runs/1/k6.log{presigned}",
        host.addr
    );
    let unreachable = format!("http://runner:hunter2@{closed}/runs/1/k6.log{presigned}");
    let refused = format!("http://runner:hunter2@elsewhere.example/k6.log{presigned}");
    let shown = |addr: &str| {
        format!("http://{addr}/runs/1/k6.log?X-Amz-Credential=REDACTED&X-Amz-Signature=REDACTED")
    };
    let cases = [
        (missing, Some(shown(&host.host()))),
        (unreachable, Some(shown(&closed.to_string()))),
        (refused, None),
    ];
    for (uri, expected_shown) in cases {
        for err in [
            fetch_artifact(&fetcher, &uri, MIB).await.unwrap_err(),
            fetch_summary(&fetcher, &uri).await.unwrap_err(),
        ] {
            assert_no_secret("the error", &format!("{err} {err:?}"));
            if let Some(expected) = &expected_shown {
                assert!(format!("{err}").contains(expected.as_str()), "{err}");
            }
        }
    }
}

/// Every row of every table the migrations create, as text.
async fn all_rows(pool: &PgPool) -> String {
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables \
         WHERE table_schema = 'public' AND table_type = 'BASE TABLE' ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let mut out = String::new();
    for table in tables {
        let rows: Option<String> = sqlx::query_scalar(&format!(
            "SELECT string_agg(t::text, E'\\n') FROM \"{table}\" t"
        ))
        .fetch_one(pool)
        .await
        .unwrap();
        out.push_str(&rows.unwrap_or_default());
    }
    out
}

#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn a_source_with_credentials_is_stored_and_reported_without_them(pool: PgPool) {
    let dir = fixture_dir("v1.1.0", "json-logs");
    let logs = std::fs::read(dir.join("k6.log")).unwrap();
    let host = ArtifactHost::start(vec![
        ("/runs/1/summary.json", Reply::Body(fixture_summary())),
        ("/runs/1/k6.log", Reply::Body(logs.clone())),
    ])
    .await;
    let mut s = settings();
    s.fetch.allowed_hosts.push(host.host());
    let env = TestEnv::with_settings(&pool, s).await;
    let ing = &env.ing;
    let with_secrets = |path: &str, query: &str| {
        Some(format!("http://runner:hunter2@{}{path}?{query}", host.addr))
    };

    let mut msg = message(&dir);
    msg.artifacts.summary = with_secrets("/runs/1/summary.json", "token=tok-123");
    msg.artifacts.logs = with_secrets("/runs/1/k6.log", "X-Amz-Signature=sig-456");
    // Not on the host: a warning on the stored run.
    msg.artifacts.metrics = with_secrets("/runs/1/metrics.ndjson", "X-Amz-Credential=cred-789");
    let report = ing.ingest_one(&msg, &ctx(&dir)).await.unwrap();
    assert_eq!(report.outcome, Outcome::Ingested);
    assert!(
        report
            .warnings
            .iter()
            .any(|w| w.contains("metrics") && w.contains("X-Amz-Credential=REDACTED")),
        "{:?}",
        report.warnings
    );
    assert_no_secret("the warnings", &report.warnings.join(" "));
    let paths: serde_json::Value = value_of(
        &pool,
        "SELECT artifact_paths FROM runs WHERE id = $1",
        msg.run_id,
    )
    .await;
    assert_eq!(
        paths["summary"]["source"],
        format!("http://{}/runs/1/summary.json?token=REDACTED", host.addr)
    );
    assert_eq!(
        paths["logs"]["source"],
        format!(
            "http://{}/runs/1/k6.log?X-Amz-Signature=REDACTED",
            host.addr
        )
    );
    let store = &env.store;
    let key = run_key(store, &msg, "k6.log");
    assert_eq!(
        get_object(store, &key).await,
        logs,
        "fetched with the credentials"
    );

    // A summary the host does not have: the run is an error, the reason shown redacted.
    let mut lost = message(&dir);
    lost.run_id = uuid::Uuid::new_v4();
    lost.artifacts.summary = with_secrets("/runs/2/summary.json", "token=tok-123");
    lost.artifacts.logs = None;
    lost.artifacts.metrics = None;
    let err = ing.ingest_one(&lost, &ctx(&dir)).await.unwrap_err();
    assert!(
        matches!(err, IngestError::SummaryUnusable { .. }),
        "{err:?}"
    );
    assert_no_secret("the ingest error", &format!("{err} {err:?}"));
    let details: String = value_of(
        &pool,
        "SELECT error_details FROM runs WHERE id = $1",
        lost.run_id,
    )
    .await;
    assert!(
        details.contains(&format!(
            "http://{}/runs/2/summary.json?token=REDACTED",
            host.addr
        )) && details.contains("not found"),
        "{details}"
    );

    let rows = all_rows(&pool).await;
    assert!(rows.contains(&msg.run_id.to_string()) && rows.contains(&lost.run_id.to_string()));
    assert_no_secret("the database", &rows);
}
