//! The real binary as a child process: SIGTERM during work, SIGKILL at a random moment,
//! and the `publish` and `requeue` commands.

mod harness;

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::Ordering;

use harness::*;
use k6_ingest::amqp::{self, ATTEMPTS_HEADER, REASON_HEADER, Topology};
use k6_ingest::config::Settings;
use lapin::BasicProperties;
use lapin::options::{QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use serde_json::Value;
use sqlx::PgPool;
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_k6-ingest");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The binary with the test's settings in `K6_INGEST__*` variables.
fn command(s: &Settings, database_url: Option<&str>, args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(args)
        .env("K6_INGEST__AMQP__URL", amqp_url())
        .env("K6_INGEST__AMQP__EXCHANGE", &s.amqp.exchange)
        .env("K6_INGEST__AMQP__QUEUE", &s.amqp.queue)
        .env("K6_INGEST__AMQP__PREFETCH", s.amqp.prefetch.to_string())
        .env(
            "K6_INGEST__AMQP__CONCURRENCY",
            s.amqp.concurrency.to_string(),
        )
        .env(
            "K6_INGEST__AMQP__RETRY_BASE_MS",
            s.amqp.retry_base_ms.to_string(),
        )
        .env(
            "K6_INGEST__AMQP__RETRY_MAX_MS",
            s.amqp.retry_max_ms.to_string(),
        )
        .env("K6_INGEST__AMQP__DECLARE", s.amqp.declare.to_string())
        .env("K6_INGEST__S3__BUCKET", s.s3.bucket.as_deref().unwrap())
        .env("K6_INGEST__S3__PREFIX", &s.s3.prefix)
        .env("K6_INGEST__FETCH__ALLOWED_ROOTS", fixtures())
        .env(
            "K6_INGEST__FETCH__ALLOWED_HOSTS",
            s.fetch.allowed_hosts.join(","),
        )
        .env("K6_INGEST__HTTP__BIND", &s.http.bind)
        .env(
            "K6_INGEST__SHUTDOWN__GRACE_SECS",
            s.shutdown.grace_secs.to_string(),
        )
        .env("K6_INGEST__LOG__FORMAT", "json")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    if let Some(url) = database_url {
        c.env("K6_INGEST__DATABASE__URL", url);
    }
    c
}

struct Worker {
    child: Child,
    addr: std::net::SocketAddr,
    log: PathBuf,
}

impl Worker {
    async fn start(s: &Settings, pool: &PgPool, log_dir: &tempfile::TempDir, name: &str) -> Self {
        let log = log_dir.path().join(format!("{name}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = command(s, Some(&database_url(pool)), &["consume"])
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap();
        let addr = s.http.bind.parse().unwrap();
        let w = Self { child, addr, log };
        wait_readyz(addr, 200).await;
        w
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.id().unwrap().to_string();
        assert!(
            std::process::Command::new("kill")
                .args([sig, &pid])
                .status()
                .unwrap()
                .success()
        );
    }

    async fn exit_code(&mut self) -> Option<i32> {
        let status = tokio::time::timeout(DEADLINE, self.child.wait())
            .await
            .expect("the worker exits")
            .unwrap();
        if !status.success() {
            eprintln!(
                "worker log:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
        status.code()
    }
}

fn process_settings(tag: &str) -> Settings {
    let mut s = queue_settings(tag);
    s.http.bind = format!("127.0.0.1:{}", free_port());
    s
}

/// SIGTERM while runs are in flight and more wait in the queue: the worker stops taking
/// deliveries, reports not-ready, finishes the ones in flight, exits 0. A second worker
/// then takes the rest; every run is stored once and none was delivered twice.
#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn sigterm_finishes_in_flight_runs_exits_zero_and_hands_over_the_rest(pool: PgPool) {
    let mut s = process_settings(&tag());
    s.amqp.prefetch = 4;
    s.amqp.concurrency = 4;
    let _ = store(&s).await;
    let summary = std::fs::read(fixtures().join("v1.1.0/thresholds-pass/summary.json")).unwrap();
    let slow = SlowServer::start(summary).await;
    s.fetch.allowed_hosts = vec![slow.addr.to_string()];
    let logs = tempfile::tempdir().unwrap();
    let mut worker = Worker::start(&s, &pool, &logs, "first").await;

    let in_flight: Vec<Value> = (0..4)
        .map(|i| summary_message(format!("http://{}/slow/{i}/summary.json", slow.addr)))
        .collect();
    publish_bodies(&s, &bodies(&in_flight)).await;
    wait_for("four runs in flight", || async {
        (slow.open.load(Ordering::SeqCst) == 4).then_some(())
    })
    .await;
    let waiting = messages(20);
    publish_bodies(&s, &bodies(&waiting)).await;
    let conn = connect().await;
    let topo = Topology::new(&s.amqp);
    wait_queue_len(&conn, &topo.queue, 20, "the burst queued").await;

    worker.signal("-TERM");
    wait_for("/readyz to say stopping", || async {
        (readyz(worker.addr).await == Some(503)).then_some(())
    })
    .await;
    assert_eq!(
        stored(&pool, &run_ids(&in_flight)).await,
        0,
        "still in flight"
    );
    slow.release();
    assert_eq!(worker.exit_code().await, Some(0));
    assert_eq!(
        stored(&pool, &run_ids(&in_flight)).await,
        4,
        "in-flight runs finished within the grace period"
    );
    assert_eq!(
        stored(&pool, &run_ids(&waiting)).await,
        0,
        "no new deliveries after SIGTERM"
    );
    assert_eq!(
        queue_len(&conn, &topo.queue).await,
        20,
        "the rest is still queued"
    );

    let mut second = Worker::start(&s, &pool, &logs, "second").await;
    wait_stored_count(&pool, &run_ids(&waiting), 20, "the rest stored").await;
    let mut all = in_flight.clone();
    all.extend(waiting);
    assert_each_stored_once(&pool, &all).await;
    assert_eq!(
        scrape(second.addr, "k6_ingest_messages_duplicate_total").await,
        0.0,
        "nothing delivered twice"
    );
    assert_eq!(
        scrape(second.addr, "k6_ingest_messages_ingested_total").await,
        20.0
    );
    second.signal("-TERM");
    assert_eq!(second.exit_code().await, Some(0));
    assert_eq!(queue_len(&conn, &topo.queue).await, 0);
    assert_eq!(queue_len(&conn, &topo.dead_letter_queue).await, 0);
    cleanup(&s).await;
}

/// SIGKILL at a random point of a burst, then a restart: every run stored exactly once,
/// nothing left in any queue.
#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn sigkill_at_a_random_moment_then_restart_stores_every_run_once(pool: PgPool) {
    let s = process_settings(&tag());
    let _ = store(&s).await;
    let msgs = messages(40);
    publish_bodies(&s, &bodies(&msgs)).await;
    let ids = run_ids(&msgs);
    let kill_after = (uuid::Uuid::new_v4().as_u128() % 30) as i64 + 1;
    let logs = tempfile::tempdir().unwrap();
    let mut worker = Worker::start(&s, &pool, &logs, "killed").await;
    wait_for("some runs stored", || async {
        (stored(&pool, &ids).await >= kill_after).then_some(())
    })
    .await;
    worker.child.start_kill().unwrap();
    let _ = worker.child.wait().await;
    let at_kill = stored(&pool, &ids).await;
    eprintln!("killed after {at_kill} of 40 runs (aimed at {kill_after})");

    let mut again = Worker::start(&s, &pool, &logs, "restarted").await;
    wait_stored_count(&pool, &ids, 40, "every run stored").await;
    assert_each_stored_once(&pool, &msgs).await;
    let conn = connect().await;
    let topo = Topology::new(&s.amqp);
    wait_for("queues empty", || async {
        let n =
            queue_len(&conn, &topo.queue).await + queue_len(&conn, &topo.dead_letter_queue).await;
        (n == 0 && scrape(again.addr, "k6_ingest_in_flight_messages").await == 0.0).then_some(())
    })
    .await;
    again.signal("-TERM");
    assert_eq!(again.exit_code().await, Some(0));
    cleanup(&s).await;
}

async fn run(cmd: &mut Command) -> (i32, String, String) {
    let out = tokio::time::timeout(DEADLINE, cmd.output())
        .await
        .unwrap()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn publish_confirms_every_message_and_reports_failures() {
    let t = tag();
    let s = queue_settings(&t);
    let conn = connect().await;
    let topo = Topology::new(&s.amqp);

    let dir = fixtures().join("v1.1.0");
    let (code, out, err) = run(&mut command(&s, None, &["publish", dir.to_str().unwrap()])).await;
    let n = std::fs::read_dir(fixtures().join("v1.1.0"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().join("message.json").is_file())
        .count();
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!("{n} messages: {n} confirmed, 0 failed")),
        "{out}"
    );
    assert_eq!(queue_len(&conn, &topo.queue).await as usize, n);
    // Relative artifact paths became file:// URIs the worker can read.
    let published = drain(&conn, &topo.queue).await;
    let first: Value = serde_json::from_slice(&published[0].0).unwrap();
    // Every publish is a new event for the same run.
    let on_disk: Vec<String> = std::fs::read_dir(fixtures().join("v1.1.0"))
        .unwrap()
        .filter_map(|e| std::fs::read(e.unwrap().path().join("message.json")).ok())
        .map(|b| {
            serde_json::from_slice::<Value>(&b).unwrap()["event_id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert!(!on_disk.contains(&first["event_id"].as_str().unwrap().to_string()));
    assert!(
        first["artifacts"]["summary"]
            .as_str()
            .unwrap()
            .starts_with("file:///"),
        "{first}"
    );

    // NDJSON, with one line that is not a message: the good lines go, the bad one fails.
    let dir = tempfile::tempdir().unwrap();
    let ndjson = dir.path().join("backfill.ndjson");
    let lines: Vec<String> = messages(2)
        .iter()
        .map(|m| m.to_string())
        .chain(["{not json".to_string()])
        .collect();
    std::fs::write(&ndjson, lines.join("\n")).unwrap();
    let (code, out, err) = run(&mut command(
        &s,
        None,
        &["publish", ndjson.to_str().unwrap()],
    ))
    .await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("3 messages: 2 confirmed, 1 failed"), "{out}");
    assert!(err.contains("backfill.ndjson:3"), "{err}");
    assert_eq!(queue_len(&conn, &topo.queue).await, 2);

    // A broker nack is a failure: a full queue bound next to the work queue rejects it.
    let ch = conn.create_channel().await.unwrap();
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(0));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString(LongString::from("reject-publish")),
    );
    let full = format!("test.{t}.full");
    ch.queue_declare(
        full.as_str().into(),
        QueueDeclareOptions {
            auto_delete: true,
            ..QueueDeclareOptions::default()
        },
        args,
    )
    .await
    .unwrap();
    ch.queue_bind(
        full.as_str().into(),
        s.amqp.exchange.as_str().into(),
        s.amqp.routing_key.as_str().into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let one = fixtures().join("v1.1.0/thresholds-pass/message.json");
    let (code, out, err) = run(&mut command(&s, None, &["publish", one.to_str().unwrap()])).await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("1 messages: 0 confirmed, 1 failed") && err.contains("nack"),
        "{out}{err}"
    );
    let _ = ch
        .queue_delete(full.as_str().into(), Default::default())
        .await;

    // Nothing declared and told not to declare: an error naming what is missing.
    let mut missing = queue_settings(&tag());
    missing.amqp.declare = false;
    let (code, _, err) = run(&mut command(
        &missing,
        None,
        &["publish", one.to_str().unwrap()],
    ))
    .await;
    assert_ne!(code, 0);
    assert!(
        err.contains(&missing.amqp.exchange) && err.contains("missing"),
        "{err}"
    );
    cleanup(&s).await;
}

#[tokio::test]
async fn requeue_moves_dead_letters_back_with_a_fresh_attempt_count() {
    let s = queue_settings(&tag());
    declare(&s).await;
    let conn = connect().await;
    let topo = Topology::new(&s.amqp);
    let ch = amqp::confirm_channel(&conn).await.unwrap();
    let msgs = messages(3);
    for body in bodies(&msgs) {
        let mut h = FieldTable::default();
        h.insert(ATTEMPTS_HEADER.into(), AMQPValue::LongLongInt(5));
        h.insert(REASON_HEADER.into(), amqp::text("gave up after 5 attempts"));
        h.insert("x-custom".into(), amqp::text("kept"));
        amqp::publish_confirmed(
            &ch,
            &topo.dead_letter_exchange,
            "",
            &body,
            BasicProperties::default().with_headers(h),
        )
        .await
        .unwrap();
    }
    assert_eq!(queue_len(&conn, &topo.dead_letter_queue).await, 3);

    let (code, out, err) = run(&mut command(&s, None, &["requeue", "--limit", "2"])).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("dead-letter queue held 3; requeued 2"),
        "{out}"
    );
    let (code, out, _) = run(&mut command(&s, None, &["requeue"])).await;
    assert_eq!(code, 0);
    assert!(
        out.contains("dead-letter queue held 1; requeued 1"),
        "{out}"
    );
    assert_eq!(queue_len(&conn, &topo.dead_letter_queue).await, 0);
    let back = drain(&conn, &topo.queue).await;
    assert_eq!(back.len(), 3);
    for (body, props) in &back {
        assert!(bodies(&msgs).contains(body), "body unchanged");
        assert_eq!(
            amqp::header_u64(props, ATTEMPTS_HEADER),
            None,
            "attempts start over"
        );
        assert_eq!(amqp::header_str(props, REASON_HEADER), None);
        assert_eq!(amqp::header_str(props, "x-custom").as_deref(), Some("kept"));
    }
    cleanup(&s).await;
}
