#!/usr/bin/env bash
# soak.sh N — N runs through two workers while their dependencies fail, then proof that
# every run is stored exactly once and nothing was dead-lettered.
#
# On DEDICATED instances (never the shared services): a PostgreSQL cluster on
# 127.0.0.1:$SOAK_PG_PORT (initdb under INFRA_HOME), an s3s-fs on $SOAK_S3_PORT and a
# RabbitMQ node k6soak@localhost on $SOAK_AMQP_PORT. A backlog of N messages (unique
# run_id/event_id, made from the bundled fixtures, file:// artifacts) is published up
# front; two `k6-ingest consume` processes drain it while the script, in turn:
#   an S3 outage (s3s-fs stopped for SOAK_OUTAGE_SECS, then started again), with a
#     worker SIGKILL (and restart) halfway through it;
#   a PostgreSQL outage (pg_ctl stop, SOAK_OUTAGE_SECS, pg_ctl start), with a RabbitMQ
#     restart (stop_app / start_app) halfway through it;
#   a SIGKILL (and restart) of the other worker while the backlog drains.
# Then it checks in SQL and in the broker: N distinct runs, N k6_performance_runs rows,
# no duplicates, 0 dead letters, retry queues empty; both workers exit 0 on SIGTERM.
# One summary line on stdout; exit status non-zero on any failure. Everything it started
# is stopped on exit, also on failure (logs are kept then, and their directory printed).
#
#   scripts/soak.sh 5000                              # debug build, 60 s outages
#   SOAK_PROFILE=release SOAK_OUTAGE_SECS=60 scripts/soak.sh 5000
#   SOAK_OUTAGE_SECS=8 scripts/soak.sh 200            # what scripts/test.sh runs
#
# Knobs (env): SOAK_OUTAGE_SECS (60), SOAK_PROFILE (debug|release), INFRA_HOME
# (/var/tmp/k6-ingest-services), SOAK_PG_PORT (5433), SOAK_S3_PORT (8015),
# SOAK_AMQP_PORT (5673), SOAK_DIST_PORT (25673), SOAK_HTTP_PORT (8091: worker 1; 8092: worker 2),
# SOAK_DRAIN_TIMEOUT_SECS (900). Needs root (PostgreSQL and RabbitMQ run as their users).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
export PATH="$HOME/.cargo/bin:$PATH"
export ERL_EPMD_ADDRESS=127.0.0.1

N=${1:?usage: scripts/soak.sh N}
[[ $N =~ ^[1-9][0-9]*$ ]] || { echo "soak: N must be a positive integer" >&2; exit 2; }
: "${SOAK_OUTAGE_SECS:=60}"
: "${SOAK_PROFILE:=debug}"
: "${INFRA_HOME:=/var/tmp/k6-ingest-services}"
: "${SOAK_PG_PORT:=5433}"
: "${SOAK_S3_PORT:=8015}"
: "${SOAK_AMQP_PORT:=5673}"
: "${SOAK_DIST_PORT:=25673}"
: "${SOAK_HTTP_PORT:=8091}"
: "${SOAK_DRAIN_TIMEOUT_SECS:=900}"
S3_AK=soak-access-key
S3_SK=soak-secret-key
BUCKET=k6-soak
NODE=k6soak@localhost
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)

START=$SECONDS
DIR="$INFRA_HOME/soak.$$"
log() { printf '[soak %(%H:%M:%S)T +%ss] %s\n' -1 "$((SECONDS - START))" "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_for() { # wait_for WHAT TIMEOUT_S CMD...
    local what=$1 timeout=$2
    shift 2
    local end=$((SECONDS + timeout))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < end)) || die "timed out after ${timeout}s waiting for $what"
        sleep 0.5
    done
}

[ "$(id -u)" = 0 ] || die "run as root (the dedicated PostgreSQL and RabbitMQ run as their users)"
for p in "$SOAK_PG_PORT" "$SOAK_S3_PORT" "$SOAK_AMQP_PORT" "$SOAK_DIST_PORT" "$SOAK_HTTP_PORT" "$((SOAK_HTTP_PORT + 1))"; do
    port_open "$p" && die "port $p is taken; set the SOAK_*_PORT variables"
done
mkdir -p "$DIR"
log "state in $DIR"

