#!/usr/bin/env bash
# The whole test suite, from a fresh machine: bring up PostgreSQL, RabbitMQ and the
# S3-compatible server (reusing running ones), check formatting and lints, run every
# test against the real services, then the tests that restart shared services one at a
# time. The offline deployment checks run first, so the suite's summary closes the output.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

eval "$(scripts/services-up.sh)"
# sqlx::test creates a fresh database per test from this server.
export DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres

if ! command -v cargo-nextest >/dev/null 2>&1; then
    echo "[test] installing cargo-nextest" >&2
    cargo install cargo-nextest --locked >&2
fi

echo "[test] cargo fmt --check" >&2
cargo fmt --check
echo "[test] cargo clippy --all-targets -- -D warnings" >&2
cargo clippy --locked --all-targets -- -D warnings

echo "[test] deployment checks" >&2
scripts/check-deploy.sh

# Tests named serial_* disturb services every test shares (a broker restart); they run
# afterwards, alone.
echo "[test] test suite" >&2
cargo nextest run --locked --no-fail-fast -E 'not test(/serial_/)'
serial=$(cargo nextest list --locked -E 'test(/serial_/)' 2>/dev/null || true)
if grep -q serial_ <<<"$serial"; then
    echo "[test] serial tests" >&2
    cargo nextest run --locked --no-fail-fast --test-threads 1 -E 'test(/serial_/)'
fi

# Two worker processes on dedicated PostgreSQL, S3 and RabbitMQ instances through an S3
# outage, a PostgreSQL outage, worker kills and a broker restart: every run stored once,
# nothing dead-lettered. Small and short here; see scripts/soak.sh for the full size.
echo "[test] soak" >&2
SOAK_OUTAGE_SECS=8 scripts/soak.sh 200
