//! What travels between a node (or any client) and the pool that hosts the session: one
//! [`Call`] per request, one [`Reply`] per answer, CBOR-encoded and cut into parts that fit a
//! message.
//!
//! A message body is a 12-byte head (`DCA1`, the part's index, the number of parts, both
//! big-endian `u32`) and the part's bytes. Parts of one request or answer share its
//! correlation id and arrive in order (one publisher, one queue).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dc_core::BrokerError;
use dc_core::JobFailure;
use dc_core::broker::{
    AttemptEnd, AttemptRecord, JobId, JobOutcome, JobResult, Lease, LeasedJob, NewJob, NodeId,
    NodeProblem, NodeStatus, SessionId, SessionInfo, SessionStats, UpdateSeq, WorkerId,
};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

/// Bytes of one message at most (a part's bytes plus its head): far under RabbitMQ's
/// `max_message_size` (16 MiB by default since 4.0, 128 MiB before).
pub(crate) const PART_BYTES: usize = 4 << 20;
/// Head of every part.
const MAGIC: &[u8; 4] = b"DCA1";
const HEAD: usize = 12;
/// Room for a call's or answer's own fields beside its payloads.
const ENVELOPE: usize = 1 << 20;
/// Most requests or answers being put together at once from one queue.
const MAX_ASSEMBLIES: usize = 4096;
/// A request or answer whose next part has not come in this long is dropped (its sender
/// died or gave up in the middle).
const ASSEMBLY_TTL: Duration = Duration::from_secs(60);

/// A request to the pool that hosts the session.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Call {
    /// The session this pool hosts (it answers only while one is active).
    Describe,
    KeepAlive {
        session: SessionId,
    },
    Close {
        session: SessionId,
    },
    Submit {
        session: SessionId,
        jobs: Vec<WireNewJob>,
    },
    TakeJobs {
        session: SessionId,
        node: NodeId,
        worker: WorkerId,
        max: u32,
        wait_ms: u64,
    },
    Complete {
        outcomes: Vec<(Lease, WireOutcome)>,
    },
    Abandon {
        lease: Lease,
        end: AttemptEnd,
    },
    TakeResults {
        session: SessionId,
        max: u32,
        wait_ms: u64,
    },
    LostJobs {
        session: SessionId,
        jobs: Vec<JobId>,
    },
    PublishUpdate {
        session: SessionId,
        /// Its place in the log, for a retry that must not publish it twice.
        seq: Option<UpdateSeq>,
        payload: ByteBuf,
    },
    ReadUpdates {
        session: SessionId,
        after: UpdateSeq,
        max: u32,
    },
    Heartbeat {
        status: NodeStatus,
    },
    Leave {
        node: NodeId,
    },
    Problem {
        session: SessionId,
        problem: NodeProblem,
    },
    Stats {
        session: SessionId,
    },
}

impl Call {
    /// Longest the host may take to answer, beyond the round trip.
    pub(crate) fn wait(&self) -> Duration {
        match self {
            Call::TakeJobs { wait_ms, .. } | Call::TakeResults { wait_ms, .. } => {
                Duration::from_millis(*wait_ms)
            }
            _ => Duration::ZERO,
        }
    }

    /// Whether the answer may carry payloads (and so be big).
    pub(crate) fn big_answer(&self) -> bool {
        matches!(
            self,
            Call::TakeJobs { .. } | Call::TakeResults { .. } | Call::ReadUpdates { .. }
        )
    }

    /// Payload bytes in the call (jobs, outputs, an update).
    pub(crate) fn payload_bytes(&self) -> usize {
        match self {
            Call::Submit { jobs, .. } => jobs.iter().map(|j| j.payload.len()).sum(),
            Call::Complete { outcomes } => outcomes
                .iter()
                .map(|(_, o)| match o {
                    WireOutcome::Output(b) => b.len(),
                    WireOutcome::Failed(..) => 0,
                })
                .sum(),
            Call::PublishUpdate { payload, .. } => payload.len(),
            _ => 0,
        }
    }
}

/// An answer from the host.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Reply {
    Session(Option<SessionInfo>),
    /// `true`: the session is active.
    Alive(bool),
    Done,
    Leased(Vec<WireLeased>),
    Completions(Vec<bool>),
    Abandoned(WireAbandoned),
    Results(Vec<WireResult>),
    Jobs(Vec<JobId>),
    Seq(UpdateSeq),
    Updates(Vec<(UpdateSeq, ByteBuf)>),
    Stats(WireStats),
    Error(WireError),
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct WireNewJob {
    id: JobId,
    payload: ByteBuf,
    update_seq: UpdateSeq,
}

