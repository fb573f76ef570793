//! The broker conformance suite: the contract of [`Broker`], as tests any backend runs.
//!
//! A backend runs every case with one macro call in its tests, giving an expression that
//! evaluates to a fresh `Arc<dyn Broker>` future per case (a new key prefix, a new vhost…):
//!
//! ```ignore
//! dc_core::broker_conformance_tests!(async {
//!     std::sync::Arc::new(dc_core::LocalBroker::new()) as std::sync::Arc<dyn dc_core::Broker>
//! });
//! ```
//!
//! Each case is also a public async function, so a backend can run one alone while debugging.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::broker::{
    Abandoned, AttemptEnd, Broker, Completion, JobId, JobOutcome, JobResult, Lease, NewJob, NodeId,
    NodeProblem, NodeStatus, SessionId, SessionInfo, SessionSpec, SessionState, WorkerId,
    WorkerState, WorkerStatus,
};
use crate::error::{BrokerError, JobFailure};

/// Generate one `#[tokio::test]` per conformance case, each on a fresh broker from `$make`.
#[macro_export]
macro_rules! broker_conformance_tests {
    ($make:expr) => {
        $crate::broker_conformance_tests!(@cases $make;
            one_session_at_a_time,
            jobs_are_leased_once_each,
            take_job_waits_then_gives_none,
            take_job_wakes_on_submit,
            results_first_writer_wins,
            heartbeat_keeps_leases,
            silent_node_loses_its_lease_and_late_result_is_fenced,
            abandon_requeues_until_max_attempts,
            node_leaving_requeues_without_counting,
            worker_error_fails_at_once,
            update_log_is_ordered_and_replayable,
            jobs_carry_update_positions,
            stats_count_workers_and_nodes,
            nodes_are_listed_with_their_last_status,
            session_expires_without_keep_alive,
            closed_session_is_gone_for_nodes,
            problems_reach_the_pool,
            resubmitted_job_ids_are_ignored,
            results_are_handed_out_once,
            take_jobs_leases_a_batch_once_each,
            complete_many_records_each_outcome,
            returned_jobs_queue_again_unstarted,
        );
    };
    (@cases $make:expr; $($case:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let broker: ::std::sync::Arc<dyn $crate::Broker> = $make.await;
                $crate::testing::$case(broker).await;
            }
        )*
    };
}

/// A session spec for tests: kind "conformance", the given lease and attempts.
pub fn spec(lease: Duration, max_attempts: u32) -> SessionSpec {
    SessionSpec {
        kind: "conformance".into(),
        init: vec![1, 2, 3],
        max_attempts,
        lease,
        owner: "conformance suite".into(),
        auto_batching: true,
    }
}

async fn open(broker: &dyn Broker, lease: Duration, max_attempts: u32) -> SessionInfo {
    broker
        .try_open_session(&spec(lease, max_attempts))
        .await
        .expect("try_open_session")
        .expect("no other session is active")
}

fn jobs(range: std::ops::Range<u64>) -> Vec<NewJob> {
    range
        .map(|i| NewJob {
            id: JobId(i),
            payload: Bytes::from(i.to_le_bytes().to_vec()),
            update_seq: 0,
        })
        .collect()
}

fn node(name: &str) -> NodeId {
    NodeId(name.into())
}

fn worker(node: &str, slot: usize) -> WorkerId {
    WorkerId(format!("{node}/{slot}"))
}

fn status(node_name: &str, leases: Vec<Lease>) -> NodeStatus {
    NodeStatus {
        node: node(node_name),
        host: "test-host".into(),
        kinds: vec!["conformance".into()],
        workers: vec![],
        leases,
    }
}

const SHORT: Duration = Duration::from_millis(50);

async fn take(broker: &dyn Broker, s: &SessionId, n: &str) -> Option<crate::broker::LeasedJob> {
    broker
        .take_job(s, &node(n), &worker(n, 0), SHORT)
        .await
        .expect("take_job")
}

