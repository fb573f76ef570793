//! One process's link to RabbitMQ: two connections, each made again after it drops, each with
//! a confirm-mode channel to publish on and a private queue for answers. The *control*
//! connection carries small requests and answers (heartbeats above all) and keeps the node
//! presence queues this process runs declared; the *bulk* connection carries every request or
//! answer over [`BULK`] bytes. RabbitMQ throttles a connection that publishes faster than its
//! queues drain (flow control): with big payloads on their own connection, a heartbeat is
//! never stuck behind hundreds of MiB, and no lease expires while a node moves a big payload.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use dc_core::BrokerError;
use dc_core::util::lock;
use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::tcp::OwnedTLSConfig;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio::sync::oneshot;

use crate::wire::{Assembler, parts};

/// How long a call keeps trying to reach RabbitMQ (reconnecting) before it reports the
/// connection lost; the pool and the agent then retry on their own schedule.
const REACH_FOR: Duration = Duration::from_secs(10);
/// Time an answer may take beyond the call's own wait: the round trip and a busy host.
const ANSWER_SLACK: Duration = Duration::from_secs(5);
/// How long after this process reconnected a missing session queue is asked again, and for
/// how long at most.
const RECONNECT_GRACE: Duration = Duration::from_secs(15);
const ABSENT_GRACE: Duration = Duration::from_secs(5);
/// Requests and answers larger than this travel on the bulk connection (and requests to the
/// bulk request queue).
pub(crate) const BULK: usize = 1 << 20;
/// Time a bulk answer may take per MiB beyond its wait (a slow machine moves 20 MiB/s).
const PER_MIB: Duration = Duration::from_millis(20);

/// AMQP reply codes this backend reads.
pub(crate) const RESOURCE_LOCKED: u16 = 405;
const ACCESS_REFUSED: u16 = 403;

/// The reply code of an AMQP error, if `e` is one.
pub(crate) fn amqp_code(e: &lapin::Error) -> Option<u16> {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(err) => Some(err.get_id()),
        _ => None,
    }
}

/// A lapin error as a broker error: refused credentials are [`BrokerError::Auth`], the rest
/// a connection problem.
pub(crate) fn broken(what: &str, e: lapin::Error) -> BrokerError {
    let message = format!("RabbitMQ {what}: {e}");
    if amqp_code(&e) == Some(ACCESS_REFUSED) {
        BrokerError::Auth(dc_core::Cause::with_source(message, e))
    } else {
        BrokerError::Connection(dc_core::Cause::with_source(message, e))
    }
}

/// Where to connect and how.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub(crate) url: String,
    pub(crate) tls: OwnedTLSConfig,
    pub(crate) connect_timeout: Duration,
}

/// The process's link: the live connection, made again on demand.
#[derive(Debug)]
pub(crate) struct Link {
    target: Target,
    /// Largest request or answer taken from the network.
    max_message: usize,
    control: tokio::sync::Mutex<Option<Arc<Conn>>>,
    bulk: tokio::sync::Mutex<Option<Arc<Conn>>>,
    /// Presence queues to declare on every connection (one per node this process runs).
    presence: std::sync::Mutex<BTreeSet<String>>,
    next_id: AtomicU64,
    /// Connections made so far.
    connections: AtomicU64,
    /// When a lost connection was last made again (not the first connection).
    reconnected: std::sync::Mutex<Option<tokio::time::Instant>>,
}

/// One connection and what lives on it.
#[derive(Debug)]
pub(crate) struct Conn {
    pub(crate) connection: Connection,
    /// Confirm mode: every publish is confirmed, unroutable mandatory ones come back.
    publish: Channel,
    /// The server-named queue answers come to.
    pub(crate) reply_queue: String,
    pending: Arc<std::sync::Mutex<HashMap<u64, oneshot::Sender<Vec<u8>>>>>,
    /// Calls whose answer has begun to arrive (a first part of several).
    begun: Arc<std::sync::Mutex<std::collections::HashSet<u64>>>,
    dead: Arc<AtomicBool>,
}

/// How a publish went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Routed {
    /// A queue took it.
    Yes,
    /// No queue by that name (a mandatory publish came back).
    NoQueue,
}

