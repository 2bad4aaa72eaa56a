//! Raw samples from `k6 run --out json` (metrics.ndjson), used to fill in percentiles a
//! summary did not report (default summaries have no p(99)).
//!
//! k6 keeps every trend sample and interpolates linearly between closest ranks
//! (`i = p·(n−1)`), so the same arithmetic over the same samples gives k6's number
//! exactly. The reader is generic over `BufRead`: callers decide where bytes come from.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::io::BufRead;

use serde::Deserialize;

use super::sink::{SampleSink, SortedSamples};

/// Which metric (and submetric tag filter) to collect samples for, and which
/// percentiles of it extraction may ask for.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleRequest {
    /// The summary key, e.g. `http_req_duration{status:200}`.
    pub key: String,
    pub base_name: String,
    pub tags: BTreeMap<String, String>,
    /// Percentiles (0..=100) computed exactly from the samples; others are not available.
    pub percentiles: Vec<f64>,
}

/// What a samples file may cost. Every limit is enforced while the file streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SampleLimits {
    /// Samples kept over all keys; reaching it stops reading (`truncated`).
    pub max_samples: usize,
    /// A longer line is skipped in bounded chunks, never buffered whole, and counted as bad.
    pub max_line_bytes: usize,
    /// Samples held in memory over all keys before sorted runs spill to temporary files.
    pub buffer_bytes: usize,
}

impl Default for SampleLimits {
    /// The compiled-in defaults of `fetch.max_samples`, `fetch.max_line_bytes` and
    /// `fetch.samples_buffer_bytes`.
    fn default() -> Self {
        Self {
            max_samples: 50_000_000,
            max_line_bytes: 1024 * 1024,
            buffer_bytes: 16 * 1024 * 1024,
        }
    }
}

/// Order statistics of one key's samples: count, min, max, sum and the requested
/// percentiles, all exact. Small and plain, so extraction stays free of I/O.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SampleStats {
    pub count: u64,
    pub min: f64,
    pub max: f64,
    pub sum: f64,
    percentiles: Vec<(f64, f64)>,
}

impl SampleStats {
    /// The statistics of sorted samples, with the percentiles `ps` (0..=100).
    pub fn of_sorted(sorted: &SortedSamples, ps: &[f64]) -> std::io::Result<Self> {
        let values = sorted.percentiles(ps)?;
        Ok(Self {
            count: sorted.count(),
            min: sorted.min().unwrap_or_default(),
            max: sorted.max().unwrap_or_default(),
            sum: sorted.sum(),
            percentiles: ps.iter().copied().zip(values).collect(),
        })
    }

    /// k6's percentile `p`, if it was requested (see [`SampleRequest::percentiles`]).
    pub fn percentile(&self, p: f64) -> Option<f64> {
        self.percentiles
            .iter()
            .find(|(q, _)| q.to_bits() == p.to_bits())
            .map(|(_, v)| *v)
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

/// Sample statistics per requested key.
#[derive(Debug, Default, Clone)]
pub struct SampleSets {
    pub sets: HashMap<String, SampleStats>,
    /// Lines that were not valid JSON (k6 writes `+Inf` bare), were cut short or were
    /// longer than the line limit.
    pub bad_lines: u64,
    /// Base names mentioned on bad lines: their sample sets are incomplete.
    pub tainted: Vec<String>,
    /// Set when reading stopped at the sample cap; the sets are then incomplete.
    pub truncated: bool,
    /// Requested keys beyond [`MAX_SAMPLE_KEYS`], not collected.
    pub skipped: Vec<String>,
}

/// Samples are collected for at most this many keys of one run (real runs need one to a
/// few): each key gets an equal share of the buffer and its own temporary files, so the
/// share and the number of open files stay bounded.
pub const MAX_SAMPLE_KEYS: usize = 32;

impl SampleSets {
    /// Statistics of a key, if its samples were collected completely.
    pub fn complete(&self, key: &str, base_name: &str) -> Option<&SampleStats> {
        if self.truncated || self.tainted.iter().any(|t| t == base_name) {
            return None;
        }
        self.sets.get(key)
    }
}

#[derive(Deserialize, Default)]
struct Line<'a> {
    #[serde(borrow)]
    metric: Cow<'a, str>,
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    data: Option<Point<'a>>,
}

#[derive(Deserialize)]
struct Point<'a> {
    value: Option<f64>,
    #[serde(borrow, default)]
    tags: Option<HashMap<Cow<'a, str>, Cow<'a, str>>>,
}

