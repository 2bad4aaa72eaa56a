//! `cargo bench --bench extract`: extraction cost against a baseline measured in the
//! same run on the same files.
//!
//! - summary: `parse_summary` + `extract` of every fixture summary, against plain
//!   `serde_json::from_slice::<Value>` of the same bytes (the least any reader must do);
//! - samples: `collect_samples` over a fixture's metrics.ndjson.gz, against gunzipping
//!   and splitting the same file into lines.
//!
//! Figures are medians of repeated rounds, printed as ratios to the baseline.

use std::hint::black_box;
use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k6_ingest::artifact::open_lines;
use k6_ingest::summary::samples::collect_samples;
use k6_ingest::summary::{extract, parse_summary, wanted_samples};

fn median_of(rounds: usize, mut f: impl FnMut()) -> Duration {
    let mut times: Vec<Duration> = (0..rounds)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    times.sort();
    times[rounds / 2]
}

fn summaries() -> Vec<Vec<u8>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/k6");
    let mut out = Vec::new();
    for v in ["v1.1.0", "v0.57.0"] {
        for e in std::fs::read_dir(root.join(v)).unwrap() {
            let p = e.unwrap().path().join("summary.json");
            if let Ok(b) = std::fs::read(p) {
                out.push(b);
            }
        }
    }
    out
}

fn main() {
    let docs = summaries();
    let bytes: usize = docs.iter().map(Vec::len).sum();
    let reps = 200;
    let baseline = median_of(15, || {
        for _ in 0..reps {
            for d in &docs {
                black_box(serde_json::from_slice::<serde_json::Value>(d).unwrap());
            }
        }
    });
    let ours = median_of(15, || {
        for _ in 0..reps {
            for d in &docs {
                let s = parse_summary(d).unwrap();
                black_box(extract(&s, Some(0), None));
            }
        }
    });
    let n = (docs.len() * reps) as f64;
    println!(
        "summary: {} documents ({} KiB): serde_json Value parse {:.1} µs/doc (baseline), parse+extract {:.1} µs/doc, ratio {:.2}",
        docs.len(),
        bytes / 1024,
        baseline.as_secs_f64() * 1e6 / n,
        ours.as_secs_f64() * 1e6 / n,
        ours.as_secs_f64() / baseline.as_secs_f64()
    );

    let dir: PathBuf =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/k6/v1.1.0/thresholds-fail");
    let metrics = dir.join("metrics.ndjson.gz");
    let summary = parse_summary(&std::fs::read(dir.join("summary.json")).unwrap()).unwrap();
    let requests = wanted_samples(&summary);
    let lines_baseline = median_of(31, || {
        let mut r = open_lines(&metrics).unwrap();
        let mut buf = Vec::new();
        let mut n = 0;
        while r.read_until(b'\n', &mut buf).unwrap() > 0 {
            n += 1;
            buf.clear();
        }
        black_box(n);
    });
    let sampled = median_of(31, || {
        black_box(collect_samples(open_lines(&metrics).unwrap(), &requests, usize::MAX).unwrap());
    });
    let mut raw = Vec::new();
    flate2::read::MultiGzDecoder::new(std::fs::File::open(&metrics).unwrap())
        .read_to_end(&mut raw)
        .unwrap();
    println!(
        "samples: {} lines ({} KiB inflated): gunzip+split {:.2} ms (baseline), collect_samples {:.2} ms, ratio {:.2}",
        raw.iter().filter(|b| **b == b'\n').count(),
        raw.len() / 1024,
        lines_baseline.as_secs_f64() * 1e3,
        sampled.as_secs_f64() * 1e3,
        sampled.as_secs_f64() / lines_baseline.as_secs_f64()
    );
}
