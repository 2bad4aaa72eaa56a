//! `publish` and `requeue`: putting messages on the queue with publisher confirms, for
//! backfills through the deployed workers and for replaying the dead-letter queue.
//!
//! A message counts as published only once the broker confirmed it; a nack, an
//! unroutable message or a lost connection is reported as a failure, never as success.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use futures_util::StreamExt;
use lapin::BasicProperties;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use serde_json::Value;

use crate::amqp;
use crate::config::AmqpSettings;

/// Confirms awaited at once: enough to keep the channel busy, few enough to bound memory.
const PUBLISH_WINDOW: usize = 64;

/// One message ready to go, or why it cannot.
#[derive(Debug)]
pub struct Outgoing {
    /// Where it came from: `path` or `path:line`.
    pub label: String,
    pub body: Result<Vec<u8>, String>,
    pub message_id: Option<String>,
}

#[derive(Debug, Default)]
pub struct PublishReport {
    pub confirmed: usize,
    pub failed: Vec<(String, String)>,
}

impl PublishReport {
    pub fn total(&self) -> usize {
        self.confirmed + self.failed.len()
    }
}

/// Reads the messages under `paths`: `message.json` files (or directories holding them)
/// and NDJSON files (`.ndjson`, `.jsonl`) with one message a line. Relative artifact
/// paths are made absolute `file://` URIs, so a worker that shares the files (and lists
/// the directory in `fetch.allowed_roots`) can read them.
pub fn read_messages(paths: &[PathBuf], max_message_bytes: u64) -> anyhow::Result<Vec<Outgoing>> {
    let mut out = Vec::new();
    for path in paths {
        let is_ndjson = path.is_file()
            && matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("ndjson" | "jsonl")
            );
        if is_ndjson {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("Failed to read {}", path.display()))?;
            let base = path
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from("."));
            for (n, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                out.push(prepare(
                    format!("{}:{}", path.display(), n + 1),
                    line.as_bytes(),
                    &base,
                    max_message_bytes,
                ));
            }
            continue;
        }
        for (file, _root) in crate::replay::find_messages(std::slice::from_ref(path))? {
            let label = file.display().to_string();
            let base = file
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from("."));
            match std::fs::read(&file) {
                Ok(bytes) => out.push(prepare(label, &bytes, &base, max_message_bytes)),
                Err(e) => out.push(Outgoing {
                    label,
                    body: Err(format!("cannot read: {e}")),
                    message_id: None,
                }),
            }
        }
    }
    Ok(out)
}

fn prepare(label: String, raw: &[u8], base: &Path, max_message_bytes: u64) -> Outgoing {
    let fail = |label: String, reason: String| Outgoing {
        label,
        body: Err(reason),
        message_id: None,
    };
    let mut doc: Value = match serde_json::from_slice(raw) {
        Ok(v) => v,
        Err(e) => return fail(label, format!("not JSON: {e}")),
    };
    if let Some(artifacts) = doc.get_mut("artifacts").and_then(Value::as_object_mut) {
        for (role, uri) in artifacts.iter_mut() {
            let Some(s) = uri.as_str() else { continue };
            if url::Url::parse(s).is_ok() {
                continue;
            }
            let p = Path::new(s);
            let joined = if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            };
            // A missing artifact is published as such: the worker records the run as
            // `error` (k6 writes no summary when the script fails to start).
            let abs = std::fs::canonicalize(&joined).or_else(|_| std::path::absolute(&joined));
            match abs.ok().and_then(|abs| url::Url::from_file_path(abs).ok()) {
                Some(u) => *uri = Value::String(u.to_string()),
                None => {
                    return fail(
                        label,
                        format!(
                            "{role} artifact path {} cannot be made absolute",
                            joined.display()
                        ),
                    );
                }
            }
        }
    }
    // `event_id` is unique per publish (the contract): a backfill of the same files
    // publishes new events for the same runs, which `run_id` keeps idempotent.
    let event_id = uuid::Uuid::now_v7().to_string();
    if let Some(obj) = doc.as_object_mut() {
        obj.insert("event_id".into(), Value::String(event_id.clone()));
    }
    let message_id = Some(event_id);
    let body = match serde_json::to_vec(&doc) {
        Ok(b) => b,
        Err(e) => return fail(label, e.to_string()),
    };
    if body.len() as u64 > max_message_bytes {
        return fail(
            label,
            format!(
                "message is {} bytes, over amqp.max_message_bytes ({max_message_bytes})",
                body.len()
            ),
        );
    }
    Outgoing {
        label,
        body: Ok(body),
        message_id,
    }
}