/// Reads metrics.ndjson and keeps the samples the requests ask for, up to `max_samples`,
/// with the default line and buffer limits.
pub fn collect_samples<R: BufRead>(
    reader: R,
    requests: &[SampleRequest],
    max_samples: usize,
) -> std::io::Result<SampleSets> {
    let limits = SampleLimits {
        max_samples,
        ..SampleLimits::default()
    };
    collect_samples_with(reader, requests, &limits)
}

/// Reads metrics.ndjson within `limits` and returns exact statistics per request.
///
/// Memory is bounded whatever the file: one line of at most `max_line_bytes` is held at a
/// time, and samples beyond `buffer_bytes` spill to sorted runs on disk (see
/// [`super::sink`]). An I/O error (such as the inflated-size cap of the reader) is
/// returned as such: the caller then uses no samples at all.
pub fn collect_samples_with<R: BufRead>(
    reader: R,
    requests: &[SampleRequest],
    limits: &SampleLimits,
) -> std::io::Result<SampleSets> {
    let (mut out, sorted) = collect_sorted_with(reader, requests, limits)?;
    for (r, sorted) in requests.iter().filter_map(|r| {
        let i = sorted.iter().position(|(k, _)| *k == r.key)?;
        Some((r, &sorted[i].1))
    }) {
        if out.sets.contains_key(&r.key) {
            continue;
        }
        let percentiles = if out.truncated {
            &[][..]
        } else {
            &r.percentiles[..]
        };
        out.sets
            .insert(r.key.clone(), SampleStats::of_sorted(sorted, percentiles)?);
    }
    Ok(out)
}

/// Like [`collect_samples_with`], but hands back each key's sorted samples (in memory
/// or in sorted runs on disk) instead of their statistics, so that several files' sets
/// can be joined with [`SortedSamples::merge`] (the parts of a split run). The returned
/// `SampleSets` carries the file's flags (bad lines, truncation, skipped keys) and no
/// sets.
pub fn collect_sorted_with<R: BufRead>(
    mut reader: R,
    requests: &[SampleRequest],
    limits: &SampleLimits,
) -> std::io::Result<(SampleSets, Vec<(String, SortedSamples)>)> {
    if requests.is_empty() {
        return Ok((SampleSets::default(), Vec::new()));
    }
    let (keys, skipped) = distinct_keys(requests);
    let mut by_base: Vec<(&str, Vec<usize>)> = Vec::new();
    for (i, r) in keys.iter().enumerate() {
        let base = r.base_name.as_str();
        match by_base.iter_mut().find(|(b, _)| *b == base) {
            Some((_, idx)) => idx.push(i),
            None => by_base.push((base, vec![i])),
        }
    }
    // The budget is shared evenly: a key that gets no samples wastes its share, which
    // keeps the bound simple (the budget is a ceiling, not a target).
    let share = limits.buffer_bytes / keys.len();
    let mut state = Collector {
        out: SampleSets {
            skipped,
            ..SampleSets::default()
        },
        sinks: keys.iter().map(|_| SampleSink::new(share)).collect(),
        needles: by_base
            .iter()
            .map(|(base, _)| (*base, format!("\"metric\":\"{base}\"")))
            .collect(),
        by_base: &by_base,
        keys: &keys,
        kept: 0,
        max_samples: limits.max_samples,
    };
    read_lines(&mut reader, &mut state, limits.max_line_bytes)?;
    let Collector { out, sinks, .. } = state;
    let mut sorted = Vec::with_capacity(keys.len());
    for (r, sink) in keys.iter().zip(sinks) {
        sorted.push((r.key.clone(), sink.finish()?));
    }
    Ok((out, sorted))
}

/// The requests once per key, at most [`MAX_SAMPLE_KEYS`] of them; the keys left out
/// are named so the warning can list them.
fn distinct_keys(requests: &[SampleRequest]) -> (Vec<&SampleRequest>, Vec<String>) {
    let mut keys: Vec<&SampleRequest> = Vec::new();
    let mut skipped = Vec::new();
    for r in requests {
        if keys.iter().any(|k| k.key == r.key) {
            continue;
        }
        if keys.len() == MAX_SAMPLE_KEYS {
            skipped.push(r.key.clone());
            continue;
        }
        keys.push(r);
    }
    (keys, skipped)
}

