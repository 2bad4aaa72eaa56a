//! Logging: JSON lines for clusters, human-readable lines on a terminal. Logs go to
//! stderr so that stdout carries only command output (extract's JSON, replay's table).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber. `RUST_LOG` wins over the configured level.
pub fn init(format: Option<LogFormat>, level: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let format = format.unwrap_or(if std::io::stderr().is_terminal() {
        LogFormat::Pretty
    } else {
        LogFormat::Json
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        LogFormat::Pretty => builder.with_target(false).compact().try_init(),
    };
    // A second init (tests) keeps the first subscriber.
    drop(result);
}

/// For tests: logs only when `TEST_LOG` is set, so test output stays readable.
pub fn init_for_test() {
    if std::env::var_os("TEST_LOG").is_some() {
        init(Some(LogFormat::Pretty), "k6_ingest=debug,info");
    }
}
