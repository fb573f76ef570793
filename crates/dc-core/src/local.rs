//! [`LocalBroker`]: the in-process broker of a `local()` pool, and the reference backend of the
//! conformance suite.

use crate::broker::{Inspect, JobQueue, NodeRegistry, SessionControl, UpdateLog};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::watch;

use crate::broker::{
    Abandoned, AttemptEnd, AttemptRecord, Broker, Completion, JobId, JobOutcome, JobResult, Lease,
    LeasedJob, NewJob, NodeId, NodeProblem, NodeSeen, NodeStatus, SessionId, SessionInfo,
    SessionSpec, SessionState, SessionStats, UpdateSeq, WorkerId,
};
use crate::error::{BrokerError, JobFailure};

/// Largest payload a local pool moves: the worker channel's frame limit.
const LOCAL_MAX_PAYLOAD: usize = crate::protocol::MAX_FRAME - 4096;

/// An in-process broker: no server, no network. State lives in this process only.
///
/// # Examples
/// ```
/// use std::sync::Arc;
/// use dc_core::{Broker, LocalBroker};
///
/// let broker: Arc<dyn Broker> = Arc::new(LocalBroker::new());
/// assert!(broker.max_payload() > 1 << 20);
/// ```
#[derive(Debug, Clone)]
pub struct LocalBroker {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    state: Mutex<State>,
    /// Bumped on every change; waiters re-check after it moves.
    version: watch::Sender<u64>,
}

#[derive(Debug, Default)]
struct State {
    /// Start of every session id this broker makes (`s<pid>` unless set).
    session_prefix: Option<String>,
    active: Option<SessionId>,
    sessions: HashMap<SessionId, Session>,
    nodes: HashMap<NodeId, NodeEntry>,
    next_session: u64,
}

#[derive(Debug)]
struct NodeEntry {
    status: NodeStatus,
    last_seen: Instant,
}

#[derive(Debug)]
struct Session {
    info: SessionInfo,
    last_alive: Instant,
    queue: VecDeque<JobId>,
    jobs: HashMap<JobId, JobEntry>,
    results: VecDeque<JobResult>,
    updates: Vec<Bytes>,
    problems: Vec<NodeProblem>,
    done: usize,
    failed: usize,
    /// Serial of the last lease handed out.
    last_lease: u64,
}

#[derive(Debug)]
struct JobEntry {
    payload: Bytes,
    update_seq: UpdateSeq,
    attempt: u32,
    failures: u32,
    history: Vec<AttemptRecord>,
    state: JobState,
}

#[derive(Debug)]
enum JobState {
    Queued,
    Leased {
        node: NodeId,
        worker: WorkerId,
        renewed: Instant,
        /// This lease's serial (its `Lease::token`): a job handed back and leased again keeps
        /// its attempt number, so the number alone does not tell two leases apart.
        serial: u64,
    },
    Finished,
}

impl Default for LocalBroker {
    fn default() -> Self {
        Self::new()
    }
}

impl LocalBroker {
    /// An empty broker.
    pub fn new() -> Self {
        LocalBroker {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                version: watch::channel(0).0,
            }),
        }
    }

    /// An empty broker whose session ids start with `prefix` (`<prefix>-1`, `<prefix>-2`…)
    /// instead of `s<pid>`: for a backend that hosts sessions in the pool's process and needs
    /// ids no other process makes.
    pub fn with_session_prefix(prefix: impl Into<String>) -> Self {
        let broker = Self::new();
        broker.lock().session_prefix = Some(prefix.into());
        broker
    }

    /// Nodes that hold a lease now, in any session.
    pub fn lease_holders(&self) -> Vec<NodeId> {
        let st = self.lock();
        let mut nodes: Vec<NodeId> = st
            .sessions
            .values()
            .flat_map(|s| s.jobs.values())
            .filter_map(|j| match &j.state {
                JobState::Leased { node, .. } => Some(node.clone()),
                _ => None,
            })
            .collect();
        nodes.sort();
        nodes.dedup();
        nodes
    }

    /// Renew these leases now, those still current (as a heartbeat listing them would): for a
    /// backend that knows a node cannot list a lease yet, while the job it leases is still on
    /// its way to the node.
    pub fn renew(&self, leases: &[Lease]) {
        let now = Instant::now();
        let mut st = self.lock();
        for lease in leases {
            if let Some(s) = st.sessions.get_mut(&lease.session)
                && let Some(entry) = s.current(lease)
                && let JobState::Leased { renewed, .. } = &mut entry.state
            {
                *renewed = now;
            }
        }
    }

    /// A node's process is gone (its connections closed before its leases ran out): each of
    /// its leases ends as [`AttemptEnd::NodeGone`] (a failed attempt: the job is queued again
    /// or fails for good). Returns how many leases it held.
    pub fn node_gone(&self, node: &NodeId) -> usize {
        let ended = self.lock().end_leases_of(node, &AttemptEnd::NodeGone);
        if ended > 0 {
            self.changed();
        }
        ended
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state half-updated in a way that
        // matters more than stopping every pool: keep going with what is there.
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn changed(&self) {
        self.inner.version.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Run `check` until it yields `Some`, re-checking after every change, for at most `wait`.
    async fn wait_for<T>(
        &self,
        wait: Duration,
        mut check: impl FnMut(&mut State) -> Result<Option<T>, BrokerError>,
    ) -> Result<Option<T>, BrokerError> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut rx = self.inner.version.subscribe();
        loop {
            rx.borrow_and_update();
            let found = {
                let mut state = self.lock();
                check(&mut state)?
            };
            if found.is_some() {
                self.changed();
                return Ok(found);
            }
            if tokio::time::Instant::now() >= deadline {
                // A look without a wait (or a wait that is over): the timer would only fire at
                // its next tick, a millisecond away.
                return Ok(None);
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                _ => return Ok(None),
            }
        }
    }
}

