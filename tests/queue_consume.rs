//! The consumer against real RabbitMQ, PostgreSQL and S3: ingestion and idempotence,
//! dead letters, the delivery limit, outages that pause instead of spending attempts,
//! faults of the message that are retried, concurrency.

mod harness;

use std::sync::atomic::Ordering;

use harness::*;
use k6_ingest::amqp::{self, ATTEMPTS_HEADER, REASON_CLASS_HEADER, REASON_HEADER, Topology};
use k6_ingest::config::Settings;
use lapin::options::{BasicConsumeOptions, BasicNackOptions};
use lapin::types::FieldTable;
use serde_json::Value;
use sqlx::PgPool;

#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn consume_stores_each_run_once_and_absorbs_duplicate_publishes(pool: PgPool) {
    let env = TestEnv::queued(&pool).await;
    let s = &env.s;
    let worker = Consumer::start(s, env.ing).await;
    let addr = worker.addr();
    wait_readyz(addr, 200).await;
    assert_eq!(
        reqwest::get(format!("http://{addr}/livez"))
            .await
            .unwrap()
            .status(),
        200
    );

    let msgs = messages(12);
    let mut all = bodies(&msgs);
    // The same runs published a second time (a runner retrying its publish).
    all.extend(bodies(&msgs[..3]));
    publish_bodies(s, &all).await;

    let ids = run_ids(&msgs);
    wait_stored_count(&pool, &ids, 12, "all runs stored").await;
    wait_for("every delivery settled", || async {
        let m = worker.running.metrics.snapshot();
        (m.received == 15 && m.in_flight == 0).then_some(())
    })
    .await;
    assert_each_stored_once(&pool, &msgs).await;
    let m = worker.running.metrics.snapshot();
    assert_eq!(
        (m.ingested, m.duplicates),
        (12, 3),
        "12 runs written, 3 duplicates acknowledged without writing"
    );

    let conn = connect().await;
    let topo = Topology::new(&s.amqp);
    assert_eq!(
        queue_len(&conn, &topo.queue).await,
        0,
        "everything acknowledged"
    );
    assert_eq!(
        queue_len(&conn, &topo.dead_letter_queue).await,
        0,
        "nothing dead-lettered"
    );
    let store = &env.store;
    let keys = s3_keys(store, msgs[0]["run_id"].as_str().unwrap()).await;
    assert!(
        keys.iter().any(|k| k.ends_with("k6.log")),
        "artifacts uploaded: {keys:?}"
    );

    // The metrics endpoint shows the same numbers, with the names the README lists.
    for (sample, value) in [
        ("k6_ingest_messages_received_total", 15.0),
        ("k6_ingest_messages_ingested_total", 12.0),
        ("k6_ingest_messages_duplicate_total", 3.0),
        ("k6_ingest_ingest_duration_seconds_count", 15.0),
        ("k6_ingest_amqp_connected", 1.0),
        ("k6_ingest_in_flight_messages", 0.0),
    ] {
        assert_eq!(scrape(addr, sample).await, value, "{sample}");
    }
    assert!(scrape(addr, "k6_ingest_artifact_uploaded_bytes_total").await > 0.0);

    worker.stop().await;
    assert!(
        readyz(addr).await.is_none(),
        "the HTTP server stops after the drain"
    );
}

