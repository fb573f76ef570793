//! Pool servers: a dedicated redis-server on the pool port, its options, the join token a head
//! writes to its state directory, and whether a server already answers on a port.

use std::path::{Path, PathBuf};
use std::time::Duration;

use dc_broker_redis::server::{RedisProcess, RedisServerOptions, start_redis_server};
use dc_broker_redis::token::{JoinToken, NODE_USER};
use dc_core::DEFAULT_PORT;
use dc_core::agent::host_name;
use tokio::sync::watch;

use super::state::{open_regular, prepare_state_dir, write_private_file};
use super::supervise::{ServerHandle, supervise};
use super::{NodeError, default_state_dir};

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
    #[must_use]
    pub fn no_tls(mut self) -> Self {
        self.tls = false;
        self
    }

    /// The addresses the join token names (default: the `bind` addresses when they are
    /// specific, else this machine's first non-loopback IPv4 address).
    #[must_use]
    pub fn advertise(mut self, addresses: Vec<String>) -> Self {
        self.advertise = Some(addresses);
        self
    }

    /// The pool port (default 8899).
    #[must_use]
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// Addresses to listen on (default: every interface).
    #[must_use]
    pub fn bind(mut self, addresses: Vec<String>) -> Self {
        self.bind = addresses;
        self
    }

    /// The state directory (the server's files go in `redis-<port>/` below it).
    #[must_use]
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
    pub(super) fn redis_options(&self) -> Result<RedisServerOptions, NodeError> {
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

/// Whether a pool server (a Redis asking for a password, over TLS or plain) answers on this
/// machine's `port`. Blocks for at most a few seconds.
pub fn is_server_running(port: u16) -> bool {
    use dc_broker_redis::tls::{answers_over_tls, answers_plain};
    let timeout = Duration::from_millis(500);
    answers_over_tls(port, timeout) || answers_plain(port, timeout)
}
