#!/usr/bin/env bash
# bench-e2e.sh — the worker's end-to-end rate through the queue against the ceilings of
# the services it uses, measured in one run on the same services (release build).
#
#   scripts/bench-e2e.sh
#
# Ceilings (benches/store_loop.rs, the worker's own code in a tight loop, CEILING_SECS each):
#   store   Db::store_run of the v1.1.0 fixtures with fresh run ids, concurrency 8 and 32
#   s3      ArtifactStore::upload_file of the fixtures' artifacts, concurrency S3_CONCURRENCY
#   amqp    confirmed publish + consume + ack, concurrency AMQP_CONCURRENCY
# Combined ceiling C = 1 / (uploads per run / PutObject rate + 1 / store rate +
# 1 / publish+ack rate), with the better of the two store rates; S3's rate at concurrency
# 32 is printed too, with the ceiling it gives.
# End to end: scripts/queue-throughput.sh at prefetch 1 (E2E_RUNS_P1 runs, once), 8 and
# 32 (E2E_RUNS runs each), steady: from the first run's write to the last one's, as the
# ceilings' loops are timed (past the pool's connecting and its statements' preparation),
# with the worker's CPU time per run and peak RSS.
# Rounds: the ceilings, then prefetch 8 and 32, ROUNDS times. Each round's end-to-end
# rates are divided by the ceiling measured just before them, and the last line gives the
# medians over the rounds: this 2-core machine is shared, and one run of the ceilings
# measured minutes away from the end-to-end phases met a machine up to a third faster or
# slower than they did.
# CPU per run of each service (scripts/cpu-share.py over the middle of each phase): in
# its ceiling's loop, and at prefetch 32 where they all share the machine with the worker
# (printed for the round whose prefetch-32 ratio is the median).
#
# S3 is an s3s-fs of the bench's own, on BENCH_S3_PORT with its data in memory
# (BENCH_S3_DIR, under /dev/shm), started and stopped here. On the ext4 data directory of
# scripts/services-up.sh, 86 % of s3s-fs's time went to the kernel's inode allocation and
# directory locks, and its PutObject rate depended on how many files had been deleted in
# the half minute before: 2,161/s then 1,235/s within one run of this script, after the
# first ceiling's objects were removed. The stand-in's disk history is not what this
# measures, so every phase here meets the same S3 server, which keeps nothing on disk.
#
# Knobs (env): ROUNDS (5), CEILING_SECS (10), E2E_RUNS (5000), E2E_RUNS_P1 (500), S3_CONCURRENCY (8),
#   AMQP_CONCURRENCY (8), BENCH_S3_PORT (8024), BENCH_S3_DIR (/dev/shm: where its data directory is made),
#   SKIP_BUILD (unset). Every database, queue and S3 prefix it makes is fresh and removed at
#   the end. The last line is the summary.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${CEILING_SECS:=10}" "${E2E_RUNS:=5000}" "${S3_CONCURRENCY:=8}" "${AMQP_CONCURRENCY:=8}"
: "${E2E_RUNS_P1:=500}" "${BENCH_S3_PORT:=8024}" "${ROUNDS:=5}"
if [ -z "${BENCH_S3_DIR:-}" ]; then
    BENCH_S3_DIR=/dev/shm
    [ -d "$BENCH_S3_DIR" ] && [ -w "$BENCH_S3_DIR" ] || BENCH_S3_DIR=${TMPDIR:-/tmp}
fi
# A directory of its own inside BENCH_S3_DIR: only that one is removed at the end.
s3_data=$(mktemp -d "$BENCH_S3_DIR/k6-ingest-bench-s3.XXXXXX")
s3s_fs=$(command -v s3s-fs || echo "$HOME/.cargo/bin/s3s-fs")
if [ ! -x "$s3s_fs" ]; then
    scripts/services-up.sh >/dev/null # installs s3s-fs
fi
s3_pid=
stop_s3() {
    [ -z "$s3_pid" ] || kill "$s3_pid" 2>/dev/null || true
    rm -rf "$s3_data" "$s3_data.log"
}
trap stop_s3 EXIT
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$BENCH_S3_PORT") 2>/dev/null; }
listening && { echo "port $BENCH_S3_PORT is taken: set BENCH_S3_PORT" >&2; exit 1; }
"$s3s_fs" --host 127.0.0.1 --port "$BENCH_S3_PORT" --access-key test-access-key \
    --secret-key test-secret-key "$s3_data" >"$s3_data.log" 2>&1 &
s3_pid=$!
# Listening before services-up.sh looks: finding nothing on the port, it would start an
# s3s-fs of its own there, on disk.
for _ in $(seq 100); do
    listening && break
    kill -0 "$s3_pid" 2>/dev/null || { cat "$s3_data.log" >&2; exit 1; }
    sleep 0.1
done
# services-up.sh and queue-throughput.sh (which calls it) find it answering on S3_PORT,
# create the bucket and export its endpoint.
export S3_PORT=$BENCH_S3_PORT
eval "$(scripts/services-up.sh 2>/dev/null)"
export ERL_EPMD_ADDRESS=127.0.0.1
target="${CARGO_TARGET_DIR:-target}"

