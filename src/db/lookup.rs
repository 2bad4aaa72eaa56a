//! What is stored for a run, looked up before any artifact is touched, with the lookups
//! of runs in flight gathered into one statement.
//!
//! Each run's lookup used to be a statement of its own: a connection taken from the
//! pool, a round trip, and the round trip sqlx makes when it gives the connection back
//! (it pings on release). At prefetch 32 that doubled the round trips PostgreSQL served
//! per run (the store is one statement) and had 32 runs queue for the pool's
//! connections beside the stores. Now one task sends the lookups: while a batch is at the
//! database the runs that arrive wait, and go together in the next one. A run alone (at
//! prefetch 1) is a batch of one, a channel hop later.

use std::sync::{Arc, OnceLock};

use sqlx::Row;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::{Db, Existing};

/// The most lookups one statement carries: more runs than a worker holds at its highest
/// sensible `amqp.concurrency`, so one batch usually takes all that wait.
const MAX_BATCH: usize = 128;

/// The queue to the task that sends the lookups; started by the first lookup, so a
/// `Db` made outside a runtime (or never asked) starts nothing. The task ends when the
/// last `Db` sharing it is dropped.
#[derive(Debug, Default)]
pub(super) struct Lookups(OnceLock<mpsc::UnboundedSender<Pending>>);

/// A run waiting for its lookup. The batch's failure is passed on to each of its runs
/// where it can be rebuilt as the run's own lookup would have met it: the database
/// unreachable (see [`again`]). `None` in the reply: the statement failed otherwise, and
/// the run looks itself up, so that the error it gets (and whether it is retried) is its
/// own, as before.
#[derive(Debug)]
struct Pending {
    run_id: Uuid,
    reply: oneshot::Sender<Option<Result<Existing, sqlx::Error>>>,
}

impl Db {
    /// What is stored for the run (its `runs` row's tenant, and whether a
    /// k6_performance_runs row with a summary exists), read before any artifact is
    /// touched: gathered with the other runs' lookups when the gathering task answers,
    /// else as a statement of its own.
    pub async fn existing(&self, run_id: Uuid) -> Result<Existing, sqlx::Error> {
        if let Some(found) = self.gathered(run_id).await {
            return found;
        }
        let found = self.existing_many(&[run_id]).await?;
        Ok(found.into_iter().next().map(|(_, e)| e).unwrap_or_default())
    }

    /// The run's lookup through the gathering task; `None` when there is no runtime to
    /// start it on, the task is gone, or its statement failed in a way only the run's
    /// own statement can tell.
    async fn gathered(&self, run_id: Uuid) -> Option<Result<Existing, sqlx::Error>> {
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let queue = self.lookups.0.get_or_init(|| {
            let (queue, waiting) = mpsc::unbounded_channel();
            // The task's own `Db` has a gathering of its own, never started: the task
            // holds no sender of its queue, so it ends with the last `Db` sharing it.
            let db = Db {
                lookups: Arc::default(),
                ..self.clone()
            };
            runtime.spawn(gather(db, waiting));
            queue
        });
        let (reply, answer) = oneshot::channel();
        // Unbounded: each sender is a run in flight awaiting its answer, so the queue
        // never holds more than the worker's concurrency.
        queue.send(Pending { run_id, reply }).ok()?;
        answer.await.ok().flatten()
    }

    /// One statement for the runs (a k6_performance_runs row cannot exist without its
    /// `runs` row), in a transaction only where a pooler needs one (see [`Db`]); the
    /// runs with no `runs` row are absent from the answer.
    async fn existing_many(&self, run_ids: &[Uuid]) -> Result<Vec<(Uuid, Existing)>, sqlx::Error> {
        let q = checked!(
            self,
            "SELECT r.id, r.organization_id, r.project_id, r.k6_archived_month IS NOT NULL AS archived, \
                     (SELECT p.summary_format IS NOT NULL FROM k6_performance_runs p \
                      WHERE p.run_id = r.id LIMIT 1) AS has_summary \
                 FROM runs r WHERE r.id = ANY($1)",
            run_ids,
        );
        let rows = if self.prepared {
            q.fetch_all(&self.pool).await?
        } else {
            let mut tx = self.pool.begin().await?;
            let rows = q.fetch_all(&mut *tx).await?;
            tx.commit().await?;
            rows
        };
        Ok(rows
            .iter()
            .map(|r| {
                let existing = Existing {
                    tenant: Some((r.get(1), r.get(2))),
                    // Archived to S3: stored, and final (its month's partitions are gone).
                    performance_has_summary: if r.get::<bool, _>(3) {
                        Some(true)
                    } else {
                        r.get(4)
                    },
                };
                (r.get(0), existing)
            })
            .collect())
    }
}

/// Sends the waiting runs' lookups, a batch at a time, until every `Db` sharing the
/// queue is gone.
async fn gather(db: Db, mut waiting: mpsc::UnboundedReceiver<Pending>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while waiting.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let ids: Vec<Uuid> = batch.iter().map(|p| p.run_id).collect();
        tracing::trace!(runs = ids.len(), "lookups gathered into one statement");
        let found = db.existing_many(&ids).await;
        for p in batch.drain(..) {
            let answer = match &found {
                Ok(rows) => Some(Ok(rows
                    .iter()
                    .find(|(id, _)| *id == p.run_id)
                    .map(|(_, e)| e.clone())
                    .unwrap_or_default())),
                Err(e) => again(e).map(Err),
            };
            // A run that stopped waiting (its task was cancelled) needs no answer.
            let _ = p.reply.send(answer);
        }
    }
}

/// The batch's failure as each of its runs' own lookup would have met it, where it can
/// be rebuilt: the pool's timeout or closing, and the connection's failures (PostgreSQL
/// unreachable). Passing these on spares every run a second wait of up to
/// `database.acquire_timeout_secs` in an outage. An error the database answered with is
/// not rebuilt: each run then asks again, and gets its own.
fn again(e: &sqlx::Error) -> Option<sqlx::Error> {
    Some(match e {
        sqlx::Error::PoolTimedOut => sqlx::Error::PoolTimedOut,
        sqlx::Error::PoolClosed => sqlx::Error::PoolClosed,
        sqlx::Error::Io(io) => sqlx::Error::Io(std::io::Error::new(io.kind(), io.to_string())),
        sqlx::Error::Tls(tls) => sqlx::Error::Tls(tls.to_string().into()),
        sqlx::Error::Protocol(what) => sqlx::Error::Protocol(what.clone()),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::db_fault;

    /// A rebuilt failure is handled as the original would be: same fault, same words.
    #[test]
    fn a_rebuilt_failure_is_the_same_fault() {
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        for e in [
            sqlx::Error::PoolTimedOut,
            sqlx::Error::PoolClosed,
            sqlx::Error::Io(refused),
            sqlx::Error::Tls("handshake failed".into()),
            sqlx::Error::Protocol("unexpected message".into()),
        ] {
            let rebuilt = again(&e).expect("rebuilt");
            assert_eq!(db_fault(&rebuilt), db_fault(&e), "{e}");
            assert_eq!(rebuilt.to_string(), e.to_string());
        }
        assert!(again(&sqlx::Error::RowNotFound).is_none());
    }
}
