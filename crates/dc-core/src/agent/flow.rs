//! The batching engine of a slot: jobs flow from the broker to the worker process and their
//! outcomes back. Outcomes are reported, and jobs taken ahead, in one background exchange that
//! overlaps the running job; tiny jobs are sent to the worker behind the one it runs; jobs held
//! ahead go back to the queue when the running job outlives them (the policy is `Pace`'s).

use std::collections::VecDeque;
use std::time::Duration;

use tokio::sync::watch;

use super::pace::{AHEAD_BYTES, MAX_AHEAD, PIPE_AHEAD, Pace};
use super::slot::SlotExit;
use super::updates::{UpdateLog, apply_updates, report_update_errors};
use super::worker_proc::{Incoming, JobReply, WorkerProc, describe};
use super::{NodeShared, report, retry_backoff};
use crate::broker::{
    AttemptEnd, JobId, Lease, LeasedJob, Outcome, SessionInfo, UpdateSeq, WorkerId, WorkerState,
};
use crate::error::{BrokerError, JobFailure};
use crate::util::lock;

/// What one background broker exchange did: outcomes reported, jobs taken.
struct Exchange {
    reported: Vec<JobId>,
    taken: Result<Vec<LeasedJob>, BrokerError>,
    took: Duration,
}

/// Report finished outcomes and take up to `want` more jobs (without waiting), concurrently.
/// The jobs taken join the lease table as soon as the take answers, while the report may go on
/// (lease rule 1 in the module docs).
async fn exchange(
    shared: &NodeShared,
    info: &SessionInfo,
    slot: usize,
    worker: &WorkerId,
    outcomes: Vec<(Lease, Outcome)>,
    want: usize,
) -> Exchange {
    let started = tokio::time::Instant::now();
    let broker = shared.broker.as_ref();
    let reported: Vec<JobId> = outcomes.iter().map(|(l, _)| l.job).collect();
    let report = async {
        if let Some((first, _)) = outcomes.first() {
            report(first, || broker.complete_many(outcomes.clone())).await;
        }
    };
    let take = async {
        if want == 0 {
            return Ok(Vec::new());
        }
        let taken = broker
            .take_jobs(
                &info.id,
                &shared.config.node_id,
                worker,
                want,
                Duration::ZERO,
            )
            .await;
        if let Ok(jobs) = &taken {
            let mut leases = lock(&shared.leases);
            for job in jobs {
                leases.insert((slot, job.lease.job), job.lease.clone());
            }
        }
        taken
    };
    let ((), taken) = tokio::join!(report, take);
    Exchange {
        reported,
        taken,
        took: started.elapsed(),
    }
}

/// A slot's jobs between the broker and its worker: taken ahead, and finished but not yet
/// reported (each holding a lease, see the module docs).
struct Flow<'a> {
    shared: &'a NodeShared,
    info: &'a SessionInfo,
    slot: usize,
    worker_id: &'a WorkerId,
    ahead: VecDeque<LeasedJob>,
    done: Vec<(Lease, Outcome)>,
    pace: Pace,
    /// The broker said the session is gone.
    gone: bool,
}

impl<'a> Flow<'a> {
    fn ahead_bytes(&self) -> usize {
        self.ahead.iter().map(|j| j.payload.len()).sum()
    }

    /// Jobs to take now, given what is held ahead: up to the depth, and no more payload bytes
    /// (at the jobs' average size) than `AHEAD_BYTES`; one at least when the worker has
    /// nothing else to run (`idle`: nothing held, nothing sent behind its current job).
    fn want(&self, idle: bool) -> usize {
        let depth = self.pace.depth(self.info.spec.auto_batching);
        let fit = match self.pace.payload() {
            Some(avg) if avg >= 1.0 => {
                crate::util::saturating_count(AHEAD_BYTES as f64 / avg).max(1)
            }
            _ => MAX_AHEAD,
        };
        if idle && self.ahead.is_empty() {
            return depth.min(fit).max(1);
        }
        if depth == 0 || self.ahead.len() > depth / 2 || self.ahead_bytes() >= AHEAD_BYTES {
            return 0;
        }
        (depth - self.ahead.len()).min(fit)
    }

