//! k6-ingest: turns finished k6 load tests into rows in PostgreSQL.
//!
//! - [`summary`]: pure parsing and extraction of k6 summaries;
//! - [`message`]: the run-completed message (wire type);
//! - [`config`]: settings from defaults, a file and `K6_INGEST__*` variables;
//! - [`artifact`]: fetching artifacts from files, HTTP(S) and S3 with limits;
//! - [`s3`]: streamed uploads under deterministic keys;
//! - [`db`]: migrations and the one-transaction write;
//! - [`history`]: monthly partitions, archives of whole months in S3, restores;
//! - [`ingest`]: one run's path as named steps (`Ingestor::ingest`), which every driver calls;
//! - [`replay`]: the backfill driver over message files;
//! - [`amqp`]: RabbitMQ connection, topology and confirmed publishing;
//! - [`consumer`]: the RabbitMQ driver (`consume`): retries, dead letters, shutdown;
//! - [`fault`], [`breaker`]: whose fault a failure is; pausing while a dependency is down;
//! - [`publish`]: `publish` and `requeue`;
//! - [`submit`]: the runner side: stage artifacts, publish the message;
//! - [`http`], [`metrics`]: `/livez`, `/readyz`, `/metrics`.

pub mod amqp;
pub mod app;
pub mod artifact;
pub mod breaker;
pub mod cli;
pub mod config;
pub mod consumer;
pub mod db;
pub mod fault;
pub mod history;
pub mod http;
pub mod ingest;
pub mod message;
pub mod metrics;
pub mod publish;
pub mod replay;
pub mod s3;
pub mod submit;
pub mod summary;
pub mod telemetry;
