//! k6 summary parsing and extraction. Pure: no async, no I/O, no clock, so every rule
//! here is tested with files alone.
//!
//! - [`parse`]: detect the format (handleSummary data, legacy `--summary-export`,
//!   machine-readable v1) and normalise it into [`model::Summary`];
//! - [`extract`]: the `k6_performance_runs` columns and detail rows;
//! - [`scale`]: the integer scaling table; [`status`]: the status table;
//! - [`samples`]: percentiles from raw `--out json` samples, exactly as k6 computes them;
//! - [`threshold`]: k6's threshold expressions, parsed and judged as k6 does.

pub mod extract;
pub mod model;
pub mod parse;
pub mod samples;
pub mod scale;
pub mod selector;
pub mod status;
pub mod threshold;

pub use extract::{Extraction, extract, extract_without_summary, wanted_samples};
pub use model::{Summary, SummaryFormat};
pub use parse::{SummaryError, parse_summary};
pub use status::RunStatus;
