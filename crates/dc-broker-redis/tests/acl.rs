//! The head's ACL on a real redis-server: the node user (`render_acl`) runs the whole protocol
//! (the broker conformance suite, every `RedisBroker` path and `dc-cli bench`'s raw baselines)
//! without a single denial, and nothing else: every entry of `DENIED_COMMANDS`, any key outside
//! the prefix, the `default` user. The admin user can do everything.

use dc_core::broker::{Inspect, JobQueue, NodeRegistry, SessionControl, UpdateLog};
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dc_broker_redis::acl::{DENIED_COMMANDS, NODE_COMMANDS, render_acl};
use dc_broker_redis::{RedisBroker, RedisOptions};
use dc_core::JobFailure;
use dc_core::broker::{
    Abandoned, AttemptEnd, Completion, JobId, JobOutcome, NewJob, NodeId, NodeProblem, NodeStatus,
    SessionSpec, SessionState, WorkerId, WorkerState, WorkerStatus,
};
use futures::{FutureExt, StreamExt};
use redis::aio::MultiplexedConnection;
use redis::{ErrorKind, ServerErrorKind, Value};

const NODE_USER: &str = "dc-node";
const ADMIN_USER: &str = "dc-admin";
/// Secrets with characters that would break a redis.conf line or a URL if written as they are.
const NODE_SECRET: &str = "n0de s3cret\n#>\"x\\%/@:";
const ADMIN_SECRET: &str = "adm1n s3cret\n~*&+@all";
const PREFIX: &str = "dc";

/// A redis-server with the rendered ACL, on a free loopback port, in a directory of its own.
/// It is started through `sh`, which kills it when its stdin closes: when the guard is
/// dropped, and also when this test process dies in any way.
struct AclServer {
    shell: Child,
    stdin: Option<ChildStdin>,
    port: u16,
    dir: PathBuf,
}

impl AclServer {
    fn start() -> AclServer {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "dc-acl-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the server's directory");
        let port = free_port();
        let acl = render_acl(NODE_USER, NODE_SECRET, ADMIN_USER, ADMIN_SECRET, PREFIX)
            .expect("render the ACL");
        // DEBUG and MODULE are switched on here (they are off by default, for every user) so
        // that the test shows the ACL alone refusing them to the node user.
        let conf = format!(
            "port {port}\nbind 127.0.0.1\ndir \"{dir}\"\nlogfile \"{dir}/redis.log\"\n\
             daemonize no\nsave \"\"\nappendonly no\nloglevel notice\n\
             enable-debug-command yes\nenable-module-command yes\n{acl}",
            dir = dir.display(),
        );
        let conf_path = dir.join("redis.conf");
        std::fs::write(&conf_path, conf).expect("write redis.conf");
        let script = "redis-server \"$1\" & pid=$!; read _; kill $pid; wait $pid";
        let mut shell = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("sh")
            .arg(&conf_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("start redis-server (apt-get install redis-server)");
        let stdin = shell.stdin.take();
        let server = AclServer {
            shell,
            stdin,
            port,
            dir,
        };
        server.wait_until_it_answers();
        server
    }

    fn wait_until_it_answers(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
                let mut buf = [0u8; 64];
                // NOAUTH is an answer too: the server is up.
                if s.write_all(b"PING\r\n").is_ok() && matches!(s.read(&mut buf), Ok(n) if n > 0) {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "redis-server on port {} did not answer within 10 s:\n{}",
            self.port,
            std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
        );
    }

    fn url(&self, user: &str, secret: &str) -> String {
        format!(
            "redis://{}:{}@127.0.0.1:{}",
            encode(user),
            encode(secret),
            self.port
        )
    }

    fn node_url(&self) -> String {
        self.url(NODE_USER, NODE_SECRET)
    }

    fn admin_url(&self) -> String {
        self.url(ADMIN_USER, ADMIN_SECRET)
    }
}

