//! Conformance cases of [`UpdateLog`](crate::broker::UpdateLog): numbered, ordered, replayable updates.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::*;
use crate::broker::{Broker, JobId, NewJob};

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
