//! Conformance cases of [`NodeRegistry`](crate::broker::NodeRegistry): heartbeats keep leases, silence and leaving give them back, problems reach the pool.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::*;
use crate::broker::{Abandoned, AttemptEnd, Broker, Completion, JobOutcome, NodeProblem};

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
    // The lease expires in `reap_expired` or, for a backend that expires leases itself, on
    // its own: either way the job comes back for another node, once.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut reaped = 0;
    let again = loop {
        assert!(
            Instant::now() < deadline,
            "the silent node's lease never expired"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        broker.keep_session_alive(&s.id).await.expect("keep alive");
        reaped += broker.reap_expired().await.expect("reap");
        if let Some(job) = take(broker.as_ref(), &s.id, "alive").await {
            break job;
        }
    };
    assert!(reaped <= 1, "one lease expired, {reaped} reported reaped");
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
