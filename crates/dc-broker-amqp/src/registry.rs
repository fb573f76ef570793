//! The node registry: every heartbeat is also appended to a stream queue, so `status` lists
//! the nodes whether or not a pool is open. A reader appends a marker of its own and reads
//! from a little before its window up to that marker: everything before it in the stream is
//! what was published before the read began.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dc_core::BrokerError;
use dc_core::broker::{NodeId, NodeSeen, NodeStatus};
use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use serde::{Deserialize, Serialize};

use crate::link::{Link, broken};
use crate::names::Names;
use crate::wire::{Assembler, decode, encode};

/// How long the stream keeps heartbeats (in whole segments of `SEGMENT_BYTES`).
const KEEP: &str = "1h";
const SEGMENT_BYTES: i64 = 1_000_000;
/// Longest a read of the registry may take.
const READ_FOR: Duration = Duration::from_secs(10);
/// Largest registry entry read.
const MAX_ENTRY: usize = 1 << 20;

#[derive(Debug, Serialize, Deserialize)]
struct Entry {
    /// When it was written, on the writer's clock (ms since the Unix epoch).
    sent_ms: u64,
    what: What,
}

#[derive(Debug, Serialize, Deserialize)]
enum What {
    Status(NodeStatus),
    Left(NodeId),
    Marker(u64),
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or_default()
}

/// The registry stream of one namespace.
#[derive(Debug)]
pub(crate) struct Registry {
    names: Names,
    declared: AtomicBool,
}

impl Registry {
    pub(crate) fn new(names: Names) -> Self {
        Registry {
            names,
            declared: AtomicBool::new(false),
        }
    }

    async fn declare(&self, link: &Link) -> Result<(), BrokerError> {
        if self.declared.load(Ordering::Acquire) {
            return Ok(());
        }
        let conn = link.conn().await?;
        let ch = conn.channel().await?;
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("stream".into()),
        );
        args.insert("x-max-age".into(), AMQPValue::LongString(KEEP.into()));
        args.insert(
            "x-stream-max-segment-size-bytes".into(),
            AMQPValue::LongLongInt(SEGMENT_BYTES),
        );
        ch.queue_declare(
            self.names.registry().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await
        .map_err(|e| broken("declare the node registry", e))?;
        let _ = ch.close(200, "declared".into()).await;
        self.declared.store(true, Ordering::Release);
        Ok(())
    }

    async fn append(&self, link: &Link, what: What) -> Result<(), BrokerError> {
        self.declare(link).await?;
        let body = encode(&Entry {
            sent_ms: now_ms(),
            what,
        })?;
        let conn = link.conn().await?;
        conn.publish(&self.names.registry(), &body, 0, None, false)
            .await
            .map(|_| ())
    }

    pub(crate) async fn heartbeat(
        &self,
        link: &Link,
        status: &NodeStatus,
    ) -> Result<(), BrokerError> {
        self.append(link, What::Status(status.clone())).await
    }

    pub(crate) async fn left(&self, link: &Link, node: &NodeId) -> Result<(), BrokerError> {
        self.append(link, What::Left(node.clone())).await
    }

    /// Nodes heard from within `within`, with their last status.
    pub(crate) async fn nodes(
        &self,
        link: &Link,
        within: Duration,
    ) -> Result<Vec<NodeSeen>, BrokerError> {
        let marker = crate::host::random();
        self.append(link, What::Marker(marker)).await?;
        let now = now_ms();
        let within_ms = u64::try_from(within.as_millis()).unwrap_or(u64::MAX);
        // Stream offsets by time have a resolution of seconds: start a little early.
        let from_s = now.saturating_sub(within_ms) / 1000;
        let conn = link.conn().await?;
        let ch = conn.channel().await?;
        ch.basic_qos(1000, BasicQosOptions::default())
            .await
            .map_err(|e| broken("registry prefetch", e))?;
        let mut args = FieldTable::default();
        args.insert(
            "x-stream-offset".into(),
            AMQPValue::Timestamp(from_s.saturating_sub(1)),
        );
        let mut consumer = ch
            .basic_consume(
                self.names.registry().into(),
                ShortString::from(""),
                BasicConsumeOptions::default(),
                args,
            )
            .await
            .map_err(|e| broken("read the node registry", e))?;
        let mut last: BTreeMap<NodeId, (u64, NodeStatus)> = BTreeMap::new();
        let mut assembler = Assembler::new(MAX_ENTRY);
        let read = tokio::time::timeout(READ_FOR, async {
            while let Some(delivery) = consumer.next().await {
                let delivery = delivery.map_err(|e| broken("read the node registry", e))?;
                let _ = delivery.acker.ack(BasicAckOptions::default()).await;
                let bytes = match assembler.add(0u8, &delivery.data) {
                    Ok(Some(bytes)) => bytes,
                    Ok(None) => continue,
                    Err(why) => {
                        tracing::warn!("a malformed node registry entry, skipped: {why}");
                        continue;
                    }
                };
                let entry: Entry = match decode("a node registry entry", &bytes) {
                    Ok(e) => e,
                    Err(e) => {
                        tracing::warn!("{e}; skipped");
                        continue;
                    }
                };
                match entry.what {
                    What::Status(status) => {
                        last.insert(status.node.clone(), (entry.sent_ms, status));
                    }
                    What::Left(node) => {
                        last.remove(&node);
                    }
                    What::Marker(m) if m == marker => return Ok(()),
                    What::Marker(_) => {}
                }
            }
            Err(BrokerError::Connection(
                "the node registry stream ended before its end was read".into(),
            ))
        })
        .await;
        let _ = ch.close(200, "read".into()).await;
        match read {
            Ok(r) => r?,
            Err(_) => {
                return Err(BrokerError::Connection(
                    format!("reading the node registry took over {READ_FOR:?}").into(),
                ));
            }
        }
        Ok(last
            .into_values()
            .filter(|(sent, _)| sent.saturating_add(within_ms) >= now)
            .map(|(sent, status)| NodeSeen {
                status,
                ago: Duration::from_millis(now.saturating_sub(sent)),
            })
            .collect())
    }

    /// Delete the registry stream (and with it what it holds).
    pub(crate) async fn delete(&self, link: &Link) -> Result<(), BrokerError> {
        let conn = link.conn().await?;
        let ch = conn.channel().await?;
        ch.queue_delete(self.names.registry().into(), Default::default())
            .await
            .map_err(|e| broken("delete the node registry", e))?;
        let _ = ch.close(200, "deleted".into()).await;
        self.declared.store(false, Ordering::Release);
        Ok(())
    }
}