/// Publishes `messages` to the main exchange with confirms.
pub async fn publish(
    settings: &AmqpSettings,
    messages: Vec<Outgoing>,
) -> anyhow::Result<PublishReport> {
    let (conn, topology) = amqp::connect_ready(settings, "k6-ingest publish").await?;
    let ch = amqp::confirm_channel(&conn).await?;
    let mut report = PublishReport::default();
    let mut ready = Vec::new();
    for m in messages {
        match m.body {
            Ok(body) => ready.push((m.label, body, m.message_id)),
            Err(reason) => report.failed.push((m.label, reason)),
        }
    }
    let results: Vec<(String, Result<(), amqp::PublishError>)> = futures_util::stream::iter(ready)
        .map(|(label, body, message_id)| {
            let ch = ch.clone();
            let topology = &topology;
            async move {
                let mut props = BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_type("run-completed".into())
                    .with_timestamp(u64::try_from(chrono::Utc::now().timestamp()).unwrap_or(0));
                if let Some(id) = message_id {
                    props = props.with_message_id(id.into());
                }
                let r = amqp::publish_confirmed(
                    &ch,
                    &topology.exchange,
                    &topology.routing_key,
                    &body,
                    props,
                )
                .await;
                (label, r)
            }
        })
        .buffer_unordered(PUBLISH_WINDOW)
        .collect()
        .await;
    for (label, r) in results {
        match r {
            Ok(()) => report.confirmed += 1,
            Err(e) => report.failed.push((label, e.to_string())),
        }
    }
    let _ = conn.close(200, "done".into()).await;
    report.failed.sort();
    Ok(report)
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct RequeueReport {
    /// Messages in the dead-letter queue when the command started.
    pub found: u32,
    pub requeued: u32,
}

/// Moves dead letters back to the work queue with a fresh attempt count, each confirmed
/// before it is removed from the dead-letter queue (a crash can only duplicate one).
/// Takes at most the messages present at the start (and at most `limit`), so a message
/// that fails again and lands back is not looped over.
pub async fn requeue(settings: &AmqpSettings, limit: Option<u32>) -> anyhow::Result<RequeueReport> {
    let (conn, topology) = amqp::connect_ready(settings, "k6-ingest requeue").await?;
    let get_ch = conn.create_channel().await?;
    let dlq = get_ch
        .queue_declare(
            topology.dead_letter_queue.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("Failed to inspect {}", topology.dead_letter_queue))?;
    let found = dlq.message_count();
    let target = limit.map_or(found, |l| l.min(found));
    let pub_ch = amqp::confirm_channel(&conn).await?;
    let mut requeued = 0;
    while requeued < target {
        let Some(msg) = get_ch
            .basic_get(
                topology.dead_letter_queue.as_str().into(),
                BasicGetOptions { no_ack: false },
            )
            .await?
        else {
            break;
        };
        let d = &msg.delivery;
        let drop_headers = [
            amqp::ATTEMPTS_HEADER,
            amqp::REASON_HEADER,
            amqp::REASON_CLASS_HEADER,
            amqp::FAILED_AT_HEADER,
            "x-death",
            "x-first-death-exchange",
            "x-first-death-queue",
            "x-first-death-reason",
            "x-last-death-exchange",
            "x-last-death-queue",
            "x-last-death-reason",
            "x-delivery-count",
        ];
        let props = amqp::with_headers(&d.properties, &[], &drop_headers);
        if let Err(e) = amqp::publish_confirmed(&pub_ch, "", &topology.queue, &d.data, props).await
        {
            let _ = d
                .acker
                .nack(BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                })
                .await;
            return Err(anyhow::Error::new(e).context(format!(
                "requeued {requeued} of {target}, then publishing failed"
            )));
        }
        d.acker
            .ack(BasicAckOptions::default())
            .await
            .context("Failed to remove a requeued message from the dead-letter queue")?;
        requeued += 1;
    }
    let _ = conn.close(200, "done".into()).await;
    Ok(RequeueReport { found, requeued })
}
