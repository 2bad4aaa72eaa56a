#!/usr/bin/env bash
# queue-throughput.sh — runs consumed per second through RabbitMQ, for a given prefetch.
#
#   scripts/queue-throughput.sh [PREFETCH] [MESSAGES]      # defaults: 8 and 300
#
# Publishes MESSAGES distinct runs (the v1.1.0 fixtures with fresh run ids) to queues of
# their own, starts `k6-ingest consume` with amqp.prefetch = amqp.concurrency = PREFETCH,
# and times it until every run is in a fresh database: from the worker's start, and
# steady (from the first run's write to the last one's). Uses the services of
# scripts/services-up.sh and the binary in ${CARGO_TARGET_DIR:-target}/${PROFILE:-debug}.
# Also prints the worker's CPU time (utime+stime) and peak RSS (VmHWM) when the last run
# is in, read from /proc before it is stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
prefetch=${1:-8}
count=${2:-300}
eval "$(scripts/services-up.sh 2>/dev/null)"
export ERL_EPMD_ADDRESS=127.0.0.1
bin="${CARGO_TARGET_DIR:-target}/${PROFILE:-debug}/k6-ingest"
[ -x "$bin" ] || { echo "build first: cargo build ${PROFILE:+--profile $PROFILE}" >&2; exit 1; }

# QT_TAG names the database, queues and S3 prefix (for a caller that cleans up after);
# QT_DB_CONNECTIONS sets database.max_connections (default: the worker's own, 10). A run
# holds a connection only for its lookup and its store transaction; at prefetch 32 on
# this 2-core machine, 34 connections gave 272, 303 and 275 runs/s where 10 gave 311,
# 294 and 315 (interleaved): PostgreSQL spends more per transaction with more backends.
tag="${QT_TAG:-bench$(date +%s%N | tail -c 9)}"
db="k6_queue_${tag}"
work=$(mktemp -d)
# The runs' objects go too: thousands left behind per run of this script slowed the local
# S3 server tenfold. (boto3 when Python has it; otherwise they stay, with a word.)
remove_objects() {
    python3 - "$tag" <<'PY' 2>/dev/null || echo "queue-throughput: objects under s3 prefix $tag left in place" >&2
import os, sys, boto3
s3 = boto3.client("s3", endpoint_url=os.environ["K6_INGEST__S3__ENDPOINT"], region_name=os.environ.get("AWS_REGION", "us-east-1"))
bucket = os.environ["K6_INGEST__S3__BUCKET"]
for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=sys.argv[1] + "/"):
    keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
    if keys:
        s3.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
PY
}
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$work"; psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1 || true; [ -n "${QT_TAG:-}" ] || remove_objects' EXIT
psql -h 127.0.0.1 -U postgres -qc "CREATE DATABASE $db"
export K6_INGEST__DATABASE__URL="postgres://postgres@127.0.0.1:5432/$db"
export K6_INGEST__AMQP__EXCHANGE="$tag.runs" K6_INGEST__AMQP__QUEUE="$tag.work"
export K6_INGEST__AMQP__PREFETCH="$prefetch" K6_INGEST__AMQP__CONCURRENCY="$prefetch"
[ -z "${QT_DB_CONNECTIONS:-}" ] || export K6_INGEST__DATABASE__MAX_CONNECTIONS="$QT_DB_CONNECTIONS"
export K6_INGEST__S3__PREFIX="$tag" K6_INGEST__FETCH__ALLOWED_ROOTS="$PWD/fixtures"
export K6_INGEST__HTTP__BIND=127.0.0.1:0 K6_INGEST__LOG__LEVEL=warn
"$bin" migrate >/dev/null

python3 - "$PWD/fixtures/k6/v1.1.0" "$count" >"$work/runs.ndjson" <<'PY'
import json, os, sys, uuid
root, count = sys.argv[1], int(sys.argv[2])
cases = sorted(c for c in os.listdir(root) if os.path.isfile(os.path.join(root, c, "summary.json")))
for i in range(count):
    d = os.path.join(root, cases[i % len(cases)])
    m = json.load(open(os.path.join(d, "message.json")))
    m["run_id"], m["event_id"] = str(uuid.uuid4()), str(uuid.uuid4())
    m["artifacts"] = {k: "file://" + os.path.join(d, v) for k, v in m["artifacts"].items()}
    print(json.dumps(m))
PY
"$bin" publish "$work/runs.ndjson"

start=$(date +%s.%N)
"$bin" consume 2>"$work/consume.log" &
pid=$!
# One session polls inside the database: a psql (and a server backend) started every
# 0.1 s took about a tenth of this 2-core machine away from the worker being measured.
# When the last run is in it reads the times from the rows themselves: each
# k6_performance_runs row's created_at is the start of the statement that wrote it, so
# the poll can be slow (4 a second: its count of a growing table was PostgreSQL CPU the
# worker did not cause) without the end time being late by up to a poll. Each count
# commits before the sleep: one transaction around the whole wait held a lock on
# k6_performance_runs that the worker's creation of a missing month's partitions waits
# for, and no run was ever stored (the fixtures' month has no partitions in a database
# migrated after it ended).
psql -h 127.0.0.1 -U postgres -d "$db" -qAt -F ' ' >"$work/end" <<SQL &
DO \$\$ BEGIN
    WHILE (SELECT count(*) FROM k6_performance_runs) < $count LOOP COMMIT; PERFORM pg_sleep(0.25); END LOOP;
END \$\$;
SELECT extract(epoch FROM min(created_at)), extract(epoch FROM max(created_at)) FROM k6_performance_runs;
SQL
poller=$!
while kill -0 "$poller" 2>/dev/null; do
    kill -0 "$pid" 2>/dev/null || { kill "$poller"; cat "$work/consume.log" >&2; exit 1; }
    sleep 0.1
done
wait "$poller"
read -r first end < <(tail -n 1 "$work/end")
cpu_ticks=$(sed 's/^.*) //' "/proc/$pid/stat" | awk '{print $12 + $13}')
hwm_kib=$(awk '/^VmHWM:/ {print $2}' "/proc/$pid/status")
kill -TERM "$pid"
wait "$pid"
rabbitmqctl -q list_queues name 2>/dev/null | grep "^$tag\." | while read -r q; do rabbitmqctl -q delete_queue "$q" </dev/null >/dev/null; done || true
# Two rates: from the worker's start (its start-up, connections and the first runs'
# statement preparation included) and steady, from the first run's write to the last
# one's, as the ceilings' loops are timed.
python3 -c "import sys; a,f,e=map(float,sys.argv[1:4]); n=int(sys.argv[4]); print(f'prefetch {sys.argv[5]}: {n} runs in {e-a:.2f} s = {n/(e-a):.0f} runs/s; steady {n-1} runs in {e-f:.2f} s = {(n-1)/(e-f):.0f} runs/s')" "$start" "$first" "$end" "$count" "$prefetch"
python3 -c "import sys; t=int(sys.argv[1])/int(sys.argv[2]); n=int(sys.argv[3]); print(f'worker: CPU {t:.2f} s = {t*1000/n:.2f} ms/run; peak RSS {int(sys.argv[4])/1024:.1f} MiB')" "$cpu_ticks" "$(getconf CLK_TCK)" "$count" "$hwm_kib"
