//! `--broker amqp://…`: RabbitMQ's own limits measured with lapin on the same server (bare
//! messages, no pool), then W1–W4 on a pool whose node agent reaches the same server, each
//! run in a namespace of its own.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dc_broker_amqp::{AmqpBroker, AmqpOptions};
use dc_core::{BoxError, Broker};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

use super::baselines::Baselines;
use super::report::{Report, Row, percentile, sorted};
use super::worker::unix_ms;
use super::{MIB64, Sizes};

/// Where a run's pools and node meet: the server and a namespace of the run's own.
#[derive(Debug, Clone)]
pub(super) struct AmqpTarget {
    pub(super) url: String,
    pub(super) namespace: String,
}

impl AmqpTarget {
    pub(super) fn new(url: &str) -> Self {
        AmqpTarget {
            url: url.to_string(),
            namespace: format!("dc-bench-{}-{}", std::process::id(), unix_ms()),
        }
    }

    pub(super) async fn broker(&self) -> Result<Arc<dyn Broker>, BoxError> {
        let options = AmqpOptions::default().namespace(self.namespace.clone());
        Ok(Arc::new(AmqpBroker::connect(&self.url, &options).await?))
    }

    /// Remove what the run's namespace keeps between sessions.
    pub(super) async fn clean_up(&self) {
        if let Ok(b) = AmqpBroker::connect(
            &self.url,
            &AmqpOptions::default().namespace(self.namespace.clone()),
        )
        .await
        {
            let _ = b.remove_namespace().await;
            b.close().await;
        }
    }
}

/// A confirm-mode channel and an exclusive queue (gone with the connection).
async fn channel(conn: &Connection, queue: &str) -> Result<Channel, BoxError> {
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            exclusive: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await?;
    Ok(ch)
}

/// Consume `queue`, each message acknowledged on delivery.
async fn consume_no_ack(ch: &Channel, queue: &str) -> Result<lapin::Consumer, BoxError> {
    Ok(ch
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?)
}

async fn publish(ch: &Channel, queue: &str, body: &[u8]) -> Result<(), BoxError> {
    ch.basic_publish(
        "".into(),
        queue.into(),
        BasicPublishOptions::default(),
        body,
        BasicProperties::default(),
    )
    .await?
    .await?;
    Ok(())
}

/// RabbitMQ's own limits on this server: the round trip of one message (publish, confirmed,
/// then consumed), confirmed publishes in a stream, the bare job cycle (a job message taken by
/// one of 2 consumers with prefetch 1, a result message back, the job acked), and 64 MiB
/// published and consumed in 4 MiB messages (the size this backend cuts payloads into).
pub(super) async fn measure_amqp_baselines(url: &str, sizes: Sizes) -> Result<Baselines, BoxError> {
    let tag = format!("dc-bench-base-{}-{}", std::process::id(), unix_ms());
    let conn = Connection::connect(url, ConnectionProperties::default()).await?;

    // Round trip.
    let q = format!("{tag}.rtt");
    let ch = channel(&conn, &q).await?;
    let mut consumer = consume_no_ack(&ch, &q).await?;
    let mut rtts = Vec::with_capacity(1000);
    for _ in 0..1000 {
        let t = Instant::now();
        publish(&ch, &q, b"ping").await?;
        consumer
            .next()
            .await
            .ok_or("the round-trip consumer ended")??;
        rtts.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let ping_rtt_us = percentile(&sorted(rtts), 0.5);

    // Confirmed publishes, confirms awaited at the end.
    let n = 50_000;
    let q = format!("{tag}.pub");
    let ch = channel(&conn, &q).await?;
    let t = Instant::now();
    let mut confirms = Vec::with_capacity(n);
    for _ in 0..n {
        confirms.push(
            ch.basic_publish(
                "".into(),
                q.as_str().into(),
                BasicPublishOptions::default(),
                b"x",
                BasicProperties::default(),
            )
            .await?,
        );
    }
    for c in confirms {
        c.await?;
    }
    let publish_per_s = n as f64 / t.elapsed().as_secs_f64();
    ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
        .await?;

    // The bare job cycle.
    let cycle_k1_per_s = job_cycle(
        &conn,
        &tag,
        usize::try_from(sizes.w1_jobs.min(20_000)).unwrap_or(20_000),
    )
    .await?;

    // 64 MiB in 4 MiB messages, published then consumed.
    let q = format!("{tag}.big");
    let ch = channel(&conn, &q).await?;
    let part = vec![0x5Au8; 4 << 20];
    let mut rates = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        for _ in 0..MIB64 / part.len() {
            publish(&ch, &q, &part).await?;
        }
        let mut consumer = consume_no_ack(&ch, &q).await?;
        let mut got = 0;
        while got < MIB64 {
            got += consumer
                .next()
                .await
                .ok_or("the 64 MiB consumer ended")??
                .data
                .len();
        }
        ch.basic_cancel(consumer.tag(), Default::default()).await?;
        rates.push((2 * MIB64) as f64 / 1e6 / t.elapsed().as_secs_f64());
    }
    let _ = conn.close(200, "done".into()).await;
    Ok(Baselines {
        ping_rtt_us,
        xadd_pipelined_per_s: publish_per_s,
        cycle_k1_per_s,
        setget_64mib_mb_per_s: percentile(&sorted(rates), 0.5),
    })
}

