//! The command line shared by `dc-cli` and a user's own node binary (`main_with`).
//!
//! Every flag also has a `DC_*` environment form and a `dc.toml` form, merged by figment:
//! defaults, then the config file, then the environment, then the flags.
//!
//! - this file: the clap types and [`main_with`] / [`main_with_args`], which dispatch;
//! - `config`: the merged configuration (file, environment, flags) and the secrets it names;
//! - `start`: `start-node` (worker node, head node, or pool server only);
//! - `status`: `status`, as a table or JSON;
//! - `commands`: `stop`, `devices` and `token show`.

mod commands;
mod config;
mod start;
mod status;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use dc_core::Registry;
use serde::Serialize;

#[derive(Debug, Parser)]
#[command(
    name = "dc-cli",
    version,
    about = "Distributed GPU computations made easy: start nodes, see the pool, stop nodes.",
    after_help = "Every flag can also come from DC_<FLAG> (e.g. DC_PASSWORD, DC_CPU_WORKERS) or from a dc.toml config file (--config)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a node here: a worker node (-a HEAD), a head node (--head: pool server plus a
    /// worker node), or a pool server only (--server-only). Runs until stopped.
    StartNode(StartNode),
    /// Show the nodes, their workers, and the active pool.
    Status(Status),
    /// Stop the node running here (this state directory).
    Stop(Stop),
    /// List the GPUs a node here would use, and the environment each worker gets.
    Devices(Devices),
    /// Measure the pool against the broker's own limits (workloads W1–W6, with baselines).
    #[cfg(feature = "bench")]
    Bench(Bench),
    /// The head's join token.
    #[command(subcommand)]
    Token(TokenCommand),
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Print the join token of the head whose state directory this is (it holds the secret).
    Show(TokenShow),
}

#[derive(Debug, Args)]
struct TokenShow {
    /// The head's state directory.
    #[arg(long, env = "DC_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Print a JSON object with the token's fields instead of the token.
    #[arg(long)]
    json: bool,
}

#[cfg(feature = "bench")]
#[derive(Debug, Args)]
struct Bench {
    /// Where to run: local (no server), redis (a dedicated redis-server started for the run),
    /// a redis:// URL of an existing Redis (keys under a unique prefix, removed after), or an
    /// amqp:// URL of a RabbitMQ (queues under a unique namespace, removed after).
    #[arg(long, default_value = "redis")]
    broker: String,
    /// Smaller workloads (under a minute on a 2-core machine).
    #[arg(long)]
    quick: bool,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    json: bool,
    /// Also run the baselines and W1–W4 on a second dedicated server whose port speaks TLS
    /// (as a head's does by default); their rows carry `_tls` metrics (with --broker redis).
    #[arg(long)]
    tls: bool,
}

/// Flags shared by commands that reach a pool server.
#[derive(Debug, Args, Serialize, Default)]
struct Connection {
    /// Address of the head node (pool server).
    #[arg(short = 'a', long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    address: Option<String>,
    /// Pool port.
    #[arg(short = 'p', long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    port: Option<u16>,
    /// Pool password (prefer --password-file or DC_PASSWORD: flags show in `ps`).
    #[arg(short = 'r', long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    password: Option<String>,
    /// Read the password from this file (first line).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    password_file: Option<PathBuf>,
    /// Join token (`dc1:…`) of the head (prefer --token-file or DC_TOKEN: flags show in `ps`).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<String>,
    /// Read the join token from this file (a copy of the head's `<state-dir>/join-token`).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    token_file: Option<PathBuf>,
    /// Plain Redis instead of TLS: for a head, serve it (a trusted network only); for a node,
    /// `status` or a pool, speak it to a head started with --no-tls.
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    no_tls: bool,
    /// CA certificate file (PEM) that a rediss:// or amqps:// broker's certificate must chain to (default:
    /// the system's roots).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_ca: Option<PathBuf>,
    /// Use an existing broker by URL instead of a head node (redis://…, rediss://…, amqp://…,
    /// amqps://…).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    broker: Option<String>,
    /// Config file (TOML); default: ./dc.toml when it exists.
    #[arg(long)]
    #[serde(skip)]
    config: Option<PathBuf>,
}

