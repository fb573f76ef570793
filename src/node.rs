//! Nodes, servers and heads, from code: `start_node`, `start_head_node`, `start_server`,
//! `start_redis`, `is_server_running`, `is_node_running`. The CLI maps onto these 1:1.

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use dc_broker_redis::server::{RedisProcess, RedisServerOptions, start_redis_server};
use dc_broker_redis::token::{JoinToken, NODE_USER};
use dc_core::agent::{AgentConfig, AgentHandle, SlotSpec, WorkerCommand, host_name, spawn_agent};
use dc_core::broker::NodeId;
use dc_core::{Broker, DEFAULT_PORT, NetworkTarget, PoolError, Registry};
use dc_gpu::GpuSelection;

pub use dc_broker_redis::server::ServerError;

/// Why a node, server or head could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// Another node already runs with this state directory (not an error for the CLI, which
    /// exits peacefully).
    #[error("a node is already running here (pid {pid}, state dir {dir})")]
    AlreadyRunning {
        /// Its pid, if recorded.
        pid: String,
        /// The state directory.
        dir: PathBuf,
    },
    /// The pool server (redis-server) could not start.
    #[error(transparent)]
    Server(#[from] ServerError),
    /// The broker could not be reached or refused us.
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// The options are wrong; the message says how.
    #[error("{0}")]
    Config(String),
    /// The state directory could not be used.
    #[error("state dir {dir}: {source}")]
    StateDir {
        /// The directory.
        dir: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// The state directory used when none is given: `$DC_STATE_DIR`, else
/// `$XDG_STATE_HOME/distributed-computing`, else `$HOME/.local/state/distributed-computing`.
/// There is no shared fallback (a fixed folder under the temp dir could be planted by another
/// user).
///
/// # Errors
/// [`NodeError::Config`] when none of those is set to an absolute path.
///
/// # Examples
/// ```
/// let dir = distributed_computing::default_state_dir();
/// assert!(dir.map(|d| d.is_absolute()).unwrap_or(true));
/// ```
pub fn default_state_dir() -> Result<PathBuf, NodeError> {
    let absolute = |name: &str| {
        std::env::var_os(name)
            .map(PathBuf::from)
            .filter(|d| d.is_absolute())
    };
    if let Some(dir) = std::env::var_os("DC_STATE_DIR").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    if let Some(dir) = absolute("XDG_STATE_HOME") {
        return Ok(dir.join("distributed-computing"));
    }
    if let Some(home) = absolute("HOME") {
        return Ok(home.join(".local/state/distributed-computing"));
    }
    Err(NodeError::Config(
        "no state directory: neither XDG_STATE_HOME nor HOME is set to an absolute path; pass --state-dir DIR (or DC_STATE_DIR)".into(),
    ))
}

/// How to start a worker node.
#[derive(Clone)]
pub struct NodeOptions {
    /// Where the pool server is and how to log in and trust it.
    pub(crate) target: NetworkTarget,
    pub(crate) gpus: GpuSelection,
    pub(crate) workers_per_gpu: usize,
    pub(crate) cpu_workers: usize,
    pub(crate) worker_program: Option<PathBuf>,
    pub(crate) kinds: Option<Vec<String>>,
    pub(crate) external: BTreeMap<String, WorkerCommand>,
    pub(crate) state_dir: Option<PathBuf>,
    pub(crate) heartbeat: Duration,
}

impl std::fmt::Debug for NodeOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeOptions")
            .field("target", &self.target)
            .field("gpus", &self.gpus)
            .field("workers_per_gpu", &self.workers_per_gpu)
            .field("cpu_workers", &self.cpu_workers)
            .field("state_dir", &self.state_dir)
            .finish_non_exhaustive()
    }
}

impl NodeOptions {
    /// A node joining the pool server at `localhost:8899` with this password (empty: none;
    /// give a [`Self::token`] then).
    pub fn new(password: impl Into<String>) -> Self {
        let password: String = password.into();
        NodeOptions {
            target: NetworkTarget {
                address: "localhost".into(),
                address_set: false,
                port: DEFAULT_PORT,
                password: (!password.is_empty()).then_some(password),
                token: None,
                tls: true,
                tls_ca: None,
                known_heads: None,
                url: None,
                connect_timeout: Duration::from_secs(5),
            },
            gpus: GpuSelection::Auto,
            workers_per_gpu: 1,
            cpu_workers: 0,
            worker_program: None,
            kinds: None,
            external: BTreeMap::new(),
            state_dir: None,
            heartbeat: Duration::from_secs(1),
        }
    }