/// Feeds every line to the collector until the file ends or the collector stops.
fn read_lines<R: BufRead>(
    reader: &mut R,
    state: &mut Collector<'_>,
    max_line: usize,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    loop {
        // A whole line inside the reader's buffer is used where it lies; only a line
        // that straddles two reads is copied, and then at most `max_line` of it.
        let step = {
            let chunk = match reader.fill_buf() {
                Ok(c) => c,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if chunk.is_empty() {
                return Ok(());
            }
            match memchr::memchr(b'\n', chunk) {
                Some(i) if i < max_line => Some((state.line(&chunk[..i])?, i + 1)),
                _ => None,
            }
        };
        let flow = match step {
            Some((flow, used)) => {
                reader.consume(used);
                flow
            }
            None => match read_bounded_line(reader, &mut buf, max_line)? {
                LineRead::Eof => return Ok(()),
                LineRead::Line => state.line(&buf)?,
                LineRead::TooLong => {
                    // Only the first `max_line_bytes` were kept: k6 writes `metric`
                    // first, so that prefix still names the metric the line belonged to.
                    state.out.bad_lines += 1;
                    taint(&mut state.out.tainted, &buf, &state.needles);
                    Flow::Go
                }
            },
        };
        if flow == Flow::Stop {
            return Ok(());
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    Go,
    /// The sample cap was reached.
    Stop,
}

/// What reading a samples file accumulates.
struct Collector<'r> {
    out: SampleSets,
    sinks: Vec<SampleSink>,
    /// `"metric":"NAME"` per requested base name: a bad line naming one taints it.
    needles: Vec<(&'r str, String)>,
    /// The keys' indices per base name: a list, not a map, since a run asks for at most
    /// [`MAX_SAMPLE_KEYS`] keys and every sample line looks its metric up here (hashing
    /// the name cost more than comparing it with a few).
    by_base: &'r [(&'r str, Vec<usize>)],
    keys: &'r [&'r SampleRequest],
    kept: usize,
    max_samples: usize,
}

impl Collector<'_> {
    fn line(&mut self, line: &[u8]) -> std::io::Result<Flow> {
        let line = trim_ascii(line);
        if line.is_empty() {
            return Ok(Flow::Go);
        }
        // k6's own encoding first (a few byte comparisons); any other shape goes
        // through the JSON parser, which decides what is valid.
        let fast = k6_point(line);
        let parsed: Line<'_> = match &fast {
            Some(_) => Line::default(),
            None => match serde_json::from_slice(line) {
                Ok(l) => l,
                Err(_) => {
                    self.out.bad_lines += 1;
                    taint(&mut self.out.tainted, line, &self.needles);
                    return Ok(Flow::Go);
                }
            },
        };
        let (metric, value, tags) = match &fast {
            Some(p) => (p.metric, p.value, Tags::Raw(p.tags)),
            None => {
                if parsed.kind != "Point" {
                    return Ok(Flow::Go);
                }
                let Some(point) = &parsed.data else {
                    return Ok(Flow::Go);
                };
                let Some(value) = point.value else {
                    return Ok(Flow::Go);
                };
                (
                    parsed.metric.as_ref(),
                    value,
                    Tags::Parsed(point.tags.as_ref()),
                )
            }
        };
        let Some((_, idx)) = self.by_base.iter().find(|(base, _)| *base == metric) else {
            return Ok(Flow::Go);
        };
        for &i in idx {
            let matches = self.keys[i]
                .tags
                .iter()
                .all(|(k, v)| tags.get(k).is_some_and(|sv| sv == v));
            if matches {
                if self.kept >= self.max_samples {
                    self.out.truncated = true;
                    return Ok(Flow::Stop);
                }
                self.kept += 1;
                self.sinks[i].push(value)?;
            }
        }
        Ok(Flow::Go)
    }
}

/// A sample line exactly as k6 encodes it:
/// `{"metric":"NAME","type":"Point","data":{"time":"T","value":V,"tags":{"K":"V",...}}}`,
/// in this key order, without whitespace, escapes or control characters in its strings.
/// Most of a metrics file has this shape and is read with a few byte comparisons; a line
/// of any other shape gives `None` and goes through the JSON parser. Whatever this accepts
/// is valid JSON that the parser would read to the same metric, value and tags.
#[derive(Debug, PartialEq)]
struct K6Point<'a> {
    metric: &'a str,
    value: f64,
    /// The inside of the `tags` object, checked to be `"K":"V"` pairs.
    tags: &'a str,
}

