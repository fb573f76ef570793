//! [`AmqpBroker`]: the capability traits over RabbitMQ. A call about the session this
//! process hosts goes straight to the host; any other goes to the hosting pool as a request.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use dc_core::broker::{
    Abandoned, Completion, Inspect, JobId, JobQueue, JobResult, Lease, LeasedJob, NewJob, NodeId,
    NodeProblem, NodeRegistry, NodeSeen, NodeStatus, Outcome, SessionControl, SessionId,
    SessionInfo, SessionSpec, SessionState, SessionStats, UpdateLog, UpdateSeq, WorkerId,
};
use dc_core::util::lock;
use dc_core::{Broker, BrokerError, LocalBroker};
use lapin::tcp::OwnedTLSConfig;
use serde_bytes::ByteBuf;

use crate::AmqpOptions;
use crate::host::Host;
use crate::link::{Link, Target};
use crate::names::{Names, valid_namespace};
use crate::registry::Registry;
use crate::wire::{Call, Reply, WireAbandoned, decode_off, encode_off, max_message, unexpected};

/// Most outcomes reported in one request (their leases must fit beside the payloads).
const COMPLETIONS_PER_CALL: usize = 1000;
/// How often a node looks for a session to open while it waits for one.
const LOOK_EVERY: Duration = Duration::from_millis(250);

/// A RabbitMQ broker connection (cheap to clone; clones share it).
#[derive(Debug, Clone)]
pub struct AmqpBroker {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    link: Arc<Link>,
    names: Names,
    registry: Registry,
    host: std::sync::Mutex<Option<Arc<Host>>>,
    /// Held while a session opens: two opens at once on one connection would both get the
    /// lock (an exclusive queue is exclusive to a connection, not a caller).
    opening: tokio::sync::Mutex<()>,
    max_payload: usize,
}

fn gone(session: &SessionId) -> BrokerError {
    BrokerError::SessionGone(session.to_string())
}

impl AmqpBroker {
    /// Connect to RabbitMQ at `url` (`amqp://user:password@host:5672/vhost`, or `amqps://`
    /// for TLS; the vhost `/` is written `%2f`).
    ///
    /// # Errors
    /// [`BrokerError::UnsupportedUrl`] for another scheme or a bad namespace,
    /// [`BrokerError::Auth`] for refused credentials, [`BrokerError::Connection`] when RabbitMQ
    /// cannot be reached.
    pub async fn connect(url: &str, options: &AmqpOptions) -> Result<Self, BrokerError> {
        if !crate::is_amqp_url(url) {
            return Err(BrokerError::UnsupportedUrl(format!(
                "{}: not an amqp:// or amqps:// URL",
                dc_core::redact_url(url)
            )));
        }
        if !valid_namespace(&options.namespace) {
            return Err(BrokerError::UnsupportedUrl(format!(
                "namespace {:?}: use 1 to 64 of A-Z a-z 0-9 _ . - (not starting with amq.)",
                options.namespace
            )));
        }
        let mut tls = OwnedTLSConfig::default();
        if let Some(path) = &options.tls_ca {
            let pem = std::fs::read_to_string(path).map_err(|e| {
                BrokerError::Connection(dc_core::Cause::with_source(
                    format!("cannot read the CA file {}", path.display()),
                    e,
                ))
            })?;
            tls.cert_chain = Some(pem);
        }
        let max_payload = LocalBroker::new().max_payload();
        let link = Arc::new(Link::new(
            Target {
                url: url.to_string(),
                tls,
                connect_timeout: options.connect_timeout,
            },
            max_message(max_payload),
        ));
        link.conn().await?;
        let names = Names::new(&options.namespace);
        Ok(AmqpBroker {
            inner: Arc::new(Inner {
                link,
                registry: Registry::new(names.clone()),
                names,
                host: std::sync::Mutex::new(None),
                opening: tokio::sync::Mutex::new(()),
                max_payload,
            }),
        })
    }