impl Drop for AclServer {
    fn drop(&mut self) {
        // Closing the shell's stdin makes it kill redis-server and wait for it.
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if !matches!(self.shell.try_wait(), Ok(None)) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.shell.kill();
        let _ = self.shell.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> u16 {
    dc_core::testing::support::free_port().expect("bind a free port")
}

/// Percent-encode a URL user or password.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

async fn connect(url: &str) -> redis::RedisResult<MultiplexedConnection> {
    redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await
}

async fn query(conn: &mut MultiplexedConnection, argv: &[&str]) -> redis::RedisResult<Value> {
    let mut cmd = redis::cmd(argv[0]);
    for a in &argv[1..] {
        cmd.arg(*a);
    }
    cmd.query_async(conn).await
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

async fn node_broker(url: &str, prefix: &str, chunk_size: usize) -> RedisBroker {
    let options = RedisOptions {
        prefix: prefix.into(),
        chunk_size,
        ..RedisOptions::default()
    };
    RedisBroker::connect(url, options)
        .await
        .expect("connect as the node user")
}

// ---- the node user runs the whole protocol ------------------------------------------------

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic".into())
}

/// The conformance suite as the node user, four cases at a time, each under a prefix of its
/// own below `dc:` (cases must not see each other's sessions).
async fn run_conformance(url: &str) {
    let cases = dc_core::testing::all_cases();
    let count = cases.len();
    let started = Instant::now();
    let failures: Vec<String> = futures::stream::iter(cases.into_iter().enumerate())
        .map(|(i, case)| async move {
            let broker = node_broker(url, &format!("{PREFIX}:c{i}"), 16 << 20).await;
            let outcome = AssertUnwindSafe((case.run)(Arc::new(broker)))
                .catch_unwind()
                .await;
            outcome
                .err()
                .map(|p| format!("{}: {}", case.name, panic_text(&*p)))
        })
        .buffer_unordered(4)
        .filter_map(|failed| async move { failed })
        .collect()
        .await;
    assert!(
        failures.is_empty(),
        "conformance cases failed as the node user: {failures:#?}"
    );
    eprintln!(
        "{count} conformance cases as the node user: {:?}",
        started.elapsed()
    );
}

fn status(node: &NodeId, leases: Vec<dc_core::broker::Lease>) -> NodeStatus {
    NodeStatus {
        node: node.clone(),
        host: "acl-test-host".into(),
        kinds: vec!["acl".into()],
        workers: vec![WorkerStatus {
            worker: WorkerId(format!("{}/0", node.0)),
            session: None,
            state: WorkerState::Idle,
            devices: vec!["cpu".into()],
        }],
        leases,
    }
}

fn spec(lease: Duration, init: usize) -> SessionSpec {
    SessionSpec {
        kind: "acl".into(),
        init: vec![7; init],
        max_attempts: 3,
        lease,
        owner: "acl test".into(),
        auto_batching: true,
    }
}

fn blob(n: usize, seed: u8) -> Bytes {
    Bytes::from(
        (0..n)
            .map(|i| i.to_le_bytes()[0].wrapping_mul(31).wrapping_add(seed))
            .collect::<Vec<u8>>(),
    )
}

/// Every `RedisBroker` path as the node user, under the real prefix `dc`, with 1 KiB chunks
/// so that specs, jobs, outputs and updates also travel staged by chunks.
async fn run_broker_paths(url: &str, admin: &mut MultiplexedConnection) {
    const CHUNK: usize = 1024;
    let pool = node_broker(url, PREFIX, CHUNK).await;
    let node = node_broker(url, PREFIX, CHUNK).await;
    let n = NodeId("acl-node".into());
    let w = WorkerId("acl-node/0".into());
    let secs = Duration::from_secs;
    let ms = Duration::from_millis;

    // A node comes up: presence connection (CLIENT SETNAME) and heartbeat; no session yet, so
    // it waits on the "opened" stream (XREAD BLOCK).
    node.heartbeat(&status(&n, vec![]))
        .await
        .expect("heartbeat");
    let seen = node.nodes(secs(60)).await.expect("nodes");
    assert!(seen.iter().any(|s| s.status.node == n), "{seen:?}");
    assert!(
        node.active_session(ms(150))
            .await
            .expect("active_session")
            .is_none()
    );

    // A pool opens a session whose spec is staged by chunks (HSET + PEXPIRE); another pool
    // cannot and removes its own staged spec (UNLINK).
    let spec = spec(secs(30), 5000);
    let s = pool
        .try_open_session(&spec)
        .await
        .expect("try_open_session")
        .expect("no other session");
    let other = node_broker(url, PREFIX, CHUNK).await;
    assert!(
        other
            .try_open_session(&spec)
            .await
            .expect("second try_open_session")
            .is_none()
    );
    let active = node
        .active_session(Duration::ZERO)
        .await
        .expect("active_session")
        .expect("a session is active");
    assert_eq!(active.spec, spec);
    assert_eq!(
        pool.keep_session_alive(&s.id).await.expect("keep alive"),
        SessionState::Active
    );

    // Updates, inline and staged; one at a given place, twice.
    assert_eq!(
        pool.publish_update(&s.id, blob(10, 1)).await.expect("u1"),
        1
    );
    assert_eq!(
        pool.publish_update(&s.id, blob(3000, 2)).await.expect("u2"),
        2
    );
    assert_eq!(
        pool.publish_update_at(&s.id, 3, blob(20, 3))
            .await
            .expect("u3"),
        3
    );
    assert_eq!(
        pool.publish_update_at(&s.id, 3, blob(20, 3))
            .await
            .expect("u3 again"),
        3
    );
    let updates = node.read_updates(&s.id, 0, 10).await.expect("read_updates");
    assert_eq!(updates.len(), 3);
    assert_eq!(updates[1].1, blob(3000, 2));

    // Jobs, inline and staged; a worker leases them all (the big one is fetched by chunks
    // while its lease is renewed).
    let jobs: Vec<NewJob> = [(1, 10), (2, 4000), (3, 10), (4, 10), (5, 10)]
        .into_iter()
        .map(|(id, len)| NewJob {
            id: JobId(id),
            payload: blob(len, id.to_le_bytes()[0]),
            update_seq: 3,
        })
        .collect();
    pool.submit(&s.id, jobs).await.expect("submit");
    let leased = node
        .take_jobs(&s.id, &n, &w, 8, Duration::ZERO)
        .await
        .expect("take_jobs");
    assert_eq!(leased.len(), 5);
    let job = |id: u64| {
        leased
            .iter()
            .find(|j| j.lease.job == JobId(id))
            .expect("leased")
    };
    assert_eq!(job(2).payload, blob(4000, 2));
    let lease = |id: u64| job(id).lease.clone();
    // The heartbeat renews them over the presence connection.
    let all: Vec<_> = leased.iter().map(|j| j.lease.clone()).collect();
    node.heartbeat(&status(&n, all)).await.expect("heartbeat");

    // Outcomes: a staged output, an inline one and a worker error; a job handed back.
    assert_eq!(
        node.complete(&lease(1), Ok(blob(3000, 9)))
            .await
            .expect("complete"),
        Completion::Accepted
    );
    assert_eq!(
        node.complete_many(vec![
            (lease(3), Ok(blob(5, 3))),
            (
                lease(4),
                Err((JobFailure::Worker, AttemptEnd::WorkerError("no".into())))
            ),
        ])
        .await
        .expect("complete_many"),
        vec![Completion::Accepted, Completion::Accepted]
    );
    assert_eq!(
        node.abandon(&lease(5), AttemptEnd::Returned)
            .await
            .expect("abandon"),
        Abandoned::Requeued
    );
    node.report_problem(
        &s.id,
        NodeProblem::InitFailed {
            node: n.clone(),
            worker: w.clone(),
            message: "acl test".into(),
        },
    )
    .await
    .expect("report_problem");
    let stats = pool.session_stats(&s.id).await.expect("session_stats");
    assert_eq!(stats.problems.len(), 1);

    // Results: the staged output is fetched by chunks, then deleted by the client.
    let mut results = Vec::new();
    let deadline = Instant::now() + secs(10);
    while results.len() < 3 && Instant::now() < deadline {
        results.extend(
            pool.take_results(&s.id, 10, ms(200))
                .await
                .expect("take_results"),
        );
    }
    assert_eq!(results.len(), 3, "{results:?}");
    let one = results
        .iter()
        .find(|r| r.job == JobId(1))
        .expect("job 1's result");
    assert!(matches!(&one.outcome, JobOutcome::Done(out) if *out == blob(3000, 9)));
    assert_eq!(
        pool.lost_jobs(&s.id, &[JobId(2), JobId(99)])
            .await
            .expect("lost_jobs"),
        vec![JobId(99)]
    );

    // Waiting takes: XREAD BLOCK and the script in one pipeline. The scripts are flushed
    // first (as after a server restart): the script is loaded again (SCRIPT LOAD).
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(admin)
        .await
        .expect("SCRIPT FLUSH as the admin");
    let again = node
        .take_jobs(&s.id, &n, &w, 8, ms(300))
        .await
        .expect("take_jobs with a wait");
    assert_eq!(again.len(), 1, "job 5 is queued again");
    assert!(
        node.take_jobs(&s.id, &n, &w, 8, ms(200))
            .await
            .expect("take_jobs that waits in vain")
            .is_empty()
    );
    assert!(
        pool.take_results(&s.id, 10, ms(200))
            .await
            .expect("take_results that waits in vain")
            .is_empty()
    );

    // The reaper: nothing expired, the lease holder is present (CLIENT LIST).
    assert_eq!(pool.reap_expired().await.expect("reap_expired"), 0);
    // The node leaves: its leases go back to the queue.
    node.leave(&n).await.expect("leave");
    // The pool closes its session: every key of it is deleted (SCAN + UNLINK).
    pool.close_session(&s.id).await.expect("close_session");

    // A session that expires without keep-alive is purged by the reaper, and by a node's
    // periodic purge (every 32nd heartbeat).
    let short = pool
        .try_open_session(&self::spec(ms(200), 3000))
        .await
        .expect("try_open_session")
        .expect("the last one closed");
    pool.submit(
        &short.id,
        vec![NewJob {
            id: JobId(1),
            payload: blob(2000, 1),
            update_seq: 0,
        }],
    )
    .await
    .expect("submit");
    tokio::time::sleep(ms(400)).await;
    pool.reap_expired().await.expect("reap_expired");
    for _ in 0..32 {
        node.heartbeat(&status(&n, vec![]))
            .await
            .expect("heartbeat");
    }
    let (_, left): (u64, Vec<String>) = redis::cmd("SCAN")
        .arg(0)
        .arg("MATCH")
        .arg(format!("{PREFIX}:{{*"))
        .arg("COUNT")
        .arg(10_000)
        .query_async(admin)
        .await
        .expect("SCAN as the admin");
    assert!(left.is_empty(), "session keys left: {left:?}");
}

/// `dc-cli bench`'s raw baselines, as the node user on keys under the prefix: PING, pipelined
/// XADD, SET/GET, the bare stream cycle (XGROUP CREATE, XREADGROUP BLOCK, XADD + XACK, XREAD
/// BLOCK), DEL, and the clean-up by SCAN + UNLINK.
async fn run_bench_baselines(url: &str) {
    let mut conn = connect(url).await.expect("connect as the node user");
    let key = |name: &str| format!("{PREFIX}:bench-baseline:{name}");
    let _: String = redis::cmd("PING")
        .query_async(&mut conn)
        .await
        .expect("PING");
    let mut pipe = redis::pipe();
    for i in 0..10 {
        pipe.cmd("XADD")
            .arg(key("xadd"))
            .arg("*")
            .arg("j")
            .arg(i)
            .ignore();
    }
    let _: () = pipe.query_async(&mut conn).await.expect("pipelined XADD");
    let _: () = redis::cmd("SET")
        .arg(key("blob"))
        .arg(vec![0x5Au8; 4096])
        .query_async(&mut conn)
        .await
        .expect("SET");
    let back: Vec<u8> = redis::cmd("GET")
        .arg(key("blob"))
        .query_async(&mut conn)
        .await
        .expect("GET");
    assert_eq!(back.len(), 4096);
    let (jobs, results) = (key("cycle-jobs"), key("cycle-results"));
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&jobs)
        .arg("g")
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut conn)
        .await
        .expect("XGROUP CREATE");
    let _: String = redis::cmd("XADD")
        .arg(&jobs)
        .arg("*")
        .arg("j")
        .arg(1)
        .query_async(&mut conn)
        .await
        .expect("XADD");
    let reply: redis::streams::StreamReadReply = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("g")
        .arg("c0")
        .arg("COUNT")
        .arg(1)
        .arg("BLOCK")
        .arg(100)
        .arg("STREAMS")
        .arg(&jobs)
        .arg(">")
        .query_async(&mut conn)
        .await
        .expect("XREADGROUP");
    let id = reply.keys[0].ids[0].id.clone();
    let _: () = redis::pipe()
        .cmd("XADD")
        .arg(&results)
        .arg("*")
        .arg("r")
        .arg(&id)
        .ignore()
        .cmd("XACK")
        .arg(&jobs)
        .arg("g")
        .arg(&id)
        .ignore()
        .query_async(&mut conn)
        .await
        .expect("XADD + XACK");
    let read: redis::streams::StreamReadReply = redis::cmd("XREAD")
        .arg("COUNT")
        .arg(1000)
        .arg("BLOCK")
        .arg(100)
        .arg("STREAMS")
        .arg(&results)
        .arg("0")
        .query_async(&mut conn)
        .await
        .expect("XREAD");
    assert_eq!(read.keys.len(), 1);
    let _: () = redis::cmd("DEL")
        .arg(key("xadd"))
        .arg(key("blob"))
        .query_async(&mut conn)
        .await
        .expect("DEL");
    let (_, keys): (u64, Vec<String>) = redis::cmd("SCAN")
        .arg(0)
        .arg("MATCH")
        .arg(format!("{PREFIX}:bench-baseline:*"))
        .arg("COUNT")
        .arg(1000)
        .query_async(&mut conn)
        .await
        .expect("SCAN");
    assert!(!keys.is_empty());
    let _: () = redis::cmd("UNLINK")
        .arg(&keys)
        .query_async(&mut conn)
        .await
        .expect("UNLINK");
}

