//! The merged result of a run split across runners (SPEC section 12). Pure apart from
//! reading the parts' sorted samples (which may live in temporary files).
//!
//! Each runner judged its thresholds on its own share only, so the merge rebuilds one
//! summary of the whole test from the parts' summaries and raw samples and judges the
//! thresholds again on it:
//! - counters, rate passes/fails (matches/total) and checks (by group path and name)
//!   are summed; a counter's `rate` is the sum over the longest part's duration (the
//!   parts run concurrently);
//! - trends: `min`/`max` exact; `avg`, `med` and every `p(N)` over the union of all
//!   parts' raw samples ([`SortedSamples::merge`]), never an average of percentiles;
//!   without every part's samples they are `null` and a warning says why (`avg` is
//!   then still exact when every part reported its `count`);
//! - gauges: `vus` and `vus_max` are summed (each runner's VUs run at once); any other
//!   gauge keeps the smallest `min`, the largest `max`, and the largest `value`;
//! - thresholds: the parts' expressions (the same script) evaluated with
//!   [`super::threshold`] on the merged values.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::ops::Range;

use super::limits::SummaryLimits;
use super::model::{Check, Contains, Metric, MetricType, Summary, SummaryFormat, Threshold};
use super::samples::{SampleSets, SampleStats};
use super::selector::{parse_metric_key, percentile_of};
use super::sink::SortedSamples;
use super::threshold::parse_threshold;
use super::{ValueSource, wanted_samples};

/// One part as the merge sees it.
#[derive(Debug, Default)]
pub struct PartInput {
    pub index: u32,
    pub exit_code: Option<i32>,
    /// `None` when the part has no usable summary (its `reason` says why).
    pub summary: Option<Summary>,
    pub reason: Option<String>,
    /// The part's sorted samples per trend key, when its raw samples were read
    /// completely; `None` with `samples_reason` otherwise.
    pub samples: Option<HashMap<String, SortedSamples>>,
    pub samples_reason: Option<String>,
}

/// The merged run, ready for [`super::extract`].
#[derive(Debug)]
pub struct Merged {
    /// `None` when no part has a usable summary.
    pub summary: Option<Summary>,
    /// The exit code the merged run is judged with: 0 unless a part ended with a code
    /// other than 0 and 99 (99 only reported that part's own thresholds).
    pub exit_code: Option<i32>,
    /// Statistics from the union of every part's samples, for the keys extraction asks.
    pub samples: Option<SampleSets>,
    /// Why the merged run is an error although it has a summary (a part without one).
    pub error: Option<String>,
    pub warnings: Vec<String>,
    /// Where merged values came from, for `value_sources`.
    pub sources: BTreeMap<String, ValueSource>,
}

/// How bad a non-zero exit code of a part is for the whole run: error over timeout over
/// cancelled over failed (108, 110).
fn severity(code: i32) -> u8 {
    match code {
        100..=102 => 2,
        103 | 105 => 1,
        108 | 110 => 0,
        _ => 3,
    }
}

/// The exit code the merged run is judged with.
pub fn merged_exit_code(codes: &[Option<i32>]) -> Option<i32> {
    let worst = codes
        .iter()
        .flatten()
        .copied()
        .filter(|c| *c != 0 && *c != 99)
        .max_by_key(|c| severity(*c));
    match worst {
        Some(c) => Some(c),
        None if codes.iter().all(Option::is_none) => None,
        None => Some(0),
    }
}

/// Merges every part at once: the parts are folded one after another into a
/// [`MergeAcc`] without caps (the worker itself folds stored parts one at a time).
pub fn merge_parts(mut parts: Vec<PartInput>) -> io::Result<Merged> {
    parts.sort_by_key(|p| p.index);
    let mut acc = MergeAcc::new(&SummaryLimits {
        max_nodes: u64::MAX,
        max_metrics: usize::MAX,
        max_checks: usize::MAX,
        max_thresholds: usize::MAX,
    });
    for p in &parts {
        acc.add_part(p.index, p.exit_code, p.summary.as_ref(), p.reason.clone());
    }
    for p in parts {
        if p.summary.is_some() {
            let samples = p.samples.ok_or_else(|| {
                p.samples_reason
                    .unwrap_or_else(|| "no raw samples".to_string())
            });
            acc.add_samples(p.index, samples);
        }
    }
    acc.finish()
}

