//! Fuzzing of the Redis reply decoders: the broker talks to a fake server that answers every
//! command with generated replies: random RESP values, and values shaped like each script's
//! reply (a take, a results batch, node statuses, counters, update entries) whose fields are
//! hostile (huge or negative lengths and counts, non-numbers, empty strings, wrong types,
//! chunk keys of this session, CBOR with absurd headers), nested arrays, errors, bytes that
//! are not RESP at all, and replies cut short. Each case calls one broker operation and gets an answer (a value or an
//! error) within a bound: never a panic, never an abort on an allocation, never a hang.
//!
//! A corpus of replies (the shapes above with every hostile field value in turn) runs
//! first on every operation; then `DC_FUZZ_CASES` generated cases (20,000 by default: about
//! half a minute in a debug build).

use dc_core::broker::{Inspect, JobQueue, NodeRegistry, SessionControl, UpdateLog};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use dc_broker_redis::{RedisBroker, RedisOptions};
use dc_core::broker::{JobId, Lease, NodeId, NodeStatus, SessionId, WorkerId};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The session every operation names; chunk keys under its base are fetched.
const SESSION: &str = "s1-fuzz";
/// How long the broker waits for a whole answer. A reply cut short (a header promising more
/// than follows) leaves the broker waiting for the rest, as it would for a stalled server,
/// until this runs out; then the connection is dropped and the next command makes a new one.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(1);
/// The longest an operation may take against the fake server: every command is answered at
/// once, so only a reply cut short (up to `RESPONSE_TIMEOUT` per command) or a decoder that
/// loops or waits on what it read could take longer.
const BOUND: Duration = Duration::from_secs(10);

