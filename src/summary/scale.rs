//! Integer scaling, the one place where k6's floats become stored integers.
//!
//! Every conversion rounds half away from zero (`f64::round`) and refuses what it cannot
//! represent: non-finite input and results outside `i64` give `None`, never a wrapped or
//! saturated number. Callers turn `None` into NULL plus a warning on the row.

use super::model::{Contains, MetricType};

/// Scale for response times in `k6_performance_runs`: whole milliseconds.
pub const MS: f64 = 1.0;
/// Scale for `request_rate` and `iterations_rate`: per second × 100.
pub const PER_SECOND_X100: f64 = 100.0;
/// Scale for time stats in `k6_metrics_history`: microseconds of k6's milliseconds.
pub const TIME_HISTORY: i32 = 1000;
/// Scale for rates (0..1) in `k6_metrics_history`.
pub const RATE_HISTORY: i32 = 10_000;
/// Scale for data metrics: bytes.
pub const DATA_HISTORY: i32 = 1;
/// Scale for every other gauge, counter and trend value.
pub const DEFAULT_HISTORY: i32 = 1000;

/// `value × factor`, rounded half away from zero, if it fits an `i64`.
pub fn scaled(value: f64, factor: f64) -> Option<i64> {
    let x = (value * factor).round();
    // 2^63 is exactly representable; every f64 below it converts without overflow.
    const LIMIT: f64 = 9_223_372_036_854_775_808.0;
    (x.is_finite() && (-LIMIT..LIMIT).contains(&x)).then_some(x as i64)
}

/// A count that can only be a non-negative whole number (requests, iterations, passes).
pub fn count(value: f64) -> Option<i64> {
    if value < 0.0 {
        None
    } else {
        scaled(value, 1.0)
    }
}

/// The scale of a metric's value-like stats in `k6_metrics_history`.
pub fn history_scale(metric_type: Option<MetricType>, contains: Option<Contains>) -> i32 {
    match (metric_type, contains) {
        (Some(MetricType::Rate), _) => RATE_HISTORY,
        (_, Some(Contains::Time)) => TIME_HISTORY,
        (_, Some(Contains::Data)) => DATA_HISTORY,
        _ => DEFAULT_HISTORY,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_half_away_from_zero() {
        assert_eq!(scaled(121.5, MS), Some(122));
        assert_eq!(scaled(-121.5, MS), Some(-122));
        assert_eq!(scaled(121.49999, MS), Some(121));
        assert_eq!(scaled(34.29055670015846, PER_SECOND_X100), Some(3429));
        assert_eq!(scaled(0.0005, 1000.0), Some(1));
    }

    #[test]
    fn refuses_what_does_not_fit() {
        assert_eq!(scaled(f64::INFINITY, 1.0), None);
        assert_eq!(scaled(f64::NAN, 1.0), None);
        assert_eq!(scaled(1.7e308, 1000.0), None);
        assert_eq!(scaled(1e20, 1.0), None);
        assert_eq!(scaled(9.2e18, 1.0), Some(9_200_000_000_000_000_000));
        assert_eq!(count(-12.0), None);
        assert_eq!(count(3.0), Some(3));
    }
}
