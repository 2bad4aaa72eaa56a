//! The runner side: `k6-ingest submit` stages a run's files in S3 and publishes its
//! message with confirms; a worker then ingests it from the staged copies.

mod harness;

use std::process::Command;

use harness::*;
use k6_ingest::amqp::Topology;
use k6_ingest::ingest::{IngestContext, Outcome};
use k6_ingest::message::RunCompleted;
use sqlx::PgPool;

fn submit_command(
    s: &k6_ingest::config::Settings,
    dir: &std::path::Path,
    extra: &[&str],
) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_k6-ingest"));
    c.current_dir(dir)
        .arg("submit")
        .args(["--logs", "k6.log", "--metrics", "metrics.ndjson.gz"])
        .args(extra)
        .env("K6_INGEST_RUN_ID", uuid::Uuid::now_v7().to_string())
        .env("K6_INGEST_TEST_ID", uuid::Uuid::now_v7().to_string())
        .env(
            "K6_INGEST_ORGANIZATION_ID",
            "0190f7d2-0000-7000-8000-000000000001",
        )
        .env(
            "K6_INGEST_PROJECT_ID",
            "0190f7d2-0000-7000-8000-000000000002",
        )
        .env("K6_INGEST_TRIGGER", "ci_cd")
        .env("K6_INGEST_K6_VERSION", "1.1.0")
        .env("K6_INGEST_EXIT_CODE", "99")
        .env("K6_INGEST__AMQP__URL", amqp_url())
        .env("K6_INGEST__AMQP__EXCHANGE", &s.amqp.exchange)
        .env("K6_INGEST__AMQP__QUEUE", &s.amqp.queue)
        .env("K6_INGEST__S3__BUCKET", s.s3.bucket.as_deref().unwrap())
        .env("K6_INGEST__S3__STAGING_PREFIX", &s.s3.staging_prefix)
        .env("K6_INGEST__LOG__LEVEL", "warn");
    c
}

#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn submit_stages_artifacts_and_publishes_a_message_the_worker_ingests(pool: PgPool) {
    let mut s = queue_settings(&tag());
    // Short keys for the test server; the worker reads staged files only from the
    // staging prefix it is configured with, so runner and worker share the setting.
    s.s3.staging_prefix = "s".into();
    let store = store(&s).await;
    declare(&s).await;
    let dir = fixtures().join("v1.1.0").join("thresholds-fail");

    let out = submit_command(&s, &dir, &["--metadata", "{\"ci\":\"pipeline 42\"}"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("3 artifact(s) staged") && stdout.contains("confirmed"),
        "{stdout}"
    );

    let conn = connect().await;
    let topo = Topology::new(&s.amqp);
    let published = drain(&conn, &topo.queue).await;
    assert_eq!(published.len(), 1);
    let msg = RunCompleted::decode(&published[0].0).unwrap();
    assert_eq!(msg.exit_code, Some(99));
    assert_eq!(msg.metadata.as_ref().unwrap()["ci"], "pipeline 42");
    // The start is dated from k6's own run duration.
    assert!(msg.wall_duration_ms().unwrap() > 1000, "{msg:?}");
    let summary_uri = msg.artifacts.summary.clone().unwrap();
    let staged_key = summary_uri
        .strip_prefix(&format!("s3://{}/", store.bucket()))
        .unwrap();
    assert!(staged_key.starts_with(&format!(
        "s/{}/{}/{}/",
        msg.organization_id, msg.project_id, msg.run_id
    )));
    assert_eq!(
        get_object(&store, staged_key).await,
        std::fs::read(dir.join("summary.json")).unwrap()
    );

    // The worker side: ingested from the staged copies.
    let ing = ingestor(&pool, &s).await;
    let report = ing
        .ingest_one(&msg, &IngestContext::default())
        .await
        .unwrap();
    assert_eq!(report.outcome, Outcome::Ingested);
    assert_eq!(report.line.status.as_deref(), Some("failed"));
    let (trigger, logs): (Option<String>, Option<String>) = row_of(
        &pool,
        "SELECT trigger, logs_s3_url FROM runs WHERE id = $1",
        msg.run_id,
    )
    .await;
    assert_eq!(trigger.as_deref(), Some("ci_cd"));
    assert!(logs.is_some());
    cleanup(&s).await;
}

