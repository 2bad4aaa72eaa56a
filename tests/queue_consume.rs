//! The consumer against real RabbitMQ, PostgreSQL and S3: ingestion and idempotence,
//! dead letters, the delivery limit, retries through outages, concurrency.

mod queue_support;

use std::sync::atomic::Ordering;

use k6_ingest::amqp::{self, ATTEMPTS_HEADER, REASON_CLASS_HEADER, REASON_HEADER, Topology};
use k6_ingest::consumer;
use lapin::options::{BasicConsumeOptions, BasicNackOptions};
use lapin::types::FieldTable;
use queue_support::*;
use serde_json::Value;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn consume_stores_each_run_once_and_absorbs_duplicate_publishes(pool: PgPool) {
    let t = tag();
    let s = settings(&t);
    let shutdown = CancellationToken::new();
    let running = consumer::start(&s, ingestor(&pool, &s).await, shutdown.clone())
        .await
        .unwrap();
    let addr = running.addr;
    wait_for("readiness", || async {
        (readyz(addr).await == Some(200)).then_some(())
    })
    .await;
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
    publish_bodies(&s, &all).await;

    let ids = run_ids(&msgs);
    wait_for("all runs stored", || async {
        (stored(&pool, &ids).await == 12).then_some(())
    })
    .await;
    wait_for("every delivery settled", || async {
        let m = running.metrics.snapshot();
        (m.received == 15 && m.in_flight == 0).then_some(())
    })
    .await;
    assert_each_stored_once(&pool, &msgs).await;
    let m = running.metrics.snapshot();
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
    let store = store(&s).await;
    let keys = s3_keys(&store, msgs[0]["run_id"].as_str().unwrap()).await;
    assert!(
        keys.iter().any(|k| k.ends_with("k6.log")),
        "artifacts uploaded: {keys:?}"
    );

    // The metrics endpoint shows the same numbers, with the names the README lists.
    assert_eq!(
        scrape(addr, "k6_ingest_messages_received_total").await,
        15.0
    );
    assert_eq!(
        scrape(addr, "k6_ingest_messages_ingested_total").await,
        12.0
    );
    assert_eq!(
        scrape(addr, "k6_ingest_messages_duplicate_total").await,
        3.0
    );
    assert_eq!(
        scrape(addr, "k6_ingest_ingest_duration_seconds_count").await,
        15.0
    );
    assert!(scrape(addr, "k6_ingest_artifact_uploaded_bytes_total").await > 0.0);
    assert_eq!(scrape(addr, "k6_ingest_amqp_connected").await, 1.0);
    assert_eq!(scrape(addr, "k6_ingest_in_flight_messages").await, 0.0);

    shutdown.cancel();
    running.done.await.unwrap().unwrap();
    assert!(
        readyz(addr).await.is_none(),
        "the HTTP server stops after the drain"
    );
    cleanup(&s).await;
}

#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn poison_messages_are_dead_lettered_with_reason_and_body_and_the_worker_goes_on(
    pool: PgPool,
) {
    let t = tag();
    let mut s = settings(&t);
    s.amqp.max_message_bytes = 8192;
    // A run the application created for another organization: the message is refused.
    let foreign = message("thresholds-pass");
    sqlx::query(
        "INSERT INTO runs (id, organization_id, project_id, status) VALUES ($1, $2, $3, 'running')",
    )
    .bind(
        foreign["run_id"]
            .as_str()
            .unwrap()
            .parse::<uuid::Uuid>()
            .unwrap(),
    )
    .bind(uuid::Uuid::now_v7())
    .bind(uuid::Uuid::now_v7())
    .execute(&pool)
    .await
    .unwrap();
    let mut missing = message("thresholds-pass");
    missing.as_object_mut().unwrap().remove("organization_id");
    let mut future = message("thresholds-pass");
    future["schema_version"] = 2.into();
    let mut large = message("thresholds-pass");
    large["metadata"]["padding"] = Value::String("x".repeat(10_000));
    let good = message("thresholds-fail");

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

    let shutdown = CancellationToken::new();
    let running = consumer::start(&s, ingestor(&pool, &s).await, shutdown.clone())
        .await
        .unwrap();
    let good_id = run_ids(std::slice::from_ref(&good));
    wait_for("the good run after the poison ones", || async {
        (stored(&pool, &good_id).await == 1).then_some(())
    })
    .await;
    let conn = connect().await;
    let topo = Topology::new(&s.amqp);
    wait_for("five dead letters", || async {
        (queue_len(&conn, &topo.dead_letter_queue).await == 5).then_some(())
    })
    .await;

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
        assert_eq!(running.metrics.dead_lettered_count(expected_class), 1);
    }
    assert_eq!(queue_len(&conn, &topo.queue).await, 0);
    let foreign_org: uuid::Uuid =
        sqlx::query_scalar("SELECT organization_id FROM runs WHERE id = $1")
            .bind(
                foreign["run_id"]
                    .as_str()
                    .unwrap()
                    .parse::<uuid::Uuid>()
                    .unwrap(),
            )
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_ne!(
        foreign_org.to_string(),
        foreign["organization_id"].as_str().unwrap(),
        "the foreign run is untouched"
    );
    shutdown.cancel();
    running.done.await.unwrap().unwrap();
    cleanup(&s).await;
}

