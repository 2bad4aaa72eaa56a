#!/usr/bin/env python3
"""cpu-share.py — CPU used by each service's processes over a window, from /proc.

    scripts/cpu-share.py [--after PATTERN] DELAY SECONDS

Waits for a process whose command line contains PATTERN (if given), then DELAY
seconds (past start-up and connection set-up), then reads utime+stime of every process
twice, SECONDS apart. Prints one line per group, the CPU it used in cores (1.0 = one
core busy for the whole window):

    cpu postgres 0.947

Groups: postgres (every backend), s3s-fs, rabbitmq (beam.smp and its helpers),
k6-ingest (the worker), store_loop (the bench's driver), other (the rest, this
sampler included). A process that starts or ends inside the window counts for the part
it was alive. Used by scripts/bench-e2e.sh to put each service's CPU per run in the
ceilings beside the same in the end-to-end run: on a 2-core machine the gap between
the two is where the end-to-end rate goes.
"""
import os
import sys
import time

GROUPS = [
    ("postgres", ("postgres",)),
    ("s3s-fs", ("s3s-fs",)),
    ("rabbitmq", ("beam.smp", "erl_child_setup", "inet_gethost", "epmd")),
    ("k6-ingest", ("k6-ingest",)),
    ("store_loop", ("store_loop",)),
]


def group_of(name):
    for group, prefixes in GROUPS:
        if any(name.startswith(p) for p in prefixes):
            return group
    return "other"


def ticks():
    """utime+stime per pid, with its group."""
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # The name is in parentheses and may hold spaces; the fields follow the last ')'.
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        out[pid] = (group_of(name), int(fields[11]) + int(fields[12]))
    return out


def running(pattern):
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if pattern.encode() in f.read().replace(b"\0", b" "):
                    return True
        except OSError:
            continue
    return False


def main(argv):
    pattern = None
    if argv[:1] == ["--after"]:
        pattern, argv = argv[1], argv[2:]
    delay, secs = float(argv[0]), float(argv[1])
    if pattern:
        deadline = time.time() + 600
        while not running(pattern):
            if time.time() > deadline:
                sys.exit(f"cpu-share: no process matching {pattern!r} within 600 s")
            time.sleep(0.05)
    time.sleep(delay)
    before, t0 = ticks(), time.time()
    time.sleep(secs)
    after, t1 = ticks(), time.time()
    hz = os.sysconf("SC_CLK_TCK")
    used = {}
    for pid, (group, t) in after.items():
        used[group] = used.get(group, 0) + t - before.get(pid, (group, 0))[1]
    for group, _ in GROUPS + [("other", ())]:
        print(f"cpu {group} {used.get(group, 0) / hz / (t1 - t0):.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
