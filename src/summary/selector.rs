//! Metric keys and threshold expressions, parsed the way k6 parses them.

use std::collections::BTreeMap;

/// Splits `name{selector}` into the base name and its tags.
///
/// k6 keeps the selector text as written (`http_req_waiting{name: "with space"}`), splits
/// the selector on `,` into `key:value` at the *first* `:` (so `group:::g1` is the tag
/// `group` = `::g1`), and trims spaces and quotes around keys and values.
pub fn parse_metric_key(key: &str) -> (String, BTreeMap<String, String>) {
    let Some(open) = key.find('{') else {
        return (key.to_string(), BTreeMap::new());
    };
    let base = key[..open].trim().to_string();
    let rest = &key[open + 1..];
    let inner = rest.strip_suffix('}').unwrap_or(rest);
    let mut tags = BTreeMap::new();
    for part in inner.split(',') {
        if part.trim().is_empty() {
            continue;
        }
        match part.split_once(':') {
            Some((k, v)) => {
                tags.insert(trim_tag(k), trim_tag(v));
            }
            None => {
                tags.insert(trim_tag(part), String::new());
            }
        }
    }
    (base, tags)
}

fn trim_tag(s: &str) -> String {
    s.trim().trim_matches(|c| c == '"' || c == '\'').to_string()
}

/// The aggregation a threshold expression tests, e.g. `p(95)` in `p(95) < 50`.
///
/// Threshold syntax is `<aggregation> <operator> <number>`; the aggregation is the text
/// before the first operator character.
pub fn threshold_aggregation(expression: &str) -> Option<String> {
    let end = expression.find(['<', '>', '=', '!'])?;
    let agg = expression[..end].trim();
    if agg.is_empty() {
        None
    } else {
        Some(agg.replace(' ', ""))
    }
}

/// The percentile (0..=100) named by a trend stat key such as `p(99.9)`.
pub fn percentile_of(stat: &str) -> Option<f64> {
    let inner = stat.strip_prefix("p(")?.strip_suffix(')')?;
    let p: f64 = inner.trim().parse().ok()?;
    (0.0..=100.0).contains(&p).then_some(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_key_has_no_tags() {
        let (base, tags) = parse_metric_key("http_reqs");
        assert_eq!(base, "http_reqs");
        assert!(tags.is_empty());
    }

    #[test]
    fn selector_value_may_contain_colons() {
        let (base, tags) = parse_metric_key("http_req_duration{group:::g1}");
        assert_eq!(base, "http_req_duration");
        assert_eq!(tags["group"], "::g1");
    }

    #[test]
    fn quoted_values_with_spaces() {
        let (_, tags) = parse_metric_key(r#"http_req_waiting{name: "with space", status:200}"#);
        assert_eq!(tags["name"], "with space");
        assert_eq!(tags["status"], "200");
    }

    #[test]
    fn aggregation_of_expressions() {
        assert_eq!(threshold_aggregation("p(95)<50").as_deref(), Some("p(95)"));
        assert_eq!(
            threshold_aggregation("rate <= 0.01").as_deref(),
            Some("rate")
        );
        assert_eq!(threshold_aggregation("count==3").as_deref(), Some("count"));
        assert_eq!(
            threshold_aggregation("p( 99.9 ) != 1").as_deref(),
            Some("p(99.9)")
        );
        assert_eq!(threshold_aggregation("<5"), None);
    }

    #[test]
    fn percentile_keys() {
        assert_eq!(percentile_of("p(99.9)"), Some(99.9));
        assert_eq!(percentile_of("p(0)"), Some(0.0));
        assert_eq!(percentile_of("p(200)"), None);
        assert_eq!(percentile_of("med"), None);
    }
}
