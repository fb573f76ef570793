//! A running pool server and its supervisor: a redis-server this process started is restarted
//! at once when it dies, on the same port with the same password, until told to stop.
//!
//! 1. The supervisor waits for the server to exit, or for the stop signal (then it terminates
//!    the server and returns).
//! 2. A server that died is started again; a failed start is retried with jittered backoff,
//!    20 tries at most.
//! 3. Ten deaths within a minute, or another server taking the port, end the supervision.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use dc_broker_redis::server::{RedisProcess, RedisServerOptions, start_redis_server};
use dc_broker_redis::token::JoinToken;
use dc_core::backoff::Backoff;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::NodeError;

/// A running pool server. A server this handle started is supervised: if the redis-server
/// dies (killed, OOM), it is restarted at once on the same port with the same password (empty:
/// persistence is off), and nodes and pools reconnect to it.
#[derive(Debug)]
pub struct ServerHandle {
    pub(super) port: u16,
    pub(super) token: JoinToken,
    pub(super) stop: Option<watch::Sender<bool>>,
    pub(super) task: Option<JoinHandle<Result<(), NodeError>>>,
}

impl ServerHandle {
    /// The pool port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The join token for this server (also in `<state-dir>/join-token`).
    pub fn join_token(&self) -> &JoinToken {
        &self.token
    }

    /// Whether this handle started the server (false: one was already running).
    pub fn started_here(&self) -> bool {
        self.task.is_some()
    }

    /// Stop the server if this handle started it.
    ///
    /// # Errors
    /// When the supervisor had given up restarting the server.
    pub async fn terminate(&mut self) -> Result<(), NodeError> {
        if let Some(stop) = &self.stop {
            let _ = stop.send(true);
        }
        self.wait().await
    }

    /// Wait until the server stops for good (forever while it serves; at once if it was not
    /// started here).
    ///
    /// # Errors
    /// When the supervisor gave up restarting a server that kept dying.
    pub async fn wait(&mut self) -> Result<(), NodeError> {
        match self.task.as_mut() {
            Some(task) => {
                let result = task.await.unwrap_or(Ok(()));
                self.task = None;
                result
            }
            None => Ok(()),
        }
    }
}

/// Watch the head's redis-server and restart it when it dies, until told to stop.
pub(super) async fn supervise(
    mut redis: RedisProcess,
    options: RedisServerOptions,
    mut stop: watch::Receiver<bool>,
) -> Result<(), NodeError> {
    let port = options.port;
    let mut restarts: VecDeque<Instant> = VecDeque::new();
    loop {
        tokio::select! {
            status = redis.wait() => {
                if *stop.borrow() {
                    return Ok(());
                }
                let how = status
                    .map(|s| dc_gpu::proc::describe_exit(&s))
                    .unwrap_or_else(|e| e.to_string());
                tracing::error!(port, "pool server (redis-server) {how}; restarting it on the same port");
            }
            _ = stop.changed() => {
                let _ = redis.terminate().await;
                return Ok(());
            }
        }
        let now = Instant::now();
        restarts.retain(|t| now.duration_since(*t) < Duration::from_secs(60));
        if restarts.len() >= 10 {
            return Err(NodeError::Config(format!(
                "the pool server on port {port} died 10 times within a minute; giving up (see its log in {})",
                options.dir.display()
            )));
        }
        restarts.push_back(now);
        let mut failures = 0u32;
        // Between failed starts: 100 ms, doubling to at most 1.9 s, jittered.
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(1900));
        redis = loop {
            match start_redis_server(&options).await {
                Ok(Some(redis)) => {
                    tracing::info!(
                        port,
                        "pool server restarted (empty: nodes and pools reconnect and resubmit)"
                    );
                    break redis;
                }
                Ok(None) => {
                    tracing::warn!(
                        port,
                        "another pool server took the port; no longer supervising"
                    );
                    return Ok(());
                }
                Err(e) => {
                    failures += 1;
                    tracing::warn!(port, error = %e, "restarting the pool server failed; retrying");
                    if failures >= 20 {
                        return Err(e.into());
                    }
                    tokio::time::sleep(backoff.next_pause()).await;
                }
            }
        };
    }
}
