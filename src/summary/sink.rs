//! Exact percentiles over any number of samples in bounded memory.
//!
//! k6 keeps every trend sample and interpolates linearly between closest ranks, so an
//! exact percentile needs the samples in order. Holding them all costs 8 bytes each (a
//! long run has tens of millions), so a [`SampleSink`] keeps at most its budget in memory,
//! sorts what it holds when the budget is full and spills it to an anonymous temporary
//! file as raw `f64`; [`SortedSamples::percentiles`] then walks a k-way merge of the
//! sorted runs once and picks every requested rank. Count, min, max and sum are kept
//! while streaming, so they need no second pass.
//!
//! This is the one place under `summary/` that touches the file system: the temporary
//! files are anonymous (deleted by the kernel when closed) and private to the process.
//!
//! Several sinks (one per runner of a split run) merge exactly: [`SortedSamples::merge`]
//! joins their sorted runs, and a percentile of the merge is the percentile of the union.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{self, BufWriter, Write};

/// Samples are spilled in runs of at least this many values, whatever the budget: a
/// smaller run costs more in file handles and merge fan-in than it saves.
const MIN_RUN: usize = 1024;
/// Runs merge in tiers, like a log-structured merge: this many runs of one tier become
/// one run of the next. Every sample is rewritten once per tier (log₃₂ of the number of
/// spills), and a sink keeps fewer than `FAN_IN` runs per tier: a percentile walk reads
/// from a bounded number of files, each through a `READ_BUF` buffer.
const FAN_IN: usize = 32;
/// Read buffer per run during a merge.
const READ_BUF: usize = 32 * 1024;

/// A `f64` ordered by `total_cmp`: the order `sort_by(f64::total_cmp)` gives.
#[derive(Debug, Clone, Copy)]
struct Key(f64);

impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        self.0.total_cmp(&other.0) == Ordering::Equal
    }
}
impl Eq for Key {}
impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Key {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// Count, min, max and sum, exact while streaming.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
struct Stats {
    count: u64,
    min: f64,
    max: f64,
    sum: f64,
}

impl Stats {
    fn add(&mut self, v: f64) {
        if self.count == 0 {
            self.min = v;
            self.max = v;
        } else {
            if v.total_cmp(&self.min) == Ordering::Less {
                self.min = v;
            }
            if v.total_cmp(&self.max) == Ordering::Greater {
                self.max = v;
            }
        }
        self.count += 1;
        self.sum += v;
    }

    fn join(&mut self, o: &Stats) {
        if o.count == 0 {
            return;
        }
        if self.count == 0 {
            *self = *o;
            return;
        }
        if o.min.total_cmp(&self.min) == Ordering::Less {
            self.min = o.min;
        }
        if o.max.total_cmp(&self.max) == Ordering::Greater {
            self.max = o.max;
        }
        self.count += o.count;
        self.sum += o.sum;
    }
}

/// A sorted run of samples in an anonymous temporary file, as little-endian `f64`.
#[derive(Debug)]
struct Run {
    file: File,
    len: u64,
    /// 0 for a spilled buffer, n + 1 for a merge of `FAN_IN` runs of tier n.
    tier: u32,
}

/// Collects samples within a memory budget; see the module documentation.
#[derive(Debug)]
pub struct SampleSink {
    buf: Vec<f64>,
    /// The radix sort's second buffer, as long as `buf` when in use.
    scratch: Vec<u64>,
    cap: usize,
    runs: Vec<Run>,
    stats: Stats,
}

impl SampleSink {
    /// A sink that holds at most `budget_bytes` in memory (never less than `MIN_RUN`
    /// samples): half of it samples, half the sort's second buffer. The rest spills to
    /// temporary files.
    pub fn new(budget_bytes: usize) -> Self {
        let cap = (budget_bytes / (2 * size_of::<f64>())).max(MIN_RUN);
        Self {
            buf: Vec::new(),
            scratch: Vec::new(),
            cap,
            runs: Vec::new(),
            stats: Stats::default(),
        }
    }

    pub fn push(&mut self, v: f64) -> io::Result<()> {
        if self.buf.len() >= self.cap {
            self.spill()?;
        }
        if self.buf.capacity() == self.buf.len() {
            // Grow in steps but never past the budget: no doubling beyond `cap`.
            let want = (self.buf.len().max(MIN_RUN) * 2).min(self.cap);
            self.buf.reserve_exact(want - self.buf.len());
        }
        self.buf.push(v);
        self.stats.add(v);
        Ok(())
    }

    pub fn len(&self) -> u64 {
        self.stats.count
    }

    pub fn is_empty(&self) -> bool {
        self.stats.count == 0
    }

    /// Runs spilled to disk so far (for tests and diagnostics).
    pub fn spilled_runs(&self) -> usize {
        self.runs.len()
    }

    fn spill(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        sort_total(&mut self.buf, &mut self.scratch);
        let run = write_run(self.buf.iter().map(|&v| Ok(v)), self.buf.len() as u64)?;
        self.buf.clear();
        self.runs.push(run);
        // Runs of one tier are always the newest ones: merge them while a tier is full.
        loop {
            let tier = self.runs.last().map_or(0, |r| r.tier);
            let same = self
                .runs
                .iter()
                .rev()
                .take_while(|r| r.tier == tier)
                .count();
            if same < FAN_IN {
                return Ok(());
            }
            let full = self.runs.split_off(self.runs.len() - same);
            let len = full.iter().map(|r| r.len).sum();
            let mut run = write_run(MergeIter(Merge::new(&full, &[])?), len)?;
            run.tier = tier + 1;
            self.runs.push(run);
        }
    }

    /// Sorts what is left. When anything was spilled, the rest is spilled too, so a
    /// finished set that lives on disk holds no samples in memory at all.
    pub fn finish(mut self) -> io::Result<SortedSamples> {
        if !self.runs.is_empty() {
            self.spill()?;
            self.buf = Vec::new();
        } else {
            sort_total(&mut self.buf, &mut self.scratch);
            self.scratch = Vec::new();
            self.buf.shrink_to_fit();
        }
        Ok(SortedSamples {
            memory: if self.buf.is_empty() {
                Vec::new()
            } else {
                vec![self.buf]
            },
            runs: self.runs,
            stats: self.stats,
        })
    }
}

/// Sorts in `f64::total_cmp` order with an LSD radix sort over the order-preserving
/// integer image of each value (four passes of 16 bits): linear time, and no comparison
/// callback per element, so it stays fast in unoptimised test builds too.
///
/// Each pass costs a fixed walk over its 65,536 buckets, about as much as sorting that
/// many values by comparison: below that size (a typical run's few thousand samples) a
/// comparison sort is the cheaper one, in the same order.
fn sort_total(values: &mut [f64], scratch: &mut Vec<u64>) {
    const BITS: u32 = 16;
    const BUCKETS: usize = 1 << BITS;
    if values.len() < BUCKETS {
        values.sort_unstable_by(f64::total_cmp);
        return;
    }
    // `total_cmp`'s own mapping: flip every bit of negatives, only the sign of the rest.
    let key = |v: f64| {
        let b = v.to_bits();
        b ^ ((((b as i64) >> 63) as u64) >> 1) ^ (1 << 63)
    };
    let from_key = |k: u64| {
        let b = k ^ (1 << 63);
        f64::from_bits(b ^ ((((b as i64) >> 63) as u64) >> 1))
    };
    let n = values.len();
    // SAFETY: f64 and u64 have the same size and alignment and every bit pattern is
    // valid for both, so the whole slice is reinterpreted (head and tail are empty).
    let (_, a, _) = unsafe { values.align_to_mut::<u64>() };
    for k in a.iter_mut() {
        *k = key(f64::from_bits(*k));
    }
    scratch.clear();
    scratch.resize(n, 0);
    let mut counts = vec![0usize; BUCKETS];
    let mut in_scratch = false;
    for pass in 0..64 / BITS {
        let shift = pass * BITS;
        let (src, dst): (&[u64], &mut [u64]) = if in_scratch {
            (scratch.as_slice(), &mut *a)
        } else {
            (&*a, scratch.as_mut_slice())
        };
        counts.fill(0);
        for &k in src {
            counts[((k >> shift) as usize) & (BUCKETS - 1)] += 1;
        }
        if counts.contains(&n) {
            continue; // every key has the same digit here
        }
        let mut sum = 0;
        for c in counts.iter_mut() {
            let here = *c;
            *c = sum;
            sum += here;
        }
        for &k in src {
            let d = ((k >> shift) as usize) & (BUCKETS - 1);
            dst[counts[d]] = k;
            counts[d] += 1;
        }
        in_scratch = !in_scratch;
    }
    if in_scratch {
        a.copy_from_slice(scratch);
    }
    for k in a.iter_mut() {
        *k = from_key(*k).to_bits();
    }
}

fn write_run(values: impl Iterator<Item = io::Result<f64>>, len: u64) -> io::Result<Run> {
    let file = tempfile::tempfile()?;
    let mut w = BufWriter::with_capacity(64 * 1024, file);
    let mut written = 0u64;
    for v in values {
        w.write_all(&v?.to_le_bytes())?;
        written += 1;
    }
    debug_assert_eq!(written, len);
    let file = w.into_inner().map_err(io::IntoInnerError::into_error)?;
    Ok(Run {
        file,
        len: written,
        tier: 0,
    })
}

/// Samples in order, in memory or in sorted runs on disk; percentiles by one merge walk.
#[derive(Debug, Default)]
pub struct SortedSamples {
    /// Sorted in-memory runs (at most one per merged sink that never spilled).
    memory: Vec<Vec<f64>>,
    runs: Vec<Run>,
    stats: Stats,
}

impl SortedSamples {
    /// The union of several sets: percentiles of the result are those of all samples
    /// together, exactly. The sum is the sum of the parts' sums.
    pub fn merge(parts: impl IntoIterator<Item = SortedSamples>) -> SortedSamples {
        let mut out = SortedSamples::default();
        for p in parts {
            out.memory.extend(p.memory);
            out.runs.extend(p.runs);
            out.stats.join(&p.stats);
        }
        out
    }

    pub fn count(&self) -> u64 {
        self.stats.count
    }

    /// The smallest sample (in `total_cmp` order), if any.
    pub fn min(&self) -> Option<f64> {
        (self.stats.count > 0).then_some(self.stats.min)
    }

    pub fn max(&self) -> Option<f64> {
        (self.stats.count > 0).then_some(self.stats.max)
    }

    pub fn sum(&self) -> f64 {
        self.stats.sum
    }

    pub fn mean(&self) -> Option<f64> {
        (self.stats.count > 0).then(|| self.stats.sum / self.stats.count as f64)
    }

    /// k6's percentile of the samples; see [`SortedSamples::percentiles`].
    pub fn percentile(&self, p: f64) -> io::Result<f64> {
        Ok(self.percentiles(&[p])?[0])
    }

    /// k6's percentiles (`p` in 0..=100): 0 samples → 0, 1 sample → that sample, else
    /// linear interpolation between closest ranks at `i = p·(n−1)`; the same arithmetic
    /// as [`super::samples::percentile`] over the sorted samples, so the same numbers.
    /// One merge walk serves every `p`.
    pub fn percentiles(&self, ps: &[f64]) -> io::Result<Vec<f64>> {
        let n = self.stats.count;
        if n == 0 {
            return Ok(vec![0.0; ps.len()]);
        }
        if n == 1 {
            return Ok(vec![self.stats.min; ps.len()]);
        }
        let positions: Vec<(f64, u64, u64)> = ps
            .iter()
            .map(|p| {
                let i = (p / 100.0) * (n - 1) as f64;
                let lo = (i.floor() as u64).min(n - 1);
                let hi = (i.ceil() as u64).min(n - 1);
                (i, lo, hi)
            })
            .collect();
        let mut ranks: Vec<u64> = positions.iter().flat_map(|&(_, l, h)| [l, h]).collect();
        ranks.sort_unstable();
        ranks.dedup();
        let values = self.at_ranks(&ranks)?;
        let at = |r: u64| values[ranks.binary_search(&r).expect("rank was requested")];
        Ok(positions
            .iter()
            .map(|&(i, lo, hi)| at(lo) + (at(hi) - at(lo)) * (i - i.floor()))
            .collect())
    }

    /// The values at the given ranks (sorted, unique, each below `count`).
    fn at_ranks(&self, ranks: &[u64]) -> io::Result<Vec<f64>> {
        let mut out = Vec::with_capacity(ranks.len());
        if self.runs.is_empty() && self.memory.len() == 1 {
            let s = &self.memory[0];
            out.extend(ranks.iter().map(|&r| s[r as usize]));
            return Ok(out);
        }
        let mut want = ranks.iter().copied().peekable();
        let merge = Merge::new(&self.runs, &self.memory)?;
        for (rank, v) in (0u64..).zip(MergeIter(merge)) {
            let Some(&next) = want.peek() else { break };
            if rank == next {
                out.push(v?);
                want.next();
            } else {
                v?;
            }
        }
        if out.len() != ranks.len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "spilled samples ended early",
            ));
        }
        Ok(out)
    }
}

