//! A 1 GiB log goes to S3 with flat memory: the real binary replays a run whose log is
//! 1 GiB and one whose log is 1 MiB, and the kernel's peak-RSS figures of the two
//! processes are compared. Memory, not time, is asserted.

mod harness;

use std::io::Write;
use std::path::Path;
use std::process::Command;

use harness::*;
use sqlx::PgPool;

const MIB: u64 = 1024 * 1024;

fn write_log(path: &Path, bytes: u64) {
    let mut f =
        std::io::BufWriter::with_capacity(MIB as usize, std::fs::File::create(path).unwrap());
    let line = b"time=\"2026-11-22T01:31:09Z\" level=info msg=\"request done status=200 duration=12.3ms\" source=console\n";
    let mut written = 0;
    while written < bytes {
        f.write_all(line).unwrap();
        written += line.len() as u64;
    }
    f.flush().unwrap();
}

/// Replays `dir` with the real binary and returns (exit status, peak RSS in KiB).
fn replay_peak_rss(dir: &Path, db_url: &str, bucket: &str) -> (i32, i64) {
    let child = Command::new(env!("CARGO_BIN_EXE_k6-ingest"))
        .args(["replay", dir.to_str().unwrap(), "--concurrency", "1"])
        .env("K6_INGEST__DATABASE__URL", db_url)
        .env("K6_INGEST__S3__BUCKET", bucket)
        .env("K6_INGEST__S3__PREFIX", "")
        .env("K6_INGEST__LOG__LEVEL", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value; wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: pid is our child, not yet reaped; pointers are to live locals.
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(rc, pid, "wait4 failed: {}", std::io::Error::last_os_error());
    std::mem::forget(child); // already reaped
    (libc::WEXITSTATUS(status), usage.ru_maxrss)
}

fn run_dir(log_bytes: u64) -> tempfile::TempDir {
    let dir = copy_fixture("v1.1.0", "thresholds-pass");
    write_log(&dir.path().join("k6.log"), log_bytes);
    let path = dir.path().join("message.json");
    let mut msg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    msg["run_id"] = uuid::Uuid::now_v7().to_string().into();
    msg["event_id"] = uuid::Uuid::now_v7().to_string().into();
    std::fs::write(&path, msg.to_string()).unwrap();
    dir
}

#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn a_1_gib_log_is_streamed_with_flat_memory(pool: PgPool) {
    let s = settings();
    let store = store(&s).await;
    let db: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&pool)
        .await
        .unwrap();
    let base = std::env::var("DATABASE_URL").unwrap();
    let db_url = format!("{}/{db}", base.rsplit_once('/').unwrap().0);

    let small = run_dir(MIB);
    let (code, small_kib) = replay_peak_rss(small.path(), &db_url, store.bucket());
    assert_eq!(code, 0);
    drop(small);

    let big = run_dir(1024 * MIB);
    let (code, big_kib) = replay_peak_rss(big.path(), &db_url, store.bucket());
    assert_eq!(code, 0, "replay of the 1 GiB run failed");
    drop(big);

    // The object is all there.
    let stored: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT id::text, logs_s3_url FROM runs")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(stored.len(), 2);
    let mut sizes = Vec::new();
    for (_, url) in &stored {
        let key = url
            .as_deref()
            .unwrap()
            .strip_prefix(&format!("s3://{}/", store.bucket()))
            .unwrap()
            .to_string();
        let head = store
            .client()
            .head_object()
            .bucket(store.bucket())
            .key(&key)
            .send()
            .await
            .unwrap();
        sizes.push(head.content_length().unwrap() as u64);
        store
            .client()
            .delete_object()
            .bucket(store.bucket())
            .key(&key)
            .send()
            .await
            .unwrap();
    }
    sizes.sort();
    assert!(sizes[0] >= MIB && sizes[0] < MIB + 200, "{sizes:?}");
    assert!(
        sizes[1] >= 1024 * MIB && sizes[1] < 1024 * MIB + 200,
        "{sizes:?}"
    );

    let ratio = big_kib as f64 / small_kib as f64;
    eprintln!("peak RSS: 1 MiB log {small_kib} KiB, 1 GiB log {big_kib} KiB, ratio {ratio:.2}");
    // 1024× the data may cost at most 64 MiB more peak memory (parts stream from disk).
    assert!(
        big_kib - small_kib < 64 * 1024,
        "peak RSS grew from {small_kib} KiB to {big_kib} KiB"
    );
}