if [ -z "${SKIP_BUILD:-}" ]; then
    cargo build --release --bin k6-ingest >&2
fi
driver=$(cargo bench --bench store_loop --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "store_loop" and m.get("executable"):
        print(m["executable"])')
[ -x "$driver" ] || { echo "cannot build benches/store_loop.rs" >&2; exit 1; }
bin="$target/release/k6-ingest"

tag="e2e$(date +%s%N | tail -c 9)"
db="k6_bench_${tag}"
work=$(mktemp -d)
export K6_INGEST__DATABASE__URL="postgres://postgres@127.0.0.1:5432/$db"
export K6_INGEST__AMQP__EXCHANGE="$tag.runs" K6_INGEST__AMQP__QUEUE="$tag.work"
export K6_INGEST__S3__PREFIX="$tag" K6_INGEST__LOG__LEVEL=warn
cleanup() {
    "$driver" amqp-cleanup >/dev/null 2>&1 || true
    psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1 || true
    rm -rf "$work"
    stop_s3
}
trap cleanup EXIT
psql -h 127.0.0.1 -U postgres -qc "CREATE DATABASE $db"
"$bin" migrate >/dev/null

# Each phase's output goes to the round's own directory, $dir.
run() { "$@" | tee -a "$dir/out"; }
# Each service's CPU over the middle of a phase (scripts/cpu-share.py), written to
# $dir/cpu_<name>: `sampled NAME COMMAND...` for a ceiling's loop.
window=$(python3 -c "print(max(1.0, $CEILING_SECS - 4))")
sampled() {
    local name=$1
    shift
    scripts/cpu-share.py 2 "$window" >"$dir/cpu_$name" &
    local sampler=$!
    run "$@"
    wait "$sampler"
}
ceilings() {
    sampled store8 "$driver" store 8 "$CEILING_SECS"
    sampled store32 "$driver" store 32 "$CEILING_SECS"
    sampled s3 "$driver" s3 "$S3_CONCURRENCY" "$CEILING_SECS"
    # S3 answers each PutObject with a latency of its own: at prefetch 32 the worker has
    # up to 32 uploads in flight, so the rate at 32 is printed beside the one the ceiling
    # uses.
    "$driver" s3 32 "$CEILING_SECS" | sed 's/^ceiling s3_put /ceiling s3_put_c32 /' | tee -a "$dir/out"
    sampled amqp "$driver" amqp "$AMQP_CONCURRENCY" "$CEILING_SECS"
    # The S3 loops delete their objects, but s3s-fs keeps the directory it made for each
    # (about 50,000 a round), and its ListObjectsV2 walks them all: after three rounds
    # the last phase's cleanup listed for over a minute at a full core. They are empty
    # and the data directory is the bench's own.
    find "$s3_data" -mindepth 2 -type d -empty -delete
}
# `e2e PREFETCH RUNS`: the queue's rate into $dir/e2e<PREFETCH>; at prefetch 32, each
# service's CPU over 4 s from 2 s after the worker starts (5,000 runs keep it busy for
# about 13 s).
e2e() {
    local p=$1 n=$2 sampler= qt_tag="${tag}r${round}p$1"
    if [ "$p" = 32 ]; then
        scripts/cpu-share.py --after "$bin consume" 2 4 >"$dir/cpu_e2e32" &
        sampler=$!
    fi
    QT_TAG="$qt_tag" PROFILE=release scripts/queue-throughput.sh "$p" "$n" | tee "$dir/e2e$p"
    [ -z "$sampler" ] || wait "$sampler"
    # The phase's queues and objects, named by its tag as queue-throughput.sh names them.
    local names=(K6_INGEST__AMQP__EXCHANGE="$qt_tag.runs" K6_INGEST__AMQP__QUEUE="$qt_tag.work"
        K6_INGEST__S3__PREFIX="$qt_tag")
    env "${names[@]}" "$driver" amqp-cleanup >/dev/null
    env "${names[@]}" "$driver" s3-cleanup >&2
}

# Prefetch 1 once: it has no target and is far below every ceiling.
round=0 dir="$work"
e2e 1 "$E2E_RUNS_P1"
# The ceilings and the end-to-end phases they are compared with, in rounds: on a shared
# machine the load moves by a third within minutes, so each round's end-to-end rates are
# divided by the ceiling measured just before them, and the summary takes the median
# over the rounds.
for round in $(seq "$ROUNDS"); do
    dir="$work/round$round"
    mkdir "$dir"
    echo "round $round of $ROUNDS" >&2
    ceilings
    e2e 8 "$E2E_RUNS"
    e2e 32 "$E2E_RUNS"
done

python3 - "$work" "$ROUNDS" <<'PY'
import re, statistics, sys
w, rounds = sys.argv[1], int(sys.argv[2])
def e2e(d, p):
    text = open(f"{d}/e2e{p}").read()
    n, s = re.search(r"steady (\d+) runs in ([\d.]+) s", text).groups()
    cpu, rss = re.search(r"= ([\d.]+) ms/run; peak RSS ([\d.]+) MiB", text).groups()
    return int(n) / float(s), float(cpu), float(rss)
def shares(d, phase):
    return {k: float(v) for _, k, v in (l.split() for l in open(f"{d}/cpu_{phase}") if l.startswith("cpu "))}
service = {"store": "postgres", "s3": "s3s-fs", "amqp": "rabbitmq"}
def measure(d):
    """One round: its ceilings, the end-to-end rates against them, and each service's CPU
    per run in its ceiling's loop and at prefetch 32."""
    c = {}
    for line in open(f"{d}/out"):
        if line.startswith("ceiling "):
            _, k, v = line.split()
            c[k] = float(v)
    store = max(c["store_c8"], c["store_c32"])
    cost = {"s3": c["uploads_per_run"] / c["s3_put"], "store": 1 / store, "amqp": 1 / c["amqp"]}
    C = 1 / sum(cost.values())
    C32 = 1 / (cost["store"] + cost["amqp"] + c["uploads_per_run"] / max(c["s3_put"], c["s3_put_c32"]))
    r = {p: e2e(d, p) for p in (8, 32)}
    # CPU per run (ms) of each service: in its ceiling's loop (the store ceiling whose
    # rate is used), each loop's cores times its cost per run, and at prefetch 32, where
    # they all share the machine with the worker.
    phase = {"store": "store8" if c["store_c8"] >= c["store_c32"] else "store32", "s3": "s3", "amqp": "amqp"}
    loops = {k: shares(d, phase[k]) for k in cost}
    per_run = {service[k]: 1000 * loops[k][service[k]] * cost[k] for k in service}
    per_run["client"] = 1000 * sum(loops[k]["store_loop"] * cost[k] for k in cost)
    e = shares(d, "e2e32")
    at32 = {s: 1000 * e["k6-ingest" if s == "client" else s] / r[32][0] for s in per_run}
    return dict(c=c, cost=cost, C=C, C32=C32, r=r, per_run=per_run, at32=at32,
                other=1000 * e["other"] / r[32][0], p8=r[8][0] / C, p32=r[32][0] / C)
R = [measure(f"{w}/round{i}") for i in range(1, rounds + 1)]
for i, m in enumerate(R, 1):
    c, r = m["c"], m["r"]
    print(f"round {i}: store {c['store_c8']:.0f} / {c['store_c32']:.0f} runs/s (8 / 32), S3 {c['s3_put']:.0f}/s "
          f"({c['s3_put_c32']:.0f}/s at 32), broker {c['amqp']:.0f}/s; cost per run: "
          + ", ".join(f"{k} {v * 1000:.3f} ms" for k, v in m["cost"].items())
          + f"; combined ceiling {m['C']:.0f} runs/s ({m['C32']:.0f} with S3 at 32); "
          f"e2e prefetch 8 {r[8][0]:.0f} runs/s = {100 * m['p8']:.0f}%, prefetch 32 {r[32][0]:.0f} runs/s = "
          f"{100 * m['p32']:.0f}% ({100 * r[32][0] / m['C32']:.0f}% with S3 at 32)")
# The round whose prefetch-32 ratio is the median speaks for the CPU shares.
mid = sorted(R, key=lambda m: m["p32"])[(len(R) - 1) // 2]
print(f"CPU per run in round {R.index(mid) + 1}, in the ceilings' loops -> at e2e prefetch 32 (the client: the "
      "bench's driver -> the worker): " + ", ".join(f"{k} {mid['per_run'][k]:.2f} -> {mid['at32'][k]:.2f} ms" for k in mid["per_run"])
      + f"; sum {sum(mid['per_run'].values()):.2f} -> {sum(mid['at32'].values()):.2f} ms; "
      f"other processes at prefetch 32 {mid['other']:.2f} ms")
rate1, cpu1, rss1 = e2e(w, 1)
print(f"e2e prefetch 1: {rate1:.1f} runs/s = {100 * rate1 / statistics.median(m['C'] for m in R):.0f}% of the median ceiling; "
      f"worker CPU {cpu1:.2f} ms/run; peak RSS {rss1:.0f} MiB")
for p in (8, 32):
    print(f"e2e prefetch {p}, medians: {statistics.median(m['r'][p][0] for m in R):.1f} runs/s; "
          f"worker CPU {statistics.median(m['r'][p][1] for m in R):.2f} ms/run; "
          f"peak RSS {statistics.median(m['r'][p][2] for m in R):.0f} MiB")
med = lambda f: statistics.median(f(m) for m in R)
print(f"medians of {rounds} rounds, each round's rates against its own ceiling:")
print(f"e2e prefetch 8: {med(lambda m: m['r'][8][0]):.0f} runs/s = {100 * med(lambda m: m['p8']):.0f}%, "
      f"prefetch 32: {med(lambda m: m['r'][32][0]):.0f} runs/s = {100 * med(lambda m: m['p32']):.0f}% "
      f"of the combined ceiling {med(lambda m: m['C']):.0f} runs/s; worker CPU {med(lambda m: m['r'][8][1]):.2f} ms/run; "
      f"peak RSS {med(lambda m: m['r'][8][2]):.0f} MiB")
PY
