//! k6's threshold expressions (`p(95)<500`, `rate <= 0.01`), parsed and judged exactly
//! as k6 does, so that values k6 never judged itself (runs merged from several runners)
//! get the verdict k6 would have given.
//!
//! Rules reproduced from k6's `metrics/thresholds_parser.go` and `metrics/thresholds.go`:
//!
//! - the expression is split at the first occurrence of the first operator found, trying
//!   `<=`, `<`, `>=`, `>`, `===`, `==`, `!=` in that order; the two sides are trimmed;
//! - the left side is one of `avg min max med count rate value` or `p(N)` with
//!   0 ≤ N ≤ 100 written without inner spaces; a bare `p` is k6's percentile token with
//!   no value, so it means `p(0)` (the minimum);
//! - the right side is a Go `strconv.ParseFloat` number (sign, decimals, exponent,
//!   `Inf`, `NaN`, underscores between digits);
//! - `==` and `===` are the same float comparison;
//! - only some aggregations exist per metric type (k6 refuses the others before the run);
//! - a Rate with no samples has no `rate` to test and passes, whatever the expression.
//!
//! Checked against the real k6 2.2.0 and 1.1.0 binaries: `p<1.5` passes and `p<0.5`
//! fails on the values 1..5; `p(101)` and `p(-1)` stop k6 2.2.0 with exit 104 (1.1.0
//! panics on them, exit 109); `p( 50 )`, `+NaN`, `1e400`, `0x10` and `<==` are refused;
//! `1_000`, `Inf` and `!=NaN` are accepted.
//!
//! Pure: no I/O. Values are the stats as k6 reports them: trend times in milliseconds,
//! rates in 0..1, counter `rate` per second.

use std::collections::BTreeMap;
use std::fmt;

use super::model::{Metric, MetricType};
use super::selector::percentile_of;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Aggregation {
    Avg,
    Min,
    Max,
    Med,
    Count,
    Rate,
    Value,
    /// `p(N)`, N in 0..=100.
    Percentile(f64),
}

