//! A hostile tenant's messages against the real S3 server: `s3://` sources are read only
//! from the sender's own staging prefix (`s3.source_templates`). Objects of other tenants,
//! other prefixes and other buckets exist and are readable with the worker's credentials;
//! a message naming them is refused before any request reaches S3, the run is recorded as
//! `error` with the reason, and nothing is copied under the sender's prefix.

mod harness;

use std::process::Command;

use harness::*;
use k6_ingest::artifact::Tenant;
use k6_ingest::config::Settings;
use k6_ingest::ingest::{Disposition, IngestContext, IngestError, Ingestor, Outcome};
use k6_ingest::message::RunCompleted;
use k6_ingest::s3::ArtifactStore;
use sqlx::PgPool;
use uuid::Uuid;

struct World {
    s: Settings,
    store: ArtifactStore,
    ingestor: Ingestor,
    proxy: Proxy,
}

/// The worker as deployed (default templates), its fetches of S3 counted by the proxy;
/// uploads go straight to the server.
async fn world(pool: &PgPool) -> World {
    let s = settings();
    let store = store(&s).await;
    let proxy = Proxy::start(s3_addr(&s)).await;
    let ingestor = ingestor_fetching_via(pool, &s, format!("http://{}", proxy.addr)).await;
    World {
        s,
        store,
        ingestor,
        proxy,
    }
}

/// The key `submit` stages a file of `tenant` under.
fn staged(s: &Settings, tenant: &Tenant, file: &str) -> String {
    ArtifactStore::key_with_prefix(
        &s.s3.staging_prefix,
        tenant.organization_id,
        tenant.project_id,
        tenant.run_id,
        file,
    )
}

fn summary_bytes() -> Vec<u8> {
    std::fs::read(fixture_dir("v1.1.0", "json-logs").join("summary.json")).unwrap()
}

fn s3_uri(bucket: &str, key: &str) -> String {
    format!("s3://{bucket}/{key}")
}

/// The sender's message for a fresh run, with every artifact pointing at `uri`.
fn hostile_message(uri: &str) -> RunCompleted {
    let mut msg = message(&fixture_dir("v1.1.0", "json-logs"));
    msg.run_id = Uuid::now_v7();
    msg.artifacts.summary = Some(uri.to_string());
    msg.artifacts.logs = Some(uri.to_string());
    msg.artifacts.report_html = Some(uri.to_string());
    msg.artifacts.metrics = None;
    msg
}