fn k6_point(line: &[u8]) -> Option<K6Point<'_>> {
    // JSON allows no control character in a string, and this shape has no whitespace
    // between tokens: none may occur anywhere. Nor may an escape: a line with a
    // backslash anywhere goes to the parser, so every string here ends at its next `"`.
    let line = match scan(line) {
        Scan::Ascii => {
            // SAFETY: every byte is below 0x80, and ASCII is valid UTF-8.
            unsafe { std::str::from_utf8_unchecked(line) }
        }
        Scan::Wide => std::str::from_utf8(line).ok()?,
        Scan::Unfit => return None,
    };
    let rest = line.strip_prefix(r#"{"metric":""#)?;
    let (metric, rest) = plain_string(rest)?;
    let rest = rest.strip_prefix(r#","type":"Point","data":{"time":""#)?;
    let (_, rest) = plain_string(rest)?;
    let rest = rest.strip_prefix(r#","value":"#)?;
    let end = memchr::memchr(b',', rest.as_bytes())?;
    let (number, rest) = rest.split_at(end);
    if !json_number(number) {
        return None;
    }
    // Correctly rounded, as serde_json's `float_roundtrip` parsing; out of range is
    // an error there, so it is left to the parser here.
    let value: f64 = number.parse().ok().filter(|v: &f64| v.is_finite())?;
    let tags = rest.strip_prefix(r#","tags":{"#)?.strip_suffix("}}}")?;
    if !tag_pairs(tags) {
        return None;
    }
    Some(K6Point {
        metric,
        value,
        tags,
    })
}

/// The text up to the next `"` and what follows it. The caller has checked that the
/// line holds no control character and no backslash, so the text needs no unescaping.
/// A plain scan, not `memchr`: tag keys and values are a few bytes long, and a line has
/// twenty of them, where `memchr`'s set-up costs more than the search.
fn plain_string(s: &str) -> Option<(&str, &str)> {
    let end = s.bytes().position(|b| b == b'"')?;
    Some((&s[..end], &s[end + 1..]))
}

/// Whether `"K":"V"` pairs separated by commas (or nothing) make up all of `tags`. The
/// line has no backslash (checked by [`scan`]), so every string ends at its next quote.
fn tag_pairs(tags: &str) -> bool {
    let mut pairs = tags;
    while !pairs.is_empty() {
        let Some((_, rest)) = pairs.strip_prefix('"').and_then(plain_string) else {
            return false;
        };
        let Some((_, rest)) = rest.strip_prefix(":\"").and_then(plain_string) else {
            return false;
        };
        pairs = match rest.strip_prefix(',') {
            Some(more) if !more.is_empty() => more,
            None if rest.is_empty() => rest,
            _ => return false,
        };
    }
    true
}

/// What one pass over a sample line found.
#[derive(Debug, PartialEq)]
enum Scan {
    /// Every byte is ASCII, none is a control character or a backslash.
    Ascii,
    /// No control character or backslash, but bytes past ASCII: UTF-8 still to check.
    Wide,
    /// A control character or a backslash: not k6's plain shape.
    Unfit,
}

/// Control characters, backslashes and bytes past ASCII in one pass, eight bytes at a
/// time: this runs for every sample line, and three separate searches (control bytes,
/// `\\`, UTF-8 validation) each read the whole line. For a word `x`,
/// `(x - 0x20…20) & !x & 0x80…80` is non-zero exactly when some byte is below 0x20 (a
/// borrow can only set bits above such a byte); the same test on `x ^ 0x5c…5c` finds a
/// backslash; `x & 0x80…80` a byte past ASCII.
fn scan(b: &[u8]) -> Scan {
    const LOW: u64 = 0x2020_2020_2020_2020;
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    const SLASH: u64 = 0x5c5c_5c5c_5c5c_5c5c;
    // SAFETY: every bit pattern is a valid u64; `align_to` only reinterprets the
    // aligned middle of the slice.
    let (head, words, tail) = unsafe { b.align_to::<u64>() };
    let mut wide = 0;
    for &x in words {
        let y = x ^ SLASH;
        if (x.wrapping_sub(LOW) & !x | y.wrapping_sub(ONES) & !y) & HIGH != 0 {
            return Scan::Unfit;
        }
        wide |= x;
    }
    for &c in head.iter().chain(tail) {
        if c < 0x20 || c == b'\\' {
            return Scan::Unfit;
        }
        wide |= u64::from(c);
    }
    if wide & HIGH != 0 {
        Scan::Wide
    } else {
        Scan::Ascii
    }
}

/// JSON's number grammar: `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`.
fn json_number(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = usize::from(b.first() == Some(&b'-'));
    let digits = |i: &mut usize| {
        let start = *i;
        while b.get(*i).is_some_and(u8::is_ascii_digit) {
            *i += 1;
        }
        *i > start
    };
    match b.get(i) {
        Some(b'0') => i += 1,
        Some(b'1'..=b'9') => {
            digits(&mut i);
        }
        _ => return false,
    }
    if b.get(i) == Some(&b'.') {
        i += 1;
        if !digits(&mut i) {
            return false;
        }
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        if !digits(&mut i) {
            return false;
        }
    }
    i == b.len()
}

/// A sample's tags, as the fast path or the parser found them.
enum Tags<'a, 'b> {
    Raw(&'a str),
    Parsed(Option<&'b HashMap<Cow<'a, str>, Cow<'a, str>>>),
}

impl Tags<'_, '_> {
    /// The tag's value; with a key given twice, the last (as a map built by the parser).
    fn get(&self, key: &str) -> Option<&str> {
        match self {
            Self::Parsed(t) => t.and_then(|t| t.get(key)).map(AsRef::as_ref),
            Self::Raw(raw) => {
                let mut found = None;
                let mut rest = *raw;
                while let Some(r) = rest.strip_prefix('"') {
                    let (k, r) = plain_string(r)?;
                    let (v, r) = plain_string(r.strip_prefix(":\"")?)?;
                    if k == key {
                        found = Some(v);
                    }
                    rest = r.strip_prefix(',').unwrap_or(r);
                }
                found
            }
        }
    }
}

fn taint(tainted: &mut Vec<String>, line: &[u8], needles: &[(&str, String)]) {
    for (base, needle) in needles {
        if contains(line, needle.as_bytes()) && !tainted.iter().any(|t| t == base) {
            tainted.push((*base).to_string());
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LineRead {
    Eof,
    /// `buf` holds the whole line (with its newline, if any).
    Line,
    /// The line was longer than the cap: `buf` holds its first `max` bytes and the rest
    /// was read and dropped in the reader's own chunks.
    TooLong,
}

/// Reads one line into `buf` (cleared first), holding at most `max` bytes of it.
fn read_bounded_line<R: BufRead>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<LineRead> {
    buf.clear();
    let mut too_long = false;
    let mut any = false;
    loop {
        let chunk = match reader.fill_buf() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if chunk.is_empty() {
            break;
        }
        any = true;
        let (take, done) = match memchr::memchr(b'\n', chunk) {
            Some(i) => (i + 1, true),
            None => (chunk.len(), false),
        };
        if !too_long {
            let room = max - buf.len();
            if take <= room {
                buf.extend_from_slice(&chunk[..take]);
            } else {
                buf.extend_from_slice(&chunk[..room]);
                too_long = true;
            }
        }
        reader.consume(take);
        if done {
            break;
        }
    }
    Ok(match (any, too_long) {
        (false, _) => LineRead::Eof,
        (true, false) => LineRead::Line,
        (true, true) => LineRead::TooLong,
    })
}

fn trim_ascii(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &b[start..end]
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    memchr::memmem::find(hay, needle).is_some()
}

/// k6's percentile: 0 samples → 0, 1 sample → that sample, else linear interpolation
/// between closest ranks at `i = p·(n−1)`. `sorted` must be sorted ascending.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    match sorted.len() {
        0 => 0.0,
        1 => sorted[0],
        n => {
            let i = (p / 100.0) * (n - 1) as f64;
            let lo = i.floor() as usize;
            let hi = i.ceil() as usize;
            sorted[lo] + (sorted[hi] - sorted[lo]) * (i - i.floor())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_k6_trend_stats_fixture_values() {
        // k6's own check: 37 samples 1², 2², …, 37².
        let v: Vec<f64> = (1..=37).map(|i| (i * i) as f64).collect();
        assert!((percentile(&v, 90.0) - 1115.8).abs() < 1e-9);
        assert!((percentile(&v, 95.0) - 1239.2).abs() < 1e-9);
        assert!((percentile(&v, 99.0) - 1342.72).abs() < 1e-9);
        assert!((percentile(&v, 99.9) - 1366.372).abs() < 1e-9);
        assert_eq!(percentile(&v, 50.0), 361.0);
        assert_eq!(percentile(&[], 99.0), 0.0);
        assert_eq!(percentile(&[4.0], 99.0), 4.0);
    }

    #[test]
    fn filters_by_tags_and_survives_bad_lines() {
        let data = concat!(
            "{\"type\":\"Metric\",\"data\":{\"name\":\"d\",\"type\":\"trend\"},\"metric\":\"d\"}\n",
            "{\"metric\":\"d\",\"type\":\"Point\",\"data\":{\"time\":\"t\",\"value\":3,\"tags\":{\"status\":\"200\"}}}\n",
            "{\"metric\":\"d\",\"type\":\"Point\",\"data\":{\"time\":\"t\",\"value\":1,\"tags\":{\"status\":\"500\"}}}\n",
            "{\"metric\":\"g\",\"type\":\"Point\",\"data\":{\"time\":\"t\",\"value\":+Inf,\"tags\":{}}}\n",
            "{\"metric\":\"d\",\"type\":\"Po",
        );
        let reqs = vec![
            SampleRequest {
                key: "d".into(),
                base_name: "d".into(),
                tags: BTreeMap::new(),
                percentiles: vec![50.0],
            },
            SampleRequest {
                key: "d{status:200}".into(),
                base_name: "d".into(),
                tags: [("status".to_string(), "200".to_string())].into(),
                percentiles: vec![50.0],
            },
        ];
        let s = collect_samples(data.as_bytes(), &reqs, 1000).unwrap();
        let d = &s.sets["d"];
        assert_eq!((d.count, d.min, d.max, d.sum), (2, 1.0, 3.0, 4.0));
        assert_eq!(d.percentile(50.0), Some(2.0));
        assert_eq!(d.percentile(99.0), None, "not requested");
        assert_eq!(s.sets["d{status:200}"].count, 1);
        assert_eq!(s.bad_lines, 2);
        // The cut-short last line names `d`, so its sets are not trusted as complete.
        assert!(s.complete("d", "d").is_none());
    }

    fn request(base: &str) -> SampleRequest {
        SampleRequest {
            key: base.into(),
            base_name: base.into(),
            tags: BTreeMap::new(),
            percentiles: vec![0.0, 50.0, 100.0],
        }
    }

    fn point(metric: &str, value: f64) -> String {
        format!(
            "{{\"metric\":\"{metric}\",\"type\":\"Point\",\"data\":{{\"time\":\"t\",\"value\":{value},\"tags\":{{}}}}}}\n"
        )
    }

    /// A reader that hands out `left` bytes of `fill` without a newline, then `tail`,
    /// without ever holding the long line itself.
    struct Endless {
        left: u64,
        fill: u8,
        tail: std::io::Cursor<Vec<u8>>,
    }

    impl std::io::Read for Endless {
        fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
            if self.left > 0 {
                let n = (out.len() as u64).min(self.left) as usize;
                out[..n].fill(self.fill);
                self.left -= n as u64;
                return Ok(n);
            }
            self.tail.read(out)
        }
    }

    impl Endless {
        fn new(left: u64, fill: u8, tail: &str) -> std::io::BufReader<Self> {
            std::io::BufReader::with_capacity(
                64 * 1024,
                Self {
                    left,
                    fill,
                    tail: std::io::Cursor::new(tail.as_bytes().to_vec()),
                },
            )
        }
    }

    #[test]
    fn an_overlong_line_is_skipped_in_chunks_and_counted_as_bad() {
        let limits = SampleLimits {
            max_line_bytes: 4096,
            ..SampleLimits::default()
        };
        // 64 MiB of one byte without a newline, then real samples.
        let tail = format!("\n{}{}", point("d", 2.0), point("d", 4.0));
        let s = collect_samples_with(
            Endless::new(64 << 20, b'0', &tail),
            &[request("d")],
            &limits,
        )
        .unwrap();
        assert_eq!(s.bad_lines, 1);
        let d = s.complete("d", "d").expect("the long line did not name d");
        assert_eq!((d.count, d.percentile(50.0)), (2, Some(3.0)));

        // An overlong line that starts as a sample of `d` taints `d`.
        let mut long = point("d", 1.0);
        long.insert_str(long.len() - 3, &" ".repeat(10_000));
        let data = format!("{}{long}", point("d", 5.0));
        let s = collect_samples_with(data.as_bytes(), &[request("d")], &limits).unwrap();
        assert_eq!(s.bad_lines, 1);
        assert!(s.complete("d", "d").is_none());
        assert_eq!(s.sets["d"].count, 1);
    }

    #[test]
    fn bounded_lines_split_exactly_at_newlines() {
        let mut r = "ab\ncdef\n\ngh".as_bytes();
        let mut buf = Vec::new();
        let mut got = Vec::new();
        loop {
            match read_bounded_line(&mut r, &mut buf, 3).unwrap() {
                LineRead::Eof => break,
                k => got.push((k, String::from_utf8(buf.clone()).unwrap())),
            }
        }
        assert_eq!(
            got,
            vec![
                (LineRead::Line, "ab\n".to_string()),
                (LineRead::TooLong, "cde".to_string()),
                (LineRead::Line, "\n".to_string()),
                (LineRead::Line, "gh".to_string()),
            ]
        );
    }

    #[test]
    fn samples_beyond_the_buffer_spill_and_stay_exact() {
        let limits = SampleLimits {
            buffer_bytes: 0,
            ..SampleLimits::default()
        };
        let mut data = String::new();
        let mut values = Vec::new();
        for i in 0..20_000u64 {
            let v = ((i * 7919) % 10_007) as f64 / 4.0;
            values.push(v);
            data.push_str(&point("d", v));
        }
        values.sort_by(f64::total_cmp);
        let mut req = request("d");
        req.percentiles = vec![50.0, 90.0, 95.0, 99.0, 99.9];
        let s = collect_samples_with(data.as_bytes(), &[req.clone()], &limits).unwrap();
        let d = s.complete("d", "d").unwrap();
        for p in &req.percentiles {
            assert_eq!(d.percentile(*p), Some(percentile(&values, *p)), "p({p})");
        }
        assert_eq!(d.count, 20_000);
        assert_eq!((d.min, d.max), (values[0], values[19_999]));
    }

    /// Whatever the fast path accepts, the JSON parser reads the same way; the rest it
    /// leaves to the parser.
    #[test]
    fn the_fast_path_agrees_with_the_parser() {
        let lines = [
            r#"{"metric":"d","type":"Point","data":{"time":"2026-11-22T03:04:13.042339559Z","value":50.424706,"tags":{"expected_response":"true","status":"200"}}}"#,
            r#"{"metric":"d","type":"Point","data":{"time":"t","value":0,"tags":{}}}"#,
            r#"{"metric":"d","type":"Point","data":{"time":"t","value":-1.5e-3,"tags":{"a":"1","a":"2"}}}"#,
            r#"{"metric":"d","type":"Point","data":{"time":"t","value":1E+2,"tags":{"a":""}}}"#,
            r#"{"metric":"d","type":"Point","data":{"time":"t","value":0.1,"tags":{"a":"x:y,z"}}}"#,
            r#"{"metric":"d","type":"Point","data":{"time":"t","value":1e400,"tags":{}}}"#,
            r#"{"metric":"d","type":"Point","data":{"time":"t","value":+Inf,"tags":{}}}"#,
            r#"{"metric":"d","type":"Point","data":{"time":"t","value":01,"tags":{}}}"#,
            r#"{"metric":"d","type":"Point","data":{"time":"t","value":1.,"tags":{}}}"#,
            r#"{"metric":"d","type":"Point","data":{"time":"t","value":.5,"tags":{}}}"#,
            r#"{"metric":"d","type":"Point","data":{"time":"t","value":1,"tags":{"a":"\u0041"}}}"#,
            r#"{"metric":"d"x","type":"Point","data":{"time":"t","value":1,"tags":{}}}"#,
            r#"{"metric":"d","type":"Point","data":{"time":"t","value":1,"tags":{"a":1}}}"#,
            r#"{"metric":"d","type":"Point","data":{"time":"t","value":1,"tags":{"a":"b",}}}"#,
            r#"{"metric":"d","type":"Point","data":{"time":"t","value":1,"tags":null}}"#,
            r#"{"metric":"d","type":"Point","data":{"time":"t","value":1,"tags":{}}}}"#,
            r#"{"metric":"d","type":"Point","data":{"time":"t","value":1,"tags":{}} }"#,
            "{\"metric\":\"d\",\"type\":\"Point\",\"data\":{\"time\":\"t\x01\",\"value\":1,\"tags\":{}}}",
            r#"{"metric":"d","type":"Metric","data":{"name":"d","type":"trend"}}"#,
            r#"{"type":"Point","metric":"d","data":{"time":"t","value":2,"tags":{}}}"#,
        ];
        let mut fast = 0;
        for line in lines {
            let parsed = serde_json::from_str::<Line<'_>>(line).ok();
            match k6_point(line.as_bytes()) {
                Some(p) => {
                    fast += 1;
                    let l = parsed.unwrap_or_else(|| panic!("fast path took invalid {line}"));
                    let point = l.data.as_ref().unwrap();
                    assert_eq!((l.metric.as_ref(), l.kind.as_ref()), (p.metric, "Point"));
                    assert_eq!(point.value.map(f64::to_bits), Some(p.value.to_bits()));
                    let tags = point.tags.as_ref().unwrap();
                    for k in tags.keys() {
                        assert_eq!(
                            Tags::Raw(p.tags).get(k),
                            Tags::Parsed(Some(tags)).get(k),
                            "{line}"
                        );
                    }
                    assert_eq!(Tags::Raw(p.tags).get("missing"), None);
                }
                None => assert!(
                    !line.contains("2026") && !line.ends_with(r#""value":0,"tags":{}}}"#),
                    "k6's own line missed the fast path: {line}"
                ),
            }
        }
        assert_eq!(fast, 5);
    }

    proptest::proptest! {
        /// Random pieces in every variable slot of k6's line shape: whenever the fast
        /// path accepts a line, the JSON parser reads the same metric, value and tags.
        #[test]
        fn the_fast_path_never_disagrees_with_the_parser(
            name in proptest::prop_oneof![3 => "[a-z_]{1,8}", 1 => "[a-z_\\\\\"{}:,\\x00\\x1f ]{0,6}"],
            time in proptest::prop_oneof![3 => "[0-9TZ:.]{1,8}", 1 => "[0-9TZ:.\\\\\"\\x01]{0,6}"],
            value in proptest::prop_oneof![
                3 => "-?(0|[1-9][0-9]{0,3})(\\.[0-9]{1,3})?([eE][-+]?[0-9]{1,3})?",
                1 => "[-+0-9.eE]{1,6}|[a-zA-Z]{1,4}",
            ],
            tags in proptest::collection::vec(
                proptest::prop_oneof![
                    3 => ("[a-z0-9_:,{} é]{0,4}", "[a-z0-9_:,{} ü€]{0,4}"),
                    1 => ("[a-z\\\\\",:{} ]{0,4}", "[a-z0-9\\\\\",:{} \\t]{0,4}"),
                ],
                0..3,
            ),
            tail in proptest::prop_oneof![3 => "\\}\\}", 1 => "(\\}\\}\\}| ?\\}\\}\\}|,\\}\\}\\}| \\}\\})"],
        ) {
            let tags: Vec<String> = tags.iter().map(|(k, v)| format!("\"{k}\":\"{v}\"")).collect();
            let line = format!(
                "{{\"metric\":\"{name}\",\"type\":\"Point\",\"data\":{{\"time\":\"{time}\",\"value\":{value},\"tags\":{{{}}}{tail}",
                tags.join(",")
            );
            if let Some(p) = k6_point(line.as_bytes()) {
                let l: Line<'_> = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("fast path took invalid JSON {line:?}: {e}"));
                let point = l.data.as_ref().unwrap();
                proptest::prop_assert_eq!(l.metric.as_ref(), p.metric);
                proptest::prop_assert_eq!(point.value.map(f64::to_bits), Some(p.value.to_bits()));
                let parsed = point.tags.as_ref().unwrap();
                let (raw, from_parser) = (Tags::Raw(p.tags), Tags::Parsed(Some(parsed)));
                for k in parsed.keys() {
                    proptest::prop_assert_eq!(raw.get(k), from_parser.get(k));
                }
            }
        }
    }

    #[test]
    fn control_bytes_backslashes_and_wide_bytes_are_found_at_any_offset() {
        for len in 0..40 {
            for at in 0..len {
                for c in [0u8, 0x09, 0x1f] {
                    let mut v = vec![b'a'; len];
                    v[at] = c;
                    assert_eq!(scan(&v), Scan::Unfit, "{len} {at} {c}");
                    assert_eq!(scan(&v[at..]), Scan::Unfit);
                }
                let mut v = vec![0x20u8; len];
                v[at] = 0xff;
                assert_eq!(scan(&v), Scan::Wide, "{len} {at}");
                v[at] = 0x7f;
                assert_eq!(scan(&v), Scan::Ascii, "{len} {at}");
                v[at] = b'\\';
                assert_eq!(scan(&v), Scan::Unfit, "{len} {at}");
                v[at] = b']';
                assert_eq!(scan(&v), Scan::Ascii, "{len} {at}");
            }
        }
    }

    #[test]
    fn keys_beyond_the_key_cap_are_named_not_collected() {
        let reqs: Vec<SampleRequest> = (0..MAX_SAMPLE_KEYS + 3)
            .map(|i| request(&format!("m{i}")))
            .collect();
        let data: String = (0..MAX_SAMPLE_KEYS + 3)
            .map(|i| point(&format!("m{i}"), 1.0))
            .collect();
        let s = collect_samples(data.as_bytes(), &reqs, 1000).unwrap();
        assert_eq!(s.sets.len(), MAX_SAMPLE_KEYS);
        assert_eq!(s.skipped, ["m32", "m33", "m34"]);
        assert!(s.complete("m34", "m34").is_none());
        assert_eq!(s.complete("m0", "m0").map(|d| d.count), Some(1));
    }

    #[test]
    fn the_sample_cap_marks_the_sets_truncated() {
        let data: String = (0..10).map(|i| point("d", f64::from(i))).collect();
        let s = collect_samples(data.as_bytes(), &[request("d")], 5).unwrap();
        assert!(s.truncated);
        assert!(s.complete("d", "d").is_none());
    }
}