#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn poison_messages_are_dead_lettered_with_reason_and_body_and_the_worker_goes_on(
    pool: PgPool,
) {
    let mut s = queue_settings(&tag());
    s.amqp.max_message_bytes = 8192;
    // A run the application created for another organization: the message is refused.
    let foreign = case_message("thresholds-pass");
    sqlx::query(
        "INSERT INTO runs (id, organization_id, project_id, status) VALUES ($1, $2, $3, 'running')",
    )
    .bind(run_id_of(&foreign))
    .bind(uuid::Uuid::now_v7())
    .bind(uuid::Uuid::now_v7())
    .execute(&pool)
    .await
    .unwrap();
    let mut missing = case_message("thresholds-pass");
    missing.as_object_mut().unwrap().remove("organization_id");
    let mut future = case_message("thresholds-pass");
    future["schema_version"] = 2.into();
    let mut large = case_message("thresholds-pass");
    large["metadata"]["padding"] = Value::String("x".repeat(10_000));
    let good = case_message("thresholds-fail");

    let poison: Vec<(Vec<u8>, &str)> = vec![
        (b"this is not json {".to_vec(), "not_json"),
        (serde_json::to_vec(&missing).unwrap(), "invalid_message"),
        (serde_json::to_vec(&future).unwrap(), "unknown_version"),
        (serde_json::to_vec(&foreign).unwrap(), "tenant_mismatch"),
        (serde_json::to_vec(&large).unwrap(), "too_large"),
    ];
    declare(&s).await;
    let mut all: Vec<Vec<u8>> = poison.iter().map(|p| p.0.clone()).collect();
    all.push(serde_json::to_vec(&good).unwrap());
    publish_bodies(&s, &all).await;

    let worker = Consumer::start(&s, ingestor(&pool, &s).await).await;
    let good_id = run_ids(std::slice::from_ref(&good));
    wait_stored_count(&pool, &good_id, 1, "the good run after the poison ones").await;
    let conn = connect().await;
    let topo = Topology::new(&s.amqp);
    wait_queue_len(&conn, &topo.dead_letter_queue, 5, "five dead letters").await;

    let dead = drain(&conn, &topo.dead_letter_queue).await;
    for (body, expected_class) in &poison {
        let (_, props) = dead
            .iter()
            .find(|(b, _)| b == body)
            .unwrap_or_else(|| panic!("{expected_class}: original body kept"));
        assert_eq!(
            amqp::header_str(props, REASON_CLASS_HEADER).as_deref(),
            Some(*expected_class)
        );
        assert!(
            !amqp::header_str(props, REASON_HEADER)
                .unwrap_or_default()
                .is_empty(),
            "{expected_class}: a reason"
        );
        assert_eq!(
            amqp::header_u64(props, ATTEMPTS_HEADER),
            Some(1),
            "{expected_class}: never retried"
        );
        assert_eq!(
            worker.running.metrics.dead_lettered_count(expected_class),
            1
        );
    }
    assert_eq!(queue_len(&conn, &topo.queue).await, 0);
    let foreign_org: uuid::Uuid = value_of(
        &pool,
        "SELECT organization_id FROM runs WHERE id = $1",
        run_id_of(&foreign),
    )
    .await;
    assert_ne!(
        foreign_org.to_string(),
        foreign["organization_id"].as_str().unwrap(),
        "the foreign run is untouched"
    );
    worker.stop().await;
}