/// One metric as merged so far: what the first part with it said about its kind, and
/// per stat the running sum, minimum and maximum of the parts' values.
///
/// Kept small, as the accumulator holds one per metric of the union (up to
/// `ingest.max_metrics`): its name and stats are ranges of the [`MetricTable`]'s flat
/// buffers, base name and tags are derived from the name again at the end (every
/// format derives them so), and stat names are ids into [`StatNames`].
#[derive(Debug)]
struct MetricAcc {
    name: Range<usize>,
    /// Every stat a part gave, `null` ones included.
    stats: Range<usize>,
    /// Base name and tags when the first part gave others than its name says.
    key: Option<Box<(String, BTreeMap<String, String>)>>,
    metric_type: Option<MetricType>,
    contains: Option<Contains>,
    /// Parts that have this metric.
    parts: u32,
    /// Σ avg × count over the parts that gave both, and how many did.
    weighted_avg: (Option<f64>, u32),
    /// Expressions in first-seen order, each with whether it held on every part.
    thresholds: Vec<(String, bool)>,
}

/// (sum, min, max) of one stat's non-null values and how many parts gave one; `n == 0`
/// for a stat the parts gave only as `null`.
#[derive(Debug, Clone, Copy)]
struct StatAcc {
    id: u32,
    n: u32,
    sum: f64,
    min: f64,
    max: f64,
}

impl StatAcc {
    fn empty(id: u32) -> Self {
        StatAcc {
            id,
            n: 0,
            sum: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
        }
    }
}

impl MetricAcc {
    /// The base name and tags of the metric `name`.
    fn key_of(&self, name: &str) -> (String, BTreeMap<String, String>) {
        match &self.key {
            Some(k) => (k.0.clone(), k.1.clone()),
            None => parse_metric_key(name),
        }
    }

    /// Folds one part's metric in; every stat of `m` has its slot in `stats` already.
    fn fold(&mut self, stats: &mut [StatAcc], m: &Metric, names: &StatNames) -> usize {
        self.parts += 1;
        for (k, v) in &m.values {
            let Some(v) = *v else { continue };
            let id = names.id(k);
            let Some(s) = stats.iter_mut().find(|s| Some(s.id) == id) else {
                continue;
            };
            s.sum = if s.n == 0 { v } else { s.sum + v };
            s.min = if s.n == 0 { v } else { s.min.min(v) };
            s.max = if s.n == 0 { v } else { s.max.max(v) };
            s.n += 1;
        }
        if let (Some(a), Some(c)) = (m.value("avg"), m.value("count")) {
            self.weighted_avg = (
                Some(fold_sum(self.weighted_avg.0, a * c)),
                self.weighted_avg.1 + 1,
            );
        }
        let mut new_thresholds = 0;
        for t in &m.thresholds {
            match self.thresholds.iter_mut().find(|(e, _)| *e == t.expression) {
                Some((_, every)) => *every &= t.ok,
                None => {
                    self.thresholds.push((t.expression.clone(), t.ok));
                    new_thresholds += 1;
                }
            }
        }
        new_thresholds
    }
}

/// The accumulator's metrics, sorted by name, in three flat buffers (names, entries,
/// stats) instead of a few small allocations per metric: a part's parse, freed before
/// the next, then leaves no page of the heap pinned by the accumulator's pieces.
/// A part that brings no new metric or stat is folded in place; one that does rebuilds
/// the table (a sorted merge), usually only the first.
#[derive(Debug, Default)]
struct MetricTable {
    names: String,
    entries: Vec<MetricAcc>,
    stats: Vec<StatAcc>,
}

impl MetricTable {
    fn find(&self, name: &str) -> Option<usize> {
        self.entries
            .binary_search_by(|e| self.names[e.name.clone()].cmp(name))
            .ok()
    }

    /// Folds a part's metrics (sorted by name); returns how many new thresholds it
    /// brought.
    fn add(&mut self, part: &[&Metric], names: &mut StatNames) -> usize {
        for m in part {
            for k in m.values.keys() {
                names.intern(k);
            }
        }
        let at: Option<Vec<usize>> = part
            .iter()
            .map(|m| {
                let i = self.find(&m.name)?;
                let slots = &self.stats[self.entries[i].stats.clone()];
                m.values
                    .keys()
                    .all(|k| slots.iter().any(|s| Some(s.id) == names.id(k)))
                    .then_some(i)
            })
            .collect();
        let Some(at) = at else {
            return self.rebuild(part, names);
        };
        let mut new_thresholds = 0;
        for (m, i) in part.iter().zip(at) {
            let e = &mut self.entries[i];
            new_thresholds += e.fold(&mut self.stats[e.stats.clone()], m, names);
        }
        new_thresholds
    }

