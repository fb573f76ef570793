//! Every key the Redis protocol writes, and every field in its hashes, damaged in the middle of
//! a live run: a huge number, a non-number or an empty string in each field; another type in
//! place of each key, or the key deleted; a garbage entry in each stream. Each value is planted
//! at the moment it matters: while the jobs are queued, while the damaged job runs, or after it
//! finished and before the pool read its result (the test holds the node's takes or the pool's
//! result reads while it plants, so the moment is never left to chance).
//!
//! Each time: the node and the pool stay up, the pool's stream ends within a bound with every
//! job once (a result, or an error for the damaged job alone), and the pool goes on.
//!
//! Custom harness: this executable is also the worker program.

mod common;

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::cluster::{PASSWORD, RedisServerProc, free_port, redis_cli};
use common::hooked::{Hooked, Hooks};
use common::{Probe, ProbeInit, ProbeJob, TestResult, eventually};
use distributed_computing::agent::{AgentConfig, SlotSpec, WorkerCommand, spawn_agent};
use distributed_computing::broker::NodeId;
use distributed_computing::{Broker, Pool, PoolError, RedisBroker, RedisOptions};
use futures::StreamExt;

fn main() -> ExitCode {
    common::registry().serve_if_worker();
    let args = libtest_mimic::Arguments::from_args();
    let tests = trials![Duration::from_secs(1800);
        every_key_and_field_damaged_mid_run_costs_at_most_its_job,
    ];
    libtest_mimic::run(&args, tests).exit_code()
}

/// Jobs per case: the damaged one first, then short ones.
const JOBS: usize = 6;
/// The damaged job's payload and output: chunked (over the inline limit), so that its input
/// and output keys exist.
const BIG: usize = 300 << 10;
/// How long a case's stream may take to end (a lost notice is found after two checks of 10 s).
const BOUND: Duration = Duration::from_secs(90);

/// Pauses the node's takes and the pool's result reads while the test plants a value, and
/// counts the calls past the pause (a paused kind of call is quiet once its count is 0).
#[derive(Debug, Default)]
struct Switches {
    takes: AtomicBool,
    results: AtomicBool,
    taking: AtomicUsize,
    reading: AtomicUsize,
}

/// Which calls a hook holds and counts.
#[derive(Debug, Clone, Copy)]
enum Calls {
    Takes,
    Reads,
}

/// Holds the node's takes and the pool's result reads while their switch is on.
#[derive(Debug)]
struct Gates(Arc<Switches>);