# ------------------------------------------------------------------ cleanup
declare -A WORKER_PID=()
S3_PID=""
PG_STARTED=0
RMQ_STARTED=0
OK=0
cleanup() {
    local p
    for p in "${WORKER_PID[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
    [ -n "$S3_PID" ] && kill "$S3_PID" 2>/dev/null || true
    if [ "$RMQ_STARTED" = 1 ]; then rmq -q stop >/dev/null 2>&1 || true; fi
    if [ "$PG_STARTED" = 1 ]; then pg stop -m immediate >/dev/null 2>&1 || true; fi
    if [ "$OK" = 1 ]; then
        rm -rf "$DIR"
    else
        log "logs kept in $DIR"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ------------------------------------------------------------------ build
if [ "$SOAK_PROFILE" = release ]; then
    log "cargo build --release"
    cargo build --locked --release --bin k6-ingest >&2
    BIN="$REPO/target/release/k6-ingest"
else
    log "cargo build"
    cargo build --locked --bin k6-ingest >&2
    BIN="$REPO/target/debug/k6-ingest"
fi

# ------------------------------------------------------------------ PostgreSQL
pg() { su postgres -s /bin/sh -c "$PGBIN/pg_ctl -D '$DIR/pg' -l '$DIR/pglog/pg.log' -o '-p $SOAK_PG_PORT -k /tmp -c listen_addresses=127.0.0.1' -w $*"; }
install -d -o postgres -g postgres "$DIR/pg" "$DIR/pglog"
su postgres -s /bin/sh -c "$PGBIN/initdb -D '$DIR/pg' -U postgres -A trust --no-sync" >"$DIR/initdb.log" 2>&1 ||
    die "initdb failed (see $DIR/initdb.log)"
pg start >&2
PG_STARTED=1
PSQL=(psql -h 127.0.0.1 -p "$SOAK_PG_PORT" -U postgres -v ON_ERROR_STOP=1 -qAt)
"${PSQL[@]}" -d postgres -c 'CREATE DATABASE soak' >/dev/null
DB_URL="postgres://postgres@127.0.0.1:$SOAK_PG_PORT/soak"

# ------------------------------------------------------------------ S3 (s3s-fs)
s3_start() {
    s3s-fs --host 127.0.0.1 --port "$SOAK_S3_PORT" --access-key "$S3_AK" --secret-key "$S3_SK" "$DIR/s3" >>"$DIR/s3.log" 2>&1 &
    S3_PID=$!
    wait_for "s3s-fs on $SOAK_S3_PORT" 30 port_open "$SOAK_S3_PORT"
}
s3_stop() {
    kill "$S3_PID"
    wait "$S3_PID" 2>/dev/null || true
    S3_PID=""
}
mkdir -p "$DIR/s3"
s3_start
code=$(curl -s -o /dev/null -w '%{http_code}' -X PUT --aws-sigv4 "aws:amz:us-east-1:s3" --user "$S3_AK:$S3_SK" \
    -H 'x-amz-content-sha256: UNSIGNED-PAYLOAD' "http://127.0.0.1:$SOAK_S3_PORT/$BUCKET")
[ "$code" = 200 ] || die "cannot create bucket $BUCKET (HTTP $code)"

# ------------------------------------------------------------------ RabbitMQ node
rmq() { rabbitmqctl -n "$NODE" "$@"; }
mkdir -p "$DIR/rmq/mnesia" "$DIR/rmq/log"
echo '[].' >"$DIR/rmq/enabled_plugins"
# The Debian package's /etc/rabbitmq/rabbitmq.conf names the shared node's listener: give
# this node a config file of its own.
echo "listeners.tcp.local = 127.0.0.1:$SOAK_AMQP_PORT" >"$DIR/rmq/rabbitmq.conf"
chown -R rabbitmq:rabbitmq "$DIR/rmq"
RABBITMQ_NODENAME=$NODE RABBITMQ_NODE_PORT=$SOAK_AMQP_PORT RABBITMQ_DIST_PORT=$SOAK_DIST_PORT \
    RABBITMQ_MNESIA_BASE="$DIR/rmq/mnesia" RABBITMQ_LOG_BASE="$DIR/rmq/log" RABBITMQ_PID_FILE="$DIR/rmq/pid" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$DIR/rmq/enabled_plugins" RABBITMQ_CONFIG_FILE="$DIR/rmq/rabbitmq.conf" \
    rabbitmq-server -detached >&2
RMQ_STARTED=1
sleep 2
rmq -q await_startup --timeout 120 >&2 || die "RabbitMQ node $NODE did not start (see $DIR/rmq/log)"
wait_for "AMQP port $SOAK_AMQP_PORT" 60 port_open "$SOAK_AMQP_PORT"
log "dedicated PostgreSQL :$SOAK_PG_PORT, s3s-fs :$SOAK_S3_PORT, RabbitMQ $NODE :$SOAK_AMQP_PORT up"

# ------------------------------------------------------------------ worker settings
export K6_INGEST__DATABASE__URL=$DB_URL
export K6_INGEST__AMQP__URL="amqp://guest:guest@127.0.0.1:$SOAK_AMQP_PORT/%2f"
export K6_INGEST__S3__ENDPOINT="http://127.0.0.1:$SOAK_S3_PORT"
export K6_INGEST__S3__BUCKET=$BUCKET
export K6_INGEST__S3__FORCE_PATH_STYLE=true
export K6_INGEST__S3__REGION=us-east-1
export AWS_ACCESS_KEY_ID=$S3_AK AWS_SECRET_ACCESS_KEY=$S3_SK AWS_REGION=us-east-1
unset AWS_ENDPOINT_URL_S3 AWS_ENDPOINT_URL
export K6_INGEST__FETCH__ALLOWED_ROOTS="$REPO/fixtures/k6"
export K6_INGEST__LOG__FORMAT=json
"$BIN" migrate >"$DIR/migrate.log" 2>&1 || die "migrate failed (see $DIR/migrate.log)"

# ------------------------------------------------------------------ the backlog
python3 - "$REPO/fixtures/k6/v1.1.0" "$N" >"$DIR/messages.ndjson" <<'PY'
import json, os, sys, uuid
root, n = sys.argv[1], int(sys.argv[2])
cases = ["thresholds-pass", "thresholds-fail", "groups-nested-checks", "custom-metrics", "scenarios", "no-http"]
base = {}
for c in cases:
    with open(os.path.join(root, c, "message.json")) as f:
        m = json.load(f)
    m["artifacts"] = {k: "file://" + os.path.join(root, c, v) for k, v in m["artifacts"].items() if v}
    base[c] = m
for i in range(n):
    m = dict(base[cases[i % len(cases)]])
    m["run_id"] = str(uuid.uuid4())
    m["event_id"] = str(uuid.uuid4())
    print(json.dumps(m))
PY
WORK_START=$SECONDS
"$BIN" publish "$DIR/messages.ndjson" >"$DIR/publish.log" 2>&1 || die "publish failed (see $DIR/publish.log)"
log "published $N messages"

# ------------------------------------------------------------------ workers
http_port() { echo $((SOAK_HTTP_PORT + $1 - 1)); }
start_worker() {
    K6_INGEST__HTTP__BIND="127.0.0.1:$(http_port "$1")" "$BIN" consume >>"$DIR/worker-$1.log" 2>&1 &
    WORKER_PID[$1]=$!
}
ready() { [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$(http_port "$1")/readyz")" = 200 ]; }
# metric SAMPLE WORKER: the sample's value on the worker's /metrics (0 when absent)
metric() {
    curl -s "http://127.0.0.1:$(http_port "$2")/metrics" |
        awk -v s="$1" 'index($0, s) == 1 { sum += $NF } END { printf "%d\n", sum }'
}
# Counters of a worker about to be killed, so the totals include them.
RETRIED_BEFORE=0
HELD_BEFORE=0
bank_counters() {
    RETRIED_BEFORE=$((RETRIED_BEFORE + $(metric k6_ingest_messages_retried_total "$1")))
    HELD_BEFORE=$((HELD_BEFORE + $(metric k6_ingest_deliveries_held_total "$1")))
}
stored() { "${PSQL[@]}" -d soak -c 'SELECT count(*) FROM k6_performance_runs' 2>/dev/null || echo "?"; }
start_worker 1
start_worker 2
wait_for "worker 1 ready" 60 ready 1
wait_for "worker 2 ready" 60 ready 2
log "two workers consuming"


# ------------------------------------------------------------------ faults
# The backlog drains in seconds once everything is up, so the faults overlap: a worker is
# killed while it holds deliveries for the S3 outage, the broker restarts while the
# workers hold deliveries for the PostgreSQL outage, and another worker is killed while
# the backlog drains after it.
half=$((SOAK_OUTAGE_SECS / 2))
# watch_readyz WORKER SECS PATTERN: waits SECS, reading the worker's /readyz every second;
# prints the first body that matches PATTERN, else the last one.
watch_readyz() {
    local found="" last="" end=$((SECONDS + $2))
    while ((SECONDS < end)); do
        last=$(curl -s "http://127.0.0.1:$(http_port "$1")/readyz" || true)
        if [ -z "$found" ] && grep -q "$3" <<<"$last"; then found=$last; fi
        sleep 1
    done
    echo "${found:-$last}"
}
kill_worker() {
    log "SIGKILL worker $1 (stored so far: $(stored)/$N)"
    bank_counters "$1"
    kill -KILL "${WORKER_PID[$1]}"
    wait "${WORKER_PID[$1]}" 2>/dev/null || true
    start_worker "$1"
}
log "S3 outage for ${SOAK_OUTAGE_SECS}s (stored so far: $(stored)/$N)"
s3_stop
down_s3=$(watch_readyz 1 "$half" '"s3":"down"')
kill_worker 2
sleep "$((SOAK_OUTAGE_SECS - half))"
s3_start
log "S3 back (stored: $(stored)/$N); /readyz during the outage: $down_s3"
grep -q '"s3":"down"' <<<"$down_s3" || die "/readyz did not name s3 during the S3 outage"
wait_for "worker 1 ready after the S3 outage" 120 ready 1
wait_for "worker 2 ready after its restart" 120 ready 2

sleep 1
log "PostgreSQL outage for ${SOAK_OUTAGE_SECS}s (stored so far: $(stored)/$N)"
pg stop -m fast >&2
down_pg=$(watch_readyz 2 "$half" '"database":"down"')
log "RabbitMQ restart (stored so far: $(stored)/$N)"
rmq -q stop_app >&2
rmq -q start_app >&2
sleep "$((SOAK_OUTAGE_SECS - half))"
pg start >&2
log "PostgreSQL back (stored: $(stored)/$N); /readyz during the outage: $down_pg"
grep -q '"database":"down"' <<<"$down_pg" || die "/readyz did not name the database during the PostgreSQL outage"
wait_for "worker 1 ready after the PostgreSQL outage" 120 ready 1
wait_for "worker 2 ready after the PostgreSQL outage" 120 ready 2

sleep 1
kill_worker 1
wait_for "worker 1 ready after its restart" 60 ready 1

# ------------------------------------------------------------------ drain and check
queue_counts() { rmq -q list_queues --no-table-headers name messages_ready messages_unacknowledged 2>/dev/null; }
drained() {
    [ "$(stored)" = "$N" ] || return 1
    queue_counts | awk '{ if ($2 + $3 > 0) busy = 1 } END { exit busy }'
}
log "waiting for the backlog to drain (stored: $(stored)/$N)"
wait_for "the backlog to drain" "$SOAK_DRAIN_TIMEOUT_SECS" drained
WALL=$((SECONDS - WORK_START)) # from the first publish to the last run stored

sql() { "${PSQL[@]}" -d soak -c "$1"; }
runs=$(sql 'SELECT count(DISTINCT id) FROM runs')
runs_rows=$(sql 'SELECT count(*) FROM runs')
perf=$(sql 'SELECT count(*) FROM k6_performance_runs')
perf_runs=$(sql 'SELECT count(DISTINCT run_id) FROM k6_performance_runs')
dups=$(sql 'SELECT count(*) FROM (SELECT run_id FROM k6_performance_runs GROUP BY run_id HAVING count(*) > 1) d')
expected=$(sed 's/.*"run_id": "\([^"]*\)".*/\1/' "$DIR/messages.ndjson" | sort -u | wc -l)
queues=$(queue_counts)
dead=$(awk '$1 ~ /dead/ { n += $2 + $3 } END { print n + 0 }' <<<"$queues")
retry_left=$(awk '$1 ~ /retry/ { n += $2 + $3 } END { print n + 0 }' <<<"$queues")
retried=$((RETRIED_BEFORE + $(metric k6_ingest_messages_retried_total 1) + $(metric k6_ingest_messages_retried_total 2)))
held=$((HELD_BEFORE + $(metric k6_ingest_deliveries_held_total 1) + $(metric k6_ingest_deliveries_held_total 2)))

# Both workers stop cleanly on SIGTERM.
exits=""
for w in 1 2; do
    kill -TERM "${WORKER_PID[$w]}"
    rc=0
    wait "${WORKER_PID[$w]}" || rc=$?
    unset "WORKER_PID[$w]"
    exits+="$rc"
done

failures=()
[ "$expected" = "$N" ] || failures+=("the backlog had $expected distinct runs, not $N")
[ "$runs" = "$N" ] && [ "$runs_rows" = "$N" ] || failures+=("runs: $runs distinct in $runs_rows rows, expected $N")
[ "$perf" = "$N" ] && [ "$perf_runs" = "$N" ] || failures+=("k6_performance_runs: $perf rows for $perf_runs runs, expected $N")
[ "$dups" = 0 ] || failures+=("$dups runs stored more than once")
[ "$dead" = 0 ] || failures+=("$dead dead letters")
[ "$retry_left" = 0 ] || failures+=("$retry_left messages left in retry queues")
[ "$exits" = 00 ] || failures+=("worker exit codes on SIGTERM: $exits")

once=$([ "$dups" = 0 ] && echo " once" || echo "")
echo "soak N=$N: stored $perf_runs/$N$once, $dead dead letters, retries $retried, held $held, outages s3 ${SOAK_OUTAGE_SECS}s pg ${SOAK_OUTAGE_SECS}s, wall $WALL s"
if [ ${#failures[@]} -gt 0 ]; then
    printf 'soak FAILED: %s\n' "${failures[@]}" >&2
    exit 1
fi
OK=1
