//! Extraction of a fixture run without services.

use std::collections::BTreeSet;
use std::path::Path;

use k6_ingest::artifact::open_lines;
use k6_ingest::summary::samples::collect_samples;
use k6_ingest::summary::{
    Extraction, extract, extract_without_summary, parse_summary, wanted_samples,
};

/// Extracts a fixture run exactly as ingestion does: the message's summary and exit code,
/// and the raw samples when the summary leaves gaps.
pub fn extract_fixture(dir: &Path) -> Extraction {
    let msg = super::message(dir);
    let summary_path = dir.join(msg.artifacts.summary.as_deref().unwrap());
    let Ok(bytes) = std::fs::read(&summary_path) else {
        return extract_without_summary(msg.exit_code, "summary unavailable");
    };
    let summary = parse_summary(&bytes).unwrap();
    let metrics = dir.join("metrics.ndjson.gz");
    let samples = metrics.is_file().then(|| {
        collect_samples(
            open_lines(&metrics).unwrap(),
            &wanted_samples(&summary),
            10_000_000,
        )
        .unwrap()
    });
    extract(&summary, msg.exit_code, samples.as_ref())
}

/// An extraction's thresholds as (metric, expression, ok), in a stable order.
pub fn threshold_set(e: &Extraction) -> BTreeSet<(String, String, bool)> {
    e.thresholds
        .iter()
        .map(|t| (t.metric_name.clone(), t.expression.clone(), t.ok))
        .collect()
}
