//! Cluster fixtures: node processes started through the CLI (this test executable in role
//! `cli`), a head node on a free loopback port, pools on it, temp dirs.
#![allow(dead_code, unreachable_pub, missing_docs)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use distributed_computing::{Pool, PoolError};
use tokio::io::{AsyncBufReadExt, BufReader};

use super::{Probe, ProbeInit, eventually};

/// The environment variable that makes a test executable act as the node CLI.
pub const ROLE: &str = "DC_TEST_ROLE";
/// The password of test pools.
pub const PASSWORD: &str = "test-pool-pw";

/// The known-heads file of this test process and the nodes and CLIs it starts: heads pinned
/// on first use here do not meet heads of other test processes on a reused port.
pub fn known_heads() -> PathBuf {
    std::env::temp_dir().join(format!("dc-test-known-heads-{}", std::process::id()))
}

/// Heads (and pool servers) started by this process: port → state directory.
static HEADS: Mutex<Vec<(u16, PathBuf)>> = Mutex::new(Vec::new());

/// Remember that a pool server with state directory `dir` serves `port`.
pub fn register_head(port: u16, dir: &Path) {
    HEADS.lock().expect("heads").push((port, dir.to_path_buf()));
}

/// The state directory of the head this process started on `port`, if any.
pub fn head_dir(port: u16) -> Option<PathBuf> {
    HEADS
        .lock()
        .expect("heads")
        .iter()
        .rev()
        .find(|(p, _)| *p == port)
        .map(|(_, d)| d.clone())
}