    /// The pool server's address (the head node); with a join token, it replaces the token's
    /// addresses.
    pub fn address(mut self, address: impl Into<String>) -> Self {
        self.target.address = address.into();
        self.target.address_set = true;
        self
    }

    /// The pool server's port (default 8899; a join token names its own).
    pub fn port(mut self, port: u16) -> Self {
        self.target.port = port;
        self
    }

    /// An existing broker by URL instead of a head node (`redis://…`, `rediss://…`).
    pub fn broker(mut self, url: impl Into<String>) -> Self {
        self.target.url = Some(url.into());
        self
    }

    /// Join with a token (`dc1:…`, as the head writes it to `<state-dir>/join-token`): the
    /// head's addresses, port, user, secret and CA hash.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.target.token = Some(token.into().trim().to_string());
        self
    }

    /// Speak plain Redis to a head started with `--no-tls`.
    pub fn no_tls(mut self) -> Self {
        self.target.tls = false;
        self
    }

    /// The CA file a `rediss://` broker's certificate must chain to.
    pub fn tls_ca(mut self, path: impl Into<PathBuf>) -> Self {
        self.target.tls_ca = Some(path.into());
        self
    }

    /// The known-heads file that pins a head reached with a password (default:
    /// `DC_KNOWN_HEADS`, else the user's config directory).
    pub fn known_heads(mut self, path: impl Into<PathBuf>) -> Self {
        self.target.known_heads = Some(path.into());
        self
    }

    /// Which GPUs to use (default: every visible one).
    pub fn gpus(mut self, gpus: GpuSelection) -> Self {
        self.gpus = gpus;
        self
    }

    /// Worker processes per GPU (default 1).
    pub fn workers_per_gpu(mut self, n: usize) -> Self {
        self.workers_per_gpu = n.max(1);
        self
    }

    /// CPU worker processes when the node has no GPU (default 0: a CPU box must not silently
    /// take GPU jobs).
    pub fn cpu_workers(mut self, n: usize) -> Self {
        self.cpu_workers = n;
        self
    }

    /// The worker program (default: this executable, which must call `serve_if_worker` or be
    /// built with `main_with`).
    pub fn worker_program(mut self, path: impl Into<PathBuf>) -> Self {
        self.worker_program = Some(path.into());
        self
    }

    /// The kinds the worker program serves (default: those this executable registered).
    pub fn kinds(mut self, kinds: Vec<String>) -> Self {
        self.kinds = Some(kinds);
        self
    }

    /// Serve `kind` with another program speaking the frame protocol (any language).
    pub fn external_worker(mut self, kind: impl Into<String>, command: WorkerCommand) -> Self {
        self.external.insert(kind.into(), command);
        self
    }

    /// The state directory (one node per state dir).
    pub fn state_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.state_dir = Some(dir.into());
        self
    }

    /// How often the node heartbeats, renewing its leases (default 1 s).
    pub fn heartbeat(mut self, period: Duration) -> Self {
        self.heartbeat = period.max(Duration::from_millis(50));
        self
    }

    /// The server, for logs (no secret).
    fn shown_server(&self) -> String {
        match &self.target.url {
            Some(url) => dc_core::redact_url(url),
            None => match self.target.token.as_deref().map(JoinToken::parse) {
                Some(Ok(token)) => {
                    let address = if self.target.address_set {
                        self.target.address.clone()
                    } else {
                        token.addresses.join(",")
                    };
                    format!("{address}:{} (join token)", token.port)
                }
                _ => format!("{}:{}", self.target.address, self.target.port),
            },
        }
    }
}

/// Holds a state directory for one node: released when dropped (or when the process dies).
///
/// 1. The directory is created 0700 (an existing one must be ours and not writable by others).
/// 2. `node.lock` is opened without following a symlink and locked (`flock`, exclusive).
/// 3. `node.pid` is written new (0600, under a temporary name) and renamed into place, so a
///    planted `node.pid` symlink is replaced, never followed.
/// 4. `dc-cli stop` signals a pid only when the kernel says that process holds the lock and
///    `node.pid` names it ([`node_pid`]).
#[derive(Debug)]
struct StateLock {
    _lock: nix::fcntl::Flock<File>,
    dir: PathBuf,
}

/// `open` flags for every file of the state dir: never follow a symlink, never block on a FIFO.
fn no_follow() -> i32 {
    (nix::fcntl::OFlag::O_NOFOLLOW | nix::fcntl::OFlag::O_NONBLOCK).bits()
}

