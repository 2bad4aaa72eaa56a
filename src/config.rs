//! Settings: compiled-in defaults, then an optional TOML file (`--config`), then
//! `K6_INGEST__<SECTION>__<KEY>` environment variables. Bad values fail at start with
//! the name of the setting; secrets are `SecretString` so they never reach a log line.

use std::path::PathBuf;

use config::{Config, Environment, File, FileFormat};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("invalid setting {setting} ({env}): {reason}")]
    Invalid {
        setting: &'static str,
        env: &'static str,
        reason: String,
    },
    #[error("missing setting {setting}: set {env} or `{setting}` in the config file")]
    Missing {
        setting: &'static str,
        env: &'static str,
    },
}

#[derive(Debug, Clone, Deserialize)]
pub struct Settings {
    pub database: DatabaseSettings,
    pub s3: S3Settings,
    pub fetch: FetchSettings,
    pub amqp: AmqpSettings,
    pub http: HttpSettings,
    pub log: LogSettings,
    pub shutdown: ShutdownSettings,
    pub ingest: IngestSettings,
    pub breaker: BreakerSettings,
    pub retention: RetentionSettings,
}

#[derive(Debug, Clone, Deserialize)]
pub struct DatabaseSettings {
    pub url: Option<SecretString>,
    /// A direct (not pooled) connection for `migrate`: sqlx's migrator takes a
    /// session-level advisory lock, which a transaction pooler would orphan.
    pub migrate_url: Option<SecretString>,
    pub max_connections: u32,
    pub acquire_timeout_secs: u64,
    /// Named prepared statements (sqlx's statement cache). Set false behind a
    /// transaction pooler without prepared-statement support (PgBouncer before 1.21):
    /// every statement then goes unnamed, inside an explicit transaction (SPEC §13).
    pub prepared_statements: bool,
}

