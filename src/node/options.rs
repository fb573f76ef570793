//! How to start a worker node: where its pool server is and how to trust it, which GPUs and
//! how many workers, which worker program and kinds, its state directory and heartbeat.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use dc_broker_redis::token::JoinToken;
use dc_core::agent::WorkerCommand;
use dc_core::{DEFAULT_PORT, NetworkTarget};
use dc_gpu::GpuSelection;

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
    #[must_use]
    pub fn address(mut self, address: impl Into<String>) -> Self {
        self.target.address = address.into();
        self.target.address_set = true;
        self
    }

    /// The pool server's port (default 8899; a join token names its own).
    #[must_use]
    pub fn port(mut self, port: u16) -> Self {
        self.target.port = port;
        self
    }

    /// An existing broker by URL instead of a head node (`redis://…`, `rediss://…`,
    /// `amqp://…`, `amqps://…`).
    #[must_use]
    pub fn broker(mut self, url: impl Into<String>) -> Self {
        self.target.url = Some(url.into());
        self
    }

    /// Join with a token (`dc1:…`, as the head writes it to `<state-dir>/join-token`): the
    /// head's addresses, port, user, secret and CA hash.
    #[must_use]
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.target.token = Some(token.into().trim().to_string());
        self
    }

    /// Speak plain Redis to a head started with `--no-tls`.
    #[must_use]
    pub fn no_tls(mut self) -> Self {
        self.target.tls = false;
        self
    }

    /// The CA file a `rediss://` or `amqps://` broker's certificate must chain to.
    #[must_use]
    pub fn tls_ca(mut self, path: impl Into<PathBuf>) -> Self {
        self.target.tls_ca = Some(path.into());
        self
    }

    /// The known-heads file that pins a head reached with a password (default:
    /// `DC_KNOWN_HEADS`, else the user's config directory).
    #[must_use]
    pub fn known_heads(mut self, path: impl Into<PathBuf>) -> Self {
        self.target.known_heads = Some(path.into());
        self
    }

    /// Which GPUs to use (default: every visible one).
    #[must_use]
    pub fn gpus(mut self, gpus: GpuSelection) -> Self {
        self.gpus = gpus;
        self
    }

    /// Worker processes per GPU (default 1).
    #[must_use]
    pub fn workers_per_gpu(mut self, n: usize) -> Self {
        self.workers_per_gpu = n.max(1);
        self
    }

    /// CPU worker processes when the node has no GPU (default 0: a CPU box must not silently
    /// take GPU jobs).
    #[must_use]
    pub fn cpu_workers(mut self, n: usize) -> Self {
        self.cpu_workers = n;
        self
    }

    /// The worker program (default: this executable, which must call `serve_if_worker` or be
    /// built with `main_with`).
    #[must_use]
    pub fn worker_program(mut self, path: impl Into<PathBuf>) -> Self {
        self.worker_program = Some(path.into());
        self
    }

    /// The kinds the worker program serves (default: those this executable registered).
    #[must_use]
    pub fn kinds(mut self, kinds: Vec<String>) -> Self {
        self.kinds = Some(kinds);
        self
    }

    /// Serve `kind` with another program speaking the frame protocol (any language).
    #[must_use]
    pub fn external_worker(mut self, kind: impl Into<String>, command: WorkerCommand) -> Self {
        self.external.insert(kind.into(), command);
        self
    }

    /// The state directory (one node per state dir).
    #[must_use]
    pub fn state_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.state_dir = Some(dir.into());
        self
    }

    /// How often the node heartbeats, renewing its leases (default 1 s).
    #[must_use]
    pub fn heartbeat(mut self, period: Duration) -> Self {
        self.heartbeat = period.max(Duration::from_millis(50));
        self
    }

    /// The server, for logs (no secret).
    pub(super) fn shown_server(&self) -> String {
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
