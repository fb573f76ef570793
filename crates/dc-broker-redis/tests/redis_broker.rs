//! RedisBroker's own behaviour beyond the conformance suite: connection errors, chunked
//! payloads, cleanup on close, and garbage in Redis.

mod common;

use dc_core::broker::{Inspect, JobQueue, NodeRegistry, SessionControl, UpdateLog};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dc_broker_redis::{RedisBroker, RedisOptions, redis_url};
use dc_core::broker::{
    AttemptEnd, JobId, JobOutcome, JobResult, NewJob, NodeId, NodeStatus, SessionId, WorkerId,
};
use dc_core::{Broker, BrokerError, JobFailure};

async fn broker_with(options: RedisOptions) -> RedisBroker {
    RedisBroker::connect(&common::server().url(), options)
        .await
        .expect("connect to the dedicated redis-server")
}

async fn broker() -> (RedisBroker, String) {
    let prefix = common::unique_prefix();
    let options = RedisOptions {
        prefix: prefix.clone(),
        ..RedisOptions::default()
    };
    (broker_with(options).await, prefix)
}

fn raw() -> redis::Connection {
    redis::Client::open(common::server().url())
        .and_then(|c| c.get_connection())
        .expect("a plain connection to the dedicated redis-server")
}

/// Every key matching `pattern` (SCAN).
fn scan(pattern: &str) -> Vec<String> {
    let mut conn = raw();
    let mut cursor = 0u64;
    let mut all = Vec::new();
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query(&mut conn)
            .expect("SCAN");
        all.extend(keys);
        if next == 0 {
            return all;
        }
        cursor = next;
    }
}

async fn open(broker: &RedisBroker, lease: Duration) -> SessionId {
    open_with(broker, lease, 3).await
}

async fn open_with(broker: &RedisBroker, lease: Duration, attempts: u32) -> SessionId {
    broker
        .try_open_session(&dc_core::testing::spec(lease, attempts))
        .await
        .expect("try_open_session")
        .expect("no other session is active")
        .id
}

/// A node's status with no workers and no leases.
fn status_of(node: &str) -> NodeStatus {
    NodeStatus {
        node: NodeId(node.into()),
        host: "h".into(),
        kinds: vec![],
        workers: vec![],
        leases: vec![],
    }
}

/// Run `args` as one command on the server, behind the broker's back (planted damage).
fn plant_on(conn: &mut redis::Connection, args: &[&str]) {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query::<redis::Value>(conn).expect("plant a value");
}

fn pattern(n: usize, seed: u8) -> Bytes {
    Bytes::from(
        (0..n)
            .map(|i| {
                i.to_le_bytes()[0].wrapping_mul(31).wrapping_add(seed) ^ (i >> 13).to_le_bytes()[0]
            })
            .collect::<Vec<u8>>(),
    )
}

#[tokio::test]
async fn wrong_password_is_an_auth_error_within_3s() {
    let url = redis_url("127.0.0.1", common::server().port, Some("not-the-password"));
    let started = Instant::now();
    let err = RedisBroker::connect(&url, RedisOptions::default())
        .await
        .expect_err("a wrong password is refused");
    assert!(matches!(err, BrokerError::Auth(_)), "got {err:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(!err.to_string().contains("not-the-password"), "{err}");
}

#[tokio::test]
async fn missing_password_is_an_auth_error() {
    let url = redis_url("127.0.0.1", common::server().port, None);
    let err = RedisBroker::connect(&url, RedisOptions::default())
        .await
        .expect_err("no password is refused");
    assert!(matches!(err, BrokerError::Auth(_)), "got {err:?}");
}

#[tokio::test]
async fn nothing_listening_is_a_transient_connection_error_within_the_timeout() {
    let port = common::free_port();
    let url = redis_url("127.0.0.1", port, Some("hunter2"));
    let options = RedisOptions {
        connect_timeout: Duration::from_secs(2),
        ..RedisOptions::default()
    };
    let started = Instant::now();
    let err = RedisBroker::connect(&url, options)
        .await
        .expect_err("nothing listens there");
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "{:?}",
        started.elapsed()
    );
    assert!(matches!(err, BrokerError::Connection(_)), "got {err:?}");
    assert!(err.is_transient());
    let message = err.to_string();
    assert!(message.contains(&format!("127.0.0.1:{port}")), "{message}");
    assert!(!message.contains("hunter2"), "{message}");
    // The refusal itself stays reachable as the error's source.
    let source = std::error::Error::source(&err).expect("the I/O error beneath");
    let io = source
        .downcast_ref::<std::io::Error>()
        .expect("an I/O error");
    assert_eq!(io.kind(), std::io::ErrorKind::ConnectionRefused, "{io:?}");
}

