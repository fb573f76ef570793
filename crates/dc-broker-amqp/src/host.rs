//! The pool side: the process that opened the session holds its whole state (job table,
//! attempts, leases, results, update log) and answers the nodes' requests.
//!
//! RabbitMQ runs no code of ours, so the rules that need one decider (a job leased once, the
//! first result wins, a late result of an expired attempt is fenced) are decided here, by the
//! same in-memory broker a local pool uses. RabbitMQ gives the rest: the session's queue,
//! declared exclusive, is the lock that lets one pool at a time in (and frees itself when the
//! pool's connection closes); each node's presence queue vanishes with its connection, which
//! tells the host at once that a node's process is gone.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use dc_core::broker::{
    Abandoned, Completion, Inspect, JobQueue, NodeId, NodeRegistry, SessionControl, SessionInfo,
    SessionSpec, SessionState, UpdateLog, WorkerId,
};
use dc_core::util::lock;
use dc_core::{Broker, BrokerError, LocalBroker};
use futures::StreamExt;
use lapin::options::QueueDeleteOptions;
use lapin::types::FieldTable;
use tokio::sync::{Notify, OnceCell};

use crate::link::{Conn, Link, RESOURCE_LOCKED, Routed, amqp_code, broken, exclusive, take_all};
use crate::names::Names;
use crate::wire::{
    Assembler, Call, Reply, WireAbandoned, decode_off, encode, encode_off, leased_bytes,
    max_message, result_bytes,
};

/// How often the host expires leases and checks its session's own keep-alive.
const TICK: Duration = Duration::from_millis(200);
/// How often the host checks that the nodes holding leases are still connected.
const PROBE_EVERY: Duration = Duration::from_millis(500);
/// Checks in a row that must find a node's presence queue gone before its leases end.
const PROBE_MISSES: u32 = 3;
/// After the host's own connection comes back, nodes get this long to come back too before
/// their presence counts.
const RECONNECT_GRACE: Duration = Duration::from_secs(10);
/// Longest wait a request may ask for.
const MAX_WAIT: Duration = Duration::from_secs(60);
/// Most jobs, results or updates one request may ask for.
const MAX_ITEMS: u32 = 100_000;

/// A session hosted by this process.
#[derive(Debug)]
pub(crate) struct Host {
    pub(crate) local: LocalBroker,
    pub(crate) info: SessionInfo,
    link: Arc<Link>,
    names: Names,
    stopped: AtomicBool,
    stop: Notify,
    /// Whether the session's queues were deleted (the lock freed).
    released: tokio::sync::Mutex<bool>,
    /// The last take of each worker: a request sent again after a lost answer gets the same
    /// jobs instead of leasing more.
    takes: std::sync::Mutex<HashMap<WorkerId, LastTake>>,
    /// Leases whose jobs went out in a big answer and that no heartbeat has listed yet.
    in_transit: std::sync::Mutex<std::collections::HashSet<dc_core::broker::Lease>>,
}

impl Host {
    /// Take the session lock and open a session; `Ok(None)` when another pool holds it.
    pub(crate) async fn open(
        link: Arc<Link>,
        names: Names,
        spec: &SessionSpec,
    ) -> Result<Option<Arc<Host>>, BrokerError> {
        let conn = link.conn().await?;
        let Some(channel) = claim(&conn, &names).await? else {
            return Ok(None);
        };
        let bulk_channel = match claim_bulk(&link, &names).await {
            Ok(ch) => ch,
            Err(e) => {
                // Free the lock again: a session without its bulk queue cannot serve.
                let _ = channel
                    .queue_delete(names.session().into(), QueueDeleteOptions::default())
                    .await;
                return Err(e);
            }
        };
        let local = LocalBroker::with_session_prefix(format!("a{:016x}", random()));
        let info = local
            .try_open_session(spec)
            .await?
            .ok_or_else(|| BrokerError::Protocol("a fresh session store was busy".into()))?;
        let host = Arc::new(Host {
            local,
            info,
            link,
            names,
            stopped: AtomicBool::new(false),
            stop: Notify::new(),
            released: tokio::sync::Mutex::new(false),
            takes: std::sync::Mutex::new(HashMap::new()),
            in_transit: std::sync::Mutex::new(std::collections::HashSet::new()),
        });
        tokio::spawn(host.clone().serve(Lane::Control, channel));
        tokio::spawn(host.clone().serve(Lane::Bulk, bulk_channel));
        tokio::spawn(host.clone().tick());
        Ok(Some(host))
    }