/// `n` job messages through 2 consumers (prefetch 1, manual ack), each answering with a
/// result message: jobs per second.
async fn job_cycle(conn: &Connection, tag: &str, n: usize) -> Result<f64, BoxError> {
    let jobs = format!("{tag}.jobs");
    let results = format!("{tag}.results");
    let owner = channel(conn, &results).await?;
    owner
        .queue_declare(
            jobs.as_str().into(),
            QueueDeclareOptions {
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let mut workers = Vec::new();
    for _ in 0..2 {
        let ch = conn.create_channel().await?;
        ch.basic_qos(1, BasicQosOptions::default()).await?;
        let mut consumer = ch
            .basic_consume(
                jobs.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let results = results.clone();
        workers.push(tokio::spawn(async move {
            while let Some(Ok(d)) = consumer.next().await {
                let _ = ch
                    .basic_publish(
                        "".into(),
                        results.as_str().into(),
                        BasicPublishOptions::default(),
                        &d.data,
                        BasicProperties::default(),
                    )
                    .await;
                let _ = d.ack(BasicAckOptions::default()).await;
            }
        }));
    }
    let mut consumer = consume_no_ack(&owner, &results).await?;
    let t = Instant::now();
    let mut confirms = Vec::with_capacity(n);
    for i in 0..n {
        confirms.push(
            owner
                .basic_publish(
                    "".into(),
                    jobs.as_str().into(),
                    BasicPublishOptions::default(),
                    &(i as u64).to_le_bytes(),
                    BasicProperties::default(),
                )
                .await?,
        );
    }
    for _ in 0..n {
        tokio::time::timeout(Duration::from_secs(60), consumer.next())
            .await?
            .ok_or("the result consumer ended")??;
    }
    let rate = n as f64 / t.elapsed().as_secs_f64();
    for c in confirms {
        c.await?;
    }
    owner
        .queue_delete(jobs.as_str().into(), QueueDeleteOptions::default())
        .await?;
    for w in workers {
        w.abort();
    }
    Ok(rate)
}

pub(super) fn push_amqp_baselines(report: &mut Report, b: Baselines) {
    report.baselines = Some(b);
    let note = |what: &str| format!("{what}; same RabbitMQ, lapin, bare messages");
    report.push(
        Row::new("baseline", "amqp_rtt_us", b.ping_rtt_us).note(note(
            "p50 of 1,000 sequential publish (confirmed) then consume",
        )),
    );
    report.push(
        Row::new(
            "baseline",
            "amqp_publish_confirmed_per_s",
            b.xadd_pipelined_per_s,
        )
        .note(note("50,000 publishes, confirms awaited at the end")),
    );
    report.push(Row::new("baseline", "cycle_k1_per_s", b.cycle_k1_per_s).note(note(
        "bare job cycle: job message, 2 consumers with prefetch 1 publish a result message and ack",
    )));
    report.push(
        Row::new("baseline", "amqp_64mib_mb_per_s", b.setget_64mib_mb_per_s).note(note(
            "64 MiB published then consumed in 4 MiB messages (in + out), median of 3",
        )),
    );
}