fn gone(session: &SessionId) -> BrokerError {
    BrokerError::SessionGone(session.to_string())
}

impl State {
    fn session(&mut self, id: &SessionId) -> Result<&mut Session, BrokerError> {
        self.sessions.get_mut(id).ok_or_else(|| gone(id))
    }

    /// End every lease `node` holds, in every session, as `end`; returns how many.
    fn end_leases_of(&mut self, node: &NodeId, end: &AttemptEnd) -> usize {
        let mut ended = 0;
        for s in self.sessions.values_mut() {
            let held: Vec<(JobId, u32, WorkerId)> = s
                .jobs
                .iter()
                .filter_map(|(id, j)| match &j.state {
                    JobState::Leased {
                        node: n, worker, ..
                    } if n == node => Some((*id, j.attempt, worker.clone())),
                    _ => None,
                })
                .collect();
            for (job, attempt, worker) in held {
                s.end_attempt(
                    job,
                    AttemptRecord {
                        attempt,
                        node: node.clone(),
                        worker,
                        end: end.clone(),
                    },
                );
                ended += 1;
            }
        }
        ended
    }

    fn expire_sessions(&mut self, now: Instant) {
        let expired: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|(_, s)| now.duration_since(s.last_alive) > s.info.spec.lease)
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            tracing::warn!(session = %id, "pool session expired: its owner stopped renewing it");
            self.sessions.remove(&id);
            if self.active.as_ref() == Some(&id) {
                self.active = None;
            }
        }
    }
}

impl Session {
    /// End the current attempt of a leased job; requeue it or fail it for good.
    fn end_attempt(&mut self, job: JobId, record: AttemptRecord) -> Abandoned {
        let max = self.info.spec.max_attempts;
        let Some(entry) = self.jobs.get_mut(&job) else {
            return Abandoned::Stale;
        };
        if record.end == AttemptEnd::Returned {
            // Never started: not an attempt, nothing to record; behind the waiting jobs.
            entry.attempt = entry.attempt.saturating_sub(1);
            entry.state = JobState::Queued;
            self.queue.push_back(job);
            return Abandoned::Requeued;
        }
        if record.end.counts_as_failure() {
            entry.failures += 1;
        }
        entry.history.push(record);
        if entry.failures >= max {
            entry.state = JobState::Finished;
            entry.payload = Bytes::new();
            let last = entry
                .history
                .last()
                .map(|r| r.end.to_string())
                .unwrap_or_default();
            self.results.push_back(JobResult {
                job,
                attempts: entry.attempt,
                outcome: JobOutcome::Failed {
                    kind: JobFailure::Exhausted,
                    message: last,
                    history: entry.history.clone(),
                },
            });
            self.failed += 1;
            Abandoned::Failed
        } else {
            entry.state = JobState::Queued;
            self.queue.push_front(job);
            Abandoned::Requeued
        }
    }

    /// The lease's job, if the lease is still its current one.
    fn current(&mut self, lease: &Lease) -> Option<&mut JobEntry> {
        self.jobs.get_mut(&lease.job).filter(|e| e.holds(lease))
    }
}