impl Conn {
    pub(crate) fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire) || !self.connection.status().connected()
    }

    pub(crate) fn mark_dead(&self) {
        self.dead.store(true, Ordering::Release);
    }

    /// A new channel on this connection.
    pub(crate) async fn channel(&self) -> Result<Channel, BrokerError> {
        self.connection.create_channel().await.map_err(|e| {
            self.mark_dead();
            broken("channel", e)
        })
    }

    /// Publish `body` (cut into parts) to `queue` through the default exchange.
    pub(crate) async fn publish(
        &self,
        queue: &str,
        body: &[u8],
        id: u64,
        reply_to: Option<&str>,
        mandatory: bool,
    ) -> Result<Routed, BrokerError> {
        let mut props = BasicProperties::default().with_correlation_id(id.to_string().into());
        if let Some(r) = reply_to {
            props = props.with_reply_to(r.to_string().into());
        }
        let mut confirms = Vec::new();
        for part in parts(body) {
            let confirm = self
                .publish
                .basic_publish(
                    ShortString::from(""),
                    queue.to_string().into(),
                    BasicPublishOptions {
                        mandatory,
                        ..BasicPublishOptions::default()
                    },
                    &part,
                    props.clone(),
                )
                .await
                .map_err(|e| {
                    self.mark_dead();
                    broken("publish", e)
                })?;
            confirms.push(confirm);
        }
        let mut routed = Routed::Yes;
        for confirm in confirms {
            let confirmation = confirm.await.map_err(|e| {
                self.mark_dead();
                broken("publish confirm", e)
            })?;
            if confirmation.is_nack() {
                return Err(BrokerError::Connection(
                    format!("RabbitMQ refused a message for {queue}").into(),
                ));
            }
            if confirmation.take_message().is_some() {
                routed = Routed::NoQueue;
            }
        }
        Ok(routed)
    }

    fn expect(&self, id: u64) -> oneshot::Receiver<Vec<u8>> {
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id, tx);
        rx
    }

    fn forget(&self, id: u64) {
        lock(&self.pending).remove(&id);
        lock(&self.begun).remove(&id);
    }
}

/// Arguments of a presence queue: it holds nothing (a message to it is routed, then
/// dropped), it only exists while its connection does.
fn presence_args() -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(0));
    args
}

/// Consume `queue` alone, every message acknowledged on delivery (requests and answers are
/// acted on at once; nothing is held while a job runs).
pub(crate) async fn take_all(ch: &Channel, queue: &str) -> lapin::Result<lapin::Consumer> {
    ch.basic_consume(
        queue.to_string().into(),
        ShortString::from(""),
        BasicConsumeOptions {
            no_ack: true,
            exclusive: true,
            ..BasicConsumeOptions::default()
        },
        FieldTable::default(),
    )
    .await
}

pub(crate) fn exclusive() -> QueueDeclareOptions {
    QueueDeclareOptions {
        exclusive: true,
        ..QueueDeclareOptions::default()
    }
}

impl Link {
    pub(crate) fn new(target: Target, max_message: usize) -> Self {
        // Call ids start at a random point, so two processes' ids seldom meet (a host keys
        // the answers it keeps for retries by worker and id).
        let seed = crate::host::random() >> 16;
        Link {
            target,
            max_message,
            control: tokio::sync::Mutex::new(None),
            bulk: tokio::sync::Mutex::new(None),
            presence: std::sync::Mutex::new(BTreeSet::new()),
            next_id: AtomicU64::new(seed),
            connections: AtomicU64::new(0),
            reconnected: std::sync::Mutex::new(None),
        }
    }

    /// How many connections this link has made: it moves when a lost connection is made
    /// again.
    pub(crate) fn connections(&self) -> u64 {
        self.connections.load(Ordering::Acquire)
    }

    pub(crate) fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The live control connection, connecting (again) if there is none.
    pub(crate) async fn conn(&self) -> Result<Arc<Conn>, BrokerError> {
        self.slot(false).await
    }

    /// The connection for a message of `len` bytes: bulk when it is over [`BULK`].
    pub(crate) async fn conn_for(&self, len: usize) -> Result<Arc<Conn>, BrokerError> {
        self.slot(len > BULK).await
    }

    /// The live bulk connection, connecting (again) if there is none.
    pub(crate) async fn bulk(&self) -> Result<Arc<Conn>, BrokerError> {
        self.slot(true).await
    }