    /// Start a background exchange if one is due: outcomes to report, or jobs to top up.
    /// `idle`: the worker has no job sent behind its current one.
    fn start(&mut self, idle: bool) -> Option<futures::future::BoxFuture<'a, Exchange>> {
        let want = if self.gone { 0 } else { self.want(idle) };
        // Nothing to report and nothing held: the idle path's blocking take is next, not a
        // look that finds the queue empty over and over.
        if self.done.is_empty() && (want == 0 || self.ahead.is_empty()) {
            return None;
        }
        let outcomes = std::mem::take(&mut self.done);
        let (shared, info, slot, worker) = (self.shared, self.info, self.slot, self.worker_id);
        Some(Box::pin(exchange(
            shared, info, slot, worker, outcomes, want,
        )))
    }

    /// Take in an exchange's answer.
    fn finish(&mut self, ex: Exchange) {
        {
            let mut leases = lock(&self.shared.leases);
            for job in &ex.reported {
                leases.remove(&(self.slot, *job));
            }
        }
        self.pace.note_exchange(ex.took);
        match ex.taken {
            Ok(jobs) => self.hold(jobs),
            Err(BrokerError::SessionGone(_)) => self.gone = true,
            Err(e) => {
                tracing::debug!(worker = %self.worker_id, error = %e, "taking jobs ahead failed")
            }
        }
    }

    /// Hand every job held ahead back to the queue, in order, unstarted and uncharged (the
    /// running job outlived what they were taken for).
    fn give_back(&mut self) -> futures::future::BoxFuture<'a, ()> {
        let jobs: Vec<LeasedJob> = self.ahead.drain(..).collect();
        let (shared, slot) = (self.shared, self.slot);
        tracing::debug!(worker = %self.worker_id, jobs = jobs.len(), "handing jobs taken ahead back to the queue: the running job outlived them");
        Box::pin(async move {
            let returns = jobs.iter().map(|job| async move {
                let lease = &job.lease;
                report(lease, || shared.broker.abandon(lease, AttemptEnd::Returned)).await;
                lock(&shared.leases).remove(&(slot, lease.job));
            });
            futures::future::join_all(returns).await;
        })
    }

    /// Hold newly leased jobs (their leases renewed from now on, if they were not already).
    fn hold(&mut self, jobs: Vec<LeasedJob>) {
        let mut leases = lock(&self.shared.leases);
        for job in jobs {
            self.pace.note_payload(job.payload.len());
            leases.insert((self.slot, job.lease.job), job.lease.clone());
            self.ahead.push_back(job);
        }
    }
}

/// Run jobs on the slot's worker process until the session ends or the worker must be
/// replaced; whatever finished is reported before this returns.
pub(super) async fn serve_jobs(
    shared: &NodeShared,
    info: &SessionInfo,
    slot: usize,
    worker_id: &WorkerId,
    log: &UpdateLog,
    proc: &mut WorkerProc,
    cancel: &mut watch::Receiver<bool>,
) -> SlotExit {
    let mut flow = Flow {
        shared,
        info,
        slot,
        worker_id,
        ahead: VecDeque::new(),
        done: Vec::new(),
        pace: Pace::default(),
        gone: false,
    };
    let mut inflight: Option<futures::future::BoxFuture<'_, Exchange>> = None;
    let exit = serve_flow(&mut flow, &mut inflight, log, proc, cancel).await;
    // Whatever finished is reported before the slot lets go; jobs still held go back to the
    // queue with `release_slot_leases`.
    if let Some(ex) = inflight.take() {
        let ex = ex.await;
        flow.finish(ex);
    }
    flow.gone = true;
    if let Some(ex) = flow.start(true) {
        let ex = ex.await;
        flow.finish(ex);
    }
    exit
}