    /// Delete what this namespace keeps in RabbitMQ between sessions (the node registry
    /// stream). Everything else this backend declares disappears with its connection.
    ///
    /// # Errors
    /// When RabbitMQ cannot be reached.
    pub async fn remove_namespace(&self) -> Result<(), BrokerError> {
        self.inner.registry.delete(&self.inner.link).await
    }

    /// Close the connection; a session this process hosts ends with it.
    pub async fn close(&self) {
        let host = lock(&self.inner.host).take();
        if let Some(host) = host {
            host.close().await;
        }
        self.inner.link.close().await;
    }

    /// The host of `session`, when this process hosts it.
    fn hosted(&self, session: &SessionId) -> Option<Arc<Host>> {
        lock(&self.inner.host)
            .as_ref()
            .filter(|h| h.is_active() && h.info.id == *session)
            .cloned()
    }

    /// Send a request to the hosting pool: `Ok(None)` when no pool hosts a session.
    async fn call(&self, call: Call) -> Result<Option<Reply>, BrokerError> {
        let wait = call.wait();
        let big_answer = call.big_answer();
        let big = call.payload_bytes() > crate::link::BULK;
        let body = encode_off(call, big).await?;
        let names = &self.inner.names;
        let Some(bytes) = self
            .inner
            .link
            .call(
                &names.session(),
                &names.session_bulk(),
                &body,
                wait,
                big_answer,
            )
            .await?
        else {
            return Ok(None);
        };
        match decode_off::<Reply>("an answer from the pool", bytes).await? {
            Reply::Error(e) => Err(e.into()),
            reply => Ok(Some(reply)),
        }
    }

    /// A request about `session`: no host means the session is gone.
    async fn call_for(&self, session: &SessionId, call: Call) -> Result<Reply, BrokerError> {
        self.call(call).await?.ok_or_else(|| gone(session))
    }

    fn check_size(&self, len: usize) -> Result<(), BrokerError> {
        if len > self.inner.max_payload {
            return Err(BrokerError::PayloadTooLarge {
                size: len,
                limit: self.inner.max_payload,
            });
        }
        Ok(())
    }

    /// Keep `node`'s presence queue declared while this process runs it.
    async fn present(&self, node: &NodeId) -> Result<(), BrokerError> {
        self.inner
            .link
            .keep_present(&self.inner.names.presence(node))
            .await
    }
}