/// Reads one run back through a small buffer, by position, so a finished set can be
/// walked any number of times through a shared reference.
struct RunReader<'a> {
    file: &'a File,
    pos: u64,
    left: u64,
    buf: Vec<u8>,
    at: usize,
}

impl RunReader<'_> {
    fn next(&mut self) -> io::Result<Option<f64>> {
        use std::os::unix::fs::FileExt;
        if self.at == self.buf.len() {
            if self.left == 0 {
                return Ok(None);
            }
            let want = (self.left * 8).min(READ_BUF as u64) as usize;
            self.buf.resize(want, 0);
            self.file.read_exact_at(&mut self.buf, self.pos)?;
            self.pos += want as u64;
            self.left -= want as u64 / 8;
            self.at = 0;
        }
        let bytes: [u8; 8] = self.buf[self.at..self.at + 8].try_into().expect("8 bytes");
        self.at += 8;
        Ok(Some(f64::from_le_bytes(bytes)))
    }
}

enum Source<'a> {
    Memory(std::slice::Iter<'a, f64>),
    File(RunReader<'a>),
}

impl Source<'_> {
    fn next(&mut self) -> io::Result<Option<f64>> {
        match self {
            Self::Memory(it) => Ok(it.next().copied()),
            Self::File(r) => r.next(),
        }
    }
}