/// Deliveries handed back again and again (a worker crashing on a message) reach the
/// quorum queue's delivery limit; the broker then dead-letters the message, never drops it.
#[tokio::test]
async fn delivery_limit_dead_letters_instead_of_dropping() {
    let mut s = queue_settings(&tag());
    s.amqp.delivery_limit = 2;
    declare(&s).await;
    publish_bodies(&s, &[b"{\"crashes\": \"every worker\"}".to_vec()]).await;
    let conn = connect().await;
    let topo = Topology::new(&s.amqp);
    let ch = conn.create_channel().await.unwrap();
    let mut deliveries = ch
        .basic_consume(
            topo.queue.as_str().into(),
            "crashy".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    use futures_util::StreamExt;
    let mut handed_back = 0;
    loop {
        tokio::select! {
            d = deliveries.next() => {
                let d = d.unwrap().unwrap();
                d.acker.nack(BasicNackOptions { requeue: true, ..BasicNackOptions::default() }).await.unwrap();
                handed_back += 1;
            }
            () = wait_for("the dead letter", || async { (queue_len(&conn, &topo.dead_letter_queue).await == 1).then_some(()) }) => break,
        }
    }
    assert!(
        handed_back >= 2,
        "delivered {handed_back} times before the limit"
    );
    let dead = drain(&conn, &topo.dead_letter_queue).await;
    assert_eq!(dead[0].0, b"{\"crashes\": \"every worker\"}");
    let reason = amqp::header_str(&dead[0].1, "x-first-death-reason");
    assert_eq!(reason.as_deref(), Some("delivery_limit"));
    cleanup(&s).await;
}

/// Breaker settings that notice an outage and its end within a fraction of a second.
fn quick_breakers(s: &mut Settings) {
    s.breaker.probe_base_ms = 100;
    s.breaker.probe_max_ms = 400;
    s.breaker.probe_timeout_ms = 1500;
    s.breaker.check_interval_ms = 300;
}

/// An attempt budget far shorter than the outages below: 3 attempts 100..200 ms apart.
fn short_attempt_budget(s: &mut Settings) {
    s.amqp.max_attempts = 3;
    s.amqp.retry_base_ms = 100;
    s.amqp.retry_max_ms = 200;
    s.amqp.prefetch = 4;
    s.amqp.concurrency = 4;
}

/// The test's queue settings with a short attempt budget and quick breakers.
fn outage_settings() -> Settings {
    let mut s = queue_settings(&tag());
    short_attempt_budget(&mut s);
    quick_breakers(&mut s);
    s
}

/// Longer than the whole attempt budget many times over.
const OUTAGE: std::time::Duration = std::time::Duration::from_secs(5);

/// A dependency a test takes away, and the names the worker reports it under.
struct Outage {
    dependency: &'static str,
    other: &'static str,
    /// The reason class a failure from it would be retried or dead-lettered under.
    reason: &'static str,
}

fn dependency_up(dependency: &str) -> String {
    format!("k6_ingest_dependency_up{{dependency=\"{dependency}\"}}")
}

/// `n` runs published during an outage far longer than the attempt budget: the worker
/// holds prefetch deliveries and leaves the rest in the queue, spends no attempt,
/// reports the outage on /readyz and /metrics, and stores every run once it is over.
async fn ride_out(
    pool: &PgPool,
    s: &Settings,
    worker: &Consumer,
    proxy: &Proxy,
    o: &Outage,
    n: usize,
) -> Vec<Value> {
    let (addr, m) = (worker.addr(), &worker.running.metrics);
    let (conn, topo) = (connect().await, Topology::new(&s.amqp));
    proxy.cut();
    let msgs = messages(n);
    publish_bodies(s, &bodies(&msgs)).await;
    wait_for(&format!("/readyz naming {}", o.dependency), || async {
        let (code, body) = readyz_report(addr).await;
        (code == 503 && body[o.dependency] == "down" && body[o.other] == "up").then_some(())
    })
    .await;
    let left = n as u32 - u32::from(s.amqp.prefetch);
    wait_for(
        "prefetch deliveries held, the rest left in the queue",
        || async { (queue_len(&conn, &topo.queue).await == left).then_some(()) },
    )
    .await;
    tokio::time::sleep(OUTAGE).await;
    assert_eq!(scrape(addr, &dependency_up(o.dependency)).await, 0.0);
    assert_eq!(scrape(addr, &dependency_up(o.other)).await, 1.0);
    assert_eq!(m.retried_count(o.reason), 0, "no attempt spent");
    assert_eq!(m.dead_lettered_count(o.reason), 0);
    assert_eq!(
        retry_and_dead(&conn, &topo).await,
        (0, 0),
        "nothing in the retry or dead-letter queues"
    );
    assert!(m.held_count(o.dependency) >= 1);
    assert_eq!(m.breaker_openings_count(o.dependency), 1);
    let held = format!(
        "k6_ingest_deliveries_held_total{{dependency=\"{}\"}}",
        o.dependency
    );
    assert!(
        scrape(addr, &held).await >= 1.0,
        "held deliveries on /metrics"
    );
    assert_eq!(queue_len(&conn, &topo.queue).await, left, "no spinning");
    assert_eq!(stored(pool, &run_ids(&msgs)).await, 0);
    proxy.restore();

    wait_stored(pool, &msgs, "every run stored after the outage").await;
    wait_readyz(addr, 200).await;
    assert_eq!(scrape(addr, &dependency_up(o.dependency)).await, 1.0);
    msgs
}

/// After an outage: every run stored once, the queues empty, no attempt spent.
async fn assert_settled_after(
    pool: &PgPool,
    s: &Settings,
    worker: &Consumer,
    o: &Outage,
    all: &[Value],
) {
    let m = &worker.running.metrics;
    let (conn, topo) = (connect().await, Topology::new(&s.amqp));
    assert_each_stored_once(pool, all).await;
    wait_for("the work queue empty", || async {
        (queue_len(&conn, &topo.queue).await == 0 && m.snapshot().in_flight == 0).then_some(())
    })
    .await;
    assert_eq!(retry_and_dead(&conn, &topo).await, (0, 0));
    assert_eq!(m.retried_count(o.reason), 0);
    assert_eq!(m.dead_lettered_count(o.reason), 0);
}

/// PostgreSQL goes away under a backlog, after some runs were stored.
#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn database_outage_pauses_without_spending_attempts_and_every_run_is_stored_once(
    pool: PgPool,
) {
    let s = outage_settings();
    let proxy = Proxy::start(pg_addr(&pool).await).await;
    let proxied = proxied_pool(&pool, &proxy);
    let worker = Consumer::start(&s, ingestor(&proxied, &s).await).await;
    let before = messages(4);
    publish_bodies(&s, &bodies(&before)).await;
    wait_stored(&pool, &before, "runs before the outage").await;
    wait_readyz(worker.addr(), 200).await;

    let o = Outage {
        dependency: "database",
        other: "s3",
        reason: "database",
    };
    let mut all = before;
    all.extend(ride_out(&pool, &s, &worker, &proxy, &o, 12).await);
    assert_settled_after(&pool, &s, &worker, &o, &all).await;
    worker.stop().await;
}

