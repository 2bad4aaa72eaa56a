#!/usr/bin/env bash
# services-up.sh — bring up PostgreSQL, RabbitMQ and an S3-compatible server (s3s-fs) on
# loopback for k6-ingest's tests and local runs.
#
# Idempotent: on a rust-svc machine (PostgreSQL + RabbitMQ already running) it only checks them,
# creates what is missing (roles, databases) and starts the S3 server; on a fresh Debian 12
# machine (kind `rust`) it installs and starts everything. Only 127.0.0.1 is used.
#
#   eval "$(scripts/services-up.sh)"     # start/check everything, export the connection settings
#   scripts/services-up.sh --down        # stop what THIS script started (never a pre-existing service)
#   scripts/services-up.sh --status      # health of the three services, no changes
#
# Knobs (env): INFRA_HOME (state: logs, pid files, S3 data; default /var/tmp/k6-ingest-services),
#   PG_PORT (5432), PGBOUNCER_PORT (6432), AMQP_PORT (5672), S3_PORT (8014), S3_BUCKET (k6-artifacts-test),
#   S3_ACCESS_KEY / S3_SECRET_KEY (test-access-key / test-secret-key), S3S_FS_VERSION (0.14.1).
# stdout: only `export NAME=value` lines; progress goes to stderr.
set -euo pipefail

: "${INFRA_HOME:=/var/tmp/k6-ingest-services}"
: "${PG_PORT:=5432}"
: "${PGBOUNCER_PORT:=6432}"
: "${AMQP_PORT:=5672}"
: "${S3_PORT:=8014}"
: "${S3_BUCKET:=k6-ingest}"
: "${S3_ACCESS_KEY:=test-access-key}"
: "${S3_SECRET_KEY:=test-secret-key}"
: "${S3_REGION:=us-east-1}"
# s3s-fs 0.15+ needs rustc >= 1.96; 0.14.1 is the newest that builds with this machine's 1.95.
: "${S3S_FS_VERSION:=0.14.1}"
export PATH="$HOME/.cargo/bin:$PATH"
# Any rabbitmq CLI call (even a health check) starts epmd if it is not running: keep it on loopback.
export ERL_EPMD_ADDRESS=127.0.0.1

log() { printf '[services-up %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root (installs Debian packages, starts services as their users)"
mkdir -p "$INFRA_HOME"

APT_UPDATED=0
apt_install() {
    local missing=() p
    for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$APT_UPDATED" = 0 ]; then
        log "apt-get update"
        apt-get update -qq >&2
        APT_UPDATED=1
    fi
    log "apt-get install ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
}

# wait_for DESCRIPTION TIMEOUT_S CMD... : poll CMD until it succeeds
wait_for() {
    local what=$1 timeout=$2
    shift 2
    local end=$((SECONDS + timeout))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < end)) || { log "timed out after ${timeout}s waiting for $what"; return 1; }
        sleep 0.5
    done
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

s3_curl() { # s3_curl METHOD PATH [curl args...] -> prints HTTP status
    local method=$1 path=$2
    shift 2
    curl -s -o "$INFRA_HOME/s3-last-response.xml" -w '%{http_code}' -X "$method" \
        --aws-sigv4 "aws:amz:${S3_REGION}:s3" --user "${S3_ACCESS_KEY}:${S3_SECRET_KEY}" \
        -H 'x-amz-content-sha256: UNSIGNED-PAYLOAD' "$@" "http://127.0.0.1:${S3_PORT}${path}"
}

pg_version() { ls /etc/postgresql 2>/dev/null | sort -V | tail -1; }
pg_trust_ok() { psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -w -d postgres -qAtc 'select 1' >/dev/null 2>&1; }
rmq_running() { rabbitmq-diagnostics -q check_running >/dev/null 2>&1; }
s3s_bin() { command -v s3s-fs 2>/dev/null || echo "$HOME/.cargo/bin/s3s-fs"; }
s3_ok() { [ "$(s3_curl GET / 2>/dev/null)" = 200 ]; }