#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn another_tenants_objects_are_refused_before_any_request(pool: PgPool) {
    let w = world(&pool).await;
    let bucket = w.store.bucket().to_string();
    let sender = Tenant::of(&hostile_message("x"));
    let victim = Tenant {
        organization_id: Uuid::now_v7(),
        project_id: Uuid::now_v7(),
        run_id: Uuid::now_v7(),
    };

    // Objects the worker's own credentials can read, none in the sender's staging prefix.
    let other_bucket = format!("t-{}", &Uuid::new_v4().simple().to_string()[..8]);
    w.store
        .client()
        .create_bucket()
        .bucket(&other_bucket)
        .send()
        .await
        .unwrap();
    let victim_run = w.store.key_for(
        victim.organization_id,
        victim.project_id,
        victim.run_id,
        "summary.json",
    );
    let victim_staging = staged(&w.s, &victim, "summary.json");
    let same_org_other_project = staged(
        &w.s,
        &Tenant {
            project_id: victim.project_id,
            ..sender
        },
        "summary.json",
    );
    // With the default template even the sender's other runs are out of reach.
    let same_project_other_run = staged(
        &w.s,
        &Tenant {
            run_id: victim.run_id,
            ..sender
        },
        "summary.json",
    );
    let planted = [
        (bucket.clone(), victim_run.clone()),
        (bucket.clone(), same_project_other_run.clone()),
        (bucket.clone(), victim_staging.clone()),
        (bucket.clone(), same_org_other_project.clone()),
        // The sender's own layout, in a bucket that is not the worker's.
        (other_bucket.clone(), staged(&w.s, &sender, "summary.json")),
    ];
    for (b, key) in &planted {
        put_object(&w.store, b, key, &summary_bytes()).await;
        let read = w
            .store
            .client()
            .get_object()
            .bucket(b)
            .key(key)
            .send()
            .await
            .unwrap();
        assert_eq!(
            read.body.collect().await.unwrap().into_bytes().to_vec(),
            summary_bytes(),
            "the worker's credentials can read s3://{b}/{key}"
        );
    }

    // Every spelling, for a message of `own` (its run id is part of its own prefix).
    let hostile = |own: &Tenant| -> Vec<(String, &'static str)> {
        let own_dir = format!("s3://{bucket}/{}", staged(&w.s, own, ""));
        // From inside the sender's own staging prefix back out to the victim's.
        let back_out = |dotdot: &str, slash: &str| {
            format!(
                "{own_dir}{}{}",
                format!("{dotdot}{slash}").repeat(4),
                victim_staging.replace('/', slash)
            )
        };
        vec![
            (s3_uri(&bucket, &victim_run), "s3.source_templates"),
            (s3_uri(&bucket, &victim_staging), "s3.source_templates"),
            (
                s3_uri(&bucket, &same_project_other_run),
                "s3.source_templates",
            ),
            (
                s3_uri(&bucket, &same_org_other_project),
                "s3.source_templates",
            ),
            (
                s3_uri(&other_bucket, &staged(&w.s, own, "summary.json")),
                "s3.source_templates",
            ),
            (back_out("..", "/"), "'..' segments"),
            (back_out("%2e%2e", "/"), "'..' segments"),
            (back_out("%2E.", "/"), "'..' segments"),
            (back_out("..", "%2F"), "%2F"),
            (back_out("%252e%252e", "/"), "double encoding"),
            (back_out("..", "\\"), "backslashes"),
            (back_out("", "//"), "empty segments"),
            (
                format!(
                    "s3://runner:hunter2@{bucket}/{}",
                    staged(&w.s, own, "summary.json")
                ),
                "credentials",
            ),
            (
                s3_uri(&bucket.to_uppercase(), &staged(&w.s, own, "summary.json")),
                "bucket name",
            ),
            (
                format!(
                    "{}?versionId=1",
                    s3_uri(&bucket, &staged(&w.s, own, "summary.json"))
                ),
                "query",
            ),
        ]
    };

    let count = hostile(&sender).len();
    for i in 0..count {
        let mut msg = hostile_message("");
        let (uri, why) = hostile(&Tenant::of(&msg)).swap_remove(i);
        msg.artifacts = hostile_message(&uri).artifacts;
        let err = w
            .ingestor
            .ingest_one(&msg, &IngestContext::default())
            .await
            .unwrap_err();
        let IngestError::SummaryUnusable { reason, .. } = &err else {
            panic!("{uri}: {err:?}");
        };
        assert!(
            reason.contains("refused") && reason.contains(why),
            "{uri}: {reason}"
        );
        assert_eq!(err.disposition(), Disposition::DeadLetter, "{uri}");
        assert!(!format!("{err} {err:?}").contains("hunter2"), "{err:?}");

        let (status, details, paths): (String, String, serde_json::Value) = row_of(
            &pool,
            "SELECT status, error_details, artifact_paths FROM runs WHERE id = $1",
            msg.run_id,
        )
        .await;
        assert_eq!(status, "error", "{uri}");
        assert!(
            details.contains("refused") && details.contains(why),
            "{uri}: {details}"
        );
        assert!(!details.contains("hunter2"), "{details}");
        assert_eq!(paths, serde_json::json!({}), "{uri}: nothing stored");
        // The other artifacts were refused the same way, and the run says so.
        let warnings: serde_json::Value = value_of(
            &pool,
            "SELECT warnings FROM k6_performance_runs WHERE run_id = $1",
            msg.run_id,
        )
        .await;
        for role in ["logs", "report_html"] {
            assert!(
                warnings.as_array().unwrap().iter().any(|w| w
                    .as_str()
                    .is_some_and(|w| w.starts_with(role)
                        && w.contains("refused")
                        && w.contains(why))),
                "{uri}: {warnings}"
            );
        }
        assert!(!warnings.to_string().contains("hunter2"), "{warnings}");

        let sender_run = w
            .store
            .key_for(msg.organization_id, msg.project_id, msg.run_id, "");
        assert_eq!(
            keys_under(&w.store, &bucket, &sender_run).await,
            Vec::<String>::new(),
            "{uri}: copied under the sender's prefix"
        );
        assert_eq!(w.proxy.connections(), 0, "{uri}: a request reached S3");
    }
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM runs WHERE status = 'error'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(runs, count as i64);

    // The control: the same worker reads the sender's own staged files through the proxy.
    let msg = hostile_message("");
    let own = Tenant::of(&msg);
    put_object(
        &w.store,
        &bucket,
        &staged(&w.s, &own, "summary.json"),
        &summary_bytes(),
    )
    .await;
    let logs = std::fs::read(fixture_dir("v1.1.0", "json-logs").join("k6.log")).unwrap();
    put_object(&w.store, &bucket, &staged(&w.s, &own, "k6.log"), &logs).await;
    let mut msg = msg;
    msg.artifacts.summary = Some(s3_uri(&bucket, &staged(&w.s, &own, "summary.json")));
    msg.artifacts.logs = Some(s3_uri(&bucket, &staged(&w.s, &own, "k6.log")));
    msg.artifacts.report_html = None;
    let report = w
        .ingestor
        .ingest_one(&msg, &IngestContext::default())
        .await
        .unwrap();
    assert_eq!(report.outcome, Outcome::Ingested);
    assert_eq!(report.line.status.as_deref(), Some("passed"));
    assert!(w.proxy.connections() > 0, "the control fetched nothing");
    let key = w
        .store
        .key_for(msg.organization_id, msg.project_id, msg.run_id, "k6.log");
    assert_eq!(get_object(&w.store, &key).await, logs);
}