async fn serve_flow<'a>(
    flow: &mut Flow<'a>,
    inflight: &mut Option<futures::future::BoxFuture<'a, Exchange>>,
    log: &UpdateLog,
    proc: &mut WorkerProc,
    cancel: &mut watch::Receiver<bool>,
) -> SlotExit {
    let (shared, info, slot, worker_id) = (flow.shared, flow.info, flow.slot, flow.worker_id);
    let broker = shared.broker.as_ref();
    let mut applied: UpdateSeq = 0;
    let mut backoff = retry_backoff();
    // Jobs already sent to the worker behind the one it runs (pipelined tiny jobs).
    let mut sent: VecDeque<LeasedJob> = VecDeque::new();
    // Whether jobs may be sent behind the next one: not after the worker waited on the broker.
    // The first job after a wait is run alone and timed, so a burst of long jobs that follows
    // tiny ones never has one of them sent to wait behind another.
    let mut pipe_ok = false;
    loop {
        // Catch up with every update this node knows of before the next job (never while a job
        // is in the worker's pipe: its answer comes first).
        if sent.is_empty()
            && log.known() > applied
            && let Err(end) = apply_updates(proc, log, &mut applied).await
        {
            tracing::warn!(worker = %worker_id, "worker died while applying updates: {end}");
            return SlotExit::Restart;
        }
        report_update_errors(shared, &info.id, worker_id, proc).await;
        if inflight.is_none() {
            *inflight = flow.start(sent.is_empty());
        }
        let was_sent = !sent.is_empty();
        let Some(job) = sent.pop_front().or_else(|| flow.ahead.pop_front()) else {
            if let Some(ex) = inflight.take() {
                // Nothing to run until the exchange in flight answers: report and take in one
                // round trip.
                let ex = tokio::select! {
                    biased;
                    _ = cancel.changed() => return SlotExit::Done,
                    ex = ex => ex,
                };
                flow.finish(ex);
                pipe_ok = false;
                if flow.gone {
                    return SlotExit::Done;
                }
                if flow.ahead.is_empty() {
                    shared.set_state(slot, Some(&info.id), WorkerState::Idle);
                }
                continue;
            }
            if flow.gone {
                return SlotExit::Done;
            }
            // Idle: wait for jobs, and take one: it runs now and is timed before any other is
            // held for this worker (the pool's jobs may be other than those measured so far).
            pipe_ok = false;
            let taken = tokio::select! {
                biased;
                _ = cancel.changed() => return SlotExit::Done,
                // An idle worker says nothing; a frame or a closed channel means it broke or died.
                frame = proc.frames.recv() => {
                    let what = match frame {
                        Some(Ok(Incoming::Msg(msg))) => format!("sent {} unprompted", describe(&msg)),
                        Some(Ok(Incoming::Output { job_id, .. })) => {
                            format!("sent a Result for job {job_id} unprompted")
                        }
                        Some(Err(e)) => e.to_string(),
                        None => "closed its channel".into(),
                    };
                    let end = proc.death().await;
                    tracing::warn!(worker = %worker_id, "idle worker {what}: {end}; restarting it");
                    return SlotExit::Restart;
                }
                r = broker.take_jobs(&info.id, &shared.config.node_id, worker_id, 1, shared.config.poll) => r,
            };
            match taken {
                Ok(jobs) if jobs.is_empty() => {
                    // Idle (or woken by an update): refresh the log so idle workers apply it now.
                    if let Err(e) = log.fetch(broker, None).await {
                        if matches!(e, BrokerError::SessionGone(_)) {
                            return SlotExit::Done;
                        }
                        tracing::debug!(error = %e, "update log refresh failed");
                    }
                }
                Ok(jobs) => {
                    backoff = retry_backoff();
                    flow.hold(jobs);
                }
                Err(BrokerError::SessionGone(_)) => return SlotExit::Done,
                Err(e) => {
                    tracing::warn!(worker = %worker_id, error = %e, "cannot take a job; retrying");
                    tokio::time::sleep(backoff.next_pause()).await;
                }
            }
            continue;
        };
        shared.set_state(slot, Some(&info.id), WorkerState::Busy);
        let started = tokio::time::Instant::now();
        // Tiny jobs: keep a few more in the worker's channel, unless an update is due first
        // (this job's updates are applied before it runs; a later one waits for the pipe to
        // drain).
        let updated = applied.max(job.update_seq.max(job.log_len));
        let room = if pipe_ok {
            PIPE_AHEAD
                .min(flow.pace.depth(info.spec.auto_batching))
                .saturating_sub(sent.len())
        } else {
            0
        };
        pipe_ok = true;
        let mut next = Vec::new();
        if log.known() <= updated {
            while next.len() < room
                && flow
                    .ahead
                    .front()
                    .is_some_and(|n| n.update_seq.max(n.log_len) <= updated)
            {
                next.extend(flow.ahead.pop_front());
            }
        }
        // Run the job; meanwhile the exchange in flight (if any) reports and takes ahead.
        let (step, written) = {
            let dispatch = Dispatch {
                job: &job,
                sent: was_sent,
                next: &next,
            };
            let run = run_one(shared, proc, log, &mut applied, dispatch, cancel);
            tokio::pin!(run);
            // Jobs held ahead go back to the queue once this one outlives what they were taken
            // for (see `Pace`); jobs an exchange brings in after that go back as they arrive.
            let give_back_at = started + flow.pace.give_back_after();
            let mut returning: Option<futures::future::BoxFuture<'a, ()>> = None;
            let step = loop {
                tokio::select! {
                    biased;
                    step = &mut run => break step,
                    ex = some_or_pending(inflight.as_mut()) => {
                        *inflight = None;
                        flow.finish(ex);
                    }
                    () = some_or_pending(returning.as_mut()) => returning = None,
                    () = tokio::time::sleep_until(give_back_at),
                        if returning.is_none() && !flow.ahead.is_empty() =>
                    {
                        returning = Some(flow.give_back());
                    }
                }
            };
            if let Some(returning) = returning {
                returning.await;
            }
            step
        };
        // Jobs that could not be written are not in the worker's channel: back to the front.
        let unsent = next.split_off(written.min(next.len()));
        sent.extend(next);
        for job in unsent.into_iter().rev() {
            flow.ahead.push_front(job);
        }
        match step {
            JobStep::Done(outcome) => {
                flow.pace.note_job(started.elapsed());
                flow.done.push((job.lease, outcome));
            }
            JobStep::Cancelled => {
                lock(&shared.leases).remove(&(slot, job.lease.job));
                return SlotExit::Abort;
            }
            JobStep::WorkerBroken => {
                lock(&shared.leases).remove(&(slot, job.lease.job));
                shared.set_state(slot, Some(&info.id), WorkerState::Idle);
                return SlotExit::Restart;
            }
        }
        if sent.is_empty() && flow.ahead.is_empty() && inflight.is_none() {
            shared.set_state(slot, Some(&info.id), WorkerState::Idle);
        }
    }
}