impl fmt::Display for Aggregation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Avg => f.write_str("avg"),
            Self::Min => f.write_str("min"),
            Self::Max => f.write_str("max"),
            Self::Med => f.write_str("med"),
            Self::Count => f.write_str("count"),
            Self::Rate => f.write_str("rate"),
            Self::Value => f.write_str("value"),
            Self::Percentile(p) => write!(f, "p({p})"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operator {
    Less,
    LessEqual,
    Greater,
    GreaterEqual,
    /// `==`
    Equal,
    /// `===`: the same comparison as `==` on floats.
    StrictlyEqual,
    NotEqual,
}

impl Operator {
    /// In k6's scanning order: a longer token sharing a prefix with a shorter one comes
    /// first, and the first token found anywhere in the text wins.
    const SCAN_ORDER: [(&'static str, Operator); 7] = [
        ("<=", Operator::LessEqual),
        ("<", Operator::Less),
        (">=", Operator::GreaterEqual),
        (">", Operator::Greater),
        ("===", Operator::StrictlyEqual),
        ("==", Operator::Equal),
        ("!=", Operator::NotEqual),
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Less => "<",
            Self::LessEqual => "<=",
            Self::Greater => ">",
            Self::GreaterEqual => ">=",
            Self::Equal => "==",
            Self::StrictlyEqual => "===",
            Self::NotEqual => "!=",
        }
    }

    fn apply(self, lhs: f64, rhs: f64) -> bool {
        match self {
            Self::Less => lhs < rhs,
            Self::LessEqual => lhs <= rhs,
            Self::Greater => lhs > rhs,
            Self::GreaterEqual => lhs >= rhs,
            Self::Equal | Self::StrictlyEqual => lhs == rhs,
            Self::NotEqual => lhs != rhs,
        }
    }
}

/// A parsed threshold expression.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ThresholdExpr {
    pub aggregation: Aggregation,
    pub operator: Operator,
    pub value: f64,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ThresholdError {
    #[error("threshold {expression:?}: no operator (one of <= < >= > === == !=)")]
    NoOperator { expression: String },
    #[error("threshold {expression:?}: unknown aggregation method {method:?}")]
    UnknownAggregation { expression: String, method: String },
    #[error("threshold {expression:?}: percentile {text:?} is not a number in 0..100")]
    BadPercentile { expression: String, text: String },
    #[error("threshold {expression:?}: {text:?} is not a number")]
    BadValue { expression: String, text: String },
    #[error("aggregation {aggregation} does not exist for a {metric_type} metric")]
    UnsupportedAggregation {
        aggregation: String,
        metric_type: &'static str,
    },
    #[error("the metric's type is unknown, so {aggregation} cannot be judged")]
    UnknownMetricType { aggregation: String },
    #[error("stat {stat} is missing from the metric's values")]
    MissingStat { stat: String },
    #[error("stat {stat} is null (k6 wrote a non-finite value)")]
    NullStat { stat: String },
}

/// Parses an expression as k6 does (`metrics/thresholds_parser.go`).
pub fn parse_threshold(expression: &str) -> Result<ThresholdExpr, ThresholdError> {
    let (method, operator, value) = Operator::SCAN_ORDER
        .iter()
        .find_map(|(token, op)| {
            expression
                .split_once(token)
                .map(|(l, r)| (l.trim(), *op, r.trim()))
        })
        .ok_or_else(|| ThresholdError::NoOperator {
            expression: expression.to_string(),
        })?;
    let aggregation = match method {
        "avg" => Aggregation::Avg,
        "min" => Aggregation::Min,
        "max" => Aggregation::Max,
        "med" => Aggregation::Med,
        "count" => Aggregation::Count,
        "rate" => Aggregation::Rate,
        "value" => Aggregation::Value,
        "p" => Aggregation::Percentile(0.0),
        _ => {
            let inner = method
                .strip_prefix("p(")
                .and_then(|m| m.strip_suffix(')'))
                .ok_or_else(|| ThresholdError::UnknownAggregation {
                    expression: expression.to_string(),
                    method: method.to_string(),
                })?;
            let p = go_parse_float(inner)
                .filter(|p| (0.0..=100.0).contains(p))
                .ok_or_else(|| ThresholdError::BadPercentile {
                    expression: expression.to_string(),
                    text: inner.to_string(),
                })?;
            Aggregation::Percentile(p)
        }
    };
    let value = go_parse_float(value).ok_or_else(|| ThresholdError::BadValue {
        expression: expression.to_string(),
        text: value.to_string(),
    })?;
    Ok(ThresholdExpr {
        aggregation,
        operator,
        value,
    })
}

/// Go's `strconv.ParseFloat(s, 64)` for the decimal forms: an optional sign, digits with
/// an optional fraction and exponent, `_` only between digits, `inf`/`infinity` with an
/// optional sign or `nan`, in any case. A finite literal beyond f64's range is an error
/// in Go (`ErrRange`), so it is refused here too rather than read as infinity.
/// Hexadecimal floats (`0x1p-2`) are refused: no k6 threshold uses them.
fn go_parse_float(s: &str) -> Option<f64> {
    let unsigned = s.strip_prefix(['+', '-']).unwrap_or(s);
    let lower = unsigned.to_ascii_lowercase();
    match lower.as_str() {
        "inf" | "infinity" => return s.parse().ok(),
        "nan" => return (unsigned.len() == s.len()).then_some(f64::NAN),
        _ => {}
    }
    let bytes = unsigned.as_bytes();
    let mut digits = 0;
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'0'..=b'9' => digits += 1,
            b'_' => {
                let between = i > 0
                    && bytes[i - 1].is_ascii_digit()
                    && bytes.get(i + 1).is_some_and(u8::is_ascii_digit);
                if !between {
                    return None;
                }
            }
            b'.' | b'e' | b'E' | b'+' | b'-' => {}
            _ => return None,
        }
    }
    if digits == 0 {
        return None;
    }
    // Rust's grammar for these characters is Go's, minus the underscores.
    s.replace('_', "")
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite())
}

/// Which aggregations k6 accepts per metric type (`metrics/metric_type.go`).
fn supported(metric_type: MetricType, aggregation: Aggregation) -> bool {
    match metric_type {
        MetricType::Counter => matches!(aggregation, Aggregation::Count | Aggregation::Rate),
        MetricType::Gauge => matches!(aggregation, Aggregation::Value),
        MetricType::Rate => matches!(aggregation, Aggregation::Rate),
        MetricType::Trend => matches!(
            aggregation,
            Aggregation::Avg
                | Aggregation::Min
                | Aggregation::Max
                | Aggregation::Med
                | Aggregation::Percentile(_)
        ),
    }
}

impl ThresholdExpr {
    /// Judges the expression on a metric's stats, keyed as in k6's handleSummary data
    /// (`count`, `rate`, `passes`, `fails`, `value`, `avg`, `min`, `med`, `max`, `p(N)`).
    /// `Ok(true)` = the threshold holds (k6's `ok: true`).
    pub fn evaluate(
        &self,
        metric_type: MetricType,
        values: &BTreeMap<String, Option<f64>>,
    ) -> Result<bool, ThresholdError> {
        if !supported(metric_type, self.aggregation) {
            return Err(ThresholdError::UnsupportedAggregation {
                aggregation: self.aggregation.to_string(),
                metric_type: metric_type.as_str(),
            });
        }
        // k6 only has a `rate` for a Rate that got samples; without one the threshold
        // passes (metrics/thresholds.go `runNoTaint`).
        if metric_type == MetricType::Rate {
            let total = ["passes", "fails"]
                .iter()
                .map(|k| values.get(*k).copied().flatten())
                .sum::<Option<f64>>();
            if total == Some(0.0) {
                return Ok(true);
            }
        }
        let lhs = self.stat(values)?;
        Ok(self.operator.apply(lhs, self.value))
    }

