//! Migrations once released never change, and each new one applies to a database the
//! previous schema filled: a deployed database has rows, and the checksums sqlx records
//! would refuse an edited file anyway, at the worst moment (the next deploy).

mod harness;

use std::collections::BTreeMap;
use std::path::Path;

use harness::*;
use k6_ingest::db::MIGRATOR;
use sqlx::migrate::Migrator;
use sqlx::{PgPool, Row};
use uuid::Uuid;

fn migrations_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"))
}

/// `migrations/CHECKSUMS`: `<sha256 hex>  <file name>` per line (`sha256sum` output).
fn listed_checksums() -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(migrations_dir().join("CHECKSUMS"))
        .expect("migrations/CHECKSUMS exists");
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let (sum, name) = l
                .split_once("  ")
                .unwrap_or_else(|| panic!("CHECKSUMS line is not `<sha256>  <file>`: {l:?}"));
            (name.to_string(), sum.to_string())
        })
        .collect()
}

/// Every released migration is listed with its checksum, and no listed file changed or
/// disappeared. A new migration must be added (`sha256sum *.sql > CHECKSUMS` in
/// `migrations/`); an edited one fails here instead of at a deploy.
#[sqlx::test(migrations = false)]
async fn released_migrations_are_unchanged_and_every_file_is_listed(pool: PgPool) {
    let listed = listed_checksums();
    let mut on_disk = BTreeMap::new();
    for entry in std::fs::read_dir(migrations_dir()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.ends_with(".sql") {
            on_disk.insert(name, std::fs::read(&path).unwrap());
        }
    }
    assert!(on_disk.len() >= 2, "{:?}", on_disk.keys());
    for name in on_disk.keys() {
        assert!(
            listed.contains_key(name),
            "migration {name} has no entry in migrations/CHECKSUMS"
        );
    }
    for (name, sum) in &listed {
        let bytes = on_disk
            .get(name)
            .unwrap_or_else(|| panic!("released migration {name} disappeared"));
        // SHA-256 computed by PostgreSQL: no hashing crate needed for one test.
        let actual: String = value_of(&pool, "SELECT encode(sha256($1), 'hex')", bytes).await;
        assert_eq!(&actual, sum, "released migration {name} was edited");
    }
    // The embedded migrator carries exactly the files on disk.
    assert_eq!(MIGRATOR.iter().count(), on_disk.len());
}

/// A generated column needs IMMUTABLE functions; these are the ones the key hashes use.
#[sqlx::test(migrations = false)]
async fn the_key_hash_functions_are_immutable(pool: PgPool) {
    for (name, args) in [
        ("sha256", "bytea"),
        ("replace", "text, text, text"),
        ("textout", "text"),
        ("byteain", "cstring"),
        ("byteacat", "bytea, bytea"),
    ] {
        let volatility: String = sqlx::query_scalar(
            "SELECT provolatile::text FROM pg_proc WHERE oid = to_regprocedure($1)",
        )
        .bind(format!("{name}({args})"))
        .fetch_one(&pool)
        .await
        .unwrap_or_else(|e| panic!("{name}({args}): {e}"));
        assert_eq!(volatility, "i", "{name}({args}) is not IMMUTABLE");
    }
}