/// Results of session `s` until `want` have come (or 10 s have passed).
pub async fn all_results(broker: &dyn Broker, s: &SessionId, want: usize) -> Vec<JobResult> {
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < want && Instant::now() < deadline {
        got.extend(
            broker
                .take_results(s, 1000, Duration::from_millis(200))
                .await
                .expect("take_results"),
        );
    }
    got
}

/// One session is active at a time; the next opens once it closes.
pub async fn one_session_at_a_time(broker: Arc<dyn Broker>) {
    let a = open(broker.as_ref(), Duration::from_secs(30), 3).await;
    let b = broker
        .try_open_session(&spec(Duration::from_secs(30), 3))
        .await
        .expect("try_open_session");
    assert!(b.is_none(), "a second session opened while one is active");
    broker.close_session(&a.id).await.expect("close");
    let b = broker
        .try_open_session(&spec(Duration::from_secs(30), 3))
        .await
        .expect("try_open_session")
        .expect("the second session opens after the first closed");
    assert_ne!(a.id, b.id, "session ids are not reused");
    let active = broker
        .active_session(SHORT)
        .await
        .expect("active_session")
        .expect("an active session");
    assert_eq!(active.id, b.id);
    assert_eq!(active.spec, spec(Duration::from_secs(30), 3));
}

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

/// A lease renewed by heartbeats outlives many lease periods; the reaper leaves it alone.
pub async fn heartbeat_keeps_leases(broker: Arc<dyn Broker>) {
    let lease = Duration::from_millis(400);
    let s = open(broker.as_ref(), lease, 3).await;
    broker.submit(&s.id, jobs(0..1)).await.expect("submit");
    let job = take(broker.as_ref(), &s.id, "n").await.expect("a job");
    let until = Instant::now() + lease * 3;
    while Instant::now() < until {
        broker
            .heartbeat(&status("n", vec![job.lease.clone()]))
            .await
            .expect("heartbeat");
        broker.keep_session_alive(&s.id).await.expect("keep alive");
        let reaped = broker.reap_expired().await.expect("reap");
        assert_eq!(reaped, 0, "a renewed lease was reaped");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        take(broker.as_ref(), &s.id, "other").await.is_none(),
        "a renewed job was handed to another node"
    );
    let done = broker
        .complete(&job.lease, Ok(Bytes::from_static(b"ok")))
        .await
        .expect("complete");
    assert_eq!(done, Completion::Accepted);
}

/// A node that stops heartbeating loses its lease; the job runs again (attempt 2) and the
/// silent node's late result is discarded.
pub async fn silent_node_loses_its_lease_and_late_result_is_fenced(broker: Arc<dyn Broker>) {
    let lease = Duration::from_millis(300);
    let s = open(broker.as_ref(), lease, 3).await;
    broker.submit(&s.id, jobs(0..1)).await.expect("submit");
    let stale = take(broker.as_ref(), &s.id, "silent").await.expect("a job");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut reaped = 0;
    while reaped == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        broker.keep_session_alive(&s.id).await.expect("keep alive");
        reaped = broker.reap_expired().await.expect("reap");
    }
    assert_eq!(reaped, 1, "the silent node's lease never expired");
    let again = take(broker.as_ref(), &s.id, "alive")
        .await
        .expect("the job again");
    assert_eq!(again.lease.job, stale.lease.job);
    assert_eq!(again.lease.attempt, 2);
    let late = broker
        .complete(&stale.lease, Ok(Bytes::from_static(b"late")))
        .await
        .expect("complete");
    assert_eq!(
        late,
        Completion::Discarded,
        "a fenced attempt's result was kept"
    );
    let abandoned = broker
        .abandon(&stale.lease, AttemptEnd::LeaseExpired)
        .await
        .expect("abandon");
    assert_eq!(abandoned, Abandoned::Stale);
    let fresh = broker
        .complete(&again.lease, Ok(Bytes::from_static(b"fresh")))
        .await
        .expect("complete");
    assert_eq!(fresh, Completion::Accepted);
    let results = all_results(broker.as_ref(), &s.id, 1).await;
    assert_eq!(results.len(), 1);
    assert_eq!(results[0].attempts, 2);
    assert_eq!(
        results[0].outcome,
        JobOutcome::Done(Bytes::from_static(b"fresh"))
    );
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