    /// Whether this host still serves its session.
    pub(crate) fn is_active(&self) -> bool {
        !self.stopped.load(Ordering::Acquire)
    }

    /// End the session: drop its state and free the lock.
    pub(crate) async fn close(&self) {
        self.halt().await;
        let _ = self.local.close_session(&self.info.id).await;
    }

    /// Stop serving and free the lock (delete the session's queues). A second caller waits
    /// until the first has freed it, so a new session of this process never claims queues
    /// that are about to be deleted.
    pub(crate) async fn halt(&self) {
        self.stopped.store(true, Ordering::Release);
        let mut released = self.released.lock().await;
        if !*released {
            // The queues go first: their consumers are cancelled after what was delivered
            // (each request already taken is answered), and a request sent from now on comes
            // back unroutable at once instead of waiting in a queue nobody reads.
            for (conn, queue) in [
                (self.link.current_bulk().await, self.names.session_bulk()),
                (self.link.current().await, self.names.session()),
            ] {
                if let Some(conn) = conn
                    && let Ok(ch) = conn.channel().await
                {
                    let _ = ch
                        .queue_delete(queue.into(), QueueDeleteOptions::default())
                        .await;
                    let _ = ch.close(200, "session closed".into()).await;
                }
            }
            *released = true;
        }
        drop(released);
        self.stop.notify_waiters();
    }

    /// Take requests from one of the session's queues until the session ends, taking the
    /// queue again after a lost connection (and giving up the session if another pool took
    /// the lock meanwhile).
    async fn serve(self: Arc<Self>, lane: Lane, first: lapin::Channel) {
        let mut channel = Some(first);
        let limit = max_message(self.local.max_payload());
        let queue = match lane {
            Lane::Control => self.names.session(),
            Lane::Bulk => self.names.session_bulk(),
        };
        while self.is_active() {
            let ch = match channel.take() {
                Some(ch) => ch,
                None => match self.reclaim(lane).await {
                    Some(ch) => ch,
                    None => break,
                },
            };
            let consumer = take_all(&ch, &queue).await;
            let Ok(mut consumer) = consumer else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            let mut assembler = Assembler::new(limit);
            loop {
                let delivery = tokio::select! {
                    d = consumer.next() => d,
                    () = self.stop.notified() => None,
                };
                let Some(Ok(delivery)) = delivery else { break };
                let (Some(reply_to), Some(id)) = (
                    delivery
                        .properties
                        .reply_to()
                        .as_ref()
                        .map(|r| r.to_string()),
                    delivery
                        .properties
                        .correlation_id()
                        .as_ref()
                        .and_then(|c| c.as_str().parse::<u64>().ok()),
                ) else {
                    tracing::warn!("a request without a call id or answer queue: dropped");
                    continue;
                };
                match assembler.add((reply_to.clone(), id), &delivery.data) {
                    Ok(Some(bytes)) => {
                        tokio::spawn(self.clone().answer(bytes, reply_to, id));
                    }
                    Ok(None) => {}
                    Err(why) => {
                        tracing::warn!(from = %reply_to, "a malformed request, dropped: {why}");
                    }
                }
            }
        }
    }

    /// After a lost connection: the lane's queue again, or `None` when the session is over
    /// (stopped, or another pool holds the lock now).
    async fn reclaim(&self, lane: Lane) -> Option<lapin::Channel> {
        let mut pause = Duration::from_millis(100);
        while self.is_active() {
            let claimed = match lane {
                Lane::Control => match self.link.conn().await {
                    Ok(conn) => claim(&conn, &self.names).await,
                    Err(e) => Err(e),
                },
                Lane::Bulk => claim_bulk(&self.link, &self.names).await.map(Some),
            };
            match claimed {
                Ok(Some(ch)) => {
                    tracing::info!(session = %self.info.id, ?lane, "session queue taken again after a lost connection");
                    return Some(ch);
                }
                Ok(None) => {
                    tracing::warn!(session = %self.info.id, "another pool took the session lock while RabbitMQ was out of reach: this session is over");
                    let _ = self.local.close_session(&self.info.id).await;
                    // The queues are the other pool's now: nothing of ours to delete.
                    *self.released.lock().await = true;
                    self.stopped.store(true, Ordering::Release);
                    self.stop.notify_waiters();
                    return None;
                }
                Err(e) => tracing::debug!(?lane, "taking the session queue again: {e}"),
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(2));
        }
        None
    }

