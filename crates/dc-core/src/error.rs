//! Errors: [`PoolError`] for users, [`BrokerError`] for backends.

use std::sync::Arc;

use crate::broker::AttemptRecord;

/// Why a job failed for good.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub enum JobFailure {
    /// The worker's `run` returned an error (not retried).
    Worker,
    /// The job's input could not be decoded as the worker's `Job` type (not retried).
    Codec,
    /// Every attempt ended without a result: the worker process died, spoke garbage, or its
    /// node vanished, `max_attempts` times.
    Exhausted,
    /// What the broker held of the job (its record, its input or its result) was damaged or
    /// unreadable (not retried: the message says what was wrong).
    Broker,
}

impl std::fmt::Display for JobFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            JobFailure::Worker => "worker error",
            JobFailure::Codec => "undecodable job",
            JobFailure::Exhausted => "attempts exhausted",
            JobFailure::Broker => "damaged in the broker",
        })
    }
}

/// Everything a pool can report. Match on the variants; new ones may come.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum PoolError {
    /// The broker refused the password.
    #[error("authentication failed: {0} (check the pool password)")]
    Auth(String),
    /// Nothing answered at the pool's address within the connect timeout.
    #[error("pool server unreachable: {0}")]
    Unreachable(String),
    /// One job failed for good.
    #[error("job {index} failed ({kind}) after {attempts} attempt(s): {message}")]
    Job {
        /// Position of the job in the input.
        index: usize,
        /// Why it failed.
        kind: JobFailure,
        /// The worker's message, or how the last attempt ended.
        message: String,
        /// How many times the job was started.
        attempts: u32,
        /// Every attempt: node, worker, and how it ended.
        history: Vec<AttemptRecord>,
    },
    /// No node serving this pool has the worker kind.
    #[error(
        "no node knows worker kind {kind:?}: register it in the node binary's Registry (known there: {known:?})"
    )]
    UnknownWorkerKind {
        /// The kind the pool asked for.
        kind: String,
        /// The kinds the refusing node offered.
        known: Vec<String>,
    },
    /// Every worker failed to build the worker (`Worker::new` returned an error).
    #[error("workers could not start: {0}")]
    WorkerInit(String),
    /// A payload exceeds the limit of the broker or the worker channel.
    #[error("payload of {size} bytes exceeds the limit of {limit} bytes")]
    PayloadTooLarge {
        /// Encoded size (or, for a payload refused while it was encoded, how far the encoding
        /// got: past the limit).
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The pool was closed.
    #[error("the pool is closed")]
    Closed,
    /// The pool is set up wrongly (a message says what to change).
    #[error("pool configuration: {0}")]
    Config(String),
    /// The broker failed.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// A value could not be encoded or decoded as CBOR.
    #[error("codec: {0}")]
    Codec(String),
}

/// A broker backend's error, classified so callers know whether to retry.
///
/// [`std::error::Error::source`] gives the error beneath it when the backend kept one (an I/O
/// error, the client library's error), so a report can walk the whole chain.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum BrokerError {
    /// The connection failed or dropped; retrying may help.
    Connection(Cause),
    /// Credentials refused.
    Auth(Cause),
    /// The session does not exist (closed, expired, or the broker lost its state).
    SessionGone(String),
    /// A payload too large for this broker.
    PayloadTooLarge {
        /// Encoded size (or, for a payload refused while it was encoded, how far the encoding
        /// got: past the limit).
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The broker answered something this client does not understand.
    Protocol(Cause),
    /// The URL names no backend compiled into this program.
    UnsupportedUrl(String),
}

impl std::fmt::Display for BrokerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BrokerError::Connection(c) => write!(f, "broker connection: {c}"),
            BrokerError::Auth(c) => write!(f, "broker authentication: {c}"),
            BrokerError::SessionGone(s) => write!(f, "pool session {s} is gone"),
            BrokerError::PayloadTooLarge { size, limit } => write!(
                f,
                "payload of {size} bytes exceeds the broker limit of {limit} bytes"
            ),
            BrokerError::Protocol(c) => write!(f, "broker protocol: {c}"),
            BrokerError::UnsupportedUrl(url) => write!(
                f,
                "unsupported broker URL {url:?}: use redis://host:port (a head node's server or your own Redis) or a local pool"
            ),
        }
    }
}

impl std::error::Error for BrokerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            BrokerError::Connection(c) | BrokerError::Auth(c) | BrokerError::Protocol(c) => c
                .source
                .as_deref()
                .map(|e| e as &(dyn std::error::Error + 'static)),
            _ => None,
        }
    }
}

/// What a [`BrokerError`] says, and the error beneath it when there is one. Reads as its
/// message (`Display`, and `Deref` to `str`); the error beneath is the [`BrokerError`]'s
/// [`source`](std::error::Error::source).
#[derive(Clone)]
pub struct Cause {
    message: String,
    source: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

impl Cause {
    /// A message with no error beneath it.
    pub fn new(message: impl Into<String>) -> Self {
        Cause {
            message: message.into(),
            source: None,
        }
    }

    /// A message, and the error it comes from.
    pub fn with_source(
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Cause {
            message: message.into(),
            source: Some(Arc::new(source)),
        }
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl std::fmt::Debug for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.source {
            Some(source) => write!(f, "{:?} (from {source:?})", self.message),
            None => write!(f, "{:?}", self.message),
        }
    }
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::ops::Deref for Cause {
    type Target = str;
    fn deref(&self) -> &str {
        &self.message
    }
}

impl From<String> for Cause {
    fn from(message: String) -> Self {
        Cause::new(message)
    }
}

impl From<&str> for Cause {
    fn from(message: &str) -> Self {
        Cause::new(message)
    }
}

impl BrokerError {
    /// Whether the same call may succeed if retried after a pause (connection trouble).
    pub fn is_transient(&self) -> bool {
        matches!(self, BrokerError::Connection(_))
    }
}

impl PoolError {
    pub(crate) fn codec(what: &str, err: impl std::fmt::Display) -> Self {
        PoolError::Codec(format!("{what}: {err}"))
    }
}
