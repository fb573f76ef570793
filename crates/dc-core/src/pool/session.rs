//! A pool's session with its broker, and the two tasks that keep it going.
//!
//! 1. `connect` opens the session ([`open_session`]), waiting while another pool is active,
//!    and spawns [`dispatch_results`] and [`keep_alive`] on the shared state.
//! 2. Every job a call submits is first *routed*: its id maps to the call's channel, its
//!    payload and the update position it was submitted at. A job is awaited while it has a
//!    route.
//! 3. [`dispatch_results`] reads results and hands each to its route's call, removing the
//!    route; a second result for the same job finds none and is dropped.
//! 4. [`keep_alive`] renews the session a few times per lease, reaps expired leases (a dead
//!    node's jobs go back to the queue), logs the problems nodes report, and fails every
//!    waiting call when no node can run this pool's kind.
//! 5. After a long stretch without results, [`keep_alive`] asks the broker which awaited jobs
//!    it no longer holds, and submits those again from their routes.
//! 6. When the broker lost the session (restarted empty, or it expired while this process
//!    stalled), [`Shared::recover`] opens a new one, replays every update, and submits every
//!    routed job again under its id.
//! 7. Calls to the broker from the pool's methods ride out a broker they cannot reach, with
//!    jittered backoff, for up to the outage timeout ([`Shared::ride_out`]).
//! 8. Closing (or dropping) the pool sends every route an abort and closes the session.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::backoff::Backoff;
use crate::broker::{
    Broker, JobId, JobResult, NewJob, NodeProblem, SessionId, SessionInfo, SessionSpec,
    SessionState, UpdateSeq,
};
use crate::error::{BrokerError, PoolError};
use crate::util::lock;

/// Jobs per `submit` call.
pub(super) const SUBMIT_BATCH: usize = 1024;

