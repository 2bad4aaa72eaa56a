//! A 1 GiB log goes to S3 with flat memory: the real binary replays a run whose log is
//! 1 GiB and one whose log is 1 MiB, and the kernel's peak-RSS figures of the two
//! processes are compared. Memory, not time, is asserted.

mod harness;

use std::io::Write;
use std::path::Path;

use harness::*;
use sqlx::PgPool;

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

fn run_dir(log_bytes: u64) -> tempfile::TempDir {
    let (dir, _) = fresh_run_dir("v1.1.0", "thresholds-pass");
    write_log(&dir.path().join("k6.log"), log_bytes);
    dir
}

#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn a_1_gib_log_is_streamed_with_flat_memory(pool: PgPool) {
    let s = settings();
    let store = store(&s).await;
    let db_url = database_url(&pool);

    let small = run_dir(MIB);
    let (code, small_kib) = exit_and_peak_rss(&mut replay_command(small.path(), &db_url, &s));
    assert_eq!(code, 0);
    drop(small);

    let big = run_dir(1024 * MIB);
    let (code, big_kib) = exit_and_peak_rss(&mut replay_command(big.path(), &db_url, &s));
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
        sizes.push(object_size(&store, &key).await as u64);
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
    for (size, written) in sizes.iter().zip([MIB, 1024 * MIB]) {
        assert!(*size >= written && *size < written + 200, "{sizes:?}");
    }

    let ratio = big_kib as f64 / small_kib as f64;
    eprintln!("peak RSS: 1 MiB log {small_kib} KiB, 1 GiB log {big_kib} KiB, ratio {ratio:.2}");
    // 1024× the data may cost at most 64 MiB more peak memory (parts stream from disk).
    assert!(
        big_kib - small_kib < 64 * 1024,
        "peak RSS grew from {small_kib} KiB to {big_kib} KiB"
    );
}