/// Deliveries handed back again and again (a worker crashing on a message) reach the
/// quorum queue's delivery limit; the broker then dead-letters the message, never drops it.
#[tokio::test]
async fn delivery_limit_dead_letters_instead_of_dropping() {
    let t = tag();
    let mut s = settings(&t);
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

/// PostgreSQL goes away during a run of messages and comes back: each message is retried
/// with backoff through the delay queues and stored exactly once.
#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn database_outage_is_retried_with_backoff_and_every_run_stored_once(pool: PgPool) {
    let t = tag();
    let mut s = settings(&t);
    s.amqp.max_attempts = 30;
    s.amqp.retry_base_ms = 100;
    s.amqp.retry_max_ms = 800;
    s.amqp.prefetch = 4;
    s.amqp.concurrency = 4;
    let pg: std::net::SocketAddr = {
        let opts = pool.connect_options();
        tokio::net::lookup_host((opts.get_host(), opts.get_port()))
            .await
            .unwrap()
            .next()
            .unwrap()
    };
    let proxy = Proxy::start(pg).await;
    let proxied = sqlx::postgres::PgPoolOptions::new()
        .max_connections(6)
        .acquire_timeout(std::time::Duration::from_secs(1))
        .connect_lazy_with(
            (*pool.connect_options())
                .clone()
                .host("127.0.0.1")
                .port(proxy.addr.port()),
        );
    let shutdown = CancellationToken::new();
    let running = consumer::start(&s, ingestor(&proxied, &s).await, shutdown.clone())
        .await
        .unwrap();
    let addr = running.addr;
    let before = messages(4);
    publish_bodies(&s, &bodies(&before)).await;
    wait_for("runs before the outage", || async {
        (stored(&pool, &run_ids(&before)).await == 4).then_some(())
    })
    .await;
    wait_for("ready", || async {
        (readyz(addr).await == Some(200)).then_some(())
    })
    .await;

    proxy.cut();
    let during = messages(12);
    publish_bodies(&s, &bodies(&during)).await;
    wait_for("retries while PostgreSQL is away", || async {
        (running.metrics.retried_count("database") >= 12).then_some(())
    })
    .await;
    wait_for("/readyz reporting the outage", || async {
        (readyz(addr).await == Some(503)).then_some(())
    })
    .await;
    assert_eq!(stored(&pool, &run_ids(&during)).await, 0);
    proxy.restore();

    wait_for("every run stored after the outage", || async {
        (stored(&pool, &run_ids(&during)).await == 12).then_some(())
    })
    .await;
    wait_for("ready again", || async {
        (readyz(addr).await == Some(200)).then_some(())
    })
    .await;
    let mut all = before.clone();
    all.extend(during.clone());
    assert_each_stored_once(&pool, &all).await;
    let conn = connect().await;
    let topo = Topology::new(&s.amqp);
    wait_for("queues empty", || async {
        let mut total =
            queue_len(&conn, &topo.queue).await + queue_len(&conn, &topo.dead_letter_queue).await;
        for (q, _) in topo.retry_queues() {
            total += queue_len(&conn, &q).await;
        }
        (total == 0 && running.metrics.snapshot().in_flight == 0).then_some(())
    })
    .await;
    assert_eq!(running.metrics.dead_lettered_count("database"), 0);
    shutdown.cancel();
    running.done.await.unwrap().unwrap();
    cleanup(&s).await;
}

