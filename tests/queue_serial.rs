//! Tests that disturb the shared broker. Named `serial_*`: the suite runs them alone,
//! after everything else (`cargo nextest run -E 'test(/serial_/)' --test-threads 1`).

mod harness;

use harness::*;
use k6_ingest::consumer;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// RabbitMQ restarts under a running worker: `/readyz` reports the outage, the worker
/// reconnects with backoff and resumes, and every run published before, around and
/// after the restart is stored exactly once.
#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn serial_broker_restart_reconnects_and_stores_every_run_once(pool: PgPool) {
    let t = tag();
    let s = queue_settings(&t);
    let shutdown = CancellationToken::new();
    let running = consumer::start(&s, ingestor(&pool, &s).await, shutdown.clone())
        .await
        .unwrap();
    let addr = running.addr;
    let before = messages(10);
    publish_bodies(&s, &bodies(&before)).await;
    wait_for("runs before the restart", || async {
        (stored(&pool, &run_ids(&before)).await == 10).then_some(())
    })
    .await;
    wait_for("ready", || async {
        (readyz(addr).await == Some(200)).then_some(())
    })
    .await;

    // A burst, and the broker goes down while it is being consumed.
    let around = messages(30);
    publish_bodies(&s, &bodies(&around)).await;
    tokio::task::spawn_blocking(|| rabbitmqctl(&["stop_app"]))
        .await
        .unwrap();
    wait_for("/readyz to report the outage", || async {
        (readyz(addr).await == Some(503)).then_some(())
    })
    .await;
    assert!(!running.health.amqp());
    tokio::task::spawn_blocking(|| {
        rabbitmqctl(&["start_app"]);
        rabbitmqctl(&["await_startup"]);
    })
    .await
    .unwrap();

    wait_for("ready again", || async {
        (readyz(addr).await == Some(200)).then_some(())
    })
    .await;
    let after = messages(10);
    publish_bodies(&s, &bodies(&after)).await;
    let mut all = before.clone();
    all.extend(around);
    all.extend(after);
    let ids = run_ids(&all);
    wait_for("every run stored", || async {
        (stored(&pool, &ids).await == 50).then_some(())
    })
    .await;
    assert_each_stored_once(&pool, &all).await;
    assert!(
        running.metrics.snapshot().amqp_connections >= 2,
        "reconnected"
    );
    assert_eq!(scrape(addr, "k6_ingest_amqp_connected").await, 1.0);
    let conn = connect().await;
    let topo = k6_ingest::amqp::Topology::new(&s.amqp);
    wait_for("queues empty", || async {
        let n =
            queue_len(&conn, &topo.queue).await + queue_len(&conn, &topo.dead_letter_queue).await;
        (n == 0 && running.metrics.snapshot().in_flight == 0).then_some(())
    })
    .await;
    shutdown.cancel();
    running.done.await.unwrap().unwrap();
    cleanup(&s).await;
}