fn wait_ms(wait: Duration) -> u64 {
    u64::try_from(wait.as_millis()).unwrap_or(u64::MAX)
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl Broker for AmqpBroker {
    fn max_payload(&self) -> usize {
        self.inner.max_payload
    }
}

#[async_trait]
impl SessionControl for AmqpBroker {
    async fn try_open_session(
        &self,
        spec: &SessionSpec,
    ) -> Result<Option<SessionInfo>, BrokerError> {
        self.check_size(spec.init.len())?;
        let _opening = self.inner.opening.lock().await;
        let previous = lock(&self.inner.host).clone();
        if let Some(previous) = previous {
            if previous.is_active() {
                return Ok(None);
            }
            // This process's last session ended: its queues go before new ones are claimed.
            previous.halt().await;
        }
        let Some(host) =
            Host::open(self.inner.link.clone(), self.inner.names.clone(), spec).await?
        else {
            return Ok(None);
        };
        let info = host.info.clone();
        *lock(&self.inner.host) = Some(host);
        Ok(Some(info))
    }
    async fn keep_session_alive(&self, session: &SessionId) -> Result<SessionState, BrokerError> {
        if let Some(host) = self.hosted(session) {
            return host.local.keep_session_alive(session).await;
        }
        let hosted_here = lock(&self.inner.host)
            .as_ref()
            .is_some_and(|h| h.info.id == *session);
        if hosted_here {
            // Hosted here and over (expired, or the lock was lost while RabbitMQ was away).
            return Ok(SessionState::Gone);
        }
        match self
            .call(Call::KeepAlive {
                session: session.clone(),
            })
            .await?
        {
            None | Some(Reply::Alive(false)) => Ok(SessionState::Gone),
            Some(Reply::Alive(true)) => Ok(SessionState::Active),
            Some(other) => Err(unexpected(&other)),
        }
    }
    async fn close_session(&self, session: &SessionId) -> Result<(), BrokerError> {
        let host = {
            let mut slot = lock(&self.inner.host);
            match slot.as_ref() {
                Some(h) if h.info.id == *session => slot.take(),
                _ => None,
            }
        };
        if let Some(host) = host {
            host.close().await;
            return Ok(());
        }
        match self
            .call(Call::Close {
                session: session.clone(),
            })
            .await?
        {
            None | Some(Reply::Done) => Ok(()),
            Some(other) => Err(unexpected(&other)),
        }
    }
    async fn active_session(&self, wait: Duration) -> Result<Option<SessionInfo>, BrokerError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let hosted = lock(&self.inner.host)
                .as_ref()
                .filter(|h| h.is_active())
                .map(|h| h.info.clone());
            if hosted.is_some() {
                return Ok(hosted);
            }
            match self.call(Call::Describe).await? {
                Some(Reply::Session(Some(info))) => return Ok(Some(info)),
                None | Some(Reply::Session(None)) => {}
                Some(other) => return Err(unexpected(&other)),
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(LOOK_EVERY.min(deadline - now)).await;
        }
    }
}