/// Create `dir` (0700) or check that an existing one is a directory of ours that no one else
/// can write to.
fn prepare_state_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let meta = std::fs::metadata(dir)?;
    let refuse = |why: String| {
        Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            why,
        ))
    };
    if !meta.is_dir() {
        return refuse("not a directory".into());
    }
    if effective_uid().is_some_and(|me| meta.uid() != me) {
        return refuse(format!(
            "owned by uid {}, not by this user: use a state dir of your own",
            meta.uid()
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return refuse(format!(
            "writable by other users (mode {:o}): chmod 700 it",
            meta.mode() & 0o7777
        ));
    }
    Ok(())
}

/// This process's effective uid (from `/proc/self/status`).
fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let uids = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    uids.split_whitespace().nth(1)?.parse().ok()
}

/// Open a state-dir file for reading, refusing symlinks and anything but a regular file.
fn open_regular(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(no_follow())
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} is not a regular file", path.display()),
        ));
    }
    Ok(file)
}

/// Write `contents` to `dir/name` as a new 0600 file renamed into place (a symlink or a file
/// already at `name` is replaced, not written through).
pub(crate) fn write_private_file(dir: &Path, name: &str, contents: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let temp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&temp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(no_follow())
        .open(&temp)?;
    let written = file.write_all(contents).and_then(|()| file.sync_all());
    drop(file);
    match written.and_then(|()| std::fs::rename(&temp, dir.join(name))) {
        Ok(()) => Ok(()),
        Err(e) => {
            let _ = std::fs::remove_file(&temp);
            Err(e)
        }
    }
}

/// The pid written in `dir/node.pid`, if it is a regular file holding one.
fn read_pid_file(dir: &Path) -> Option<u32> {
    use std::io::Read;
    let mut text = String::new();
    open_regular(&dir.join("node.pid"))
        .ok()?
        .take(32)
        .read_to_string(&mut text)
        .ok()?;
    text.trim().parse().ok()
}

impl StateLock {
    fn acquire(dir: &Path) -> Result<Self, NodeError> {
        use std::os::unix::fs::OpenOptionsExt;
        let io = |source| NodeError::StateDir {
            dir: dir.to_path_buf(),
            source,
        };
        prepare_state_dir(dir).map_err(io)?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .custom_flags(no_follow())
            .open(dir.join("node.lock"))
            .map_err(io)?;
        if !file.metadata().map_err(io)?.is_file() {
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "node.lock is not a regular file",
            )));
        }
        let lock = match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        {
            Ok(lock) => lock,
            Err((_, _)) => {
                return Err(NodeError::AlreadyRunning {
                    pid: shown_pid(dir),
                    dir: dir.to_path_buf(),
                });
            }
        };
        write_private_file(
            dir,
            "node.pid",
            format!("{}\n", std::process::id()).as_bytes(),
        )
        .map_err(io)?;
        Ok(StateLock {
            _lock: lock,
            dir: dir.to_path_buf(),
        })
    }

    fn is_held(dir: &Path) -> bool {
        let Ok(file) = open_regular(&dir.join("node.lock")) else {
            return false;
        };
        nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).is_err()
    }

    /// The pid of the process holding `dir/node.lock`, as the kernel lists it in `/proc/locks`.
    fn holder(dir: &Path) -> Option<u32> {
        use std::os::unix::fs::MetadataExt;
        let meta = open_regular(&dir.join("node.lock")).ok()?.metadata().ok()?;
        let device = format!(
            "{:02x}:{:02x}:{}",
            nix::sys::stat::major(meta.dev()),
            nix::sys::stat::minor(meta.dev()),
            meta.ino()
        );
        let table = std::fs::read_to_string("/proc/locks").ok()?;
        let flocks: Vec<(u32, &str)> = table
            .lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                // "1: FLOCK  ADVISORY  WRITE 12345 fe:00:10010695 0 EOF"; waiters carry "->".
                match fields.as_slice() {
                    [_, "FLOCK", _, "WRITE", pid, id, ..] => Some((pid.parse().ok()?, *id)),
                    _ => None,
                }
            })
            .collect();
        if let Some((pid, _)) = flocks.iter().find(|(_, id)| *id == device) {
            return Some(*pid);
        }
        // Stacked file systems (overlayfs) may list another device: the inode alone, if unique.
        let inode = format!(":{}", meta.ino());
        let mut same: Vec<u32> = flocks
            .iter()
            .filter(|(_, id)| id.ends_with(&inode))
            .map(|(pid, _)| *pid)
            .collect();
        same.dedup();
        (same.len() == 1).then(|| same[0])
    }
}

/// The pid a running node recorded, for messages.
fn shown_pid(dir: &Path) -> String {
    read_pid_file(dir)
        .map(|pid| pid.to_string())
        .unwrap_or_else(|| "unknown".into())
}