impl From<NewJob> for WireNewJob {
    fn from(j: NewJob) -> Self {
        WireNewJob {
            id: j.id,
            payload: ByteBuf::from(Vec::from(j.payload)),
            update_seq: j.update_seq,
        }
    }
}

impl From<WireNewJob> for NewJob {
    fn from(j: WireNewJob) -> Self {
        NewJob {
            id: j.id,
            payload: Bytes::from(j.payload.into_vec()),
            update_seq: j.update_seq,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct WireLeased {
    lease: Lease,
    payload: ByteBuf,
    update_seq: UpdateSeq,
    log_len: UpdateSeq,
}

impl From<LeasedJob> for WireLeased {
    fn from(j: LeasedJob) -> Self {
        WireLeased {
            lease: j.lease,
            payload: ByteBuf::from(Vec::from(j.payload)),
            update_seq: j.update_seq,
            log_len: j.log_len,
        }
    }
}

impl From<WireLeased> for LeasedJob {
    fn from(j: WireLeased) -> Self {
        LeasedJob {
            lease: j.lease,
            payload: Bytes::from(j.payload.into_vec()),
            update_seq: j.update_seq,
            log_len: j.log_len,
        }
    }
}

/// An attempt's outcome as a node reports it.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum WireOutcome {
    Output(ByteBuf),
    Failed(JobFailure, AttemptEnd),
}

impl From<dc_core::broker::Outcome> for WireOutcome {
    fn from(o: dc_core::broker::Outcome) -> Self {
        match o {
            Ok(bytes) => WireOutcome::Output(ByteBuf::from(Vec::from(bytes))),
            Err((kind, end)) => WireOutcome::Failed(kind, end),
        }
    }
}

impl From<WireOutcome> for dc_core::broker::Outcome {
    fn from(o: WireOutcome) -> Self {
        match o {
            WireOutcome::Output(b) => Ok(Bytes::from(b.into_vec())),
            WireOutcome::Failed(kind, end) => Err((kind, end)),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub(crate) enum WireAbandoned {
    Requeued,
    Failed,
    Stale,
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct WireResult {
    job: JobId,
    attempts: u32,
    outcome: WireJobOutcome,
}

#[derive(Debug, Serialize, Deserialize)]
enum WireJobOutcome {
    Done(ByteBuf),
    Failed {
        kind: JobFailure,
        message: String,
        history: Vec<AttemptRecord>,
    },
}

impl From<JobResult> for WireResult {
    fn from(r: JobResult) -> Self {
        WireResult {
            job: r.job,
            attempts: r.attempts,
            outcome: match r.outcome {
                JobOutcome::Done(b) => WireJobOutcome::Done(ByteBuf::from(Vec::from(b))),
                JobOutcome::Failed {
                    kind,
                    message,
                    history,
                } => WireJobOutcome::Failed {
                    kind,
                    message,
                    history,
                },
            },
        }
    }
}

impl From<WireResult> for JobResult {
    fn from(r: WireResult) -> Self {
        JobResult {
            job: r.job,
            attempts: r.attempts,
            outcome: match r.outcome {
                WireJobOutcome::Done(b) => JobOutcome::Done(Bytes::from(b.into_vec())),
                WireJobOutcome::Failed {
                    kind,
                    message,
                    history,
                } => JobOutcome::Failed {
                    kind,
                    message,
                    history,
                },
            },
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct WireStats {
    workers: u64,
    nodes: u64,
    starting: u64,
    queued: u64,
    running: u64,
    done: u64,
    failed: u64,
    problems: Vec<NodeProblem>,
}

fn count(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

fn size(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

impl From<SessionStats> for WireStats {
    fn from(s: SessionStats) -> Self {
        WireStats {
            workers: count(s.workers),
            nodes: count(s.nodes),
            starting: count(s.starting),
            queued: count(s.queued),
            running: count(s.running),
            done: count(s.done),
            failed: count(s.failed),
            problems: s.problems,
        }
    }
}

impl From<WireStats> for SessionStats {
    fn from(s: WireStats) -> Self {
        SessionStats {
            workers: size(s.workers),
            nodes: size(s.nodes),
            starting: size(s.starting),
            queued: size(s.queued),
            running: size(s.running),
            done: size(s.done),
            failed: size(s.failed),
            problems: s.problems,
        }
    }
}

/// A [`BrokerError`] as the host reports it.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum WireError {
    SessionGone(String),
    PayloadTooLarge { size: u64, limit: u64 },
    Other(String),
}

impl From<BrokerError> for WireError {
    fn from(e: BrokerError) -> Self {
        match e {
            BrokerError::SessionGone(s) => WireError::SessionGone(s),
            BrokerError::PayloadTooLarge { size, limit } => WireError::PayloadTooLarge {
                size: count(size),
                limit: count(limit),
            },
            other => WireError::Other(other.to_string()),
        }
    }
}

impl From<WireError> for BrokerError {
    fn from(e: WireError) -> Self {
        match e {
            WireError::SessionGone(s) => BrokerError::SessionGone(s),
            WireError::PayloadTooLarge { size: s, limit } => BrokerError::PayloadTooLarge {
                size: size(s),
                limit: size(limit),
            },
            WireError::Other(m) => {
                BrokerError::Protocol(format!("the pool hosting the session: {m}").into())
            }
        }
    }
}

/// A reply that is not the one a call expects.
pub(crate) fn unexpected(reply: &Reply) -> BrokerError {
    let shown = format!("{reply:?}");
    let shown: String = shown.chars().take(200).collect();
    BrokerError::Protocol(format!("unexpected answer from the pool: {shown}").into())
}

pub(crate) fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, BrokerError> {
    let mut out = Vec::new();
    ciborium::into_writer(value, &mut out)
        .map_err(|e| BrokerError::Protocol(format!("cannot encode a message: {e}").into()))?;
    Ok(out)
}

pub(crate) fn decode<T: serde::de::DeserializeOwned>(
    what: &str,
    data: &[u8],
) -> Result<T, BrokerError> {
    ciborium::from_reader(data)
        .map_err(|e| BrokerError::Protocol(format!("{what} is not valid: {e}").into()))
}

/// [`encode`], on a blocking thread when `big` (hundreds of MiB take seconds to copy: the
/// runtime's threads keep serving heartbeats meanwhile).
pub(crate) async fn encode_off<T: Serialize + Send + 'static>(
    value: T,
    big: bool,
) -> Result<Vec<u8>, BrokerError> {
    if !big {
        return encode(&value);
    }
    tokio::task::spawn_blocking(move || encode(&value))
        .await
        .map_err(|e| BrokerError::Protocol(format!("encoding a message: {e}").into()))?
}

/// [`decode`], on a blocking thread when the bytes are many.
pub(crate) async fn decode_off<T: serde::de::DeserializeOwned + Send + 'static>(
    what: &'static str,
    bytes: Vec<u8>,
) -> Result<T, BrokerError> {
    if bytes.len() <= crate::link::BULK {
        return decode(what, &bytes);
    }
    tokio::task::spawn_blocking(move || decode(what, &bytes))
        .await
        .map_err(|e| BrokerError::Protocol(format!("decoding {what}: {e}").into()))?
}

/// Payload bytes in leased jobs, results or updates (what makes an answer big).
pub(crate) fn leased_bytes(jobs: &[LeasedJob]) -> usize {
    jobs.iter().map(|j| j.payload.len()).sum()
}

pub(crate) fn result_bytes(results: &[JobResult]) -> usize {
    results
        .iter()
        .map(|r| match &r.outcome {
            JobOutcome::Done(b) => b.len(),
            JobOutcome::Failed { .. } => 0,
        })
        .sum()
}

/// Largest encoded request or answer for payloads of up to `max_payload` bytes.
pub(crate) fn max_message(max_payload: usize) -> usize {
    max_payload.saturating_add(ENVELOPE)
}

/// Cut an encoded request or answer into message bodies.
pub(crate) fn parts(body: &[u8]) -> impl Iterator<Item = Vec<u8>> + '_ {
    let room = PART_BYTES - HEAD;
    let total = body.len().div_ceil(room).max(1);
    let total32 = u32::try_from(total).unwrap_or(u32::MAX);
    (0..total).map(move |i| {
        let chunk = &body[(i * room).min(body.len())..((i + 1) * room).min(body.len())];
        let mut part = Vec::with_capacity(HEAD + chunk.len());
        part.extend_from_slice(MAGIC);
        part.extend_from_slice(&u32::try_from(i).unwrap_or(u32::MAX).to_be_bytes());
        part.extend_from_slice(&total32.to_be_bytes());
        part.extend_from_slice(chunk);
        part
    })
}

/// Puts requests or answers back together from their parts, keyed by whatever identifies one
/// (sender and correlation id). Every byte here came from the network: a part that does not
/// fit what came before drops the whole request, and none grows past `limit`.
#[derive(Debug)]
pub(crate) struct Assembler<K> {
    limit: usize,
    open: HashMap<K, Assembly>,
    /// When abandoned assemblies were last dropped.
    pruned: Instant,
}

#[derive(Debug)]
struct Assembly {
    next: u32,
    total: u32,
    bytes: Vec<u8>,
    touched: Instant,
}

impl<K: std::hash::Hash + Eq + Clone + std::fmt::Debug> Assembler<K> {
    pub(crate) fn new(limit: usize) -> Self {
        Assembler {
            limit,
            open: HashMap::new(),
            pruned: Instant::now(),
        }
    }

    /// Add one message body; `Ok(Some(bytes))` once the last part is in.
    pub(crate) fn add(&mut self, key: K, body: &[u8]) -> Result<Option<Vec<u8>>, String> {
        if body.len() < HEAD || &body[..4] != MAGIC {
            self.open.remove(&key);
            return Err("not a message of this protocol".into());
        }
        let index = u32::from_be_bytes([body[4], body[5], body[6], body[7]]);
        let total = u32::from_be_bytes([body[8], body[9], body[10], body[11]]);
        let chunk = &body[HEAD..];
        let most = self.limit.div_ceil(PART_BYTES - HEAD).max(1);
        if total == 0 || usize::try_from(total).map_or(true, |t| t > most) {
            self.open.remove(&key);
            return Err(format!("{total} parts announced (at most {most})"));
        }
        if index == 0 && total == 1 {
            self.open.remove(&key);
            return Ok(Some(chunk.to_vec()));
        }
        let now = Instant::now();
        if now.duration_since(self.pruned) > ASSEMBLY_TTL / 4 {
            // What a sender that died mid-message left must not stay in memory.
            self.open
                .retain(|_, a| now.duration_since(a.touched) < ASSEMBLY_TTL);
            self.pruned = now;
        }
        if index == 0 {
            if self.open.len() >= MAX_ASSEMBLIES {
                self.open
                    .retain(|_, a| now.duration_since(a.touched) < ASSEMBLY_TTL);
                if self.open.len() >= MAX_ASSEMBLIES {
                    return Err("too many messages in parts at once".into());
                }
            }
            self.open.insert(
                key.clone(),
                Assembly {
                    next: 0,
                    total,
                    bytes: Vec::new(),
                    touched: now,
                },
            );
        }
        let Some(a) = self.open.get_mut(&key) else {
            return Err(format!("part {index} of {total} without its first part"));
        };
        if a.next != index || a.total != total {
            self.open.remove(&key);
            return Err(format!("part {index} of {total} out of order"));
        }
        if a.bytes.len().saturating_add(chunk.len()) > self.limit {
            self.open.remove(&key);
            return Err(format!("longer than {} bytes", self.limit));
        }
        a.bytes.extend_from_slice(chunk);
        a.next += 1;
        a.touched = now;
        if a.next == a.total {
            return Ok(self.open.remove(&key).map(|a| a.bytes));
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_round_trip_and_garbage_is_refused() {
        for len in [
            0,
            1,
            PART_BYTES - HEAD,
            PART_BYTES - HEAD + 1,
            3 * PART_BYTES,
        ] {
            let body: Vec<u8> = (0..len).map(|i| (i % 251).to_le_bytes()[0]).collect();
            let mut asm = Assembler::new(max_message(len));
            let mut out = None;
            let all: Vec<Vec<u8>> = parts(&body).collect();
            for (i, part) in all.iter().enumerate() {
                let got = asm.add(1u8, part).expect("a valid part");
                assert_eq!(got.is_some(), i + 1 == all.len());
                out = out.or(got);
            }
            assert_eq!(out.expect("assembled"), body);
        }
        let mut asm = Assembler::new(1 << 20);
        assert!(asm.add(1u8, b"garbage").is_err());
        assert!(asm.add(1u8, b"DCA1\0\0\0\0\xff\xff\xff\xff").is_err());
        // A second part with no first.
        assert!(asm.add(2u8, b"DCA1\0\0\0\x01\0\0\0\x02xx").is_err());
        // Parts out of order drop the message.
        let body = vec![7u8; 2 * PART_BYTES];
        let mut asm = Assembler::new(max_message(body.len()));
        let all: Vec<Vec<u8>> = parts(&body).collect();
        assert!(asm.add(3u8, &all[0]).expect("first").is_none());
        assert!(asm.add(3u8, &all[2]).is_err());
        assert!(asm.add(3u8, &all[1]).is_err());
    }
}
