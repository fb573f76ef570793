//! `dc-cli bench`: the pool's speed measured against the broker's own limit.
//!
//! Every run first measures its baselines with the `redis` crate against the same server
//! (PING round trip, pipelined XADD, a bare one-job-per-take stream cycle, SET+GET of 64 MiB),
//! then runs the workloads W1–W6 on the built-in no-op worker kind [`BenchWorker`] and prints
//! each figure with its ratio to the matching baseline and the target it is held to.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dc_broker_redis::server::NODE_USER;
use dc_broker_redis::server::{RedisProcess, RedisServerOptions, start_redis_server};
use dc_broker_redis::{RedisBroker, RedisOptions, TlsTrust, connect_raw, redis_url_as};
use dc_core::agent::{AgentConfig, AgentHandle, SlotSpec, WorkerCommand, spawn_agent};
use dc_core::broker::NodeId;
use dc_core::{BoxError, Broker, LocalBroker, Worker, WorkerContext};
use redis::aio::MultiplexedConnection;
use redis::streams::StreamReadReply;
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use serde_json::{Map, Value, json};

use crate::Pool;

/// The worker kind of the benchmark (reserved: a user's kind may not take this name).
pub(crate) const BENCH_KIND: &str = "__dc-bench";

/// One benchmark job.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum BenchJob {
    /// Return this number.
    Echo(u64),
    /// Return bytes of the same size (the argument itself).
    Bytes(ByteBuf),
    /// Write this worker's parent pid (its node) to `marker` when given, then sleep `ms`.
    Sleep {
        /// How long to sleep.
        ms: u64,
        /// A file to write the node's pid into before sleeping.
        marker: Option<String>,
    },
    /// Report this worker's id and how many updates it applied.
    Applied,
}

/// One benchmark result. `Echo` and `Bytes` have the same CBOR shape as the job's variants,
/// so simulated slots (which echo the job payload) decode as the same output.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum BenchOutput {
    /// The echoed number.
    Echo(u64),
    /// Bytes of the argument's size.
    Bytes(ByteBuf),
    /// When the sleep started (Unix time, ms).
    Slept {
        /// Unix time in ms when the job started on the worker that completed it.
        started_unix_ms: u64,
    },
    /// A worker's id and its count of applied updates.
    Applied {
        /// The worker id (`node/slot`).
        worker: String,
        /// Updates applied since the worker process started (replays included).
        updates: u64,
    },
}

/// The built-in no-op worker kind every `main_with` node serves, for `dc-cli bench`.
#[derive(Debug)]
pub(crate) struct BenchWorker {
    worker: String,
    updates: u64,
}

impl Worker for BenchWorker {
    const KIND: &'static str = BENCH_KIND;
    type Init = ();
    type Job = BenchJob;
    type Output = BenchOutput;
    type Update = u64;

    fn new(_init: (), ctx: &WorkerContext) -> Result<Self, BoxError> {
        Ok(BenchWorker {
            worker: ctx.worker_id().to_string(),
            updates: 0,
        })
    }

    fn run(&mut self, job: BenchJob) -> Result<BenchOutput, BoxError> {
        Ok(match job {
            BenchJob::Echo(n) => BenchOutput::Echo(n),
            BenchJob::Bytes(bytes) => BenchOutput::Bytes(bytes),
            BenchJob::Sleep { ms, marker } => {
                let started_unix_ms = unix_ms();
                if let Some(path) = marker {
                    let tmp = format!("{path}.tmp");
                    std::fs::write(&tmp, std::os::unix::process::parent_id().to_string())?;
                    std::fs::rename(&tmp, &path)?;
                }
                std::thread::sleep(Duration::from_millis(ms));
                BenchOutput::Slept { started_unix_ms }
            }
            BenchJob::Applied => BenchOutput::Applied {
                worker: self.worker.clone(),
                updates: self.updates,
            },
        })
    }

