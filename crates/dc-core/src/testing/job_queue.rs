//! Conformance cases of [`JobQueue`](crate::broker::JobQueue): leases, outcomes, fencing, results once each.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::*;
use crate::broker::{Abandoned, AttemptEnd, Broker, Completion, JobId, JobOutcome, JobResult};
use crate::error::JobFailure;

/// Two nodes taking concurrently get every job exactly once, attempt 1.
pub async fn jobs_are_leased_once_each(broker: Arc<dyn Broker>) {
    let s = open(broker.as_ref(), Duration::from_secs(30), 3).await;
    broker.submit(&s.id, jobs(0..60)).await.expect("submit");
    let mut takers = Vec::new();
    for n in ["node-a", "node-b"] {
        let broker = broker.clone();
        let sid = s.id.clone();
        takers.push(tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(job) = take(broker.as_ref(), &sid, n).await {
                assert_eq!(job.lease.attempt, 1);
                assert_eq!(job.lease.node, node(n));
                assert_eq!(job.payload.as_ref(), job.lease.job.0.to_le_bytes());
                got.push(job.lease.job);
            }
            got
        }));
    }
    let mut all = Vec::new();
    for t in takers {
        all.extend(t.await.expect("taker"));
    }
    let unique: HashSet<JobId> = all.iter().copied().collect();
    assert_eq!(all.len(), 60, "every job leased once: {all:?}");
    assert_eq!(unique.len(), 60);
}

/// With nothing queued, `take_job` waits about `wait` and returns `None`.
pub async fn take_job_waits_then_gives_none(broker: Arc<dyn Broker>) {
    let s = open(broker.as_ref(), Duration::from_secs(30), 3).await;
    let started = Instant::now();
    let got = broker
        .take_job(
            &s.id,
            &node("n"),
            &worker("n", 0),
            Duration::from_millis(300),
        )
        .await
        .expect("take_job");
    assert!(got.is_none());
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "take_job overran its wait: {:?}",
        started.elapsed()
    );
}