/// The admin secret of the head on `port` (from its state directory).
pub fn admin_secret(port: u16) -> Option<String> {
    let dir = head_dir(port)?;
    std::fs::read_to_string(dir.join(format!("redis-{port}")).join("admin-secret"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// The join token of the head on `port`.
pub fn head_token(port: u16) -> Option<String> {
    let dir = head_dir(port)?;
    std::fs::read_to_string(dir.join("join-token"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// Call first in a cluster test's `main` (after `serve_if_worker`): serves the CLI role.
pub fn serve_cli_role() -> Option<std::process::ExitCode> {
    (std::env::var(ROLE).as_deref() == Ok("cli"))
        .then(|| distributed_computing::main_with_args(std::env::args_os().collect()))
}

pub struct NodeProc {
    pub child: tokio::process::Child,
    output: Arc<Mutex<Vec<String>>>,
    /// The tasks reading its stdout and stderr into `output`, until their end.
    readers: Vec<tokio::task::JoinHandle<()>>,
    _dir: TempDir,
}

impl NodeProc {
    pub async fn start(
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Self, Box<dyn std::error::Error>> {
        let dir = TempDir::new("node")?;
        let mut cmd = tokio::process::Command::new(std::env::current_exe()?);
        cmd.env(ROLE, "cli")
            .env("DC_LOG", "info")
            .env("DC_KNOWN_HEADS", known_heads())
            .env_remove("DC_FAKE_GPUS")
            .env_remove("CUDA_VISIBLE_DEVICES")
            .args(args)
            .arg("--state-dir")
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn()?;
        let (output, readers) = collect_output(&mut child);
        Ok(NodeProc {
            child,
            output,
            readers,
            _dir: dir,
        })
    }

    pub fn state_dir(&self) -> &Path {
        self._dir.path()
    }

    pub fn output(&self) -> String {
        self.output.lock().expect("output lock").join("\n")
    }

    pub async fn wait_for_output(&self, needle: &str, limit: Duration) -> bool {
        eventually(limit, || async { self.output().contains(needle) }).await
    }

    pub async fn stop(&mut self) -> Result<(), Box<dyn std::error::Error>> {
        if let Some(pid) = self.child.id() {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            )?;
        }
        match tokio::time::timeout(Duration::from_secs(20), self.child.wait()).await {
            Ok(status) => {
                status?;
                Ok(())
            }
            Err(_) => Err("node did not stop within 20 s of SIGTERM".into()),
        }
    }
}

/// A head node (`start-node --head`) on a free loopback port, with `cpu_workers` workers.
pub async fn start_head(cpu_workers: usize) -> Result<(NodeProc, u16), Box<dyn std::error::Error>> {
    start_head_with(cpu_workers, Some(300)).await
}

pub async fn start_worker_node(
    port: u16,
    cpu_workers: usize,
    env: &[(&str, &str)],
) -> Result<NodeProc, Box<dyn std::error::Error>> {
    start_worker_node_with(port, cpu_workers, Some(300), env).await
}

pub async fn pool(port: u16, tag: &str) -> Result<Pool<Probe>, PoolError> {
    pool_with_lease(port, tag, Some(Duration::from_secs(3))).await
}

pub async fn wait_workers(pool: &Pool<Probe>, workers: usize, nodes: usize) -> bool {
    eventually(Duration::from_secs(60), || async {
        pool.workers_count().await.unwrap_or(0) == workers
            && pool.nodes_count().await.unwrap_or(0) == nodes
    })
    .await
}

pub fn node_of(worker_id: &str) -> &str {
    worker_id
        .rsplit_once('/')
        .map(|(n, _)| n)
        .unwrap_or(worker_id)
}

// Each test binary uses some of these.
#[allow(unused_imports)]
pub use dc_core::testing::support::{TempDir, free_port, rss_kib};

// ---- Additions for the fault tests (tests/faults.rs) ----

/// Node flags for `start-node`: the connection, CPU workers, and a heartbeat when given (none:
/// the node's default, 1 s).
fn node_args(head: bool, port: u16, cpu_workers: usize, heartbeat_ms: Option<u64>) -> Vec<String> {
    let mut args: Vec<String> = vec!["start-node".into()];
    if head {
        args.extend(["--head".into(), "--bind".into(), "127.0.0.1".into()]);
    } else {
        args.extend(["-a".into(), "127.0.0.1".into()]);
    }
    args.extend([
        "-p".into(),
        port.to_string(),
        "-r".into(),
        PASSWORD.into(),
        "--cpu-workers".into(),
        cpu_workers.to_string(),
    ]);
    if let Some(ms) = heartbeat_ms {
        args.extend(["--heartbeat-ms".into(), ms.to_string()]);
    }
    args
}

/// [`start_head`] with a chosen heartbeat (`None`: the node's default).
pub async fn start_head_with(
    cpu_workers: usize,
    heartbeat_ms: Option<u64>,
) -> Result<(NodeProc, u16), Box<dyn std::error::Error>> {
    let port = free_port()?;
    let args = node_args(true, port, cpu_workers, heartbeat_ms);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let head = start_head_process(port, &args, &[]).await?;
    Ok((head, port))
}

/// A head started with `args` (which name `port`) and `env`, registered for the helpers that
/// reach it, once it has printed the worker command of its banner.
pub async fn start_head_process(
    port: u16,
    args: &[&str],
    env: &[(&str, &str)],
) -> Result<NodeProc, Box<dyn std::error::Error>> {
    let head = NodeProc::start(args, env).await?;
    register_head(port, head.state_dir());
    if !head
        .wait_for_output(
            &format!("start-node -p {port} -a "),
            Duration::from_secs(30),
        )
        .await
    {
        return Err(format!(
            "the head never printed the worker command:\n{}",
            head.output()
        )
        .into());
    }
    Ok(head)
}

/// [`start_worker_node`] with a chosen heartbeat (`None`: the node's default).
pub async fn start_worker_node_with(
    port: u16,
    cpu_workers: usize,
    heartbeat_ms: Option<u64>,
    env: &[(&str, &str)],
) -> Result<NodeProc, Box<dyn std::error::Error>> {
    let args = node_args(false, port, cpu_workers, heartbeat_ms);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    NodeProc::start(&args, env).await
}

/// A probe pool on the head at `port`; `lease: None` keeps the pool's default lease (5 s).
pub async fn pool_with_lease(
    port: u16,
    tag: &str,
    lease: Option<Duration>,
) -> Result<Pool<Probe>, PoolError> {
    let mut builder = Pool::<Probe>::builder(ProbeInit::tagged(tag))
        .address("127.0.0.1")
        .port(port)
        .password(PASSWORD)
        .known_heads(known_heads());
    if let Some(lease) = lease {
        builder = builder.lease(lease);
    }
    builder.connect().await
}

/// This machine's host name, as nodes use it in their ids.
pub use distributed_computing::agent::host_name;

impl NodeProc {
    /// The node process's pid (while it has not been reaped).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// The node id its agent registers: `<host>-<pid>`; its workers are `<node id>/<slot>`.
    pub fn node_id(&self) -> Option<String> {
        self.pid().map(|pid| format!("{}-{pid}", host_name()))
    }

    /// Send a signal to the node process alone (not its group).
    pub fn signal(
        &self,
        signal: nix::sys::signal::Signal,
    ) -> Result<(), Box<dyn std::error::Error>> {
        let pid = self.pid().ok_or("the node process is already gone")?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal)?;
        Ok(())
    }

    /// Whether the node process has exited (reaping it if so).
    pub fn has_exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// Pid of the head's redis-server: a child of this node process named `redis-server` (or
    /// `valkey-server`) whose command line (which the server rewrites to its title,
    /// `redis-server 127.0.0.1:<port>`) ends with the port.
    pub fn redis_server_pid(&self, port: u16) -> Option<u32> {
        let me = self.pid()?;
        let title = format!(":{port}");
        children_of(me).into_iter().find(|pid| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|raw| String::from_utf8_lossy(&raw).replace('\0', " "))
                .unwrap_or_default();
            matches!(comm.trim(), "redis-server" | "valkey-server")
                && cmdline.trim_end().ends_with(&title)
                && !super::process_is_gone(*pid)
        })
    }
}

/// Pids of the live children of `parent` (from `/proc/<pid>/stat`).
pub fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    let (_, rest) = stat.rsplit_once(')')?;
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(parent)
        })
        .collect()
}

