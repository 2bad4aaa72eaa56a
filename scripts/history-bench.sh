#!/usr/bin/env bash
# history-bench.sh: the partitioned schema against the unpartitioned one, same data.
#
#   eval "$(scripts/services-up.sh)"     # PostgreSQL and S3 as the tests use them
#   N=200000 scripts/history-bench.sh    # N detail rows over 12 months (default 10,000,000)
#
# Two scratch databases are filled with the same generated history (INSERT ... SELECT
# generate_series, not the worker: this measures the schema, not the ingest pipeline):
#   * k6_bench_part: every migration (`k6-ingest migrate`), partitioned by month;
#   * k6_bench_flat: the released migrations before partitioning (version 2), one heap
#     per table.
# A run has 58 metric, 45 threshold and 44 check rows (the measured average), 20
# projects, 2 locations, runs spread evenly over 2025-01 .. 2025-12.
#
# Reported, for both: bulk insert rate (detail rows/s), table+index size, the latency of
# the dashboard's questions (pgbench, 1 client, BENCH_SECS each): latest runs of a project
# in a location, p95 of a test over a month, one metric of a test over a month; then the
# time and bytes to archive and restore one month (partitioned: `k6-ingest archive` and
# `restore`, S3 included) against deleting that month from the flat tables.
#
# Knobs: N, BENCH_SECS (10), PGBENCH_MODE (simple: planned on every call, as a client
# sending unnamed statements does; "prepared" to reuse plans), K6_INGEST_BIN (target/release/k6-ingest if built, else
# target/debug/k6-ingest), KEEP=1 keeps the databases. Needs psql, pgbench, PG* or
# DATABASE_URL pointing at a server where the user may create databases.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