/// S3 goes away for far longer than the attempt budget; the artifacts go up after.
#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn s3_outage_pauses_without_spending_attempts_and_every_run_is_stored_once(pool: PgPool) {
    let mut s = queue_settings(&tag());
    let store = store(&s).await; // the bucket, created through the real endpoint
    let proxy = Proxy::start(s3_addr(&s)).await;
    s.s3.endpoint = Some(format!("http://{}", proxy.addr));
    short_attempt_budget(&mut s);
    quick_breakers(&mut s);
    let worker = Consumer::start(&s, ingestor(&pool, &s).await).await;
    wait_readyz(worker.addr(), 200).await;

    let o = Outage {
        dependency: "s3",
        other: "database",
        reason: "upload",
    };
    let msgs = ride_out(&pool, &s, &worker, &proxy, &o, 10).await;
    assert_settled_after(&pool, &s, &worker, &o, &msgs).await;
    let keys = s3_keys(&store, msgs[0]["run_id"].as_str().unwrap()).await;
    assert!(
        keys.iter().any(|k| k.ends_with("k6.log")),
        "artifacts uploaded after the outage: {keys:?}"
    );
    worker.stop().await;
}

/// Shutdown during an outage hands the held deliveries back at once (not after the
/// outage, not after the grace period), spending no attempt, and the worker stops cleanly.
#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn shutdown_during_an_outage_hands_held_deliveries_back_at_once(pool: PgPool) {
    let mut s = outage_settings();
    s.shutdown.grace_secs = 120;
    let proxy = Proxy::start(pg_addr(&pool).await).await;
    let proxied = proxied_pool(&pool, &proxy);
    let worker = Consumer::start(&s, ingestor(&proxied, &s).await).await;
    proxy.cut();
    let msgs = messages(6);
    publish_bodies(&s, &bodies(&msgs)).await;
    let conn = connect().await;
    let topo = Topology::new(&s.amqp);
    wait_for("prefetch deliveries held", || async {
        (queue_len(&conn, &topo.queue).await == 6 - 4
            && readyz_report(worker.addr()).await.1["database"] == "down")
            .then_some(())
    })
    .await;
    let running_metrics = worker.running.metrics.clone();
    worker.shutdown();
    // Far below the 120 s grace: held deliveries do not wait for the outage to end.
    tokio::time::timeout(std::time::Duration::from_secs(30), worker.running.done)
        .await
        .expect("stopped without waiting for the outage or the grace period")
        .unwrap()
        .unwrap();
    wait_queue_len(
        &conn,
        &topo.queue,
        6,
        "every message back in the work queue",
    )
    .await;
    assert_eq!(retry_and_dead(&conn, &topo).await, (0, 0));
    assert_eq!(
        running_metrics.retried_count("database"),
        0,
        "no attempt spent"
    );
    assert!(running_metrics.held_count("database") >= 1);
    proxy.restore();
    cleanup(&s).await;
}