/// A k-way merge of sorted sources.
struct Merge<'a> {
    sources: Vec<Source<'a>>,
    heap: BinaryHeap<Reverse<(Key, usize)>>,
}

impl<'a> Merge<'a> {
    fn new(runs: &'a [Run], memory: &'a [Vec<f64>]) -> io::Result<Self> {
        let mut sources: Vec<Source<'a>> =
            memory.iter().map(|m| Source::Memory(m.iter())).collect();
        sources.extend(runs.iter().map(|r| {
            Source::File(RunReader {
                file: &r.file,
                pos: 0,
                left: r.len,
                buf: Vec::new(),
                at: 0,
            })
        }));
        let mut heap = BinaryHeap::with_capacity(sources.len());
        for (i, s) in sources.iter_mut().enumerate() {
            if let Some(v) = s.next()? {
                heap.push(Reverse((Key(v), i)));
            }
        }
        Ok(Self { sources, heap })
    }

    fn next(&mut self) -> io::Result<Option<f64>> {
        let Some(Reverse((Key(v), i))) = self.heap.pop() else {
            return Ok(None);
        };
        if let Some(n) = self.sources[i].next()? {
            self.heap.push(Reverse((Key(n), i)));
        }
        Ok(Some(v))
    }
}

struct MergeIter<'a>(Merge<'a>);

