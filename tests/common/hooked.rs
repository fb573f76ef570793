//! A broker that runs test hooks around some calls (takes, result reads, reports) and passes
//! every call on to another broker: a test slows, holds or counts those calls without a backend
//! of its own.

use distributed_computing::broker::{Inspect, JobQueue, NodeRegistry, SessionControl, UpdateLog};
use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use distributed_computing::broker::{
    Abandoned, AttemptEnd, Completion, JobId, JobResult, Lease, LeasedJob, NewJob, NodeId,
    NodeProblem, NodeSeen, NodeStatus, Outcome, SessionId, SessionInfo, SessionSpec, SessionState,
    SessionStats, UpdateSeq, WorkerId,
};
use distributed_computing::{Broker, BrokerError};

/// What a test does around the calls it watches. Each hook runs before its call; what a hook
/// returns is held until the call answers (a guard that counts calls in flight, say).
#[async_trait::async_trait]
pub trait Hooks: std::fmt::Debug + Send + Sync + 'static {
    /// Before `take_jobs` (and so `take_job`).
    async fn take(&self) -> Box<dyn Any + Send> {
        Box::new(())
    }
    /// Before `take_results`.
    async fn read_results(&self) -> Box<dyn Any + Send> {
        Box::new(())
    }
    /// Before `complete` and `complete_many`.
    async fn report(&self) -> Box<dyn Any + Send> {
        Box::new(())
    }
}

/// `inner` with `hooks` around the calls they watch.
#[derive(Debug)]
pub struct Hooked<H> {
    pub inner: Arc<dyn Broker>,
    pub hooks: H,
}

type BrokerResult<T> = Result<T, BrokerError>;

impl<H: Hooks> Broker for Hooked<H> {
    fn max_payload(&self) -> usize {
        self.inner.max_payload()
    }
}

#[async_trait::async_trait]
impl<H: Hooks> SessionControl for Hooked<H> {
    async fn try_open_session(&self, spec: &SessionSpec) -> BrokerResult<Option<SessionInfo>> {
        self.inner.try_open_session(spec).await
    }
    async fn keep_session_alive(&self, session: &SessionId) -> BrokerResult<SessionState> {
        self.inner.keep_session_alive(session).await
    }
    async fn close_session(&self, session: &SessionId) -> BrokerResult<()> {
        self.inner.close_session(session).await
    }
    async fn active_session(&self, wait: Duration) -> BrokerResult<Option<SessionInfo>> {
        self.inner.active_session(wait).await
    }
}

#[async_trait::async_trait]
impl<H: Hooks> JobQueue for Hooked<H> {
    async fn submit(&self, session: &SessionId, jobs: Vec<NewJob>) -> BrokerResult<()> {
        self.inner.submit(session, jobs).await
    }
    async fn take_results(
        &self,
        session: &SessionId,
        max: usize,
        wait: Duration,
    ) -> BrokerResult<Vec<JobResult>> {
        let _held = self.hooks.read_results().await;
        self.inner.take_results(session, max, wait).await
    }
    async fn lost_jobs(&self, session: &SessionId, jobs: &[JobId]) -> BrokerResult<Vec<JobId>> {
        self.inner.lost_jobs(session, jobs).await
    }
    async fn take_jobs(
        &self,
        session: &SessionId,
        node: &NodeId,
        worker: &WorkerId,
        max: usize,
        wait: Duration,
    ) -> BrokerResult<Vec<LeasedJob>> {
        let _held = self.hooks.take().await;
        self.inner.take_jobs(session, node, worker, max, wait).await
    }
    async fn complete(&self, lease: &Lease, outcome: Outcome) -> BrokerResult<Completion> {
        let _held = self.hooks.report().await;
        self.inner.complete(lease, outcome).await
    }
    async fn complete_many(
        &self,
        outcomes: Vec<(Lease, Outcome)>,
    ) -> BrokerResult<Vec<Completion>> {
        let _held = self.hooks.report().await;
        self.inner.complete_many(outcomes).await
    }
    async fn abandon(&self, lease: &Lease, end: AttemptEnd) -> BrokerResult<Abandoned> {
        self.inner.abandon(lease, end).await
    }
}

#[async_trait::async_trait]
impl<H: Hooks> UpdateLog for Hooked<H> {
    async fn publish_update(
        &self,
        session: &SessionId,
        payload: bytes::Bytes,
    ) -> BrokerResult<UpdateSeq> {
        self.inner.publish_update(session, payload).await
    }
    async fn publish_update_at(
        &self,
        session: &SessionId,
        seq: UpdateSeq,
        payload: bytes::Bytes,
    ) -> BrokerResult<UpdateSeq> {
        self.inner.publish_update_at(session, seq, payload).await
    }
    async fn read_updates(
        &self,
        session: &SessionId,
        after: UpdateSeq,
        max: usize,
    ) -> BrokerResult<Vec<(UpdateSeq, bytes::Bytes)>> {
        self.inner.read_updates(session, after, max).await
    }
}

#[async_trait::async_trait]
impl<H: Hooks> NodeRegistry for Hooked<H> {
    async fn reap_expired(&self) -> BrokerResult<usize> {
        self.inner.reap_expired().await
    }
    async fn heartbeat(&self, status: &NodeStatus) -> BrokerResult<()> {
        self.inner.heartbeat(status).await
    }
    async fn leave(&self, node: &NodeId) -> BrokerResult<()> {
        self.inner.leave(node).await
    }
    async fn report_problem(&self, session: &SessionId, problem: NodeProblem) -> BrokerResult<()> {
        self.inner.report_problem(session, problem).await
    }
}

#[async_trait::async_trait]
impl<H: Hooks> Inspect for Hooked<H> {
    async fn session_stats(&self, session: &SessionId) -> BrokerResult<SessionStats> {
        self.inner.session_stats(session).await
    }
    async fn nodes(&self, within: Duration) -> BrokerResult<Vec<NodeSeen>> {
        self.inner.nodes(within).await
    }
}