impl Drop for StateLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.dir.join("node.pid"));
    }
}

/// A running node: its agent, its worker processes, its state directory.
#[derive(Debug)]
pub struct NodeHandle {
    agent: AgentHandle,
    node_id: NodeId,
    slots: usize,
    _lock: StateLock,
}

impl NodeHandle {
    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.node_id.0
    }

    /// How many worker slots it runs.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Pids of its worker processes alive now.
    pub fn worker_pids(&self) -> Vec<u32> {
        self.agent.worker_pids()
    }

    /// Stop the node: workers are shut down, held jobs go back to the queue at once.
    ///
    /// # Errors
    /// None today; kept fallible for backends whose goodbye can fail.
    pub async fn terminate(&mut self) -> Result<(), NodeError> {
        self.agent.request_stop();
        self.agent.wait().await;
        Ok(())
    }

    /// Wait until the node stops (after `terminate`, or forever while it serves).
    ///
    /// # Errors
    /// None today; kept fallible like `terminate`.
    pub async fn wait(&mut self) -> Result<(), NodeError> {
        self.agent.wait().await;
        Ok(())
    }
}

/// Start a worker node in this process: one worker process per GPU (or `cpu_workers` CPU
/// workers), serving whatever pool is active on the server.
///
/// A node waits for its server: while nothing answers at the server's address (not started
/// yet, restarting, unreachable), the connection is retried with backoff and jitter and a log
/// line every 10 s, so nodes and heads can start in any order. Drop the future to give up.
///
/// # Errors
/// [`NodeError::AlreadyRunning`] when a node holds the state directory; [`NodeError::Pool`]
/// at once when the server refuses the password or is not a pool server;
/// [`NodeError::Config`] when this executable registered no worker kinds and none were given,
/// or an external worker would replace a registered kind; [`NodeError::StateDir`] when the
/// state directory cannot be used.
pub async fn start_node(options: NodeOptions) -> Result<NodeHandle, NodeError> {
    let dir = match &options.state_dir {
        Some(dir) => dir.clone(),
        None => default_state_dir()?,
    };
    let lock = StateLock::acquire(&dir)?;
    let command = match &options.worker_program {
        Some(path) => WorkerCommand::program(path),
        None => WorkerCommand::current_exe().map_err(|e| {
            NodeError::Config(format!("cannot find this executable to spawn workers: {e}"))
        })?,
    };
    let kinds = options
        .kinds
        .clone()
        .or_else(Registry::served_kinds)
        .unwrap_or_default();
    if kinds.is_empty() && options.external.is_empty() {
        return Err(NodeError::Config(
            "this node has no worker kinds: build the node binary with main_with(Registry::new().register::<YourWorker>()), or configure external workers".into(),
        ));
    }
    if let Some(kind) = options.external.keys().find(|k| kinds.contains(k)) {
        return Err(NodeError::Config(format!(
            "external worker kind {kind:?} is a kind this node binary registers: an external program cannot replace it (give the external kind another name)"
        )));
    }
    let server = options.shown_server();
    let broker = wait_for_server(&options.target, &server).await?;
    let slots = node_slots(&options);
    let node_id = NodeId(format!("{}-{}", host_name(), std::process::id()));
    let mut config = AgentConfig::new(node_id.clone(), command, kinds, slots);
    config.external = options.external.clone();
    config.heartbeat = options.heartbeat;
    let slots = config.slots.len();
    tracing::info!(node = %node_id, %server, slots, state_dir = %dir.display(), "node starting");
    let agent = spawn_agent(broker, config);
    Ok(NodeHandle {
        agent,
        node_id,
        slots,
        _lock: lock,
    })
}

/// How often a node waiting for its server says so.
const WAITING_LOG_PERIOD: Duration = Duration::from_secs(10);

