//! `cargo bench --bench split_merge`: the exact percentiles of a run split across 4
//! runners, 25 million samples per part (`SPLIT_BENCH_SAMPLES_PER_PART` to change),
//! merged the way the worker merges parts, against a plain in-memory sort of the same
//! 100 million values measured in the same run.
//!
//! Each side runs in a child process of its own (this binary, re-executed), so the
//! peak RSS of each is the kernel's figure for that process alone (`wait4` rusage
//! `ru_maxrss`). The merge side collects every part into a `SampleSink` with the worker's
//! share of its default buffer for one of 4 parts (sorted runs spill to temporary files), joins the four
//! `SortedSamples` with `SortedSamples::merge` and computes p(50), p(90), p(95), p(99)
//! in one merge walk. The sort side holds all values in one `Vec<f64>` and sorts it.
//! Both must give the same percentiles; the merge must stay within 64 MiB peak RSS.
//!
//! The values are generated (a fixed xorshift stream per part, each part with its own
//! offset, so the union differs from every part): reading k6's ndjson is measured by
//! `--bench extract`, this measures the merge.

use std::process::Command;
use std::time::Instant;

use k6_ingest::summary::sink::{SampleSink, SortedSamples};

const PARTS: u64 = 4;
const PERCENTILES: [f64; 4] = [50.0, 90.0, 95.0, 99.0];
/// The worker's default `fetch.samples_buffer_bytes`.
const BUDGET: usize = 16 * 1024 * 1024;
const RSS_LIMIT_KIB: i64 = 64 * 1024;

fn per_part() -> u64 {
    std::env::var("SPLIT_BENCH_SAMPLES_PER_PART")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(25_000_000)
}

/// Part `p`'s values: a latency-like spread (0..1000 ms, skewed) plus 100 ms per part.
fn values(p: u64, n: u64) -> impl Iterator<Item = f64> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (p + 1).wrapping_mul(0xD1B5_4A32_D192_ED03);
    (0..n).map(move |_| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let u = (x >> 11) as f64 / (1u64 << 53) as f64;
        u * u * 1000.0 + 100.0 * p as f64
    })
}

fn k6_percentile(sorted: &[f64], p: f64) -> f64 {
    let n = sorted.len();
    if n == 0 {
        return 0.0;
    }
    let i = p / 100.0 * (n - 1) as f64;
    let (lo, hi) = (i.floor() as usize, i.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (i - i.floor())
}

fn child_merge(n: u64) {
    let t = Instant::now();
    let mut parts = Vec::new();
    for p in 0..PARTS {
        // One part at a time, as the worker reads one part's file at a time.
        // The worker gives each part an equal share of one buffer.
        let mut sink = SampleSink::new(BUDGET / PARTS as usize);
        for v in values(p, n) {
            sink.push(v).expect("spill");
        }
        parts.push(sink.finish().expect("finish"));
    }
    let merged = SortedSamples::merge(parts);
    let ps = merged.percentiles(&PERCENTILES).expect("merge walk");
    let secs = t.elapsed().as_secs_f64();
    println!("{secs} {} {}", merged.count(), join(&ps));
}

fn child_sort(n: u64) {
    let t = Instant::now();
    let mut all: Vec<f64> = Vec::with_capacity((n * PARTS) as usize);
    for p in 0..PARTS {
        all.extend(values(p, n));
    }
    all.sort_unstable_by(f64::total_cmp);
    let ps: Vec<f64> = PERCENTILES
        .iter()
        .map(|p| k6_percentile(&all, *p))
        .collect();
    let secs = t.elapsed().as_secs_f64();
    println!("{secs} {} {}", all.len(), join(&ps));
}

fn join(ps: &[f64]) -> String {
    ps.iter()
        .map(|v| format!("{v:?}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Runs this binary as `--child MODE` and returns its output line and peak RSS (KiB).
fn run_child(mode: &str) -> (f64, u64, String, i64) {
    #[expect(
        clippy::zombie_processes,
        reason = "reaped by wait4 below, which also reports its peak RSS"
    )]
    let child = Command::new(std::env::current_exe().unwrap())
        .args(["--child", mode])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as libc::pid_t;
    let mut out = child.stdout.unwrap();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut out, &mut text).unwrap();
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to fill.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: pid is our own child, not yet reaped; both pointers are valid.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(r, pid, "wait4");
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{mode} child failed"
    );
    let mut f = text.split_whitespace();
    let secs: f64 = f.next().unwrap().parse().unwrap();
    let count: u64 = f.next().unwrap().parse().unwrap();
    let ps = f.next().unwrap().to_string();
    (secs, count, ps, usage.ru_maxrss)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n = per_part();
    if let Some(i) = args.iter().position(|a| a == "--child") {
        match args[i + 1].as_str() {
            "merge" => child_merge(n),
            _ => child_sort(n),
        }
        return;
    }
    // `cargo bench` passes `--bench`; nothing else is expected.
    println!("split merge: {PARTS} parts x {n} samples");
    let (ms, mc, mp, mrss) = run_child("merge");
    let (ss, sc, sp, srss) = run_child("sort");
    assert_eq!(mc, PARTS * n);
    assert_eq!(sc, PARTS * n);
    assert_eq!(mp, sp, "merged percentiles differ from the plain sort's");
    println!("percentiles p(50),p(90),p(95),p(99): {mp} (identical on both sides)");
    println!(
        "merge (SampleSink + SortedSamples::merge): {:>6.2} s  {:>12.0} samples/s  peak RSS {} KiB",
        ms,
        mc as f64 / ms,
        mrss
    );
    println!(
        "plain in-memory sort_unstable:            {:>6.2} s  {:>12.0} samples/s  peak RSS {} KiB",
        ss,
        sc as f64 / ss,
        srss
    );
    println!("merge / sort throughput: {:.2}", ss / ms);
    if mrss > RSS_LIMIT_KIB {
        eprintln!("merge peak RSS {mrss} KiB is above the {RSS_LIMIT_KIB} KiB limit");
        std::process::exit(1);
    }
}