    /// The table merged with a part that brings new metrics or stats.
    fn rebuild(&mut self, part: &[&Metric], names: &StatNames) -> usize {
        let old = std::mem::take(self);
        let values: usize = part.iter().map(|m| m.values.len()).sum();
        let name_bytes: usize = part.iter().map(|m| m.name.len()).sum();
        self.names.reserve(old.names.len() + name_bytes);
        self.entries.reserve(old.entries.len() + part.len());
        self.stats.reserve(old.stats.len() + values);
        let mut olds = old.entries.into_iter().peekable();
        let mut j = 0;
        let mut new_thresholds = 0;
        while olds.peek().is_some() || j < part.len() {
            let take_old = match (olds.peek(), part.get(j)) {
                (Some(e), Some(m)) => old.names[e.name.clone()] <= *m.name,
                (Some(_), None) => true,
                _ => false,
            };
            let stats_at = self.stats.len();
            let names_at = self.names.len();
            let mut e = if take_old {
                let e = olds.next().expect("peeked");
                self.names.push_str(&old.names[e.name.clone()]);
                self.stats.extend_from_slice(&old.stats[e.stats.clone()]);
                e
            } else {
                self.names.push_str(&part[j].name);
                new_entry(part[j])
            };
            e.name = names_at..self.names.len();
            let same = part[j..]
                .iter()
                .take_while(|m| *m.name == self.names[e.name.clone()])
                .count();
            for m in &part[j..j + same] {
                for k in m.values.keys() {
                    let id = names.id(k).expect("interned");
                    if !self.stats[stats_at..].iter().any(|s| s.id == id) {
                        self.stats.push(StatAcc::empty(id));
                    }
                }
            }
            e.stats = stats_at..self.stats.len();
            for m in &part[j..j + same] {
                new_thresholds += e.fold(&mut self.stats[e.stats.clone()], m, names);
            }
            j += same;
            self.entries.push(e);
        }
        self.names.shrink_to_fit();
        self.entries.shrink_to_fit();
        self.stats.shrink_to_fit();
        new_thresholds
    }
}

/// A metric first seen in `m`, with nothing folded yet.
fn new_entry(m: &Metric) -> MetricAcc {
    let derived = parse_metric_key(&m.name);
    let key = (derived.0 != m.base_name || derived.1 != m.tags)
        .then(|| Box::new((m.base_name.clone(), m.tags.clone())));
    MetricAcc {
        name: 0..0,
        stats: 0..0,
        key,
        metric_type: m.metric_type,
        contains: m.contains,
        parts: 0,
        weighted_avg: (None, 0),
        thresholds: Vec::new(),
    }
}

/// Looks up a metric's stats by stat name for the merged values.
struct StatView<'a> {
    metric: &'a MetricAcc,
    stats: &'a [StatAcc],
    names: &'a StatNames,
}

impl StatView<'_> {
    fn stat(&self, k: &str) -> Option<&StatAcc> {
        let id = self.names.id(k)?;
        self.stats.iter().find(|s| s.id == id && s.n > 0)
    }

    /// The sum of `k` over the parts with this metric; `None` when one of them has no
    /// value for it (as summing `Option`s gives).
    fn sum(&self, k: &str) -> Option<f64> {
        self.stat(k)
            .filter(|s| s.n == self.metric.parts)
            .map(|s| s.sum)
    }

    fn min(&self, k: &str) -> Option<f64> {
        self.stat(k).map(|s| s.min)
    }

    fn max(&self, k: &str) -> Option<f64> {
        self.stat(k).map(|s| s.max)
    }

    /// The stat names the parts gave for this metric, in name order.
    fn keys(&self) -> BTreeSet<&str> {
        self.stats.iter().map(|s| self.names.name(s.id)).collect()
    }
}

/// The stat names of every metric (`count`, `p(95)`...), each kept once.
#[derive(Debug, Default)]
struct StatNames {
    names: Vec<String>,
    ids: HashMap<String, u32>,
}

impl StatNames {
    fn id(&self, name: &str) -> Option<u32> {
        self.ids.get(name).copied()
    }

    fn intern(&mut self, name: &str) -> u32 {
        if let Some(id) = self.id(name) {
            return id;
        }
        let id = self.names.len() as u32;
        self.names.push(name.to_string());
        self.ids.insert(name.to_string(), id);
        id
    }

    fn name(&self, id: u32) -> &str {
        &self.names[id as usize]
    }
}

fn fold_sum(acc: Option<f64>, v: f64) -> f64 {
    acc.map_or(v, |a| a + v)
}

