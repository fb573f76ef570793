//! Conformance cases of [`SessionControl`](crate::broker::SessionControl): one session at a time, expiry, close.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::broker::{Broker, SessionState};
use crate::error::BrokerError;

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