# ------------------------------------------------------------------ PostgreSQL
pg_up() {
    command -v pg_ctlcluster >/dev/null 2>&1 && [ -n "$(pg_version)" ] || apt_install postgresql
    local v
    v=$(pg_version)
    pg_lsclusters -h | awk '{print $1" "$2}' | grep -qx "$v main" || { log "pg_createcluster $v main"; pg_createcluster "$v" main >&2; }
    if ! pg_isready -h 127.0.0.1 -p "$PG_PORT" -q; then
        log "starting PostgreSQL $v (pg_ctlcluster)"
        pg_ctlcluster --skip-systemctl-redirect "$v" main start >&2
        touch "$INFRA_HOME/started-postgres"
    fi
    wait_for "PostgreSQL on 127.0.0.1:$PG_PORT" 60 pg_isready -h 127.0.0.1 -p "$PG_PORT" -q
    if ! pg_trust_ok; then
        # rust-svc machines use trust auth on loopback; do the same here (loopback only).
        local hba="/etc/postgresql/$v/main/pg_hba.conf"
        if ! grep -q 'services-up.sh' "$hba"; then
            log "pg_hba.conf: trust for 127.0.0.1/32 and ::1/128"
            sed -i '1i host    all all 127.0.0.1/32 trust  # services-up.sh: loopback trust (as on rust-svc)\nhost    all all ::1/128      trust  # services-up.sh' "$hba"
        fi
        pg_ctlcluster --skip-systemctl-redirect "$v" main reload >&2
        wait_for "PostgreSQL trust auth" 20 pg_trust_ok || die "PostgreSQL rejects passwordless loopback login; check $hba"
    fi
    psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -qAt >/dev/null <<'SQL'
DO $$BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'root') THEN CREATE ROLE root SUPERUSER LOGIN; END IF;
END$$;
SQL
    local db
    for db in test root; do
        psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -qAtc "select 1 from pg_database where datname='$db'" | grep -q 1 ||
            psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -qc "CREATE DATABASE $db" >&2
    done
    log "PostgreSQL ok: $(psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -d test -qAtc 'show server_version')"
}

# ------------------------------------------------------------------ PgBouncer
# Debian 12's PgBouncer (1.18, no prepared-statement support) in transaction pooling mode
# in front of the PostgreSQL above, for the tests of `database.prepared_statements = false`
# (SPEC section 13). Its own config under INFRA_HOME; the package's service stays off.
PGB_DIR="$INFRA_HOME/pgbouncer"
pgb_ok() { psql -h 127.0.0.1 -p "$PGBOUNCER_PORT" -U postgres -w -d postgres -qAtc 'select 1' >/dev/null 2>&1; }
pgb_pid() { cat "$PGB_DIR/pgbouncer.pid" 2>/dev/null; }
pgb_ours() { local pid; pid=$(pgb_pid) && [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && grep -q pgbouncer "/proc/$pid/cmdline" 2>/dev/null; }
pgbouncer_up() {
    command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ] || apt_install pgbouncer
    local bin
    bin=$(command -v pgbouncer 2>/dev/null || echo /usr/sbin/pgbouncer)
    mkdir -p "$PGB_DIR"
    # trust still needs the user names in auth_file; PostgreSQL itself trusts loopback.
    printf '"postgres" ""\n"root" ""\n' >"$PGB_DIR/userlist.txt"
    cat >"$PGB_DIR/pgbouncer.ini" <<EOF
[databases]
; every database name, including the per-test databases of #[sqlx::test]
* = host=127.0.0.1 port=${PG_PORT}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = ${PGBOUNCER_PORT}
unix_socket_dir =
auth_type = trust
auth_file = ${PGB_DIR}/userlist.txt
admin_users = postgres
pool_mode = transaction
; sqlx sends extra_float_digits at startup; 1.18 refuses unknown startup parameters
ignore_startup_parameters = extra_float_digits
max_client_conn = 1000
default_pool_size = 20
; test databases are dropped right after their tests: do not keep idle sessions long
server_idle_timeout = 10
logfile = ${PGB_DIR}/pgbouncer.log
pidfile = ${PGB_DIR}/pgbouncer.pid
EOF
    chown -R postgres:postgres "$PGB_DIR"
    if pgb_ours; then
        # Already running from this config: pick up any change to it.
        psql -h 127.0.0.1 -p "$PGBOUNCER_PORT" -U postgres -w -d pgbouncer -qAtc 'RELOAD' >/dev/null 2>&1 || true
    elif port_open "$PGBOUNCER_PORT"; then
        pgb_ok || die "port $PGBOUNCER_PORT is taken by something that is not a PgBouncer in front of PostgreSQL"
        log "port $PGBOUNCER_PORT already answers as a pooler; using it"
    else
        log "starting PgBouncer on 127.0.0.1:$PGBOUNCER_PORT (transaction pooling; config $PGB_DIR/pgbouncer.ini)"
        "$bin" -d -u postgres "$PGB_DIR/pgbouncer.ini" >&2
    fi
    wait_for "PgBouncer on 127.0.0.1:$PGBOUNCER_PORT" 30 pgb_ok || die "PgBouncer does not answer; see $PGB_DIR/pgbouncer.log"
    log "PgBouncer ok: $("$bin" --version 2>/dev/null | head -1) pid $(pgb_pid || echo '?')"
}