/// With prefetch N the worker works on N runs at once, and one run stuck on a slow
/// artifact fetch does not hold up the others.
#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn prefetch_bounds_concurrency_and_a_slow_fetch_does_not_stall_the_others(pool: PgPool) {
    let mut s = queue_settings(&tag());
    s.amqp.prefetch = 4;
    s.amqp.concurrency = 4;
    let summary = std::fs::read(fixtures().join("v1.1.0/thresholds-pass/summary.json")).unwrap();
    let slow = SlowServer::start(summary).await;
    s.fetch.allowed_hosts = vec![slow.addr.to_string()];
    let worker = Consumer::start(&s, ingestor(&pool, &s).await).await;
    let slow_msg =
        |i: usize| summary_message(format!("http://{}/slow/{i}/summary.json", slow.addr));

    // One stuck run, many quick ones: the quick ones all go through.
    let stuck = vec![slow_msg(0)];
    publish_bodies(&s, &bodies(&stuck)).await;
    wait_for("the slow fetch to start", || async {
        (slow.open.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    let quick = messages(10);
    publish_bodies(&s, &bodies(&quick)).await;
    wait_stored_count(
        &pool,
        &run_ids(&quick),
        10,
        "the quick runs, past the stuck one",
    )
    .await;
    assert_eq!(stored(&pool, &run_ids(&stuck)).await, 0);
    assert_eq!(worker.running.metrics.snapshot().in_flight, 1);

    // Five more stuck runs: four slots, so three more start and two wait in the queue.
    let more: Vec<Value> = (1..=5).map(slow_msg).collect();
    publish_bodies(&s, &bodies(&more)).await;
    wait_for("four fetches at once", || async {
        (slow.open.load(Ordering::SeqCst) == 4).then_some(())
    })
    .await;
    let conn = connect().await;
    let topo = Topology::new(&s.amqp);
    wait_queue_len(&conn, &topo.queue, 2, "two messages left in the queue").await;
    assert_eq!(
        slow.peak.load(Ordering::SeqCst),
        4,
        "never more than prefetch at once"
    );
    assert_eq!(worker.running.metrics.snapshot().in_flight, 4);

    slow.release();
    let mut all = stuck.clone();
    all.extend(more);
    wait_stored_count(&pool, &run_ids(&all), 6, "the slow runs").await;
    assert_eq!(slow.peak.load(Ordering::SeqCst), 4);
    worker.stop().await;
}

#[tokio::test]
async fn consume_without_declare_fails_fast_naming_the_missing_queue() {
    let mut s = queue_settings(&tag());
    s.amqp.declare = false;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .connect_lazy("postgres://postgres@127.0.0.1:5432/postgres")
        .unwrap();
    let worker = Consumer::start(&s, ingestor(&pool, &s).await).await;
    let err = tokio::time::timeout(DEADLINE, worker.running.done)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert!(format!("{err:#}").contains(&s.amqp.exchange), "{err:#}");
    // With declare on, the same names are created, and a second declare changes nothing.
    declare(&s).await;
    declare(&s).await;
    s.amqp.declare = false;
    let conn = connect().await;
    Topology::new(&s.amqp).verify(&conn).await.unwrap();
    cleanup(&s).await;
}

/// An artifact host refuses connections for a while: the runs that need it are held
/// (no attempt spent), /readyz and /metrics name the host, runs of other tenants go on,
/// and the held runs are stored once the host is back.
#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn artifact_host_outage_holds_its_runs_without_spending_attempts_then_stores_them(
    pool: PgPool,
) {
    let mut s = outage_settings();
    s.breaker.host_wait_secs = 60;
    let summary = std::fs::read(fixtures().join("v1.1.0/thresholds-pass/summary.json")).unwrap();
    let host = SlowServer::start(summary).await;
    let proxy = Proxy::start(host.addr).await;
    s.fetch.allowed_hosts = vec![proxy.addr.to_string()];
    let worker = Consumer::start(&s, ingestor(&pool, &s).await).await;
    let addr = worker.addr();
    proxy.cut();
    let msgs: Vec<Value> = (0..2)
        .map(|i| summary_message(format!("http://{}/runs/{i}/summary.json", proxy.addr)))
        .collect();
    publish_bodies(&s, &bodies(&msgs)).await;
    let host_label = format!("k6_ingest_artifact_host_up{{host=\"{}\"}}", proxy.addr);
    wait_for("/readyz and /metrics naming the host", || async {
        let (code, body) = readyz_report(addr).await;
        let named = body["artifact_hosts_down"] == serde_json::json!([proxy.addr.to_string()]);
        (code == 200 && named && worker.running.metrics.held_count("artifact_host") >= 2)
            .then_some(())
    })
    .await;
    assert_eq!(scrape(addr, &host_label).await, 0.0);
    assert_eq!(scrape(addr, "k6_ingest_artifact_hosts_down").await, 1.0);
    // Two of four slots are held; runs that do not need the host still go through.
    let others = messages(6);
    publish_bodies(&s, &bodies(&others)).await;
    wait_stored_count(
        &pool,
        &run_ids(&others),
        6,
        "other runs stored during the host outage",
    )
    .await;
    tokio::time::sleep(OUTAGE).await;
    let conn = connect().await;
    let topo = Topology::new(&s.amqp);
    assert_eq!(
        worker.running.metrics.retried_count("fetch"),
        0,
        "no attempt spent"
    );
    assert_eq!(retry_and_dead(&conn, &topo).await, (0, 0));
    assert_eq!(stored(&pool, &run_ids(&msgs)).await, 0);
    proxy.restore();
    wait_stored_count(&pool, &run_ids(&msgs), 2, "every run stored").await;
    let status: Vec<String> = values_of(
        &pool,
        "SELECT status FROM k6_performance_runs WHERE run_id = ANY($1)",
        run_ids(&msgs),
    )
    .await;
    assert!(
        status.iter().all(|s| s == "passed"),
        "stored from the fetched summary: {status:?}"
    );
    assert_eq!(scrape(addr, &host_label).await, 1.0);
    assert_eq!(scrape(addr, "k6_ingest_artifact_hosts_down").await, 0.0);
    assert_eq!(worker.running.metrics.retried_count("fetch"), 0);
    assert_eq!(worker.running.metrics.dead_lettered_count("fetch"), 0);
    assert_eq!(retry_and_dead(&conn, &topo).await, (0, 0));
    worker.stop().await;
}

/// An artifact host that stays down holds a delivery only for `breaker.host_wait_secs`
/// per attempt; then the failure counts, and after `max_attempts` the message is
/// dead-lettered with the count and the reason.
#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn a_dead_artifact_host_holds_a_delivery_only_for_host_wait_secs(pool: PgPool) {
    let mut s = outage_settings();
    s.amqp.max_attempts = 2;
    s.breaker.host_wait_secs = 1;
    // A port nothing listens on: bound, then released.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    s.fetch.allowed_hosts = vec![dead.to_string()];
    let worker = Consumer::start(&s, ingestor(&pool, &s).await).await;
    let msgs = vec![summary_message(format!("http://{dead}/summary.json"))];
    publish_bodies(&s, &bodies(&msgs)).await;
    let conn = connect().await;
    let topo = Topology::new(&s.amqp);
    wait_queue_len(&conn, &topo.dead_letter_queue, 1, "the dead letter").await;
    let dead_letters = drain(&conn, &topo.dead_letter_queue).await;
    let props = &dead_letters[0].1;
    assert_eq!(amqp::header_u64(props, ATTEMPTS_HEADER), Some(2));
    assert_eq!(
        amqp::header_str(props, REASON_CLASS_HEADER).as_deref(),
        Some("fetch")
    );
    let reason = amqp::header_str(props, REASON_HEADER).unwrap();
    assert!(
        reason.contains("gave up after 2 attempts") && reason.contains("breaker.host_wait_secs"),
        "{reason}"
    );
    assert_eq!(worker.running.metrics.retried_count("fetch"), 1);
    assert!(worker.running.metrics.held_count("artifact_host") >= 2);
    worker.stop().await;
}