#[test]
fn the_default_template_is_the_staging_prefix_submit_writes() {
    let s = settings();
    assert_eq!(
        s.s3.source_templates,
        ["s3://{bucket}/{staging_prefix}/{organization_id}/{project_id}/{run_id}/"]
    );
    let tenant = Tenant {
        organization_id: Uuid::now_v7(),
        project_id: Uuid::now_v7(),
        run_id: Uuid::now_v7(),
    };
    let bucket = s.s3.bucket().unwrap();
    let scopes: Vec<String> =
        s.s3.sources()
            .unwrap()
            .scopes(&tenant)
            .iter()
            .map(ToString::to_string)
            .collect();
    assert_eq!(
        scopes,
        [format!(
            "s3://{bucket}/k6-staging/{}/{}/{}/",
            tenant.organization_id, tenant.project_id, tenant.run_id
        )]
    );
    // What submit publishes for a file of this run lies in it.
    let submitted = s3_uri(bucket, &staged(&s, &tenant, "summary.json"));
    assert!(submitted.starts_with(&scopes[0]), "{submitted}");
}

/// `k6-ingest extract` loads the settings first: a bad template stops it with status 2.
fn extract_with(templates: &str) -> std::process::Output {
    let summary = fixture_dir("v1.1.0", "json-logs").join("summary.json");
    bare_command(&["extract", summary.to_str().unwrap()])
        .env("K6_INGEST__S3__BUCKET", "k6-artifacts")
        .env("K6_INGEST__S3__SOURCE_TEMPLATES", templates)
        .output()
        .unwrap()
}

#[test]
fn bad_templates_fail_at_start_naming_the_setting() {
    for (templates, why) in [
        ("s3://{bucket}/{staging_prefix}/", "{organization_id}"),
        ("s3://{bucket}/{organization_id}/{project_id}", "end in '/'"),
        (
            "s3://{bucket}/{organization_id}/{project_id}/{tenant_id}/",
            "placeholder",
        ),
        ("s3://{bucket}/../{organization_id}/{project_id}/", "'..'"),
        // One bad entry in a list is enough.
        (
            "s3://{bucket}/{organization_id}/{project_id}/,s3://other/x/",
            "{organization_id}",
        ),
    ] {
        let out = extract_with(templates);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{templates}: {err}");
        assert!(
            err.contains("s3.source_templates")
                && err.contains("K6_INGEST__S3__SOURCE_TEMPLATES")
                && err.contains(why),
            "{templates}: {err}"
        );
    }
    // A comma-separated list, each entry valid: as one string it would not be.
    let out = extract_with(
        "s3://{bucket}/{staging_prefix}/{organization_id}/{project_id}/,s3://k6-{organization_id}/{project_id}/",
    );
    assert_success(&out);
}