/// A node that leaves hands its jobs back at once, without counting a failure.
pub async fn node_leaving_requeues_without_counting(broker: Arc<dyn Broker>) {
    let s = open(broker.as_ref(), Duration::from_secs(30), 1).await;
    broker.submit(&s.id, jobs(0..1)).await.expect("submit");
    let job = take(broker.as_ref(), &s.id, "leaving")
        .await
        .expect("a job");
    broker
        .heartbeat(&status("leaving", vec![job.lease.clone()]))
        .await
        .expect("heartbeat");
    broker.leave(&node("leaving")).await.expect("leave");
    let again = take(broker.as_ref(), &s.id, "staying")
        .await
        .expect("the job is back in the queue");
    assert_eq!(again.lease.attempt, 2);
    broker
        .complete(&again.lease, Ok(Bytes::from_static(b"ok")))
        .await
        .expect("complete");
    let results = all_results(broker.as_ref(), &s.id, 1).await;
    assert_eq!(results.len(), 1);
    assert!(matches!(results[0].outcome, JobOutcome::Done(_)));
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

/// Updates get sequence numbers 1, 2, 3…, read back in order from any position.
pub async fn update_log_is_ordered_and_replayable(broker: Arc<dyn Broker>) {
    let s = open(broker.as_ref(), Duration::from_secs(30), 3).await;
    for i in 1..=5u64 {
        let seq = broker
            .publish_update(&s.id, Bytes::from(format!("u{i}")))
            .await
            .expect("publish");
        assert_eq!(seq, i);
    }
    let all = broker.read_updates(&s.id, 0, 100).await.expect("read");
    let want: Vec<(u64, Bytes)> = (1..=5).map(|i| (i, Bytes::from(format!("u{i}")))).collect();
    assert_eq!(all, want);
    let tail = broker.read_updates(&s.id, 3, 100).await.expect("read");
    assert_eq!(tail, want[3..].to_vec());
    let page = broker.read_updates(&s.id, 1, 2).await.expect("read");
    assert_eq!(page, want[1..3].to_vec());
    assert!(
        broker
            .read_updates(&s.id, 5, 10)
            .await
            .expect("read")
            .is_empty()
    );
}

/// A leased job says which updates it needs and how long the log was when it was taken.
pub async fn jobs_carry_update_positions(broker: Arc<dyn Broker>) {
    let s = open(broker.as_ref(), Duration::from_secs(30), 3).await;
    for _ in 0..2 {
        broker
            .publish_update(&s.id, Bytes::from_static(b"u"))
            .await
            .expect("publish");
    }
    broker
        .submit(
            &s.id,
            vec![NewJob {
                id: JobId(1),
                payload: Bytes::from_static(b"j"),
                update_seq: 2,
            }],
        )
        .await
        .expect("submit");
    broker
        .publish_update(&s.id, Bytes::from_static(b"u3"))
        .await
        .expect("publish");
    let job = take(broker.as_ref(), &s.id, "n").await.expect("a job");
    assert_eq!(job.update_seq, 2);
    assert_eq!(job.log_len, 3);
}

/// Stats count ready workers and their nodes, per session, from live heartbeats.
pub async fn stats_count_workers_and_nodes(broker: Arc<dyn Broker>) {
    let s = open(broker.as_ref(), Duration::from_secs(30), 3).await;
    let w = |n: &str, i: usize, session: Option<&SessionId>, state| WorkerStatus {
        worker: worker(n, i),
        session: session.cloned(),
        state,
        devices: vec![],
    };
    let mut a = status("a", vec![]);
    a.workers = vec![
        w("a", 0, Some(&s.id), WorkerState::Idle),
        w("a", 1, Some(&s.id), WorkerState::Busy),
        w("a", 2, Some(&s.id), WorkerState::Starting),
    ];
    let mut b = status("b", vec![]);
    b.workers = vec![w("b", 0, Some(&s.id), WorkerState::Idle)];
    let mut c = status("c", vec![]);
    c.workers = vec![w("c", 0, None, WorkerState::Starting)];
    for st in [&a, &b, &c] {
        broker.heartbeat(st).await.expect("heartbeat");
    }
    broker.submit(&s.id, jobs(0..3)).await.expect("submit");
    let _running = take(broker.as_ref(), &s.id, "a").await.expect("a job");
    let stats = broker.session_stats(&s.id).await.expect("stats");
    assert_eq!(stats.workers, 3);
    assert_eq!(stats.nodes, 2);
    assert_eq!(stats.starting, 1);
    assert_eq!(stats.queued, 2);
    assert_eq!(stats.running, 1);
    assert_eq!((stats.done, stats.failed), (0, 0));
}

/// A session nobody keeps alive expires, and a new one can open.
pub async fn session_expires_without_keep_alive(broker: Arc<dyn Broker>) {
    let lease = Duration::from_millis(300);
    let s = open(broker.as_ref(), lease, 3).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut opened = None;
    while opened.is_none() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _ = broker.reap_expired().await;
        opened = broker
            .try_open_session(&spec(Duration::from_secs(30), 3))
            .await
            .expect("try_open_session");
    }
    assert!(opened.is_some(), "an abandoned session never expired");
    assert_eq!(
        broker.keep_session_alive(&s.id).await.expect("keep alive"),
        SessionState::Gone
    );
}