/// The merge of a split run, built one part at a time: a part's summary is folded in
/// and can be dropped before the next is read, so a merge holds one part's summary and
/// this accumulator, whatever the number of parts. The accumulator is bounded by the
/// caps of one summary (`ingest.max_metrics`, `max_checks`, `max_thresholds`) applied
/// to the union of the parts: a union above a cap refuses the merge (the merged run is
/// an error saying which cap) and frees what was folded.
///
/// Parts must be added in index order (the merged values and orders depend on it).
#[derive(Debug)]
pub struct MergeAcc {
    max_metrics: usize,
    max_checks: usize,
    max_thresholds: usize,
    exit_codes: Vec<Option<i32>>,
    /// Parts without a summary: (index, why).
    no_summary: Vec<(u32, Option<String>)>,
    with_summary: usize,
    format: Option<SummaryFormat>,
    trend_stats: Option<Vec<String>>,
    duration_ms: Option<f64>,
    metrics: MetricTable,
    stat_names: StatNames,
    thresholds: usize,
    /// The trend keys of every part (first base name and tags seen), for sample reads.
    trend_keys: BTreeMap<String, (String, BTreeMap<String, String>)>,
    checks: Vec<Check>,
    check_at: HashMap<(Vec<String>, String), usize>,
    part_warnings: Vec<String>,
    derived: BTreeMap<String, BTreeSet<String>>,
    /// The union of the parts' samples per trend key, and how many parts gave the key.
    samples: HashMap<String, (SortedSamples, usize)>,
    missing_samples: Vec<String>,
    refused: Option<String>,
}

impl MergeAcc {
    pub fn new(limits: &SummaryLimits) -> Self {
        MergeAcc {
            max_metrics: limits.max_metrics,
            max_checks: limits.max_checks,
            max_thresholds: limits.max_thresholds,
            exit_codes: Vec::new(),
            no_summary: Vec::new(),
            with_summary: 0,
            format: None,
            trend_stats: None,
            duration_ms: None,
            metrics: MetricTable::default(),
            stat_names: StatNames::default(),
            thresholds: 0,
            trend_keys: BTreeMap::new(),
            checks: Vec::new(),
            check_at: HashMap::new(),
            part_warnings: Vec::new(),
            derived: BTreeMap::new(),
            samples: HashMap::new(),
            missing_samples: Vec::new(),
            refused: None,
        }
    }

    /// Why the merge is refused (a cap on the union of the parts), if it is.
    pub fn refused(&self) -> Option<&str> {
        self.refused.as_deref()
    }

    /// Folds one part in: its exit code and, when it has one, its summary (`reason`
    /// says why a part has none).
    pub fn add_part(
        &mut self,
        index: u32,
        exit_code: Option<i32>,
        summary: Option<&Summary>,
        reason: Option<String>,
    ) {
        self.exit_codes.push(exit_code);
        let Some(s) = summary else {
            self.no_summary.push((index, reason));
            return;
        };
        self.with_summary += 1;
        if self.refused.is_some() {
            return;
        }
        if self.format.is_none() {
            self.format = Some(s.format);
            self.trend_stats = s.trend_stats.clone();
        }
        if let Some(d) = s.test_run_duration_ms {
            self.duration_ms = Some(self.duration_ms.map_or(d, |a| a.max(d)));
        }
        self.add_metrics(&s.metrics);
        self.add_checks(&s.checks);
        self.part_warnings
            .extend(s.warnings.iter().map(|w| format!("part {index}: {w}")));
        for (k, v) in &s.derived {
            self.derived
                .entry(k.clone())
                .or_default()
                .extend(v.iter().cloned());
        }
        if let Some(why) = self.over_a_cap() {
            self.refuse(why);
        }
    }

    /// Sums each check (by group path and name) into the one first seen, in first-seen
    /// order.
    fn add_checks(&mut self, checks: &[Check]) {
        for c in checks {
            let key = (c.group_path.clone(), c.name.clone());
            match self.check_at.get(&key) {
                Some(&i) => {
                    let m = &mut self.checks[i];
                    m.passes = add(m.passes, c.passes);
                    m.fails = add(m.fails, c.fails);
                }
                None => {
                    self.check_at.insert(key, self.checks.len());
                    self.checks.push(c.clone());
                }
            }
        }
    }

    /// The first cap the union of the parts folded so far is over, in words.
    fn over_a_cap(&self) -> Option<String> {
        if self.metrics.entries.len() > self.max_metrics {
            Some(format!(
                "the parts' summaries hold {} metrics together, over ingest.max_metrics ({})",
                self.metrics.entries.len(),
                self.max_metrics
            ))
        } else if self.checks.len() > self.max_checks {
            Some(format!(
                "the parts' summaries hold {} checks together, over ingest.max_checks ({})",
                self.checks.len(),
                self.max_checks
            ))
        } else if self.thresholds > self.max_thresholds {
            Some(format!(
                "the parts' summaries hold {} thresholds together, over ingest.max_thresholds ({})",
                self.thresholds, self.max_thresholds
            ))
        } else {
            None
        }
    }

    /// Refuses the merge: nothing folded is used any more, so the memory goes back now.
    fn refuse(&mut self, why: String) {
        self.refused = Some(format!("merge refused: {why}"));
        self.metrics = MetricTable::default();
        self.stat_names = StatNames::default();
        self.trend_keys = BTreeMap::new();
        self.checks = Vec::new();
        self.check_at = HashMap::new();
        self.derived = BTreeMap::new();
        self.part_warnings = Vec::new();
    }