fn cases() -> u32 {
    std::env::var("DC_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000)
}

// ---- RESP ----------------------------------------------------------------------------------

fn bulk(b: &[u8]) -> Vec<u8> {
    let mut out = format!("${}\r\n", b.len()).into_bytes();
    out.extend_from_slice(b);
    out.extend_from_slice(b"\r\n");
    out
}

fn int(i: i64) -> Vec<u8> {
    format!(":{i}\r\n").into_bytes()
}

fn array(items: Vec<Vec<u8>>) -> Vec<u8> {
    let mut out = format!("*{}\r\n", items.len()).into_bytes();
    for item in items {
        out.extend(item);
    }
    out
}

const NIL: &[u8] = b"$-1\r\n";

/// Field values that have broken decoders elsewhere: numbers at and past every limit, signs,
/// non-numbers, empty strings, keys of this session, and CBOR whose header declares 2^62 items.
fn hostile_fields() -> Vec<Vec<u8>> {
    let base = format!("dc:{{{SESSION}}}:");
    let mut out: Vec<Vec<u8>> = [
        "0",
        "1",
        "-1",
        "-5",
        "2",
        "33554432",
        "1073741824",
        "1073741825",
        "999999999999",
        "9223372036854775807",
        "18446744073709551616",
        "1e3",
        "0x10",
        " 1",
        "",
        "x",
        "\u{0}",
        "d",
        "f",
        "l",
        "q",
        "0-1",
        "99999999999999-0",
    ]
    .iter()
    .map(|s| bulk(s.as_bytes()))
    .collect();
    for key in ["in:1", "job:1", "out:1", "upd", "results"] {
        out.push(bulk(format!("{base}{key}").as_bytes()));
    }
    out.push(bulk(b"elsewhere:in:1"));
    let huge = (1u64 << 62).to_be_bytes();
    for major in [0x40u8, 0x60, 0x80, 0xa0] {
        let mut cbor = vec![major | 27];
        cbor.extend_from_slice(&huge);
        out.push(bulk(&cbor));
    }
    out.push(bulk(&[0x9f; 4096]));
    out.push(int(i64::MAX));
    out.push(int(i64::MIN));
    out.push(int(-1));
    out.push(int(0));
    out.push(NIL.to_vec());
    out.push(b"+OK\r\n".to_vec());
    out.push(b"-ERR injected\r\n".to_vec());
    out.push(b"-DCGONE injected\r\n".to_vec());
    out.push(array(vec![int(1), bulk(b"x")]));
    out.push(b"*-1\r\n".to_vec());
    out
}

fn field() -> impl Strategy<Value = Vec<u8>> {
    let fixed = hostile_fields();
    prop_oneof![
        4 => proptest::sample::select(fixed),
        1 => any::<i64>().prop_map(int),
        1 => any::<u64>().prop_map(|u| bulk(u.to_string().as_bytes())),
        1 => proptest::collection::vec(any::<u8>(), 0..40).prop_map(|b| bulk(&b)),
    ]
}

/// Any RESP value, nested up to 4 deep.
fn value() -> impl Strategy<Value = Vec<u8>> {
    field().prop_recursive(4, 64, 10, |inner| {
        proptest::collection::vec(inner, 0..10).prop_map(array)
    })
}

/// Replies shaped like the scripts' replies, with generated fields.
fn shaped() -> impl Strategy<Value = Vec<u8>> {
    let fields = |n: std::ops::Range<usize>| proptest::collection::vec(field(), n);
    prop_oneof![
        // take: {1, log length, (job, attempt, entry, update seq, chunks, length, holder,
        // payload)...}
        (
            field(),
            proptest::collection::vec(fields(8..9), 0..4),
            fields(0..3)
        )
            .prop_map(|(log, jobs, extra)| {
                let mut items = vec![int(1), log];
                items.extend(jobs.into_iter().flatten());
                items.extend(extra);
                array(items)
            }),
        // take_results: {1, last id, {job, kind, failure, attempts, message, chunks, length,
        // output, history}...}
        (field(), proptest::collection::vec(fields(0..11), 0..4)).prop_map(|(last, notes)| {
            let mut items = vec![int(1), last];
            items.extend(notes.into_iter().map(array));
            array(items)
        }),
        // nodes: {now, {node, at, status}...}
        (field(), proptest::collection::vec(fields(0..4), 0..4)).prop_map(|(now, nodes)| {
            let mut items = vec![now];
            items.extend(nodes.into_iter().map(array));
            array(items)
        }),
        // stats, pending, updates, sessions: a few fields, some of them arrays of fields.
        proptest::collection::vec(prop_oneof![field(), fields(0..6).prop_map(array)], 0..8)
            .prop_map(array),
        // Not RESP at all (the connection is dropped; the next command makes a new one).
        proptest::collection::vec(any::<u8>(), 1..30).prop_map(|mut b| {
            b.extend_from_slice(b"\r\n");
            b
        }),
    ]
}

fn reply() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![3 => shaped(), 1 => value()]
}

// ---- the fake server -----------------------------------------------------------------------

/// Replies handed out in order to the commands that are not part of a connection's set-up;
/// `NIL` once they run out.
#[derive(Clone, Default)]
struct Script(Arc<Mutex<std::collections::VecDeque<Vec<u8>>>>);

impl Script {
    fn set(&self, replies: Vec<Vec<u8>>) {
        *self.0.lock().expect("script") = replies.into();
    }
    fn next(&self) -> Vec<u8> {
        self.0
            .lock()
            .expect("script")
            .pop_front()
            .unwrap_or_else(|| NIL.to_vec())
    }
}

/// Read one command (an array of bulk strings) from `buf`, if a whole one is there: its words
/// and how many bytes it took.
fn parse_command(buf: &[u8]) -> Option<(Vec<Vec<u8>>, usize)> {
    fn line(buf: &[u8], at: usize) -> Option<(&[u8], usize)> {
        let end = buf[at..].windows(2).position(|w| w == b"\r\n")? + at;
        Some((&buf[at..end], end + 2))
    }
    let (head, mut at) = line(buf, 0)?;
    let n: usize = std::str::from_utf8(head.strip_prefix(b"*")?)
        .ok()?
        .parse()
        .ok()?;
    let mut words = Vec::with_capacity(n.min(1024));
    for _ in 0..n {
        let (len, next) = line(buf, at)?;
        let len: usize = std::str::from_utf8(len.strip_prefix(b"$")?)
            .ok()?
            .parse()
            .ok()?;
        if buf.len() < next + len + 2 {
            return None;
        }
        words.push(buf[next..next + len].to_vec());
        at = next + len + 2;
    }
    Some((words, at))
}

