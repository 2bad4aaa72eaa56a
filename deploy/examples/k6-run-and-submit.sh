#!/usr/bin/env bash
# Run k6, then hand its results to k6-ingest: `k6-ingest submit` uploads the summary and
# logs to the S3 staging prefix and publishes the run-completed message (with publisher
# confirms), so the k6-ingest workers store the run.
#
# Two ways to use it:
#   * In a runner image (k6-runner.Dockerfile) it is installed as /usr/local/bin/k6, ahead
#     of the real /usr/bin/k6 on PATH. k6-operator starts every runner pod as
#     `k6 run [--quiet] ... /test/<script> --address=0.0.0.0:6565 --paused --tag ...`, so
#     the wrapper sees exactly that command line; `k6 inspect`/`k6 archive` (the
#     operator's initializer) and any other subcommand go straight to the real k6.
#   * In any CI job:  K6_REAL_BINARY="$(command -v k6)" ./k6-run-and-submit.sh run script.js
#
# Environment:
#   K6_INGEST_RUN_ID, K6_INGEST_TEST_ID, K6_INGEST_ORGANIZATION_ID, K6_INGEST_PROJECT_ID
#                         identify the run (read by `k6-ingest submit` itself)
#   K6_INGEST__AMQP__URL, K6_INGEST__S3__BUCKET, K6_INGEST__S3__STAGING_PREFIX, AWS_*
#                         where to upload and publish (read by `k6-ingest submit`)
#   K6_INGEST_OUTPUT_DIR  where results are collected (default /tmp/k6-results); a
#                         handleSummary writing "${K6_INGEST_OUTPUT_DIR}/summary.json"
#                         gives the richest summary, else --summary-export is used;
#                         report.html and metrics.ndjson[.gz] found there are sent too
#                         (e.g. `--out json=/tmp/k6-results/metrics.ndjson.gz`)
#   K6_REAL_BINARY        the real k6 (default /usr/bin/k6)
#   K6_INGEST_BINARY      k6-ingest (default: k6-ingest on PATH)
#
# Exit status: k6's own, so a failed threshold still fails the Job or CI step; if k6
# passed but the submit failed, 1 (the run would otherwise be silently missing).
set -uo pipefail

real_k6=${K6_REAL_BINARY:-/usr/bin/k6}
k6_ingest=${K6_INGEST_BINARY:-k6-ingest}

if [[ "${1:-}" != "run" ]]; then
    exec "$real_k6" "$@"
fi

out=${K6_INGEST_OUTPUT_DIR:-/tmp/k6-results}
mkdir -p "$out" || exit 1
export K6_INGEST_OUTPUT_DIR=$out
# A summary left over from an earlier run in the same directory must not be sent again.
rm -f "$out/summary.json" "$out/summary-export.json" "$out/k6.log" \
    "$out/report.html" "$out/metrics.ndjson.gz" "$out/metrics.ndjson"

started_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)
# k6 prints logs on stderr and the end-of-test summary on stdout: keep both, in order,
# in the pod log and in the artifact. With k6-operator's --paused, the start time
# includes the wait for the starter pod.
"$real_k6" "$@" --summary-export "$out/summary-export.json" 2>&1 | tee "$out/k6.log"
k6_exit=${PIPESTATUS[0]}
completed_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)

summary="$out/summary.json"
if [[ ! -s "$summary" ]]; then
    summary="$out/summary-export.json"
fi

args=(submit
    --exit-code "$k6_exit"
    --summary "$summary"
    --logs "$out/k6.log"
    --started-at "$started_at"
    --completed-at "$completed_at")
if [[ -s "$out/report.html" ]]; then
    args+=(--report "$out/report.html")
fi
for metrics in "$out/metrics.ndjson.gz" "$out/metrics.ndjson"; do
    if [[ -s "$metrics" ]]; then
        args+=(--metrics "$metrics")
        break
    fi
done

# A split run (k6-operator `parallelism` > 1 passes each runner
# --execution-segment=0:1/4 --execution-segment-sequence=0,1/4,2/4,3/4,1): report this
# runner's share as one part of the run; the worker merges the parts.
segment="" sequence="" prev=""
for a in "$@"; do
    case "$prev" in
        --execution-segment) segment=$a ;;
        --execution-segment-sequence) sequence=$a ;;
    esac
    case "$a" in
        --execution-segment=*) segment=${a#*=} ;;
        --execution-segment-sequence=*) sequence=${a#*=} ;;
    esac
    prev=$a
done
if [[ -n "$segment" && "$segment" != "0:1" ]]; then
    args+=(--execution-segment "$segment" --runner "${HOSTNAME:-}")
    if [[ -n "$sequence" ]]; then
        args+=(--execution-segment-sequence "$sequence")
    fi
fi

if ! "$k6_ingest" "${args[@]}"; then
    echo "k6-run-and-submit: k6-ingest submit failed; results are still in $out" >&2
    if [[ "$k6_exit" -eq 0 ]]; then
        exit 1
    fi
fi
exit "$k6_exit"