    /// Expire leases, notice the session's own expiry, and end the leases of nodes whose
    /// connection is gone.
    async fn tick(self: Arc<Self>) {
        let mut misses: HashMap<NodeId, u32> = HashMap::new();
        let mut last_probe = tokio::time::Instant::now();
        let mut connections = self.link.connections();
        // When the host's connection was last made again (not its first).
        let mut regained: Option<tokio::time::Instant> = None;
        while self.is_active() {
            tokio::select! {
                () = tokio::time::sleep(TICK) => {}
                () = self.stop.notified() => break,
            }
            let _ = self.local.reap_expired().await;
            lock(&self.takes).retain(|_, (_, _, at)| at.elapsed() < KEEP_TAKE);
            if !matches!(self.local.active_session(Duration::ZERO).await, Ok(Some(s)) if s.id == self.info.id)
            {
                if self.is_active() {
                    tracing::warn!(session = %self.info.id, "pool session expired: its pool stopped keeping it alive");
                }
                self.halt().await;
                break;
            }
            if last_probe.elapsed() < PROBE_EVERY {
                continue;
            }
            last_probe = tokio::time::Instant::now();
            let Some(conn) = self.link.current().await else {
                misses.clear();
                continue;
            };
            if self.link.connections() != connections {
                connections = self.link.connections();
                regained = Some(tokio::time::Instant::now());
                misses.clear();
            }
            if regained.is_some_and(|at| at.elapsed() < RECONNECT_GRACE) {
                continue;
            }
            let holders = self.local.lease_holders();
            misses.retain(|n, _| holders.contains(n));
            for node in holders {
                match conn
                    .publish(&self.names.presence(&node), &[], 0, None, true)
                    .await
                {
                    Ok(Routed::Yes) => {
                        misses.remove(&node);
                    }
                    Ok(Routed::NoQueue) => {
                        let n = misses.entry(node.clone()).or_insert(0);
                        *n += 1;
                        if *n >= PROBE_MISSES {
                            misses.remove(&node);
                            let ended = self.local.node_gone(&node);
                            tracing::warn!(%node, ended, "node gone (its connection to RabbitMQ closed): its jobs go back to the queue");
                        }
                    }
                    Err(_) => break,
                }
            }
        }
    }