/// After close, nodes see no active session and `take_job` says the session is gone.
pub async fn closed_session_is_gone_for_nodes(broker: Arc<dyn Broker>) {
    let s = open(broker.as_ref(), Duration::from_secs(30), 3).await;
    broker.submit(&s.id, jobs(0..3)).await.expect("submit");
    broker.close_session(&s.id).await.expect("close");
    let err = broker
        .take_job(&s.id, &node("n"), &worker("n", 0), SHORT)
        .await
        .expect_err("take_job on a closed session");
    assert!(matches!(err, BrokerError::SessionGone(_)), "got {err:?}");
    assert!(
        broker
            .active_session(SHORT)
            .await
            .expect("active")
            .is_none()
    );
    assert_eq!(
        broker.keep_session_alive(&s.id).await.expect("keep alive"),
        SessionState::Gone
    );
}

/// What a node reports it cannot do reaches the session's stats, once.
pub async fn problems_reach_the_pool(broker: Arc<dyn Broker>) {
    let s = open(broker.as_ref(), Duration::from_secs(30), 3).await;
    let problem = NodeProblem::UnknownKind {
        node: node("n"),
        known: vec!["other".into()],
    };
    for _ in 0..2 {
        broker
            .report_problem(&s.id, problem.clone())
            .await
            .expect("report");
    }
    let stats = broker.session_stats(&s.id).await.expect("stats");
    assert_eq!(stats.problems, vec![problem]);
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

/// Nodes are listed with their latest status; a node that left is not.
pub async fn nodes_are_listed_with_their_last_status(broker: Arc<dyn Broker>) {
    let mut a = status("list-a", vec![]);
    broker.heartbeat(&a).await.expect("heartbeat");
    a.host = "renamed-host".into();
    broker.heartbeat(&a).await.expect("heartbeat");
    broker
        .heartbeat(&status("list-b", vec![]))
        .await
        .expect("heartbeat");
    let seen = broker.nodes(Duration::from_secs(60)).await.expect("nodes");
    let names: Vec<&str> = seen.iter().map(|n| n.status.node.0.as_str()).collect();
    assert!(
        names.contains(&"list-a") && names.contains(&"list-b"),
        "{names:?}"
    );
    let a_seen = seen
        .iter()
        .find(|n| n.status.node == node("list-a"))
        .expect("list-a");
    assert_eq!(a_seen.status.host, "renamed-host");
    assert!(a_seen.ago < Duration::from_secs(30));
    broker.leave(&node("list-b")).await.expect("leave");
    let seen = broker.nodes(Duration::from_secs(60)).await.expect("nodes");
    assert!(
        !seen.iter().any(|n| n.status.node == node("list-b")),
        "a node that left is still listed"
    );
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