    async fn slot(&self, bulk: bool) -> Result<Arc<Conn>, BrokerError> {
        let slot = if bulk { &self.bulk } else { &self.control };
        let mut current = slot.lock().await;
        if let Some(c) = current.as_ref()
            && !c.is_dead()
        {
            return Ok(c.clone());
        }
        // This slot had a connection that dropped: the new one is a reconnection.
        let again = current.is_some();
        if let Some(old) = current.take() {
            old.mark_dead();
            let _ = old.connection.close(200, "reconnecting".into()).await;
        }
        let conn = tokio::time::timeout(self.target.connect_timeout, self.connect(!bulk))
            .await
            .map_err(|_| {
                BrokerError::Connection(
                    format!(
                        "RabbitMQ did not answer within {:?}",
                        self.target.connect_timeout
                    )
                    .into(),
                )
            })??;
        *current = Some(conn.clone());
        if !bulk {
            self.connections.fetch_add(1, Ordering::AcqRel);
        }
        if again {
            *lock(&self.reconnected) = Some(tokio::time::Instant::now());
        }
        Ok(conn)
    }

    /// The live control connection if there is one, without connecting.
    pub(crate) async fn current(&self) -> Option<Arc<Conn>> {
        Self::live(&self.control).await
    }

    /// The live bulk connection if there is one, without connecting.
    pub(crate) async fn current_bulk(&self) -> Option<Arc<Conn>> {
        Self::live(&self.bulk).await
    }

    async fn live(slot: &tokio::sync::Mutex<Option<Arc<Conn>>>) -> Option<Arc<Conn>> {
        slot.lock().await.as_ref().filter(|c| !c.is_dead()).cloned()
    }

