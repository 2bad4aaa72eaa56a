//! The run status, from the summary's thresholds and k6's exit code (SPEC section 6).

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Passed,
    Failed,
    Error,
    Cancelled,
    Timeout,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Passed => "passed",
            Self::Failed => "failed",
            Self::Error => "error",
            Self::Cancelled => "cancelled",
            Self::Timeout => "timeout",
        }
    }
}

/// k6's exit codes, what they mean, and the status each gives when no threshold failed.
/// The single table the README documents; `status_for` reads nothing else.
pub const EXIT_CODES: &[(i32, &str, RunStatus)] = &[
    (0, "success", RunStatus::Passed),
    (97, "cloud test run failed", RunStatus::Error),
    (98, "cloud progress error", RunStatus::Error),
    (99, "thresholds have failed", RunStatus::Failed),
    (100, "setup() timed out", RunStatus::Timeout),
    (101, "teardown() timed out", RunStatus::Timeout),
    (102, "generic timeout", RunStatus::Timeout),
    (103, "stopped from the REST API", RunStatus::Cancelled),
    (104, "invalid configuration", RunStatus::Error),
    (105, "interrupted by a signal", RunStatus::Cancelled),
    (106, "cannot start the REST API", RunStatus::Error),
    (107, "script exception", RunStatus::Error),
    (108, "script aborted with test.abort()", RunStatus::Failed),
    (109, "k6 panicked", RunStatus::Error),
    (110, "marked as failed with test.fail()", RunStatus::Failed),
    (
        255,
        "error without an exit code (bad CLI usage, missing script)",
        RunStatus::Error,
    ),
];

/// What k6's exit code means, for `error_details` and logs.
pub fn exit_code_meaning(code: i32) -> &'static str {
    EXIT_CODES
        .iter()
        .find(|(c, _, _)| *c == code)
        .map_or("unknown exit code", |(_, m, _)| m)
}

/// The status of a run.
///
/// - any threshold with `ok: false` means `failed` whatever the exit code (a SIGINT can
///   hide a failed threshold behind 105);
/// - otherwise the exit-code table decides; an unknown code is `error`;
/// - no summary at all is `error`.
pub fn status_for(
    any_threshold_failed: bool,
    exit_code: Option<i32>,
    have_summary: bool,
) -> RunStatus {
    if !have_summary {
        return RunStatus::Error;
    }
    if any_threshold_failed {
        return RunStatus::Failed;
    }
    match exit_code {
        // A summary without an exit code (replaying bare files) is judged on its thresholds.
        None => RunStatus::Passed,
        Some(code) => EXIT_CODES
            .iter()
            .find(|(c, _, _)| *c == code)
            .map_or(RunStatus::Error, |(_, _, s)| *s),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_threshold_wins_over_signal() {
        assert_eq!(status_for(true, Some(105), true), RunStatus::Failed);
        assert_eq!(status_for(true, Some(0), true), RunStatus::Failed);
    }

    #[test]
    fn exit_code_table() {
        let cases = [
            (0, RunStatus::Passed),
            (99, RunStatus::Failed),
            (110, RunStatus::Failed),
            (100, RunStatus::Timeout),
            (101, RunStatus::Timeout),
            (102, RunStatus::Timeout),
            (103, RunStatus::Cancelled),
            (105, RunStatus::Cancelled),
            (108, RunStatus::Failed),
            (104, RunStatus::Error),
            (106, RunStatus::Error),
            (107, RunStatus::Error),
            (109, RunStatus::Error),
            (255, RunStatus::Error),
            (1, RunStatus::Error),
            (-1, RunStatus::Error),
        ];
        for (code, want) in cases {
            assert_eq!(
                status_for(false, Some(code), true),
                want,
                "exit code {code}"
            );
        }
    }

    #[test]
    fn no_summary_is_error() {
        assert_eq!(status_for(false, Some(0), false), RunStatus::Error);
    }
}