impl JobEntry {
    /// Whether `lease` is this job's current lease (same attempt, node and serial, still
    /// leased).
    fn holds(&self, lease: &Lease) -> bool {
        matches!(&self.state, JobState::Leased { node, serial, .. }
            if self.attempt == lease.attempt
                && *node == lease.node
                && lease.token.parse::<u64>() == Ok(*serial))
    }
}

impl Broker for LocalBroker {
    fn max_payload(&self) -> usize {
        LOCAL_MAX_PAYLOAD
    }
}

#[async_trait]
impl SessionControl for LocalBroker {
    async fn try_open_session(
        &self,
        spec: &SessionSpec,
    ) -> Result<Option<SessionInfo>, BrokerError> {
        let info = {
            let mut st = self.lock();
            st.expire_sessions(Instant::now());
            if st.active.is_some() {
                return Ok(None);
            }
            st.next_session += 1;
            let id = match &st.session_prefix {
                Some(prefix) => SessionId(format!("{prefix}-{}", st.next_session)),
                None => SessionId(format!("s{}-{}", std::process::id(), st.next_session)),
            };
            let info = SessionInfo {
                id: id.clone(),
                spec: spec.clone(),
            };
            st.sessions.insert(
                id.clone(),
                Session {
                    info: info.clone(),
                    last_alive: Instant::now(),
                    queue: VecDeque::new(),
                    jobs: HashMap::new(),
                    results: VecDeque::new(),
                    updates: Vec::new(),
                    problems: Vec::new(),
                    done: 0,
                    failed: 0,
                    last_lease: 0,
                },
            );
            st.active = Some(id);
            info
        };
        self.changed();
        Ok(Some(info))
    }
    async fn keep_session_alive(&self, session: &SessionId) -> Result<SessionState, BrokerError> {
        let mut st = self.lock();
        st.expire_sessions(Instant::now());
        Ok(match st.sessions.get_mut(session) {
            Some(s) => {
                s.last_alive = Instant::now();
                SessionState::Active
            }
            None => SessionState::Gone,
        })
    }
    async fn close_session(&self, session: &SessionId) -> Result<(), BrokerError> {
        {
            let mut st = self.lock();
            st.sessions.remove(session);
            if st.active.as_ref() == Some(session) {
                st.active = None;
            }
        }
        self.changed();
        Ok(())
    }
    async fn active_session(&self, wait: Duration) -> Result<Option<SessionInfo>, BrokerError> {
        self.wait_for(wait, |st| {
            st.expire_sessions(Instant::now());
            Ok(st
                .active
                .as_ref()
                .and_then(|id| st.sessions.get(id))
                .map(|s| s.info.clone()))
        })
        .await
    }
}