    fn add_metrics(&mut self, metrics: &[Metric]) {
        for m in metrics {
            if m.metric_type == Some(MetricType::Trend) && !self.trend_keys.contains_key(&m.name) {
                self.trend_keys
                    .insert(m.name.clone(), (m.base_name.clone(), m.tags.clone()));
            }
        }
        let mut sorted: Vec<&Metric> = metrics.iter().collect();
        sorted.sort_by(|a, b| a.name.cmp(&b.name));
        self.thresholds += self.metrics.add(&sorted, &mut self.stat_names);
    }

    /// The trend keys whose samples the merge reads from each part: every trend of every
    /// part folded so far, submetrics included, in name order. Empty once refused.
    pub fn sample_keys(&self) -> Vec<(String, String, BTreeMap<String, String>)> {
        self.trend_keys
            .iter()
            .map(|(k, (b, t))| (k.clone(), b.clone(), t.clone()))
            .collect()
    }

    /// Adds the sorted samples of a part with a summary (per trend key), or why it has
    /// none; the sets are joined at once, so only the parts' sorted runs are held.
    pub fn add_samples(
        &mut self,
        index: u32,
        samples: Result<HashMap<String, SortedSamples>, String>,
    ) {
        match samples {
            Ok(sets) if self.missing_samples.is_empty() && self.refused.is_none() => {
                for (key, sorted) in sets {
                    let joined = match self.samples.remove(&key) {
                        Some((prev, n)) => (SortedSamples::merge([prev, sorted]), n + 1),
                        None => (sorted, 1),
                    };
                    self.samples.insert(key, joined);
                }
            }
            Ok(_) => {}
            Err(reason) => {
                self.missing_samples
                    .push(format!("part {index} ({reason})"));
                // Without this part's samples no key has an exact union.
                self.samples = HashMap::new();
            }
        }
    }

    /// The merged run.
    pub fn finish(self) -> io::Result<Merged> {
        let exit_code = merged_exit_code(&self.exit_codes);
        let error = self.parts_without_summary();
        if let Some(why) = self.refused {
            let error = Some(match error {
                Some(e) => format!("{why}; {e}"),
                None => why,
            });
            return Ok(Merged::without_summary(exit_code, error));
        }
        let Some(format) = self.format else {
            return Ok(Merged::without_summary(exit_code, error));
        };
        let unions = complete_unions(self.samples, self.with_summary);
        let mut merge = MetricMerge {
            stat_names: &self.stat_names,
            duration_ms: self.duration_ms,
            parts: self.with_summary,
            unions: &unions,
            missing_samples: &self.missing_samples,
            warnings: Vec::new(),
            sources: BTreeMap::new(),
        };
        let metrics = merge.metrics(self.metrics)?;
        let MetricMerge {
            mut warnings,
            sources,
            ..
        } = merge;
        warnings.extend(self.part_warnings);
        let summary = Summary {
            format,
            test_run_duration_ms: self.duration_ms,
            trend_stats: self.trend_stats,
            metrics,
            checks: self.checks,
            warnings: Vec::new(),
            derived: self.derived,
        };
        let samples = sample_sets(&summary, &unions)?;
        Ok(Merged {
            summary: Some(summary),
            exit_code,
            samples,
            error,
            warnings,
            sources,
        })
    }

    /// `part 1 of 4: why; ...` for the parts without a summary, if any.
    fn parts_without_summary(&self) -> Option<String> {
        let count = self.exit_codes.len();
        self.no_summary
            .iter()
            .map(|(index, reason)| {
                format!(
                    "part {index} of {count}: {}",
                    reason.as_deref().unwrap_or("no summary")
                )
            })
            .reduce(|a, b| format!("{a}; {b}"))
    }
}

impl Merged {
    /// A merged run with no summary: `error` says why.
    fn without_summary(exit_code: Option<i32>, error: Option<String>) -> Self {
        Merged {
            summary: None,
            exit_code,
            samples: None,
            error,
            warnings: Vec::new(),
            sources: BTreeMap::new(),
        }
    }
}

/// The union of each trend key's samples, kept only for the keys every one of the
/// `parts` with a summary gave: a key some part could not give completely has no exact
/// union.
fn complete_unions(
    samples: HashMap<String, (SortedSamples, usize)>,
    parts: usize,
) -> HashMap<String, SortedSamples> {
    samples
        .into_iter()
        .filter(|(_, (_, from))| *from == parts)
        .map(|(k, (s, _))| (k, s))
        .collect()
}