    fn handle_update(&mut self, _update: u64) -> Result<(), BoxError> {
        self.updates += 1;
        Ok(())
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// How big each workload is.
#[derive(Debug, Clone, Copy)]
struct Sizes {
    w1_jobs: u64,
    w2_trips: usize,
    w3_jobs: usize,
    w4_tries: usize,
    w6_jobs: u64,
    cycle_jobs: usize,
}

impl Sizes {
    fn new(quick: bool) -> Self {
        if quick {
            Sizes {
                w1_jobs: 5_000,
                w2_trips: 200,
                w3_jobs: 4,
                w4_tries: 5,
                w6_jobs: 5_000,
                cycle_jobs: 5_000,
            }
        } else {
            Sizes {
                w1_jobs: 20_000,
                w2_trips: 1_000,
                w3_jobs: 16,
                w4_tries: 20,
                w6_jobs: 20_000,
                cycle_jobs: 20_000,
            }
        }
    }
}

const MIB64: usize = 64 << 20;
const WORKERS: usize = 2;

/// The broker's own limits, measured a moment before the workloads.
#[derive(Debug, Clone, Copy, Default)]
struct Baselines {
    ping_rtt_us: f64,
    xadd_pipelined_per_s: f64,
    cycle_k1_per_s: f64,
    setget_64mib_mb_per_s: f64,
}

/// One figure of the report.
#[derive(Debug)]
struct Row {
    workload: &'static str,
    metric: String,
    value: Option<f64>,
    ratio: Option<f64>,
    target: Option<String>,
    met: Option<bool>,
    note: Option<String>,
    /// Measured on the TLS server (`--tls`).
    tls: bool,
}

impl Row {
    fn new(workload: &'static str, metric: impl Into<String>, value: f64) -> Self {
        Row {
            workload,
            metric: metric.into(),
            value: Some(value),
            ratio: None,
            target: None,
            met: None,
            note: None,
            tls: false,
        }
    }

    /// A figure that was not measured, and why.
    fn skipped(workload: &'static str, metric: &str, why: impl Into<String>) -> Self {
        Row {
            value: None,
            ..Row::new(workload, metric, 0.0)
        }
        .note(why)
    }

    fn ratio(mut self, ratio: f64) -> Self {
        self.ratio = Some(ratio);
        self
    }

    fn target(mut self, target: &str, met: bool) -> Self {
        self.target = Some(target.into());
        self.met = Some(met);
        self
    }

    fn note(mut self, note: impl Into<String>) -> Self {
        self.note = Some(note.into());
        self
    }
}

/// Prints rows as they come (JSON lines) or as a table at the end.
#[derive(Debug)]
struct Report {
    mode: String,
    json: bool,
    baselines: Option<Baselines>,
    /// The TLS server's baselines (`--tls`).
    tls_baselines: Option<Baselines>,
    rows: Vec<Row>,
}

impl Report {
    fn push(&mut self, row: Row) {
        if self.json {
            println!("{}", self.json_line(&row));
        }
        self.rows.push(row);
    }

    fn json_line(&self, row: &Row) -> Value {
        let mut obj = Map::new();
        obj.insert("workload".into(), json!(row.workload));
        obj.insert("mode".into(), json!(self.mode));
        obj.insert("metric".into(), json!(row.metric));
        obj.insert("value".into(), json!(row.value.map(round3)));
        if row.tls {
            obj.insert("tls".into(), json!(true));
        }
        let baselines = if row.tls {
            &self.tls_baselines
        } else {
            &self.baselines
        };
        if let Some(b) = baselines {
            obj.insert("ping_rtt_us".into(), json!(round3(b.ping_rtt_us)));
            obj.insert(
                "xadd_pipelined_per_s".into(),
                json!(round3(b.xadd_pipelined_per_s)),
            );
            obj.insert("cycle_k1_per_s".into(), json!(round3(b.cycle_k1_per_s)));
            obj.insert(
                "setget_64mib_mb_per_s".into(),
                json!(round3(b.setget_64mib_mb_per_s)),
            );
        }
        if let Some(r) = row.ratio {
            obj.insert("ratio".into(), json!(round3(r)));
        }
        if let Some(t) = &row.target {
            obj.insert("target".into(), json!(t));
        }
        if let Some(m) = row.met {
            obj.insert("met".into(), json!(m));
        }
        if let Some(n) = &row.note {
            obj.insert("note".into(), json!(n));
        }
        Value::Object(obj)
    }

    fn print_table(&self) {
        println!("dc-cli bench, mode {}:", self.mode);
        println!(
            "{:<9} {:<34} {:>14} {:>9}  {:<30} {:<4}",
            "workload", "metric", "value", "ratio", "target", "met"
        );
        for row in &self.rows {
            let value = row.value.map(fmt_num).unwrap_or_else(|| "-".into());
            let ratio = row
                .ratio
                .map(|r| format!("{r:.2}"))
                .unwrap_or_else(|| "".into());
            let met = match row.met {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "",
            };
            println!(
                "{:<9} {:<34} {:>14} {:>9}  {:<30} {:<4}",
                row.workload,
                row.metric,
                value,
                ratio,
                row.target.as_deref().unwrap_or(""),
                met
            );
            if let Some(note) = &row.note {
                println!("{:<9} ({note})", "");
            }
        }
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn fmt_num(x: f64) -> String {
    if x.abs() >= 1000.0 {
        format!("{x:.0}")
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.3}")
    }
}

/// A directory removed when dropped.
#[derive(Debug)]
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> std::io::Result<Self> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        let dir =
            std::env::temp_dir().join(format!("dc-bench-{what}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(TempDir(dir))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Run `dc-cli bench`.
pub(crate) async fn run(
    broker: &str,
    quick: bool,
    json: bool,
    tls: bool,
) -> Result<ExitCode, String> {
    let sizes = Sizes::new(quick);
    let mode = match broker {
        "local" | "redis" => broker.to_string(),
        url if url.starts_with("redis://") || url.starts_with("rediss://") => "url".to_string(),
        other => {
            return Err(format!(
                "--broker {other:?}: expected local, redis or a redis:// URL"
            ));
        }
    };
    if tls && mode != "redis" {
        return Err(
            "--tls runs with --broker redis (it starts a TLS server of its own); an existing \
             server is measured over TLS through its rediss:// URL"
                .into(),
        );
    }
    let mut report = Report {
        mode: mode.clone(),
        json,
        baselines: None,
        tls_baselines: None,
        rows: Vec::new(),
    };
    let started = Instant::now();
    let result = match mode.as_str() {
        "local" => run_local(&mut report, sizes).await,
        "redis" => run_dedicated(&mut report, sizes, tls).await,
        _ => run_url(&mut report, sizes, broker).await,
    };
    if !json {
        report.print_table();
        println!(
            "({} run, {:.1} s)",
            if quick { "quick" } else { "full" },
            started.elapsed().as_secs_f64()
        );
    }
    result.map_err(|e| format!("bench: {e}"))?;
    Ok(ExitCode::SUCCESS)
}

/// A free loopback port (free a moment ago).
fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A Redis server the bench runs on.
#[derive(Debug, Clone)]
struct Server {
    url: String,
    /// The prefix of every key the run writes.
    prefix: String,
    /// How its TLS port is trusted: `None` for a plain `redis://` URL (and the system's roots
    /// for `rediss://`).
    tls: Option<TlsTrust>,
}

impl Server {
    /// Broker options for this server, answers bounded by `response_timeout`.
    fn options(&self, response_timeout: Duration) -> RedisOptions {
        RedisOptions {
            prefix: self.prefix.clone(),
            tls: self.tls.clone(),
            response_timeout,
            ..RedisOptions::default()
        }
    }
}

/// A dedicated redis-server on a free loopback port, with a password, in a temp dir, reached
/// as the node user. Plain unless `tls`: then its port speaks TLS only, with certificates made
/// in `dir` as a head makes them, and clients pin its CA.
async fn dedicated_redis(
    dir: &TempDir,
    tls: bool,
) -> Result<(RedisProcess, Server, u16, String), BoxError> {
    let port = free_port()?;
    let password = format!("bench-{}-{}", std::process::id(), unix_ms());
    let mut options = RedisServerOptions::new(password.clone(), port, dir.path().join("redis"));
    options.bind = vec!["127.0.0.1".into()];
    options.tls = tls;
    let redis = start_redis_server(&options)
        .await?
        .ok_or("a redis-server already answered on the free port")?;
    let server = Server {
        url: redis_url_as("127.0.0.1", port, NODE_USER, &password),
        prefix: "dc".into(),
        tls: options.client_tls()?,
    };
    Ok((redis, server, port, password))
}

async fn run_dedicated(report: &mut Report, sizes: Sizes, tls: bool) -> Result<(), BoxError> {
    let dir = TempDir::new("redis")?;
    let (mut redis, server, port, password) = dedicated_redis(&dir, false).await?;
    let result = run_redis_workloads(
        report,
        sizes,
        &server,
        Some(Failover {
            port,
            password: &password,
        }),
    )
    .await;
    let _ = redis.terminate().await;
    result?;
    if tls {
        let dir = TempDir::new("redis-tls")?;
        let (mut redis, server, _, _) = dedicated_redis(&dir, true).await?;
        let result = tls_workloads(report, sizes, &server).await;
        let _ = redis.terminate().await;
        result?;
    }
    Ok(())
}

/// `--tls`: the baselines and W1–W4 again, on a second dedicated server whose port speaks TLS
/// (as a head's does by default). Their rows carry `_tls` metrics, each ratio to the TLS
/// server's own baseline, and a note with the figure's ratio to the plain run's.
async fn tls_workloads(report: &mut Report, sizes: Sizes, server: &Server) -> Result<(), BoxError> {
    let baselines =
        measure_baselines(server, &format!("{}:bench-baseline", server.prefix), sizes).await?;
    report.tls_baselines = Some(baselines);
    let mut runs = Report {
        mode: report.mode.clone(),
        json: false,
        baselines: Some(baselines),
        tls_baselines: None,
        rows: Vec::new(),
    };
    push_baselines(&mut runs, baselines, "the TLS server, redis-rs over rustls");
    let agent = NodeRuntime::start(server).await?;
    let result = pool_workloads(&mut runs, sizes, &PoolTarget::Redis(server)).await;
    agent.shutdown().await;
    result?;
    for mut row in runs.rows {
        let plain_value = report
            .rows
            .iter()
            .find(|r| !r.tls && r.workload == row.workload && r.metric == row.metric)
            .and_then(|r| r.value);
        if let (Some(v), Some(p)) = (row.value, plain_value) {
            let vs = format!("over TLS; plain {} (TLS/plain {:.2})", fmt_num(p), v / p);
            row.note = Some(match row.note {
                Some(note) => format!("{note}; {vs}"),
                None => vs,
            });
        }
        row.metric.push_str("_tls");
        row.tls = true;
        report.push(row);
    }
    Ok(())
}

async fn run_url(report: &mut Report, sizes: Sizes, url: &str) -> Result<(), BoxError> {
    // Under `dc:`, where a head's node user may write.
    let server = Server {
        url: url.to_string(),
        prefix: format!("dc:bench-{}-{}", std::process::id(), unix_ms()),
        tls: None,
    };
    let result = run_redis_workloads(report, sizes, &server, None).await;
    // Remove what the run left under its prefix.
    if let Ok(mut conn) = connect(&server).await {
        let _ = delete_prefix(&mut conn, &server.prefix).await;
    }
    result
}

async fn delete_prefix(conn: &mut MultiplexedConnection, prefix: &str) -> redis::RedisResult<()> {
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}:*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await?;
        if !keys.is_empty() {
            redis::cmd("UNLINK")
                .arg(&keys)
                .query_async::<()>(conn)
                .await?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

async fn run_local(report: &mut Report, sizes: Sizes) -> Result<(), BoxError> {
    let broker: Arc<dyn Broker> = Arc::new(LocalBroker::new());
    let scale = scale_workloads(sizes, || async { Ok::<_, BoxError>(broker.clone()) }).await?;
    // Baselines from a throwaway dedicated redis-server: the local pool uses no Redis, but
    // its figures still read against the same machine's broker limits.
    let dir = TempDir::new("redis")?;
    match dedicated_redis(&dir, false).await {
        Ok((mut redis, server, _, _)) => {
            let baselines = measure_baselines(&server, "dc:bench-baseline", sizes).await;
            let _ = redis.terminate().await;
            push_baselines(report, baselines?, "throwaway dedicated redis-server");
        }
        Err(e) => report.push(Row::skipped(
            "baseline",
            "none",
            format!("no baselines: cannot start a redis-server ({e})"),
        )),
    }
    pool_workloads(report, sizes, &PoolTarget::Local).await?;
    report.push(Row::skipped(
        "W5",
        "failover_s",
        "not run in local mode: needs node processes on a Redis (use --broker redis)",
    ));
    for row in scale {
        report.push(row);
    }
    Ok(())
}

fn push_baselines(report: &mut Report, b: Baselines, source: &str) {
    report.baselines = Some(b);
    let note = |what: &str| format!("{what}; {source}");
    report.push(
        Row::new("baseline", "ping_rtt_us", b.ping_rtt_us)
            .note(note("p50 of 1,000 sequential PINGs")),
    );
    report.push(
        Row::new("baseline", "xadd_pipelined_per_s", b.xadd_pipelined_per_s)
            .note(note("50,000 XADDs in pipelines of 1,000")),
    );
    report.push(
        Row::new("baseline", "cycle_k1_per_s", b.cycle_k1_per_s).note(note(
            "bare stream cycle: XADD jobs, 2 consumers XREADGROUP COUNT 1 then XADD result + XACK",
        )),
    );
    report.push(
        Row::new("baseline", "setget_64mib_mb_per_s", b.setget_64mib_mb_per_s)
            .note(note("SET then GET of 64 MiB, median of 3")),
    );
}

/// For W5: the dedicated server's port and password (node processes join it).
#[derive(Debug, Clone, Copy)]
struct Failover<'a> {
    port: u16,
    password: &'a str,
}

async fn redis_broker(server: &Server) -> Result<Arc<dyn Broker>, BoxError> {
    let options = server.options(RedisOptions::default().response_timeout);
    Ok(Arc::new(RedisBroker::connect(&server.url, options).await?))
}

fn cpu_agent(
    broker: Arc<dyn Broker>,
    slots: usize,
    simulate: bool,
) -> Result<AgentHandle, BoxError> {
    let mut config = AgentConfig::new(
        NodeId(format!(
            "{}-bench-{}-{}",
            dc_core::agent::host_name(),
            std::process::id(),
            unix_ms()
        )),
        WorkerCommand::current_exe()?,
        vec![BENCH_KIND.to_string()],
        vec![SlotSpec::for_device(None); slots],
    );
    config.set_simulated(simulate);
    Ok(spawn_agent(broker, config))
}

/// W1–W4's node: an agent with 2 CPU workers on a tokio runtime of its own, as a node process
/// has, so that the pool's tasks and the node's never wait in one run queue (in a deployment
/// they are different processes, usually on different machines).
struct NodeRuntime {
    runtime: tokio::runtime::Runtime,
    agent: AgentHandle,
}

impl NodeRuntime {
    async fn start(server: &Server) -> Result<Self, BoxError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("dc-bench-node")
            .enable_all()
            .build()?;
        let server = server.clone();
        // The broker's connections are made on the node's runtime, so their tasks run there.
        let agent = runtime
            .spawn(async move { cpu_agent(redis_broker(&server).await?, WORKERS, false) })
            .await??;
        Ok(NodeRuntime { runtime, agent })
    }

    async fn shutdown(self) {
        let NodeRuntime { runtime, agent } = self;
        let _ = runtime.spawn(agent.shutdown()).await;
        runtime.shutdown_background();
    }
}

async fn run_redis_workloads(
    report: &mut Report,
    sizes: Sizes,
    server: &Server,
    failover: Option<Failover<'_>>,
) -> Result<(), BoxError> {
    // W6 first, on a heap nothing has grown yet (its memory figure); reported last.
    let scale = scale_workloads(sizes, || redis_broker(server)).await?;
    let baselines =
        measure_baselines(server, &format!("{}:bench-baseline", server.prefix), sizes).await?;
    push_baselines(report, baselines, "same server, redis-rs");

    // W1–W4: one node agent (in this process) with 2 CPU worker processes.
    let agent = NodeRuntime::start(server).await?;
    let target = PoolTarget::Redis(server);
    let result = pool_workloads(report, sizes, &target).await;
    agent.shutdown().await;
    result?;

    match failover {
        Some(f) => failover_workloads(report, f).await?,
        None => report.push(
            Row::skipped("W5", "failover_s", "not run against an existing Redis: node processes use the default key prefix (use --broker redis)"),
        ),
    }
    for row in scale {
        report.push(row);
    }
    Ok(())
}

async fn wait_workers(pool: &Pool<BenchWorker>, n: usize, limit: Duration) -> Result<(), BoxError> {
    let deadline = Instant::now() + limit;
    loop {
        let count = pool.workers_count().await?;
        if count >= n {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("only {count} of {n} workers joined within {limit:?}").into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

/// Where W1–W4 open their pools.
enum PoolTarget<'a> {
    /// A `local()` pool with 2 CPU workers.
    Local,
    /// A pool on this Redis, served by the bench's own agent.
    Redis(&'a Server),
}

/// Open a pool with automatic batching on or off, wait for its 2 workers and warm it up
/// (workers built, connections open).
async fn open_pool(target: &PoolTarget<'_>, batching: bool) -> Result<Pool<BenchWorker>, BoxError> {
    let builder = Pool::<BenchWorker>::builder(()).auto_batching(batching);
    let pool = match target {
        PoolTarget::Local => builder.local().cpu_workers(WORKERS).connect().await?,
        PoolTarget::Redis(server) => {
            builder
                .broker_instance(redis_broker(server).await?)
                .connect()
                .await?
        }
    };
    wait_workers(&pool, WORKERS, Duration::from_secs(60)).await?;
    pool.map((0..200).map(BenchJob::Echo)).await?;
    Ok(pool)
}

/// W1: `n` Echo jobs through one `map`; jobs/s.
async fn echo_rate(pool: &Pool<BenchWorker>, n: u64) -> Result<f64, BoxError> {
    let t = Instant::now();
    let out = pool.map((0..n).map(BenchJob::Echo)).await?;
    let secs = t.elapsed().as_secs_f64();
    let ok = out.len() == n as usize
        && out
            .iter()
            .enumerate()
            .all(|(i, o)| matches!(o, BenchOutput::Echo(v) if *v == i as u64));
    if !ok {
        return Err("W1: wrong echo results".into());
    }
    Ok(n as f64 / secs)
}

/// W1–W4 on pools of 2 workers: W1 one job per dispatch on a pool with automatic batching
/// off, then the rest on a default pool (batching on).
async fn pool_workloads(
    report: &mut Report,
    sizes: Sizes,
    target: &PoolTarget<'_>,
) -> Result<(), BoxError> {
    let base = report.baselines.unwrap_or_default();
    let n = sizes.w1_jobs;

    // W1: throughput, one job per dispatch.
    let pool = open_pool(target, false).await?;
    let rate = echo_rate(&pool, n).await;
    let _ = pool.close().await;
    let rate = rate?;
    let ratio = rate / base.cycle_k1_per_s;
    report.push(
        Row::new("W1", "jobs_per_s", rate)
            .ratio(ratio)
            .target(">= 5000 and ratio >= 0.5", rate >= 5000.0 && ratio >= 0.5)
            .note(format!(
                "{n} Echo jobs, one job per dispatch (auto_batching off); ratio = value / cycle_k1_per_s"
            )),
    );

    let pool = open_pool(target, true).await?;
    let result = default_pool_workloads(report, sizes, &pool).await;
    let _ = pool.close().await;
    result
}

/// W1 batched and W2–W4 on a default pool.
async fn default_pool_workloads(
    report: &mut Report,
    sizes: Sizes,
    pool: &Pool<BenchWorker>,
) -> Result<(), BoxError> {
    let base = report.baselines.unwrap_or_default();
    let n = sizes.w1_jobs;

    // W1 with automatic batching.
    let rate = echo_rate(pool, n).await?;
    report.push(
        Row::new("W1", "jobs_per_s_batched", rate)
            .ratio(rate / base.cycle_k1_per_s)
            .target(">= 30000", rate >= 30000.0)
            .note(format!(
                "{n} Echo jobs, automatic batching (the default); ratio = value / cycle_k1_per_s"
            )),
    );

    // W2: sequential round trips.
    let mut trips = Vec::with_capacity(sizes.w2_trips);
    for i in 0..sizes.w2_trips {
        let t = Instant::now();
        let out = pool.map([BenchJob::Echo(i as u64)]).await?;
        trips.push(t.elapsed().as_secs_f64() * 1e6);
        if !matches!(out.as_slice(), [BenchOutput::Echo(v)] if *v == i as u64) {
            return Err("W2: wrong echo result".into());
        }
    }
    let trips = sorted(trips);
    let p50 = percentile(&trips, 0.5);
    let p99 = percentile(&trips, 0.99);
    let ratio = p50 / base.ping_rtt_us;
    report.push(
        Row::new("W2", "p50_us", p50)
            .ratio(ratio)
            .target("ratio <= 6", ratio <= 6.0)
            .note(format!(
                "{} sequential single-job round trips; ratio = p50 / ping_rtt_us",
                sizes.w2_trips
            )),
    );
    report.push(Row::new("W2", "p99_us", p99));

    // W3: 64 MiB in, 64 MiB out.
    let data = ByteBuf::from(vec![0xA5u8; MIB64]);
    // A sliding window: `in_flight` callers, each sending its next job as soon as its last
    // result is back (several `map` calls may run at once on one pool).
    let in_flight = 2 * WORKERS;
    let t = Instant::now();
    let callers = (0..in_flight).map(|c| {
        let data = &data;
        async move {
            for _ in (c..sizes.w3_jobs).step_by(in_flight) {
                let out = pool.map([BenchJob::Bytes(data.clone())]).await?;
                if !matches!(out.as_slice(), [BenchOutput::Bytes(b)] if b.len() == MIB64) {
                    return Err::<(), BoxError>("W3: wrong result size".into());
                }
            }
            Ok(())
        }
    });
    futures::future::try_join_all(callers).await?;
    let secs = t.elapsed().as_secs_f64();
    drop(data);
    let mbps = (sizes.w3_jobs * 2 * MIB64) as f64 / 1e6 / secs;
    let ratio = mbps / base.setget_64mib_mb_per_s;
    report.push(
        Row::new("W3", "mb_per_s", mbps)
            .ratio(ratio)
            .target(">= 200 and ratio >= 0.4", mbps >= 200.0 && ratio >= 0.4)
            .note(format!(
                "{} jobs of 64 MiB in + 64 MiB out, {in_flight} in flight; ratio = value / setget_64mib_mb_per_s",
                sizes.w3_jobs
            )),
    );

    // W4: update broadcast until every worker has applied it.
    let workers = pool.workers_count().await?.max(1);
    let mut times = Vec::with_capacity(sizes.w4_tries);
    for seq in 1..=sizes.w4_tries as u64 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let t = Instant::now();
        pool.update_workers(seq).await?;
        let mut seen = BTreeSet::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while seen.len() < workers {
            if Instant::now() > deadline {
                return Err(format!(
                    "W4: only {} of {workers} workers applied update {seq}",
                    seen.len()
                )
                .into());
            }
            for out in pool.map((0..workers).map(|_| BenchJob::Applied)).await? {
                if let BenchOutput::Applied { worker, updates } = out
                    && updates >= seq
                {
                    seen.insert(worker);
                }
            }
        }
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let p50 = percentile(&sorted(times), 0.5);
    report.push(
        Row::new("W4", "p50_ms", p50)
            .target("<= 5", p50 <= 5.0)
            .note(format!(
                "update_workers, then Applied jobs until each of {workers} workers reports it; {} tries",
                sizes.w4_tries
            )),
    );
    Ok(())
}

/// A node process (`start-node`) running this executable, killed when dropped.
#[derive(Debug)]
struct NodeProc {
    child: tokio::process::Child,
    _dir: TempDir,
}

impl NodeProc {
    fn start(f: Failover<'_>, heartbeat_ms: Option<u64>) -> Result<Self, BoxError> {
        let dir = TempDir::new("node")?;
        let mut cmd = tokio::process::Command::new(std::env::current_exe()?);
        cmd.arg("start-node")
            .arg("-a")
            .arg("127.0.0.1")
            .arg("-p")
            .arg(f.port.to_string())
            .arg("--cpu-workers")
            .arg("1")
            .arg("--gpus")
            .arg("none")
            .arg("--state-dir")
            .arg(dir.path())
            .env("DC_PASSWORD", f.password)
            .arg("--no-tls")
            .env("DC_LOG", "warn")
            .env_remove("DC_CONFIG")
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        if let Some(ms) = heartbeat_ms {
            cmd.arg("--heartbeat-ms").arg(ms.to_string());
        }
        Ok(NodeProc {
            child: cmd.spawn()?,
            _dir: dir,
        })
    }

    async fn stop(&mut self) {
        if let Some(pid) = self.child.id().and_then(|p| i32::try_from(p).ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        if tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// W5: kill -9 the node holding a 2 s job; time until its result arrives from the other node.
async fn failover_workloads(report: &mut Report, f: Failover<'_>) -> Result<(), BoxError> {
    let variants: [(&str, Option<Duration>, Option<u64>, f64); 2] = [
        ("failover_s_default_lease", None, None, 10.0),
        (
            "failover_s_lease_1500ms",
            Some(Duration::from_millis(1500)),
            Some(200),
            3.0,
        ),
    ];
    for (metric, lease, heartbeat_ms, target) in variants {
        let mut nodes = vec![
            NodeProc::start(f, heartbeat_ms)?,
            NodeProc::start(f, heartbeat_ms)?,
        ];
        let result = failover_once(f, &mut nodes, lease).await;
        for node in &mut nodes {
            node.stop().await;
        }
        let (total, rerun) = result?;
        let how = match lease {
            None => "default lease and heartbeat".to_string(),
            Some(l) => format!(
                "lease {} ms, heartbeat {} ms",
                l.as_millis(),
                heartbeat_ms.unwrap_or(1000)
            ),
        };
        report.push(
            Row::new("W5", metric, total)
                .target(&format!("<= {target}"), total <= target)
                .note(format!(
                    "{how}; kill -9 of the node running a 2 s job, to its result from the other node; the re-run started {rerun:.2} s after the kill"
                )),
        );
    }
    Ok(())
}

async fn failover_once(
    f: Failover<'_>,
    nodes: &mut [NodeProc],
    lease: Option<Duration>,
) -> Result<(f64, f64), BoxError> {
    let server = Server {
        url: redis_url_as("127.0.0.1", f.port, NODE_USER, f.password),
        prefix: "dc".into(),
        tls: None,
    };
    let mut builder =
        Pool::<BenchWorker>::builder(()).broker_instance(redis_broker(&server).await?);
    if let Some(lease) = lease {
        builder = builder.lease(lease);
    }
    let pool = Arc::new(builder.connect().await?);
    let result = async {
        wait_workers(&pool, nodes.len(), Duration::from_secs(60)).await?;
        let marks = TempDir::new("marks")?;
        let marker = marks.path().join("holder");
        let job = BenchJob::Sleep {
            ms: 2000,
            marker: Some(marker.to_string_lossy().into_owned()),
        };
        let waiter = tokio::spawn({
            let pool = pool.clone();
            async move {
                let out = pool.map([job]).await;
                (out, Instant::now())
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let holder: u32 = loop {
            if let Ok(text) = std::fs::read_to_string(&marker)
                && let Ok(pid) = text.trim().parse()
            {
                break pid;
            }
            if Instant::now() > deadline {
                waiter.abort();
                return Err::<(f64, f64), BoxError>(
                    "W5: no worker started the job within 30 s".into(),
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let Some(node) = nodes.iter_mut().find(|n| n.child.id() == Some(holder)) else {
            waiter.abort();
            return Err(format!(
                "W5: the job runs under pid {holder}, not one of the bench's nodes"
            )
            .into());
        };
        let _ = std::fs::remove_file(&marker);
        let killed_at = Instant::now();
        let killed_unix = unix_ms();
        node.child.start_kill()?;
        let (out, arrived) = tokio::time::timeout(Duration::from_secs(120), waiter)
            .await
            .map_err(|_| "W5: no result within 120 s of the kill")??;
        let Some(BenchOutput::Slept { started_unix_ms }) = out?.pop() else {
            return Err("W5: wrong output".into());
        };
        let rerun = (started_unix_ms as f64 - killed_unix as f64) / 1e3;
        Ok(((arrived - killed_at).as_secs_f64(), rerun))
    }
    .await;
    let _ = pool.close().await;
    result
}

/// Resident memory of this process, in bytes (from /proc/self/status).
fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// W6: one in-process node agent with 10, 100 and 1,000 simulated slots. Runs before the other
/// workloads and baselines, 1,000 slots first, so that its memory figure is taken on a heap that
/// nothing else has grown (freed memory would be reused and hide the agent's). Returns the
/// rows, to be reported after the other workloads.
async fn scale_workloads<F, Fut>(sizes: Sizes, broker: F) -> Result<Vec<Row>, BoxError>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<Arc<dyn Broker>, BoxError>>,
{
    let mut measured = Vec::new();
    for slots in [1000usize, 100, 10] {
        let pool = Pool::<BenchWorker>::builder(())
            .broker_instance(broker().await?)
            .connect()
            .await?;
        let rss_before = rss_bytes();
        let agent = cpu_agent(broker().await?, slots, true)?;
        let result = async {
            wait_workers(&pool, slots, Duration::from_secs(120)).await?;
            pool.map((0..200).map(BenchJob::Echo)).await?;
            let rss_after = rss_bytes();
            let n = sizes.w6_jobs;
            let t = Instant::now();
            let out = pool.map((0..n).map(BenchJob::Echo)).await?;
            let secs = t.elapsed().as_secs_f64();
            if out.len() as u64 != n {
                return Err::<_, BoxError>("W6: missing results".into());
            }
            let per_slot = match (rss_before, rss_after) {
                (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / slots as f64),
                _ => None,
            };
            Ok((n as f64 / secs, per_slot))
        }
        .await;
        let _ = pool.close().await;
        agent.shutdown().await;
        let (rate, per_slot) = result?;
        measured.push((slots, rate, per_slot));
    }
    measured.reverse();
    let at_10 = measured.first().map(|m| m.1).unwrap_or(f64::NAN);
    let mut rows = Vec::new();
    for (slots, rate, per_slot) in measured {
        let mut row = Row::new("W6", format!("jobs_per_s_{slots}_slots"), rate).note(format!(
            "{} Echo jobs on simulated slots (no process)",
            sizes.w6_jobs
        ));
        if slots == 1000 {
            let ratio = rate / at_10;
            row = row
                .ratio(ratio)
                .target("ratio to 10 slots >= 0.8", ratio >= 0.8);
        } else if slots != 10 {
            row = row.ratio(rate / at_10);
        }
        rows.push(row);
        if slots == 1000
            && let Some(bytes) = per_slot
        {
            let kib = bytes / 1024.0;
            rows.push(
                Row::new("W6", "agent_kib_per_slot_1000_slots", kib)
                    .target("<= 64", kib <= 64.0)
                    .note("approximate: RSS delta of this process (agent + pool session) / 1,000 slots, idle after 200 jobs, measured first"),
            );
        }
    }
    Ok(rows)
}

/// A connection with a response timeout long enough for blocking reads and 64 MiB values.
async fn connect(server: &Server) -> Result<MultiplexedConnection, BoxError> {
    Ok(connect_raw(&server.url, &server.options(Duration::from_secs(120))).await?)
}

async fn measure_baselines(
    server: &Server,
    prefix: &str,
    sizes: Sizes,
) -> Result<Baselines, BoxError> {
    let mut conn = connect(server).await?;

    // PING round trip.
    for _ in 0..50 {
        redis::cmd("PING").query_async::<String>(&mut conn).await?;
    }
    let mut rtts = Vec::with_capacity(1000);
    for _ in 0..1000 {
        let t = Instant::now();
        redis::cmd("PING").query_async::<String>(&mut conn).await?;
        rtts.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let ping_rtt_us = percentile(&sorted(rtts), 0.5);

    // Pipelined XADD.
    let key = format!("{prefix}:xadd");
    let t = Instant::now();
    for _ in 0..50 {
        let mut pipe = redis::pipe();
        for i in 0..1000 {
            pipe.cmd("XADD").arg(&key).arg("*").arg("j").arg(i).ignore();
        }
        pipe.query_async::<()>(&mut conn).await?;
    }
    let xadd_pipelined_per_s = 50_000.0 / t.elapsed().as_secs_f64();
    redis::cmd("DEL")
        .arg(&key)
        .query_async::<()>(&mut conn)
        .await?;

    let cycle_k1_per_s = stream_cycle(server, prefix, sizes.cycle_jobs).await?;

    // SET then GET of 64 MiB.
    let key = format!("{prefix}:blob");
    let value = vec![0x5Au8; MIB64];
    let mut rates = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        redis::cmd("SET")
            .arg(&key)
            .arg(&value)
            .query_async::<()>(&mut conn)
            .await?;
        let back: Vec<u8> = redis::cmd("GET").arg(&key).query_async(&mut conn).await?;
        let secs = t.elapsed().as_secs_f64();
        if back.len() != MIB64 {
            return Err("baseline: GET returned the wrong size".into());
        }
        rates.push((2 * MIB64) as f64 / 1e6 / secs);
    }
    redis::cmd("DEL")
        .arg(&key)
        .query_async::<()>(&mut conn)
        .await?;
    let setget_64mib_mb_per_s = percentile(&sorted(rates), 0.5);
    Ok(Baselines {
        ping_rtt_us,
        xadd_pipelined_per_s,
        cycle_k1_per_s,
        setget_64mib_mb_per_s,
    })
}

/// The bare stream job cycle: the producer XADDs `n` jobs; 2 consumers, each on its own
/// connection, XREADGROUP COUNT 1 BLOCK, then XADD a result and XACK (one pipeline); the
/// producer reads the `n` results. Jobs per second.
async fn stream_cycle(server: &Server, prefix: &str, n: usize) -> Result<f64, BoxError> {
    let jobs = format!("{prefix}:cycle-jobs");
    let results = format!("{prefix}:cycle-results");
    let mut conn = connect(server).await?;
    redis::cmd("DEL")
        .arg(&jobs)
        .arg(&results)
        .query_async::<()>(&mut conn)
        .await?;
    redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&jobs)
        .arg("g")
        .arg("0")
        .arg("MKSTREAM")
        .query_async::<()>(&mut conn)
        .await?;
    let stop = Arc::new(AtomicBool::new(false));
    let taken = Arc::new(AtomicUsize::new(0));
    let mut consumers = Vec::new();
    for c in 0..2 {
        let mut cconn = connect(server).await?;
        let (jobs, results, stop, taken) =
            (jobs.clone(), results.clone(), stop.clone(), taken.clone());
        consumers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let reply: Option<StreamReadReply> = redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg("g")
                    .arg(format!("c{c}"))
                    .arg("COUNT")
                    .arg(1)
                    .arg("BLOCK")
                    .arg(100)
                    .arg("STREAMS")
                    .arg(&jobs)
                    .arg(">")
                    .query_async(&mut cconn)
                    .await?;
                for key in reply.map(|r| r.keys).unwrap_or_default() {
                    for entry in key.ids {
                        let mut pipe = redis::pipe();
                        pipe.cmd("XADD")
                            .arg(&results)
                            .arg("*")
                            .arg("r")
                            .arg(&entry.id)
                            .ignore()
                            .cmd("XACK")
                            .arg(&jobs)
                            .arg("g")
                            .arg(&entry.id)
                            .ignore();
                        pipe.query_async::<()>(&mut cconn).await?;
                        taken.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Ok::<(), redis::RedisError>(())
        }));
    }
    let t = Instant::now();
    let outcome = async {
        for start in (0..n).step_by(1000) {
            let mut pipe = redis::pipe();
            for i in start..(start + 1000).min(n) {
                pipe.cmd("XADD")
                    .arg(&jobs)
                    .arg("*")
                    .arg("j")
                    .arg(i)
                    .ignore();
            }
            pipe.query_async::<()>(&mut conn).await?;
        }
        let mut seen = 0;
        let mut last = "0".to_string();
        let deadline = Instant::now() + Duration::from_secs(120);
        while seen < n {
            if Instant::now() > deadline {
                return Err::<f64, BoxError>("baseline cycle: results missing after 120 s".into());
            }
            let reply: Option<StreamReadReply> = redis::cmd("XREAD")
                .arg("COUNT")
                .arg(1000)
                .arg("BLOCK")
                .arg(1000)
                .arg("STREAMS")
                .arg(&results)
                .arg(&last)
                .query_async(&mut conn)
                .await?;
            for key in reply.map(|r| r.keys).unwrap_or_default() {
                for entry in key.ids {
                    seen += 1;
                    last = entry.id;
                }
            }
        }
        Ok(n as f64 / t.elapsed().as_secs_f64())
    }
    .await;
    stop.store(true, Ordering::Relaxed);
    for consumer in consumers {
        if let Ok(Err(e)) = consumer.await {
            return Err(format!("baseline cycle consumer: {e}").into());
        }
    }
    let _ = redis::cmd("DEL")
        .arg(&jobs)
        .arg(&results)
        .query_async::<()>(&mut conn)
        .await;
    outcome
}
