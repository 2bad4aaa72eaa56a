#!/usr/bin/env bash
# sqlx-prepare.sh — regenerates `.sqlx/`, the query data sqlx's `query!` macros check the
# SQL of src/db.rs and src/db/*.rs against when building offline (SQLX_OFFLINE=true,
# set in .cargo/config.toml), so builds need no database. Run it after changing a
# checked query or a migration, and commit `.sqlx/`.
#
#   scripts/sqlx-prepare.sh
#
# Needs no sqlx-cli: it creates a scratch database, applies the migrations with psql (the
# worker cannot be built to migrate before its query data exists), then rebuilds the
# crate online with SQLX_OFFLINE_DIR set, which makes every macro write its data there.
# Uses PostgreSQL of scripts/services-up.sh (PG_URL, default
# postgres://postgres@127.0.0.1:5432).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${PG_URL:=postgres://postgres@127.0.0.1:5432}"
db="k6_sqlx_prepare_$(date +%s%N | tail -c 9)"
url="$PG_URL/$db"
new=$(mktemp -d)
trap 'rm -rf "$new"; psql "$PG_URL/postgres" -qc "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1 || true' EXIT
psql "$PG_URL/postgres" -qc "CREATE DATABASE $db"
for f in migrations/*.sql; do
    psql "$url" -q -v ON_ERROR_STOP=1 -f "$f" >/dev/null
done

# Every macro must expand again to write its data: build the crate from scratch.
cargo clean -p k6-ingest >&2
SQLX_OFFLINE=false SQLX_OFFLINE_DIR="$new" DATABASE_URL="$url" cargo check --lib >&2
rm -rf .sqlx
mkdir .sqlx
cp "$new"/query-*.json .sqlx/
echo "sqlx-prepare: $(ls .sqlx | wc -l) queries in .sqlx/" >&2
