# Runner image for k6-operator TestRuns (and CI jobs): the real k6, k6-ingest, and the
# wrapper k6-run-and-submit.sh installed as `k6`, so every `k6 run` ends with
# `k6-ingest submit`. Build from the repository root:
#
#   docker build -f deploy/examples/k6-runner.Dockerfile \
#     --build-arg K6_INGEST_IMAGE=registry.example.com/platform/k6-ingest:0.1.0 \
#     -t registry.example.com/platform/k6-runner:1.1.0-0.1.0 .
#
# Debian rather than the Alpine-based grafana/k6: k6-ingest is linked against glibc.
# k6 itself is a static Go binary and runs anywhere.

ARG K6_VERSION=1.1.0
ARG K6_INGEST_IMAGE=k6-ingest:0.1.0

FROM grafana/k6:${K6_VERSION} AS k6
FROM ${K6_INGEST_IMAGE} AS k6-ingest

FROM debian:bookworm-slim
# CA certificates for S3 and amqps. Unpinned on purpose (DL3008): bookworm point releases
# drop superseded versions, so exact pins break rebuilds; the suite is pinned by the tag.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*

COPY --from=k6 /usr/bin/k6 /usr/bin/k6
COPY --from=k6-ingest /usr/local/bin/k6-ingest /usr/local/bin/k6-ingest
# The wrapper comes first on PATH (/usr/local/bin before /usr/bin) and keeps its git
# file mode (executable).
COPY deploy/examples/k6-run-and-submit.sh /usr/local/bin/k6

ENV HOME=/tmp \
    K6_INGEST_OUTPUT_DIR=/tmp/k6-results \
    K6_REAL_BINARY=/usr/bin/k6

USER 65532:65532
WORKDIR /tmp
ENTRYPOINT ["k6"]