impl DatabaseSettings {
    pub fn url(&self) -> Result<&str, ConfigError> {
        self.url
            .as_ref()
            .map(|s| s.expose_secret())
            .filter(|s| !s.is_empty())
            .ok_or(ConfigError::Missing {
                setting: "database.url",
                env: "K6_INGEST__DATABASE__URL",
            })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChecksumMode {
    /// The SDK's default: CRC32 on every upload, validated on download.
    WhenSupported,
    /// Only where the API requires it; for stores without trailer-checksum support.
    WhenRequired,
}

#[derive(Debug, Clone, Deserialize)]
pub struct S3Settings {
    pub endpoint: Option<String>,
    pub bucket: Option<String>,
    pub prefix: String,
    pub region: String,
    pub force_path_style: bool,
    pub checksum: ChecksumMode,
    /// Uploads larger than this use multipart.
    pub multipart_threshold_bytes: u64,
    /// Every part but the last has exactly this size (R2 requires equal parts).
    pub part_size_bytes: u64,
    /// A summary up to this size is inlined in `summary_json`; above it only its S3 URI is kept.
    pub inline_summary_max_bytes: u64,
    /// Where `submit` stages a runner's artifacts.
    pub staging_prefix: String,
    /// Where a message's `s3://` artifacts may lie: `s3://bucket/prefix/` templates naming
    /// `{organization_id}` and `{project_id}` (and optionally `{run_id}`), filled with the
    /// message's own; `{bucket}` and `{staging_prefix}` stand for the settings above.
    /// The worker reads S3 with its own credentials, so anything else is refused.
    pub source_templates: Vec<String>,
}

impl S3Settings {
    pub fn bucket(&self) -> Result<&str, ConfigError> {
        self.bucket
            .as_deref()
            .filter(|b| !b.is_empty())
            .ok_or(ConfigError::Missing {
                setting: "s3.bucket",
                env: "K6_INGEST__S3__BUCKET",
            })
    }

    /// `source_templates` checked, with `{bucket}` and `{staging_prefix}` filled in.
    pub fn sources(&self) -> Result<crate::artifact::S3Sources, ConfigError> {
        let bucket = self.bucket.as_deref().filter(|b| !b.is_empty());
        crate::artifact::S3Sources::new(&self.source_templates, bucket, &self.staging_prefix)
            .map_err(|reason| ConfigError::Invalid {
                setting: "s3.source_templates",
                env: "K6_INGEST__S3__SOURCE_TEMPLATES",
                reason,
            })
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct FetchSettings {
    /// Directories `file://` URIs may point into.
    pub allowed_roots: Vec<PathBuf>,
    /// Hosts `http(s)://` URIs may point at.
    pub allowed_hosts: Vec<String>,
    /// Idle time allowed between bytes of an HTTP(S) fetch.
    pub timeout_secs: u64,
    pub connect_timeout_secs: u64,
    /// A summary is read whole: this and `max_inflated_bytes` bound its bytes in memory
    /// (README "Memory budget").
    pub max_summary_bytes: u64,
    pub max_artifact_bytes: u64,
    /// Cap on the inflated size of a gzip-compressed summary (zip bombs).
    pub max_inflated_bytes: u64,
    /// Cap on the JSON values of a summary, counted before its tree is built.
    pub max_summary_nodes: u64,
    /// Cap on raw samples read from metrics.ndjson for percentiles (they spill to temp
    /// files beyond `samples_buffer_bytes`, so this bounds disk and time, not memory).
    pub max_samples: usize,
    /// Cap on the bytes read from metrics.ndjson once inflated; above it no samples are used.
    pub max_samples_inflated_bytes: u64,
    /// A metrics.ndjson line longer than this is skipped (read in chunks) and counted as bad.
    pub max_line_bytes: usize,
    /// Samples held in memory per run before sorted runs spill to temp files.
    pub samples_buffer_bytes: usize,
}

impl FetchSettings {
    pub fn sample_limits(&self) -> crate::summary::samples::SampleLimits {
        crate::summary::samples::SampleLimits {
            max_samples: self.max_samples,
            max_line_bytes: self.max_line_bytes,
            buffer_bytes: self.samples_buffer_bytes,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct AmqpSettings {
    pub url: Option<SecretString>,
    pub exchange: String,
    pub queue: String,
    pub routing_key: String,
    /// Unacknowledged deliveries the broker may hand this worker at once.
    pub prefetch: u16,
    /// Runs `consume` ingests at once; never more than `prefetch`.
    pub concurrency: usize,
    /// Declare the topology at start (idempotent); `false` only checks that it exists.
    pub declare: bool,
    /// Ingest attempts for a transient fault before the message is dead-lettered.
    pub max_attempts: u32,
    pub retry_base_ms: u64,
    pub retry_max_ms: u64,
    /// The work queue's `x-delivery-limit`: deliveries handed back unacknowledged
    /// (crashes, lost connections) before the broker dead-letters the message.
    pub delivery_limit: u32,
    /// Backoff between reconnection attempts to the broker.
    pub reconnect_base_ms: u64,
    pub reconnect_max_ms: u64,
    pub max_message_bytes: u64,
}

impl AmqpSettings {
    pub fn url(&self) -> Result<&str, ConfigError> {
        self.url
            .as_ref()
            .map(|s| s.expose_secret())
            .filter(|s| !s.is_empty())
            .ok_or(ConfigError::Missing {
                setting: "amqp.url",
                env: "K6_INGEST__AMQP__URL",
            })
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct HttpSettings {
    pub bind: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Json,
    Pretty,
}

#[derive(Debug, Clone, Deserialize)]
pub struct LogSettings {
    /// `None` picks pretty on a terminal and JSON lines otherwise.
    pub format: Option<LogFormat>,
    pub level: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ShutdownSettings {
    pub grace_secs: u64,
}

/// Circuit breakers: how the worker probes a dependency it found down, and how long a
/// delivery may wait for an artifact host.
#[derive(Debug, Clone, Deserialize)]
pub struct BreakerSettings {
    /// First delay between probes of a dependency that is down; it doubles up to
    /// `probe_max_ms`.
    pub probe_base_ms: u64,
    pub probe_max_ms: u64,
    /// A probe that takes longer counts as failed.
    pub probe_timeout_ms: u64,
    /// How often PostgreSQL and S3 are probed while up, so `/readyz` shows an outage and
    /// new deliveries wait before they fail on it.
    pub check_interval_ms: u64,
    /// How long a delivery waits for its artifact host to come back; after that the
    /// failure counts as an attempt, so one tenant's dead host cannot hold the worker.
    pub host_wait_secs: u64,
}

/// How long the k6 tables keep a month before `archive` moves it to S3.
#[derive(Debug, Clone, Deserialize)]
pub struct RetentionSettings {
    /// Whole months before the current one (UTC) kept in the database by `archive`
    /// when it is given neither `--before` nor `--hot-months`: 3 keeps about 90 days,
    /// the design's hot window.
    pub hot_months: u32,
}

#[derive(Debug, Clone, Deserialize)]
pub struct IngestSettings {
    /// Runs ingested at once by `replay`.
    pub concurrency: usize,
    /// Caps on a summary's detail rows; a summary above one is refused as unusable.
    pub max_metrics: usize,
    pub max_checks: usize,
    pub max_thresholds: usize,
    /// How long the parts of a split run may take to all arrive (counted from the first
    /// stored part) before the run is recorded as `error` with what arrived.
    pub part_wait_secs: u64,
    /// How often `consume` looks for such runs.
    pub part_sweep_interval_secs: u64,
}

impl Settings {
    pub fn summary_limits(&self) -> crate::summary::limits::SummaryLimits {
        crate::summary::limits::SummaryLimits {
            max_nodes: self.fetch.max_summary_nodes,
            max_metrics: self.ingest.max_metrics,
            max_checks: self.ingest.max_checks,
            max_thresholds: self.ingest.max_thresholds,
        }
    }
}

const DEFAULTS: &str = r#"
[database]
max_connections = 10
acquire_timeout_secs = 10
prepared_statements = true

[s3]
prefix = "k6-runs"
region = "us-east-1"
force_path_style = false
checksum = "when_supported"
multipart_threshold_bytes = 16777216
part_size_bytes = 16777216
inline_summary_max_bytes = 1048576
staging_prefix = "k6-staging"
source_templates = ["s3://{bucket}/{staging_prefix}/{organization_id}/{project_id}/{run_id}/"]

[fetch]
allowed_roots = []
allowed_hosts = []
timeout_secs = 60
connect_timeout_secs = 5
max_summary_bytes = 2097152
max_artifact_bytes = 10737418240
max_inflated_bytes = 2097152
max_summary_nodes = 100000
max_samples = 50000000
max_samples_inflated_bytes = 17179869184
max_line_bytes = 1048576
samples_buffer_bytes = 16777216

[amqp]
exchange = "k6.runs"
queue = "k6-ingest.run-completed"
routing_key = "run.completed"
prefetch = 8
concurrency = 8
declare = true
max_attempts = 5
retry_base_ms = 1000
retry_max_ms = 60000
delivery_limit = 20
reconnect_base_ms = 200
reconnect_max_ms = 5000
max_message_bytes = 1048576

[http]
bind = "127.0.0.1:8080"

[log]
level = "info"

[shutdown]
grace_secs = 25

[ingest]
concurrency = 4
max_metrics = 10000
max_checks = 10000
max_thresholds = 10000
part_wait_secs = 3600
part_sweep_interval_secs = 60

[retention]
hot_months = 3

[breaker]
probe_base_ms = 250
probe_max_ms = 5000
probe_timeout_ms = 2000
check_interval_ms = 2000
host_wait_secs = 60
"#;

impl Settings {
    /// Loads settings from defaults, `file`, and the process environment.
    pub fn load(file: Option<&std::path::Path>) -> Result<Self, ConfigError> {
        let mut builder = Config::builder().add_source(File::from_str(DEFAULTS, FileFormat::Toml));
        if let Some(path) = file {
            builder = builder.add_source(
                File::from(path.to_path_buf())
                    .format(FileFormat::Toml)
                    .required(true),
            );
        }
        builder = builder.add_source(
            Environment::with_prefix("K6_INGEST")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .list_separator(",")
                .with_list_parse_key("fetch.allowed_roots")
                .with_list_parse_key("fetch.allowed_hosts")
                .with_list_parse_key("s3.source_templates"),
        );
        let settings: Settings = builder.build()?.try_deserialize()?;
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        const MIN_PART: u64 = 5 * 1024 * 1024;
        if self.s3.part_size_bytes < MIN_PART || self.s3.part_size_bytes > 5 * 1024 * 1024 * 1024 {
            return Err(ConfigError::Invalid {
                setting: "s3.part_size_bytes",
                env: "K6_INGEST__S3__PART_SIZE_BYTES",
                reason: format!(
                    "{} is outside S3's part size limits (5 MiB to 5 GiB)",
                    self.s3.part_size_bytes
                ),
            });
        }
        if self.s3.multipart_threshold_bytes < self.s3.part_size_bytes {
            return Err(ConfigError::Invalid {
                setting: "s3.multipart_threshold_bytes",
                env: "K6_INGEST__S3__MULTIPART_THRESHOLD_BYTES",
                reason: "must be at least s3.part_size_bytes".into(),
            });
        }
        if let Some(endpoint) = &self.s3.endpoint {
            if url::Url::parse(endpoint).is_err() {
                return Err(ConfigError::Invalid {
                    setting: "s3.endpoint",
                    env: "K6_INGEST__S3__ENDPOINT",
                    reason: format!("{endpoint:?} is not a URL"),
                });
            }
        }
        if self.s3.prefix.starts_with('/') || self.s3.prefix.ends_with('/') {
            return Err(ConfigError::Invalid {
                setting: "s3.prefix",
                env: "K6_INGEST__S3__PREFIX",
                reason: "must not start or end with '/'".into(),
            });
        }
        if self.s3.staging_prefix.starts_with('/') || self.s3.staging_prefix.ends_with('/') {
            return Err(ConfigError::Invalid {
                setting: "s3.staging_prefix",
                env: "K6_INGEST__S3__STAGING_PREFIX",
                reason: "must not start or end with '/'".into(),
            });
        }
        self.s3.sources()?;
        if self.amqp.prefetch == 0 {
            return Err(ConfigError::Invalid {
                setting: "amqp.prefetch",
                env: "K6_INGEST__AMQP__PREFETCH",
                reason: "must be at least 1".into(),
            });
        }
        let amqp_checks: [(bool, &'static str, &'static str, &str); 6] = [
            (
                self.amqp.concurrency == 0,
                "amqp.concurrency",
                "K6_INGEST__AMQP__CONCURRENCY",
                "must be at least 1",
            ),
            (
                self.amqp.max_attempts == 0,
                "amqp.max_attempts",
                "K6_INGEST__AMQP__MAX_ATTEMPTS",
                "must be at least 1",
            ),
            (
                self.amqp.delivery_limit == 0,
                "amqp.delivery_limit",
                "K6_INGEST__AMQP__DELIVERY_LIMIT",
                "must be at least 1",
            ),
            (
                self.amqp.retry_base_ms == 0 || self.amqp.retry_max_ms < self.amqp.retry_base_ms,
                "amqp.retry_max_ms",
                "K6_INGEST__AMQP__RETRY_MAX_MS",
                "retry_base_ms must be at least 1 and retry_max_ms at least retry_base_ms",
            ),
            (
                self.amqp.reconnect_base_ms == 0
                    || self.amqp.reconnect_max_ms < self.amqp.reconnect_base_ms,
                "amqp.reconnect_max_ms",
                "K6_INGEST__AMQP__RECONNECT_MAX_MS",
                "reconnect_base_ms must be at least 1 and reconnect_max_ms at least reconnect_base_ms",
            ),
            (
                self.amqp.exchange.is_empty() || self.amqp.queue.is_empty(),
                "amqp.queue",
                "K6_INGEST__AMQP__QUEUE",
                "amqp.exchange and amqp.queue must not be empty",
            ),
        ];
        if let Some((_, setting, env, reason)) = amqp_checks.into_iter().find(|c| c.0) {
            return Err(ConfigError::Invalid {
                setting,
                env,
                reason: reason.to_string(),
            });
        }
        let b = &self.breaker;
        if b.probe_base_ms == 0
            || b.probe_max_ms < b.probe_base_ms
            || b.probe_timeout_ms == 0
            || b.check_interval_ms == 0
        {
            return Err(ConfigError::Invalid {
                setting: "breaker.probe_max_ms",
                env: "K6_INGEST__BREAKER__PROBE_MAX_MS",
                reason: "breaker.probe_base_ms, probe_timeout_ms and check_interval_ms must be at least 1, and probe_max_ms at least probe_base_ms".into(),
            });
        }
        if self.retention.hot_months == 0 {
            return Err(ConfigError::Invalid {
                setting: "retention.hot_months",
                env: "K6_INGEST__RETENTION__HOT_MONTHS",
                reason: "must be at least 1 (the current month is never archived)".into(),
            });
        }
        if self.ingest.concurrency == 0 {
            return Err(ConfigError::Invalid {
                setting: "ingest.concurrency",
                env: "K6_INGEST__INGEST__CONCURRENCY",
                reason: "must be at least 1".into(),
            });
        }
        if self.fetch.max_line_bytes < 1024 {
            return Err(ConfigError::Invalid {
                setting: "fetch.max_line_bytes",
                env: "K6_INGEST__FETCH__MAX_LINE_BYTES",
                reason: "must be at least 1024 (k6 sample lines are a few hundred bytes)".into(),
            });
        }
        if self.http.bind.parse::<std::net::SocketAddr>().is_err() {
            return Err(ConfigError::Invalid {
                setting: "http.bind",
                env: "K6_INGEST__HTTP__BIND",
                reason: format!("{:?} is not an address like 0.0.0.0:8080", self.http.bind),
            });
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err(ConfigError::Invalid {
                setting: "log.level",
                env: "K6_INGEST__LOG__LEVEL",
                reason: format!(
                    "{:?} is not a log filter such as info or k6_ingest=debug",
                    self.log.level
                ),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Code that runs without settings (tests, tools) uses the limit structs' defaults:
    /// they must be the compiled-in defaults.
    #[test]
    fn limit_defaults_match_the_compiled_in_settings() {
        let s: Settings = Config::builder()
            .add_source(File::from_str(DEFAULTS, FileFormat::Toml))
            .build()
            .unwrap()
            .try_deserialize()
            .unwrap();
        assert_eq!(
            s.fetch.sample_limits(),
            crate::summary::samples::SampleLimits::default()
        );
        assert_eq!(
            s.summary_limits(),
            crate::summary::limits::SummaryLimits::default()
        );
    }
}
