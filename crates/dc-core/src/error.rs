//! Errors: [`PoolError`] for users, [`BrokerError`] for backends.

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
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// The connection failed or dropped; retrying may help.
    #[error("broker connection: {0}")]
    Connection(String),
    /// Credentials refused.
    #[error("broker authentication: {0}")]
    Auth(String),
    /// The session does not exist (closed, expired, or the broker lost its state).
    #[error("pool session {0} is gone")]
    SessionGone(String),
    /// A payload too large for this broker.
    #[error("payload of {size} bytes exceeds the broker limit of {limit} bytes")]
    PayloadTooLarge {
        /// Encoded size (or, for a payload refused while it was encoded, how far the encoding
        /// got: past the limit).
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The broker answered something this client does not understand.
    #[error("broker protocol: {0}")]
    Protocol(String),
    /// The URL names no backend compiled into this program.
    #[error(
        "unsupported broker URL {0:?}: use redis://host:port (a head node's server or your own Redis) or a local pool"
    )]
    UnsupportedUrl(String),
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
