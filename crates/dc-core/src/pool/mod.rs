//! [`Pool`]: what a user's script or service holds to run jobs on the workers.
//!
//! A pool's life, in steps:
//! 1. [`PoolBuilder`] (`builder.rs`) says where the workers are: a head node or a broker URL
//!    (reached through the builder's [`Connector`], `connector.rs`), a broker object, or this
//!    machine (`local.rs`: an in-process broker and node agent spawning worker processes).
//! 2. `connect` opens a session, waiting while another pool is active, and starts the
//!    session's tasks (`session.rs`): the result reader and the keep-alive that renews the
//!    session, resubmits lost jobs and recovers a session the broker lost.
//! 3. `map` and `imap_unordered` (`stream.rs`) encode their jobs off the runtime
//!    (`codec.rs`), route and submit them, and yield results as the reader delivers them.
//! 4. `update_workers` publishes an update into the session's ordered log; jobs submitted
//!    after it run on workers that applied it.
//! 5. `close` (or dropping the pool) ends every waiting call with [`PoolError::Closed`],
//!    closes the session, and stops a local pool's worker processes.

use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::task::JoinHandle;

use crate::agent::AgentHandle;
use crate::broker::{Broker, SessionInfo, SessionStats, UpdateSeq};
use crate::error::{BrokerError, PoolError};
use crate::worker::Worker;

mod builder;
mod codec;
mod connector;
mod local;
mod session;
mod stream;

pub use builder::PoolBuilder;
pub use connector::{Connector, LocalOnly, NetworkTarget, redact_url};

use codec::{off_runtime, to_payload};
use session::Shared;

/// The port a head node's pool server listens on unless told otherwise.
pub const DEFAULT_PORT: u16 = 8899;

/// A pool of workers of kind `W`: submit jobs, read results, broadcast updates.
///
/// How it reaches a head node or broker URL is its builder's [`Connector`] (see
/// [`PoolBuilder::connector`]); users of the facade crate never name it.
///
/// `Pool` is `Send + Sync`: share it in an `Arc`; several `map` / `imap_unordered` calls may run
/// at once, each getting its own results.
pub struct Pool<W: Worker> {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
    agent: tokio::sync::Mutex<Option<AgentHandle>>,
    _worker: PhantomData<fn(W) -> W>,
}

