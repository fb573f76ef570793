//! The command line shared by `dc-cli` and a user's own node binary (`main_with`).
//!
//! Every flag also has a `DC_*` environment form and a `dc.toml` form, merged by figment:
//! defaults, then the config file, then the environment, then the flags.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use dc_core::Registry;
use dc_core::agent::WorkerCommand;
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

use crate::node::{
    HeadOptions, NodeError, NodeOptions, NodeProcess, ServerOptions, default_state_dir,
    node_pid_checked, start_head_node, start_node, start_server,
};

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

#[derive(Debug, Args)]
struct Bench {
    /// Where to run: local (no server), redis (a dedicated redis-server started for the run),
    /// or a redis:// URL of an existing Redis (keys under a unique prefix, removed after).
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
    /// CA certificate file (PEM) that a rediss:// broker's certificate must chain to (default:
    /// the system's roots).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_ca: Option<PathBuf>,
    /// Use an existing broker by URL instead of a head node (redis://…, rediss://…).
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

/// The merged configuration (file + environment + flags).
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct Config {
    address: String,
    port: u16,
    password: Option<String>,
    password_file: Option<PathBuf>,
    token: Option<String>,
    token_file: Option<PathBuf>,
    no_tls: bool,
    tls_ca: Option<PathBuf>,
    broker: Option<String>,
    head: bool,
    server_only: bool,
    cpu_workers: usize,
    gpus: String,
    workers_per_gpu: usize,
    state_dir: Option<PathBuf>,
    bind: String,
    heartbeat_ms: u64,
    /// Worker kinds served by external programs: kind = ["program", "arg", …].
    external_workers: BTreeMap<String, Vec<String>>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            address: "localhost".into(),
            port: dc_core::DEFAULT_PORT,
            password: None,
            password_file: None,
            token: None,
            token_file: None,
            no_tls: false,
            tls_ca: None,
            broker: None,
            head: false,
            server_only: false,
            cpu_workers: 0,
            gpus: "auto".into(),
            workers_per_gpu: 1,
            state_dir: None,
            bind: "*,-::*".into(),
            heartbeat_ms: 1000,
            external_workers: BTreeMap::new(),
        }
    }
}

/// The keys a config file may set (the fields of [`Config`]).
const CONFIG_KEYS: &[&str] = &[
    "address",
    "port",
    "password",
    "password_file",
    "token",
    "token_file",
    "no_tls",
    "tls_ca",
    "broker",
    "head",
    "server_only",
    "cpu_workers",
    "gpus",
    "workers_per_gpu",
    "state_dir",
    "bind",
    "heartbeat_ms",
    "external_workers",
];