#[async_trait]
impl JobQueue for LocalBroker {
    async fn submit(&self, session: &SessionId, jobs: Vec<NewJob>) -> Result<(), BrokerError> {
        {
            let mut st = self.lock();
            let s = st.session(session)?;
            for job in jobs {
                if job.payload.len() > LOCAL_MAX_PAYLOAD {
                    return Err(BrokerError::PayloadTooLarge {
                        size: job.payload.len(),
                        limit: LOCAL_MAX_PAYLOAD,
                    });
                }
                // A resubmitted id that is already known keeps its first entry.
                if s.jobs.contains_key(&job.id) {
                    continue;
                }
                s.jobs.insert(
                    job.id,
                    JobEntry {
                        payload: job.payload,
                        update_seq: job.update_seq,
                        attempt: 0,
                        failures: 0,
                        history: Vec::new(),
                        state: JobState::Queued,
                    },
                );
                s.queue.push_back(job.id);
            }
        }
        self.changed();
        Ok(())
    }
    async fn take_results(
        &self,
        session: &SessionId,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<JobResult>, BrokerError> {
        let max = max.max(1);
        let found = self
            .wait_for(wait, |st| {
                let s = st.session(session)?;
                if s.results.is_empty() {
                    return Ok(None);
                }
                let n = s.results.len().min(max);
                Ok(Some(s.results.drain(..n).collect::<Vec<_>>()))
            })
            .await?;
        Ok(found.unwrap_or_default())
    }
    async fn take_jobs(
        &self,
        session: &SessionId,
        node: &NodeId,
        worker: &WorkerId,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<LeasedJob>, BrokerError> {
        let mut updates_seen = None;
        let found = self
            .wait_for(wait, |st| {
                let s = st.session(session)?;
                let updates = s.updates.len();
                if *updates_seen.get_or_insert(updates) != updates {
                    // An update arrived: hand back nothing so the idle worker applies it now.
                    return Ok(Some(Vec::new()));
                }
                let mut taken = Vec::new();
                while taken.len() < max.max(1) {
                    let Some(id) = s.queue.pop_front() else { break };
                    let Some(entry) = s.jobs.get_mut(&id) else {
                        continue;
                    };
                    if !matches!(entry.state, JobState::Queued) {
                        continue;
                    }
                    entry.attempt += 1;
                    s.last_lease += 1;
                    entry.state = JobState::Leased {
                        node: node.clone(),
                        worker: worker.clone(),
                        renewed: Instant::now(),
                        serial: s.last_lease,
                    };
                    taken.push(LeasedJob {
                        lease: Lease {
                            session: session.clone(),
                            job: id,
                            attempt: entry.attempt,
                            node: node.clone(),
                            worker: worker.clone(),
                            token: s.last_lease.to_string(),
                        },
                        payload: entry.payload.clone(),
                        update_seq: entry.update_seq,
                        log_len: updates as UpdateSeq,
                    });
                }
                Ok((!taken.is_empty()).then_some(taken))
            })
            .await?;
        Ok(found.unwrap_or_default())
    }
    async fn complete(
        &self,
        lease: &Lease,
        outcome: Result<Bytes, (JobFailure, AttemptEnd)>,
    ) -> Result<Completion, BrokerError> {
        let completion = {
            let mut st = self.lock();
            let s = st.session(&lease.session)?;
            let Some(entry) = s.jobs.get_mut(&lease.job).filter(|e| e.holds(lease)) else {
                return Ok(Completion::Discarded);
            };
            let attempts = entry.attempt;
            entry.state = JobState::Finished;
            entry.payload = Bytes::new();
            let outcome = match outcome {
                Ok(bytes) => {
                    entry.history.push(AttemptRecord {
                        attempt: lease.attempt,
                        node: lease.node.clone(),
                        worker: lease.worker.clone(),
                        end: AttemptEnd::Completed,
                    });
                    JobOutcome::Done(bytes)
                }
                Err((kind, end)) => {
                    let message = match &end {
                        AttemptEnd::WorkerError(m) | AttemptEnd::Undecodable(m) => m.clone(),
                        other => other.to_string(),
                    };
                    entry.history.push(AttemptRecord {
                        attempt: lease.attempt,
                        node: lease.node.clone(),
                        worker: lease.worker.clone(),
                        end,
                    });
                    JobOutcome::Failed {
                        kind,
                        message,
                        history: entry.history.clone(),
                    }
                }
            };
            match outcome {
                JobOutcome::Done(_) => s.done += 1,
                JobOutcome::Failed { .. } => s.failed += 1,
            }
            s.results.push_back(JobResult {
                job: lease.job,
                attempts,
                outcome,
            });
            Completion::Accepted
        };
        self.changed();
        Ok(completion)
    }
    async fn abandon(&self, lease: &Lease, end: AttemptEnd) -> Result<Abandoned, BrokerError> {
        let result = {
            let mut st = self.lock();
            let s = st.session(&lease.session)?;
            if s.current(lease).is_none() {
                return Ok(Abandoned::Stale);
            }
            s.end_attempt(
                lease.job,
                AttemptRecord {
                    attempt: lease.attempt,
                    node: lease.node.clone(),
                    worker: lease.worker.clone(),
                    end,
                },
            )
        };
        self.changed();
        Ok(result)
    }
}

#[async_trait]
impl UpdateLog for LocalBroker {
    async fn publish_update(
        &self,
        session: &SessionId,
        payload: Bytes,
    ) -> Result<UpdateSeq, BrokerError> {
        let seq = {
            let mut st = self.lock();
            let s = st.session(session)?;
            s.updates.push(payload);
            s.updates.len() as UpdateSeq
        };
        self.changed();
        Ok(seq)
    }
    async fn publish_update_at(
        &self,
        session: &SessionId,
        seq: UpdateSeq,
        payload: Bytes,
    ) -> Result<UpdateSeq, BrokerError> {
        {
            let mut st = self.lock();
            let s = st.session(session)?;
            let len = s.updates.len() as UpdateSeq;
            if seq <= len && seq > 0 {
                // Published before: a retry after a lost answer.
                return Ok(seq);
            }
            if seq != len + 1 {
                return Err(gone(session));
            }
            s.updates.push(payload);
        }
        self.changed();
        Ok(seq)
    }
    async fn read_updates(
        &self,
        session: &SessionId,
        after: UpdateSeq,
        max: usize,
    ) -> Result<Vec<(UpdateSeq, Bytes)>, BrokerError> {
        let mut st = self.lock();
        let s = st.session(session)?;
        Ok(s.updates
            .iter()
            .enumerate()
            .skip(usize::try_from(after).unwrap_or(usize::MAX))
            .take(max)
            .map(|(i, u)| (i as UpdateSeq + 1, u.clone()))
            .collect())
    }
}

#[async_trait]
impl NodeRegistry for LocalBroker {
    async fn reap_expired(&self) -> Result<usize, BrokerError> {
        let now = Instant::now();
        let mut reaped = 0;
        {
            let mut st = self.lock();
            st.expire_sessions(now);
            for s in st.sessions.values_mut() {
                let lease = s.info.spec.lease;
                let expired: Vec<(JobId, u32, NodeId, WorkerId)> = s
                    .jobs
                    .iter()
                    .filter_map(|(id, j)| match &j.state {
                        JobState::Leased {
                            node,
                            worker,
                            renewed,
                            ..
                        } if now.duration_since(*renewed) > lease => {
                            Some((*id, j.attempt, node.clone(), worker.clone()))
                        }
                        _ => None,
                    })
                    .collect();
                for (job, attempt, node, worker) in expired {
                    tracing::warn!(%job, %node, attempt, "lease expired: job goes back to the queue");
                    s.end_attempt(
                        job,
                        AttemptRecord {
                            attempt,
                            node,
                            worker,
                            end: AttemptEnd::LeaseExpired,
                        },
                    );
                    reaped += 1;
                }
            }
        }
        if reaped > 0 {
            self.changed();
        }
        Ok(reaped)
    }
    async fn heartbeat(&self, status: &NodeStatus) -> Result<(), BrokerError> {
        let now = Instant::now();
        let mut st = self.lock();
        for lease in &status.leases {
            if lease.node != status.node {
                continue;
            }
            if let Some(s) = st.sessions.get_mut(&lease.session)
                && let Some(entry) = s.current(lease)
                && let JobState::Leased { renewed, .. } = &mut entry.state
            {
                *renewed = now;
            }
        }
        st.nodes.insert(
            status.node.clone(),
            NodeEntry {
                status: status.clone(),
                last_seen: now,
            },
        );
        Ok(())
    }
    async fn leave(&self, node: &NodeId) -> Result<(), BrokerError> {
        {
            let mut st = self.lock();
            st.nodes.remove(node);
            st.end_leases_of(node, &AttemptEnd::NodeLeft);
        }
        self.changed();
        Ok(())
    }
    async fn report_problem(
        &self,
        session: &SessionId,
        problem: NodeProblem,
    ) -> Result<(), BrokerError> {
        {
            let mut st = self.lock();
            let s = st.session(session)?;
            if !s.problems.contains(&problem) {
                s.problems.push(problem);
            }
        }
        self.changed();
        Ok(())
    }
}

#[async_trait]
impl Inspect for LocalBroker {
    async fn session_stats(&self, session: &SessionId) -> Result<SessionStats, BrokerError> {
        let st = self.lock();
        let s = st.sessions.get(session).ok_or_else(|| gone(session))?;
        let now = Instant::now();
        let lease = s.info.spec.lease;
        let mut stats = SessionStats {
            done: s.done,
            failed: s.failed,
            problems: s.problems.clone(),
            ..SessionStats::default()
        };
        for job in s.jobs.values() {
            match job.state {
                JobState::Queued => stats.queued += 1,
                JobState::Leased { .. } => stats.running += 1,
                JobState::Finished => {}
            }
        }
        for node in st.nodes.values() {
            if now.duration_since(node.last_seen) > lease {
                continue;
            }
            stats.count_node(&node.status, session);
        }
        Ok(stats)
    }
    async fn nodes(&self, within: Duration) -> Result<Vec<NodeSeen>, BrokerError> {
        let st = self.lock();
        let now = Instant::now();
        let mut seen: Vec<NodeSeen> = st
            .nodes
            .values()
            .filter(|n| now.duration_since(n.last_seen) <= within)
            .map(|n| NodeSeen {
                status: n.status.clone(),
                ago: now.duration_since(n.last_seen),
            })
            .collect();
        seen.sort_by(|a, b| a.status.node.cmp(&b.status.node));
        Ok(seen)
    }
}
