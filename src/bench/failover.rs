//! W5: two node processes (this executable's `start-node`) on the dedicated server; the one
//! running a 2 s job is killed with SIGKILL, and the time until its result arrives from the
//! other node is the figure, with the default lease and with a short one.

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dc_broker_redis::redis_url_as;
use dc_broker_redis::server::NODE_USER;
use dc_core::BoxError;
use dc_core::testing::support::TempDir;

use super::report::{Report, Row};
use super::server::{Server, redis_broker};
use super::worker::{BenchJob, BenchOutput, BenchWorker, unix_ms};
use super::workloads::wait_workers;
use crate::Pool;

/// For W5: the dedicated server's port and password (node processes join it).
#[derive(Debug, Clone, Copy)]
pub(super) struct Failover<'a> {
    pub(super) port: u16,
    pub(super) password: &'a str,
}

/// A node process (`start-node`) running this executable, killed when dropped.
#[derive(Debug)]
pub(super) struct NodeProc {
    pub(super) child: tokio::process::Child,
    pub(super) _dir: TempDir,
}

impl NodeProc {
    pub(super) fn start(f: Failover<'_>, heartbeat_ms: Option<u64>) -> Result<Self, BoxError> {
        let dir = TempDir::new("bench-node")?;
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

    pub(super) async fn stop(&mut self) {
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
pub(super) async fn failover_workloads(
    report: &mut Report,
    f: Failover<'_>,
) -> Result<(), BoxError> {
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

pub(super) async fn failover_once(
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
        let marks = TempDir::new("bench-marks")?;
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
