//! `stop` (signal the node holding a state dir, and wait until it is gone), `devices` (the
//! GPUs a node here would use) and `token show` (a head's join token).

use std::process::ExitCode;
use std::time::Duration;

use super::status::printable;
use super::{Devices, Stop, TokenShow};
use crate::node::{NodeProcess, default_state_dir, node_pid_checked};

pub(super) fn run_token_show(cmd: TokenShow) -> Result<ExitCode, String> {
    let dir = match cmd.state_dir {
        Some(dir) => dir,
        None => default_state_dir().map_err(|e| e.to_string())?,
    };
    let token = crate::node::read_join_token(&dir)
        .map_err(|e| format!("{e} (is {} the state directory of a head?)", dir.display()))?;
    if cmd.json {
        let json = serde_json::json!({
            "address": token.addresses.first().cloned().unwrap_or_default(),
            "port": token.port,
            "user": token.user,
            "secret": token.secret,
            "ca_sha256": token.ca_sha256.map(|h| dc_broker_redis::tls::hex(&h)),
        });
        println!("{json}");
    } else {
        println!("{token}");
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn run_stop(cmd: Stop) -> Result<ExitCode, String> {
    let dir = match cmd.state_dir {
        Some(dir) => dir,
        None => default_state_dir().map_err(|e| e.to_string())?,
    };
    // Only the process the kernel says holds the node's lock, and that wrote node.pid.
    let pid = match node_pid_checked(&dir) {
        NodeProcess::Running(pid) => pid,
        NodeProcess::Unverified { holder, recorded } => {
            let show = |p: Option<u32>| p.map_or("unknown".to_string(), |p| p.to_string());
            return Err(format!(
                "state dir {}: its lock is held by process {} but node.pid names {}; not signalling anything (stop that process yourself if it is the node)",
                printable(&dir.display().to_string()),
                show(holder),
                show(recorded)
            ));
        }
        _ => {
            println!(
                "no node is running here (state dir {})",
                printable(&dir.display().to_string())
            );
            return Ok(ExitCode::SUCCESS);
        }
    };
    let raw = i32::try_from(pid).map_err(|_| format!("bad pid {pid}"))?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(raw),
        nix::sys::signal::Signal::SIGTERM,
    )
    .map_err(|e| format!("cannot signal node {pid}: {e}"))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while crate::node::is_node_running_in(&dir) {
        if std::time::Instant::now() > deadline {
            return Err(format!("node {pid} did not stop within 30 s"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("node {pid} stopped");
    Ok(ExitCode::SUCCESS)
}

pub(super) fn run_devices(cmd: Devices) -> Result<ExitCode, String> {
    let selection: dc_gpu::GpuSelection = cmd.gpus.parse().map_err(|e| format!("--gpus: {e}"))?;
    let inventory = dc_gpu::discover_with(&dc_gpu::EnvSnapshot::from_process(), &selection);
    for warning in &inventory.warnings {
        eprintln!("warning: {warning}");
    }
    if inventory.gpus.is_empty() {
        println!(
            "no GPUs: {}",
            inventory.cpu_reason.as_deref().unwrap_or("none found")
        );
        println!("a node here runs CPU workers only when asked (--cpu-workers N)");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{} GPU(s), found in {:.1} ms:",
        inventory.gpus.len(),
        inventory.took.as_secs_f64() * 1e3
    );
    for gpu in &inventory.gpus {
        println!(
            "  [{}] {}  {}  {:.0} GiB  bus {}",
            gpu.index,
            gpu.uuid,
            gpu.name,
            gpu.memory_total as f64 / (1u64 << 30) as f64,
            gpu.pci_bus_id
        );
        let env: Vec<String> = dc_gpu::worker_env(Some(gpu))
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        println!("      worker env: {}", env.join(" "));
    }
    Ok(ExitCode::SUCCESS)
}