# ------------------------------------------------------------------ RabbitMQ
rmq_up() {
    command -v rabbitmq-server >/dev/null 2>&1 || apt_install rabbitmq-server
    if ! rmq_running; then
        if port_open "$AMQP_PORT"; then
            log "port $AMQP_PORT is open but rabbitmq-diagnostics cannot reach the node; waiting for it"
        else
            log "starting RabbitMQ (rabbitmq-server -detached, bound to 127.0.0.1)"
            # Loopback only: AMQP listener, epmd and the Erlang distribution port.
            RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_NODE_PORT="$AMQP_PORT" \
                RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS='-kernel inet_dist_use_interface {127,0,0,1}' \
                rabbitmq-server -detached >&2
            touch "$INFRA_HOME/started-rabbitmq"
        fi
    fi
    # await_startup needs the node to be reachable first (it fails fast while the VM is starting)
    wait_for "RabbitMQ node" 120 rabbitmq-diagnostics -q ping
    rabbitmqctl -q await_startup --timeout 120 >&2
    wait_for "AMQP port $AMQP_PORT" 60 port_open "$AMQP_PORT"
    log "RabbitMQ ok: $(rabbitmqctl -q version 2>/dev/null || echo '?')"
}

# ------------------------------------------------------------------ S3 (s3s-fs)
s3_up() {
    local bin
    bin=$(s3s_bin)
    if [ ! -x "$bin" ] || ! "$bin" --version 2>/dev/null | grep -q "$S3S_FS_VERSION"; then
        command -v cargo >/dev/null 2>&1 || die "cargo not found (needed to install s3s-fs)"
        log "cargo install s3s-fs@$S3S_FS_VERSION --features binary --locked (about 6-7 min on 2 cores, once per machine)"
        cargo install "s3s-fs@$S3S_FS_VERSION" --features binary --locked >&2
        bin=$(s3s_bin)
    fi
    if ! s3_ok; then
        if port_open "$S3_PORT"; then
            die "port $S3_PORT is taken by something that does not answer S3 with our credentials"
        fi
        mkdir -p "$INFRA_HOME/s3-data"
        log "starting s3s-fs on 127.0.0.1:$S3_PORT (data: $INFRA_HOME/s3-data)"
        nohup setsid "$bin" --host 127.0.0.1 --port "$S3_PORT" \
            --access-key "$S3_ACCESS_KEY" --secret-key "$S3_SECRET_KEY" \
            "$INFRA_HOME/s3-data" >>"$INFRA_HOME/s3s-fs.log" 2>&1 </dev/null &
        echo $! >"$INFRA_HOME/s3s-fs.pid"
    fi
    wait_for "s3s-fs on 127.0.0.1:$S3_PORT" 30 s3_ok || die "s3s-fs did not answer; see $INFRA_HOME/s3s-fs.log"
    local code
    code=$(s3_curl PUT "/$S3_BUCKET")
    case "$code" in
    200) log "bucket $S3_BUCKET created" ;;
    409) log "bucket $S3_BUCKET already exists" ;;
    *) die "CreateBucket $S3_BUCKET -> HTTP $code: $(cat "$INFRA_HOME/s3-last-response.xml")" ;;
    esac
    log "S3 ok: s3s-fs $S3S_FS_VERSION pid $(cat "$INFRA_HOME/s3s-fs.pid" 2>/dev/null || echo '?')"
}