/// Statistics from the merged samples for the keys extraction fills from samples.
fn sample_sets(
    summary: &Summary,
    unions: &HashMap<String, SortedSamples>,
) -> io::Result<Option<SampleSets>> {
    if unions.is_empty() {
        return Ok(None);
    }
    let mut sets = SampleSets::default();
    for r in wanted_samples(summary) {
        if let Some(sorted) = unions.get(&r.key) {
            sets.sets.insert(
                r.key.clone(),
                SampleStats::of_sorted(sorted, &r.percentiles)?,
            );
        }
    }
    Ok(Some(sets))
}

/// A metric's merged stats, by stat name.
type Values = BTreeMap<String, Option<f64>>;

/// Turns each metric of the accumulator into the merged one, and collects what the
/// run's record says about them: warnings, and where merged values came from.
struct MetricMerge<'a> {
    stat_names: &'a StatNames,
    /// The longest part's duration (the parts run concurrently).
    duration_ms: Option<f64>,
    /// How many parts have a summary.
    parts: usize,
    /// The union of every part's samples, per trend key every part gave completely.
    unions: &'a HashMap<String, SortedSamples>,
    /// The parts whose samples are missing, with why.
    missing_samples: &'a [String],
    warnings: Vec<String>,
    sources: BTreeMap<String, ValueSource>,
}

impl MetricMerge<'_> {
    /// Every metric of the table, in its (name) order.
    fn metrics(&mut self, table: MetricTable) -> io::Result<Vec<Metric>> {
        let MetricTable {
            names,
            entries,
            stats,
        } = table;
        let mut metrics = Vec::with_capacity(entries.len());
        for ms in entries {
            let name = names[ms.name.clone()].to_string();
            let stats = &stats[ms.stats.clone()];
            metrics.push(self.metric(ms, name, stats)?);
        }
        Ok(metrics)
    }

    /// One merged metric: its values by its type, its thresholds judged again on them.
    fn metric(&mut self, ms: MetricAcc, name: String, stats: &[StatAcc]) -> io::Result<Metric> {
        let (base_name, tags) = ms.key_of(&name);
        let view = StatView {
            metric: &ms,
            stats,
            names: self.stat_names,
        };
        let keys: Vec<String> = view.keys().into_iter().map(String::from).collect();
        let values = match ms.metric_type {
            Some(MetricType::Counter) => counter_values(&view, &keys, self.duration_ms),
            Some(MetricType::Rate) => rate_values(&view, &keys),
            Some(MetricType::Gauge) => self.gauge_values(&view, &keys, &name, &base_name),
            Some(MetricType::Trend) => self.trend_values(&view, &keys, &name)?,
            None => {
                self.warnings
                    .push(format!("{name}: metric type unknown, not merged"));
                each_stat(&keys, |_| None)
            }
        };
        let thresholds = self.judge(&name, ms.metric_type, ms.thresholds, &values);
        Ok(Metric {
            name,
            base_name,
            tags,
            metric_type: ms.metric_type,
            contains: ms.contains,
            values,
            thresholds,
        })
    }

    /// A gauge's values: `vus` and `vus_max` summed (each runner's VUs run at once), any
    /// other the smallest `min` and the largest `max` and `value`.
    fn gauge_values(
        &mut self,
        view: &StatView<'_>,
        keys: &[String],
        name: &str,
        base_name: &str,
    ) -> Values {
        let additive = matches!(base_name, "vus" | "vus_max");
        let values = each_stat(keys, |k| match k {
            _ if additive => view.sum(k),
            "min" => view.min("min"),
            "max" | "value" => view.max(k),
            _ => None,
        });
        if !additive && view.metric.parts > 1 {
            self.sources.insert(
                format!("{name}.value"),
                ValueSource::Merge("merged: the largest of the parts' last values".into()),
            );
        }
        values
    }

    /// A trend's values from the union of every part's samples, or, without it, only
    /// those the parts' summaries give exactly (with a warning saying why).
    fn trend_values(
        &mut self,
        view: &StatView<'_>,
        keys: &[String],
        name: &str,
    ) -> io::Result<Values> {
        let unions = self.unions;
        if let Some(sorted) = unions.get(name) {
            let values = trend_of_samples(sorted, keys)?;
            self.sources.insert(
                name.to_string(),
                ValueSource::Merge(format!(
                    "merged: the union of {} parts' raw samples",
                    self.parts
                )),
            );
            return Ok(values);
        }
        let values = trend_of_summaries(view, keys);
        let why = if self.missing_samples.is_empty() {
            "its raw samples were not collected".to_string()
        } else {
            format!("no raw samples from {}", self.missing_samples.join(", "))
        };
        self.warnings.push(format!(
            "{name}: merged percentiles not computed ({why}); never an average of percentiles"
        ));
        self.sources.insert(
            name.to_string(),
            ValueSource::Merge(format!("merged: percentiles NULL, {why}")),
        );
        Ok(values)
    }

    /// The metric's thresholds judged on its merged values. One that cannot be judged
    /// there holds only if it held on every part (and a warning says so).
    fn judge(
        &mut self,
        name: &str,
        metric_type: Option<MetricType>,
        thresholds: Vec<(String, bool)>,
        values: &Values,
    ) -> Vec<Threshold> {
        thresholds
            .into_iter()
            .map(|(expr, every)| {
                let judged = metric_type
                    .ok_or_else(|| "metric type unknown".to_string())
                    .and_then(|t| {
                        parse_threshold(&expr)
                            .and_then(|p| p.evaluate(t, values))
                            .map_err(|e| e.to_string())
                    });
                let ok = judged.unwrap_or_else(|e| {
                    self.warnings.push(format!(
                        "{name}: threshold {expr:?} not judged on the merged values ({e}); ok only if it held on every part: {every}"
                    ));
                    every
                });
                Threshold {
                    expression: expr,
                    ok,
                }
            })
            .collect()
    }
}

