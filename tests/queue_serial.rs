//! Tests that disturb the shared broker. Named `serial_*`: the suite runs them alone,
//! after everything else (`cargo nextest run -E 'test(/serial_/)' --test-threads 1`).

mod harness;

use harness::*;
use sqlx::PgPool;

/// RabbitMQ restarts under a running worker: `/readyz` reports the outage, the worker
/// reconnects with backoff and resumes, and every run published before, around and
/// after the restart is stored exactly once.
#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn serial_broker_restart_reconnects_and_stores_every_run_once(pool: PgPool) {
    let env = TestEnv::queued(&pool).await;
    let s = &env.s;
    let worker = Consumer::start(s, env.ing).await;
    let addr = worker.addr();
    let before = messages(10);
    publish_bodies(s, &bodies(&before)).await;
    wait_stored_count(&pool, &run_ids(&before), 10, "runs before the restart").await;
    wait_readyz(addr, 200).await;

    // A burst, and the broker goes down while it is being consumed.
    let around = messages(30);
    publish_bodies(s, &bodies(&around)).await;
    tokio::task::spawn_blocking(|| rabbitmqctl(&["stop_app"]))
        .await
        .unwrap();
    wait_readyz(addr, 503).await;
    assert!(!worker.running.health.amqp());
    tokio::task::spawn_blocking(|| {
        rabbitmqctl(&["start_app"]);
        rabbitmqctl(&["await_startup"]);
    })
    .await
    .unwrap();

    wait_readyz(addr, 200).await;
    let after = messages(10);
    publish_bodies(s, &bodies(&after)).await;
    let mut all = before.clone();
    all.extend(around);
    all.extend(after);
    let ids = run_ids(&all);
    wait_stored_count(&pool, &ids, 50, "every run stored").await;
    assert_each_stored_once(&pool, &all).await;
    assert!(
        worker.running.metrics.snapshot().amqp_connections >= 2,
        "reconnected"
    );
    assert_eq!(scrape(addr, "k6_ingest_amqp_connected").await, 1.0);
    let conn = connect().await;
    let topo = k6_ingest::amqp::Topology::new(&s.amqp);
    wait_for("queues empty", || async {
        let n =
            queue_len(&conn, &topo.queue).await + queue_len(&conn, &topo.dead_letter_queue).await;
        (n == 0 && worker.running.metrics.snapshot().in_flight == 0).then_some(())
    })
    .await;
    worker.stop().await;
}