#[tokio::test]
async fn submit_without_a_summary_still_reports_the_run_and_a_lost_broker_is_an_error() {
    let s = queue_settings(&tag());
    store(&s).await;
    declare(&s).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("k6.log"),
        b"level=error msg=\"script exception\"\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("metrics.ndjson.gz"), b"").unwrap();
    let out = submit_command(&s, dir.path(), &["--exit-code", "107"])
        .output()
        .unwrap();
    assert_success(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("not staged: summary"));
    let conn = connect().await;
    let published = drain(&conn, &Topology::new(&s.amqp).queue).await;
    let msg = RunCompleted::decode(&published[0].0).unwrap();
    assert_eq!(msg.artifacts.summary, None);
    assert_eq!(msg.exit_code, Some(107));

    // Nowhere to publish: an error and a non-zero exit, never a silent success.
    let out = submit_command(&s, dir.path(), &[])
        .env("K6_INGEST__AMQP__URL", "amqp://guest:guest@127.0.0.1:1/%2f")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("RabbitMQ"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    cleanup(&s).await;
}

/// A split run the way k6-operator runs it: four runners, each calling `submit` with its
/// own `--execution-segment` (and the sequence) and the run's one id; the worker merges
/// the four staged parts into one run.
#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn submit_with_execution_segments_gives_parts_the_worker_merges(pool: PgPool) {
    let mut s = queue_settings(&tag());
    s.s3.staging_prefix = "s".into();
    store(&s).await;
    declare(&s).await;
    let case = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/k6-split/v1.1.0/split4-merged-fail");
    let run_id = uuid::Uuid::now_v7();
    let test_id = uuid::Uuid::now_v7();
    let bounds = ["0", "1/4", "2/4", "3/4", "1"];
    for i in 0..4 {
        let dir = case.join(format!("part-{i}"));
        let code = std::fs::read_to_string(dir.join("exit_code")).unwrap();
        let segment = format!("{}:{}", bounds[i], bounds[i + 1]);
        let out = submit_command(
            &s,
            &dir,
            &[
                "--execution-segment",
                &segment,
                "--execution-segment-sequence",
                "0,1/4,2/4,3/4,1",
                "--runner",
                &format!("k6-sample-{}", i + 1),
            ],
        )
        .env("K6_INGEST_RUN_ID", run_id.to_string())
        .env("K6_INGEST_TEST_ID", test_id.to_string())
        .env("K6_INGEST_EXIT_CODE", code.trim())
        .output()
        .unwrap();
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let conn = connect().await;
    let topo = Topology::new(&s.amqp);
    let published = drain(&conn, &topo.queue).await;
    assert_eq!(published.len(), 4);
    let ing = ingestor(&pool, &s).await;
    let mut indexes = Vec::new();
    for (body, _) in published.iter().rev() {
        let msg = RunCompleted::decode(body).unwrap();
        assert_eq!(msg.run_id, run_id);
        let part = msg.part.clone().expect("a part");
        assert_eq!(part.count, 4);
        assert_eq!(
            part.runner.as_deref(),
            Some(format!("k6-sample-{}", part.index + 1).as_str())
        );
        // each part's files under names of its own
        assert!(
            msg.artifacts
                .summary
                .as_deref()
                .unwrap()
                .ends_with(&format!("/part-{}-summary.json", part.index)),
            "{:?}",
            msg.artifacts
        );
        indexes.push(part.index);
        ing.ingest_one(&msg, &IngestContext::default())
            .await
            .unwrap();
    }
    indexes.sort_unstable();
    assert_eq!(indexes, [0, 1, 2, 3]);
    let (status, iterations, merged): (String, Option<i64>, Option<String>) = row_of(&pool, "SELECT status, iterations_total, value_sources ->> 'merged_parts' FROM k6_performance_runs WHERE run_id = $1", run_id).await;
    // every runner passed `iterations count<25` on its 10; the merged 40 fail it
    assert_eq!(
        (status.as_str(), iterations, merged.as_deref()),
        ("failed", Some(40), Some("4 of 4"))
    );
    cleanup(&s).await;
}