#[derive(Debug, Args, Serialize)]
struct StartNode {
    #[command(flatten)]
    #[serde(flatten)]
    connection: Connection,
    /// Start a head node: the pool server (redis-server) and a worker node.
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    head: bool,
    /// Start only the pool server, no local workers.
    #[arg(long, conflicts_with = "head")]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    server_only: bool,
    /// CPU worker processes when there is no GPU (default 0).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    cpu_workers: Option<usize>,
    /// GPUs to use: auto, none, or a list of indices or UUID prefixes.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    gpus: Option<String>,
    /// Worker processes per GPU.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    workers_per_gpu: Option<usize>,
    /// State directory (one node per state dir).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    state_dir: Option<PathBuf>,
    /// Addresses the pool server listens on (head / server-only), comma-separated.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    bind: Option<String>,
    /// Heartbeat period in milliseconds.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    heartbeat_ms: Option<u64>,
}

#[derive(Debug, Args)]
struct Status {
    #[command(flatten)]
    connection: Connection,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct Stop {
    /// State directory of the node to stop.
    #[arg(long, env = "DC_STATE_DIR")]
    state_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct Devices {
    /// GPUs to use: auto, none, or a list of indices or UUID prefixes.
    #[arg(long, default_value = "auto")]
    gpus: String,
}

/// Run the whole CLI for a node binary whose workers are in `registry`: `start-node`,
/// `status`, `stop`, `devices`, `token show`, plus the hidden worker-process mode nodes spawn.
/// Same flags as `dc-cli`. With the `bench` feature it also has `bench`, and registers the
/// benchmark's no-op worker kind, `"__dc-bench"` (a reserved name: registering another kind
/// under it panics).
///
/// # Examples
/// ```no_run
/// use distributed_computing::Registry;
/// fn main() -> std::process::ExitCode {
///     distributed_computing::main_with(Registry::new() /* .register::<MyWorker>() */)
/// }
/// ```
pub fn main_with(registry: Registry) -> ExitCode {
    // Every node binary serves the benchmark's no-op kind, so `dc-cli bench` can use it.
    #[cfg(feature = "bench")]
    let registry = registry.register::<crate::bench::BenchWorker>();
    registry.serve_if_worker();
    main_with_args(std::env::args_os().collect())
}

/// [`main_with`] with explicit arguments (`args[0]` is the program name). The registry must
/// already have served (`serve_if_worker`).
pub fn main_with_args(args: Vec<std::ffi::OsString>) -> ExitCode {
    let cli = match Cli::try_parse_from(&args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    // The benchmark's own table is the output: its nodes and pools log warnings only.
    #[cfg(feature = "bench")]
    let quiet = matches!(cli.command, Command::Bench(_));
    #[cfg(not(feature = "bench"))]
    let quiet = false;
    init_tracing(if quiet { "warn" } else { "info" });
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let program = args
        .first()
        .map(|a| {
            PathBuf::from(a)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "dc-cli".into())
        })
        .unwrap_or_else(|| "dc-cli".into());
    let result = runtime.block_on(async move {
        match cli.command {
            Command::StartNode(cmd) => start::run_start_node(cmd, &program).await,
            Command::Status(cmd) => status::run_status(cmd).await,
            Command::Stop(cmd) => commands::run_stop(cmd).await,
            Command::Devices(cmd) => commands::run_devices(cmd),
            #[cfg(feature = "bench")]
            Command::Bench(cmd) => {
                crate::bench::run(&cmd.broker, cmd.quick, cmd.json, cmd.tls).await
            }
            Command::Token(TokenCommand::Show(cmd)) => commands::run_token_show(cmd),
        }
    });
    match result {
        Ok(code) => code,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(default: &str) {
    let mut filter = tracing_subscriber::EnvFilter::try_from_env("DC_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // The RabbitMQ client logs, as warnings and errors, what the backend asks for on purpose
    // and handles itself: a request to a session queue that does not exist comes back, and a
    // second pool's claim of the session lock is refused. Its other messages stay.
    for quiet in ["lapin::returned_messages=off", "lapin::channel=off"] {
        if let Ok(directive) = quiet.parse() {
            filter = filter.add_directive(directive);
        }
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bench_command_exists_only_with_the_bench_feature() {
        let parsed = Cli::try_parse_from(["dc-cli", "bench", "--quick"]);
        assert_eq!(parsed.is_ok(), cfg!(feature = "bench"), "{parsed:?}");
        assert!(Cli::try_parse_from(["dc-cli", "devices"]).is_ok());
    }
}