fn text(v: &Value) -> String {
    match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        other => format!("{other:?}"),
    }
}

/// The entries of `ACL LOG` as (reason, username, object), read as the admin.
async fn acl_log(admin: &mut MultiplexedConnection) -> Vec<(String, String, String)> {
    let entries: Vec<Value> = redis::cmd("ACL")
        .arg("LOG")
        .arg(1000)
        .query_async(admin)
        .await
        .expect("ACL LOG as the admin");
    entries
        .into_iter()
        .map(|entry| {
            let fields: Vec<(String, String)> = match entry {
                Value::Map(pairs) => pairs.iter().map(|(k, v)| (text(k), text(v))).collect(),
                Value::Array(items) => items
                    .chunks(2)
                    .filter(|kv| kv.len() == 2)
                    .map(|kv| (text(&kv[0]), text(&kv[1])))
                    .collect(),
                other => panic!("an ACL LOG entry that is not a map: {other:?}"),
            };
            let get = |name: &str| {
                fields
                    .iter()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default()
            };
            (get("reason"), get("username"), get("object"))
        })
        .collect()
}

#[test]
fn the_node_user_runs_the_whole_protocol_without_a_denial() {
    let started = Instant::now();
    let server = AclServer::start();
    runtime().block_on(async {
        let url = server.node_url();
        run_conformance(&url).await;
        let mut admin = connect(&server.admin_url())
            .await
            .expect("connect as the admin user");
        run_broker_paths(&url, &mut admin).await;
        run_bench_baselines(&url).await;
        // Denials the broker swallows (a best-effort UNLINK, an XADD that puts a notice back)
        // are in the server's ACL log. `CLIENT SETINFO` (Redis 7.2+), sent by the redis crate
        // on connecting and whose answer it ignores, is the one expected there.
        let denied: Vec<_> = acl_log(&mut admin)
            .await
            .into_iter()
            .filter(|(_, _, object)| object != "client|setinfo")
            .collect();
        assert!(
            denied.is_empty(),
            "the protocol ran into denials: {denied:?}"
        );
    });
    drop(server);
    eprintln!("protocol as the node user: {:?}", started.elapsed());
}