#[tokio::test]
async fn unresolvable_host_is_a_connection_error_within_the_timeout() {
    let options = RedisOptions {
        connect_timeout: Duration::from_secs(2),
        ..RedisOptions::default()
    };
    let started = Instant::now();
    let err = RedisBroker::connect("redis://:pw@no-such-host.invalid:6379", options)
        .await
        .expect_err("no such host");
    assert!(started.elapsed() < Duration::from_millis(2500));
    assert!(matches!(err, BrokerError::Connection(_)), "got {err:?}");
    assert!(!err.to_string().contains(":pw@"), "{err}");
}

#[tokio::test]
async fn debug_never_prints_the_password() {
    let broker = broker_with(RedisOptions::default()).await;
    let shown = format!("{broker:?}");
    assert!(!shown.contains(common::PASSWORD), "{shown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_of_40_mib_round_trip_in_chunks_and_leave_no_keys() {
    let prefix = common::unique_prefix();
    let broker = broker_with(RedisOptions {
        prefix: prefix.clone(),
        chunk_size: 4 << 20,
        ..RedisOptions::default()
    })
    .await;
    let s = open(&broker, Duration::from_secs(30)).await;
    let job = pattern(40 << 20, 7);
    let output = pattern(40 << 20, 99);
    let started = Instant::now();
    broker
        .submit(
            &s,
            vec![NewJob {
                id: JobId(1),
                payload: job.clone(),
                update_seq: 0,
            }],
        )
        .await
        .expect("submit");
    let submitted = started.elapsed();
    let leased = broker
        .take_job(
            &s,
            &NodeId("n".into()),
            &WorkerId("n/0".into()),
            Duration::from_secs(1),
        )
        .await
        .expect("take_job")
        .expect("the job");
    let taken = started.elapsed();
    assert!(leased.payload == job, "the job payload changed in transit");
    broker
        .complete(&leased.lease, Ok(output.clone()))
        .await
        .expect("complete");
    let completed = started.elapsed();
    let results = broker
        .take_results(&s, 10, Duration::from_secs(5))
        .await
        .expect("take_results");
    let received = started.elapsed();
    eprintln!(
        "40 MiB each way: submit {submitted:?}, take {:?}, complete {:?}, results {:?}",
        taken - submitted,
        completed - taken,
        received - completed
    );
    assert_eq!(results.len(), 1);
    match &results[0].outcome {
        JobOutcome::Done(bytes) => assert!(*bytes == output, "the result changed in transit"),
        other => panic!("expected a result, got {other:?}"),
    }
    let left: Vec<String> = scan(&format!("{prefix}:*"))
        .into_iter()
        .filter(|k| k.contains(":in:") || k.contains(":out:") || k.contains(":stage:"))
        .collect();
    assert!(left.is_empty(), "chunk keys left behind: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_session_removes_every_key_of_the_session() {
    let prefix = common::unique_prefix();
    let broker = broker_with(RedisOptions {
        prefix: prefix.clone(),
        chunk_size: 1 << 20,
        ..RedisOptions::default()
    })
    .await;
    let s = open(&broker, Duration::from_secs(30)).await;
    let mut jobs: Vec<NewJob> = (0..10)
        .map(|i| NewJob {
            id: JobId(i),
            payload: Bytes::from(vec![i.to_le_bytes()[0]; 100]),
            update_seq: 0,
        })
        .collect();
    jobs.push(NewJob {
        id: JobId(100),
        payload: pattern(3 << 20, 1),
        update_seq: 0,
    });
    broker.submit(&s, jobs).await.expect("submit");
    broker
        .publish_update(&s, Bytes::from_static(b"small update"))
        .await
        .expect("publish");
    broker
        .publish_update(&s, pattern(2 << 20, 2))
        .await
        .expect("publish a chunked update");
    let node = NodeId("n".into());
    for _ in 0..3 {
        let job = broker
            .take_job(
                &s,
                &node,
                &WorkerId("n/0".into()),
                Duration::from_millis(50),
            )
            .await
            .expect("take_job")
            .expect("a job");
        broker
            .complete(&job.lease, Ok(pattern(2 << 20, 3)))
            .await
            .expect("complete");
    }
    broker
        .report_problem(
            &s,
            dc_core::broker::NodeProblem::UnknownKind {
                node: node.clone(),
                known: vec![],
            },
        )
        .await
        .expect("report");
    let tagged = format!("{prefix}:{{{}}}:*", s.0);
    assert!(!scan(&tagged).is_empty());
    broker.close_session(&s).await.expect("close");
    let left = scan(&tagged);
    assert!(left.is_empty(), "keys left after close: {left:?}");
    let err = broker
        .take_job(&s, &node, &WorkerId("n/0".into()), Duration::ZERO)
        .await
        .expect_err("the session is gone");
    assert!(matches!(err, BrokerError::SessionGone(_)), "got {err:?}");
}

#[tokio::test]
async fn garbage_in_redis_is_an_error_not_a_panic() {
    let (broker, prefix) = broker().await;
    // One attempt: a job whose payload cannot be read fails for good at once.
    let s = open_with(&broker, Duration::from_secs(30), 1).await;
    let base = format!("{prefix}:{{{}}}:", s.0);
    let mut conn = raw();
    let mut run = |cmd: &mut redis::Cmd| {
        cmd.query::<redis::Value>(&mut conn).expect("plant garbage");
    };

    // A node status that is not CBOR.
    broker
        .heartbeat(&status_of("good"))
        .await
        .expect("heartbeat");
    run(redis::cmd("SET")
        .arg(format!("{prefix}:node:good"))
        .arg(&b"\xff\x00garbage"[..]));
    broker
        .heartbeat(&status_of("other"))
        .await
        .expect("heartbeat");
    // Listing nodes skips it (and says so in the log); the others are still listed.
    let seen = broker
        .nodes(Duration::from_secs(60))
        .await
        .expect("nodes despite a garbage status");
    let names: Vec<&str> = seen.iter().map(|n| n.status.node.0.as_str()).collect();
    assert!(
        names.contains(&"other") && !names.contains(&"good"),
        "{names:?}"
    );
    // Stats skip it rather than fail the pool.
    broker.session_stats(&s).await.expect("stats");

    // A result notice for a job that has no result.
    run(redis::cmd("XADD")
        .arg(format!("{base}results"))
        .arg("*")
        .arg("j")
        .arg("not-a-number"));
    let err = broker
        .take_results(&s, 10, Duration::from_millis(100))
        .await
        .expect_err("a garbage result notice");
    assert!(matches!(err, BrokerError::Protocol(_)), "got {err:?}");

    // An update entry with neither a body nor chunks.
    run(redis::cmd("XADD")
        .arg(format!("{base}upd"))
        .arg("1-0")
        .arg("junk")
        .arg("x"));
    let err = broker
        .read_updates(&s, 0, 10)
        .await
        .expect_err("a garbage update");
    assert!(matches!(err, BrokerError::Protocol(_)), "got {err:?}");

    // A job entry that names no job is dropped; the real job behind it is still handed out.
    run(redis::cmd("XADD")
        .arg(format!("{base}jobs"))
        .arg("*")
        .arg("garbage")
        .arg("entry"));
    let submit = |id: u64, payload: Bytes| {
        broker.submit(
            &s,
            vec![NewJob {
                id: JobId(id),
                payload,
                update_seq: 0,
            }],
        )
    };
    let (node, worker) = (NodeId("n".into()), WorkerId("n/0".into()));
    let take = || broker.take_job(&s, &node, &worker, Duration::from_millis(200));
    submit(5, Bytes::from_static(b"real"))
        .await
        .expect("submit");
    let job = take().await.expect("take_job").expect("the real job");
    assert_eq!(job.lease.job, JobId(5));

    // A job's payload chunks (a payload too large to travel inline) overwritten behind the
    // broker's back.
    submit(6, Bytes::from(vec![7u8; 300 << 10]))
        .await
        .expect("submit");
    run(redis::cmd("SET")
        .arg(format!("{base}in:6"))
        .arg("not a hash"));
    let err = take().await.expect_err("a payload of the wrong type");
    assert!(matches!(err, BrokerError::Protocol(_)), "got {err:?}");
    // The leased job was handed back as a failed attempt, not left to its lease.
    let results = broker
        .take_results(&s, 10, Duration::from_secs(2))
        .await
        .expect("take_results");
    match &results[..] {
        [
            JobResult {
                job: JobId(6),
                outcome: JobOutcome::Failed { history, .. },
                ..
            },
        ] => assert!(
            matches!(&history[..], [r] if matches!(&r.end, AttemptEnd::Protocol(m) if m.contains("payload cannot be read"))),
            "history {history:?}"
        ),
        other => panic!("expected job 6 to fail at once, got {other:?}"),
    }

    // A job's own record (which holds a small payload) overwritten.
    submit(7, Bytes::from_static(b"small"))
        .await
        .expect("submit");
    run(redis::cmd("SET")
        .arg(format!("{base}job:7"))
        .arg("not a hash"));
    // The job fails for good with a word for its owner; taking goes on.
    assert!(take().await.expect("take_job").is_none());
    let results = broker
        .take_results(&s, 10, Duration::from_secs(2))
        .await
        .expect("take_results");
    match &results[..] {
        [
            JobResult {
                job: JobId(7),
                outcome:
                    JobOutcome::Failed {
                        kind: JobFailure::Broker,
                        message,
                        ..
                    },
                ..
            },
        ] => assert!(message.contains("damaged"), "message {message:?}"),
        other => panic!("expected job 7 to fail as damaged, got {other:?}"),
    }
}

/// Values planted in a live session's keys (huge lengths, non-numbers, keys of the wrong
/// type): each damaged job fails alone with an attributed error or is repaired, damaged
/// counters are reset, a damaged session reads as gone (its pool then starts afresh); never
/// an abort, a panic, or a call that hangs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planted_values_fail_their_job_or_are_repaired() {
    let (broker, prefix) = broker().await;
    let s = open_with(&broker, Duration::from_secs(30), 1).await;
    let base = format!("{prefix}:{{{}}}:", s.0);
    let mut conn = raw();
    let mut plant = |args: &[&str]| plant_on(&mut conn, args);
    let (node, worker) = (NodeId("n".into()), WorkerId("n/0".into()));
    let submit = |id: u64, payload: Bytes| {
        broker.submit(
            &s,
            vec![NewJob {
                id: JobId(id),
                payload,
                update_seq: 0,
            }],
        )
    };
    let take = || broker.take_job(&s, &node, &worker, Duration::from_millis(200));
    let failed_as = |results: &[JobResult], id: u64| -> Option<(JobFailure, String)> {
        results
            .iter()
            .find(|r| r.job == JobId(id))
            .and_then(|r| match &r.outcome {
                JobOutcome::Failed {
                    kind,
                    message,
                    history,
                } => Some((
                    *kind,
                    format!(
                        "{message} {}",
                        history
                            .iter()
                            .map(|h| h.end.to_string())
                            .collect::<Vec<_>>()
                            .join(" ")
                    ),
                )),
                JobOutcome::Done(_) => None,
            })
    };
    let big = 300 << 10;
    let job_key = |id: u64| format!("{base}job:{id}");

    // 1. A planted length of 999,999,999,999 bytes on a chunked payload: no allocation of it;
    //    the attempt fails with what was wrong.
    submit(1, pattern(big, 1)).await.expect("submit");
    plant(&["HSET", &job_key(1), "len", "999999999999"]);
    assert!(
        take().await.is_err(),
        "the only job of the batch cannot be read"
    );
    // 2. A planted chunk count far past the payload.
    submit(2, pattern(big, 2)).await.expect("submit");
    plant(&["HSET", &job_key(2), "n", "4000000000"]);
    assert!(take().await.is_err());
    // 3. A non-number where a length goes, and where the attempt number goes.
    submit(3, pattern(big, 3)).await.expect("submit");
    plant(&["HSET", &job_key(3), "len", "lots"]);
    assert!(take().await.is_err());
    submit(4, Bytes::from_static(b"four"))
        .await
        .expect("submit");
    plant(&["HSET", &job_key(4), "att", "one"]);
    let four = take()
        .await
        .expect("take_job")
        .expect("job 4, attempt repaired");
    assert_eq!((four.lease.job, four.lease.attempt), (JobId(4), 1));
    // 4. Damaged counters of the session are reset; submitting and stats go on.
    plant(&["HSET", &format!("{base}meta"), "q", "zz", "r", "1.5"]);
    submit(5, Bytes::from_static(b"five"))
        .await
        .expect("submit");
    broker
        .session_stats(&s)
        .await
        .expect("stats with damaged counters");
    let five = take().await.expect("take_job").expect("job 5");
    broker
        .complete(&four.lease, Ok(Bytes::from_static(b"4")))
        .await
        .expect("complete 4");
    let all_results = |want| dc_core::testing::all_results(&broker, &s, want);
    let mut results = all_results(4).await;
    // 5. The results stream replaced by a string (its notices are lost: a pool submits again
    //    what it never hears of): completing repairs it.
    plant(&["SET", &format!("{base}results"), "not a stream"]);
    broker
        .complete(&five.lease, Ok(pattern(big, 5)))
        .await
        .expect("complete 5 (its result staged by chunks)");
    // 6. A planted length on a chunked result: the job fails as damaged, once.
    plant(&["HSET", &format!("{base}out:5"), "len", "999999999999"]);
    results.extend(all_results(1).await);
    let mut ids: Vec<u64> = results.iter().map(|r| r.job.0).collect();
    ids.sort_unstable();
    assert_eq!(
        ids,
        vec![1, 2, 3, 4, 5],
        "each job's result once: {results:?}"
    );
    for (id, what) in [
        (1, "claims 999999999999 bytes"),
        (2, "4000000000 chunks"),
        (3, "expected a number"),
    ] {
        let (kind, message) = failed_as(&results, id).unwrap_or_else(|| panic!("job {id} failed"));
        assert_eq!(kind, JobFailure::Exhausted, "job {id}");
        assert!(message.contains(what), "job {id}: {message}");
    }
    assert!(failed_as(&results, 4).is_none(), "job 4 ran once repaired");
    let (kind, message) = failed_as(&results, 5).expect("job 5's damaged result");
    assert_eq!(kind, JobFailure::Broker);
    assert!(message.contains("claims 999999999999 bytes"), "{message}");
    // 7. An update entry with planted chunk numbers: an error, no allocation.
    plant(&[
        "XADD",
        &format!("{base}upd"),
        "1-0",
        "n",
        "3",
        "len",
        "999999999999",
    ]);
    let err = broker
        .read_updates(&s, 0, 10)
        .await
        .expect_err("a damaged update");
    assert!(matches!(err, BrokerError::Protocol(_)), "got {err:?}");
    // 8. A damaged attempt limit: the session reads as gone, everywhere.
    plant(&["HSET", &format!("{base}meta"), "max", "many"]);
    let err = take().await.expect_err("a damaged session");
    assert!(matches!(err, BrokerError::SessionGone(_)), "got {err:?}");
    let err = broker
        .session_stats(&s)
        .await
        .expect_err("a damaged session");
    assert!(matches!(err, BrokerError::SessionGone(_)), "got {err:?}");
    // 9. The session meta replaced by a string.
    plant(&["SET", &format!("{base}meta"), "not a hash"]);
    let err = submit(9, Bytes::from_static(b"nine"))
        .await
        .expect_err("a damaged session");
    assert!(matches!(err, BrokerError::SessionGone(_)), "got {err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renew_by_a_node_that_lost_the_lease_does_nothing() {
    let (broker, _) = broker().await;
    let lease = Duration::from_millis(300);
    let s = open(&broker, lease).await;
    broker
        .submit(
            &s,
            vec![NewJob {
                id: JobId(1),
                payload: Bytes::from_static(b"j"),
                update_seq: 0,
            }],
        )
        .await
        .expect("submit");
    let node = |n: &str| NodeId(n.into());
    let first = broker
        .take_job(
            &s,
            &node("zombie"),
            &WorkerId("zombie/0".into()),
            Duration::ZERO,
        )
        .await
        .expect("take")
        .expect("the job");
    // The zombie's lease expires and the job goes to another node.
    let mut reaped = 0;
    let deadline = Instant::now() + Duration::from_secs(5);
    while reaped == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        broker.keep_session_alive(&s).await.expect("keep alive");
        reaped = broker.reap_expired().await.expect("reap");
    }
    assert_eq!(reaped, 1);
    let second = broker
        .take_job(
            &s,
            &node("alive"),
            &WorkerId("alive/0".into()),
            Duration::ZERO,
        )
        .await
        .expect("take")
        .expect("the job again");
    // The zombie keeps heartbeating its old lease, and even forges one naming the new entry.
    let mut forged = second.lease.clone();
    forged.node = node("zombie");
    for _ in 0..6 {
        broker
            .heartbeat(&NodeStatus {
                node: node("zombie"),
                host: "h".into(),
                kinds: vec![],
                workers: vec![],
                leases: vec![first.lease.clone(), forged.clone()],
            })
            .await
            .expect("heartbeat");
        broker.keep_session_alive(&s).await.expect("keep alive");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The live node never renewed, so its lease expired regardless of the zombie.
    assert_eq!(broker.reap_expired().await.expect("reap"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// Many take → complete cycles through the trait object: each job is leased once and its
/// result handed out once. (Speed is `dc-cli bench`'s business, not a test's.)
async fn take_complete_cycles_deliver_each_result_once() {
    let (broker, _) = broker().await;
    let broker: Arc<dyn Broker> = Arc::new(broker);
    let s = open_dyn(broker.as_ref()).await;
    let n = 200u64;
    broker
        .submit(
            &s,
            (0..n)
                .map(|i| NewJob {
                    id: JobId(i),
                    payload: Bytes::from(vec![1u8; 64]),
                    update_seq: 0,
                })
                .collect(),
        )
        .await
        .expect("submit");
    let mut leased = std::collections::HashSet::new();
    for _ in 0..n {
        let job = broker
            .take_job(
                &s,
                &NodeId("n".into()),
                &WorkerId("n/0".into()),
                Duration::ZERO,
            )
            .await
            .expect("take")
            .expect("a job");
        assert!(
            leased.insert(job.lease.job),
            "{} leased twice",
            job.lease.job
        );
        broker
            .complete(&job.lease, Ok(Bytes::from_static(b"out")))
            .await
            .expect("complete");
    }
    let none_left = broker
        .take_job(
            &s,
            &NodeId("n".into()),
            &WorkerId("n/0".into()),
            Duration::ZERO,
        )
        .await
        .expect("take");
    assert!(none_left.is_none(), "a job was queued twice");
    let mut results = std::collections::HashSet::new();
    for _ in 0..50 {
        for r in broker
            .take_results(&s, 1000, Duration::from_millis(100))
            .await
            .expect("take_results")
        {
            assert!(
                results.insert(r.job),
                "result of {} handed out twice",
                r.job
            );
        }
        if u64::try_from(results.len()) == Ok(n) {
            break;
        }
    }
    assert_eq!(results, leased, "every leased job's result, once");
    assert_eq!(u64::try_from(results.len()), Ok(n));
}

async fn open_dyn(broker: &dyn Broker) -> SessionId {
    broker
        .try_open_session(&dc_core::testing::spec(Duration::from_secs(30), 3))
        .await
        .expect("try_open_session")
        .expect("no other session is active")
        .id
}

/// `lost_jobs` names the jobs the broker no longer holds (their records removed, so that they
/// can be submitted again), queues again a job whose stream entry is gone, and announces again
/// a kept result whose notice is gone (a finished job only when asked for a second time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_jobs_are_named_and_what_can_be_repaired_is() {
    let (broker, prefix) = broker().await;
    let s = open(&broker, Duration::from_secs(30)).await;
    let base = format!("{prefix}:{{{}}}:", s.0);
    let mut conn = raw();
    let mut plant = |args: &[&str]| plant_on(&mut conn, args);
    let jobs: Vec<NewJob> = (1..=5)
        .map(|i| NewJob {
            id: JobId(i),
            payload: Bytes::from(vec![i.to_le_bytes()[0]; 8]),
            update_seq: 0,
        })
        .collect();
    broker.submit(&s, jobs).await.expect("submit");
    let (node, worker) = (NodeId("n".into()), WorkerId("n/0".into()));
    let mut leased = Vec::new();
    while leased.len() < 2 {
        leased.extend(
            broker
                .take_jobs(
                    &s,
                    &node,
                    &worker,
                    2 - leased.len(),
                    Duration::from_millis(200),
                )
                .await
                .expect("take"),
        );
    }
    // Jobs 1 and 2 finish: 1 with a small result (it travels in its notice), 2 with a large
    // one (kept in out:2).
    leased.sort_by_key(|j| j.lease.job);
    broker
        .complete(&leased[0].lease, Ok(Bytes::from_static(b"one")))
        .await
        .expect("complete 1");
    broker
        .complete(&leased[1].lease, Ok(pattern(300 << 10, 2)))
        .await
        .expect("complete 2");
    // Damage: both notices lost, job 3's record gone, job 4's queue entry gone.
    plant(&["DEL", &format!("{base}results")]);
    plant(&["DEL", &format!("{base}job:3")]);
    let entry: String = {
        let mut c = raw();
        redis::cmd("HGET")
            .arg(format!("{base}job:4"))
            .arg("e")
            .query(&mut c)
            .expect("job 4's entry")
    };
    plant(&["XDEL", &format!("{base}jobs"), &entry]);
    let ask = [JobId(1), JobId(2), JobId(3), JobId(4), JobId(5)];
    let lost = broker.lost_jobs(&s, &ask).await.expect("lost_jobs");
    // Jobs 1 and 2 finished, and their results may still be on their way to the pool: nothing
    // is done about them until they are asked for again.
    assert_eq!(lost, vec![JobId(3)]);
    let none = broker
        .take_results(&s, 10, Duration::from_millis(300))
        .await
        .expect("take_results");
    assert!(none.is_empty(), "announced at the first ask: {none:?}");
    // Asked again: job 2's kept result is announced again; job 1's result travelled in its
    // lost notice, so job 1 is lost (3 still is: it was not submitted again yet).
    let lost = broker
        .lost_jobs(&s, &ask[..4])
        .await
        .expect("lost_jobs again");
    assert_eq!(lost, vec![JobId(1), JobId(3)]);
    let results = broker
        .take_results(&s, 10, Duration::from_secs(2))
        .await
        .expect("take_results");
    assert_eq!(
        results.iter().map(|r| r.job).collect::<Vec<_>>(),
        vec![JobId(2)]
    );
    assert_eq!(results[0].outcome, JobOutcome::Done(pattern(300 << 10, 2)));
    // Jobs 4 and 5 can be taken; 1 and 3 submitted again run once more.
    let again: Vec<NewJob> = [1u64, 3]
        .iter()
        .map(|&i| NewJob {
            id: JobId(i),
            payload: Bytes::from(vec![i.to_le_bytes()[0]; 8]),
            update_seq: 0,
        })
        .collect();
    broker
        .submit(&s, again)
        .await
        .expect("submit the lost jobs");
    let mut ids = Vec::new();
    while let Some(job) = broker
        .take_job(&s, &node, &worker, Duration::from_millis(200))
        .await
        .expect("take")
    {
        assert_eq!(
            job.payload,
            Bytes::from(vec![job.lease.job.0.to_le_bytes()[0]; 8])
        );
        ids.push(job.lease.job.0);
    }
    ids.sort_unstable();
    assert_eq!(ids, vec![1, 3, 4, 5]);
    assert!(
        broker
            .lost_jobs(&s, &[JobId(1), JobId(3), JobId(4), JobId(5)])
            .await
            .expect("lost_jobs")
            .is_empty(),
        "leased jobs are not lost"
    );
}

/// A finished job whose notice waits unread, or whose big output is being read, is not lost:
/// `lost_jobs` names nothing and announces nothing again, so every result is read once and no
/// notice is left over that names a result already handed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_waiting_or_being_read_are_never_announced_twice() {
    let (broker, prefix) = broker().await;
    let s = open(&broker, Duration::from_secs(30)).await;
    let results_key = format!("{prefix}:{{{}}}:results", s.0);
    let notices = || -> usize {
        redis::cmd("XLEN")
            .arg(&results_key)
            .query(&mut raw())
            .expect("XLEN")
    };
    let jobs: Vec<NewJob> = (1..=2)
        .map(|i| NewJob {
            id: JobId(i),
            payload: Bytes::from(vec![i.to_le_bytes()[0]; 8]),
            update_seq: 0,
        })
        .collect();
    broker.submit(&s, jobs).await.expect("submit");
    let (node, worker) = (NodeId("n".into()), WorkerId("n/0".into()));
    let mut leased = Vec::new();
    while leased.len() < 2 {
        leased.extend(
            broker
                .take_jobs(&s, &node, &worker, 2, Duration::from_millis(200))
                .await
                .expect("take"),
        );
    }
    leased.sort_by_key(|j| j.lease.job);
    let big = pattern(96 << 20, 7);
    broker
        .complete(&leased[0].lease, Ok(pattern(300 << 10, 1)))
        .await
        .expect("complete 1");
    // Unread: asked twice, job 1 is neither lost nor announced again.
    for _ in 0..2 {
        let lost = broker.lost_jobs(&s, &[JobId(1)]).await.expect("lost_jobs");
        assert!(lost.is_empty(), "an unread result counted lost: {lost:?}");
        assert_eq!(notices(), 1, "an unread result was announced again");
    }
    let first = broker
        .take_results(&s, 10, Duration::from_secs(2))
        .await
        .expect("take_results");
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].outcome, JobOutcome::Done(pattern(300 << 10, 1)));
    // Job 2's big output is read by chunks while the pool asks about it, again and again.
    broker
        .complete(&leased[1].lease, Ok(big.clone()))
        .await
        .expect("complete 2");
    let reading = broker.take_results(&s, 10, Duration::from_secs(2));
    let asking = async {
        loop {
            let lost = broker.lost_jobs(&s, &[JobId(2)]).await.expect("lost_jobs");
            assert!(lost.is_empty(), "a result being read counted lost");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    // Asked until the result is read (the pool stops asking for a job once it has it).
    let second = tokio::select! {
        second = reading => second.expect("take_results"),
        () = asking => unreachable!("asking never ends"),
    };
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].outcome, JobOutcome::Done(big));
    assert_eq!(notices(), 0, "a notice was added for a result being read");
    let after = broker
        .take_results(&s, 10, Duration::from_millis(300))
        .await
        .expect("take_results");
    assert!(after.is_empty(), "results handed out again: {after:?}");
}

/// An update published at its place in the log goes in once: called again (an answer lost on
/// the way), it adds nothing; a log that lost earlier updates reads as a gone session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_published_at_its_place_goes_in_once() {
    let (broker, _) = broker().await;
    let s = open(&broker, Duration::from_secs(30)).await;
    let big = pattern(300 << 10, 9);
    for _ in 0..2 {
        let seq = broker
            .publish_update_at(&s, 1, Bytes::from_static(b"one"))
            .await
            .expect("publish 1");
        assert_eq!(seq, 1);
        let seq = broker
            .publish_update_at(&s, 2, big.clone())
            .await
            .expect("publish 2 (staged by chunks)");
        assert_eq!(seq, 2);
    }
    let log = broker.read_updates(&s, 0, 10).await.expect("read_updates");
    assert_eq!(
        log,
        vec![(1, Bytes::from_static(b"one")), (2, big)],
        "each update once, in order"
    );
    match broker
        .publish_update_at(&s, 4, Bytes::from_static(b"four"))
        .await
    {
        Err(BrokerError::SessionGone(_)) => {}
        other => panic!("a log missing update 3 must read as gone, got {other:?}"),
    }
}