/// Await `f` if there is one; never finish otherwise (a `select!` branch that is off).
async fn some_or_pending<F: std::future::Future + Unpin>(f: Option<&mut F>) -> F::Output {
    match f {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

/// How a job's run ended.
enum JobStep {
    /// The worker answered: the result (or its error) to report.
    Done(Outcome),
    /// The session ended first.
    Cancelled,
    /// The worker died or broke the protocol (the attempt is already handed back).
    WorkerBroken,
}

/// A job to run and what goes with it on the worker's channel.
struct Dispatch<'j> {
    job: &'j LeasedJob,
    /// Already sent (it went along behind the previous job).
    sent: bool,
    /// Jobs to send along behind this one (and behind those sent before).
    next: &'j [LeasedJob],
}

/// Run one leased job on the worker; a broken attempt is handed back to the broker here, a
/// finished one is returned for the caller to report. Also returns how many of the jobs in
/// `next` were written to the worker's channel (the rest are still the slot's to run).
async fn run_one(
    shared: &NodeShared,
    proc: &mut WorkerProc,
    log: &UpdateLog,
    applied: &mut UpdateSeq,
    dispatch: Dispatch<'_>,
    cancel: &mut watch::Receiver<bool>,
) -> (JobStep, usize) {
    let Dispatch { job, sent, next } = dispatch;
    let mut written = 0;
    let broker = shared.broker.as_ref();
    let lease = &job.lease;
    let need = job.update_seq.max(job.log_len);
    let run = async {
        if !sent {
            if need > *applied {
                if let Err(e) = log.fetch(broker, Some(need)).await {
                    tracing::warn!(job = %lease.job, error = %e, "cannot read the update log");
                }
                apply_updates(proc, log, applied).await?;
            }
            proc.send_job(job).await?;
        }
        for next in next {
            // Pipelined: the worker finds the next job waiting when it answers this one. A
            // failed send means the worker died, but not necessarily on this job: the replies,
            // read in order, tell which job it was running (the first one unanswered).
            if let Err(e) = proc.write_job(next).await {
                tracing::debug!(job = %next.lease.job, error = %e, "cannot send a job ahead");
                break;
            }
            written += 1;
        }
        proc.job_reply(job.lease.job.0).await
    };
    let reply = tokio::select! {
        biased;
        _ = cancel.changed() => None,
        r = run => Some(r),
    };
    let Some(reply) = reply else {
        return (JobStep::Cancelled, written);
    };
    let step = match reply {
        Ok(JobReply::Output(bytes)) => JobStep::Done(Ok(bytes)),
        Ok(JobReply::Failed {
            message,
            undecodable,
        }) => {
            let (kind, end) = if undecodable {
                (JobFailure::Codec, AttemptEnd::Undecodable(message))
            } else {
                (JobFailure::Worker, AttemptEnd::WorkerError(message))
            };
            JobStep::Done(Err((kind, end)))
        }
        Err(end) => {
            tracing::warn!(job = %lease.job, attempt = lease.attempt, worker = %lease.worker, "attempt failed: {end}");
            report(lease, || broker.abandon(lease, end.clone())).await;
            JobStep::WorkerBroken
        }
    };
    (step, written)
}
