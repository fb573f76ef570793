//! `JobQueue::take_results` on Redis: `take_results.lua` reads up to `max` notices of the
//! session's `results` stream and deletes them, so each result is handed out once.
//!
//! 1. With no notice, the pool waits on the `results` stream from the last notice it saw,
//!    pipelined with the script (see `waits.rs`).
//! 2. The jobs whose notices were read are marked as being read until their results are in
//!    hand, so `lost_jobs` does not count them lost while a big output is fetched.
//! 3. A small output comes in its notice; a big one is fetched by chunks from `out:<id>`, then
//!    unlinked. If the fetch fails for a reason that may pass (a connection), the notice is put
//!    back so that a retry finds the result again.
//! 4. A notice damaged past its job id fails that job (`JobFailure::Broker`, saying what was
//!    wrong) rather than leaving its pool waiting for a result that can never be read.

use std::collections::HashSet;
use std::time::Duration;

use dc_core::broker::{JobId, JobOutcome, JobResult, SessionId};
use dc_core::util::lock;
use dc_core::{BrokerError, JobFailure};
use redis::Value;
use tokio::time::Instant;

use super::RedisBroker;
use super::replies::{Committed, NoticeRow, Payload, results_reply};
use super::scripts::SCRIPTS;

/// Jobs in `Inner::reading` while their results are read; out of it when dropped.
struct Reading<'a> {
    set: &'a std::sync::Mutex<HashSet<(SessionId, u64)>>,
    jobs: Vec<(SessionId, u64)>,
}

impl Drop for Reading<'_> {
    fn drop(&mut self) {
        let mut set = lock(self.set);
        for job in &self.jobs {
            set.remove(job);
        }
    }
}

impl RedisBroker {
    /// See [`dc_core::broker::JobQueue::take_results`].
    pub(super) async fn results(
        &self,
        session: &SessionId,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<JobResult>, BrokerError> {
        let deadline = Instant::now() + wait;
        let results_key = self.keys().results(session);
        let mut inv = SCRIPTS.take_results.prepare_invoke();
        inv.key(self.keys().meta(session))
            .arg(self.keys().base(session))
            .arg(max.max(1))
            .arg(self.inline_max());
        let cursor = lock(&self.inner.result_cursor)
            .as_ref()
            .filter(|(s, _)| s == session)
            .map(|(_, last)| last.clone());
        let mut reply = match cursor {
            Some(last) if !wait.is_zero() => {
                self.wait_then_run(session, &[&results_key], &[&last], wait, &inv)
                    .await?
            }
            _ => self.run_in(session, &inv).await?,
        };
        loop {
            let read = results_reply(reply, self.keys(), session)?;
            *lock(&self.inner.result_cursor) = Some((session.clone(), read.last.clone()));
            if let Some(notices) = read.notices {
                return self.read_notices(session, notices).await;
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(Vec::new());
            }
            reply = self
                .wait_then_run(
                    session,
                    &[&results_key],
                    &[&read.last],
                    deadline - now,
                    &inv,
                )
                .await?;
        }
    }

    /// The results of the notices read; a notice that cannot be read is dropped (and said),
    /// and its error returned only when no result is.
    async fn read_notices(
        &self,
        session: &SessionId,
        notices: Vec<Result<NoticeRow, BrokerError>>,
    ) -> Result<Vec<JobResult>, BrokerError> {
        let jobs: Vec<(SessionId, u64)> = notices
            .iter()
            .filter_map(|n| n.as_ref().ok())
            .map(|n| (session.clone(), n.job))
            .collect();
        lock(&self.inner.reading).extend(jobs.iter().cloned());
        let _reading = Reading {
            set: &self.inner.reading,
            jobs,
        };
        let mut got = Vec::new();
        let mut first_error = None;
        for notice in notices {
            let result = match notice {
                Ok(row) => self.result_of(session, row).await,
                Err(e) => Err(e),
            };
            match result {
                Ok(r) => got.push(r),
                Err(e) => {
                    tracing::error!(session = %session, error = %e, "dropping a result notice that cannot be read");
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) if got.is_empty() => Err(e),
            _ => Ok(got),
        }
    }

    /// The result a notice announces, its output fetched when chunked.
    async fn result_of(
        &self,
        session: &SessionId,
        row: NoticeRow,
    ) -> Result<JobResult, BrokerError> {
        let job = row.job;
        let outcome = match row.outcome {
            Ok(Committed::Done(Payload::Inline(data))) => Ok(JobOutcome::Done(data.into())),
            Ok(Committed::Done(Payload::Chunked { key, n, len })) => {
                let fetched = self.fetch(&key, n, len).await;
                let mut cmd;
                if matches!(fetched, Ok(_) | Err(BrokerError::Protocol(_))) {
                    cmd = redis::cmd("UNLINK");
                    cmd.arg(&key);
                } else {
                    // Put the notice back so that a retry finds the result again.
                    cmd = redis::cmd("XADD");
                    cmd.arg(self.keys().results(session))
                        .arg("*")
                        .arg("j")
                        .arg(job);
                }
                let _ = self.command::<Value>(&cmd).await;
                fetched.map(JobOutcome::Done)
            }
            Ok(Committed::Failed {
                kind,
                message,
                history,
            }) => Ok(JobOutcome::Failed {
                kind,
                message,
                history,
            }),
            Err(e) => Err(e),
        };
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(BrokerError::Protocol(what)) => {
                tracing::warn!(job, %what, "a job's result in the broker is damaged; the job fails");
                JobOutcome::Failed {
                    kind: JobFailure::Broker,
                    message: format!("its result in the broker is damaged: {what}"),
                    history: Vec::new(),
                }
            }
            Err(e) => return Err(e),
        };
        Ok(JobResult {
            job: JobId(job),
            attempts: row.attempts,
            outcome,
        })
    }
}