    /// The stat the expression compares, looked up by meaning: `p(99.0)` is `p(99)`, and
    /// k6's `p(50)`, `p(0)` and `p(100)` are exactly its `med`, `min` and `max` (the
    /// interpolation lands on a sample).
    fn stat(&self, values: &BTreeMap<String, Option<f64>>) -> Result<f64, ThresholdError> {
        let found = |key: &str| values.get(key).map(|v| (key.to_string(), *v));
        let percentile = |p: f64| {
            values
                .iter()
                .find(|(k, _)| percentile_of(k) == Some(p))
                .map(|(k, v)| (k.clone(), *v))
        };
        let hit = match self.aggregation {
            Aggregation::Percentile(p) => percentile(p).or_else(|| {
                [(0.0, "min"), (50.0, "med"), (100.0, "max")]
                    .iter()
                    .find(|(q, _)| *q == p)
                    .and_then(|(_, stat)| found(stat))
            }),
            Aggregation::Med => found("med").or_else(|| percentile(50.0)),
            other => found(&other.to_string()),
        };
        match hit {
            Some((_, Some(v))) => Ok(v),
            Some((stat, None)) => Err(ThresholdError::NullStat { stat }),
            None => Err(ThresholdError::MissingStat {
                stat: self.aggregation.to_string(),
            }),
        }
    }
}

