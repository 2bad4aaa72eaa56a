//! k6 summary parsing and extraction. Pure: no async, no I/O, no clock, so every rule
//! here is tested with files alone.
//!
//! - [`parse`]: detect the format (handleSummary data, legacy `--summary-export`,
//!   machine-readable v1) and normalise it into [`model::Summary`];
//! - [`extract`]: the `k6_performance_runs` columns and detail rows;
//! - [`limits`]: caps on a summary's parsed tree and detail rows, checked before they
//!   are built;
//! - [`scale`]: the integer scaling table; [`status`]: the status table;
//! - [`samples`]: percentiles from raw `--out json` samples, exactly as k6 computes them;
//!   [`sink`]: the bounded-memory exact percentiles behind it (spills to temp files).
//! - [`threshold`]: k6's threshold expressions, parsed and judged as k6 does.

pub mod extract;
pub mod limits;
pub mod merge;
pub mod model;
pub mod parse;
pub mod samples;
pub mod scale;
pub mod selector;
pub mod sink;
pub mod status;
pub mod threshold;

pub use extract::{Extraction, ValueSource, extract, extract_without_summary, wanted_samples};
pub use model::{Summary, SummaryFormat};
pub use parse::{SummaryError, parse_summary};
pub use status::RunStatus;