/// Connect to the pool server `target` names, retrying while nothing answers there; a refused
/// password or certificate, a service that is not a pool server, or a bad URL or token fail at
/// once.
async fn wait_for_server(
    target: &NetworkTarget,
    server: &str,
) -> Result<Arc<dyn Broker>, NodeError> {
    let started = Instant::now();
    let mut backoff =
        dc_core::backoff::Backoff::new(Duration::from_millis(100), Duration::from_secs(3));
    let mut last_log: Option<Instant> = None;
    loop {
        match crate::backends::connect_target(target).await {
            Ok(broker) => {
                if last_log.is_some() {
                    tracing::info!(%server, waited_ms = started.elapsed().as_millis(), "pool server reached");
                }
                return Ok(broker);
            }
            Err(PoolError::Unreachable(why)) => {
                if last_log.is_none_or(|t| t.elapsed() >= WAITING_LOG_PERIOD) {
                    tracing::warn!(
                        %server,
                        waited_s = started.elapsed().as_secs(),
                        "waiting for the pool server (start the head, or check -a/-p): {why}"
                    );
                    last_log = Some(Instant::now());
                }
                tokio::time::sleep(backoff.next_pause()).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn node_slots(options: &NodeOptions) -> Vec<SlotSpec> {
    let inventory = dc_gpu::discover(&options.gpus);
    if !inventory.gpus.is_empty() {
        return inventory
            .gpus
            .iter()
            .flat_map(|gpu| {
                std::iter::repeat_n(SlotSpec::for_device(Some(gpu)), options.workers_per_gpu)
            })
            .collect();
    }
    if options.cpu_workers == 0 {
        tracing::warn!(
            "no GPU here and no CPU workers asked for: this node runs no workers (pass --cpu-workers N, or NodeOptions::cpu_workers, to run jobs on the CPU)"
        );
    }
    vec![SlotSpec::for_device(None); options.cpu_workers]
}

/// How to start a pool server (a dedicated redis-server).
#[derive(Clone)]
pub struct ServerOptions {
    pub(crate) password: String,
    pub(crate) port: u16,
    pub(crate) bind: Vec<String>,
    pub(crate) state_dir: Option<PathBuf>,
    pub(crate) tls: bool,
    pub(crate) advertise: Option<Vec<String>>,
}

impl std::fmt::Debug for ServerOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerOptions")
            .field("port", &self.port)
            .field("bind", &self.bind)
            .field("state_dir", &self.state_dir)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

/// The file in a head's state directory that holds its join token (0600).
pub const JOIN_TOKEN_FILE: &str = "join-token";

/// The join token a head wrote to `state_dir`, read and checked.
///
/// # Errors
/// When the file cannot be read or holds no valid token.
pub fn read_join_token(state_dir: &Path) -> Result<JoinToken, NodeError> {
    let path = state_dir.join(JOIN_TOKEN_FILE);
    let file = open_regular(&path).map_err(|source| NodeError::StateDir {
        dir: path.clone(),
        source,
    })?;
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::io::Read::take(file, 8192), &mut text).map_err(
        |source| NodeError::StateDir {
            dir: path.clone(),
            source,
        },
    )?;
    JoinToken::parse(&text).map_err(|e| NodeError::Config(format!("{}: {e}", path.display())))
}

impl ServerOptions {
    /// A server on port 8899, on every interface, with this password. An empty password: the
    /// head makes a 256-bit secret (kept across restarts in its join token) and nodes join with
    /// the token it writes to `<state-dir>/join-token`.
    pub fn new(password: impl Into<String>) -> Self {
        ServerOptions {
            password: password.into(),
            port: DEFAULT_PORT,
            bind: vec!["*".into(), "-::*".into()],
            state_dir: None,
            tls: true,
            advertise: None,
        }
    }

    /// Serve plain Redis instead of TLS (a trusted network only: secrets and payloads cross it
    /// in clear).
    pub fn no_tls(mut self) -> Self {
        self.tls = false;
        self
    }

    /// The addresses the join token names (default: the `bind` addresses when they are
    /// specific, else this machine's first non-loopback IPv4 address).
    pub fn advertise(mut self, addresses: Vec<String>) -> Self {
        self.advertise = Some(addresses);
        self
    }

    /// The pool port (default 8899).
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// Addresses to listen on (default: every interface).
    pub fn bind(mut self, addresses: Vec<String>) -> Self {
        self.bind = addresses;
        self
    }

    /// The state directory (the server's files go in `redis-<port>/` below it).
    pub fn state_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.state_dir = Some(dir.into());
        self
    }

    fn prepared_state_dir(&self) -> Result<PathBuf, NodeError> {
        let state_dir = match &self.state_dir {
            Some(dir) => dir.clone(),
            None => default_state_dir()?,
        };
        prepare_state_dir(&state_dir).map_err(|source| NodeError::StateDir {
            dir: state_dir.clone(),
            source,
        })?;
        Ok(state_dir)
    }

    /// The redis-server's options; without a password, the secret of the join token already
    /// in the state directory for this port, else a new one.
    fn redis_options(&self) -> Result<RedisServerOptions, NodeError> {
        check_password(&self.password)?;
        dc_broker_redis::server::check_bind(&self.bind)?;
        let state_dir = self.prepared_state_dir()?;
        let secret = if self.password.is_empty() {
            match read_join_token(&state_dir) {
                Ok(token) if token.port == self.port && token.user == NODE_USER => token.secret,
                _ => dc_broker_redis::server::random_secret().map_err(|source| {
                    NodeError::StateDir {
                        dir: state_dir.clone(),
                        source,
                    }
                })?,
            }
        } else {
            self.password.clone()
        };
        let dir = state_dir.join(format!("redis-{}", self.port));
        let mut options = RedisServerOptions::new(secret, self.port, dir);
        options.bind = self.bind.clone();
        options.tls = self.tls;
        Ok(options)
    }

    /// The addresses a join token names.
    fn token_addresses(&self) -> Vec<String> {
        if let Some(given) = &self.advertise {
            return given.clone();
        }
        let specific: Vec<String> = self
            .bind
            .iter()
            .map(|b| b.trim_start_matches('-').to_string())
            .filter(|b| !matches!(b.as_str(), "*" | "::*" | "0.0.0.0" | "::"))
            .collect();
        if specific.is_empty() {
            vec![reachable_address()]
        } else {
            specific
        }
    }
}

/// An address of this machine that other machines can likely reach: the first non-loopback
/// IPv4 address of an interface that is up, else the host name.
pub(crate) fn reachable_address() -> String {
    use nix::net::if_::InterfaceFlags;
    if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
        for ifa in addrs {
            let up = ifa.flags.contains(InterfaceFlags::IFF_UP)
                && !ifa.flags.contains(InterfaceFlags::IFF_LOOPBACK);
            if !up {
                continue;
            }
            if let Some(ip) = ifa.address.as_ref().and_then(|a| a.as_sockaddr_in()) {
                return ip.ip().to_string();
            }
        }
    }
    host_name()
}

fn check_password(password: &str) -> Result<(), NodeError> {
    if password.chars().any(|c| c.is_control()) {
        return Err(NodeError::Config(
            "the password must not contain control characters (newlines…)".into(),
        ));
    }
    Ok(())
}

/// A running pool server. A server this handle started is supervised: if the redis-server
/// dies (killed, OOM), it is restarted at once on the same port with the same password (empty:
/// persistence is off), and nodes and pools reconnect to it.
#[derive(Debug)]
pub struct ServerHandle {
    port: u16,
    token: JoinToken,
    stop: Option<watch::Sender<bool>>,
    task: Option<JoinHandle<Result<(), NodeError>>>,
}

impl ServerHandle {
    /// The pool port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The join token for this server (also in `<state-dir>/join-token`).
    pub fn join_token(&self) -> &JoinToken {
        &self.token
    }

    /// Whether this handle started the server (false: one was already running).
    pub fn started_here(&self) -> bool {
        self.task.is_some()
    }

    /// Stop the server if this handle started it.
    ///
    /// # Errors
    /// When the supervisor had given up restarting the server.
    pub async fn terminate(&mut self) -> Result<(), NodeError> {
        if let Some(stop) = &self.stop {
            let _ = stop.send(true);
        }
        self.wait().await
    }

    /// Wait until the server stops for good (forever while it serves; at once if it was not
    /// started here).
    ///
    /// # Errors
    /// When the supervisor gave up restarting a server that kept dying.
    pub async fn wait(&mut self) -> Result<(), NodeError> {
        match self.task.as_mut() {
            Some(task) => {
                let result = task.await.unwrap_or(Ok(()));
                self.task = None;
                result
            }
            None => Ok(()),
        }
    }
}

/// Watch the head's redis-server and restart it when it dies, until told to stop.
async fn supervise(
    mut redis: RedisProcess,
    options: RedisServerOptions,
    mut stop: watch::Receiver<bool>,
) -> Result<(), NodeError> {
    let port = options.port;
    let mut restarts: VecDeque<Instant> = VecDeque::new();
    loop {
        tokio::select! {
            status = redis.wait() => {
                if *stop.borrow() {
                    return Ok(());
                }
                let how = status
                    .map(|s| dc_gpu::proc::describe_exit(&s))
                    .unwrap_or_else(|e| e.to_string());
                tracing::error!(port, "pool server (redis-server) {how}; restarting it on the same port");
            }
            _ = stop.changed() => {
                let _ = redis.terminate().await;
                return Ok(());
            }
        }
        let now = Instant::now();
        restarts.retain(|t| now.duration_since(*t) < Duration::from_secs(60));
        if restarts.len() >= 10 {
            return Err(NodeError::Config(format!(
                "the pool server on port {port} died 10 times within a minute; giving up (see its log in {})",
                options.dir.display()
            )));
        }
        restarts.push_back(now);
        let mut failures = 0u32;
        redis = loop {
            match start_redis_server(&options).await {
                Ok(Some(redis)) => {
                    tracing::info!(
                        port,
                        "pool server restarted (empty: nodes and pools reconnect and resubmit)"
                    );
                    break redis;
                }
                Ok(None) => {
                    tracing::warn!(
                        port,
                        "another pool server took the port; no longer supervising"
                    );
                    return Ok(());
                }
                Err(e) => {
                    failures += 1;
                    tracing::warn!(port, error = %e, "restarting the pool server failed; retrying");
                    if failures >= 20 {
                        return Err(e.into());
                    }
                    tokio::time::sleep(Duration::from_millis(100 * u64::from(failures))).await;
                }
            }
        };
    }
}

/// Start a dedicated redis-server for the pool on this machine; `Ok(None)` when one already
/// serves this port with this password. Its files go in the default state directory.
///
/// # Errors
/// [`NodeError::Server`] naming the fix (redis-server missing, port taken).
pub async fn start_redis(password: &str, port: u16) -> Result<Option<RedisProcess>, NodeError> {
    let options = ServerOptions::new(password).port(port).redis_options()?;
    Ok(start_redis_server(&options).await?)
}

/// Start a pool server (no local workers): a dedicated redis-server on the pool port.
///
/// # Errors
/// As [`start_redis`].
pub async fn start_server(options: ServerOptions) -> Result<ServerHandle, NodeError> {
    let redis_options = options.redis_options()?;
    let state_dir = options.prepared_state_dir()?;
    let ca_sha256 = match redis_options.client_tls() {
        Ok(Some(dc_broker_redis::TlsTrust::PinnedCa(hash))) => Some(hash),
        Ok(_) => None,
        Err(source) => {
            return Err(NodeError::StateDir {
                dir: redis_options.dir.clone(),
                source,
            });
        }
    };
    let token = JoinToken {
        addresses: options.token_addresses(),
        port: options.port,
        user: NODE_USER.into(),
        secret: redis_options.password.clone(),
        ca_sha256,
    };
    write_private_file(&state_dir, JOIN_TOKEN_FILE, format!("{token}\n").as_bytes()).map_err(
        |source| NodeError::StateDir {
            dir: state_dir.join(JOIN_TOKEN_FILE),
            source,
        },
    )?;
    if !options.tls && options.bind.iter().any(|b| !is_loopback_bind(b)) {
        tracing::warn!(
            port = options.port,
            "TLS is off and the pool server listens beyond this machine: the secret and every payload cross the network in clear"
        );
    }
    let (stop, task) = match start_redis_server(&redis_options).await? {
        Some(redis) => {
            let (stop, stop_rx) = watch::channel(false);
            let task = tokio::spawn(supervise(redis, redis_options, stop_rx));
            (Some(stop), Some(task))
        }
        None => (None, None),
    };
    Ok(ServerHandle {
        port: options.port,
        token,
        stop,
        task,
    })
}

/// Whether a bind entry is on this machine only.
fn is_loopback_bind(entry: &str) -> bool {
    let entry = entry.trim_start_matches('-');
    entry == "localhost"
        || entry
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// How to start a head node: a pool server plus a worker node on this machine.
#[derive(Debug, Clone)]
pub struct HeadOptions {
    pub(crate) server: ServerOptions,
    pub(crate) node: NodeOptions,
}

impl HeadOptions {
    /// A head on port 8899 with this password.
    pub fn new(password: impl Into<String>) -> Self {
        let password = password.into();
        HeadOptions {
            server: ServerOptions::new(password.clone()),
            node: NodeOptions::new(password).address("127.0.0.1"),
        }
    }

    /// The pool port (default 8899).
    pub fn port(mut self, port: u16) -> Self {
        self.server = self.server.port(port);
        self.node = self.node.port(port);
        self
    }

    /// Addresses the server listens on (default: every interface).
    pub fn bind(mut self, addresses: Vec<String>) -> Self {
        self.server = self.server.bind(addresses);
        self
    }

    /// The state directory of both the server and the local node.
    pub fn state_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        let dir = dir.into();
        self.server = self.server.state_dir(dir.clone());
        self.node = self.node.state_dir(dir);
        self
    }

    /// Change the local node's options (GPUs, CPU workers, worker program…).
    pub fn node(mut self, f: impl FnOnce(NodeOptions) -> NodeOptions) -> Self {
        self.node = f(self.node);
        self
    }
}

/// A running head node: the pool server and the local node.
#[derive(Debug)]
pub struct HeadHandle {
    server: ServerHandle,
    node: NodeHandle,
}

impl HeadHandle {
    /// The local node.
    pub fn node(&self) -> &NodeHandle {
        &self.node
    }

    /// The pool server.
    pub fn server(&self) -> &ServerHandle {
        &self.server
    }

    /// Stop the local node, then the server.
    ///
    /// # Errors
    /// As [`NodeHandle::terminate`] and [`ServerHandle::terminate`].
    pub async fn terminate(&mut self) -> Result<(), NodeError> {
        self.node.terminate().await?;
        self.server.terminate().await
    }

    /// Wait until the node stops, or the server stops for good (its supervisor gave up).
    ///
    /// # Errors
    /// As [`NodeHandle::wait`] and [`ServerHandle::wait`].
    pub async fn wait(&mut self) -> Result<(), NodeError> {
        if !self.server.started_here() {
            return self.node.wait().await;
        }
        tokio::select! {
            r = self.node.wait() => r,
            r = self.server.wait() => r,
        }
    }
}

/// Start a head node: the pool server, then a worker node on this machine.
///
/// # Errors
/// As [`start_server`] and [`start_node`]; a node already running in the state directory is
/// [`NodeError::AlreadyRunning`] (checked before the server starts).
pub async fn start_head_node(options: HeadOptions) -> Result<HeadHandle, NodeError> {
    let dir = match &options.node.state_dir {
        Some(dir) => dir.clone(),
        None => default_state_dir()?,
    };
    if StateLock::is_held(&dir) {
        let pid = shown_pid(&dir);
        return Err(NodeError::AlreadyRunning { pid, dir });
    }
    let local = options.server.redis_options()?.local_address();
    let mut server = start_server(options.server.clone()).await?;
    // The local node reaches the server where it listens (loopback unless bound elsewhere),
    // with the server's own token (its CA pinned).
    let node = options
        .node
        .clone()
        .token(server.join_token().to_string())
        .address(local);
    match start_node(node).await {
        Ok(node) => Ok(HeadHandle { server, node }),
        Err(e) => {
            let _ = server.terminate().await;
            Err(e)
        }
    }
}

/// Whether a pool server (a Redis asking for a password, over TLS or plain) answers on this
/// machine's `port`. Blocks for at most a few seconds.
pub fn is_server_running(port: u16) -> bool {
    dc_broker_redis::tls::answers_over_tls(port, Duration::from_millis(500)) || answers_plain(port)
}

/// [`is_server_running`] for a plain (`--no-tls`) server.
fn answers_plain(port: u16) -> bool {
    use std::io::{Read, Write};
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut stream) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500))
    else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let _ = stream.set_write_timeout(Some(Duration::from_millis(500)));
    // A server that requires a password refuses PING until AUTH: "-NOAUTH".
    if stream.write_all(b"*1\r\n$4\r\nPING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    match stream.read(&mut buf) {
        Ok(n) => buf[..n].starts_with(b"-NOAUTH"),
        Err(_) => false,
    }
}

