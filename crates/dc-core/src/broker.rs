//! The [`Broker`] trait and the capability traits it is made of ([`SessionControl`],
//! [`JobQueue`], [`UpdateLog`], [`NodeRegistry`], [`Inspect`]), which every backend implements,
//! and the wire types they move.
//!
//! A broker holds, per pool *session*: a job queue, leases on taken jobs, an ordered update log,
//! and results keyed by job id. The reliability model every backend keeps (and the conformance
//! suite in `dc_core::testing` checks):
//!
//! - **One active session.** [`SessionControl::try_open_session`] opens a session only when
//!   none is active; the pool retries until the active one closes or expires.
//! - **Leases renewed by the node heartbeat.** [`JobQueue::take_jobs`] leases jobs to a node
//!   with a new attempt number; [`NodeRegistry::heartbeat`] renews every lease the node lists.
//!   A lease not renewed within the session's `lease` period expires: the job goes back (or
//!   fails after `max_attempts` failed attempts), never dropped. The numbered contract is on
//!   [`JobQueue`].
//! - **Fencing by attempt.** [`JobQueue::complete`] and [`JobQueue::abandon`] only count when
//!   the lease's attempt is still the job's current one; a late result from an expired lease is
//!   discarded.
//! - **First writer wins.** A job gets at most one result; later ones are discarded.
//! - **Ordered update log.** Updates get sequence numbers 1, 2, 3…; every worker replays them
//!   from the start; a job carries the sequence in force when it was submitted.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::{BrokerError, JobFailure};

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub String);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                $name(s.to_string())
            }
        }
    };
}

string_id!(
    /// A pool session: one `Pool` from connect to close.
    SessionId
);
string_id!(
    /// A node: one agent process on one machine.
    NodeId
);
string_id!(
    /// A worker process slot: `<node>/<slot>`.
    WorkerId
);

/// A job, numbered by its pool within the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(pub u64);

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "job#{}", self.0)
    }
}

/// Position in a session's update log: `n` means updates `1..=n` (0: none).
pub type UpdateSeq = u64;

/// What a pool asks for when it opens a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionSpec {
    /// The worker kind (`Worker::KIND`).
    pub kind: String,
    /// `Worker::Init`, CBOR-encoded.
    #[serde(with = "serde_bytes")]
    pub init: Vec<u8>,
    /// Failed attempts after which a job fails for good.
    pub max_attempts: u32,
    /// How long a lease (and the session itself) lives without renewal.
    pub lease: Duration,
    /// Who opened it (host and pid), for status output and logs.
    pub owner: String,
    /// Whether nodes may take several jobs per broker round trip when jobs finish much faster
    /// than a round trip (on by default; see `PoolBuilder::auto_batching`).
    #[serde(default = "yes")]
    pub auto_batching: bool,
}

fn yes() -> bool {
    true
}

/// An open session as nodes see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    /// Its id.
    pub id: SessionId,
    /// What it was opened with.
    pub spec: SessionSpec,
}

/// A job as the pool submits it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewJob {
    /// Unique within the session.
    pub id: JobId,
    /// `Worker::Job`, CBOR-encoded; passed to the worker process as is.
    pub payload: Bytes,
    /// Updates that must be applied before this job runs.
    pub update_seq: UpdateSeq,
}

/// The right of one node to run one attempt of one job.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Lease {
    /// The job's session.
    pub session: SessionId,
    /// The job.
    pub job: JobId,
    /// 1 for the first start, 2 for the second…; fences late results of earlier attempts.
    pub attempt: u32,
    /// The node holding it.
    pub node: NodeId,
    /// The worker slot it is for.
    pub worker: WorkerId,
    /// The backend's own handle for this lease; opaque to callers, handed back as it came.
    pub token: String,
}

/// A job handed to a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeasedJob {
    /// The lease to renew (through heartbeats) and to complete.
    pub lease: Lease,
    /// The job's payload.
    pub payload: Bytes,
    /// Updates to apply before running it.
    pub update_seq: UpdateSeq,
    /// Length of the session's update log when the job was taken: a worker applies these too
    /// between jobs, so updates reach busy workers without an extra round trip.
    pub log_len: UpdateSeq,
}

