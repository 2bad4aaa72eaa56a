//! A split run's parts through RabbitMQ and the worker (`consumer::start`), in a shuffled
//! order with a duplicate, store exactly the rows `replay` of the parts' directory stores.

mod harness;

use std::path::{Path, PathBuf};
use std::time::Duration;

use harness::*;
use k6_ingest::ingest::Ingestor;
use serde_json::Value;
use sqlx::PgPool;

fn case_dir() -> PathBuf {
    split_fixtures().join("v2.2.0/split4-merged-fail")
}

fn part_dirs() -> Vec<PathBuf> {
    (0..4)
        .map(|i| case_dir().join(format!("part-{i}")))
        .collect()
}

/// A part's message with its artifacts as `file://` URIs, as `publish` sends it.
fn body(dir: &Path) -> Vec<u8> {
    let mut m: Value =
        serde_json::from_slice(&std::fs::read(dir.join("message.json")).unwrap()).unwrap();
    for (_, v) in m["artifacts"].as_object_mut().unwrap() {
        let rel = v.as_str().unwrap().to_string();
        *v = Value::String(format!("file://{}", dir.join(rel).display()));
    }
    serde_json::to_vec(&m).unwrap()
}

async fn split_ingestor(pool: &PgPool, s: &k6_ingest::config::Settings) -> Ingestor {
    ingestor_with_roots(pool, s, vec![case_dir()]).await
}

/// Everything the merged run wrote, without ids and write times, in a stable order.
async fn merged_rows(pool: &PgPool, run: uuid::Uuid) -> Vec<String> {
    let queries = [
        "SELECT to_jsonb(p) - 'id' - 'created_at' - 'summary_json' FROM k6_performance_runs p WHERE run_id = $1",
        "SELECT jsonb_build_object('status', status, 'error_details', error_details, 'duration_ms', duration_ms, \
             'started_at', started_at, 'completed_at', completed_at) FROM runs WHERE id = $1",
        "SELECT to_jsonb(h) - 'id' - 'k6_run_id' FROM k6_metrics_history h JOIN k6_performance_runs p ON p.id = h.k6_run_id \
             WHERE p.run_id = $1 ORDER BY h.metric_name",
        "SELECT to_jsonb(t) - 'id' - 'k6_run_id' FROM k6_threshold_results t JOIN k6_performance_runs p ON p.id = t.k6_run_id \
             WHERE p.run_id = $1 ORDER BY t.metric_name, t.expression",
        "SELECT to_jsonb(c) - 'id' - 'k6_run_id' FROM k6_check_results c JOIN k6_performance_runs p ON p.id = c.k6_run_id \
             WHERE p.run_id = $1 ORDER BY c.path",
        "SELECT jsonb_build_object('part', part_index, 'count', part_count, 'runner', runner, 'status', status, \
             'exit_code', exit_code, 'columns', columns) FROM k6_run_parts WHERE run_id = $1 ORDER BY part_index",
    ];
    let mut out = Vec::new();
    for q in queries {
        let rows: Vec<Value> = values_of(pool, q, run).await;
        out.extend(rows.into_iter().map(|v| v.to_string()));
    }
    out
}

#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn parts_through_the_queue_store_what_replay_stores(pool: PgPool) {
    let mut s = queue_settings(&tag());
    s.fetch.allowed_roots = vec![case_dir()];
    let dirs = part_dirs();
    let run = message(&dirs[0]).run_id;

    // --- through the queue: shuffled, part 1 twice ---
    let bodies: Vec<Vec<u8>> = [3, 1, 0, 1, 2].iter().map(|i| body(&dirs[*i])).collect();
    publish_bodies(&s, &bodies).await;
    let worker = Consumer::start(&s, split_ingestor(&pool, &s).await).await;
    let conn = connect().await;
    let queue = k6_ingest::amqp::Topology::new(&s.amqp).queue;
    wait_for("the merged run and an empty queue", || {
        let (pool, conn, queue) = (pool.clone(), &conn, queue.clone());
        async move {
            let merged: Option<Option<String>> = sqlx::query_scalar(
                "SELECT value_sources ->> 'merged_parts' FROM k6_performance_runs WHERE run_id = $1",
            )
            .bind(run)
            .fetch_optional(&pool)
            .await
            .unwrap();
            (merged.flatten().as_deref() == Some("4 of 4") && queue_len(conn, &queue).await == 0).then_some(())
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    worker.stop().await;
    let via_queue = merged_rows(&pool, run).await;
    assert!(via_queue.len() > 20, "{via_queue:?}");

    // --- replay of the directory, into a clean slate ---
    sqlx::query("DELETE FROM runs WHERE id = $1")
        .bind(run)
        .execute(&pool)
        .await
        .unwrap();
    assert!(merged_rows(&pool, run).await.is_empty());
    let ing = split_ingestor(&pool, &s).await;
    let rows = k6_ingest::replay::replay(&ing, &[case_dir()], false, 4, 1 << 20)
        .await
        .unwrap();
    assert!(
        rows.iter().all(|r| r.result.is_ok()),
        "{}",
        k6_ingest::replay::render_table(&rows)
    );
    let via_replay = merged_rows(&pool, run).await;
    assert_eq!(via_queue.len(), via_replay.len());
    for (q, r) in via_queue.iter().zip(&via_replay) {
        assert_eq!(q, r);
    }
}