/// Whether a node runs with the default state directory on this machine (false when there is
/// no default state directory: see [`default_state_dir`]).
pub fn is_node_running() -> bool {
    default_state_dir().is_ok_and(|dir| is_node_running_in(&dir))
}

/// Whether a node runs with state directory `dir`.
pub fn is_node_running_in(dir: &Path) -> bool {
    StateLock::is_held(dir)
}

/// Who runs with state directory `dir`, as [`node_pid_checked`] tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum NodeProcess {
    /// No process holds the directory's lock.
    None,
    /// This process holds the lock and wrote `node.pid`: it is the node.
    Running(u32),
    /// The lock is held, but `node.pid` does not name its holder (planted, stale, or another
    /// program holds the lock): nothing should be signalled.
    Unverified {
        /// The holder of the lock, if the kernel could tell.
        holder: Option<u32>,
        /// What `node.pid` says, if it holds a pid.
        recorded: Option<u32>,
    },
}

/// The pid of the node running with state directory `dir`: `Some` only when a process holds
/// the directory's lock and `node.pid` names that very process.
pub fn node_pid(dir: &Path) -> Option<u32> {
    match node_pid_checked(dir) {
        NodeProcess::Running(pid) => Some(pid),
        _ => None,
    }
}

/// Who holds state directory `dir`: the lock's holder (from the kernel's lock table) checked
/// against the pid `node.pid` records.
pub fn node_pid_checked(dir: &Path) -> NodeProcess {
    if !StateLock::is_held(dir) {
        return NodeProcess::None;
    }
    let holder = StateLock::holder(dir);
    let recorded = read_pid_file(dir);
    match (holder, recorded) {
        (Some(h), Some(r)) if h == r => NodeProcess::Running(h),
        _ => NodeProcess::Unverified { holder, recorded },
    }
}
