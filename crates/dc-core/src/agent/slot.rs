//! One worker slot's supervision loop for a session: start the worker process, serve jobs on
//! it (see `flow`), and when it dies restart it after a backoff; give up on the session after
//! `init_attempts` failed starts in a row.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::flow::serve_jobs;
use super::updates::UpdateLog;
use super::worker_proc::{StartError, WorkerProc};
use super::{NodeShared, release_slot_leases, report, retry_backoff, sleep_or_stop};
use crate::broker::{NodeProblem, SessionInfo, WorkerId, WorkerState};
use crate::error::BrokerError;
use crate::util::lock;

/// Why a slot stopped serving its worker process.
pub(super) enum SlotExit {
    /// The session is over (or the node stops): stop the worker gracefully.
    Done,
    /// The session ended while a job ran: the job is aborted, the worker killed.
    Abort,
    /// The worker process must be replaced.
    Restart,
}

/// Serve one session on one slot: start its worker process, run jobs on it, restart it when it
/// dies, until the session ends or the slot gives up on it.
pub(super) async fn run_slot(
    shared: Arc<NodeShared>,
    info: SessionInfo,
    slot: usize,
    log: Arc<UpdateLog>,
    mut cancel: watch::Receiver<bool>,
) {
    let node = shared.config.node_id.clone();
    let worker_id = WorkerId(format!("{node}/{slot}"));
    if shared.config.simulated {
        run_simulated_slot(&shared, &info, slot, &worker_id, &mut cancel).await;
        return;
    }
    let mut init_failures = 0u32;
    let mut init_backoff = retry_backoff();
    let mut crashed = false;
    let mut crash_backoff = retry_backoff();
    loop {
        if *cancel.borrow() {
            break;
        }
        if crashed {
            // A worker that keeps dying (a poison update, a broken install) must not spin.
            sleep_or_stop(&mut cancel, crash_backoff.next_pause()).await;
            if *cancel.borrow() {
                break;
            }
        }
        shared.set_state(slot, Some(&info.id), WorkerState::Starting);
        let started = tokio::select! {
            _ = cancel.changed() => break,
            r = WorkerProc::start(&shared, &info, slot, &worker_id) => r,
        };
        let mut proc = match started {
            Ok(p) => p,
            Err(StartError::UnknownKind(known)) => {
                tracing::error!(worker = %worker_id, kind = %info.spec.kind, ?known, "worker program has no such kind");
                let _ = shared
                    .broker
                    .report_problem(
                        &info.id,
                        NodeProblem::UnknownKind {
                            node: node.clone(),
                            known,
                        },
                    )
                    .await;
                break;
            }
            Err(StartError::Init(message)) => {
                init_failures += 1;
                tracing::warn!(worker = %worker_id, attempt = init_failures, %message, "worker failed to start");
                if init_failures >= shared.config.init_attempts {
                    let _ = shared
                        .broker
                        .report_problem(
                            &info.id,
                            NodeProblem::InitFailed {
                                node: node.clone(),
                                worker: worker_id.clone(),
                                message,
                            },
                        )
                        .await;
                    break;
                }
                sleep_or_stop(&mut cancel, init_backoff.next_pause()).await;
                continue;
            }
        };
        init_failures = 0;
        init_backoff = retry_backoff();
        lock(&shared.pids).insert(slot, proc.pid);
        shared.set_state(slot, Some(&info.id), WorkerState::Idle);
        let started_at = std::time::Instant::now();
        let exit = serve_jobs(
            &shared,
            &info,
            slot,
            &worker_id,
            &log,
            &mut proc,
            &mut cancel,
        )
        .await;
        lock(&shared.pids).remove(&slot);
        release_slot_leases(&shared, slot).await;
        match exit {
            SlotExit::Done => {
                proc.stop(shared.config.stop_grace).await;
                break;
            }
            SlotExit::Abort => {
                proc.kill().await;
                break;
            }
            SlotExit::Restart => {
                proc.kill().await;
                // A worker that lived a while before dying starts from the shortest pause again.
                if started_at.elapsed() > Duration::from_secs(30) {
                    crash_backoff = retry_backoff();
                }
                crashed = true;
            }
        }
    }
    shared.set_state(slot, None, WorkerState::Starting);
}

/// Benchmarks only: take jobs and complete each at once with its payload, no process.
async fn run_simulated_slot(
    shared: &NodeShared,
    info: &SessionInfo,
    slot: usize,
    worker_id: &WorkerId,
    cancel: &mut watch::Receiver<bool>,
) {
    let broker = shared.broker.as_ref();
    shared.set_state(slot, Some(&info.id), WorkerState::Idle);
    let mut backoff = retry_backoff();
    loop {
        let taken = tokio::select! {
            biased;
            _ = cancel.changed() => break,
            r = broker.take_job(&info.id, &shared.config.node_id, worker_id, shared.config.poll) => r,
        };
        match taken {
            Ok(Some(job)) => {
                backoff = retry_backoff();
                let key = (slot, job.lease.job);
                lock(&shared.leases).insert(key, job.lease.clone());
                let lease = &job.lease;
                report(lease, || broker.complete(lease, Ok(job.payload.clone()))).await;
                lock(&shared.leases).remove(&key);
            }
            Ok(None) => {}
            Err(BrokerError::SessionGone(_)) => break,
            Err(e) => {
                tracing::warn!(worker = %worker_id, error = %e, "cannot take a job; retrying");
                tokio::time::sleep(backoff.next_pause()).await;
            }
        }
    }
    shared.set_state(slot, None, WorkerState::Starting);
}