// ---- and nothing else -------------------------------------------------------------------------

/// A command line for each entry of `DENIED_COMMANDS` (arguments the server accepts, so that
/// only the ACL can refuse it).
fn example(entry: &str) -> &'static [&'static str] {
    match entry {
        "config" => &["CONFIG", "SET", "requirepass", "x"],
        "acl" => &["ACL", "SETUSER", "evil", "on", ">x", "+@all"],
        "monitor" => &["MONITOR"],
        "flushall" => &["FLUSHALL"],
        "flushdb" => &["FLUSHDB"],
        "shutdown" => &["SHUTDOWN", "NOSAVE"],
        "replicaof" => &["REPLICAOF", "127.0.0.1", "1"],
        "slaveof" => &["SLAVEOF", "127.0.0.1", "1"],
        "debug" => &["DEBUG", "SLEEP", "0"],
        "module" => &["MODULE", "LIST"],
        "keys" => &["KEYS", "*"],
        "script|flush" => &["SCRIPT", "FLUSH"],
        "script|kill" => &["SCRIPT", "KILL"],
        "client|kill" => &["CLIENT", "KILL", "ID", "999999"],
        "client|pause" => &["CLIENT", "PAUSE", "1"],
        "client|no-evict" => &["CLIENT", "NO-EVICT", "on"],
        "sync" => &["SYNC"],
        "psync" => &["PSYNC", "?", "-1"],
        "save" => &["SAVE"],
        "bgsave" => &["BGSAVE"],
        "bgrewriteaof" => &["BGREWRITEAOF"],
        "failover" => &["FAILOVER", "ABORT"],
        "cluster" => &["CLUSTER", "INFO"],
        "migrate" => &["MIGRATE", "127.0.0.1", "1", "dc:x", "0", "100"],
        "restore" => &["RESTORE", "dc:x", "0", "x"],
        "swapdb" => &["SWAPDB", "0", "1"],
        "function" => &["FUNCTION", "FLUSH"],
        "slowlog" => &["SLOWLOG", "GET"],
        "latency" => &["LATENCY", "RESET"],
        other => panic!("DENIED_COMMANDS has {other:?}: add a command line for it here"),
    }
}