print_env() {
    cat <<EOF
export DATABASE_URL=postgres://postgres@127.0.0.1:${PG_PORT}/test
export K6_TEST_PGBOUNCER_URL=postgres://postgres@127.0.0.1:${PGBOUNCER_PORT}
export AMQP_URL=amqp://guest:guest@127.0.0.1:${AMQP_PORT}/%2f
export S3_ENDPOINT=http://127.0.0.1:${S3_PORT}
export S3_BUCKET=${S3_BUCKET}
export S3_FORCE_PATH_STYLE=true
export AWS_ACCESS_KEY_ID=${S3_ACCESS_KEY}
export AWS_SECRET_ACCESS_KEY=${S3_SECRET_KEY}
export AWS_REGION=${S3_REGION}
export AWS_ENDPOINT_URL_S3=http://127.0.0.1:${S3_PORT}
export K6_INGEST__S3__ENDPOINT=http://127.0.0.1:${S3_PORT}
export K6_INGEST__S3__BUCKET=${S3_BUCKET}
export K6_INGEST__S3__FORCE_PATH_STYLE=true
export K6_INGEST__S3__REGION=${S3_REGION}
export K6_INGEST__AMQP__URL=amqp://guest:guest@127.0.0.1:${AMQP_PORT}/%2f
EOF
}

status() {
    local rc=0
    if pg_isready -h 127.0.0.1 -p "$PG_PORT" -q 2>/dev/null; then log "postgres: up (127.0.0.1:$PG_PORT)"; else log "postgres: DOWN"; rc=1; fi
    if pgb_ok; then log "pgbouncer: up (127.0.0.1:$PGBOUNCER_PORT)"; else log "pgbouncer: DOWN"; rc=1; fi
    if rmq_running; then log "rabbitmq: up (127.0.0.1:$AMQP_PORT)"; else log "rabbitmq: DOWN"; rc=1; fi
    if s3_ok; then log "s3s-fs: up (127.0.0.1:$S3_PORT)"; else log "s3s-fs: DOWN"; rc=1; fi
    return $rc
}

down() {
    local pid
    if [ -f "$INFRA_HOME/s3s-fs.pid" ]; then
        pid=$(cat "$INFRA_HOME/s3s-fs.pid")
        if kill -0 "$pid" 2>/dev/null && grep -q s3s-fs "/proc/$pid/cmdline" 2>/dev/null; then
            log "stopping s3s-fs pid $pid"
            kill "$pid"
        fi
        rm -f "$INFRA_HOME/s3s-fs.pid"
    fi
    if pgb_ours; then
        log "stopping PgBouncer pid $(pgb_pid)"
        kill "$(pgb_pid)"
    fi
    if [ -f "$INFRA_HOME/started-rabbitmq" ]; then
        log "stopping RabbitMQ (rabbitmqctl shutdown)"
        rabbitmqctl -q shutdown >&2 || true
        rm -f "$INFRA_HOME/started-rabbitmq"
    fi
    if [ -f "$INFRA_HOME/started-postgres" ]; then
        log "stopping PostgreSQL $(pg_version)"
        pg_ctlcluster --skip-systemctl-redirect "$(pg_version)" main stop >&2 || true
        rm -f "$INFRA_HOME/started-postgres"
    fi
}

case "${1:-up}" in
up | --up)
    t0=$SECONDS
    pg_up
    pgbouncer_up
    rmq_up
    s3_up
    log "all services healthy in $((SECONDS - t0))s"
    print_env
    ;;
--env) print_env ;;
--status) status ;;
--down) down ;;
*) die "usage: $0 [--status|--down|--env]" ;;
esac