N=${N:-10000000}
BENCH_SECS=${BENCH_SECS:-10}
PGBENCH_MODE=${PGBENCH_MODE:-simple}
BASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
SERVER=${BASE_URL%/*}
if [[ -z ${K6_INGEST_BIN:-} ]]; then
    if [[ -x target/release/k6-ingest ]]; then K6_INGEST_BIN=target/release/k6-ingest; else K6_INGEST_BIN=target/debug/k6-ingest; fi
fi
DETAIL_PER_RUN=147
RUNS=$(((N + DETAIL_PER_RUN - 1) / DETAIL_PER_RUN))
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

say() { printf '%s\n' "$*"; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }
rate() { awk -v n="$1" -v s="$2" 'BEGIN { printf "%.0f", (s > 0 ? n / s : 0) }'; }
q() { psql -X -q -v ON_ERROR_STOP=1 -At "$SERVER/$1" -c "$2"; }

say "history-bench: N=$N detail rows ($RUNS runs) over 12 months; binary $K6_INGEST_BIN"

for db in k6_bench_part k6_bench_flat; do
    psql -X -q "$SERVER/postgres" -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db"
done
K6_INGEST__DATABASE__URL="$SERVER/k6_bench_part" "$K6_INGEST_BIN" migrate >/dev/null
for f in migrations/2026112*.sql migrations/20261130*.sql; do
    psql -X -q -v ON_ERROR_STOP=1 "$SERVER/k6_bench_flat" -f "$f" >/dev/null
done
# The partitions of 2025 exist before the load, as the partitions CronJob makes them.
q k6_bench_part "SELECT k6_ensure_month(d::date) FROM generate_series('2025-01-01'::date, '2025-12-01', '1 month') d" >/dev/null

# fill DB DETAIL_STARTED_AT: the SQL that generates the history. $2 is ", started_at" for
# the partitioned detail tables and empty for the flat ones.
fill() {
    local db=$1 sa=$2 psa=${2:+, p.started_at}
    local t0
    t0=$(now)
    q "$db" "
      INSERT INTO runs (id, test_id, organization_id, project_id, status, started_at, completed_at, location)
      SELECT md5('run' || g)::uuid, md5('test' || (g % 200))::uuid, md5('org' || (g % 5))::uuid,
             md5('project' || (g % 20))::uuid, 'passed',
             timestamptz '2025-01-01 00:00:00+00' + ((g - 1)::double precision / $RUNS) * interval '365 days',
             timestamptz '2025-01-01 00:00:00+00' + ((g - 1)::double precision / $RUNS) * interval '365 days' + interval '5 minutes',
             CASE WHEN g % 2 = 0 THEN 'us-east' ELSE 'eu-west' END
      FROM generate_series(1, $RUNS) g;
      INSERT INTO k6_performance_runs (id, run_id, test_id, organization_id, project_id, location, status,
             started_at, completed_at, duration_ms, total_requests, p95_response_time_ms, summary_format,
             summary_json)
      SELECT md5('k6' || r.id)::uuid, r.id, r.test_id, r.organization_id, r.project_id, r.location, 'passed',
             r.started_at, r.completed_at, 300000, 10000, (random() * 800)::bigint, 'handle_summary',
             jsonb_build_object('metrics', jsonb_build_object('http_reqs', jsonb_build_object('count', 10000)))
      FROM runs r;"
    local t_runs
    t_runs=$(elapsed "$t0")
    t0=$(now)
    q "$db" "
      INSERT INTO k6_metrics_history (id, k6_run_id, metric_name, base_name, metric_type, contains, tags, scale,
             value, count, rate, avg_value, min_value, max_value, med_value, p90_value, p95_value, p99_value,
             percentiles, raw_values, recorded_at$sa)
      SELECT gen_random_uuid(), p.id, CASE WHEN g = 1 THEN 'http_req_duration' ELSE 'metric_' || g END,
             'metric_' || g, 'trend', 'time', jsonb_build_object('g', g), 1000, g * 10, 1000, 0,
             (random() * 1e6)::bigint, 1, 2000000, 500000, 900000, 950000, 990000,
             '{\"p(95)\": 950000}'::jsonb, '{\"avg\": 500.5, \"p(95)\": 950.0}'::jsonb, p.completed_at$psa
      FROM k6_performance_runs p, generate_series(1, 58) g;
      INSERT INTO k6_threshold_results (id, k6_run_id, metric_name, base_name, expression, ok, aggregation,
             observed_value, observed_scale, observed_raw, observed_source$sa)
      SELECT gen_random_uuid(), p.id, 'metric_' || (g % 58 + 1), 'metric_' || (g % 58 + 1), 'p(95)<' || g,
             g % 7 <> 0, 'p(95)', 950000, 1000, 950.0, 'summary'$psa
      FROM k6_performance_runs p, generate_series(1, 45) g;
      INSERT INTO k6_check_results (id, k6_run_id, position, group_path, path, name, passes, fails$sa)
      SELECT gen_random_uuid(), p.id, g, ARRAY['group ' || (g % 4)], '::group ' || (g % 4) || '::check ' || g,
             'check ' || g, 100, g % 3$psa
      FROM k6_performance_runs p, generate_series(1, 44) g;"
    local t_detail
    t_detail=$(elapsed "$t0")
    q "$db" "VACUUM ANALYZE" >/dev/null
    local rows size
    rows=$(q "$db" "SELECT (SELECT count(*) FROM k6_metrics_history) + (SELECT count(*) FROM k6_threshold_results) + (SELECT count(*) FROM k6_check_results)")
    size=$(q "$db" "SELECT pg_size_pretty(sum(pg_total_relation_size(c.oid))) FROM pg_class c WHERE c.relkind = 'r' AND c.relname ~ '^(runs|k6_)'")
    say "$db: $rows detail rows; runs+k6 rows ${t_runs}s; detail rows ${t_detail}s = $(rate "$rows" "$t_detail") rows/s; size $size"
}

fill k6_bench_part ", started_at"
fill k6_bench_flat ""

# The dashboard's questions, with pgbench picking a project / test each time.
cat >"$WORK/latest.sql" <<'EOF'
\set p random(0, 19)
SELECT run_id, status, started_at, p95_response_time_ms FROM k6_performance_runs
WHERE project_id = md5('project' || :p)::uuid AND location = 'us-east'
ORDER BY started_at DESC LIMIT 20;
EOF
cat >"$WORK/p95.sql" <<'EOF'
\set t random(0, 199)
\set m random(2, 11)
SELECT date_trunc('day', started_at) AS day, avg(p95_response_time_ms) FROM k6_performance_runs
WHERE test_id = md5('test' || :t)::uuid
  AND started_at >= make_timestamptz(2025, :m, 1, 0, 0, 0, 'UTC')
  AND started_at < make_timestamptz(2025, :m + 1, 1, 0, 0, 0, 'UTC')
GROUP BY 1 ORDER BY 1;
EOF
# The partitioned form names the month on the detail table too: PostgreSQL does not carry
# a range through the join's equality, and without it every month's metrics are read.
metric_sql() {
    local extra=$1
    cat <<EOF
\\set t random(0, 199)
\\set m random(2, 11)
SELECT p.started_at, m.p95_value FROM k6_performance_runs p
JOIN k6_metrics_history m ON m.k6_run_id = p.id
WHERE p.test_id = md5('test' || :t)::uuid AND m.metric_name = 'http_req_duration'
  AND p.started_at >= make_timestamptz(2025, :m, 1, 0, 0, 0, 'UTC')
  AND p.started_at < make_timestamptz(2025, :m + 1, 1, 0, 0, 0, 'UTC') $extra
ORDER BY 1;
EOF
}
metric_sql "AND m.started_at = p.started_at
  AND m.started_at >= make_timestamptz(2025, :m, 1, 0, 0, 0, 'UTC')
  AND m.started_at < make_timestamptz(2025, :m + 1, 1, 0, 0, 0, 'UTC')" >"$WORK/metric-part.sql"
metric_sql "" >"$WORK/metric-flat.sql"

bench() {
    local db=$1 file=$2 label=$3
    local lat
    lat=$(pgbench -n -M "$PGBENCH_MODE" -c 1 -T "$BENCH_SECS" -f "$file" "$SERVER/$db" 2>/dev/null | awk -F'= ' '/latency average/ { print $2 }')
    say "$db: $label: latency average $lat"
}
for db in k6_bench_part k6_bench_flat; do
    bench "$db" "$WORK/latest.sql" "latest 20 runs of a project in a location"
    bench "$db" "$WORK/p95.sql" "p95 of a test over a month"
    if [[ $db == k6_bench_part ]]; then
        bench "$db" "$WORK/metric-part.sql" "one metric of a test over a month"
    else
        bench "$db" "$WORK/metric-flat.sql" "one metric of a test over a month"
    fi
done

# Retention of one month (2025-01, the oldest: `--before 2025-02-01` archives it alone).
month_rows=$(q k6_bench_part "SELECT (SELECT count(*) FROM k6_metrics_history_y2025m01) + (SELECT count(*) FROM k6_threshold_results_y2025m01) + (SELECT count(*) FROM k6_check_results_y2025m01)")
prefix="history-bench-$$"
t0=$(now)
out=$(K6_INGEST__DATABASE__URL="$SERVER/k6_bench_part" K6_INGEST__S3__PREFIX="$prefix" K6_INGEST__LOG__LEVEL=warn \
    "$K6_INGEST_BIN" archive --before 2025-02-01 2>&1 | grep 2025-01 || true)
t_archive=$(elapsed "$t0")
say "k6_bench_part: archive 2025-01 ($month_rows detail rows): ${t_archive}s; $out"
t0=$(now)
K6_INGEST__DATABASE__URL="$SERVER/k6_bench_part" K6_INGEST__S3__PREFIX="$prefix" K6_INGEST__LOG__LEVEL=warn \
    "$K6_INGEST_BIN" restore 2025-01 >/dev/null
say "k6_bench_part: restore 2025-01: $(elapsed "$t0")s"
t0=$(now)
q k6_bench_flat "DELETE FROM k6_performance_runs WHERE started_at >= '2025-01-01 00:00:00+00' AND started_at < '2025-02-01 00:00:00+00'"
say "k6_bench_flat: delete 2025-01 (cascading to its details): $(elapsed "$t0")s (space stays until VACUUM; no archive)"

if [[ -z ${KEEP:-} ]]; then
    for db in k6_bench_part k6_bench_flat; do
        psql -X -q "$SERVER/postgres" -c "DROP DATABASE IF EXISTS $db"
    done
fi
