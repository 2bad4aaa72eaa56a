//! The normalised form of every k6 summary format. Parsing fills it; extraction reads it.
//! Nothing here knows which file format it came from except `Summary::format`.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

/// Which of k6's summary shapes a file had. Detected by content, never by file name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SummaryFormat {
    /// The `data` object handed to `handleSummary` (k6 0.4x to 1.x).
    HandleSummary,
    /// `k6 run --summary-export`: no types, no units, threshold `true` means failed.
    LegacyExport,
    /// The versioned machine-readable summary (`"version": "1.0.0"`, k6 1.5+ opt-in).
    MachineReadable,
}

impl SummaryFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::HandleSummary => "handle_summary",
            Self::LegacyExport => "legacy_export",
            Self::MachineReadable => "machine_readable_v1",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MetricType {
    Counter,
    Gauge,
    Rate,
    Trend,
}

impl MetricType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Counter => "counter",
            Self::Gauge => "gauge",
            Self::Rate => "rate",
            Self::Trend => "trend",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "counter" => Some(Self::Counter),
            "gauge" => Some(Self::Gauge),
            "rate" => Some(Self::Rate),
            "trend" => Some(Self::Trend),
            _ => None,
        }
    }
}

/// What a metric's numbers measure: decides how they are scaled to integers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Contains {
    Default,
    /// Milliseconds as float64, whatever `summaryTimeUnit` says.
    Time,
    /// Bytes.
    Data,
}

impl Contains {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Default => "default",
            Self::Time => "time",
            Self::Data => "data",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "default" => Some(Self::Default),
            "time" => Some(Self::Time),
            "data" => Some(Self::Data),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Threshold {
    /// The expression exactly as the script wrote it, e.g. `p(95)<50`.
    pub expression: String,
    pub ok: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Metric {
    /// The key as k6 wrote it, selector included: `http_req_duration{status:200}`.
    pub name: String,
    /// The text before the first `{`.
    pub base_name: String,
    /// The selector's tags; empty for a plain metric.
    pub tags: BTreeMap<String, String>,
    pub metric_type: Option<MetricType>,
    /// `None` when the format does not say (legacy export of a custom metric).
    pub contains: Option<Contains>,
    /// Every stat as k6 wrote it; `None` where k6 wrote `null` (non-finite values).
    pub values: BTreeMap<String, Option<f64>>,
    pub thresholds: Vec<Threshold>,
}

impl Metric {
    /// A stat k6 reported with a finite value. Missing and `null` both give `None`.
    pub fn value(&self, stat: &str) -> Option<f64> {
        self.values.get(stat).copied().flatten()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Check {
    /// Group names from the root group down; empty for checks at the top level.
    pub group_path: Vec<String>,
    /// k6's own path string (`::group::check`), kept for display; never split.
    pub path: String,
    pub name: String,
    pub passes: Option<f64>,
    pub fails: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub format: SummaryFormat,
    /// `state.testRunDurationMs` (or the machine-readable `config.duration` × 1000).
    pub test_run_duration_ms: Option<f64>,
    /// `options.summaryTrendStats`, when the format carries it.
    pub trend_stats: Option<Vec<String>>,
    /// Sorted by name, so every consumer sees one stable order.
    pub metrics: Vec<Metric>,
    /// In tree order: a group's checks, then its subgroups.
    pub checks: Vec<Check>,
    /// Problems found while normalising that did not stop parsing.
    pub warnings: Vec<String>,
    /// Stats the file did not carry but parsing computed from it, by metric name, so
    /// extraction can say a value was derived (machine-readable counters carry no
    /// `rate`; it is `count` over `config.duration`).
    pub derived: BTreeMap<String, BTreeSet<String>>,
}

impl Summary {
    pub fn metric(&self, name: &str) -> Option<&Metric> {
        self.metrics
            .binary_search_by(|m| m.name.as_str().cmp(name))
            .ok()
            .map(|i| &self.metrics[i])
    }

    /// Whether `metric`'s `stat` was computed by parsing rather than read from the file.
    pub fn is_derived(&self, metric: &str, stat: &str) -> bool {
        self.derived.get(metric).is_some_and(|s| s.contains(stat))
    }
}