/// Open a session for `spec`, waiting (and saying so once) while another pool is active on
/// this broker.
///
/// # Errors
/// A broker error.
pub(super) async fn open_session(
    broker: &dyn Broker,
    spec: &SessionSpec,
) -> Result<SessionInfo, PoolError> {
    let mut waiting = false;
    loop {
        if let Some(info) = broker.try_open_session(spec).await? {
            if waiting {
                tracing::info!(session = %info.id, "the other pool closed; this one starts");
            }
            return Ok(info);
        }
        if !waiting {
            waiting = true;
            tracing::info!(kind = %spec.kind, "another pool is active on this server; waiting for it to close");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// What the dispatcher hands to a waiting call.
#[derive(Debug)]
pub(super) enum Delivery {
    Result {
        index: usize,
        result: JobResult,
    },
    /// The pool cannot go on (closed, session lost, no worker can run it): ends the stream.
    Abort(PoolError),
}

/// A job waiting for its result: who wants it, and what to resubmit if the broker loses it.
#[derive(Debug)]
pub(super) struct Route {
    pub(super) index: usize,
    pub(super) tx: mpsc::UnboundedSender<Delivery>,
    pub(super) payload: Bytes,
    pub(super) update_seq: UpdateSeq,
}

/// State shared by the pool handle, its streams and its background tasks.
#[derive(Debug)]
pub(super) struct Shared {
    pub(super) broker: Arc<dyn Broker>,
    pub(super) spec: SessionSpec,
    /// The current session; replaced when the broker lost the old one.
    pub(super) session: Mutex<SessionId>,
    pub(super) next_job: AtomicU64,
    pub(super) update_seq: AtomicU64,
    pub(super) routes: Mutex<HashMap<JobId, Route>>,
    /// Every update published, in order: replayed into a new session after a broker loss.
    /// Held across a publish so updates and recovery never interleave.
    pub(super) updates: tokio::sync::Mutex<Vec<Bytes>>,
    /// When the last result arrived or the last submission ended (or the pool opened).
    pub(super) last_result: Mutex<tokio::time::Instant>,
    /// Submissions in progress: their jobs are routed but may not be in the broker yet.
    pub(super) submitting: AtomicUsize,
    pub(super) closed: AtomicBool,
    /// How long a call rides out a broker it cannot reach.
    pub(super) outage_timeout: Duration,
}

impl Shared {
    /// The state of a pool whose session `session` just opened on `broker`.
    pub(super) fn new(
        broker: Arc<dyn Broker>,
        session: SessionInfo,
        outage_timeout: Duration,
    ) -> Arc<Self> {
        Arc::new(Shared {
            broker,
            spec: session.spec,
            session: Mutex::new(session.id),
            updates: tokio::sync::Mutex::new(Vec::new()),
            next_job: AtomicU64::new(1),
            update_seq: AtomicU64::new(0),
            routes: Mutex::new(HashMap::new()),
            last_result: Mutex::new(tokio::time::Instant::now()),
            submitting: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            outage_timeout,
        })
    }

    /// Spawn the pool's background tasks: the result reader and the keep-alive.
    pub(super) fn spawn_tasks(self: &Arc<Self>) -> Vec<JoinHandle<()>> {
        vec![
            tokio::spawn(dispatch_results(self.clone())),
            tokio::spawn(keep_alive(self.clone())),
        ]
    }

    /// Call the broker until it answers, riding out connection trouble (a server restarting,
    /// a network blip) with jittered backoff for up to the outage timeout; then fail with
    /// [`PoolError::Unreachable`], saying how long the broker was gone. Any other error
    /// returns at once, as does a pool closed meanwhile (unless `closing`: the call closes it).
    pub(super) async fn ride_out<T, F, Fut>(
        &self,
        closing: bool,
        mut call: F,
    ) -> Result<T, PoolError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, BrokerError>>,
    {
        let mut outage: Option<(tokio::time::Instant, Backoff)> = None;
        let mut said: Option<tokio::time::Instant> = None;
        loop {
            match call().await {
                Err(e) if e.is_transient() && (closing || !self.closed.load(Ordering::Acquire)) => {
                    let (since, backoff) = outage.get_or_insert_with(|| {
                        (
                            tokio::time::Instant::now(),
                            Backoff::new(Duration::from_millis(50), Duration::from_secs(2)),
                        )
                    });
                    let gone = since.elapsed();
                    if gone >= self.outage_timeout {
                        return Err(PoolError::Unreachable(format!(
                            "the broker could not be reached for {:.1} s (the outage timeout is {:?}): {e}",
                            gone.as_secs_f64(),
                            self.outage_timeout
                        )));
                    }
                    if said.is_none_or(|at| at.elapsed() >= OUTAGE_SAID_EVERY) {
                        said = Some(tokio::time::Instant::now());
                        tracing::warn!(error = %e, gone_s = gone.as_secs(), "the broker cannot be reached; retrying");
                    }
                    let pause = backoff.next_pause().min(self.outage_timeout - gone);
                    tokio::time::sleep(pause).await;
                }
                other => return other.map_err(PoolError::from),
            }
        }
    }

    /// The routes of the jobs still awaited.
    pub(super) fn routes(&self) -> MutexGuard<'_, HashMap<JobId, Route>> {
        lock(&self.routes)
    }

    /// The jobs still awaited, in id order.
    fn awaited(&self) -> Vec<JobId> {
        let mut ids: Vec<JobId> = self.routes().keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// The current session.
    pub(super) fn id(&self) -> SessionId {
        lock(&self.session).clone()
    }

    /// The broker lost session `lost` (restarted empty, or the session expired while this
    /// process stalled): open a new one, replay the update log, and resubmit every job still
    /// waiting for its result, under the same job ids. Results already delivered are not
    /// redone; a result that arrives twice is dropped. Retries until it works or the pool
    /// closes.
    pub(super) async fn recover(&self, lost: &SessionId) {
        let updates = self.updates.lock().await;
        if self.id() != *lost || self.closed.load(Ordering::Acquire) {
            return; // Another task recovered already, or the pool closed.
        }
        tracing::warn!(session = %lost, "pool session lost by the broker; reopening it and resubmitting outstanding jobs");
        // What is left of it (a damaged session is not always deleted) is closed, so that nodes
        // still serving it leave it for the new one; every job it held is submitted again.
        if let Err(e) = self.broker.close_session(lost).await {
            tracing::debug!(session = %lost, error = %e, "closing the lost session failed");
        }
        let mut failures = 0u32;
        loop {
            if self.closed.load(Ordering::Acquire) {
                return;
            }
            match self.reopen(&updates).await {
                Ok(id) => {
                    tracing::info!(session = %id, "pool session recovered");
                    return;
                }
                Err(e) => {
                    failures += 1;
                    tracing::warn!(error = %e, "recovering the pool session failed; retrying");
                    retry_pause(failures).await;
                }
            }
        }
    }

    async fn reopen(&self, updates: &[Bytes]) -> Result<SessionId, PoolError> {
        let info = open_session(self.broker.as_ref(), &self.spec).await?;
        for update in updates {
            self.broker.publish_update(&info.id, update.clone()).await?;
        }
        let resubmitted = self.submit_again(&info.id, &self.awaited()).await?;
        *lock(&self.session) = info.id.clone();
        tracing::info!(session = %info.id, resubmitted, updates = updates.len(), "outstanding jobs resubmitted");
        Ok(info.id)
    }

    /// Ask the broker which outstanding jobs it no longer holds, and submit those again (with
    /// their payloads and update positions). Called after a long stretch without results, when
    /// the broker's counts cannot account for every job still awaited.
    async fn resubmit_lost(&self, session: &SessionId) -> Result<usize, BrokerError> {
        let lost = self.broker.lost_jobs(session, &self.awaited()).await?;
        self.submit_again(session, &lost).await
    }

    /// Submit the jobs `ids` (those still awaited) again to `session`, with the payloads and
    /// update positions they were first submitted with; returns how many.
    async fn submit_again(&self, session: &SessionId, ids: &[JobId]) -> Result<usize, BrokerError> {
        let jobs: Vec<NewJob> = {
            let routes = self.routes();
            ids.iter()
                .filter_map(|id| {
                    routes.get(id).map(|r| NewJob {
                        id: *id,
                        payload: r.payload.clone(),
                        update_seq: r.update_seq,
                    })
                })
                .collect()
        };
        for batch in jobs.chunks(SUBMIT_BATCH) {
            self.broker.submit(session, batch.to_vec()).await?;
        }
        Ok(jobs.len())
    }

    /// Hand a result to its caller; a second result for the same job finds no route.
    fn deliver(&self, result: JobResult) {
        *lock(&self.last_result) = tokio::time::Instant::now();
        let route = self.routes().remove(&result.job);
        match route {
            Some(route) => {
                let _ = route.tx.send(Delivery::Result {
                    index: route.index,
                    result,
                });
            }
            None => {
                tracing::debug!(job = %result.job, "result for no waiting call (duplicate or dropped stream)")
            }
        }
    }

    /// End every waiting call with `err`.
    pub(super) fn abort_all(&self, err: &PoolError) {
        let routes: Vec<Route> = self.routes().drain().map(|(_, r)| r).collect();
        for route in routes {
            let _ = route.tx.send(Delivery::Abort(err.clone()));
        }
    }
}

/// Default of [`PoolBuilder::broker_outage_timeout`](super::PoolBuilder::broker_outage_timeout).
pub(super) const DEFAULT_OUTAGE_TIMEOUT: Duration = Duration::from_secs(60);

/// How often a call waiting on an unreachable broker says so (and once at first).
const OUTAGE_SAID_EVERY: Duration = Duration::from_secs(10);

/// The pause before retrying after `failures` failures in a row: 200 ms doubling, at most 3 s.
async fn retry_pause(failures: u32) {
    tokio::time::sleep(Duration::from_millis(
        (100u64 << failures.min(5)).min(3_000),
    ))
    .await;
}

/// How long a pool goes without any result before it asks the broker which of its jobs were
/// lost (and at most how often it asks).
const LOST_CHECK_AFTER: Duration = Duration::from_secs(10);
/// After this long without any result the pool asks even when the broker's counts account for
/// every job (a damaged job record can leave them looking right), and again as often.
const LOST_CHECK_ANYWAY_AFTER: Duration = Duration::from_secs(30);
/// How long jobs wait with no worker for their kind before the pool says so…
const UNSERVED_WARN_AFTER: Duration = Duration::from_secs(10);
/// …and how often it says it again while that lasts.
const UNSERVED_WARN_EVERY: Duration = Duration::from_secs(60);

/// Read results from the broker and hand each to the call waiting for it.
async fn dispatch_results(shared: Arc<Shared>) {
    let mut failures = 0u32;
    loop {
        let session = shared.id();
        match shared
            .broker
            .take_results(&session, 4096, Duration::from_millis(500))
            .await
        {
            Ok(results) => {
                failures = 0;
                for result in results {
                    shared.deliver(result);
                }
            }
            Err(BrokerError::SessionGone(_)) => {
                shared.recover(&session).await;
            }
            Err(e) => {
                failures += 1;
                tracing::warn!(error = %e, "reading results failed; retrying");
                retry_pause(failures).await;
            }
        }
    }
}

/// Keep the session alive, reap expired leases (often: a dead node's jobs restart within a
/// tick of being noticed), recover a session the broker lost, and notice when no node can run
/// this pool.
async fn keep_alive(shared: Arc<Shared>) {
    let period = (shared.spec.lease / 4).min(Duration::from_millis(250));
    let mut problems_seen = 0;
    // Since when jobs wait with no worker for them, and when that was last said.
    let mut unserved: Option<(tokio::time::Instant, Option<tokio::time::Instant>)> = None;
    let mut last_lost_check: Option<tokio::time::Instant> = None;
    loop {
        tokio::time::sleep(period).await;
        let session = shared.id();
        match shared.broker.keep_session_alive(&session).await {
            Ok(SessionState::Active) => {}
            Ok(SessionState::Gone) => {
                shared.recover(&session).await;
                problems_seen = 0;
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "session keep-alive failed");
                continue;
            }
        }
        if let Err(e) = shared.broker.reap_expired().await {
            tracing::debug!(error = %e, "reaping expired leases failed");
        }
        let Ok(stats) = shared.broker.session_stats(&session).await else {
            continue;
        };
        for problem in stats.problems.iter().skip(problems_seen) {
            tracing::error!("{problem}");
        }
        problems_seen = stats.problems.len();
        let waiting = shared.routes().len();
        // No result for a long while, and either the broker's counts do not cover every job
        // still awaited, or jobs are counted queued while workers sit idle, or it has lasted
        // long enough to ask anyway: ask which jobs it lost (a damaged or restarted server),
        // and submit those again.
        let quiet = lock(&shared.last_result).elapsed();
        if waiting > 0
            && quiet >= LOST_CHECK_AFTER
            && shared.submitting.load(Ordering::Acquire) == 0
            && ((stats.queued + stats.running < waiting
                || (stats.queued > 0 && stats.running < stats.workers))
                && last_lost_check.is_none_or(|at| at.elapsed() >= LOST_CHECK_AFTER)
                || quiet >= LOST_CHECK_ANYWAY_AFTER
                    && last_lost_check.is_none_or(|at| at.elapsed() >= LOST_CHECK_ANYWAY_AFTER))
        {
            last_lost_check = Some(tokio::time::Instant::now());
            match shared.resubmit_lost(&session).await {
                Ok(0) => {}
                Ok(n) => {
                    tracing::warn!(
                        jobs = n,
                        "the broker had lost jobs this pool waits for; submitted them again"
                    )
                }
                Err(e) => tracing::warn!(error = %e, "checking for lost jobs failed"),
            }
        }
        if waiting == 0 || stats.workers > 0 || stats.starting > 0 {
            unserved = None;
            continue;
        }
        // Jobs wait and no worker serves or starts: say so after a while, and now and then.
        let now = tokio::time::Instant::now();
        let (since, said) = unserved.get_or_insert((now, None));
        let due = match said {
            None => now.duration_since(*since) >= UNSERVED_WARN_AFTER,
            Some(at) => now.duration_since(*at) >= UNSERVED_WARN_EVERY,
        };
        if due {
            *said = Some(now);
            tracing::warn!(
                waiting,
                kind = %shared.spec.kind,
                for_s = now.duration_since(*since).as_secs(),
                "jobs wait, and no worker serves this pool's kind: start a node that serves it \
                 (`dc-cli start-node`), or check that the running nodes can reach the broker"
            );
        }
        if stats.problems.is_empty() {
            continue;
        }
        // Jobs wait, no worker serves or starts, and nodes said why: tell the callers.
        let kind = shared.spec.kind.clone();
        let err = stats
            .problems
            .iter()
            .find_map(|p| match p {
                NodeProblem::UnknownKind { known, .. } => Some(PoolError::UnknownWorkerKind {
                    kind: kind.clone(),
                    known: known.clone(),
                }),
                _ => None,
            })
            .or_else(|| {
                stats.problems.iter().find_map(|p| match p {
                    NodeProblem::InitFailed {
                        worker, message, ..
                    } => Some(PoolError::WorkerInit(format!("{worker}: {message}"))),
                    _ => None,
                })
            });
        if let Some(err) = err {
            tracing::error!("{err}");
            shared.abort_all(&err);
        }
    }
}