/// How one attempt of a job ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum AttemptEnd {
    /// It produced a result.
    Completed,
    /// The worker returned an error.
    WorkerError(String),
    /// The job's payload did not decode as the worker's `Job` type.
    Undecodable(String),
    /// The worker process died; `how` says how (exit code or signal).
    ProcessDied {
        /// "exited with code 3", "killed by signal 9 (SIGKILL)".
        how: String,
        /// The last lines the process printed.
        last_lines: Vec<String>,
    },
    /// The worker process broke the frame protocol.
    Protocol(String),
    /// The node stopped renewing the lease (dead, cut off, or stalled).
    LeaseExpired,
    /// The node's broker connections closed: its process died (seen before the lease ran out).
    NodeGone,
    /// The node left on purpose while holding the job (not counted as a failure).
    NodeLeft,
    /// The node handed the job back before starting it, so that another worker can run it
    /// sooner. Not a failure and not an attempt: no history record is kept, the job's next
    /// lease carries the same attempt number again, and it is queued behind the jobs already
    /// waiting.
    Returned,
}

impl AttemptEnd {
    /// Whether this ending counts toward `max_attempts`.
    pub fn counts_as_failure(&self) -> bool {
        !matches!(
            self,
            AttemptEnd::Completed | AttemptEnd::NodeLeft | AttemptEnd::Returned
        )
    }
}

impl fmt::Display for AttemptEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttemptEnd::Completed => f.write_str("completed"),
            AttemptEnd::WorkerError(m) => write!(f, "worker error: {m}"),
            AttemptEnd::Undecodable(m) => write!(f, "undecodable job: {m}"),
            AttemptEnd::ProcessDied { how, last_lines } => {
                write!(f, "worker process {how}")?;
                if !last_lines.is_empty() {
                    write!(f, "; its last output:\n  {}", last_lines.join("\n  "))?;
                }
                Ok(())
            }
            AttemptEnd::Protocol(m) => write!(f, "protocol error: {m}"),
            AttemptEnd::LeaseExpired => f.write_str("lease expired (node silent)"),
            AttemptEnd::NodeGone => {
                f.write_str("node process gone (its broker connections closed)")
            }
            AttemptEnd::NodeLeft => f.write_str("node left"),
            AttemptEnd::Returned => f.write_str("handed back before it started"),
        }
    }
}

/// One attempt in a job's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptRecord {
    /// Its attempt number.
    pub attempt: u32,
    /// Where it ran.
    pub node: NodeId,
    /// On which worker slot.
    pub worker: WorkerId,
    /// How it ended.
    pub end: AttemptEnd,
}

impl fmt::Display for NodeProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NodeProblem::UnknownKind { node, known } => {
                write!(f, "node {node} has no such worker kind (it has {known:?})")
            }
            NodeProblem::UpdateFailed {
                worker,
                seq,
                message,
                ..
            } => write!(f, "worker {worker} could not apply update {seq}: {message}"),
            NodeProblem::InitFailed {
                worker, message, ..
            } => write!(f, "worker {worker} could not start: {message}"),
        }
    }
}

impl fmt::Display for AttemptRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "attempt {} on {}: {}",
            self.attempt, self.worker, self.end
        )
    }
}

/// A job's final outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobOutcome {
    /// `Worker::Output`, CBOR-encoded.
    Done(Bytes),
    /// Failed for good.
    Failed {
        /// Why.
        kind: JobFailure,
        /// The worker's message or how the last attempt ended.
        message: String,
        /// Every attempt.
        history: Vec<AttemptRecord>,
    },
}

/// A job's outcome, as the pool reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobResult {
    /// The job.
    pub job: JobId,
    /// Times it was started.
    pub attempts: u32,
    /// Its outcome.
    pub outcome: JobOutcome,
}

/// An attempt's outcome as a node reports it: the output (CBOR), or why the job failed (the
/// worker's error; not retried).
pub type Outcome = Result<Bytes, (JobFailure, AttemptEnd)>;

/// What happened to a result handed to [`JobQueue::complete`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// Recorded: this was the job's first result.
    Accepted,
    /// Dropped: the lease was stale (the job was re-leased) or the job already had a result.
    Discarded,
}