/// Run `redis-cli` against the server on `port`: a head's (over TLS, as its admin user) or a
/// plain password-protected one; its stdout.
pub async fn redis_cli<S: AsRef<std::ffi::OsStr>>(
    port: u16,
    args: &[S],
) -> Result<String, Box<dyn std::error::Error>> {
    let mut cmd = tokio::process::Command::new("redis-cli");
    cmd.args([
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "--no-auth-warning",
    ]);
    match admin_secret(port) {
        Some(secret) => {
            cmd.args(["--tls", "--insecure", "--user", "dc-admin"])
                .env("REDISCLI_AUTH", secret);
        }
        None => {
            cmd.env("REDISCLI_AUTH", PASSWORD);
        }
    }
    let out = cmd.args(args).stdin(Stdio::null()).output().await?;
    if !out.status.success() {
        let shown: Vec<_> = args.iter().map(|a| a.as_ref().to_string_lossy()).collect();
        return Err(format!(
            "redis-cli {shown:?} exited {:?}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `dc-cli status --json` on the head at `port` (this executable in role `cli`).
pub async fn status_json(port: u16) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    let out = tokio::process::Command::new(std::env::current_exe()?)
        .env(ROLE, "cli")
        .env("DC_PASSWORD", PASSWORD)
        .env("DC_KNOWN_HEADS", known_heads())
        .env("DC_LOG", "error")
        .args([
            "status",
            "-a",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "--json",
        ])
        .stdin(Stdio::null())
        .output()
        .await?;
    if !out.status.success() {
        return Err(format!(
            "status exited {:?}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

// ---- Additions for the CLI hardening tests (tests/cli_hardening.rs) ----

impl NodeProc {
    /// Like [`NodeProc::start`], with the state directory chosen by the caller (`dir` is removed
    /// when the node is dropped); `args` must not hold `--state-dir`.
    pub async fn start_in(
        args: &[&str],
        env: &[(&str, &str)],
        dir: TempDir,
    ) -> Result<Self, Box<dyn std::error::Error>> {
        let mut node = NodeProc::start_with_cwd(args, env, dir.path(), None).await?;
        node._dir = dir;
        Ok(node)
    }

    /// A CLI process (role `cli`) with `args` as given (no `--state-dir` added), in `cwd` when
    /// given; its output is collected like a node's.
    pub async fn start_with_cwd(
        args: &[&str],
        env: &[(&str, &str)],
        state_dir: &Path,
        cwd: Option<&Path>,
    ) -> Result<Self, Box<dyn std::error::Error>> {
        let scratch = TempDir::new("cli")?;
        let mut cmd = tokio::process::Command::new(std::env::current_exe()?);
        cmd.env(ROLE, "cli")
            .env("DC_LOG", "info")
            .env("DC_KNOWN_HEADS", known_heads())
            .env_remove("DC_FAKE_GPUS")
            .env_remove("CUDA_VISIBLE_DEVICES")
            .args(args)
            .arg("--state-dir")
            .arg(state_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(cwd) = cwd {
            cmd.current_dir(cwd);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn()?;
        let (output, readers) = collect_output(&mut child);
        Ok(NodeProc {
            child,
            output,
            readers,
            _dir: scratch,
        })
    }

    /// Wait (at most `limit`) for the process to exit; its status, or `None` if it still runs.
    /// Once it has exited, its output is complete: what it wrote last is read before this
    /// returns (unless a process it left behind holds its output open past `limit`).
    pub async fn exit_within(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = tokio::time::Instant::now() + limit;
        let status = tokio::time::timeout_at(deadline, self.child.wait())
            .await
            .ok()
            .and_then(Result::ok)?;
        for reader in self.readers.drain(..) {
            let _ = tokio::time::timeout_at(deadline, reader).await;
        }
        Some(status)
    }
}

/// A plain password-protected redis-server (no head node) on `port`; killed when dropped.
pub struct RedisServerProc {
    pub child: tokio::process::Child,
    pub port: u16,
}

impl RedisServerProc {
    /// Start it and wait (at most 15 s) until it answers `PING` with `password`.
    pub async fn start(port: u16, password: &str) -> Result<Self, Box<dyn std::error::Error>> {
        let child = tokio::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--requirepass",
                password,
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        let up = eventually(Duration::from_secs(15), || async {
            tokio::process::Command::new("redis-cli")
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port.to_string(),
                    "--no-auth-warning",
                ])
                .env("REDISCLI_AUTH", password)
                .arg("PING")
                .stdin(Stdio::null())
                .output()
                .await
                .map(|o| String::from_utf8_lossy(&o.stdout).contains("PONG"))
                .unwrap_or(false)
        })
        .await;
        if !up {
            return Err(format!("redis-server on port {port} never answered").into());
        }
        Ok(RedisServerProc { child, port })
    }
}

/// A pool server started in this process (`start_server`: TLS, the pool's ACL user with
/// [`PASSWORD`]) on `127.0.0.1:port`; stopped when dropped with the test's runtime.
pub struct PoolServer {
    pub handle: distributed_computing::ServerHandle,
    pub port: u16,
    _dir: TempDir,
}

impl PoolServer {
    /// Its state directory.
    pub fn dir(&self) -> &Path {
        self._dir.path()
    }

    pub async fn start(port: u16) -> Result<Self, Box<dyn std::error::Error>> {
        let dir = TempDir::new("server")?;
        let handle = distributed_computing::start_server(
            distributed_computing::ServerOptions::new(PASSWORD)
                .port(port)
                .bind(vec!["127.0.0.1".into()])
                .state_dir(dir.path()),
        )
        .await?;
        register_head(port, dir.path());
        Ok(PoolServer {
            handle,
            port,
            _dir: dir,
        })
    }
}

/// A broker connection to the head on `port` with its join token (the CA pinned), as a node
/// would make it.
pub async fn head_broker(
    port: u16,
) -> Result<distributed_computing::RedisBroker, Box<dyn std::error::Error>> {
    let token = head_token(port).ok_or("no join token for this port")?;
    let token = distributed_computing::JoinToken::parse(&token)?;
    let url =
        distributed_computing::redis_url_as("127.0.0.1", token.port, &token.user, &token.secret);
    let options = distributed_computing::RedisOptions {
        tls: token
            .ca_sha256
            .map(distributed_computing::TlsTrust::PinnedCa),
        ..Default::default()
    };
    Ok(distributed_computing::RedisBroker::connect(&url, options).await?)
}

/// Run this executable as the CLI (role `cli`) to completion, with `args`, extra `env`, and
/// `env_remove` removed; (exit status, stdout, stderr).
pub async fn run_cli(
    args: &[&str],
    env: &[(&str, &str)],
    env_remove: &[&str],
    cwd: Option<&Path>,
) -> Result<(std::process::ExitStatus, String, String), Box<dyn std::error::Error>> {
    let mut cmd = tokio::process::Command::new(std::env::current_exe()?);
    cmd.env(ROLE, "cli")
        .env("DC_LOG", "info")
        .env("DC_KNOWN_HEADS", known_heads())
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    for k in env_remove {
        cmd.env_remove(k);
    }
    if let Some(cwd) = cwd {
        cmd.current_dir(cwd);
    }
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .map_err(|_| format!("the CLI {args:?} did not finish within 60 s"))??;
    Ok((
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Collect a child's stdout and stderr, line by line, as it runs.
fn collect_output(
    child: &mut tokio::process::Child,
) -> (Arc<Mutex<Vec<String>>>, Vec<tokio::task::JoinHandle<()>>) {
    let output = Arc::new(Mutex::new(Vec::new()));
    let mut readers = Vec::new();
    for stream in [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let output = output.clone();
        readers.push(tokio::spawn(async move {
            let mut lines = BufReader::new(stream).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                output.lock().expect("output lock").push(line);
            }
        }));
    }
    (output, readers)
}