impl Gates {
    /// Wait while the calls are paused, then count this one in flight until the guard drops.
    async fn pass(&self, calls: Calls) -> Box<dyn std::any::Any + Send> {
        let switches = &self.0;
        let (paused, inflight) = match calls {
            Calls::Takes => (&switches.takes, &switches.taking),
            Calls::Reads => (&switches.results, &switches.reading),
        };
        loop {
            while paused.load(Ordering::Acquire) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            inflight.fetch_add(1, Ordering::AcqRel);
            if !paused.load(Ordering::Acquire) {
                return Box::new(InFlight(self.0.clone(), calls));
            }
            // Paused meanwhile: wait again.
            inflight.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

#[async_trait::async_trait]
impl Hooks for Gates {
    async fn take(&self) -> Box<dyn std::any::Any + Send> {
        self.pass(Calls::Takes).await
    }
    async fn read_results(&self) -> Box<dyn std::any::Any + Send> {
        self.pass(Calls::Reads).await
    }
}

/// One call counted in flight; uncounted when dropped.
struct InFlight(Arc<Switches>, Calls);

impl Drop for InFlight {
    fn drop(&mut self) {
        match self.1 {
            Calls::Takes => self.0.taking.fetch_sub(1, Ordering::AcqRel),
            Calls::Reads => self.0.reading.fetch_sub(1, Ordering::AcqRel),
        };
    }
}

/// Pause one kind of call and wait until none of it is in flight.
async fn pause(paused: &AtomicBool, inflight: &AtomicUsize) -> Result<(), String> {
    paused.store(true, Ordering::Release);
    if eventually(Duration::from_secs(30), || async {
        inflight.load(Ordering::Acquire) == 0
    })
    .await
    {
        Ok(())
    } else {
        Err("calls still in flight 30 s after the pause".into())
    }
}

/// The keys the protocol writes: the session's (`dc:{<session>}:…`) and the global ones.
#[derive(Debug, Clone, Copy)]
enum Key {
    Meta,
    Spec,
    Job,
    In,
    Out,
    Hist,
    Jobs,
    Results,
    Updates,
    Problems,
    Active,
    Sessions,
    Opened,
    SessionSeq,
    Nodes,
    NodeStatus,
}

impl Key {
    fn name(self, base: &str, victim: u64, node: &str) -> String {
        match self {
            Key::Meta => format!("{base}meta"),
            Key::Spec => format!("{base}spec"),
            Key::Job => format!("{base}job:{victim}"),
            Key::In => format!("{base}in:{victim}"),
            Key::Out => format!("{base}out:{victim}"),
            Key::Hist => format!("{base}hist:{victim}"),
            Key::Jobs => format!("{base}jobs"),
            Key::Results => format!("{base}results"),
            Key::Updates => format!("{base}upd"),
            Key::Problems => format!("{base}problems"),
            Key::Active => "dc:active".into(),
            Key::Sessions => "dc:sessions".into(),
            Key::Opened => "dc:opened".into(),
            Key::SessionSeq => "dc:session-seq".into(),
            Key::Nodes => "dc:nodes".into(),
            Key::NodeStatus => format!("dc:node:{node}"),
        }
    }
}

/// When the value is planted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Every job of the case queued (the node's takes held).
    Queued,
    /// The damaged job leased and running.
    Running,
    /// The damaged job finished, its result not read yet (the pool's reads held).
    Finished,
}

#[derive(Debug, Clone, Copy)]
enum Damage {
    Huge(&'static str),
    NotANumber(&'static str),
    Empty(&'static str),
    OtherType,
    Deleted,
    GarbageEntry,
}

#[derive(Debug, Clone, Copy)]
struct Case {
    key: Key,
    damage: Damage,
    phase: Phase,
}

fn cases() -> Vec<Case> {
    use Damage::*;
    use Key::*;
    use Phase::*;
    let mut out = Vec::new();
    let fields: [(Key, Phase, &[&'static str]); 6] = [
        (
            Meta,
            Queued,
            &["lease", "max", "q", "r", "d", "f", "sn", "slen"],
        ),
        (Spec, Queued, &["c0"]),
        (
            Job,
            Queued,
            &["st", "att", "fails", "upd", "n", "len", "e", "m", "c0"],
        ),
        (
            Job,
            Running,
            &["st", "att", "e", "node", "worker", "n", "len", "m"],
        ),
        (In, Queued, &["c0"]),
        (Out, Finished, &["k", "fk", "a", "m", "n", "len", "c0"]),
    ];
    for (key, phase, names) in fields {
        for &f in names {
            for damage in [Huge(f), NotANumber(f), Empty(f)] {
                out.push(Case { key, damage, phase });
            }
        }
    }
    let keys = [
        (Meta, Queued),
        (Spec, Queued),
        (Job, Queued),
        (Job, Running),
        (In, Queued),
        (In, Running),
        (Out, Finished),
        (Hist, Running),
        (Jobs, Queued),
        (Results, Finished),
        (Updates, Queued),
        (Problems, Queued),
        (Active, Queued),
        (Sessions, Queued),
        (Opened, Queued),
        (SessionSeq, Queued),
        (Nodes, Queued),
        (NodeStatus, Queued),
    ];
    for (key, phase) in keys {
        for damage in [OtherType, Deleted] {
            out.push(Case { key, damage, phase });
        }
    }
    for (key, phase) in [(Jobs, Queued), (Results, Finished), (Updates, Queued)] {
        out.push(Case {
            key,
            damage: GarbageEntry,
            phase,
        });
    }
    out
}

fn name_of(case: &Case) -> String {
    format!("{:?} {:?} ({:?})", case.key, case.damage, case.phase)
}

/// Plant `damage` in `key` on the server at `port`.
async fn plant(port: u16, key: &str, damage: Damage) -> Result<(), Box<dyn std::error::Error>> {
    let hset = |field: &str, value: &str| {
        vec![
            "HSET".to_string(),
            key.to_string(),
            field.to_string(),
            value.to_string(),
        ]
    };
    let args = match damage {
        Damage::Huge(f) => hset(f, "999999999999"),
        Damage::NotANumber(f) => hset(f, "x"),
        Damage::Empty(f) => hset(f, ""),
        Damage::Deleted => vec!["DEL".into(), key.into()],
        Damage::OtherType => {
            let kind = redis_cli(port, &["TYPE", key]).await?;
            redis_cli(port, &["DEL", key]).await?;
            if kind.trim() == "string" {
                hset("x", "y")
            } else {
                vec!["SET".into(), key.into(), "garbage".into()]
            }
        }
        Damage::GarbageEntry => vec![
            "XADD".into(),
            key.into(),
            "*".into(),
            "j".into(),
            "\u{1}not-a-job".into(),
        ],
    };
    redis_cli(port, &args).await?;
    Ok(())
}

/// A field of a hash, or "" when it or the key is not there (or not a hash).
async fn hget(port: u16, key: &str, field: &str) -> String {
    redis_cli(port, &["HGET", key, field])
        .await
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

async fn every_key_and_field_damaged_mid_run_costs_at_most_its_job() -> TestResult {
    if let Ok(filter) = std::env::var("DC_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .try_init();
    }
    let port = free_port()?;
    let _server = RedisServerProc::start(port, PASSWORD).await?;
    let url = format!("redis://:{PASSWORD}@127.0.0.1:{port}");
    let switches = Arc::new(Switches::default());
    let gated = |inner: RedisBroker| {
        Arc::new(Hooked {
            inner: Arc::new(inner) as Arc<dyn Broker>,
            hooks: Gates(switches.clone()),
        })
    };
    let node_id = "hostile-node";
    let mut config = AgentConfig::new(
        NodeId(node_id.into()),
        WorkerCommand::current_exe()?,
        vec!["probe".into()],
        vec![SlotSpec::for_device(None); 2],
    );
    config.heartbeat = Duration::from_millis(200);
    config.poll = Duration::from_millis(200);
    let agent = spawn_agent(
        gated(RedisBroker::connect(&url, RedisOptions::default()).await?),
        config,
    );
    let pool = Pool::<Probe>::builder(ProbeInit::tagged("hostile"))
        .broker_instance(gated(
            RedisBroker::connect(&url, RedisOptions::default()).await?,
        ))
        .lease(Duration::from_secs(3))
        .connect()
        .await?;
    pool.update_workers(1).await?;
    check!(
        eventually(Duration::from_secs(60), || async {
            pool.workers_count().await.unwrap_or(0) == 2
        })
        .await,
        "the node's 2 workers never served the pool"
    );
    let big: Vec<u8> = (0..BIG).map(|i| (i % 251).to_le_bytes()[0]).collect();
    let mut submitted = 0u64;
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    // `DC_HOSTILE_CASES=<text>`: only the cases whose name contains it (to look into one).
    let only = std::env::var("DC_HOSTILE_CASES").unwrap_or_default();
    let all: Vec<Case> = cases()
        .into_iter()
        .filter(|c| name_of(c).contains(&only))
        .collect();
    let total = all.len();
    let started_all = Instant::now();
    for case in all {
        let name = name_of(&case);
        let victim = submitted + 1;
        submitted += JOBS as u64;
        // The session's keys, as they are now (a case may end with the pool reopening its
        // session: the next one's jobs go to the new one).
        let base = || format!("dc:{{{}}}:", pool.session_id());
        // The damaged job runs long enough to be caught running; the others are short.
        let victim_ms = if case.phase == Phase::Running {
            1500
        } else {
            50
        };
        let jobs = std::iter::once(ProbeJob::SleepReverse(
            victim_ms,
            serde_bytes::ByteBuf::from(big.clone()),
        ))
        .chain((1..JOBS).map(|i| ProbeJob::SleepEcho(50, i as i64)));
        match case.phase {
            Phase::Queued => pause(&switches.takes, &switches.taking).await?,
            Phase::Finished => pause(&switches.results, &switches.reading).await?,
            Phase::Running => {}
        }
        let started = Instant::now();
        let mut stream = pool.imap_unordered(jobs);
        // The first poll submits; the case's jobs are all in the broker once it returns or
        // while it waits.
        let mut items = Vec::new();
        let first = tokio::time::timeout(Duration::from_millis(300), stream.next()).await;
        if let Ok(Some(item)) = first {
            items.push(item);
        }
        let want = match case.phase {
            Phase::Queued => "q",
            Phase::Running => "l",
            Phase::Finished => "d",
        };
        let reached = eventually(Duration::from_secs(30), || async {
            hget(port, &format!("{}job:{victim}", base()), "st").await == want
        })
        .await;
        if !reached {
            switches.takes.store(false, Ordering::Release);
            switches.results.store(false, Ordering::Release);
            return Err(format!("{name}: job {victim} never reached state {want:?}").into());
        }
        plant(port, &case.key.name(&base(), victim, node_id), case.damage).await?;
        switches.takes.store(false, Ordering::Release);
        switches.results.store(false, Ordering::Release);
        let rest = tokio::time::timeout(BOUND, async {
            while let Some(item) = stream.next().await {
                items.push(item);
            }
        })
        .await;
        check!(
            rest.is_ok(),
            "{name}: the stream did not end within {BOUND:?} ({} of {JOBS} items)",
            items.len()
        );
        let mut seen = [0usize; JOBS];
        let mut failed = Vec::new();
        for item in &items {
            match item {
                Ok((i, out)) => {
                    let want = if *i == 0 { BIG as i64 } else { *i as i64 };
                    check!(
                        *i < JOBS && out.value == want,
                        "{name}: job {i} returned {}",
                        out.value
                    );
                    if *i == 0 {
                        let bytes = out.bytes.as_ref().map(|b| b.len());
                        check!(bytes == Some(BIG), "{name}: the damaged job's output");
                    }
                    seen[*i] += 1;
                }
                Err(PoolError::Job { index, message, .. }) => {
                    check!(*index < JOBS, "{name}: an error for index {index}");
                    seen[*index] += 1;
                    failed.push((*index, message.clone()));
                }
                Err(e) => return Err(format!("{name}: the stream failed: {e}").into()),
            }
        }
        check!(
            seen.iter().all(|n| *n == 1),
            "{name}: each job once expected, got counts {seen:?} (failed {failed:?})"
        );
        check!(
            failed.iter().all(|(i, _)| *i == 0),
            "{name}: only the damaged job may fail, got {failed:?}"
        );
        check!(!agent.is_finished(), "{name}: the node agent stopped");
        let outcome = match failed.first() {
            None => "every job done".to_string(),
            Some((_, message)) => format!("the damaged job failed: {message}"),
        };
        eprintln!(
            "MEASURE hostile key: {name}: {outcome}; stream ended after {:.1} s",
            started.elapsed().as_secs_f64()
        );
        *outcomes
            .entry(if failed.is_empty() {
                "every job done".into()
            } else {
                "the damaged job failed".into()
            })
            .or_default() += 1;
    }
    // The pool goes on.
    let last = pool.map((0..8).map(ProbeJob::Echo)).await?;
    check!(
        last.iter().map(|o| o.value).eq(0..8),
        "after the damage: {:?}",
        last.iter().map(|o| o.value).collect::<Vec<_>>()
    );
    eprintln!(
        "MEASURE hostile keys: {total} cases in {:.0} s: {outcomes:?}",
        started_all.elapsed().as_secs_f64()
    );
    pool.close().await?;
    agent.shutdown().await;
    Ok(())
}
