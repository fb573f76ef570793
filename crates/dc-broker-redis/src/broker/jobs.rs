//! [`JobQueue`] on Redis: jobs are entries of the session's `jobs` stream, read through one
//! consumer group by `take.lua`, which delivers each entry and records its lease in one atomic
//! step; outcomes are committed first-writer-wins by `complete.lua`. Results are read back in
//! `results.rs`, leases ended in `leases.rs`.
//!
//! 1. `submit` stages big payloads, then runs `submit.lua` per batch (at most 512 jobs and
//!    4 MiB inline); a known job id is skipped, so a retried submit queues nothing twice.
//! 2. `take_jobs` runs `take.lua`. With nothing queued it waits on the `jobs` and `upd`
//!    streams, pipelined with the script (see `waits.rs`), from where this worker's last look
//!    ended; a new update ends the wait empty-handed, so the idle worker applies it.
//! 3. A leased job whose payload is chunked is fetched while its lease is renewed; one that
//!    cannot be read is handed back as a failed attempt, and the batch's other jobs still go.
//! 4. `complete_many` commits outcomes by one `complete.lua` call per session and few MiB of
//!    inline output; each is fenced on its lease, so a stale one is `Discarded`.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use dc_core::broker::{
    Abandoned, AttemptEnd, AttemptRecord, Completion, JobId, JobQueue, JobResult, Lease, LeasedJob,
    NewJob, NodeId, Outcome, SessionId, WorkerId,
};
use dc_core::util::lock;
use dc_core::{BrokerError, JobFailure};
use tokio::time::Instant;

use super::replies::{Held, LeasedRow, Payload, Take, complete_reply, lost_reply, take_reply};
use super::scripts::SCRIPTS;
use super::staging::{Blob, chunk_count, too_large};
use super::{BATCH_BYTES, RedisBroker};
use crate::codec::{bad, to_cbor};

/// A submit script call carries at most this many jobs.
const SUBMIT_BATCH_JOBS: usize = 512;
/// A take script call leases at most this many jobs…
const TAKE_BATCH_JOBS: usize = 256;
/// …and returns at most this many inline payload bytes (at least one job's).
const TAKE_BATCH_BYTES: usize = 4 << 20;
/// Jobs checked per `lost` script call.
const LOST_BATCH: usize = 1000;

/// A stream position seen in a session: entries after `last` are new; `log_len` updates had
/// been published then.
#[derive(Debug, Clone)]
pub(super) struct Cursor {
    session: SessionId,
    last: String,
    log_len: u64,
}

#[async_trait]
impl JobQueue for RedisBroker {
    async fn lost_jobs(
        &self,
        session: &SessionId,
        jobs: &[JobId],
    ) -> Result<Vec<JobId>, BrokerError> {
        let mut lost = Vec::new();
        // Jobs whose results are being read now are not lost.
        let jobs: Vec<JobId> = {
            let reading = lock(&self.inner.reading);
            jobs.iter()
                .filter(|j| !reading.contains(&(session.clone(), j.0)))
                .copied()
                .collect()
        };
        for batch in jobs.chunks(LOST_BATCH) {
            let mut inv = SCRIPTS.lost.prepare_invoke();
            inv.key(self.keys().meta(session))
                .arg(self.keys().base(session));
            for job in batch {
                inv.arg(job.0);
            }
            lost.extend(lost_reply(self.run_in(session, &inv).await?)?);
        }
        Ok(lost)
    }