async fn serve(mut sock: tokio::net::TcpStream, script: Script) {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 1 << 16];
    loop {
        while let Some((words, used)) = parse_command(&buf) {
            buf.drain(..used);
            let name = words
                .first()
                .map(|w| String::from_utf8_lossy(w).to_ascii_uppercase())
                .unwrap_or_default();
            let answer = match name.as_str() {
                "PING" => b"+PONG\r\n".to_vec(),
                "AUTH" | "SELECT" | "CLIENT" | "READONLY" => b"+OK\r\n".to_vec(),
                "HELLO" => b"-ERR unknown command 'HELLO'\r\n".to_vec(),
                _ => script.next(),
            };
            if sock.write_all(&answer).await.is_err() {
                return;
            }
        }
        match sock.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

async fn fake_server(script: Script) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            tokio::spawn(serve(sock, script.clone()));
        }
    });
    port
}

// ---- operations ----------------------------------------------------------------------------

const OPERATIONS: usize = 12;

/// Whether an operation's answer is a value (any value or error will do; the count shows how
/// many replies the decoders accepted).
fn ok<T, E>(answer: Result<T, E>) -> bool {
    answer.is_ok()
}

/// Run operation `op` against the broker; whether it answered with a value (not an error).
async fn operate(broker: &RedisBroker, op: usize) -> bool {
    let s = SessionId(SESSION.into());
    let node = NodeId("fuzz-node".into());
    let worker = WorkerId("fuzz-node/0".into());
    let lease = Lease {
        session: s.clone(),
        job: JobId(1),
        attempt: 1,
        node: node.clone(),
        worker: worker.clone(),
        token: "1-0".into(),
    };
    match op {
        0 => ok(broker
            .take_jobs(&s, &node, &worker, 4, Duration::ZERO)
            .await),
        1 => ok(broker.take_results(&s, 16, Duration::ZERO).await),
        2 => ok(broker.session_stats(&s).await),
        3 => ok(broker.nodes(Duration::from_secs(60)).await),
        4 => ok(broker.lost_jobs(&s, &[JobId(1), JobId(2)]).await),
        5 => ok(broker.read_updates(&s, 0, 16).await),
        6 => ok(broker.keep_session_alive(&s).await),
        7 => ok(broker.reap_expired().await),
        8 => ok(broker.active_session(Duration::ZERO).await),
        9 => ok(broker
            .complete(&lease, Ok(Bytes::from_static(b"out")))
            .await),
        10 => ok(broker
            .try_open_session(&dc_core::testing::spec(Duration::from_secs(5), 3))
            .await),
        _ => ok(broker
            .heartbeat(&NodeStatus {
                node: node.clone(),
                host: "h".into(),
                kinds: vec!["k".into()],
                workers: vec![],
                leases: vec![lease.clone()],
            })
            .await),
    }
}

struct Rig {
    rt: tokio::runtime::Runtime,
    broker: RedisBroker,
    script: Script,
}

impl Rig {
    fn new() -> Rig {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let script = Script::default();
        let broker = rt.block_on(async {
            let port = fake_server(script.clone()).await;
            RedisBroker::connect(
                &format!("redis://127.0.0.1:{port}"),
                RedisOptions {
                    response_timeout: RESPONSE_TIMEOUT,
                    ..RedisOptions::default()
                },
            )
            .await
            .expect("connect to the fake server")
        });
        Rig { rt, broker, script }
    }