/// Each stat the parts gave, with the merged value `value` gives it.
fn each_stat(keys: &[String], mut value: impl FnMut(&str) -> Option<f64>) -> Values {
    keys.iter().map(|k| (k.clone(), value(k))).collect()
}

/// A counter's values: `count` summed, `rate` that sum over the longest part's duration
/// (the parts run concurrently).
fn counter_values(view: &StatView<'_>, keys: &[String], duration_ms: Option<f64>) -> Values {
    each_stat(keys, |k| match k {
        "count" => view.sum("count"),
        "rate" => view
            .sum("count")
            .and_then(|c| duration_ms.map(|d| if d > 0.0 { c / (d / 1000.0) } else { 0.0 })),
        _ => None,
    })
}

/// A rate's values: passes and fails (or matches and total) summed, the rate their
/// quotient.
fn rate_values(view: &StatView<'_>, keys: &[String]) -> Values {
    each_stat(keys, |k| match k {
        "passes" | "fails" | "matches" | "total" => view.sum(k),
        "rate" | "value" => {
            let hit = view.sum("passes").or_else(|| view.sum("matches"));
            let all = view
                .sum("passes")
                .zip(view.sum("fails"))
                .map(|(p, f)| p + f)
                .or_else(|| view.sum("total"));
            hit.zip(all).map(|(h, a)| if a > 0.0 { h / a } else { 0.0 })
        }
        _ => None,
    })
}

/// A trend's values over the union of every part's samples: `avg`, `med` and every
/// `p(N)` exact, never an average of the parts' percentiles.
fn trend_of_samples(sorted: &SortedSamples, keys: &[String]) -> io::Result<Values> {
    let ps: Vec<f64> = keys.iter().map(|k| trend_percentile(k)).collect();
    let pct = sorted.percentiles(&ps)?;
    Ok(keys
        .iter()
        .zip(&ps)
        .zip(pct)
        .map(|((k, p), v)| {
            let v = match k.as_str() {
                "avg" => sorted.mean().or(Some(0.0)).filter(|a| a.is_finite()),
                "min" => Some(sorted.min().unwrap_or(0.0)),
                "max" => Some(sorted.max().unwrap_or(0.0)),
                "count" => Some(sorted.count() as f64),
                _ if p.is_nan() => None,
                _ => Some(v),
            };
            (k.clone(), v)
        })
        .collect())
}

/// A trend's values without the union of samples: only what the parts' summaries give
/// exactly (`min`, `max`, `count`, and `avg` when every part gave its `avg` and
/// `count`); percentiles `null`.
fn trend_of_summaries(view: &StatView<'_>, keys: &[String]) -> Values {
    let ms = view.metric;
    each_stat(keys, |k| match k {
        "min" => view.min("min"),
        "max" => view.max("max"),
        "count" => view.sum("count"),
        "avg" => view.sum("count").and_then(|n| {
            let total = ms.weighted_avg.0.filter(|_| ms.weighted_avg.1 == ms.parts);
            total.map(|t| if n > 0.0 { t / n } else { 0.0 })
        }),
        _ => None,
    })
}

/// The percentile a trend stat stands for (`med` is p(50)); NaN for `avg`, `min`,
/// `max`, `count` and anything unknown.
fn trend_percentile(stat: &str) -> f64 {
    match stat {
        "med" => 50.0,
        "p90" => 90.0,
        "p95" => 95.0,
        _ => percentile_of(stat).unwrap_or(f64::NAN),
    }
}