    async fn submit(&self, session: &SessionId, jobs: Vec<NewJob>) -> Result<(), BrokerError> {
        for job in &jobs {
            too_large(job.payload.len())?;
        }
        let base = self.keys().base(session);
        let meta = self.keys().meta(session);
        let mut batch: Vec<(&NewJob, Blob<'_>)> = Vec::new();
        let mut bytes = 0;
        for (i, job) in jobs.iter().enumerate() {
            let blob = self.put(session, &job.payload).await?;
            bytes += blob.arg().len();
            batch.push((job, blob));
            let last = i + 1 == jobs.len();
            if !(last || bytes >= BATCH_BYTES || batch.len() >= SUBMIT_BATCH_JOBS) {
                continue;
            }
            let mut inv = SCRIPTS.submit.prepare_invoke();
            inv.key(&meta).arg(&base);
            for (job, blob) in &batch {
                inv.arg(job.id.0)
                    .arg(job.update_seq)
                    .arg(chunk_count(job.payload.len(), self.chunk()))
                    .arg(job.payload.len())
                    .arg(blob.mode())
                    .arg(blob.arg());
            }
            self.run_in(session, &inv).await?;
            batch.clear();
            bytes = 0;
        }
        Ok(())
    }

    async fn take_results(
        &self,
        session: &SessionId,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<JobResult>, BrokerError> {
        self.results(session, max, wait).await
    }

    async fn take_jobs(
        &self,
        session: &SessionId,
        node: &NodeId,
        worker: &WorkerId,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<LeasedJob>, BrokerError> {
        let deadline = Instant::now() + wait;
        let jobs_key = self.keys().jobs(session);
        let upd_key = self.keys().updates(session);
        let mut first_log = None;
        let mut inv = SCRIPTS.take.prepare_invoke();
        inv.key(self.keys().meta(session))
            .arg(self.keys().base(session))
            .arg(&node.0)
            .arg(&worker.0)
            .arg(self.inline_max())
            .arg(max.clamp(1, TAKE_BATCH_JOBS))
            .arg(TAKE_BATCH_BYTES)
            .arg(to_cbor(&JobFailure::Broker)?);
        let cursor = lock(&self.inner.job_cursors)
            .get(worker)
            .filter(|c| c.session == *session)
            .cloned();
        let mut reply = match cursor {
            Some(c) if !wait.is_zero() => {
                first_log = Some(c.log_len);
                let log_id = format!("{}-0", c.log_len);
                self.wait_then_run(
                    session,
                    &[&jobs_key, &upd_key],
                    &[&c.last, &log_id],
                    wait,
                    &inv,
                )
                .await?
            }
            _ => self.run_in(session, &inv).await?,
        };
        loop {
            let (last, log_len) = match take_reply(reply, self.keys(), session)? {
                Take::Leased { log_len, jobs } => {
                    let jobs = self.leased(session, node, worker, log_len, jobs).await?;
                    if let Some(job) = jobs.last() {
                        self.set_job_cursor(worker, session, &job.lease.token, job.log_len);
                    }
                    return Ok(jobs);
                }
                Take::Empty { last, log_len } => (last, log_len),
            };
            self.set_job_cursor(worker, session, &last, log_len);
            if *first_log.get_or_insert(log_len) != log_len {
                // An update arrived: hand back nothing so the idle worker applies it now.
                return Ok(Vec::new());
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(Vec::new());
            }
            let log_id = format!("{log_len}-0");
            reply = self
                .wait_then_run(
                    session,
                    &[&jobs_key, &upd_key],
                    &[&last, &log_id],
                    deadline - now,
                    &inv,
                )
                .await?;
        }
    }

    async fn complete(&self, lease: &Lease, outcome: Outcome) -> Result<Completion, BrokerError> {
        let answers = self.complete_many(vec![(lease.clone(), outcome)]).await?;
        answers
            .into_iter()
            .next()
            .ok_or_else(|| bad("no answer for the outcome"))
    }

    async fn complete_many(
        &self,
        outcomes: Vec<(Lease, Outcome)>,
    ) -> Result<Vec<Completion>, BrokerError> {
        let mut answers = Vec::with_capacity(outcomes.len());
        // One script call per session and per few MiB of inline output.
        let mut rest = outcomes.as_slice();
        while let Some((first, _)) = rest.first() {
            let session = &first.session;
            let mut bytes = 0;
            let n = rest
                .iter()
                .take_while(|(lease, outcome)| {
                    let size = match outcome {
                        Ok(b) if b.len() <= self.inline_max() => b.len(),
                        _ => 0,
                    };
                    let fits =
                        lease.session == *session && (bytes == 0 || bytes + size <= BATCH_BYTES);
                    bytes += size;
                    fits
                })
                .count()
                .max(1);
            let (batch, tail) = rest.split_at(n);
            rest = tail;
            answers.extend(self.complete_batch(session, batch).await?);
        }
        Ok(answers)
    }

    async fn abandon(&self, lease: &Lease, end: AttemptEnd) -> Result<Abandoned, BrokerError> {
        let held = Held {
            job: lease.job.0,
            attempt: lease.attempt,
            entry: lease.token.clone(),
            node: lease.node.clone(),
            worker: lease.worker.clone(),
        };
        self.end_attempt(&lease.session, &held, end, false).await
    }
}

impl RedisBroker {
    fn set_job_cursor(&self, worker: &WorkerId, session: &SessionId, last: &str, log_len: u64) {
        let mut cursors = lock(&self.inner.job_cursors);
        if let Some(c) = cursors.get_mut(worker) {
            c.session.clone_from(session);
            c.last.clear();
            c.last.push_str(last);
            c.log_len = log_len;
        } else {
            cursors.insert(
                worker.clone(),
                Cursor {
                    session: session.clone(),
                    last: last.to_string(),
                    log_len,
                },
            );
        }
    }

    /// The jobs a `take` leased, their chunked payloads fetched. A job whose payload cannot
    /// be read is handed back as a failed attempt; the error is returned only when no job is.
    async fn leased(
        &self,
        session: &SessionId,
        node: &NodeId,
        worker: &WorkerId,
        log_len: u64,
        rows: Vec<LeasedRow>,
    ) -> Result<Vec<LeasedJob>, BrokerError> {
        let mut jobs = Vec::with_capacity(rows.len());
        let mut failure = None;
        for row in rows {
            let lease = Lease {
                session: session.clone(),
                job: JobId(row.job),
                attempt: row.attempt,
                node: node.clone(),
                worker: worker.clone(),
                token: row.entry,
            };
            let payload = async {
                let body = row.body?;
                let payload = match body.payload {
                    Payload::Inline(data) => Bytes::from(data),
                    Payload::Chunked { key, n, len } => {
                        self.fetch_leased(&lease, &key, n, len).await?
                    }
                };
                Ok::<_, BrokerError>((payload, body.update_seq))
            }
            .await;
            match payload {
                Ok((payload, update_seq)) => jobs.push(LeasedJob {
                    lease,
                    payload,
                    update_seq,
                    log_len,
                }),
                Err(e) => {
                    // Leased but unreadable: hand it back as a failed attempt now (it fails for
                    // good after max attempts), and still hand out the batch's other jobs.
                    tracing::error!(job = %lease.job, error = %e, "cannot read a leased job's payload");
                    let end = AttemptEnd::Protocol(format!("its payload cannot be read: {e}"));
                    if let Err(e) = self.abandon(&lease, end).await {
                        tracing::warn!(job = %lease.job, error = %e, "cannot hand the job back; its lease will expire");
                    }
                    failure.get_or_insert(e);
                }
            }
        }
        match failure {
            Some(e) if jobs.is_empty() => Err(e),
            _ => Ok(jobs),
        }
    }

    /// One `complete` script call for outcomes of one session (outputs over the inline limit
    /// are staged first).
    async fn complete_batch(
        &self,
        session: &SessionId,
        batch: &[(Lease, Outcome)],
    ) -> Result<Vec<Completion>, BrokerError> {
        let mut args = Vec::with_capacity(batch.len());
        for (lease, outcome) in batch {
            let (kind, failure, message, end, blob, len) = match outcome {
                Ok(output) => {
                    too_large(output.len())?;
                    let blob = self.put(session, output).await?;
                    let len = output.len();
                    (
                        "d",
                        Vec::new(),
                        String::new(),
                        AttemptEnd::Completed,
                        blob,
                        len,
                    )
                }
                Err((kind, end)) => {
                    let message = match end {
                        AttemptEnd::WorkerError(m) | AttemptEnd::Undecodable(m) => m.clone(),
                        other => other.to_string(),
                    };
                    ("f", to_cbor(kind)?, message, end.clone(), Blob::None, 0)
                }
            };
            let record = to_cbor(&AttemptRecord {
                attempt: lease.attempt,
                node: lease.node.clone(),
                worker: lease.worker.clone(),
                end,
            })?;
            args.push((lease, kind, failure, message, record, blob, len));
        }
        let mut inv = SCRIPTS.complete.prepare_invoke();
        inv.key(self.keys().meta(session))
            .arg(self.keys().base(session));
        for (lease, kind, failure, message, record, blob, len) in &args {
            let chunks = if *kind == "d" {
                chunk_count(*len, self.chunk())
            } else {
                0
            };
            inv.arg(lease.job.0)
                .arg(lease.attempt)
                .arg(&lease.token)
                .arg(&lease.node.0)
                .arg(record)
                .arg(*kind)
                .arg(failure)
                .arg(message)
                .arg(chunks)
                .arg(*len)
                .arg(blob.mode())
                .arg(blob.arg());
        }
        complete_reply(self.run_in(session, &inv).await?, batch.len())
    }
}