    /// Run one request and send its answer.
    async fn answer(self: Arc<Self>, bytes: Vec<u8>, reply_to: String, id: u64) {
        let reply = match decode_off::<Call>("a request", bytes).await {
            Ok(call) => self.run(call, id).await,
            Err(e) => {
                tracing::warn!(from = %reply_to, "an undecodable request: {e}");
                Err(e)
            }
        };
        let answer = match reply {
            Ok(a) => a,
            Err(e) => Answer::plain(encode(&Reply::Error(e.into())).unwrap_or_default()),
        };
        let body = &answer.bytes;
        let send = async {
            if let Ok(conn) = self.link.conn_for(body.len()).await
                && let Err(e) = conn.publish(&reply_to, body, id, None, false).await
            {
                tracing::debug!("answer to {reply_to} lost: {e}");
            }
        };
        if answer.leases.is_empty() {
            send.await;
            return;
        }
        // A take's answer is kept for a retry of the same request; one with big payloads
        // is not kept past its sending (a retry then leases other jobs, and the leases of
        // the lost answer expire).
        if body.len() > crate::link::BULK {
            lock(&self.takes).retain(|_, (last, _, _)| *last != id);
        }
        // The node cannot list these leases in its heartbeats before it has the jobs: while
        // they are on their way (hundreds of MiB take seconds), the host renews them itself.
        let renew = async {
            loop {
                self.local.renew(&answer.leases);
                tokio::time::sleep(TICK).await;
            }
        };
        tokio::select! {
            () = send => {}
            () = renew => {}
        }
        self.local.renew(&answer.leases);
        if body.len() <= crate::link::BULK {
            return;
        }
        // A big answer is still being read and decoded by the node after RabbitMQ took it
        // (seconds on a busy machine): go on renewing until a heartbeat of the node lists the
        // leases, for at most a second per 10 MiB. A node that dies meanwhile is found by its
        // presence queue, which ends its leases (renewing then changes nothing).
        let mib = u32::try_from(body.len() >> 20).unwrap_or(u32::MAX);
        let until =
            tokio::time::Instant::now() + Duration::from_secs(5) + Duration::from_millis(100) * mib;
        lock(&self.in_transit).extend(answer.leases.iter().cloned());
        while tokio::time::Instant::now() < until && self.is_active() {
            let waiting: Vec<dc_core::broker::Lease> = {
                let in_transit = lock(&self.in_transit);
                answer
                    .leases
                    .iter()
                    .filter(|l| in_transit.contains(*l))
                    .cloned()
                    .collect()
            };
            if waiting.is_empty() {
                break;
            }
            self.local.renew(&waiting);
            tokio::time::sleep(TICK).await;
        }
        let mut in_transit = lock(&self.in_transit);
        for lease in &answer.leases {
            in_transit.remove(lease);
        }
    }

    /// The encoded answer to one call.
    async fn run(&self, call: Call, id: u64) -> Result<Answer, BrokerError> {
        let wait = call.wait().min(MAX_WAIT);
        let local = &self.local;
        let reply = match call {
            Call::TakeJobs {
                session,
                node,
                worker,
                max,
                ..
            } => {
                let cell = {
                    let mut takes = lock(&self.takes);
                    match takes.get(&worker) {
                        Some((last, cell, _)) if *last == id => cell.clone(),
                        _ => {
                            let cell = Arc::new(OnceCell::new());
                            takes.insert(
                                worker.clone(),
                                (id, cell.clone(), tokio::time::Instant::now()),
                            );
                            cell
                        }
                    }
                };
                let answer = cell
                    .get_or_try_init(|| async {
                        let jobs = local
                            .take_jobs(&session, &node, &worker, max.min(MAX_ITEMS) as usize, wait)
                            .await?;
                        let leases = jobs.iter().map(|j| j.lease.clone()).collect();
                        let big = leased_bytes(&jobs) > crate::link::BULK;
                        let reply = Reply::Leased(jobs.into_iter().map(Into::into).collect());
                        let bytes = encode_off(reply, big).await?;
                        Ok::<_, BrokerError>(Answer {
                            bytes: bytes.into(),
                            leases,
                        })
                    })
                    .await?;
                return Ok(answer.clone());
            }
            Call::Describe => Reply::Session(
                local
                    .active_session(Duration::ZERO)
                    .await?
                    .filter(|s| s.id == self.info.id),
            ),
            Call::KeepAlive { session } => {
                Reply::Alive(local.keep_session_alive(&session).await? == SessionState::Active)
            }
            Call::Close { session } => {
                if session == self.info.id {
                    self.close().await;
                }
                Reply::Done
            }
            Call::Submit { session, jobs } => {
                local
                    .submit(&session, jobs.into_iter().map(Into::into).collect())
                    .await?;
                Reply::Done
            }
            Call::Complete { outcomes } => {
                let answers = local
                    .complete_many(
                        outcomes
                            .into_iter()
                            .map(|(lease, o)| (lease, o.into()))
                            .collect(),
                    )
                    .await?;
                Reply::Completions(
                    answers
                        .into_iter()
                        .map(|c| c == Completion::Accepted)
                        .collect(),
                )
            }
            Call::Abandon { lease, end } => {
                Reply::Abandoned(match local.abandon(&lease, end).await? {
                    Abandoned::Requeued => WireAbandoned::Requeued,
                    Abandoned::Failed => WireAbandoned::Failed,
                    Abandoned::Stale => WireAbandoned::Stale,
                })
            }
            Call::TakeResults { session, max, .. } => {
                let results = local
                    .take_results(&session, max.min(MAX_ITEMS) as usize, wait)
                    .await?;
                let big = result_bytes(&results) > crate::link::BULK;
                let reply = Reply::Results(results.into_iter().map(Into::into).collect());
                return encode_off(reply, big).await.map(Answer::plain);
            }
            Call::LostJobs { session, jobs } => {
                Reply::Jobs(local.lost_jobs(&session, &jobs).await?)
            }
            Call::PublishUpdate {
                session,
                seq,
                payload,
            } => {
                let payload = bytes::Bytes::from(payload.into_vec());
                Reply::Seq(match seq {
                    Some(seq) => local.publish_update_at(&session, seq, payload).await?,
                    None => local.publish_update(&session, payload).await?,
                })
            }
            Call::ReadUpdates {
                session,
                after,
                max,
            } => Reply::Updates(
                local
                    .read_updates(&session, after, max.min(MAX_ITEMS) as usize)
                    .await?
                    .into_iter()
                    .map(|(seq, b)| (seq, serde_bytes::ByteBuf::from(Vec::from(b))))
                    .collect(),
            ),
            Call::Heartbeat { status } => {
                local.heartbeat(&status).await?;
                let mut in_transit = lock(&self.in_transit);
                if !in_transit.is_empty() {
                    for lease in &status.leases {
                        in_transit.remove(lease);
                    }
                }
                Reply::Done
            }
            Call::Leave { node } => {
                local.leave(&node).await?;
                Reply::Done
            }
            Call::Problem { session, problem } => {
                local.report_problem(&session, problem).await?;
                Reply::Done
            }
            Call::Stats { session } => Reply::Stats(local.session_stats(&session).await?.into()),
        };
        encode(&reply).map(Answer::plain)
    }
}