    /// A new connection; `control`: also declare the presence queues this process keeps.
    async fn connect(&self, control: bool) -> Result<Arc<Conn>, BrokerError> {
        let runtime = lapin::runtime::default_runtime().map_err(|e| broken("runtime", e))?;
        let role = if control { "control" } else { "bulk" };
        let props = ConnectionProperties::default()
            .with_connection_name(format!("dc {} {role}", std::process::id()).into());
        let connection = Connection::connect_with_config(
            &self.target.url,
            props,
            self.target.tls.clone(),
            runtime,
        )
        .await
        .map_err(|e| broken("connect", e))?;
        let publish = connection
            .create_channel()
            .await
            .map_err(|e| broken("channel", e))?;
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| broken("confirm mode", e))?;
        let replies = connection
            .create_channel()
            .await
            .map_err(|e| broken("channel", e))?;
        let reply_queue = replies
            .queue_declare(
                ShortString::from(""),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| broken("declare the answer queue", e))?
            .name()
            .to_string();
        let consumer = take_all(&replies, &reply_queue)
            .await
            .map_err(|e| broken("consume answers", e))?;
        let names: Vec<String> = if control {
            lock(&self.presence).iter().cloned().collect()
        } else {
            Vec::new()
        };
        for name in names {
            publish
                .queue_declare(name.into(), exclusive(), presence_args())
                .await
                .map_err(|e| broken("declare presence", e))?;
        }
        let conn = Arc::new(Conn {
            connection,
            publish,
            reply_queue,
            pending: Arc::default(),
            begun: Arc::default(),
            dead: Arc::default(),
        });
        let pending = conn.pending.clone();
        let begun = conn.begun.clone();
        let dead = conn.dead.clone();
        let limit = self.max_message;
        tokio::spawn(async move {
            let mut consumer = consumer;
            let mut assembler = Assembler::new(limit);
            while let Some(Ok(delivery)) = consumer.next().await {
                let Some(id) = delivery
                    .properties
                    .correlation_id()
                    .as_ref()
                    .and_then(|c| c.as_str().parse::<u64>().ok())
                else {
                    tracing::warn!("an answer without a call id: dropped");
                    continue;
                };
                match assembler.add(id, &delivery.data) {
                    Ok(Some(bytes)) => {
                        lock(&begun).remove(&id);
                        if let Some(tx) = lock(&pending).remove(&id) {
                            let _ = tx.send(bytes);
                        }
                    }
                    Ok(None) => {
                        lock(&begun).insert(id);
                    }
                    Err(why) => {
                        tracing::warn!(call = id, "a malformed answer, dropped: {why}");
                    }
                }
            }
            dead.store(true, Ordering::Release);
            // Every call still waiting hears that its answer will not come on this link.
            lock(&pending).clear();
        });
        Ok(conn)
    }

    /// Keep a presence queue declared for `node` on this connection and every later one.
    pub(crate) async fn keep_present(&self, queue: &str) -> Result<(), BrokerError> {
        if !lock(&self.presence).insert(queue.to_string()) {
            return Ok(());
        }
        let conn = self.conn().await?;
        let declared = conn
            .publish
            .queue_declare(queue.to_string().into(), exclusive(), presence_args())
            .await;
        if let Err(e) = declared {
            conn.mark_dead();
            lock(&self.presence).remove(queue);
            return Err(broken("declare presence", e));
        }
        Ok(())
    }

    /// Stop declaring a presence queue (its node left) and delete it.
    pub(crate) async fn drop_presence(&self, queue: &str) {
        if !lock(&self.presence).remove(queue) {
            return;
        }
        if let Some(conn) = self.current().await
            && let Ok(ch) = conn.channel().await
        {
            let _ = ch
                .queue_delete(queue.to_string().into(), Default::default())
                .await;
            let _ = ch.close(200, "done".into()).await;
        }
    }

    /// Send a request to the queue `to` (or `bulk_to`, for a request over [`BULK`] bytes)
    /// and wait for its answer: `Ok(None)` when no queue of that name exists (nobody hosts
    /// it). The same id goes out again after a lost connection, so the host can tell a retry
    /// from a new request.
    pub(crate) async fn call(
        &self,
        to: &str,
        bulk_to: &str,
        body: &[u8],
        wait: Duration,
        big_answer: bool,
    ) -> Result<Option<Vec<u8>>, BrokerError> {
        let bulk = body.len() > BULK;
        let to = if bulk { bulk_to } else { to };
        // A big request waits longer for its answer (the host decodes it first); an answer
        // that has begun to arrive gets the time a big one needs to come in full.
        let mib = u32::try_from(body.len() >> 20).unwrap_or(u32::MAX);
        let wait = wait + PER_MIB * mib;
        let arriving = PER_MIB * 1024;
        let id = self.next_id();
        let reach_until = tokio::time::Instant::now() + REACH_FOR;
        let mut last_error: Option<BrokerError> = None;
        let mut absent_since: Option<tokio::time::Instant> = None;
        loop {
            if tokio::time::Instant::now() >= reach_until {
                return Err(last_error.unwrap_or_else(|| {
                    BrokerError::Connection("RabbitMQ could not be reached".into())
                }));
            }
            // Big requests, and requests whose answers may be big, go on the bulk connection
            // (their answers come back to its answer queue), so that neither end's control
            // connection spends time on big payloads.
            let conn = match self.slot(bulk || big_answer).await {
                Ok(c) => c,
                Err(e @ BrokerError::Auth(_)) => return Err(e),
                Err(e) => {
                    last_error = Some(e);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            let answer = conn.expect(id);
            match conn
                .publish(to, body, id, Some(&conn.reply_queue), true)
                .await
            {
                Ok(Routed::Yes) => {}
                Ok(Routed::NoQueue) => {
                    conn.forget(id);
                    // Just after RabbitMQ came back, the host may not have declared its
                    // queues again yet: a session queue missing then is not yet a session
                    // gone.
                    let now = tokio::time::Instant::now();
                    let since = *absent_since.get_or_insert(now);
                    let recent = lock(&self.reconnected)
                        .is_some_and(|at| now.duration_since(at) < RECONNECT_GRACE);
                    if recent && now.duration_since(since) < ABSENT_GRACE {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                    return Ok(None);
                }
                Err(e) => {
                    conn.forget(id);
                    last_error = Some(e);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            }
            let mut answer = answer;
            let mut got = tokio::time::timeout(wait + ANSWER_SLACK, &mut answer).await;
            if got.is_err() && big_answer && lock(&conn.begun).contains(&id) {
                got = tokio::time::timeout(arriving, &mut answer).await;
            }
            match got {
                Ok(Ok(bytes)) => return Ok(Some(bytes)),
                // The connection dropped before the answer came: ask again.
                Ok(Err(_)) => {
                    last_error = Some(BrokerError::Connection(
                        "the connection to RabbitMQ dropped before the answer came".into(),
                    ));
                }
                Err(_) => {
                    conn.forget(id);
                    return Err(BrokerError::Connection(
                        format!(
                            "no answer from the pool hosting the session within {:?}",
                            wait + ANSWER_SLACK
                        )
                        .into(),
                    ));
                }
            }
        }
    }

    /// Close the connections (the process is done with RabbitMQ).
    pub(crate) async fn close(&self) {
        for slot in [&self.control, &self.bulk] {
            if let Some(c) = slot.lock().await.take() {
                c.mark_dead();
                let _ = c.connection.close(200, "closed".into()).await;
            }
        }
    }
}