/// The schema of version 1 with rows in it, then the key-hash migration: every row
/// keeps its values and gets the hash of its key's UTF-8 bytes; afterwards keys far
/// above the old btree limit are stored.
#[sqlx::test(migrations = false)]
async fn key_hashes_apply_to_a_database_filled_by_the_first_schema(pool: PgPool) {
    // The first released migration alone, as a deployed database has it.
    let old = tempfile::tempdir().unwrap();
    let first_file = listed_checksums().into_keys().next().unwrap();
    std::fs::copy(
        migrations_dir().join(&first_file),
        old.path().join(&first_file),
    )
    .unwrap();
    let first = Migrator::new(old.path()).await.unwrap();
    assert_eq!(first.iter().count(), 1);
    first.run(&pool).await.unwrap();

    let run_id = Uuid::now_v7();
    let k6_run_id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO runs (id, organization_id, project_id, status) VALUES ($1, $2, $3, 'passed')",
    )
    .bind(run_id)
    .bind(Uuid::now_v7())
    .bind(Uuid::now_v7())
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO k6_performance_runs (id, run_id, test_id, organization_id, project_id, status, started_at) \
         VALUES ($1, $2, $3, $3, $3, 'passed', now())",
    )
    .bind(k6_run_id)
    .bind(run_id)
    .bind(Uuid::now_v7())
    .execute(&pool)
    .await
    .unwrap();
    // Names a naive text-to-bytea cast would confuse: `\x41` reads as the byte 'A'.
    let names = ["A", r"\x41", r"a\\b", "http_req_duration{status:200}", "é"];
    for (i, name) in names.iter().enumerate() {
        sqlx::query(
            "INSERT INTO k6_metrics_history (id, k6_run_id, metric_name, base_name, scale, value) \
             VALUES ($1, $2, $3, $3, 1000, $4)",
        )
        .bind(Uuid::now_v7())
        .bind(k6_run_id)
        .bind(name)
        .bind(i as i64)
        .execute(&pool)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO k6_threshold_results (id, k6_run_id, metric_name, base_name, expression, ok) \
             VALUES ($1, $2, $3, $3, 'p(95)<1', true)",
        )
        .bind(Uuid::now_v7())
        .bind(k6_run_id)
        .bind(name)
        .execute(&pool)
        .await
        .unwrap();
    }

    MIGRATOR.run(&pool).await.unwrap();

    let rows = sqlx::query(
        "SELECT metric_name, value, metric_key_hash = sha256(convert_to(metric_name, 'UTF8')) \
         FROM k6_metrics_history ORDER BY value",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), names.len());
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(r.get::<String, _>(0), names[i]);
        assert_eq!(r.get::<i64, _>(1), i as i64);
        assert!(
            r.get::<bool, _>(2),
            "hash of {:?} is not its UTF-8 bytes' SHA-256",
            names[i]
        );
    }
    let distinct: i64 =
        sqlx::query_scalar("SELECT count(DISTINCT threshold_key_hash) FROM k6_threshold_results")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(distinct, names.len() as i64);
    let exact: bool = sqlx::query_scalar(
        "SELECT bool_and(threshold_key_hash = sha256(convert_to(metric_name, 'UTF8') || '\\x00'::bytea \
         || convert_to(expression, 'UTF8'))) FROM k6_threshold_results",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(exact);

    // Keys of any length now; the same key twice in a run is still refused.
    let long = "m".repeat(10_000);
    let insert_long = || {
        sqlx::query(
            // Since version 3 a detail row carries its run's `started_at` (the partition key).
            "INSERT INTO k6_metrics_history (id, k6_run_id, metric_name, base_name, scale, started_at) \
             SELECT $1, $2, $3, 'm', 1, started_at FROM k6_performance_runs WHERE id = $2",
        )
        .bind(Uuid::now_v7())
        .bind(k6_run_id)
        .bind(&long)
    };
    insert_long().execute(&pool).await.unwrap();
    let dup = insert_long().execute(&pool).await.unwrap_err();
    // Since version 3 PostgreSQL names the month partition's index, a child of the key.
    let constraint = dup
        .as_database_error()
        .and_then(|d| d.constraint())
        .expect("a unique violation names its constraint");
    let parent: String = value_of(
        &pool,
        "SELECT i.inhparent::regclass::text FROM pg_inherits i WHERE i.inhrelid = $1::regclass",
        constraint,
    )
    .await;
    assert_eq!(parent, "k6_metrics_history_run_metric_hash_key");
    let long_expr = format!("p(95)<{}", "9".repeat(10_000));
    sqlx::query(
        "INSERT INTO k6_threshold_results (id, k6_run_id, metric_name, base_name, expression, ok, started_at) \
         SELECT $1, $2, $3, 'm', $4, true, started_at FROM k6_performance_runs WHERE id = $2",
    )
    .bind(Uuid::now_v7())
    .bind(k6_run_id)
    .bind(&long)
    .bind(&long_expr)
    .execute(&pool)
    .await
    .unwrap();
    // The name lookup index is a hash index: it stores a hash, whatever the length.
    let method: String = sqlx::query_scalar(
        "SELECT am.amname::text FROM pg_class c JOIN pg_am am ON am.oid = c.relam \
         WHERE c.relname = 'k6_metrics_metric_name_idx'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(method, "hash");
}
