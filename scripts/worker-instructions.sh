#!/usr/bin/env bash
# worker-instructions.sh — instructions the worker executes for a fixed number of runs,
# counted by valgrind's callgrind: the same for the same binary and inputs whatever else
# the machine is doing, where CPU seconds and rates moved by up to 40 % between rounds on
# this shared machine. For comparing two builds of the worker.
#
#   scripts/worker-instructions.sh BINARY [RUNS] [PREFETCH]     # defaults 500 and 8
#
# Runs scripts/queue-throughput.sh with BINARY, the `consume` process under callgrind
# (about 50 times slower), and prints the total and the instructions per run. Start-up
# and the connections are in the total too, the same for two builds of the same code.
# The profile stays in $WI_OUT (default: a temporary file, removed) for callgrind_annotate.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(realpath "${1:?usage: worker-instructions.sh BINARY [RUNS] [PREFETCH]}")
runs=${2:-500}
prefetch=${3:-8}
command -v valgrind >/dev/null || { echo "valgrind is not installed" >&2; exit 1; }
wrap=$(mktemp -d)
out=${WI_OUT:-$wrap/callgrind.out}
trap 'rm -rf "$wrap"' EXIT
mkdir -p "$wrap/release"
cat >"$wrap/release/k6-ingest" <<EOF
#!/bin/sh
if [ "\$1" = consume ]; then
    exec valgrind --tool=callgrind --callgrind-out-file="$out" "$bin" "\$@"
fi
exec "$bin" "\$@"
EOF
chmod +x "$wrap/release/k6-ingest"
CARGO_TARGET_DIR=$wrap PROFILE=release scripts/queue-throughput.sh "$prefetch" "$runs" >"$wrap/qt.log" 2>&1 ||
    { cat "$wrap/qt.log" >&2; exit 1; }
total=$(awk '/^summary:/ {print $2}' "$out")
echo "worker: $total instructions for $runs runs at prefetch $prefetch = $((total / runs)) per run"