impl Iterator for MergeIter<'_> {
    type Item = io::Result<f64>;
    fn next(&mut self) -> Option<Self::Item> {
        self.0.next().transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::summary::samples::percentile;
    use proptest::prelude::*;

    fn sorted(v: &[f64]) -> Vec<f64> {
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        s
    }

    const PS: [f64; 9] = [0.0, 1.0, 25.0, 50.0, 90.0, 95.0, 99.0, 99.9, 100.0];

    fn check(values: &[f64], budget: usize) -> usize {
        let mut sink = SampleSink::new(budget);
        for &v in values {
            sink.push(v).unwrap();
        }
        let spilled = sink.spilled_runs();
        let s = sink.finish().unwrap();
        let want = sorted(values);
        assert_eq!(s.count(), values.len() as u64);
        assert_eq!(s.min(), want.first().copied());
        assert_eq!(s.max(), want.last().copied());
        let got = s.percentiles(&PS).unwrap();
        for (p, g) in PS.iter().zip(got) {
            assert_eq!(g.to_bits(), percentile(&want, *p).to_bits(), "p({p})");
        }
        spilled
    }

    #[test]
    fn spills_and_still_matches_the_in_memory_sort() {
        let values: Vec<f64> = (0..200_000u64)
            .map(|i| ((i * 2_654_435_761) % 1_000_003) as f64 / 7.0)
            .collect();
        // 1024 samples per run: ~195 runs, merged in tiers on the way.
        assert!(check(&values, 0) > 1);
        assert_eq!(check(&values, 16 << 20), 0);
        check(&[], 0);
        check(&[3.5], 0);
    }

    #[test]
    fn both_sorts_give_total_cmp_order_on_either_side_of_the_switch() {
        let specials = [
            f64::NAN,
            -f64::NAN,
            -0.0,
            0.0,
            f64::INFINITY,
            f64::NEG_INFINITY,
        ];
        for n in [1000usize, 70_000] {
            let mut values: Vec<f64> = (0..n as u64)
                .map(|i| ((i * 2_654_435_761) % 1_000_003) as f64 / 7.0 - 5e4)
                .chain(specials)
                .collect();
            let mut want = values.clone();
            want.sort_unstable_by(f64::total_cmp);
            sort_total(&mut values, &mut Vec::new());
            let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&values), bits(&want), "{n} values");
        }
    }

    #[test]
    fn merged_sinks_equal_one_sink_over_the_union() {
        let mut parts = Vec::new();
        let mut all = Vec::new();
        for k in 0..4u64 {
            let mut sink = SampleSink::new(if k % 2 == 0 { 0 } else { 1 << 20 });
            for i in 0..5000u64 {
                let v = ((i * 7919 + k * 104_729) % 10_007) as f64 * 0.25;
                sink.push(v).unwrap();
                all.push(v);
            }
            parts.push(sink.finish().unwrap());
        }
        let merged = SortedSamples::merge(parts);
        let want = sorted(&all);
        assert_eq!(merged.count(), 20_000);
        for p in PS {
            assert_eq!(
                merged.percentile(p).unwrap().to_bits(),
                percentile(&want, p).to_bits()
            );
        }
        assert_eq!(merged.min(), Some(want[0]));
        assert_eq!(merged.max(), Some(want[want.len() - 1]));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn bounded_percentiles_equal_the_in_memory_sort(
            values in proptest::collection::vec(
                prop_oneof![
                    (-1e6f64..1e6f64),
                    (0u32..50).prop_map(f64::from),
                    Just(0.0f64),
                    Just(-0.0f64),
                ],
                0..5000,
            ),
            budget_runs in 0usize..4,
        ) {
            // Budgets of 1024 to 4096 samples: inputs cross zero to several spills.
            check(&values, budget_runs * 1024 * 8);
        }
    }
}