#[async_trait]
impl JobQueue for AmqpBroker {
    async fn submit(&self, session: &SessionId, jobs: Vec<NewJob>) -> Result<(), BrokerError> {
        for job in &jobs {
            self.check_size(job.payload.len())?;
        }
        if let Some(host) = self.hosted(session) {
            return host.local.submit(session, jobs).await;
        }
        let call = Call::Submit {
            session: session.clone(),
            jobs: jobs.into_iter().map(Into::into).collect(),
        };
        match self.call_for(session, call).await? {
            Reply::Done => Ok(()),
            other => Err(unexpected(&other)),
        }
    }
    async fn take_jobs(
        &self,
        session: &SessionId,
        node: &NodeId,
        worker: &WorkerId,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<LeasedJob>, BrokerError> {
        self.present(node).await?;
        if let Some(host) = self.hosted(session) {
            return host.local.take_jobs(session, node, worker, max, wait).await;
        }
        let call = Call::TakeJobs {
            session: session.clone(),
            node: node.clone(),
            worker: worker.clone(),
            max: count(max),
            wait_ms: wait_ms(wait),
        };
        match self.call_for(session, call).await? {
            Reply::Leased(jobs) => Ok(jobs.into_iter().map(Into::into).collect()),
            other => Err(unexpected(&other)),
        }
    }
    async fn complete(&self, lease: &Lease, outcome: Outcome) -> Result<Completion, BrokerError> {
        let mut answers = self.complete_many(vec![(lease.clone(), outcome)]).await?;
        answers
            .pop()
            .ok_or_else(|| BrokerError::Protocol("the pool answered no completion".into()))
    }
    async fn complete_many(
        &self,
        outcomes: Vec<(Lease, Outcome)>,
    ) -> Result<Vec<Completion>, BrokerError> {
        let Some(session) = outcomes.first().map(|(l, _)| l.session.clone()) else {
            return Ok(Vec::new());
        };
        for (_, outcome) in &outcomes {
            if let Ok(bytes) = outcome {
                self.check_size(bytes.len())?;
            }
        }
        if let Some(host) = self.hosted(&session) {
            return host.local.complete_many(outcomes).await;
        }
        // In calls of bounded size: a request must stay under what the host takes in.
        let mut answers = Vec::with_capacity(outcomes.len());
        let mut batch = Vec::new();
        let mut bytes = 0;
        for (lease, outcome) in outcomes {
            let len = outcome.as_ref().map_or(0, Bytes::len);
            if !batch.is_empty()
                && (bytes + len > self.inner.max_payload / 2 || batch.len() >= COMPLETIONS_PER_CALL)
            {
                answers.extend(
                    self.send_completions(&session, std::mem::take(&mut batch))
                        .await?,
                );
                bytes = 0;
            }
            bytes += len;
            batch.push((lease, outcome));
        }
        if !batch.is_empty() {
            answers.extend(self.send_completions(&session, batch).await?);
        }
        Ok(answers)
    }
    async fn abandon(
        &self,
        lease: &Lease,
        end: dc_core::broker::AttemptEnd,
    ) -> Result<Abandoned, BrokerError> {
        if let Some(host) = self.hosted(&lease.session) {
            return host.local.abandon(lease, end).await;
        }
        let call = Call::Abandon {
            lease: lease.clone(),
            end,
        };
        match self.call_for(&lease.session, call).await? {
            Reply::Abandoned(WireAbandoned::Requeued) => Ok(Abandoned::Requeued),
            Reply::Abandoned(WireAbandoned::Failed) => Ok(Abandoned::Failed),
            Reply::Abandoned(WireAbandoned::Stale) => Ok(Abandoned::Stale),
            other => Err(unexpected(&other)),
        }
    }
    async fn take_results(
        &self,
        session: &SessionId,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<JobResult>, BrokerError> {
        if let Some(host) = self.hosted(session) {
            return host.local.take_results(session, max, wait).await;
        }
        let call = Call::TakeResults {
            session: session.clone(),
            max: count(max),
            wait_ms: wait_ms(wait),
        };
        match self.call_for(session, call).await? {
            Reply::Results(results) => Ok(results.into_iter().map(Into::into).collect()),
            other => Err(unexpected(&other)),
        }
    }
    async fn lost_jobs(
        &self,
        session: &SessionId,
        jobs: &[JobId],
    ) -> Result<Vec<JobId>, BrokerError> {
        if let Some(host) = self.hosted(session) {
            return host.local.lost_jobs(session, jobs).await;
        }
        let call = Call::LostJobs {
            session: session.clone(),
            jobs: jobs.to_vec(),
        };
        match self.call_for(session, call).await? {
            Reply::Jobs(lost) => Ok(lost),
            other => Err(unexpected(&other)),
        }
    }
}

#[async_trait]
impl UpdateLog for AmqpBroker {
    async fn publish_update(
        &self,
        session: &SessionId,
        payload: Bytes,
    ) -> Result<UpdateSeq, BrokerError> {
        self.publish(session, None, payload).await
    }
    async fn publish_update_at(
        &self,
        session: &SessionId,
        seq: UpdateSeq,
        payload: Bytes,
    ) -> Result<UpdateSeq, BrokerError> {
        self.publish(session, Some(seq), payload).await
    }
    async fn read_updates(
        &self,
        session: &SessionId,
        after: UpdateSeq,
        max: usize,
    ) -> Result<Vec<(UpdateSeq, Bytes)>, BrokerError> {
        if let Some(host) = self.hosted(session) {
            return host.local.read_updates(session, after, max).await;
        }
        let call = Call::ReadUpdates {
            session: session.clone(),
            after,
            max: count(max),
        };
        match self.call_for(session, call).await? {
            Reply::Updates(updates) => Ok(updates
                .into_iter()
                .map(|(seq, b)| (seq, Bytes::from(b.into_vec())))
                .collect()),
            other => Err(unexpected(&other)),
        }
    }
}

impl AmqpBroker {
    /// One `Complete` request to the host; the answers in the same order.
    async fn send_completions(
        &self,
        session: &SessionId,
        outcomes: Vec<(Lease, Outcome)>,
    ) -> Result<Vec<Completion>, BrokerError> {
        let n = outcomes.len();
        let call = Call::Complete {
            outcomes: outcomes
                .into_iter()
                .map(|(lease, o)| (lease, o.into()))
                .collect(),
        };
        match self.call_for(session, call).await? {
            Reply::Completions(answers) if answers.len() == n => Ok(answers
                .into_iter()
                .map(|accepted| {
                    if accepted {
                        Completion::Accepted
                    } else {
                        Completion::Discarded
                    }
                })
                .collect()),
            other => Err(unexpected(&other)),
        }
    }

    async fn publish(
        &self,
        session: &SessionId,
        seq: Option<UpdateSeq>,
        payload: Bytes,
    ) -> Result<UpdateSeq, BrokerError> {
        self.check_size(payload.len())?;
        if let Some(host) = self.hosted(session) {
            return match seq {
                Some(seq) => host.local.publish_update_at(session, seq, payload).await,
                None => host.local.publish_update(session, payload).await,
            };
        }
        let call = Call::PublishUpdate {
            session: session.clone(),
            seq,
            payload: ByteBuf::from(Vec::from(payload)),
        };
        match self.call_for(session, call).await? {
            Reply::Seq(seq) => Ok(seq),
            other => Err(unexpected(&other)),
        }
    }
}

#[async_trait]
impl NodeRegistry for AmqpBroker {
    async fn heartbeat(&self, status: &NodeStatus) -> Result<(), BrokerError> {
        self.present(&status.node).await?;
        self.inner
            .registry
            .heartbeat(&self.inner.link, status)
            .await?;
        let host = lock(&self.inner.host)
            .as_ref()
            .filter(|h| h.is_active())
            .cloned();
        if let Some(host) = host {
            return host.local.heartbeat(status).await;
        }
        match self
            .call(Call::Heartbeat {
                status: status.clone(),
            })
            .await?
        {
            None | Some(Reply::Done) => Ok(()),
            Some(other) => Err(unexpected(&other)),
        }
    }
    async fn leave(&self, node: &NodeId) -> Result<(), BrokerError> {
        self.inner.registry.left(&self.inner.link, node).await?;
        let host = lock(&self.inner.host)
            .as_ref()
            .filter(|h| h.is_active())
            .cloned();
        if let Some(host) = host {
            host.local.leave(node).await?;
        } else {
            match self.call(Call::Leave { node: node.clone() }).await? {
                None | Some(Reply::Done) => {}
                Some(other) => return Err(unexpected(&other)),
            }
        }
        self.inner
            .link
            .drop_presence(&self.inner.names.presence(node))
            .await;
        Ok(())
    }
    async fn report_problem(
        &self,
        session: &SessionId,
        problem: NodeProblem,
    ) -> Result<(), BrokerError> {
        if let Some(host) = self.hosted(session) {
            return host.local.report_problem(session, problem).await;
        }
        let call = Call::Problem {
            session: session.clone(),
            problem,
        };
        match self.call_for(session, call).await? {
            Reply::Done => Ok(()),
            other => Err(unexpected(&other)),
        }
    }
    /// The hosting pool expires leases itself, several times a second.
    async fn reap_expired(&self) -> Result<usize, BrokerError> {
        Ok(0)
    }
}

#[async_trait]
impl Inspect for AmqpBroker {
    async fn session_stats(&self, session: &SessionId) -> Result<SessionStats, BrokerError> {
        if let Some(host) = self.hosted(session) {
            return host.local.session_stats(session).await;
        }
        let call = Call::Stats {
            session: session.clone(),
        };
        match self.call_for(session, call).await? {
            Reply::Stats(stats) => Ok(stats.into()),
            other => Err(unexpected(&other)),
        }
    }
    async fn nodes(&self, within: Duration) -> Result<Vec<NodeSeen>, BrokerError> {
        self.inner.registry.nodes(&self.inner.link, within).await
    }
}
