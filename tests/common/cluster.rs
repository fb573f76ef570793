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

/// Call first in a cluster test's `main` (after `serve_if_worker`): serves the CLI role.
pub fn serve_cli_role() -> Option<std::process::ExitCode> {
    (std::env::var(ROLE).as_deref() == Ok("cli"))
        .then(|| distributed_computing::main_with_args(std::env::args_os().collect()))
}

pub struct NodeProc {
    pub child: tokio::process::Child,
    output: Arc<Mutex<Vec<String>>>,
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
        let output = Arc::new(Mutex::new(Vec::new()));
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
            tokio::spawn(async move {
                let mut lines = BufReader::new(stream).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    output.lock().expect("output lock").push(line);
                }
            });
        }
        Ok(NodeProc {
            child,
            output,
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
    let port = free_port()?;
    let head = NodeProc::start(
        &[
            "start-node",
            "--head",
            "--bind",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-r",
            PASSWORD,
            "--cpu-workers",
            &cpu_workers.to_string(),
            "--heartbeat-ms",
            "300",
        ],
        &[],
    )
    .await?;
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
    Ok((head, port))
}

pub async fn start_worker_node(
    port: u16,
    cpu_workers: usize,
    env: &[(&str, &str)],
) -> Result<NodeProc, Box<dyn std::error::Error>> {
    NodeProc::start(
        &[
            "start-node",
            "-a",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-r",
            PASSWORD,
            "--cpu-workers",
            &cpu_workers.to_string(),
            "--heartbeat-ms",
            "300",
        ],
        env,
    )
    .await
}

pub async fn pool(port: u16, tag: &str) -> Result<Pool<Probe>, PoolError> {
    Pool::<Probe>::builder(ProbeInit::tagged(tag))
        .address("127.0.0.1")
        .port(port)
        .password(PASSWORD)
        .lease(Duration::from_secs(3))
        .connect()
        .await
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

pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> std::io::Result<Self> {
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("dc-cluster-{name}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(TempDir(dir))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
