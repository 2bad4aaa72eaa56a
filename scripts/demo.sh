#!/usr/bin/env bash
# The main job end to end on this machine: bring up PostgreSQL and an S3-compatible
# server (reusing running ones), build k6-ingest, apply the migrations to a database of
# its own, replay the bundled k6 fixtures (whole runs, and runs split across runners,
# merged when their last part arrives) and print the table of runs. Idempotent: a
# second run finds every run already present.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

eval "$(scripts/services-up.sh)"
: "${DEMO_DATABASE:=k6_ingest_demo}"
psql -h 127.0.0.1 -U postgres -d postgres -qAtc "select 1 from pg_database where datname='$DEMO_DATABASE'" | grep -q 1 ||
    psql -h 127.0.0.1 -U postgres -d postgres -qc "CREATE DATABASE $DEMO_DATABASE"
export K6_INGEST__DATABASE__URL="postgres://postgres@127.0.0.1:5432/$DEMO_DATABASE"
export K6_INGEST__S3__PREFIX="${K6_INGEST__S3__PREFIX:-k6-runs}"

cargo build --locked --quiet --bin k6-ingest
bin=target/debug/k6-ingest
"$bin" migrate
"$bin" replay fixtures/k6 fixtures/k6-split "$@"