fn add(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a + b),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_part_s_99_is_judged_again_and_other_codes_count_worst_first() {
        assert_eq!(merged_exit_code(&[Some(0), Some(99), Some(0)]), Some(0));
        assert_eq!(merged_exit_code(&[Some(99), Some(99)]), Some(0));
        assert_eq!(merged_exit_code(&[Some(0), Some(105), Some(99)]), Some(105));
        assert_eq!(merged_exit_code(&[Some(105), Some(101)]), Some(101));
        assert_eq!(
            merged_exit_code(&[Some(101), Some(107), Some(110)]),
            Some(107)
        );
        assert_eq!(merged_exit_code(&[Some(110), Some(0)]), Some(110));
        assert_eq!(merged_exit_code(&[None, Some(0)]), Some(0));
        assert_eq!(merged_exit_code(&[None, None]), None);
    }

    #[test]
    fn no_summary_anywhere_is_an_error_naming_the_parts() {
        let parts = vec![
            PartInput {
                index: 1,
                exit_code: Some(107),
                reason: Some("script error".into()),
                ..PartInput::default()
            },
            PartInput {
                index: 0,
                exit_code: Some(107),
                ..PartInput::default()
            },
        ];
        let m = merge_parts(parts).unwrap();
        assert!(m.summary.is_none());
        assert_eq!(m.exit_code, Some(107));
        assert_eq!(
            m.error.as_deref(),
            Some("part 0 of 2: no summary; part 1 of 2: script error")
        );
    }

    /// Part 0 of the real 2-part split fixture, parsed.
    fn split_part_summary() -> Summary {
        let doc: serde_json::Value = serde_json::from_str(include_str!(
            "../../fixtures/k6-split/v1.1.0/split2-merged-pass/part-0/summary.json"
        ))
        .unwrap();
        super::super::parse::parse_summary_value(&doc).unwrap()
    }

    #[test]
    fn a_union_of_parts_above_a_cap_refuses_the_merge_naming_the_cap() {
        let a = split_part_summary();
        let mut b = a.clone();
        let mut extra = b.metrics[0].clone();
        extra.name = format!("{}{{only:b}}", extra.base_name);
        b.metrics.push(extra);
        let n = a.metrics.len();
        let mut acc = MergeAcc::new(&SummaryLimits {
            max_metrics: n,
            ..SummaryLimits::default()
        });
        acc.add_part(0, Some(0), Some(&a), None);
        assert_eq!(acc.refused(), None, "one part at the cap is merged");
        acc.add_part(1, Some(0), Some(&b), None);
        let m = acc.finish().unwrap();
        assert!(m.summary.is_none());
        assert_eq!(m.exit_code, Some(0));
        assert_eq!(
            m.error.as_deref(),
            Some(
                format!(
                    "merge refused: the parts' summaries hold {} metrics together, over ingest.max_metrics ({n})",
                    n + 1
                )
                .as_str()
            )
        );
    }

    /// A later part that brings a new metric, or a new stat of a known one, is merged
    /// with what was folded before it, whatever its metrics' order.
    #[test]
    fn a_later_part_with_new_metrics_and_stats_keeps_every_sum_exact() {
        let a = split_part_summary();
        let mut b = a.clone();
        let mut c = a.clone();
        let count = |s: &Summary, name: &str| s.metric(name).unwrap().value("count").unwrap();
        let iterations = b
            .metrics
            .iter_mut()
            .find(|m| m.name == "iterations")
            .unwrap();
        iterations.values.insert("extra".into(), Some(2.0));
        let mut extra = iterations.clone();
        extra.name = "aaa_first{only:b}".into();
        extra.base_name = "aaa_first".into();
        extra.tags = BTreeMap::from([("only".to_string(), "b".to_string())]);
        extra.values.insert("count".into(), Some(7.0));
        b.metrics.push(extra);
        b.metrics.reverse();
        c.metrics.retain(|m| m.name != "iterations");
        let mut acc = MergeAcc::new(&SummaryLimits::default());
        for (i, s) in [&a, &b, &c].into_iter().enumerate() {
            acc.add_part(i as u32, Some(0), Some(s), None);
        }
        let merged = acc.finish().unwrap().summary.unwrap();
        let m = merged.metric("iterations").unwrap();
        assert_eq!(m.value("count"), Some(count(&a, "iterations") * 2.0));
        assert_eq!(m.values.get("extra"), Some(&None), "absent from one part");
        let m = merged.metric("aaa_first{only:b}").unwrap();
        assert_eq!(m.value("count"), Some(7.0));
        assert_eq!(m.base_name, "aaa_first");
        assert_eq!(m.tags.get("only").map(String::as_str), Some("b"));
        assert_eq!(
            merged.metric("data_sent").unwrap().value("count"),
            Some(count(&a, "data_sent") * 3.0)
        );
        assert_eq!(merged.metrics.len(), a.metrics.len() + 1);
        assert!(merged.metrics.windows(2).all(|w| w[0].name < w[1].name));
    }
}