/// What happened to a lease handed back with [`JobQueue::abandon`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Abandoned {
    /// Queued again for another attempt.
    Requeued,
    /// Out of attempts: the job failed for good and the pool was told.
    Failed,
    /// The lease was stale; nothing changed.
    Stale,
}

/// State of one worker slot, as its node reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkerState {
    /// Starting its process or building the worker.
    Starting,
    /// Ready, waiting for a job.
    Idle,
    /// Running a job.
    Busy,
}

/// One worker slot in a node's heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerStatus {
    /// The slot.
    pub worker: WorkerId,
    /// The session it serves, if any.
    pub session: Option<SessionId>,
    /// What it is doing.
    pub state: WorkerState,
    /// GPU UUIDs it was given.
    pub devices: Vec<String>,
}

/// What a node tells the broker on each heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// The node.
    pub node: NodeId,
    /// Its host name.
    pub host: String,
    /// Worker kinds it can run.
    pub kinds: Vec<String>,
    /// Its worker slots.
    pub workers: Vec<WorkerStatus>,
    /// The leases it holds now: exactly these are renewed.
    pub leases: Vec<Lease>,
}

/// Something a node could not do for a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum NodeProblem {
    /// The node's binary has no such worker kind.
    UnknownKind {
        /// The node.
        node: NodeId,
        /// Kinds it has.
        known: Vec<String>,
    },
    /// A worker could not apply an update (wrong type, or `handle_update` failed).
    UpdateFailed {
        /// The node.
        node: NodeId,
        /// The worker slot.
        worker: WorkerId,
        /// The update's sequence number.
        seq: UpdateSeq,
        /// Why.
        message: String,
    },
    /// `Worker::new` kept failing on the node.
    InitFailed {
        /// The node.
        node: NodeId,
        /// The worker slot.
        worker: WorkerId,
        /// The worker's message.
        message: String,
    },
}

/// Counts for one session.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// Worker processes ready or busy for this session on live nodes.
    pub workers: usize,
    /// Live nodes with at least one such worker.
    pub nodes: usize,
    /// Worker processes starting (or building the worker) for this session on live nodes.
    pub starting: usize,
    /// Jobs waiting.
    pub queued: usize,
    /// Jobs leased.
    pub running: usize,
    /// Jobs with a result.
    pub done: usize,
    /// Jobs failed for good.
    pub failed: usize,
    /// Problems nodes reported for it.
    pub problems: Vec<NodeProblem>,
}

/// A node as the broker last heard from it (for `dc-cli status`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSeen {
    /// Its last heartbeat.
    pub status: NodeStatus,
    /// How long ago that was.
    pub ago: Duration,
}

impl SessionStats {
    /// Count a live node's workers serving (or starting for) `session` into these stats: what
    /// every backend does with each node's last heartbeat.
    pub fn count_node(&mut self, status: &NodeStatus, session: &SessionId) {
        let mine = || {
            status
                .workers
                .iter()
                .filter(|w| w.session.as_ref() == Some(session))
        };
        let serving = mine()
            .filter(|w| matches!(w.state, WorkerState::Idle | WorkerState::Busy))
            .count();
        self.starting += mine().filter(|w| w.state == WorkerState::Starting).count();
        if serving > 0 {
            self.nodes += 1;
            self.workers += serving;
        }
    }
}

/// A session's state as its keep-alive sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionState {
    /// Alive.
    Active,
    /// Unknown to the broker: closed, expired, or lost in a broker restart.
    Gone,
}

/// A job broker: every capability a pool and its nodes use, plus the largest payload it
/// carries. A backend implements the five capability traits and this one; callers hold an
/// `Arc<dyn Broker>` (object-safe) and bring the capabilities they call into scope
/// (`use dc_core::broker::*` or by name).
///
/// Blocking reads (`wait` arguments) return early when something arrives and an empty answer
/// when the wait ends; implementations must never block longer than `wait` plus one round trip.
pub trait Broker:
    SessionControl + JobQueue + UpdateLog + NodeRegistry + Inspect + fmt::Debug + 'static
{
    /// Largest payload (job, result, update, init) this broker accepts, in bytes.
    fn max_payload(&self) -> usize;
}

