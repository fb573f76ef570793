//! The update log of a session as the node sees it: cached once for all the node's slots, read
//! from the broker as far as a job needs (or as far as there is), and replayed in order to a
//! worker process.

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

use super::NodeShared;
use super::worker_proc::WorkerProc;
use crate::broker::{AttemptEnd, Broker, NodeProblem, SessionId, UpdateSeq, WorkerId};
use crate::error::BrokerError;

/// The ordered update log of one session, cached once per node for all its slots.
#[derive(Debug)]
pub(super) struct UpdateLog {
    session: SessionId,
    entries: tokio::sync::Mutex<Vec<Bytes>>,
    len: AtomicU64,
}

impl UpdateLog {
    pub(super) fn new(session: SessionId) -> Self {
        UpdateLog {
            session,
            entries: tokio::sync::Mutex::new(Vec::new()),
            len: AtomicU64::new(0),
        }
    }

    /// Fetch new entries until at least `need` are known (`None`: everything there is).
    pub(super) async fn fetch(
        &self,
        broker: &dyn Broker,
        need: Option<UpdateSeq>,
    ) -> Result<(), BrokerError> {
        let mut entries = self.entries.lock().await;
        loop {
            let have = entries.len() as UpdateSeq;
            if need.is_some_and(|n| have >= n) {
                return Ok(());
            }
            let batch = broker.read_updates(&self.session, have, 256).await?;
            let got = batch.len();
            for (seq, payload) in batch {
                if seq == entries.len() as UpdateSeq + 1 {
                    entries.push(payload);
                }
            }
            self.len
                .store(entries.len() as UpdateSeq, Ordering::Release);
            if got == 0 {
                return match need {
                    Some(n) if (entries.len() as UpdateSeq) < n => Err(BrokerError::Protocol(
                        format!("update log ends at {} but a job needs {n}", entries.len()).into(),
                    )),
                    _ => Ok(()),
                };
            }
        }
    }

    /// How many entries are cached.
    pub(super) fn known(&self) -> UpdateSeq {
        self.len.load(Ordering::Acquire)
    }

    /// The cached entries after the first `applied`, with their sequence numbers.
    async fn after(&self, applied: UpdateSeq) -> Vec<(UpdateSeq, Bytes)> {
        let entries = self.entries.lock().await;
        entries
            .iter()
            .enumerate()
            .skip(usize::try_from(applied).unwrap_or(usize::MAX))
            .map(|(i, b)| (i as UpdateSeq + 1, b.clone()))
            .collect()
    }
}

/// Send the worker every cached entry after `applied`, in order, advancing `applied`; an error
/// is how the worker broke.
pub(super) async fn apply_updates(
    proc: &mut WorkerProc,
    log: &UpdateLog,
    applied: &mut UpdateSeq,
) -> Result<(), AttemptEnd> {
    for (seq, payload) in log.after(*applied).await {
        proc.apply_update(seq, &payload).await?;
        *applied = seq;
    }
    Ok(())
}

/// Tell the pool about updates a worker refused (once each), attributed to the worker.
pub(super) async fn report_update_errors(
    shared: &NodeShared,
    session: &SessionId,
    worker: &WorkerId,
    proc: &mut WorkerProc,
) {
    for (seq, message) in std::mem::take(&mut proc.update_errors) {
        let problem = NodeProblem::UpdateFailed {
            node: shared.config.node_id.clone(),
            worker: worker.clone(),
            seq,
            message,
        };
        if let Err(e) = shared.broker.report_problem(session, problem).await {
            tracing::warn!(%worker, seq, error = %e, "cannot report the refused update");
        }
    }
}
