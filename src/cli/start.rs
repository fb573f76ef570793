//! `start-node`: a worker node (`-a HEAD`), a head node (`--head`: a pool server and a worker
//! node), or a pool server only (`--server-only`), each running until SIGTERM or Ctrl-C.
//!
//! 1. The configuration is merged and checked (GPUs, state dir, bind list, external workers).
//! 2. The signal handlers are installed before anything waits, so a stop is prompt.
//! 3. A head or a pool server prints how to start worker nodes (the token file, never the
//!    password); a worker node waits for its server as long as nothing answers there.
//! 4. A second start in a state dir whose node runs says so and exits peacefully.

use std::process::ExitCode;
use std::time::Duration;

use dc_core::agent::WorkerCommand;

use super::StartNode;
use super::config::{Config, weak_password_warning};
use crate::node::{
    HeadOptions, NodeError, NodeOptions, ServerOptions, start_head_node, start_node, start_server,
};

pub(super) async fn run_start_node(cmd: StartNode, program: &str) -> Result<ExitCode, String> {
    let config = Config::load(&cmd, cmd.connection.config.as_ref())?;
    let gpus: dc_gpu::GpuSelection = config.gpus.parse().map_err(|e| format!("--gpus: {e}"))?;
    let state_dir = config.state_dir()?;
    // Every entry is checked before it reaches redis.conf (ServerOptions); a blank one too.
    let bind: Vec<String> = config.bind.split(',').map(str::to_string).collect();
    // Installed before anything waits, so a stop while the node waits for its server is prompt.
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let mut node = NodeOptions::new("")
        .gpus(gpus)
        .workers_per_gpu(config.workers_per_gpu)
        .cpu_workers(config.cpu_workers)
        .state_dir(state_dir.clone())
        .heartbeat(Duration::from_millis(config.heartbeat_ms));
    for (kind, argv) in &config.external_workers {
        let Some((program, args)) = argv.split_first() else {
            return Err(format!("external_workers.{kind}: empty command"));
        };
        node = node.external_worker(
            kind.clone(),
            WorkerCommand {
                program: program.into(),
                args: args.iter().map(Into::into).collect(),
            },
        );
    }

    if (config.server_only || config.head)
        && (config.token.is_some() || config.token_file.is_some())
    {
        return Err("a head makes its own join token: pass no --token to --head or --server-only (see `dc-cli token show`)".into());
    }
    let password = config.password()?;
    if let Some(p) = &password
        && (config.server_only || config.head)
    {
        weak_password_warning(p);
    }
    let server_options = || {
        let options = ServerOptions::new(password.clone().unwrap_or_default())
            .port(config.port)
            .bind(bind.clone())
            .state_dir(state_dir.clone());
        if config.no_tls {
            options.no_tls()
        } else {
            options
        }
    };

    if config.server_only {
        let options = server_options();
        let mut server = start_server(options).await.map_err(|e| e.to_string())?;
        if !server.started_here() {
            println!(
                "a pool server already runs on port {}; nothing to do",
                config.port
            );
            return Ok(ExitCode::SUCCESS);
        }
        print_worker_command(program, server.join_token(), &state_dir, password.is_some());
        tokio::select! {
            r = server.wait() => r.map_err(|e| e.to_string())?,
            _ = &mut shutdown => server.terminate().await.map_err(|e| e.to_string())?,
        }
        return Ok(ExitCode::SUCCESS);
    }

    if config.head {
        let mut options = HeadOptions::new(password.clone().unwrap_or_default())
            .port(config.port)
            .bind(bind.clone())
            .state_dir(state_dir.clone());
        options.server = server_options();
        options = options.node(|_| node);
        let started = tokio::select! {
            started = start_head_node(options) => started,
            _ = &mut shutdown => return Ok(ExitCode::SUCCESS),
        };
        let mut head = match started {
            Ok(head) => head,
            Err(NodeError::AlreadyRunning { pid, dir }) => return Ok(already_running(&pid, &dir)),
            Err(e) => return Err(e.to_string()),
        };
        print_worker_command(
            program,
            head.server().join_token(),
            &state_dir,
            password.is_some(),
        );
        tokio::select! {
            r = head.wait() => r.map_err(|e| e.to_string())?,
            _ = &mut shutdown => head.terminate().await.map_err(|e| e.to_string())?,
        }
        return Ok(ExitCode::SUCCESS);
    }

    // Waits for the pool server while it is not up (start order does not matter).
    node.target = config.target()?;
    let started = tokio::select! {
        started = start_node(node) => started,
        _ = &mut shutdown => return Ok(ExitCode::SUCCESS),
    };
    let mut handle = match started {
        Ok(handle) => handle,
        Err(NodeError::AlreadyRunning { pid, dir }) => return Ok(already_running(&pid, &dir)),
        Err(e) => return Err(e.to_string()),
    };
    tokio::select! {
        r = handle.wait() => r.map_err(|e| e.to_string())?,
        _ = &mut shutdown => handle.terminate().await.map_err(|e| e.to_string())?,
    }
    Ok(ExitCode::SUCCESS)
}

/// SIGTERM or Ctrl-C, the handlers installed now (not when first polled).
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let handlers = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    async move {
        let (Ok(mut term), Ok(mut int)) = handlers else {
            // Without signal handlers the node still stops when killed; wait forever here.
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping"),
            _ = int.recv() => tracing::info!("interrupted: stopping"),
        }
    }
}

/// The banner: how to start a worker node. It names the token file (and, once, shows the
/// token), never the password.
fn print_worker_command(
    program: &str,
    token: &dc_broker_redis::token::JoinToken,
    state_dir: &std::path::Path,
    with_password: bool,
) {
    let address = token
        .addresses
        .first()
        .cloned()
        .unwrap_or_else(crate::node::reachable_address);
    let port = token.port;
    let file = state_dir.join(crate::node::JOIN_TOKEN_FILE);
    let line = "*".repeat(90);
    println!("{line}");
    println!(
        "To start a worker node, copy {} to the worker machine (keep it private), then type:",
        file.display()
    );
    println!("{program} start-node -p {port} -a {address} --token-file join-token");
    if with_password {
        println!("or, with the pool password in DC_PASSWORD or a file:");
        println!("{program} start-node -p {port} -a {address} --password-file FILE");
    } else {
        println!(
            "or pass the token itself in DC_TOKEN (shown once; `{program} token show` prints it again):"
        );
        println!("DC_TOKEN={token}");
    }
    println!("{line}");
}

/// A second start in a state dir whose node runs: say so and exit peacefully.
fn already_running(pid: &str, dir: &std::path::Path) -> ExitCode {
    println!(
        "a node is already running here (pid {pid}, state dir {}); nothing to do",
        dir.display()
    );
    ExitCode::SUCCESS
}