/// Sessions: at most one active at a time, kept alive by its pool, closed by it or expired.
#[async_trait]
pub trait SessionControl: Send + Sync {
    /// Open a session if none is active; `Ok(None)` when another one is.
    async fn try_open_session(
        &self,
        spec: &SessionSpec,
    ) -> Result<Option<SessionInfo>, BrokerError>;
    /// Keep the session alive (the pool calls this every fraction of the lease). A session not
    /// kept alive for its `lease` period is gone.
    async fn keep_session_alive(&self, session: &SessionId) -> Result<SessionState, BrokerError>;
    /// Close it: drop its queue, results and log; nodes stop its workers.
    async fn close_session(&self, session: &SessionId) -> Result<(), BrokerError>;
    /// The active session, waiting up to `wait` for one to open (nodes ask).
    async fn active_session(&self, wait: Duration) -> Result<Option<SessionInfo>, BrokerError>;
}

/// The job queue: jobs in, leases out, outcomes in, results out once each.
///
/// The lease contract, whatever keeps the leases:
///
/// 1. [`JobQueue::take_jobs`] leases each queued job to one worker of one node, with the job's
///    attempt number (1, 2, …; a job given back unstarted keeps its number). No job is leased
///    twice at once.
/// 2. A lease stays valid for as long as its node's heartbeats ([`NodeRegistry::heartbeat`])
///    list it, each within the session's `lease` period of the last, however long the job
///    runs. A live node's job is never taken away.
/// 3. A lease whose node stops renewing it expires after the `lease` period: the job is queued
///    again, or fails for good once `max_attempts` attempts have failed; it is never dropped.
///    A backend expires leases itself or in [`NodeRegistry::reap_expired`], which pools and
///    nodes call every fraction of the lease.
/// 4. An outcome counts only under the job's current lease: a late result or report under an
///    expired or given-back lease is [`Completion::Discarded`] / [`Abandoned::Stale`].
/// 5. A job gets at most one result, handed to the pool once by [`JobQueue::take_results`].
#[async_trait]
pub trait JobQueue: Send + Sync {
    /// Queue jobs, in order. A job id already submitted to the session is ignored.
    async fn submit(&self, session: &SessionId, jobs: Vec<NewJob>) -> Result<(), BrokerError>;
    /// Lease up to `max` queued jobs for `worker` on `node` at once, in queue order: at least
    /// one when any is queued, waiting up to `wait` for the first. A backend that can watch the
    /// update log too may return early with none when an update is published, so idle workers
    /// apply it sooner. The node runs them one after another; each keeps its own lease and
    /// outcome.
    ///
    /// # Errors
    /// [`BrokerError::SessionGone`] once the session closed.
    async fn take_jobs(
        &self,
        session: &SessionId,
        node: &NodeId,
        worker: &WorkerId,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<LeasedJob>, BrokerError>;
    /// Lease the next job: [`JobQueue::take_jobs`] with `max` 1.
    ///
    /// # Errors
    /// [`BrokerError::SessionGone`] once the session closed.
    async fn take_job(
        &self,
        session: &SessionId,
        node: &NodeId,
        worker: &WorkerId,
        wait: Duration,
    ) -> Result<Option<LeasedJob>, BrokerError> {
        Ok(self
            .take_jobs(session, node, worker, 1, wait)
            .await?
            .into_iter()
            .next())
    }
    /// Record an attempt's outcome: a result (`Ok`) or the worker's error (`Err`, not retried).
    async fn complete(&self, lease: &Lease, outcome: Outcome) -> Result<Completion, BrokerError>;
    /// Record several attempts' outcomes (as [`JobQueue::complete`] each), in one round trip
    /// where the backend can; the answers come in the same order. On an error none, some or
    /// all may be recorded: calling again with the same outcomes is safe (a recorded one is
    /// then [`Completion::Discarded`]).
    async fn complete_many(
        &self,
        outcomes: Vec<(Lease, Outcome)>,
    ) -> Result<Vec<Completion>, BrokerError> {
        let mut answers = Vec::with_capacity(outcomes.len());
        for (lease, outcome) in outcomes {
            answers.push(self.complete(&lease, outcome).await?);
        }
        Ok(answers)
    }
    /// Hand a lease back after a failed attempt; the job is retried or fails for good.
    ///
    /// With [`AttemptEnd::Returned`] the job was never started: it is queued again behind the
    /// jobs already waiting (several returned in one order stay in that order), its next lease
    /// has the same attempt number, and nothing is added to its history. The returned lease is
    /// fenced all the same: a result sent under it is discarded.
    async fn abandon(&self, lease: &Lease, end: AttemptEnd) -> Result<Abandoned, BrokerError>;
    /// Take up to `max` results (each result is handed out once), waiting up to `wait`.
    async fn take_results(
        &self,
        session: &SessionId,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<JobResult>, BrokerError>;
    /// Of `jobs` (submitted to `session`, their results not yet handed out), those the broker
    /// no longer holds in any form: neither queued, leased, nor finished with a result still to
    /// hand out. A backend whose state can be lost or damaged (a server restarted from an old
    /// snapshot, keys changed behind its back) repairs what it can and names the rest, and the
    /// pool submits those again (it keeps their payloads); the default, for a backend that
    /// loses nothing, is none. The pool asks only after a long stretch without any result.
    async fn lost_jobs(
        &self,
        session: &SessionId,
        jobs: &[JobId],
    ) -> Result<Vec<JobId>, BrokerError> {
        let _ = (session, jobs);
        Ok(Vec::new())
    }
}

/// The session's update log: numbered 1, 2, 3… in the order published, replayed from the start
/// by every worker that joins.
#[async_trait]
pub trait UpdateLog: Send + Sync {
    /// Append an update to the session's log; returns its sequence number.
    async fn publish_update(
        &self,
        session: &SessionId,
        payload: Bytes,
    ) -> Result<UpdateSeq, BrokerError>;
    /// Append an update as number `seq` of the session's log, which holds `seq - 1` updates
    /// when it is first called: called again after an answer lost on the way (a connection
    /// dropped), it finds the update there and adds nothing, so a retry never publishes an
    /// update twice. A log that holds fewer than `seq - 1` updates lost some:
    /// [`BrokerError::SessionGone`]. The default, for a backend whose calls cannot fail
    /// halfway, is [`UpdateLog::publish_update`].
    async fn publish_update_at(
        &self,
        session: &SessionId,
        seq: UpdateSeq,
        payload: Bytes,
    ) -> Result<UpdateSeq, BrokerError> {
        let _ = seq;
        self.publish_update(session, payload).await
    }
    /// Updates after `after`, in order, at most `max`.
    async fn read_updates(
        &self,
        session: &SessionId,
        after: UpdateSeq,
        max: usize,
    ) -> Result<Vec<(UpdateSeq, Bytes)>, BrokerError>;
}

/// Nodes: their presence, their leases (see [`JobQueue`] for the contract) and their problems.
#[async_trait]
pub trait NodeRegistry: Send + Sync {
    /// Register or refresh a node, and renew exactly the leases its status lists.
    async fn heartbeat(&self, status: &NodeStatus) -> Result<(), BrokerError>;
    /// A node leaves: its leases go back to the queue now (not counted as failures).
    async fn leave(&self, node: &NodeId) -> Result<(), BrokerError>;
    /// Tell the pool a node cannot serve it.
    async fn report_problem(
        &self,
        session: &SessionId,
        problem: NodeProblem,
    ) -> Result<(), BrokerError>;
    /// Expire the leases not renewed in time (requeue or fail their jobs); returns how many.
    /// Pools and nodes call it every fraction of the lease, so it must be safe from many
    /// callers at once. The default does nothing, for a backend that expires leases itself.
    async fn reap_expired(&self) -> Result<usize, BrokerError> {
        Ok(0)
    }
}

/// What the pool and `status` read about a session and the nodes.
#[async_trait]
pub trait Inspect: Send + Sync {
    /// Counts of workers, nodes and jobs, and reported problems.
    async fn session_stats(&self, session: &SessionId) -> Result<SessionStats, BrokerError>;
    /// Nodes heard from within `within`, with their last status (for status output).
    async fn nodes(&self, within: Duration) -> Result<Vec<NodeSeen>, BrokerError>;
}
