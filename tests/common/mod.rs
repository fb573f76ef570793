//! Shared fixtures of the integration tests: a probe worker whose jobs report what the worker
//! process saw, or misbehave on purpose (fail, abort, speak garbage), and a tiny test runner.
#![allow(dead_code, unreachable_pub, missing_docs)]

#[cfg(feature = "cli")]
pub mod cluster;
pub mod hooked;
#[cfg(feature = "cli")]
pub mod netns;

// Each test binary uses some of these.
#[allow(unused_imports)]
pub use dc_core::testing::support::TempDir;

use std::collections::HashSet;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use distributed_computing::{BoxError, Registry, Worker, WorkerContext};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProbeInit {
    pub tag: String,
    pub fail_init: bool,
}

impl ProbeInit {
    pub fn tagged(tag: &str) -> Self {
        ProbeInit {
            tag: tag.into(),
            fail_init: false,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ProbeJob {
    /// Return the value, and what the worker saw.
    Echo(i64),
    /// Sleep, then echo.
    SleepEcho(u64, i64),
    /// The worker returns an error with this message.
    Fail(String),
    /// Return these bytes reversed (big-payload round trips).
    Reverse(serde_bytes::ByteBuf),
    /// The worker's `run` panics with this message.
    Panic(String),
    /// The worker process aborts (SIGABRT), every time.
    Abort,
    /// The worker process aborts the first time (leaving a marker file), then echoes.
    AbortOnce(PathBuf, i64),
    /// The worker writes a garbage length prefix on its protocol channel, then waits.
    GarbageFrame,
    /// The worker writes a well-framed but undecodable message, then waits.
    BadCbor,
    /// Append a line `value pid worker_id unix_ms` to the file (one per run, written when the
    /// run starts), sleep this many milliseconds, then echo: counts how often a job ran, where
    /// and when.
    CountRuns(PathBuf, u64, i64),
    /// Record a run in the file (as `CountRuns`), then return the bytes reversed (as
    /// `Reverse`; the value is the length): counts how often a big job ran.
    ReverseCounted(PathBuf, i64, serde_bytes::ByteBuf),
    /// Record a run in the first file (as `CountRuns`), then wait until the second path exists
    /// (at most 120 s), then echo: holds a worker busy until the test releases it.
    Gate(PathBuf, PathBuf, i64),
    /// Sleep this many milliseconds, then return the bytes reversed (as `Reverse`): a big job
    /// that runs for a while.
    SleepReverse(u64, serde_bytes::ByteBuf),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeOut {
    pub value: i64,
    pub tag: String,
    pub pid: u32,
    pub worker_id: String,
    pub updates: Vec<i64>,
    pub cuda_visible_devices: Option<String>,
    pub cuda_device_order: Option<String>,
    pub devices: Vec<String>,
    pub bytes: Option<serde_bytes::ByteBuf>,
    /// When `run` began and ended, in µs since the Unix epoch (this machine's clock).
    pub started_us: u64,
    pub ended_us: u64,
}

pub struct Probe {
    init: ProbeInit,
    ctx: WorkerContext,
    updates: Vec<i64>,
}

impl Worker for Probe {
    const KIND: &'static str = "probe";
    type Init = ProbeInit;
    type Job = ProbeJob;
    type Output = ProbeOut;
    type Update = i64;

    fn new(init: ProbeInit, ctx: &WorkerContext) -> Result<Self, BoxError> {
        if init.fail_init {
            return Err(format!("cannot load the model for {}", init.tag).into());
        }
        Ok(Probe {
            init,
            ctx: ctx.clone(),
            updates: Vec::new(),
        })
    }

    fn run(&mut self, job: ProbeJob) -> Result<ProbeOut, BoxError> {
        let started_us = unix_us();
        let mut bytes = None;
        let value = match job {
            ProbeJob::Reverse(mut buf) => {
                buf.reverse();
                let n = buf.len() as i64;
                bytes = Some(buf);
                n
            }
            ProbeJob::ReverseCounted(file, v, mut buf) => {
                record_run(&file, v, self.ctx.worker_id())?;
                buf.reverse();
                let n = buf.len() as i64;
                bytes = Some(buf);
                n
            }
            ProbeJob::SleepReverse(ms, mut buf) => {
                std::thread::sleep(Duration::from_millis(ms));
                buf.reverse();
                let n = buf.len() as i64;
                bytes = Some(buf);
                n
            }
            ProbeJob::Echo(v) => v,
            ProbeJob::SleepEcho(ms, v) => {
                std::thread::sleep(Duration::from_millis(ms));
                v
            }
            ProbeJob::Fail(message) => return Err(message.into()),
            ProbeJob::Panic(message) => panic!("{message}"),
            ProbeJob::Abort => {
                eprintln!("probe: about to abort");
                std::process::abort()
            }
            ProbeJob::AbortOnce(marker, v) => {
                if std::fs::create_dir(&marker).is_ok() {
                    eprintln!("probe: aborting once");
                    std::process::abort()
                }
                v
            }
            ProbeJob::GarbageFrame => {
                write_on_channel(r"\377\377\377\377garbage");
                std::thread::sleep(Duration::from_secs(30));
                -1
            }
            ProbeJob::BadCbor => {
                write_on_channel(r"\000\000\000\003\377\000\023");
                std::thread::sleep(Duration::from_secs(30));
                -1
            }
            ProbeJob::CountRuns(file, ms, v) => {
                record_run(&file, v, self.ctx.worker_id())?;
                std::thread::sleep(Duration::from_millis(ms));
                v
            }
            ProbeJob::Gate(file, path, v) => {
                record_run(&file, v, self.ctx.worker_id())?;
                let deadline = std::time::Instant::now() + Duration::from_secs(120);
                while !path.exists() && std::time::Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
                v
            }
        };
        Ok(ProbeOut {
            value,
            tag: self.init.tag.clone(),
            pid: std::process::id(),
            worker_id: self.ctx.worker_id().to_string(),
            updates: self.updates.clone(),
            cuda_visible_devices: std::env::var("CUDA_VISIBLE_DEVICES").ok(),
            cuda_device_order: std::env::var("CUDA_DEVICE_ORDER").ok(),
            devices: self.ctx.devices().to_vec(),
            bytes,
            started_us,
            ended_us: unix_us(),
        })
    }

    fn handle_update(&mut self, update: i64) -> Result<(), BoxError> {
        self.updates.push(update);
        Ok(())
    }
}

/// Now, in µs since the Unix epoch.
pub fn unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Append one run record (`value pid worker_id unix_ms`) in a single write, so records of
/// concurrent workers never interleave.
fn record_run(file: &std::path::Path, value: i64, worker_id: &str) -> Result<(), BoxError> {
    use std::io::Write;
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis();
    let line = format!("{value} {} {worker_id} {ms}\n", std::process::id());
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)?
        .write_all(line.as_bytes())?;
    Ok(())
}

/// Write raw bytes (printf escapes) on this worker's protocol channel, through a shell that
/// inherits a duplicate of it: what a buggy or hostile worker could do.
fn write_on_channel(printf_escapes: &str) {
    let fd = nix::unistd::dup(3).expect("dup the protocol channel");
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("printf '{printf_escapes}' >&{fd}"))
        .status()
        .expect("run sh");
    assert!(status.success());
}

/// A worker type no registry of the tests has.
pub struct Unregistered;

impl Worker for Unregistered {
    const KIND: &'static str = "unregistered";
    type Init = ();
    type Job = ();
    type Output = ();
    type Update = ();
    fn new(_: (), _: &WorkerContext) -> Result<Self, BoxError> {
        Ok(Unregistered)
    }
    fn run(&mut self, _: ()) -> Result<(), BoxError> {
        Ok(())
    }
}

pub fn registry() -> Registry {
    Registry::new().register::<Probe>()
}

pub type TestResult = Result<(), libtest_mimic::Failed>;

/// Run an async test body on its own runtime, failing it after `limit`.
pub fn run_async<F, Fut>(limit: Duration, body: F) -> TestResult
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = TestResult>,
{
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    rt.block_on(async {
        match tokio::time::timeout(limit, body()).await {
            Ok(r) => r,
            Err(_) => Err(format!("test timed out after {limit:?}").into()),
        }
    })
}

/// Run a role of a test executable (a pool owner, a reporter…) and turn its result into the
/// process's exit code.
pub fn run_role<F, Fut>(role: &str, limit: Duration, body: F) -> std::process::ExitCode
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = TestResult>,
{
    match run_async(limit, body) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("role {role} failed: {e:?}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Poll `f` until it returns true or `limit` passes.
pub async fn eventually<F, Fut>(limit: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Whether a process is gone (a zombie counts as gone: it runs nothing and holds no memory).
pub fn process_is_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .map(|(_, rest)| {
                rest.trim_start().starts_with('Z') || rest.trim_start().starts_with('X')
            })
            .unwrap_or(false),
    }
}

pub fn distinct<T: std::hash::Hash + Eq + Clone>(items: impl IntoIterator<Item = T>) -> usize {
    items.into_iter().collect::<HashSet<T>>().len()
}

/// `assert!` for test bodies returning `TestResult`.
#[macro_export]
macro_rules! check {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(format!("{} (at {}:{})", format!($($msg)+), file!(), line!()).into());
        }
    };
}

/// One libtest trial per async test fn, each on its own runtime with a time limit.
#[macro_export]
macro_rules! trials {
    ($limit:expr; $($name:ident),* $(,)?) => {
        vec![$(libtest_mimic::Trial::test(stringify!($name), || common::run_async($limit, $name))),*]
    };
}

/// Run `n` tiny `Echo` jobs with `Abort` at the indices `poisons` on a pool opened with
/// `max_attempts(1)`: every healthy job comes back once with its value, and only the poison
/// jobs fail, each charged with its own death alone (a poison job that waited in the worker's
/// channel when another one killed the worker also shows that attempt, uncharged).
pub async fn only_poison_jobs_fail(
    pool: &distributed_computing::Pool<Probe>,
    n: usize,
    poisons: &[usize],
) -> TestResult {
    use distributed_computing::broker::AttemptEnd;
    use distributed_computing::{JobFailure, PoolError};
    use futures::StreamExt;
    let jobs = (0..n).map(|i| {
        if poisons.contains(&i) {
            ProbeJob::Abort
        } else {
            ProbeJob::Echo(i as i64)
        }
    });
    let mut stream = pool.imap_unordered(jobs);
    let mut seen = HashSet::new();
    let mut failed = Vec::new();
    while let Some(item) = stream.next().await {
        match item {
            Ok((i, out)) => {
                check!(out.value == i as i64, "job {i} returned {}", out.value);
                check!(seen.insert(i), "job {i} delivered twice");
            }
            Err(PoolError::Job {
                index,
                kind: JobFailure::Exhausted,
                history,
                ..
            }) => {
                let (charged, uncharged): (Vec<_>, Vec<_>) =
                    history.iter().partition(|r| r.end.counts_as_failure());
                check!(
                    matches!(&charged[..], [r] if matches!(&r.end, AttemptEnd::ProcessDied { how, .. } if how.contains("signal 6")))
                        && uncharged.iter().all(|r| r.end == AttemptEnd::NodeLeft),
                    "job {index} failed with {history:?}"
                );
                failed.push(index);
            }
            Err(other) => return Err(format!("unexpected error {other:?}").into()),
        }
    }
    failed.sort_unstable();
    check!(
        failed == poisons,
        "failed jobs {failed:?}: only the poison jobs {poisons:?} may be charged"
    );
    check!(
        seen.len() == n - poisons.len(),
        "{} healthy jobs delivered of {}",
        seen.len(),
        n - poisons.len()
    );
    Ok(())
}

/// Processes that keep every core busy (`while :; do :; done`) until dropped.
pub struct Burners(Vec<std::process::Child>);

impl Burners {
    pub fn start(n: usize) -> std::io::Result<Self> {
        (0..n)
            .map(|_| {
                std::process::Command::new("sh")
                    .args(["-c", "while :; do :; done"])
                    .stdin(std::process::Stdio::null())
                    .spawn()
            })
            .collect::<std::io::Result<_>>()
            .map(Burners)
    }
}

impl Drop for Burners {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
