//! Garbage on the wire: anyone with rights on the vhost can publish to a session's request
//! queue. Whatever arrives there (bytes of no protocol, parts out of order or announcing more
//! than any payload, undecodable requests, requests of the wrong shape, forged leases, absurd
//! counts and waits) must neither stop the hosting pool nor lose or duplicate a job: afterwards
//! a node still takes every job once and the pool gets every result once. A request that can
//! be answered is answered with an error, so its sender learns what was wrong.

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use ciborium::value::Value;
use dc_broker_amqp::{AmqpBroker, AmqpOptions};
use dc_core::broker::*;
use dc_core::testing::{all_results, spec};
use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};

fn url() -> String {
    std::env::var("DC_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

fn part(index: u32, total: u32, bytes: &[u8]) -> Vec<u8> {
    let mut out = b"DCA1".to_vec();
    out.extend_from_slice(&index.to_be_bytes());
    out.extend_from_slice(&total.to_be_bytes());
    out.extend_from_slice(bytes);
    out
}

fn cbor(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::into_writer(v, &mut out).expect("encode");
    out
}

fn call(name: &str, fields: Vec<(&str, Value)>) -> Vec<u8> {
    cbor(&Value::Map(vec![(
        Value::Text(name.into()),
        Value::Map(
            fields
                .into_iter()
                .map(|(k, v)| (Value::Text(k.into()), v))
                .collect(),
        ),
    )]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_requests_neither_stop_the_host_nor_lose_a_job() {
    let ns = format!(
        "dct-hostile-{}-{}",
        std::process::id(),
        dc_core::testing::support::free_port().unwrap_or(0)
    );
    let options = AmqpOptions::default().namespace(ns.clone());
    let pool = AmqpBroker::connect(&url(), &options)
        .await
        .expect("RabbitMQ");
    let node = AmqpBroker::connect(&url(), &options)
        .await
        .expect("RabbitMQ");
    let s = pool
        .try_open_session(&spec(Duration::from_secs(30), 3))
        .await
        .expect("open")
        .expect("a session");
    let n = 50usize;
    pool.submit(
        &s.id,
        (0..n)
            .map(|i| NewJob {
                id: JobId(i as u64),
                payload: Bytes::from((i as u64).to_le_bytes().to_vec()),
                update_seq: 0,
            })
            .collect(),
    )
    .await
    .expect("submit");

    // A raw client with an answer queue of its own.
    let conn = Connection::connect(&url(), ConnectionProperties::default())
        .await
        .expect("raw connection");
    let ch = conn.create_channel().await.expect("channel");
    let answers = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("answer queue")
        .name()
        .to_string();
    let mut answer_stream = ch
        .basic_consume(
            answers.as_str().into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let session_queue = format!("{ns}.session");
    let forged = Value::Map(vec![
        (Value::Text("session".into()), Value::Text(s.id.0.clone())),
        (Value::Text("job".into()), Value::Integer(3.into())),
        (Value::Text("attempt".into()), Value::Integer(1.into())),
        (Value::Text("node".into()), Value::Text("intruder".into())),
        (
            Value::Text("worker".into()),
            Value::Text("intruder/0".into()),
        ),
        (Value::Text("token".into()), Value::Text("999999".into())),
    ]);
    let undecodable = cbor(&Value::Text("not a call".into()));
    let garbage: Vec<(Vec<u8>, bool)> = vec![
        (b"\x00\x01\x02 no protocol at all".to_vec(), true),
        (Vec::new(), true),
        (part(0, 0, b"zero parts"), true),
        (part(0, u32::MAX, b"more parts than any payload"), true),
        (part(1, 2, b"a second part with no first"), true),
        (part(0, 3, b"first of three"), true),
        (part(2, 3, b"third, out of order"), true),
        (part(0, 1, &undecodable), true),
        (part(0, 1, b"\xff\xff\xff\xff"), true),
        (
            part(
                0,
                1,
                &call("TakeJobs", vec![("session", Value::Integer(7.into()))]),
            ),
            true,
        ),
        // Absurd counts and waits: clamped, and no lease is made for a forged node on the
        // real session (the jobs it takes are still fenced by their leases and come back).
        (
            part(
                0,
                1,
                &call(
                    "TakeResults",
                    vec![
                        ("session", Value::Text("no-such-session".into())),
                        ("max", Value::Integer(u32::MAX.into())),
                        ("wait_ms", Value::Integer(u64::MAX.into())),
                    ],
                ),
            ),
            true,
        ),
        (
            part(
                0,
                1,
                &call(
                    "Complete",
                    vec![(
                        "outcomes",
                        Value::Array(vec![Value::Array(vec![
                            forged.clone(),
                            Value::Map(vec![(
                                Value::Text("Output".into()),
                                Value::Bytes(b"forged".to_vec()),
                            )]),
                        ])]),
                    )],
                ),
            ),
            true,
        ),
        (
            part(
                0,
                1,
                &call(
                    "Abandon",
                    vec![
                        ("lease", forged),
                        ("end", Value::Text("LeaseExpired".into())),
                    ],
                ),
            ),
            true,
        ),
        // No answer queue or call id: dropped, nothing to answer.
        (part(0, 1, &undecodable), false),
    ];
    let mut with_answer = 0;
    for (i, (body, addressed)) in garbage.iter().enumerate() {
        let mut props = BasicProperties::default();
        if *addressed {
            props = props
                .with_reply_to(answers.clone().into())
                .with_correlation_id(i.to_string().into());
            with_answer += 1;
        }
        ch.basic_publish(
            "".into(),
            session_queue.as_str().into(),
            BasicPublishOptions::default(),
            body,
            props,
        )
        .await
        .expect("publish");
    }
    // The requests that decode far enough to have an answer get one (an error).
    let mut answered = 0;
    while let Ok(Some(Ok(_))) =
        tokio::time::timeout(Duration::from_secs(3), answer_stream.next()).await
    {
        answered += 1;
    }
    assert!(
        answered >= 5 && answered <= with_answer,
        "{answered} answers to {with_answer} addressed garbage requests"
    );

    // The host still serves: every job once, every result once.
    let me = NodeId("honest".into());
    let worker = WorkerId("honest/0".into());
    let mut taken = HashSet::new();
    loop {
        let jobs = node
            .take_jobs(&s.id, &me, &worker, 8, Duration::from_millis(200))
            .await
            .expect("take");
        if jobs.is_empty() {
            break;
        }
        for j in jobs {
            assert!(taken.insert(j.lease.job), "{} leased twice", j.lease.job);
            let done = node
                .complete(&j.lease, Ok(j.payload.clone()))
                .await
                .expect("complete");
            assert_eq!(done, Completion::Accepted, "{}", j.lease.job);
        }
    }
    assert_eq!(taken.len(), n, "jobs taken after the garbage");
    let results = all_results(&pool, &s.id, n).await;
    let ids: HashSet<JobId> = results.iter().map(|r| r.job).collect();
    assert_eq!((results.len(), ids.len()), (n, n));
    for r in &results {
        assert_eq!(
            r.outcome,
            JobOutcome::Done(Bytes::from(r.job.0.to_le_bytes().to_vec()))
        );
    }
    let _ = conn.close(200, "done".into()).await;
    pool.close_session(&s.id).await.expect("close");
    pool.remove_namespace().await.expect("clean up");
    pool.close().await;
    node.close().await;
}
