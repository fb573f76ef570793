//! A slot's pace: how long its jobs run and how long a broker exchange takes, measured as it
//! goes, and the batching policy drawn from them (how many jobs to take ahead of the running
//! one, how many to send behind it, and when to hand the ones taken ahead back).

use std::time::Duration;

/// Most jobs a slot keeps sent to its worker behind the one it runs (tiny jobs only). A job
/// in the worker's channel cannot be handed back, so this bounds how many jobs wait behind
/// one that turns out long: one (more gains the local pool some throughput, and makes a job
/// wait behind several long ones when long jobs follow tiny ones in one stream).
pub(super) const PIPE_AHEAD: usize = 1;
/// Jobs shorter than this are pipelined to the worker whatever the broker's round trip: the
/// agent's own turnaround between a result and the next job (tens of µs) would otherwise idle
/// the worker.
const SHORT_JOB: Duration = Duration::from_millis(1);
/// Most jobs a slot holds taken ahead of the one it runs (automatic batching).
pub(super) const MAX_AHEAD: usize = 64;
/// Payload bytes a slot holds taken ahead at most (it tops up only below this).
pub(super) const AHEAD_BYTES: usize = 64 << 20;
/// A slot takes jobs ahead only while a broker round trip is at least this fraction of a job's
/// run time: longer jobs gain nothing from it, and a job held ahead is one another idle worker
/// cannot start.
const AHEAD_MIN_RATIO: f64 = 0.05;
/// The least time a job runs before the jobs held ahead of it are handed back: scheduling
/// noise on a busy machine must not send a batch of tiny jobs back and forth.
const GIVE_BACK_FLOOR: Duration = Duration::from_millis(2);

/// A slot's measured pace: how long its jobs run and how long a broker exchange takes
/// (moving averages), which set how many jobs it takes ahead.
///
/// The rules that keep batching from holding work an idle worker could run:
/// - an idle slot takes one job, and runs it alone and timed before holding more (the pool's
///   next jobs may be unlike those measured so far); so does the first job after any wait;
/// - jobs are taken ahead only when they are short next to a round trip, and a slow job raises
///   the estimate at once ([`Pace::note_job`]);
/// - a slot whose running job outlives what its jobs ahead were taken for
///   ([`Pace::give_back_after`]) hands them back to the queue at once, unstarted and
///   uncharged, for any idle worker to take;
/// - at most `PIPE_AHEAD` (one) job waits in the worker's channel, the only place a job cannot
///   be handed back from.
#[derive(Debug, Default)]
pub(super) struct Pace {
    /// Moving average of a job's run time, in µs.
    job_us: Option<f64>,
    /// Moving average of a broker exchange, in µs.
    io_us: Option<f64>,
    /// Moving average of payload sizes, in bytes.
    payload: Option<f64>,
}

impl Pace {
    /// Fold `x` into a moving average.
    fn note(avg: &mut Option<f64>, x: f64) {
        *avg = Some(match *avg {
            Some(a) => 0.8 * a + 0.2 * x,
            None => x,
        });
    }

    /// Fold in how long a broker exchange took.
    pub(super) fn note_exchange(&mut self, d: Duration) {
        Pace::note(&mut self.io_us, d.as_secs_f64() * 1e6);
    }

    /// Fold in the size of a job's payload.
    pub(super) fn note_payload(&mut self, bytes: usize) {
        Pace::note(&mut self.payload, bytes as f64);
    }

    /// The jobs' average payload size in bytes, once one was seen.
    pub(super) fn payload(&self) -> Option<f64> {
        self.payload
    }

    /// Fold in a job's run time. A job slower than the average counts at once (the estimate
    /// becomes at least half of it), faster ones fold in slowly: a slot that meets long jobs
    /// after tiny ones stops taking ahead from its next take on, and takes ahead again only
    /// after a run of short jobs.
    pub(super) fn note_job(&mut self, d: Duration) {
        let x = d.as_secs_f64() * 1e6;
        Pace::note(&mut self.job_us, x);
        if let Some(avg) = self.job_us.as_mut() {
            *avg = avg.max(x / 2.0);
        }
    }

    /// How long a job may run before the jobs held ahead of it go back to the queue: what they
    /// were taken for (two of the job's estimated run times plus two round trips, the batch's
    /// horizon), and at least `GIVE_BACK_FLOOR`. A job held ahead thus waits at most about this
    /// long, then one round trip until an idle worker has it.
    pub(super) fn give_back_after(&self) -> Duration {
        let horizon_us = 2.0 * self.job_us.unwrap_or(0.0) + 2.0 * self.io_us.unwrap_or(0.0);
        Duration::from_secs_f64(horizon_us / 1e6).max(GIVE_BACK_FLOOR)
    }

    /// Jobs to hold taken ahead of the running one: about two round trips' worth of jobs, so
    /// that the worker never waits on the broker, and for jobs under `SHORT_JOB` at least
    /// enough to keep `PIPE_AHEAD` in the worker's channel (so it never waits on the agent's
    /// turnaround either); none for jobs long next to a round trip, or with batching off.
    pub(super) fn depth(&self, batching: bool) -> usize {
        let (Some(job), Some(io)) = (self.job_us, self.io_us) else {
            return 0;
        };
        if !batching {
            return 0;
        }
        let ratio = io / job.max(1.0);
        let by_round_trip = if ratio < AHEAD_MIN_RATIO {
            0
        } else {
            crate::util::saturating_count((2.0 * ratio).ceil()).clamp(1, MAX_AHEAD)
        };
        let by_turnaround = if job < SHORT_JOB.as_secs_f64() * 1e6 {
            PIPE_AHEAD
        } else {
            0
        };
        by_round_trip.max(by_turnaround)
    }
}
