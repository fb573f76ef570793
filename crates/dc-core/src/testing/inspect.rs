//! Conformance cases of [`Inspect`](crate::broker::Inspect): counts and node listings.

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::broker::{Broker, SessionId, WorkerState, WorkerStatus};

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