/// A worker's last take: its call id, its answer once made, and when it was asked.
type LastTake = (u64, Arc<OnceCell<Answer>>, tokio::time::Instant);
/// How long a take's answer is kept for a retry of the same request.
const KEEP_TAKE: Duration = Duration::from_secs(60);

/// An encoded answer, and the leases it hands out (renewed while it is on its way).
#[derive(Debug, Clone)]
struct Answer {
    bytes: bytes::Bytes,
    leases: Vec<dc_core::broker::Lease>,
}

impl Answer {
    fn plain(bytes: Vec<u8>) -> Self {
        Answer {
            bytes: bytes.into(),
            leases: Vec::new(),
        }
    }
}

/// Which of the session's two request queues.
#[derive(Debug, Clone, Copy)]
enum Lane {
    /// `<ns>.session`, on the control connection: the lock, and every small request.
    Control,
    /// `<ns>.session.bulk`, on the bulk connection: requests over a MiB.
    Bulk,
}

/// Declare the bulk request queue exclusive on the bulk connection. Only the lock's holder
/// declares it; a lost connection may leave it locked a moment, so a refusal is retried.
async fn claim_bulk(link: &Link, names: &Names) -> Result<lapin::Channel, BrokerError> {
    let mut tries = 0;
    loop {
        let ch = link.bulk().await?.channel().await?;
        match ch
            .queue_declare(
                names.session_bulk().into(),
                exclusive(),
                FieldTable::default(),
            )
            .await
        {
            Ok(_) => return Ok(ch),
            Err(e) if amqp_code(&e) == Some(RESOURCE_LOCKED) && tries < 50 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(broken("declare the bulk session queue", e)),
        }
    }
}

/// Declare the session queue exclusive on `conn`: the lock. `Ok(None)` when another
/// connection holds it.
async fn claim(conn: &Conn, names: &Names) -> Result<Option<lapin::Channel>, BrokerError> {
    let ch = conn.channel().await?;
    match ch
        .queue_declare(names.session().into(), exclusive(), FieldTable::default())
        .await
    {
        Ok(_) => Ok(Some(ch)),
        Err(e) if amqp_code(&e) == Some(RESOURCE_LOCKED) => Ok(None),
        Err(e) => Err(broken("declare the session queue", e)),
    }
}

/// 64 bits no other process is likely to pick.
pub(crate) fn random() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    h.finish()
}