/// The config file to read: `--config` (which must be a file), else `./dc.toml` if there is
/// one (in this directory only).
fn config_file(given: Option<&PathBuf>) -> Result<Option<PathBuf>, String> {
    let (path, explicit) = match given {
        Some(path) => (path.clone(), true),
        None => (PathBuf::from("dc.toml"), false),
    };
    match std::fs::metadata(&path) {
        Ok(meta) if meta.is_file() => Ok(Some(path)),
        Ok(_) => Err(format!(
            "config file {} is not a file (a directory?): pass --config FILE.toml",
            path.display()
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(format!("config file {} does not exist", path.display()))
        }
        Err(e) => Err(format!("config file {}: {e}", path.display())),
    }
}

/// Parse a config file's text, refusing keys that configure nothing.
fn config_file_provider(
    path: &std::path::Path,
    text: &str,
) -> Result<figment::providers::Data<Toml>, String> {
    let table: BTreeMap<String, figment::value::Value> = Figment::from(Toml::string(text))
        .extract()
        .map_err(|e| format!("config file {}: {e}", path.display()))?;
    if let Some(key) = table.keys().find(|k| !CONFIG_KEYS.contains(&k.as_str())) {
        return Err(format!(
            "config file {}: unknown key {key:?} (known keys: {})",
            path.display(),
            CONFIG_KEYS.join(", ")
        ));
    }
    Ok(Toml::string(text))
}

impl Config {
    fn load(flags: &impl Serialize, config_file: Option<&PathBuf>) -> Result<Self, String> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        let file = self::config_file(config_file)?;
        if let Some(path) = &file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("config file {}: {e}", path.display()))?;
            figment = figment.merge(config_file_provider(path, &text)?);
            let shown = std::path::absolute(path).unwrap_or_else(|_| path.clone());
            tracing::info!(file = %shown.display(), "configuration file loaded");
        }
        figment = figment
            .merge(Env::prefixed("DC_").only(&[
                "address",
                "port",
                "password",
                "password_file",
                "token",
                "token_file",
                "no_tls",
                "tls_ca",
                "broker",
                "cpu_workers",
                "gpus",
                "workers_per_gpu",
                "state_dir",
                "bind",
                "heartbeat_ms",
            ]))
            .merge(Serialized::defaults(flags));
        figment.extract().map_err(|e| match &file {
            Some(path) => format!("configuration (file {}): {e}", path.display()),
            None => format!("configuration: {e}"),
        })
    }

    /// The password, if one is given (flag, environment, config, or file).
    fn password(&self) -> Result<Option<String>, String> {
        if let Some(p) = &self.password {
            return Ok(Some(p.clone()));
        }
        if let Some(file) = &self.password_file {
            return Ok(Some(read_secret_file(file, "password")?));
        }
        Ok(None)
    }

    /// The join token, if one is given.
    fn token(&self) -> Result<Option<String>, String> {
        if let Some(t) = &self.token {
            return Ok(Some(t.trim().to_string()));
        }
        if let Some(file) = &self.token_file {
            return Ok(Some(read_secret_file(file, "join token")?));
        }
        Ok(None)
    }

    /// How a node or `status` reaches the pool server.
    fn target(&self) -> Result<dc_core::NetworkTarget, String> {
        let password = self.password()?;
        let token = self.token()?;
        if password.is_none() && token.is_none() && self.broker.is_none() {
            return Err(
                "no join token and no password: pass --token-file FILE (a copy of the head's join-token), DC_TOKEN, --password-file FILE or DC_PASSWORD".into(),
            );
        }
        Ok(dc_core::NetworkTarget {
            address: self.address.clone(),
            // With a token, -a replaces the token's addresses; the default does not.
            address_set: self.address != Config::default().address,
            port: self.port,
            password,
            token,
            tls: !self.no_tls,
            tls_ca: self.tls_ca.clone(),
            known_heads: None,
            url: self.broker.clone(),
            connect_timeout: Duration::from_secs(5),
        })
    }

    fn state_dir(&self) -> Result<PathBuf, String> {
        match &self.state_dir {
            Some(dir) => Ok(dir.clone()),
            None => default_state_dir().map_err(|e| e.to_string()),
        }
    }
}

/// The first line of a password or token file (at most 64 KiB read), with a warning when
/// group or others may read it.
fn read_secret_file(file: &std::path::Path, what: &str) -> Result<String, String> {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    let opened = std::fs::File::open(file)
        .map_err(|e| format!("cannot read {what} file {}: {e}", file.display()))?;
    if let Ok(meta) = opened.metadata()
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            file = %file.display(),
            mode = format!("{:o}", meta.permissions().mode() & 0o777),
            "the {what} file can be read by other users of this machine: chmod 600 it"
        );
    }
    let mut text = String::new();
    opened
        .take(64 << 10)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read {what} file {}: {e}", file.display()))?;
    Ok(text.lines().next().unwrap_or_default().trim().to_string())
}

/// A warning for a password short enough to guess: how long guessing would take at the rate
/// one connection can try passwords against a Redis server.
fn weak_password_warning(password: &str) {
    const GUESSES_PER_SECOND: f64 = 70_000.0;
    let n = password.chars().count();
    if n >= 16 {
        return;
    }
    let alphabet = if password.chars().all(|c| c.is_ascii_digit()) {
        10.0
    } else if password.chars().all(|c| c.is_ascii_lowercase()) {
        26.0
    } else {
        94.0
    };
    let seconds = f64::powi(alphabet, n as i32) / GUESSES_PER_SECOND;
    let shown = if seconds < 120.0 {
        format!("{seconds:.0} seconds")
    } else if seconds < 2.0 * 3600.0 {
        format!("{:.0} minutes", seconds / 60.0)
    } else if seconds < 2.0 * 86400.0 {
        format!("{:.0} hours", seconds / 3600.0)
    } else if seconds < 2.0 * 365.0 * 86400.0 {
        format!("{:.0} days", seconds / 86400.0)
    } else {
        format!("{:.0} years", seconds / (365.0 * 86400.0))
    };
    tracing::warn!(
        "the pool password has {n} characters: one connection guessing {GUESSES_PER_SECOND:.0} passwords a second tries them all within {shown}; use 16 or more, or start the head without a password and join with its token"
    );
}