/// Command lines the node user must be refused: one per `DENIED_COMMANDS` entry, more of the
/// dangerous ones, and commands the protocol does not use.
fn refused() -> Vec<&'static [&'static str]> {
    let mut lines: Vec<&'static [&'static str]> =
        DENIED_COMMANDS.iter().map(|d| example(d)).collect();
    lines.extend([
        &["CONFIG", "GET", "maxmemory"][..],
        &["ACL", "LIST"],
        &["ACL", "WHOAMI"],
        &["EVAL", "return 1", "0"],
        &["PUBLISH", "dc:x", "hi"],
        &["SELECT", "1"],
        &["INFO"],
    ]);
    lines
}

/// Keys outside the prefix.
const FOREIGN_KEYS: &[&[&str]] = &[
    &["SET", "other:x", "1"],
    &["GET", "other:x"],
    &["SET", "dc", "1"],
    &["GET", "dcx:1"],
    &["XADD", "other:s", "*", "a", "1"],
    &["HSET", "dc-other:h", "a", "1"],
];

/// Run redis-cli (the password, if any, through `REDISCLI_AUTH`), within 10 s: its stdout and
/// stderr together.
fn redis_cli(port: u16, login: Option<(&str, &str)>, argv: &[&str]) -> String {
    let mut cmd = Command::new("redis-cli");
    cmd.args([
        "--no-auth-warning",
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
    ])
    .env_remove("REDISCLI_AUTH")
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    match login {
        Some(("default", secret)) => {
            cmd.env("REDISCLI_AUTH", secret);
        }
        Some((user, secret)) => {
            cmd.args(["--user", user]).env("REDISCLI_AUTH", secret);
        }
        None => {}
    }
    cmd.args(argv);
    let child = cmd.spawn().expect("run redis-cli");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(Ok(out)) => format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        Ok(Err(e)) => panic!("redis-cli {argv:?}: {e}"),
        Err(_) => {
            let _ = Command::new("kill").arg(pid.to_string()).status();
            panic!("redis-cli {argv:?} did not finish within 10 s");
        }
    }
}