/// Faults of one path while its host is up (a 503, a connection closed without an
/// answer) belong to the message: they go through the retry queues and are dead-lettered
/// after `max_attempts` with the count; no breaker opens.
#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn a_message_fault_while_the_host_is_up_is_retried_then_dead_lettered(pool: PgPool) {
    let mut s = outage_settings();
    let summary = std::fs::read(fixtures().join("v1.1.0/thresholds-pass/summary.json")).unwrap();
    let host = SlowServer::start(summary).await;
    s.fetch.allowed_hosts = vec![host.addr.to_string()];
    let worker = Consumer::start(&s, ingestor(&pool, &s).await).await;
    let msgs: Vec<Value> = ["status/503/summary.json", "hangup/summary.json"]
        .iter()
        .map(|path| summary_message(format!("http://{}/{path}", host.addr)))
        .collect();
    publish_bodies(&s, &bodies(&msgs)).await;
    let conn = connect().await;
    let topo = Topology::new(&s.amqp);
    wait_queue_len(&conn, &topo.dead_letter_queue, 2, "two dead letters").await;
    let dead = drain(&conn, &topo.dead_letter_queue).await;
    for (body, props) in &dead {
        assert!(bodies(&msgs).contains(body), "original body kept");
        assert_eq!(amqp::header_u64(props, ATTEMPTS_HEADER), Some(3));
        assert_eq!(
            amqp::header_str(props, REASON_CLASS_HEADER).as_deref(),
            Some("fetch")
        );
        assert!(
            amqp::header_str(props, REASON_HEADER)
                .unwrap()
                .contains("gave up after 3 attempts")
        );
    }
    assert_eq!(
        worker.running.metrics.retried_count("fetch"),
        4,
        "2 retries each"
    );
    assert_eq!(worker.running.metrics.held_count("artifact_host"), 0);
    assert_eq!(
        worker
            .running
            .metrics
            .breaker_openings_count("artifact_host"),
        0
    );
    assert_eq!(
        readyz_report(worker.addr()).await.1["artifact_hosts_down"],
        serde_json::json!([])
    );
    assert_eq!(stored(&pool, &run_ids(&msgs)).await, 0);
    worker.stop().await;
}