/// Run the whole CLI for a node binary whose workers are in `registry`: `start-node`,
/// `status`, `stop`, `devices`, `bench`, plus the hidden worker-process mode nodes spawn. Same
/// flags as `dc-cli`. It also registers the benchmark's no-op worker kind, `"__dc-bench"`
/// (a reserved name: registering another kind under it panics).
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
    init_tracing(if matches!(cli.command, Command::Bench(_)) {
        "warn"
    } else {
        "info"
    });
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
            Command::StartNode(cmd) => run_start_node(cmd, &program).await,
            Command::Status(cmd) => run_status(cmd).await,
            Command::Stop(cmd) => run_stop(cmd).await,
            Command::Devices(cmd) => run_devices(cmd),
            Command::Bench(cmd) => {
                crate::bench::run(&cmd.broker, cmd.quick, cmd.json, cmd.tls).await
            }
            Command::Token(TokenCommand::Show(cmd)) => run_token_show(cmd),
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
    let filter = tracing_subscriber::EnvFilter::try_from_env("DC_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}

async fn run_start_node(cmd: StartNode, program: &str) -> Result<ExitCode, String> {
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

fn run_token_show(cmd: TokenShow) -> Result<ExitCode, String> {
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

#[derive(Debug, Serialize)]
struct StatusReport {
    server: String,
    nodes: Vec<NodeReport>,
    pool: Option<PoolReport>,
}

#[derive(Debug, Serialize)]
struct NodeReport {
    node: String,
    host: String,
    devices: Vec<String>,
    slots: usize,
    busy: usize,
    idle: usize,
    starting: usize,
    /// Slots with no pool to serve (no worker process runs for them).
    waiting: usize,
    last_heartbeat_ms: u128,
}

#[derive(Debug, Serialize)]
struct PoolReport {
    session: String,
    kind: String,
    owner: String,
    workers: usize,
    nodes: usize,
    queued: usize,
    running: usize,
    done: usize,
    failed: usize,
}

async fn run_status(cmd: Status) -> Result<ExitCode, String> {
    let config = Config::load(&cmd.connection, cmd.connection.config.as_ref())?;
    let target = config.target()?;
    let broker = crate::backends::connect_target(&target)
        .await
        .map_err(|e| e.to_string())?;
    let seen = broker
        .nodes(Duration::from_secs(60))
        .await
        .map_err(|e| e.to_string())?;
    let nodes = seen
        .iter()
        .map(|n| {
            let serving = || n.status.workers.iter().filter(|w| w.session.is_some());
            let count = |state| serving().filter(|w| w.state == state).count();
            NodeReport {
                node: n.status.node.to_string(),
                host: n.status.host.clone(),
                devices: n
                    .status
                    .workers
                    .iter()
                    .flat_map(|w| w.devices.iter().cloned())
                    .collect(),
                slots: n.status.workers.len(),
                busy: count(dc_core::broker::WorkerState::Busy),
                idle: count(dc_core::broker::WorkerState::Idle),
                starting: count(dc_core::broker::WorkerState::Starting),
                waiting: n.status.workers.len() - serving().count(),
                last_heartbeat_ms: n.ago.as_millis(),
            }
        })
        .collect();
    let pool = match broker
        .active_session(Duration::ZERO)
        .await
        .map_err(|e| e.to_string())?
    {
        Some(info) => {
            let stats = broker
                .session_stats(&info.id)
                .await
                .map_err(|e| e.to_string())?;
            Some(PoolReport {
                session: info.id.to_string(),
                kind: info.spec.kind.clone(),
                owner: info.spec.owner.clone(),
                workers: stats.workers,
                nodes: stats.nodes,
                queued: stats.queued,
                running: stats.running,
                done: stats.done,
                failed: stats.failed,
            })
        }
        None => None,
    };
    let report = StatusReport {
        server: match &target.url {
            Some(url) => dc_core::redact_url(url),
            None => format!("{}:{}", target.address, target.port),
        },
        nodes,
        pool,
    };
    if cmd.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?
        );
    } else {
        print_status(&report, &mut std::io::stdout().lock())
            .map_err(|e| format!("cannot print the status: {e}"))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `s` safe to print on a terminal: control characters (escape sequences, newlines, carriage
/// returns) and the invisible bidirectional-text controls are shown escaped (`\u{1b}`), so a
/// node or host name read from the broker cannot drive the terminal or disguise a line.
fn printable(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        let invisible = matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}');
        if c.is_control() || invisible {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

fn print_status(report: &StatusReport, out: &mut impl std::io::Write) -> std::io::Result<()> {
    writeln!(out, "server: {}", printable(&report.server))?;
    writeln!(out, "nodes: {}", report.nodes.len())?;
    if !report.nodes.is_empty() {
        writeln!(
            out,
            "  {:<28} {:<20} {:>5} {:>5} {:>5} {:>8} {:>7} {:>9}  devices",
            "node", "host", "slots", "busy", "idle", "starting", "no pool", "heartbeat"
        )?;
        for n in &report.nodes {
            let devices: Vec<String> = n.devices.iter().map(|d| printable(d)).collect();
            writeln!(
                out,
                "  {:<28} {:<20} {:>5} {:>5} {:>5} {:>8} {:>7} {:>7}ms  {}",
                printable(&n.node),
                printable(&n.host),
                n.slots,
                n.busy,
                n.idle,
                n.starting,
                n.waiting,
                n.last_heartbeat_ms,
                if devices.is_empty() {
                    "cpu".to_string()
                } else {
                    devices.join(",")
                }
            )?;
        }
    }
    match &report.pool {
        Some(p) => {
            writeln!(
                out,
                "pool: {} (worker kind \"{}\", opened by {})",
                printable(&p.session),
                printable(&p.kind),
                printable(&p.owner)
            )?;
            writeln!(
                out,
                "  workers {} on {} node(s); jobs queued {}, running {}, done {}, failed {}",
                p.workers, p.nodes, p.queued, p.running, p.done, p.failed
            )?;
        }
        None => writeln!(out, "pool: none active")?,
    }
    Ok(())
}

async fn run_stop(cmd: Stop) -> Result<ExitCode, String> {
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

fn run_devices(cmd: Devices) -> Result<ExitCode, String> {
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

/// A second start in a state dir whose node runs: say so and exit peacefully.
fn already_running(pid: &str, dir: &std::path::Path) -> ExitCode {
    println!(
        "a node is already running here (pid {pid}, state dir {}); nothing to do",
        dir.display()
    );
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_file_key_that_configures_nothing_is_an_error_naming_key_and_file() {
        let path = std::path::Path::new("/etc/dc/dc.toml");
        let error = config_file_provider(path, "cpu_workerz = 4\n")
            .err()
            .expect("unknown key");
        assert!(error.contains("\"cpu_workerz\""), "{error}");
        assert!(error.contains("/etc/dc/dc.toml"), "{error}");
        assert!(
            config_file_provider(path, "cpu_workers = 4\n[external_workers]\nx = [\"y\"]\n")
                .is_ok()
        );
        let error = config_file_provider(path, "cpu_workers = \n")
            .err()
            .expect("bad TOML");
        assert!(error.contains("/etc/dc/dc.toml"), "{error}");
    }

    #[test]
    fn config_must_name_a_file() {
        let dir = std::env::temp_dir();
        let error = config_file(Some(&dir)).expect_err("a directory is refused");
        assert!(error.contains("not a file"), "{error}");
        let missing = dir.join("dc-no-such-config-file.toml");
        let error = config_file(Some(&missing)).expect_err("a missing file is refused");
        assert!(error.contains("does not exist"), "{error}");
    }

    #[test]
    fn printable_escapes_what_would_drive_a_terminal() {
        assert_eq!(printable("node-1.lan"), "node-1.lan");
        assert_eq!(printable("naïve-ノード"), "naïve-ノード");
        assert_eq!(printable("a\u{1b}[2Jb"), "a\\u{1b}[2Jb");
        assert_eq!(printable("x\ny\rz\t"), "x\\ny\\rz\\t");
        assert_eq!(printable("evil\u{202e}txt.exe"), "evil\\u{202e}txt.exe");
        assert_eq!(printable("\u{9b}31m"), "\\u{9b}31m");
    }

    #[test]
    fn status_table_prints_no_control_character_from_the_broker() {
        let evil = "h\u{1b}]0;pwned\u{7}\u{1b}[2J\r\nfake line\u{202e}";
        let report = StatusReport {
            server: format!("redis://{evil}:8899"),
            nodes: vec![NodeReport {
                node: format!("{evil}-1"),
                host: evil.to_string(),
                devices: vec![format!("GPU-{evil}")],
                slots: 1,
                busy: 0,
                idle: 1,
                starting: 0,
                waiting: 0,
                last_heartbeat_ms: 12,
            }],
            pool: Some(PoolReport {
                session: evil.to_string(),
                kind: evil.to_string(),
                owner: evil.to_string(),
                workers: 1,
                nodes: 1,
                queued: 0,
                running: 0,
                done: 0,
                failed: 0,
            }),
        };
        let mut out = Vec::new();
        print_status(&report, &mut out).expect("print to a buffer");
        let text = String::from_utf8(out).expect("utf-8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 6, "{text}");
        assert!(
            !text
                .chars()
                .any(|c| (c.is_control() && c != '\n') || c == '\u{202e}'),
            "{text:?}"
        );
        assert!(text.contains("h\\u{1b}]0;pwned\\u{7}"), "{text}");
    }
}