/// Parses `expression` and judges it on `metric`'s own values.
pub fn evaluate_on_metric(expression: &str, metric: &Metric) -> Result<bool, ThresholdError> {
    let parsed = parse_threshold(expression)?;
    let metric_type = metric
        .metric_type
        .ok_or_else(|| ThresholdError::UnknownMetricType {
            aggregation: parsed.aggregation.to_string(),
        })?;
    parsed.evaluate(metric_type, &metric.values)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(pairs: &[(&str, f64)]) -> BTreeMap<String, Option<f64>> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), Some(*v)))
            .collect()
    }

    #[test]
    fn parses_every_operator_and_aggregation() {
        let cases = [
            ("avg<1", Aggregation::Avg, Operator::Less, 1.0),
            ("min<=2", Aggregation::Min, Operator::LessEqual, 2.0),
            ("max>3", Aggregation::Max, Operator::Greater, 3.0),
            ("med>=4", Aggregation::Med, Operator::GreaterEqual, 4.0),
            ("count==5", Aggregation::Count, Operator::Equal, 5.0),
            (
                "rate===0.5",
                Aggregation::Rate,
                Operator::StrictlyEqual,
                0.5,
            ),
            ("value!=-7", Aggregation::Value, Operator::NotEqual, -7.0),
            (
                "p(99.9)<1e3",
                Aggregation::Percentile(99.9),
                Operator::Less,
                1000.0,
            ),
            (
                "p(0)>=0",
                Aggregation::Percentile(0.0),
                Operator::GreaterEqual,
                0.0,
            ),
            (
                "p(100)<.5",
                Aggregation::Percentile(100.0),
                Operator::Less,
                0.5,
            ),
        ];
        for (text, aggregation, operator, value) in cases {
            assert_eq!(
                parse_threshold(text),
                Ok(ThresholdExpr {
                    aggregation,
                    operator,
                    value
                }),
                "{text}"
            );
        }
    }

    #[test]
    fn whitespace_around_the_parts_is_ignored_but_not_inside_them() {
        let p = parse_threshold("  p(95)   <=  -12.5  ").unwrap();
        assert_eq!(p.aggregation, Aggregation::Percentile(95.0));
        assert_eq!(p.operator, Operator::LessEqual);
        assert_eq!(p.value, -12.5);
        assert!(matches!(
            parse_threshold("p( 95 )<1"),
            Err(ThresholdError::BadPercentile { .. })
        ));
        assert!(matches!(
            parse_threshold("p (95)<1"),
            Err(ThresholdError::UnknownAggregation { .. })
        ));
        assert!(matches!(
            parse_threshold("rate < 0. 5"),
            Err(ThresholdError::BadValue { .. })
        ));
    }

    #[test]
    fn numbers_follow_go_parse_float() {
        for (text, want) in [
            ("count>+3", 3.0),
            ("count>1_000", 1000.0),
            ("count>1E2", 100.0),
            ("count>5.", 5.0),
            ("count>-0.25", -0.25),
        ] {
            assert_eq!(parse_threshold(text).unwrap().value, want, "{text}");
        }
        assert_eq!(parse_threshold("count<Inf").unwrap().value, f64::INFINITY);
        assert_eq!(
            parse_threshold("count>-Infinity").unwrap().value,
            f64::NEG_INFINITY
        );
        assert!(parse_threshold("count<nan").unwrap().value.is_nan());
        for bad in [
            "count<+NaN",
            "count<1e400",
            "count<",
            "count<1_",
            "count<_1",
            "count<0x10",
            "count<1,5",
            "count<abc",
        ] {
            assert!(
                matches!(parse_threshold(bad), Err(ThresholdError::BadValue { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn operators_are_scanned_in_k6s_order() {
        // `<` is found before `==` even though `==` comes first in the text.
        assert!(matches!(
            parse_threshold("count==1<2"),
            Err(ThresholdError::UnknownAggregation { .. })
        ));
        // `=` alone, `=>`, `<>` and nothing at all are not operators k6 knows.
        for bad in ["count=1", "count=>1", "count"] {
            assert!(parse_threshold(bad).is_err(), "{bad}");
        }
        assert!(matches!(
            parse_threshold("count<>1"),
            Err(ThresholdError::BadValue { .. })
        ));
    }

    #[test]
    fn bad_aggregations_and_percentiles() {
        for bad in ["p(101)<1", "p(-1)<1", "p()<1", "p(x)<1"] {
            assert!(
                matches!(
                    parse_threshold(bad),
                    Err(ThresholdError::BadPercentile { .. })
                ),
                "{bad}"
            );
        }
        assert_eq!(
            parse_threshold("p < 1.5").unwrap().aggregation,
            Aggregation::Percentile(0.0),
            "k6 reads a bare `p` as p(0)"
        );
        for bad in ["mean<1", "P(95)<1", "<1", "p95<1"] {
            assert!(
                matches!(
                    parse_threshold(bad),
                    Err(ThresholdError::UnknownAggregation { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn evaluates_like_k6() {
        let trend = values(&[("avg", 10.0), ("med", 8.0), ("p(95)", 30.0), ("max", 40.0)]);
        let judge = |e: &str, t, v| parse_threshold(e).unwrap().evaluate(t, v);
        assert_eq!(judge("p(95)<30", MetricType::Trend, &trend), Ok(false));
        assert_eq!(judge("p(95)<=30", MetricType::Trend, &trend), Ok(true));
        assert_eq!(judge("p(95.0)===30", MetricType::Trend, &trend), Ok(true));
        assert_eq!(judge("p(50)==8", MetricType::Trend, &trend), Ok(true));
        assert_eq!(judge("p(100)>=40", MetricType::Trend, &trend), Ok(true));
        assert_eq!(
            judge("p<1", MetricType::Trend, &trend),
            Err(ThresholdError::MissingStat {
                stat: "p(0)".into()
            }),
            "no min in these values"
        );
        assert_eq!(judge("avg!=10", MetricType::Trend, &trend), Ok(false));
        assert_eq!(
            judge("p(99)<1", MetricType::Trend, &trend),
            Err(ThresholdError::MissingStat {
                stat: "p(99)".into()
            })
        );
        assert!(matches!(
            judge("count>1", MetricType::Trend, &trend),
            Err(ThresholdError::UnsupportedAggregation { .. })
        ));
        let counter = values(&[("count", 5.0), ("rate", 2.5)]);
        assert_eq!(judge("rate>2", MetricType::Counter, &counter), Ok(true));
        assert_eq!(judge("count<5", MetricType::Counter, &counter), Ok(false));
        let gauge = values(&[("value", -1.0), ("min", -1.0), ("max", 0.0)]);
        assert_eq!(judge("value<0", MetricType::Gauge, &gauge), Ok(true));
        assert!(judge("max<0", MetricType::Gauge, &gauge).is_err());
    }

    #[test]
    fn a_rate_without_samples_passes_and_null_is_an_error() {
        let empty = values(&[("rate", 0.0), ("passes", 0.0), ("fails", 0.0)]);
        let t = parse_threshold("rate>0.9").unwrap();
        assert_eq!(t.evaluate(MetricType::Rate, &empty), Ok(true));
        let some = values(&[("rate", 0.5), ("passes", 1.0), ("fails", 1.0)]);
        assert_eq!(t.evaluate(MetricType::Rate, &some), Ok(false));
        let mut null = BTreeMap::new();
        null.insert("avg".to_string(), None);
        assert_eq!(
            parse_threshold("avg<1")
                .unwrap()
                .evaluate(MetricType::Trend, &null),
            Err(ThresholdError::NullStat { stat: "avg".into() })
        );
    }
}