/// S3 goes away: with few attempts allowed, the message ends in the dead-letter queue
/// with the attempt count; with S3 back in time, every run is stored once.
#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn s3_outage_is_retried_then_dead_lettered_with_the_attempt_count(pool: PgPool) {
    let t = tag();
    let mut s = settings(&t);
    let _ = store(&s).await; // the bucket, created through the real endpoint
    let real: std::net::SocketAddr = url::Url::parse(s.s3.endpoint.as_deref().unwrap())
        .unwrap()
        .socket_addrs(|| None)
        .unwrap()[0];
    let proxy = Proxy::start(real).await;
    s.s3.endpoint = Some(format!("http://{}", proxy.addr));
    s.amqp.max_attempts = 3;
    s.amqp.retry_base_ms = 100;
    s.amqp.retry_max_ms = 200;
    let ing = ingestor(&pool, &s).await;
    let shutdown = CancellationToken::new();
    let running = consumer::start(&s, ing.clone(), shutdown.clone())
        .await
        .unwrap();
    let conn = connect().await;
    let topo = Topology::new(&s.amqp);

    proxy.cut();
    let doomed = messages(2);
    publish_bodies(&s, &bodies(&doomed)).await;
    wait_for("dead letters after 3 attempts", || async {
        (queue_len(&conn, &topo.dead_letter_queue).await == 2).then_some(())
    })
    .await;
    let dead = drain(&conn, &topo.dead_letter_queue).await;
    for (body, props) in &dead {
        assert!(bodies(&doomed).contains(body), "original body kept");
        assert_eq!(amqp::header_u64(props, ATTEMPTS_HEADER), Some(3));
        assert_eq!(
            amqp::header_str(props, REASON_CLASS_HEADER).as_deref(),
            Some("upload")
        );
        assert!(
            amqp::header_str(props, REASON_HEADER)
                .unwrap()
                .contains("gave up after 3 attempts")
        );
    }
    assert_eq!(running.metrics.retried_count("upload"), 4, "2 retries each");
    assert_eq!(
        stored(&pool, &run_ids(&doomed)).await,
        0,
        "nothing written without the artifacts"
    );
    shutdown.cancel();
    running.done.await.unwrap().unwrap();

    // Again with attempts enough to outlast the outage.
    s.amqp.max_attempts = 40;
    let shutdown = CancellationToken::new();
    let running = consumer::start(&s, ing, shutdown.clone()).await.unwrap();
    let msgs = messages(6);
    publish_bodies(&s, &bodies(&msgs)).await;
    wait_for("retries while S3 is away", || async {
        (running.metrics.retried_count("upload") >= 6).then_some(())
    })
    .await;
    proxy.restore();
    wait_for("every run stored", || async {
        (stored(&pool, &run_ids(&msgs)).await == 6).then_some(())
    })
    .await;
    assert_each_stored_once(&pool, &msgs).await;
    assert_eq!(queue_len(&conn, &topo.dead_letter_queue).await, 0);
    shutdown.cancel();
    running.done.await.unwrap().unwrap();
    cleanup(&s).await;
}