/// A waiting `take_job` gets a job submitted while it waits, long before its wait ends.
pub async fn take_job_wakes_on_submit(broker: Arc<dyn Broker>) {
    let s = open(broker.as_ref(), Duration::from_secs(30), 3).await;
    let taker = {
        let broker = broker.clone();
        let sid = s.id.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let job = broker
                .take_job(&sid, &node("n"), &worker("n", 0), Duration::from_secs(8))
                .await
                .expect("take_job");
            (job, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    broker.submit(&s.id, jobs(7..8)).await.expect("submit");
    let (job, waited) = taker.await.expect("taker");
    assert_eq!(job.expect("the submitted job").lease.job, JobId(7));
    assert!(waited < Duration::from_secs(5), "woke late: {waited:?}");
}

/// A job's first result is kept; a second complete of the same lease is discarded.
pub async fn results_first_writer_wins(broker: Arc<dyn Broker>) {
    let s = open(broker.as_ref(), Duration::from_secs(30), 3).await;
    broker.submit(&s.id, jobs(0..1)).await.expect("submit");
    let job = take(broker.as_ref(), &s.id, "n").await.expect("a job");
    let first = broker
        .complete(&job.lease, Ok(Bytes::from_static(b"first")))
        .await
        .expect("complete");
    let second = broker
        .complete(&job.lease, Ok(Bytes::from_static(b"second")))
        .await
        .expect("complete");
    assert_eq!(first, Completion::Accepted);
    assert_eq!(second, Completion::Discarded);
    let results = all_results(broker.as_ref(), &s.id, 1).await;
    assert_eq!(results.len(), 1);
    assert_eq!(results[0].job, JobId(0));
    assert_eq!(results[0].attempts, 1);
    assert_eq!(
        results[0].outcome,
        JobOutcome::Done(Bytes::from_static(b"first"))
    );
    let more = broker
        .take_results(&s.id, 10, Duration::from_millis(200))
        .await
        .expect("take_results");
    assert!(more.is_empty(), "a result was handed out twice: {more:?}");
}

/// Failed attempts requeue the job until `max_attempts`; then it fails with its history.
pub async fn abandon_requeues_until_max_attempts(broker: Arc<dyn Broker>) {
    let s = open(broker.as_ref(), Duration::from_secs(30), 3).await;
    broker.submit(&s.id, jobs(0..1)).await.expect("submit");
    let mut ends = Vec::new();
    for attempt in 1..=3u32 {
        let job = take(broker.as_ref(), &s.id, "n").await.expect("the job");
        assert_eq!(job.lease.job, JobId(0));
        assert_eq!(job.lease.attempt, attempt);
        let end = AttemptEnd::ProcessDied {
            how: format!("killed by signal 9 (attempt {attempt})"),
            last_lines: vec!["last words".into()],
        };
        ends.push(broker.abandon(&job.lease, end).await.expect("abandon"));
    }
    assert_eq!(
        ends,
        vec![Abandoned::Requeued, Abandoned::Requeued, Abandoned::Failed]
    );
    assert!(
        take(broker.as_ref(), &s.id, "n").await.is_none(),
        "a failed job was leased again"
    );
    let results = all_results(broker.as_ref(), &s.id, 1).await;
    assert_eq!(results.len(), 1);
    let failed = &results[0];
    assert_eq!(failed.attempts, 3);
    match &failed.outcome {
        JobOutcome::Failed {
            kind,
            message,
            history,
        } => {
            assert_eq!(*kind, JobFailure::Exhausted);
            assert!(message.contains("attempt 3"), "message: {message}");
            assert_eq!(history.len(), 3);
            assert_eq!(
                history.iter().map(|h| h.attempt).collect::<Vec<_>>(),
                vec![1, 2, 3]
            );
        }
        other => panic!("expected a failure, got {other:?}"),
    }
}

/// A worker's error fails the job at once, with the worker's message.
pub async fn worker_error_fails_at_once(broker: Arc<dyn Broker>) {
    let s = open(broker.as_ref(), Duration::from_secs(30), 3).await;
    broker.submit(&s.id, jobs(0..1)).await.expect("submit");
    let job = take(broker.as_ref(), &s.id, "n").await.expect("a job");
    let done = broker
        .complete(
            &job.lease,
            Err((
                JobFailure::Worker,
                AttemptEnd::WorkerError("division by zero".into()),
            )),
        )
        .await
        .expect("complete");
    assert_eq!(done, Completion::Accepted);
    assert!(
        take(broker.as_ref(), &s.id, "n").await.is_none(),
        "a failed job was retried"
    );
    let results = all_results(broker.as_ref(), &s.id, 1).await;
    match &results[..] {
        [
            JobResult {
                attempts: 1,
                outcome:
                    JobOutcome::Failed {
                        kind,
                        message,
                        history,
                    },
                ..
            },
        ] => {
            assert_eq!(*kind, JobFailure::Worker);
            assert_eq!(message, "division by zero");
            assert_eq!(history.len(), 1);
        }
        other => panic!("expected one failure, got {other:?}"),
    }
}

/// Submitting a job id again (a pool resubmitting after a broker hiccup) does not run it twice.
pub async fn resubmitted_job_ids_are_ignored(broker: Arc<dyn Broker>) {
    let s = open(broker.as_ref(), Duration::from_secs(30), 3).await;
    broker.submit(&s.id, jobs(0..1)).await.expect("submit");
    broker
        .submit(&s.id, jobs(0..1))
        .await
        .expect("submit again");
    assert!(take(broker.as_ref(), &s.id, "n").await.is_some());
    assert!(
        take(broker.as_ref(), &s.id, "n").await.is_none(),
        "a resubmitted job id was queued twice"
    );
}

/// Many results are handed out once each, in batches no larger than asked.
pub async fn results_are_handed_out_once(broker: Arc<dyn Broker>) {
    let s = open(broker.as_ref(), Duration::from_secs(30), 3).await;
    broker.submit(&s.id, jobs(0..25)).await.expect("submit");
    while let Some(job) = take(broker.as_ref(), &s.id, "n").await {
        broker
            .complete(&job.lease, Ok(Bytes::from(vec![1u8; 10])))
            .await
            .expect("complete");
    }
    let mut seen = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.len() < 25 && Instant::now() < deadline {
        let batch = broker
            .take_results(&s.id, 10, Duration::from_millis(200))
            .await
            .expect("take_results");
        assert!(batch.len() <= 10, "asked for 10, got {}", batch.len());
        for r in batch {
            assert!(seen.insert(r.job), "result of {} handed out twice", r.job);
        }
    }
    assert_eq!(seen.len(), 25);
    let stats = broker.session_stats(&s.id).await.expect("stats");
    assert_eq!(stats.done, 25);
}

/// `take_jobs` leases up to `max` jobs per call, in queue order, each once; with nothing
/// queued it waits and returns none.
pub async fn take_jobs_leases_a_batch_once_each(broker: Arc<dyn Broker>) {
    let s = open(broker.as_ref(), Duration::from_secs(30), 3).await;
    broker.submit(&s.id, jobs(0..25)).await.expect("submit");
    let (n, w) = (node("n"), worker("n", 0));
    let mut all = Vec::new();
    loop {
        let batch = broker
            .take_jobs(&s.id, &n, &w, 4, SHORT)
            .await
            .expect("take_jobs");
        if batch.is_empty() {
            break;
        }
        assert!(batch.len() <= 4, "more than max: {}", batch.len());
        for job in &batch {
            assert_eq!(job.lease.attempt, 1);
            assert_eq!(job.lease.worker, w);
            assert_eq!(job.payload.as_ref(), job.lease.job.0.to_le_bytes());
        }
        all.extend(batch.iter().map(|j| j.lease.job.0));
        assert!(all.len() <= 25, "jobs leased twice: {all:?}");
    }
    assert_eq!(all, (0..25).collect::<Vec<_>>(), "each job once, in order");
    let started = Instant::now();
    let none = broker
        .take_jobs(&s.id, &n, &w, 8, Duration::from_millis(200))
        .await
        .expect("take_jobs");
    assert!(none.is_empty());
    assert!(started.elapsed() < Duration::from_secs(3));
}

/// `complete_many` records each outcome as `complete` would: results and worker errors are
/// accepted, a stale lease in the batch is discarded alone, and sending the same batch again
/// records nothing twice.
pub async fn complete_many_records_each_outcome(broker: Arc<dyn Broker>) {
    let s = open(broker.as_ref(), Duration::from_secs(30), 3).await;
    broker.submit(&s.id, jobs(0..4)).await.expect("submit");
    let (n, w) = (node("n"), worker("n", 0));
    let mut leased = Vec::new();
    while leased.len() < 4 {
        let batch = broker
            .take_jobs(&s.id, &n, &w, 4, SHORT)
            .await
            .expect("take_jobs");
        assert!(!batch.is_empty(), "jobs still queued");
        leased.extend(batch);
    }
    leased.sort_by_key(|j| j.lease.job);
    // Job 3's lease goes stale: handed back, then leased again as attempt 2.
    let stale = leased[3].lease.clone();
    let requeued = broker
        .abandon(&stale, AttemptEnd::NodeLeft)
        .await
        .expect("abandon");
    assert_eq!(requeued, Abandoned::Requeued);
    let again = take(broker.as_ref(), &s.id, "m")
        .await
        .expect("job 3 again");
    assert_eq!(again.lease.job, JobId(3));
    let batch = vec![
        (leased[0].lease.clone(), Ok(Bytes::from_static(b"zero"))),
        (
            leased[1].lease.clone(),
            Err((JobFailure::Worker, AttemptEnd::WorkerError("no".into()))),
        ),
        (leased[2].lease.clone(), Ok(Bytes::from_static(b"two"))),
        (stale, Ok(Bytes::from_static(b"late"))),
    ];
    let answers = broker
        .complete_many(batch.clone())
        .await
        .expect("complete_many");
    use Completion::{Accepted, Discarded};
    assert_eq!(answers, vec![Accepted, Accepted, Accepted, Discarded]);
    let repeated = broker.complete_many(batch).await.expect("complete_many");
    assert_eq!(repeated, vec![Discarded; 4], "recorded twice");
    broker
        .complete(&again.lease, Ok(Bytes::from_static(b"three")))
        .await
        .expect("complete");
    let mut results = all_results(broker.as_ref(), &s.id, 4).await;
    results.sort_by_key(|r| r.job);
    let outcomes: Vec<_> = results.iter().map(|r| (r.job.0, &r.outcome)).collect();
    assert_eq!(outcomes.len(), 4, "one result per job: {outcomes:?}");
    assert_eq!(
        outcomes[0].1,
        &JobOutcome::Done(Bytes::from_static(b"zero"))
    );
    assert!(
        matches!(outcomes[1].1, JobOutcome::Failed { kind: JobFailure::Worker, message, .. } if message == "no")
    );
    assert_eq!(outcomes[2].1, &JobOutcome::Done(Bytes::from_static(b"two")));
    assert_eq!(
        outcomes[3].1,
        &JobOutcome::Done(Bytes::from_static(b"three"))
    );
    assert_eq!(results[3].attempts, 2);
    let more = broker
        .take_results(&s.id, 10, Duration::from_millis(200))
        .await
        .expect("take_results");
    assert!(more.is_empty(), "a result was handed out twice: {more:?}");
}

/// Jobs handed back unstarted ([`AttemptEnd::Returned`]) queue again behind the waiting jobs,
/// in the order they were returned, with the same attempt number, no failure charged and no
/// history; the returned lease is fenced. A stale return changes nothing.
pub async fn returned_jobs_queue_again_unstarted(broker: Arc<dyn Broker>) {
    let s = open(broker.as_ref(), Duration::from_secs(30), 1).await;
    broker.submit(&s.id, jobs(0..5)).await.expect("submit");
    let (n, w) = (node("n"), worker("n", 0));
    let mut held = Vec::new();
    while held.len() < 3 {
        let batch = broker
            .take_jobs(&s.id, &n, &w, 3 - held.len(), SHORT)
            .await
            .expect("take_jobs");
        assert!(!batch.is_empty(), "jobs still queued");
        held.extend(batch);
    }
    assert_eq!(
        held.iter().map(|j| j.lease.job.0).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    // Returned in the order 2, 0 (1 is kept): the queue is then 3, 4, 2, 0.
    for i in [2, 0] {
        let back = broker
            .abandon(&held[i].lease, AttemptEnd::Returned)
            .await
            .expect("return");
        assert_eq!(back, Abandoned::Requeued);
    }
    let again = broker
        .abandon(&held[2].lease, AttemptEnd::Returned)
        .await
        .expect("return again");
    assert_eq!(again, Abandoned::Stale, "a lease returned twice");
    let stats = broker.session_stats(&s.id).await.expect("stats");
    assert_eq!((stats.queued, stats.running), (4, 1), "{stats:?}");
    let mut order = Vec::new();
    let mut retaken = Vec::new();
    while let Some(job) = take(broker.as_ref(), &s.id, "m").await {
        order.push(job.lease.job.0);
        assert_eq!(
            job.lease.attempt, 1,
            "job {} was returned, not attempted",
            job.lease.job
        );
        retaken.push(job);
    }
    assert_eq!(
        order,
        vec![3, 4, 2, 0],
        "returned jobs queue behind the waiting ones"
    );
    // The returned lease of job 2 is fenced: its result is discarded, the new lease's counts.
    let late = broker
        .complete(&held[2].lease, Ok(Bytes::from_static(b"returned")))
        .await
        .expect("complete");
    assert_eq!(late, Completion::Discarded);
    for job in retaken.iter().chain(std::iter::once(&held[1])) {
        let answer = broker
            .complete(&job.lease, Ok(Bytes::from_static(b"ok")))
            .await
            .expect("complete");
        assert_eq!(answer, Completion::Accepted, "job {}", job.lease.job);
    }
    let results = all_results(broker.as_ref(), &s.id, 5).await;
    assert_eq!(results.len(), 5);
    for r in &results {
        assert_eq!(r.attempts, 1, "job {}: {:?}", r.job, r.outcome);
        assert_eq!(r.outcome, JobOutcome::Done(Bytes::from_static(b"ok")));
    }
}