#[test]
fn submit_publishes_uris_the_worker_accepts_whatever_the_file_names() {
    let s = settings();
    let dir = tempfile::tempdir().unwrap();
    let summary = fixture_dir("v1.1.0", "json-logs").join("summary.json");
    // Names that would need encoding, or decode into something else, in a URI.
    std::fs::copy(&summary, dir.path().join("summary 100%.json")).unwrap();
    std::fs::write(dir.path().join("k6#1?.log"), b"log\n").unwrap();
    std::fs::write(dir.path().join("..metrics%2e%2e.ndjson"), b"").unwrap();
    let tenant = Tenant {
        organization_id: Uuid::now_v7(),
        project_id: Uuid::now_v7(),
        run_id: Uuid::now_v7(),
    };
    let out = Command::new(env!("CARGO_BIN_EXE_k6-ingest"))
        .current_dir(dir.path())
        .args(["submit", "--dry-run", "--exit-code", "0"])
        .args(["--summary", "summary 100%.json", "--logs", "k6#1?.log"])
        .args(["--metrics", "..metrics%2e%2e.ndjson"])
        .args(["--run-id", &tenant.run_id.to_string()])
        .args(["--test-id", &Uuid::now_v7().to_string()])
        .args(["--organization-id", &tenant.organization_id.to_string()])
        .args(["--project-id", &tenant.project_id.to_string()])
        .env("K6_INGEST__S3__BUCKET", s.s3.bucket().unwrap())
        .env("K6_INGEST__LOG__LEVEL", "warn")
        .output()
        .unwrap();
    assert_success(&out);
    let msg: RunCompleted = serde_json::from_slice(&out.stdout).unwrap();
    let sources = s.s3.sources().unwrap();
    let mut names = Vec::new();
    for uri in [
        &msg.artifacts.summary,
        &msg.artifacts.logs,
        &msg.artifacts.metrics,
    ] {
        let uri = uri.as_deref().unwrap();
        let (bucket, key) = sources
            .admit(uri, &tenant)
            .unwrap_or_else(|e| panic!("{uri}: {e}"));
        assert_eq!(bucket, s.s3.bucket().unwrap());
        names.push(key.rsplit('/').next().unwrap().to_string());
    }
    assert_eq!(
        names,
        ["summary_100_.json", "k6_1_.log", "metrics_2e_2e.ndjson"]
    );
}

#[test]
fn replay_shows_no_credentials_in_its_table_or_logs() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let root = tempfile::tempdir().unwrap();
    let with_summary = |name: &str, uri: String| {
        let dir = root.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        let mut msg: serde_json::Value = serde_json::from_slice(
            &std::fs::read(fixture_dir("v1.1.0", "json-logs").join("message.json")).unwrap(),
        )
        .unwrap();
        msg["run_id"] = Uuid::now_v7().to_string().into();
        msg["artifacts"] = serde_json::json!({ "summary": uri });
        std::fs::write(dir.join("message.json"), msg.to_string()).unwrap();
    };
    with_summary(
        "a-s3",
        "s3://runner:hunter2@k6-artifacts/k6-staging/x/summary.json".into(),
    );
    with_summary(
        "b-http",
        format!("http://runner:hunter2@{closed}/summary.json?X-Amz-Signature=sig-456"),
    );
    // And one that is fetched: the request goes through every log line there is.
    let host = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let served = host.local_addr().unwrap();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        let body = summary_bytes();
        while let Ok((mut socket, _)) = host.accept() {
            let mut request = [0u8; 4096];
            let _ = socket.read(&mut request);
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = socket.write_all(head.as_bytes());
            let _ = socket.write_all(&body);
        }
    });
    with_summary(
        "c-http-ok",
        format!("http://runner:hunter2@{served}/summary.json?X-Amz-Signature=sig-456"),
    );

    let mut cmd = Command::new(env!("CARGO_BIN_EXE_k6-ingest"));
    for (k, _) in std::env::vars() {
        if k.starts_with("K6_INGEST") {
            cmd.env_remove(k);
        }
    }
    let out = cmd
        .args(["replay", "--dry-run", root.path().to_str().unwrap()])
        .env(
            "K6_INGEST__FETCH__ALLOWED_HOSTS",
            format!("{closed},{served}"),
        )
        .env("K6_INGEST__LOG__LEVEL", "trace")
        .env("K6_INGEST__LOG__FORMAT", "json")
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    let logs = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{table}{logs}");
    assert!(
        table.contains("s3://k6-artifacts/k6-staging/x/summary.json refused: credentials"),
        "{table}"
    );
    assert!(
        table.contains(&format!(
            "http://{closed}/summary.json?X-Amz-Signature=REDACTED"
        )) && table.contains("transient"),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("dry run") && l.contains("c-http-ok"))
            && table.contains("1 dry run, 2 failed"),
        "{table}"
    );
    for secret in ["hunter2", "sig-456"] {
        assert!(!table.contains(secret), "{table}");
        assert!(!logs.contains(secret), "{logs}");
    }
}
