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

use super::model::{Check, Metric, MetricType, Summary, Threshold};
use super::samples::{SampleSets, SampleStats};
use super::selector::percentile_of;
use super::sink::SortedSamples;
use super::threshold::parse_threshold;
use super::wanted_samples;

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
    pub sources: BTreeMap<String, String>,
}

/// The trend keys whose samples a merge reads from each part: every trend of every
/// part's summary, submetrics included, in name order.
pub fn merge_sample_keys(
    summaries: &[&Summary],
) -> Vec<(String, String, BTreeMap<String, String>)> {
    let mut seen = BTreeMap::new();
    for s in summaries {
        for m in &s.metrics {
            if m.metric_type == Some(MetricType::Trend) {
                seen.entry(m.name.clone())
                    .or_insert_with(|| (m.base_name.clone(), m.tags.clone()));
            }
        }
    }
    seen.into_iter().map(|(k, (b, t))| (k, b, t)).collect()
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

pub fn merge_parts(mut parts: Vec<PartInput>) -> io::Result<Merged> {
    parts.sort_by_key(|p| p.index);
    let count = parts.len();
    let mut warnings = Vec::new();
    let mut sources = BTreeMap::new();
    let exit_code = merged_exit_code(&parts.iter().map(|p| p.exit_code).collect::<Vec<_>>());
    let error = parts
        .iter()
        .filter(|p| p.summary.is_none())
        .map(|p| {
            format!(
                "part {} of {count}: {}",
                p.index,
                p.reason.as_deref().unwrap_or("no summary")
            )
        })
        .reduce(|a, b| format!("{a}; {b}"));

    // Parts without a summary sent nothing to merge; their samples are not needed.
    let missing_samples: Vec<String> = parts
        .iter()
        .filter(|p| p.summary.is_some() && p.samples.is_none())
        .map(|p| {
            format!(
                "part {} ({})",
                p.index,
                p.samples_reason.as_deref().unwrap_or("no raw samples")
            )
        })
        .collect();
    // --- the union of the parts' samples, per trend key ---
    let mut merged_sorted: HashMap<String, SortedSamples> = HashMap::new();
    if missing_samples.is_empty() {
        let mut from: HashMap<String, usize> = HashMap::new();
        let mut n = 0;
        for p in parts.iter_mut().filter(|p| p.summary.is_some()) {
            n += 1;
            for (key, sorted) in p.samples.take().unwrap_or_default() {
                *from.entry(key.clone()).or_default() += 1;
                let joined = match merged_sorted.remove(&key) {
                    Some(prev) => SortedSamples::merge([prev, sorted]),
                    None => sorted,
                };
                merged_sorted.insert(key, joined);
            }
        }
        // A key some part could not give completely has no exact union.
        merged_sorted.retain(|k, _| from.get(k) == Some(&n));
    }

    let with_summary: Vec<&PartInput> = parts.iter().filter(|p| p.summary.is_some()).collect();
    if with_summary.is_empty() {
        return Ok(Merged {
            summary: None,
            exit_code,
            samples: None,
            error,
            warnings,
            sources,
        });
    }
    let summaries: Vec<&Summary> = with_summary
        .iter()
        .filter_map(|p| p.summary.as_ref())
        .collect();
    let duration_ms = summaries
        .iter()
        .filter_map(|s| s.test_run_duration_ms)
        .fold(None, |a: Option<f64>, d| Some(a.map_or(d, |a| a.max(d))));

    // --- metrics ---
    let mut names: BTreeSet<&str> = BTreeSet::new();
    for s in &summaries {
        names.extend(s.metrics.iter().map(|m| m.name.as_str()));
    }
    let mut metrics = Vec::with_capacity(names.len());
    for name in names {
        let ms: Vec<&Metric> = summaries.iter().filter_map(|s| s.metric(name)).collect();
        let first = ms[0];
        let mut values: BTreeMap<String, Option<f64>> = BTreeMap::new();
        let stat_keys: BTreeSet<&str> = ms
            .iter()
            .flat_map(|m| m.values.keys().map(String::as_str))
            .collect();
        let sum = |k: &str| -> Option<f64> { ms.iter().map(|m| m.value(k)).sum() };
        let min = |k: &str| ms.iter().filter_map(|m| m.value(k)).reduce(f64::min);
        let max = |k: &str| ms.iter().filter_map(|m| m.value(k)).reduce(f64::max);
        match first.metric_type {
            Some(MetricType::Counter) => {
                for k in stat_keys {
                    let v = match k {
                        "count" => sum("count"),
                        "rate" => sum("count").and_then(|c| {
                            duration_ms.map(|d| if d > 0.0 { c / (d / 1000.0) } else { 0.0 })
                        }),
                        _ => None,
                    };
                    values.insert(k.to_string(), v);
                }
            }
            Some(MetricType::Rate) => {
                for k in stat_keys {
                    let v = match k {
                        "passes" | "fails" | "matches" | "total" => sum(k),
                        "rate" | "value" => {
                            let hit = sum("passes").or_else(|| sum("matches"));
                            let all = sum("passes")
                                .zip(sum("fails"))
                                .map(|(p, f)| p + f)
                                .or_else(|| sum("total"));
                            hit.zip(all).map(|(h, a)| if a > 0.0 { h / a } else { 0.0 })
                        }
                        _ => None,
                    };
                    values.insert(k.to_string(), v);
                }
            }
            Some(MetricType::Gauge) => {
                let additive = matches!(first.base_name.as_str(), "vus" | "vus_max");
                for k in stat_keys {
                    let v = match k {
                        _ if additive => sum(k),
                        "min" => min("min"),
                        "max" | "value" => max(k),
                        _ => None,
                    };
                    values.insert(k.to_string(), v);
                }
                if !additive && ms.len() > 1 {
                    sources.insert(
                        format!("{name}.value"),
                        "merged: the largest of the parts' last values".into(),
                    );
                }
            }
            Some(MetricType::Trend) => match merged_sorted.get(name) {
                Some(sorted) => {
                    let keys: Vec<&str> = stat_keys.into_iter().collect();
                    let ps: Vec<f64> = keys.iter().map(|k| trend_percentile(k)).collect();
                    let pct = sorted.percentiles(&ps)?;
                    for ((k, p), v) in keys.iter().zip(&ps).zip(pct) {
                        let v = match *k {
                            "avg" => sorted.mean().or(Some(0.0)).filter(|a| a.is_finite()),
                            "min" => Some(sorted.min().unwrap_or(0.0)),
                            "max" => Some(sorted.max().unwrap_or(0.0)),
                            "count" => Some(sorted.count() as f64),
                            _ if p.is_nan() => None,
                            _ => Some(v),
                        };
                        values.insert((*k).to_string(), v);
                    }
                    sources.insert(
                        name.to_string(),
                        format!(
                            "merged: the union of {} parts' raw samples",
                            summaries.len()
                        ),
                    );
                }
                None => {
                    let counts: Option<Vec<f64>> = ms.iter().map(|m| m.value("count")).collect();
                    for k in stat_keys {
                        let v = match k {
                            "min" => min("min"),
                            "max" => max("max"),
                            "count" => sum("count"),
                            "avg" => counts.as_ref().and_then(|cs| {
                                let n: f64 = cs.iter().sum();
                                let total: Option<f64> = ms
                                    .iter()
                                    .zip(cs)
                                    .map(|(m, c)| m.value("avg").map(|a| a * c))
                                    .sum();
                                total.map(|t| if n > 0.0 { t / n } else { 0.0 })
                            }),
                            _ => None,
                        };
                        values.insert(k.to_string(), v);
                    }
                    let why = if missing_samples.is_empty() {
                        "its raw samples were not collected".to_string()
                    } else {
                        format!("no raw samples from {}", missing_samples.join(", "))
                    };
                    warnings.push(format!(
                        "{name}: merged percentiles not computed ({why}); never an average of percentiles"
                    ));
                    sources.insert(name.to_string(), format!("merged: percentiles NULL, {why}"));
                }
            },
            None => {
                warnings.push(format!("{name}: metric type unknown, not merged"));
                for k in stat_keys {
                    values.insert(k.to_string(), None);
                }
            }
        }
        // --- thresholds, judged again on the merged values ---
        let mut exprs: Vec<&str> = Vec::new();
        for m in &ms {
            for t in &m.thresholds {
                if !exprs.contains(&t.expression.as_str()) {
                    exprs.push(&t.expression);
                }
            }
        }
        let thresholds = exprs
            .into_iter()
            .map(|expr| {
                let judged = first.metric_type.ok_or_else(|| "metric type unknown".to_string()).and_then(|t| {
                    parse_threshold(expr)
                        .and_then(|p| p.evaluate(t, &values))
                        .map_err(|e| e.to_string())
                });
                let ok = match judged {
                    Ok(ok) => ok,
                    Err(e) => {
                        // Not judgeable on the merged values: it holds only if it held
                        // on every part.
                        let every = ms.iter().all(|m| {
                            m.thresholds
                                .iter()
                                .filter(|t| t.expression == expr)
                                .all(|t| t.ok)
                        });
                        warnings.push(format!(
                            "{name}: threshold {expr:?} not judged on the merged values ({e}); ok only if it held on every part: {every}"
                        ));
                        every
                    }
                };
                Threshold {
                    expression: expr.to_string(),
                    ok,
                }
            })
            .collect();
        metrics.push(Metric {
            name: name.to_string(),
            base_name: first.base_name.clone(),
            tags: first.tags.clone(),
            metric_type: first.metric_type,
            contains: first.contains,
            values,
            thresholds,
        });
    }

    // --- checks, by group path and name, in first-seen order ---
    let mut checks: Vec<Check> = Vec::new();
    for s in &summaries {
        for c in &s.checks {
            match checks
                .iter_mut()
                .find(|m| m.group_path == c.group_path && m.name == c.name)
            {
                Some(m) => {
                    m.passes = add(m.passes, c.passes);
                    m.fails = add(m.fails, c.fails);
                }
                None => checks.push(c.clone()),
            }
        }
    }

    for p in &with_summary {
        if let Some(s) = &p.summary {
            warnings.extend(s.warnings.iter().map(|w| format!("part {}: {w}", p.index)));
        }
    }
    let mut derived: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for s in &summaries {
        for (k, v) in &s.derived {
            derived
                .entry(k.clone())
                .or_default()
                .extend(v.iter().cloned());
        }
    }
    let summary = Summary {
        format: summaries[0].format,
        test_run_duration_ms: duration_ms,
        trend_stats: summaries[0].trend_stats.clone(),
        metrics,
        checks,
        warnings: Vec::new(),
        derived,
    };

    // --- statistics for the keys extraction fills from samples ---
    let samples = if merged_sorted.is_empty() {
        None
    } else {
        let mut sets = SampleSets::default();
        for r in wanted_samples(&summary) {
            if let Some(sorted) = merged_sorted.get(&r.key) {
                sets.sets.insert(
                    r.key.clone(),
                    SampleStats::of_sorted(sorted, &r.percentiles)?,
                );
            }
        }
        Some(sets)
    };
    Ok(Merged {
        summary: Some(summary),
        exit_code,
        samples,
        error,
        warnings,
        sources,
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
}