/// Moves a message's run to start at `start`, keeping its duration.
fn started_at(msg: &mut Value, start: chrono::DateTime<chrono::Utc>) {
    let at = |key: &str| {
        msg[key]
            .as_str()
            .and_then(|t| t.parse::<chrono::DateTime<chrono::Utc>>().ok())
    };
    let took = at("completed_at").zip(at("started_at")).map(|(c, s)| c - s);
    msg["started_at"] = Value::String(start.to_rfc3339());
    if let Some(took) = took {
        msg["completed_at"] = Value::String((start + took).to_rfc3339());
    }
}

/// A run of a month without partitions, behind a session reading the k6 tables in a long
/// transaction (a report, `pg_dump`): making its month gives up on the lock again and
/// again, for longer than the attempt budget lasts, and the delivery is held without
/// spending an attempt while a run of this month is stored; once the reader ends, the
/// held run is stored in its own month. Nothing goes to the retry or dead-letter queues.
#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn a_run_behind_a_long_reader_is_held_without_spending_attempts(pool: PgPool) {
    let s = outage_settings();
    let reader = reading_k6_tables(&pool).await;
    let worker = Consumer::start(&s, ingestor(&pool, &s).await).await;
    let m = &worker.running.metrics;
    let mut old = case_message("thresholds-pass");
    started_at(&mut old, "2019-03-04T05:06:07Z".parse().unwrap());
    let mut current = case_message("thresholds-fail");
    started_at(&mut current, chrono::Utc::now());
    publish_bodies(&s, &bodies(&[old.clone(), current.clone()])).await;

    wait_stored(
        &pool,
        &[current],
        "this month's run stored beside the reader",
    )
    .await;
    let waits = u64::from(s.amqp.max_attempts) + 1;
    wait_for("more lock waits than the attempt budget", || async {
        (m.held_count("database_lock") >= waits).then_some(())
    })
    .await;
    let (conn, topo) = (connect().await, Topology::new(&s.amqp));
    assert_eq!(retry_and_dead(&conn, &topo).await, (0, 0));
    assert_eq!(m.retried_count("database"), 0, "no attempt spent");
    assert_eq!(m.dead_lettered_count("database"), 0);
    assert_eq!(stored(&pool, &run_ids(std::slice::from_ref(&old))).await, 0);

    reader.commit().await.unwrap();
    wait_stored(
        &pool,
        std::slice::from_ref(&old),
        "the held run stored after the reader",
    )
    .await;
    assert_eq!(started_year(&pool, run_id_of(&old)).await, 2019);
    assert_eq!(retry_and_dead(&conn, &topo).await, (0, 0));
    worker.stop().await;
}