/// With prefetch N the worker works on N runs at once, and one run stuck on a slow
/// artifact fetch does not hold up the others.
#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn prefetch_bounds_concurrency_and_a_slow_fetch_does_not_stall_the_others(pool: PgPool) {
    let t = tag();
    let mut s = settings(&t);
    s.amqp.prefetch = 4;
    s.amqp.concurrency = 4;
    let summary = std::fs::read(fixtures().join("v1.1.0/thresholds-pass/summary.json")).unwrap();
    let slow = SlowServer::start(summary).await;
    s.fetch.allowed_hosts = vec![slow.addr.to_string()];
    let shutdown = CancellationToken::new();
    let running = consumer::start(&s, ingestor(&pool, &s).await, shutdown.clone())
        .await
        .unwrap();
    let slow_msg = |i: usize| {
        let mut m = message("thresholds-pass");
        m["artifacts"] =
            serde_json::json!({ "summary": format!("http://{}/slow/{i}/summary.json", slow.addr) });
        m
    };

    // One stuck run, many quick ones: the quick ones all go through.
    let stuck = vec![slow_msg(0)];
    publish_bodies(&s, &bodies(&stuck)).await;
    wait_for("the slow fetch to start", || async {
        (slow.open.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    let quick = messages(10);
    publish_bodies(&s, &bodies(&quick)).await;
    wait_for("the quick runs, past the stuck one", || async {
        (stored(&pool, &run_ids(&quick)).await == 10).then_some(())
    })
    .await;
    assert_eq!(stored(&pool, &run_ids(&stuck)).await, 0);
    assert_eq!(running.metrics.snapshot().in_flight, 1);

    // Five more stuck runs: four slots, so three more start and two wait in the queue.
    let more: Vec<Value> = (1..=5).map(slow_msg).collect();
    publish_bodies(&s, &bodies(&more)).await;
    wait_for("four fetches at once", || async {
        (slow.open.load(Ordering::SeqCst) == 4).then_some(())
    })
    .await;
    let conn = connect().await;
    let topo = Topology::new(&s.amqp);
    wait_for("two messages left in the queue", || async {
        (queue_len(&conn, &topo.queue).await == 2).then_some(())
    })
    .await;
    assert_eq!(
        slow.peak.load(Ordering::SeqCst),
        4,
        "never more than prefetch at once"
    );
    assert_eq!(running.metrics.snapshot().in_flight, 4);

    slow.release();
    let mut all = stuck.clone();
    all.extend(more);
    wait_for("the slow runs", || async {
        (stored(&pool, &run_ids(&all)).await == 6).then_some(())
    })
    .await;
    assert_eq!(slow.peak.load(Ordering::SeqCst), 4);
    shutdown.cancel();
    running.done.await.unwrap().unwrap();
    cleanup(&s).await;
}

#[tokio::test]
async fn consume_without_declare_fails_fast_naming_the_missing_queue() {
    let t = tag();
    let mut s = settings(&t);
    s.amqp.declare = false;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .connect_lazy("postgres://postgres@127.0.0.1:5432/postgres")
        .unwrap();
    let shutdown = CancellationToken::new();
    let running = consumer::start(&s, ingestor(&pool, &s).await, shutdown)
        .await
        .unwrap();
    let err = tokio::time::timeout(DEADLINE, running.done)
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

/// The artifact host refuses connections for a while (a fetch failure that may pass):
/// the runs are retried, not dead-lettered, and stored once the host is back.
#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn artifact_host_outage_is_retried_then_stored(pool: PgPool) {
    let t = tag();
    let mut s = settings(&t);
    s.amqp.max_attempts = 40;
    s.amqp.retry_base_ms = 100;
    s.amqp.retry_max_ms = 400;
    let summary = std::fs::read(fixtures().join("v1.1.0/thresholds-pass/summary.json")).unwrap();
    let host = SlowServer::start(summary).await;
    let proxy = Proxy::start(host.addr).await;
    s.fetch.allowed_hosts = vec![proxy.addr.to_string()];
    let shutdown = CancellationToken::new();
    let running = consumer::start(&s, ingestor(&pool, &s).await, shutdown.clone())
        .await
        .unwrap();
    proxy.cut();
    let msgs: Vec<Value> = (0..4)
        .map(|i| {
            let mut m = message("thresholds-pass");
            m["artifacts"] = serde_json::json!({ "summary": format!("http://{}/runs/{i}/summary.json", proxy.addr) });
            m
        })
        .collect();
    publish_bodies(&s, &bodies(&msgs)).await;
    wait_for("fetch retries", || async {
        (running.metrics.retried_count("fetch") >= 4).then_some(())
    })
    .await;
    assert_eq!(stored(&pool, &run_ids(&msgs)).await, 0);
    proxy.restore();
    wait_for("every run stored", || async {
        (stored(&pool, &run_ids(&msgs)).await == 4).then_some(())
    })
    .await;
    let status: Vec<String> =
        sqlx::query_scalar("SELECT status FROM k6_performance_runs WHERE run_id = ANY($1)")
            .bind(run_ids(&msgs))
            .fetch_all(&pool)
            .await
            .unwrap();
    assert!(
        status.iter().all(|s| s == "passed"),
        "stored from the fetched summary: {status:?}"
    );
    assert_eq!(running.metrics.dead_lettered_count("fetch"), 0);
    shutdown.cancel();
    running.done.await.unwrap().unwrap();
    cleanup(&s).await;
}