fn is_noperm(e: &redis::RedisError) -> bool {
    e.kind() == ErrorKind::Server(ServerErrorKind::NoPerm)
}

#[test]
fn the_node_user_is_refused_everything_else() {
    let started = Instant::now();
    let server = AclServer::start();
    let port = server.port;
    runtime().block_on(async {
        let mut node = connect(&server.node_url())
            .await
            .expect("connect as the node user");
        let mut admin = connect(&server.admin_url())
            .await
            .expect("connect as the admin user");

        // Commands: NOPERM, through the redis crate.
        for argv in refused() {
            match query(&mut node, argv).await {
                Err(e) if is_noperm(&e) => {}
                other => panic!("{argv:?} as the node user: {other:?}, not NOPERM"),
            }
        }
        // Keys outside the prefix: NOPERM; inside it, the same commands run.
        for argv in FOREIGN_KEYS {
            match query(&mut node, argv).await {
                Err(e) if is_noperm(&e) => {}
                other => panic!("{argv:?} as the node user: {other:?}, not NOPERM"),
            }
        }
        query(&mut node, &["SET", "dc:acl-probe", "1"])
            .await
            .expect("SET under the prefix");
        query(&mut node, &["GET", "dc:acl-probe"])
            .await
            .expect("GET under the prefix");
        // Nor through a script: a declared key, or one the script makes up.
        let declared = redis::Script::new("return redis.call('GET', KEYS[1])");
        let e = declared
            .key("other:x")
            .invoke_async::<Value>(&mut node)
            .await
            .expect_err("a script on a foreign key");
        assert!(is_noperm(&e) || e.to_string().contains("access"), "{e}");
        let made_up = redis::Script::new("return redis.call('GET', 'other:x')");
        let e = made_up
            .prepare_invoke()
            .invoke_async::<Value>(&mut node)
            .await
            .expect_err("a script on a foreign key");
        assert!(e.to_string().contains("access"), "{e}");
        // Nor a denied command from a script.
        let escalate = redis::Script::new("return redis.call('FLUSHALL')");
        let e = escalate
            .prepare_invoke()
            .invoke_async::<Value>(&mut node)
            .await
            .expect_err("FLUSHALL from a script");
        assert!(e.to_string().contains("can't run this command"), "{e}");

        // The default user: without AUTH nothing runs; AUTH with any password fails.
        let mut anonymous = connect(&format!("redis://127.0.0.1:{port}"))
            .await
            .expect("connect without AUTH");
        for argv in [&["PING"][..], &["GET", "dc:acl-probe"]] {
            let e = query(&mut anonymous, argv)
                .await
                .expect_err("a command without AUTH");
            assert_eq!(e.code(), Some("NOAUTH"), "{e}");
        }
        for secret in ["anything", NODE_SECRET, ADMIN_SECRET, ""] {
            for user in ["", "default"] {
                let url = format!(
                    "redis://{}:{}@127.0.0.1:{port}",
                    encode(user),
                    encode(secret)
                );
                match connect(&url).await {
                    Err(e) => assert!(
                        e.kind() == ErrorKind::AuthenticationFailed
                            || e.to_string().contains("WRONGPASS"),
                        "{e}"
                    ),
                    Ok(mut conn) => {
                        // An empty password sends no AUTH: then nothing runs.
                        let e = query(&mut conn, &["PING"])
                            .await
                            .expect_err("PING as the default user");
                        assert_eq!(e.code(), Some("NOAUTH"), "{e}");
                    }
                }
            }
        }
        let e = query(&mut anonymous, &["AUTH", "anything"])
            .await
            .expect_err("AUTH as the default user");
        assert!(e.to_string().contains("WRONGPASS"), "{e}");
        let e = query(&mut anonymous, &["AUTH", NODE_USER, "wrong"])
            .await
            .expect_err("AUTH with a wrong password");
        assert!(e.to_string().contains("WRONGPASS"), "{e}");
        let e = query(&mut anonymous, &["AUTH", NODE_USER, ADMIN_SECRET])
            .await
            .expect_err("AUTH with the other user's password");
        assert!(e.to_string().contains("WRONGPASS"), "{e}");

        // The admin can do everything, and the server holds no clear secret.
        let maxmemory = query(&mut admin, &["CONFIG", "GET", "maxmemory"])
            .await
            .expect("CONFIG GET as the admin");
        assert!(format!("{maxmemory:?}").contains("maxmemory"));
        let users: Vec<String> = redis::cmd("ACL")
            .arg("LIST")
            .query_async(&mut admin)
            .await
            .expect("ACL LIST as the admin");
        assert_eq!(users.len(), 3, "{users:?}");
        let node_rule = users
            .iter()
            .find(|u| u.starts_with("user dc-node "))
            .expect("the node user");
        assert!(
            node_rule.contains(" on ") && node_rule.contains(" ~dc:* "),
            "{node_rule}"
        );
        assert!(
            users
                .iter()
                .any(|u| u.starts_with("user default off") && u.contains("-@all")),
            "{users:?}"
        );
        for u in &users {
            assert!(!u.contains("s3cret"), "a clear secret in {u}");
        }
        let granted: BTreeSet<&str> = node_rule
            .split(' ')
            .filter_map(|w| w.strip_prefix('+'))
            .collect();
        let wanted: BTreeSet<&str> = NODE_COMMANDS.iter().copied().collect();
        assert_eq!(granted, wanted, "the server's view of the node user");
    });

    // The same through redis-cli.
    for argv in refused().into_iter().chain(FOREIGN_KEYS.iter().copied()) {
        let out = redis_cli(port, Some((NODE_USER, NODE_SECRET)), argv);
        assert!(
            out.contains("NOPERM"),
            "redis-cli {argv:?} as the node user: {out}"
        );
    }
    let out = redis_cli(port, Some((NODE_USER, NODE_SECRET)), &["PING"]);
    assert!(out.contains("PONG"), "{out}");
    for login in [
        None,
        Some(("default", "anything")),
        Some(("default", NODE_SECRET)),
    ] {
        let out = redis_cli(port, login, &["PING"]);
        assert!(!out.contains("PONG"), "PING as {login:?}: {out}");
        assert!(out.contains("NOAUTH") || out.contains("WRONGPASS"), "{out}");
    }
    let out = redis_cli(port, Some((NODE_USER, "wrong")), &["PING"]);
    assert!(out.contains("WRONGPASS"), "{out}");
    let out = redis_cli(
        port,
        Some((ADMIN_USER, ADMIN_SECRET)),
        &["CONFIG", "GET", "maxmemory"],
    );
    assert!(out.contains("maxmemory"), "{out}");
    let out = redis_cli(port, Some((ADMIN_USER, ADMIN_SECRET)), &["ACL", "LIST"]);
    assert!(out.contains("user dc-node on #"), "{out}");

    // The server survived all of it: nothing was shut down, flushed or reconfigured.
    let out = redis_cli(
        port,
        Some((NODE_USER, NODE_SECRET)),
        &["GET", "dc:acl-probe"],
    );
    assert_eq!(out.trim(), "1", "{out}");
    drop(server);
    eprintln!("denials: {:?}", started.elapsed());
}