struct Doubler;

impl dc_core::Worker for Doubler {
    const KIND: &'static str = "doubler";
    type Init = ();
    type Job = u32;
    type Output = u32;
    type Update = ();

    fn new(_: (), _: &dc_core::WorkerContext) -> Result<Self, dc_core::BoxError> {
        Ok(Doubler)
    }
    fn run(&mut self, job: u32) -> Result<u32, dc_core::BoxError> {
        Ok(2 * job)
    }
}

/// A pool whose job vanished from the broker (its record and its queue entry deleted behind
/// the broker's back) does not wait forever: after a stretch without results it finds the job
/// lost, submits it again, and every result arrives once. This test plays the node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_submits_again_a_job_the_broker_lost() {
    use futures::StreamExt;
    let (broker, prefix) = broker().await;
    let broker = Arc::new(broker);
    let pool = dc_core::Pool::<Doubler>::builder(())
        .broker_instance(broker.clone())
        .connect()
        .await
        .expect("connect");
    let s = SessionId(pool.session_id());
    let base = format!("{prefix}:{{{}}}:", s.0);
    let pool = Arc::new(pool);
    // The stream submits its jobs as it is read: read it on a task of its own.
    let reader = {
        let pool = pool.clone();
        tokio::spawn(async move {
            let mut stream = pool.imap_unordered(vec![1u32, 2, 3]);
            let mut got = Vec::new();
            while got.len() < 3 {
                match tokio::time::timeout(Duration::from_secs(40), stream.next()).await {
                    Ok(Some(Ok(item))) => got.push(item),
                    other => panic!("expected every result within 40 s, got {other:?}"),
                }
            }
            got
        })
    };
    // Once the jobs are queued, job 2 vanishes: its record and its queue entry.
    let mut conn = raw();
    let deadline = Instant::now() + Duration::from_secs(10);
    let entry = loop {
        let e: Option<String> = redis::cmd("HGET")
            .arg(format!("{base}job:2"))
            .arg("e")
            .query(&mut conn)
            .expect("HGET");
        if let Some(e) = e {
            break e;
        }
        assert!(Instant::now() < deadline, "job 2 was never submitted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    redis::cmd("XDEL")
        .arg(format!("{base}jobs"))
        .arg(&entry)
        .query::<i64>(&mut conn)
        .expect("XDEL");
    redis::cmd("DEL")
        .arg(format!("{base}job:2"))
        .query::<i64>(&mut conn)
        .expect("DEL");
    // The node: runs every job it can take.
    let node = {
        let broker = broker.clone();
        let s = s.clone();
        tokio::spawn(async move {
            let (n, w) = (NodeId("n".into()), WorkerId("n/0".into()));
            // Its one worker, idle between jobs, as a node's heartbeat reports it.
            let status = NodeStatus {
                node: n.clone(),
                host: "h".into(),
                kinds: vec!["doubler".into()],
                workers: vec![dc_core::broker::WorkerStatus {
                    worker: w.clone(),
                    session: Some(s.clone()),
                    state: dc_core::broker::WorkerState::Idle,
                    devices: vec![],
                }],
                leases: vec![],
            };
            let mut ran = Vec::new();
            loop {
                broker.heartbeat(&status).await.expect("heartbeat");
                let Ok(Some(job)) = broker
                    .take_job(&s, &n, &w, Duration::from_millis(200))
                    .await
                else {
                    if ran.len() >= 3 {
                        return ran;
                    }
                    continue;
                };
                let x: u32 = ciborium::from_reader(job.payload.as_ref()).expect("a u32 job");
                let mut out = Vec::new();
                ciborium::into_writer(&(2 * x), &mut out).expect("encode");
                broker
                    .complete(&job.lease, Ok(Bytes::from(out)))
                    .await
                    .expect("complete");
                ran.push(x);
            }
        })
    };
    let started = Instant::now();
    let mut got = reader.await.expect("the reader");
    let took = started.elapsed();
    got.sort_unstable();
    assert_eq!(got, vec![(0, 2), (1, 4), (2, 6)]);
    let mut ran = node.await.expect("the node");
    ran.sort_unstable();
    assert_eq!(ran, vec![1, 2, 3], "each job ran once");
    assert!(
        took >= Duration::from_secs(9),
        "job 2 came back after {took:?}, before any check"
    );
    pool.close().await.expect("close");
}