impl<W: Worker> std::fmt::Debug for Pool<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("kind", &W::KIND)
            .field("session", &self.shared.id())
            .field("closed", &self.shared.closed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl<W: Worker> Pool<W> {
    /// Start building a pool whose workers are built with `init`.
    pub fn builder(init: W::Init) -> PoolBuilder<W> {
        PoolBuilder::new(init)
    }

    /// A pool on the session `session` just opened on `broker`; `agent` runs a local pool's
    /// workers.
    fn start(
        broker: Arc<dyn Broker>,
        session: SessionInfo,
        agent: Option<AgentHandle>,
        outage_timeout: Duration,
    ) -> Self {
        tracing::info!(session = %session.id, kind = %session.spec.kind, "pool session open");
        let shared = Shared::new(broker, session, outage_timeout);
        let tasks = shared.spawn_tasks();
        Pool {
            shared,
            tasks,
            agent: tokio::sync::Mutex::new(agent),
            _worker: PhantomData,
        }
    }

    /// The session id of this pool now (for logs and `dc-cli status`; it changes if the
    /// broker lost the session and the pool reopened it).
    pub fn session_id(&self) -> String {
        self.shared.id().0
    }

    fn check_open(&self) -> Result<(), PoolError> {
        if self.shared.closed.load(Ordering::Acquire) {
            Err(PoolError::Closed)
        } else {
            Ok(())
        }
    }

    /// Run every job; outputs come back in input order.
    ///
    /// # Errors
    /// The first job that failed for good ([`PoolError::Job`] with its index), or a pool-wide
    /// error (closed, broker lost, no worker can run this kind).
    pub async fn map<I>(&self, jobs: I) -> Result<Vec<W::Output>, PoolError>
    where
        I: IntoIterator<Item = W::Job>,
        W::Output: Send,
    {
        let mut stream = self.imap_unordered(jobs);
        let mut slots: Vec<Option<W::Output>> = Vec::new();
        while let Some(item) = stream.next().await {
            let (index, output) = item?;
            if slots.len() <= index {
                slots.resize_with(index + 1, || None);
            }
            slots[index] = Some(output);
        }
        slots
            .into_iter()
            .enumerate()
            .map(|(i, o)| {
                o.ok_or_else(|| {
                    PoolError::Broker(BrokerError::Protocol(
                        format!("no result for job {i}").into(),
                    ))
                })
            })
            .collect()
    }

    /// Run every job; yields `(index, output)` as results arrive, and a failed job as an
    /// `Err` item without stopping the rest.
    ///
    /// The jobs are taken from `jobs` now; when the stream is first polled they are encoded (on
    /// a blocking thread, as are big outputs decoded: a big payload's CPU time never holds up
    /// the runtime) and submitted. The stream is
    /// `Send + Unpin + 'static`: poll it with `next()` directly, store it, or move it into a
    /// spawned task. Dropping it stops listening; jobs already queued still run.
    pub fn imap_unordered<I>(
        &self,
        jobs: I,
    ) -> BoxStream<'static, Result<(usize, W::Output), PoolError>>
    where
        I: IntoIterator<Item = W::Job>,
        W::Output: Send,
    {
        let jobs: Vec<W::Job> = jobs.into_iter().collect();
        stream::imap_unordered::<W>(self.shared.clone(), jobs)
    }

    /// Broadcast an update to every worker, in order: each applies it between jobs (at once
    /// when idle), and workers that start later replay it before their first job. Jobs
    /// submitted after this call run on workers that applied it.
    ///
    /// A broker that cannot be reached is waited for (see
    /// [`PoolBuilder::broker_outage_timeout`]); the update is published once all the same.
    ///
    /// # Errors
    /// [`PoolError::Closed`], [`PoolError::PayloadTooLarge`], [`PoolError::Unreachable`] after
    /// the outage timeout, or a broker error.
    pub async fn update_workers(&self, update: W::Update) -> Result<(), PoolError> {
        self.check_open()?;
        let limit = self.shared.broker.max_payload();
        let payload = off_runtime(move || to_payload(&update, limit, "update")).await??;
        let mut log = self.shared.updates.lock().await;
        let seq = loop {
            let session = self.shared.id();
            // Its place in the log: a retry after an answer lost on the way finds it there.
            let at = log.len() as UpdateSeq + 1;
            let published = self
                .shared
                .ride_out(false, || {
                    self.shared
                        .broker
                        .publish_update_at(&session, at, payload.clone())
                })
                .await;
            match published {
                Ok(seq) => break seq,
                Err(PoolError::Broker(BrokerError::SessionGone(_)))
                    if !self.shared.closed.load(Ordering::Acquire) =>
                {
                    // Recover here (the log lock is ours), then publish into the new session.
                    drop(log);
                    self.shared.recover(&session).await;
                    log = self.shared.updates.lock().await;
                }
                Err(e) => return Err(e),
            }
        };
        log.push(payload);
        self.shared.update_seq.fetch_max(seq, Ordering::AcqRel);
        Ok(())
    }

    /// Worker processes serving this pool now (ready or busy).
    ///
    /// # Errors
    /// [`PoolError::Closed`], [`PoolError::Unreachable`] after the outage timeout, or a broker
    /// error.
    pub async fn workers_count(&self) -> Result<usize, PoolError> {
        Ok(self.stats_now().await?.workers)
    }

    /// Nodes (machines) serving this pool now.
    ///
    /// # Errors
    /// [`PoolError::Closed`], [`PoolError::Unreachable`] after the outage timeout, or a broker
    /// error.
    pub async fn nodes_count(&self) -> Result<usize, PoolError> {
        Ok(self.stats_now().await?.nodes)
    }

    /// The session's counts, riding out a broker outage (and the loss of the session that
    /// may come with it: the pool reopens it, and the counts are those of the new one).
    async fn stats_now(&self) -> Result<SessionStats, PoolError> {
        self.check_open()?;
        loop {
            let session = self.shared.id();
            let stats = self
                .shared
                .ride_out(false, || self.shared.broker.session_stats(&session))
                .await;
            match stats {
                Err(PoolError::Broker(BrokerError::SessionGone(_)))
                    if !self.shared.closed.load(Ordering::Acquire) =>
                {
                    self.shared.recover(&session).await;
                }
                other => return other,
            }
        }
    }

    /// Close the pool: abort active jobs, release the workers (a local pool stops its worker
    /// processes). Calls still waiting get [`PoolError::Closed`]. Closing twice is fine.
    ///
    /// # Errors
    /// A broker error while closing the session, or [`PoolError::Unreachable`] when the broker
    /// stayed out of reach for the outage timeout (the pool is closed on this side anyway).
    pub async fn close(&self) -> Result<(), PoolError> {
        if self.shared.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        for task in &self.tasks {
            task.abort();
        }
        self.shared.abort_all(&PoolError::Closed);
        let session = self.shared.id();
        let closed = self
            .shared
            .ride_out(true, || self.shared.broker.close_session(&session))
            .await;
        if let Some(agent) = self.agent.lock().await.take() {
            agent.shutdown().await;
        }
        tracing::info!(session = %self.shared.id(), "pool closed");
        closed
    }

    /// Pids of this local pool's worker processes (empty for a pool on a server).
    pub async fn local_worker_pids(&self) -> Vec<u32> {
        self.agent
            .lock()
            .await
            .as_ref()
            .map(AgentHandle::worker_pids)
            .unwrap_or_default()
    }
}

impl<W: Worker> Drop for Pool<W> {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        if self.shared.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        self.shared.abort_all(&PoolError::Closed);
        // Best effort: close the session so the next pool need not wait for it to expire.
        // A local agent stops by itself once its handle (dropped with us) is gone.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let shared = self.shared.clone();
            rt.spawn(async move {
                let _ = shared.broker.close_session(&shared.id()).await;
            });
        }
    }
}