    /// One case: operation `op` meets `replies`; an answer within the bound (whether it is a
    /// value), or a failure.
    fn run(&self, op: usize, replies: Vec<Vec<u8>>) -> Result<bool, String> {
        self.script.set(replies);
        self.rt
            .block_on(async { tokio::time::timeout(BOUND, operate(&self.broker, op)).await })
            .map_err(|_| format!("operation {op} gave no answer within {BOUND:?}"))
    }
}

#[test]
fn seed_replies_on_every_operation() {
    let rig = Rig::new();
    let fields = hostile_fields();
    let mut seeds: Vec<Vec<u8>> = Vec::new();
    for f in &fields {
        // Every hostile value in every position of a one-job take reply and of a one-result
        // results reply, the rest of each reply sound.
        let take_ok = |i: usize| -> Vec<u8> {
            let sound = [
                bulk(b"1"),
                bulk(b"1"),
                bulk(b"1-0"),
                bulk(b"0"),
                bulk(b"2"),
                bulk(b"8"),
                bulk(format!("dc:{{{SESSION}}}:in:1").as_bytes()),
                NIL.to_vec(),
            ];
            let mut items = vec![int(1), int(0)];
            items.extend(
                sound
                    .iter()
                    .enumerate()
                    .map(|(j, s)| if j == i { f.clone() } else { s.clone() }),
            );
            array(items)
        };
        for i in 0..8 {
            seeds.push(take_ok(i));
        }
        let result_ok = |i: usize| -> Vec<u8> {
            let sound = [
                bulk(b"1"),
                bulk(b"d"),
                bulk(b""),
                bulk(b"1"),
                bulk(b""),
                bulk(b"2"),
                bulk(b"8"),
                NIL.to_vec(),
                array(vec![]),
            ];
            array(vec![
                int(1),
                bulk(b"5-0"),
                array(
                    sound
                        .iter()
                        .enumerate()
                        .map(|(j, s)| if j == i { f.clone() } else { s.clone() })
                        .collect(),
                ),
            ])
        };
        for i in 0..9 {
            seeds.push(result_ok(i));
        }
        seeds.push(array(vec![
            int(1000),
            array(vec![bulk(b"n"), f.clone(), f.clone()]),
        ]));
        seeds.push(array(vec![f.clone(); 6]));
        seeds.push(f.clone());
    }
    // Replies cut short: a header that promises more than follows, as from a server that
    // stalls mid-answer. Each waits out the response timeout, once per operation.
    for cut in [
        b"*3\r\n".to_vec(),
        b"*2\r\n:1\r\n".to_vec(),
        b"$10\r\nabc".to_vec(),
        b"*1\r\n*2\r\n$1\r\n".to_vec(),
    ] {
        seeds.push(cut);
    }
    let mut ran = 0;
    let mut values = [0usize; OPERATIONS];
    for seed in &seeds {
        for (op, values) in values.iter_mut().enumerate() {
            // The corpus reply answers the operation's first command; its chunk reads get the field.
            let replies = vec![
                seed.clone(),
                fields[ran % fields.len()].clone(),
                seed.clone(),
            ];
            match rig.run(op, replies) {
                Ok(value) => *values += usize::from(value),
                Err(e) => panic!("seed {:?}: {e}", String::from_utf8_lossy(seed)),
            }
            ran += 1;
        }
    }
    eprintln!(
        "MEASURE fuzz: {ran} seed cases on {OPERATIONS} operations; answered with a value, by operation: {values:?}"
    );
}

#[test]
fn generated_replies_on_every_operation() {
    let rig = Rig::new();
    let mut runner = TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = (0..OPERATIONS, proptest::collection::vec(reply(), 1..6));
    runner
        .run(&strategy, |(op, replies)| {
            rig.run(op, replies).map(drop).map_err(TestCaseError::fail)
        })
        .expect("every operation answers whatever the server replies");
    eprintln!("MEASURE fuzz: {} generated cases", cases());
}
