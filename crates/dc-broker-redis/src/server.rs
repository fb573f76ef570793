//! The head node's dedicated `redis-server`: found on PATH, started with a generated config
//! (password, pool port, bind address, data in the state dir), waited on until it answers.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::process::Child;

/// What can go wrong starting the head's redis-server. Messages say what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// Neither `redis-server` nor `valkey-server` is on PATH.
    #[error(
        "redis-server not found on PATH: install it (apt-get install redis-server, or valkey-server) or pass --broker redis://… to use an existing Redis"
    )]
    NotFound,
    /// Something else listens on the port.
    #[error(
        "port {port} is already in use by another program (not a pool server with this password): stop it or choose another port with -p"
    )]
    PortInUse {
        /// The port.
        port: u16,
    },
    /// A pool server answers on the port, but not to this password.
    #[error(
        "a pool server already runs on port {port} with another password: use its password, or another port with -p"
    )]
    OtherPassword {
        /// The port.
        port: u16,
    },
    /// The state directory could not be prepared.
    #[error("cannot prepare {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// redis-server started but exited or never answered.
    #[error("redis-server did not come up on port {port}: {reason}\n{log_tail}")]
    DidNotStart {
        /// The port.
        port: u16,
        /// Why.
        reason: String,
        /// Its last log lines.
        log_tail: String,
    },
}

/// How to start the head's redis-server.
#[derive(Clone)]
pub struct RedisServerOptions {
    /// The pool password (`requirepass`).
    pub password: String,
    /// The pool port, the one port a user opens (default 8899).
    pub port: u16,
    /// Addresses to listen on (default `["*", "-::*"]`: every IPv4 and, if present, IPv6
    /// interface, so worker nodes on other machines can connect).
    pub bind: Vec<String>,
    /// Where its config, log and data go.
    pub dir: PathBuf,
    /// The server binary (default: `redis-server`, else `valkey-server`, on PATH).
    pub program: Option<PathBuf>,
}

impl std::fmt::Debug for RedisServerOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisServerOptions")
            .field("password", &"***")
            .field("port", &self.port)
            .field("bind", &self.bind)
            .field("dir", &self.dir)
            .field("program", &self.program)
            .finish()
    }
}

impl RedisServerOptions {
    /// The address a process on this machine uses to reach the server: loopback when the
    /// server listens there (or everywhere), else the first address it binds.
    pub fn local_address(&self) -> String {
        let everywhere = |b: &str| {
            matches!(
                b.trim_start_matches('-'),
                "*" | "0.0.0.0" | "127.0.0.1" | "localhost"
            )
        };
        if self.bind.is_empty() || self.bind.iter().any(|b| everywhere(b)) {
            return "127.0.0.1".into();
        }
        self.bind
            .iter()
            .find(|b| !b.starts_with('-') && !b.contains(':'))
            .or_else(|| self.bind.first())
            .map(|b| b.trim_start_matches('-').to_string())
            .unwrap_or_else(|| "127.0.0.1".into())
    }

    /// Options with defaults: every interface, data in `dir`.
    pub fn new(password: impl Into<String>, port: u16, dir: impl Into<PathBuf>) -> Self {
        RedisServerOptions {
            password: password.into(),
            port,
            bind: vec!["*".into(), "-::*".into()],
            dir: dir.into(),
            program: None,
        }
    }
}

/// A redis-server this process started; killed when dropped (and when this process dies).
#[derive(Debug)]
pub struct RedisProcess {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl RedisProcess {
    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its pid.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Its state directory (config, log).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stop it: SIGTERM, then SIGKILL after 5 s.
    ///
    /// # Errors
    /// When waiting for it fails at the OS level.
    pub async fn terminate(&mut self) -> std::io::Result<std::process::ExitStatus> {
        dc_gpu::proc::stop_group(&mut self.child, Duration::from_secs(5)).await
    }

    /// Wait until it exits.
    ///
    /// # Errors
    /// When waiting fails at the OS level.
    pub async fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        self.child.wait().await
    }

    /// Whether it has exited (reaping it if so).
    pub fn has_exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }
}

/// `redis-server`, else `valkey-server`, from PATH.
pub fn find_redis_server() -> Option<PathBuf> {
    find_redis_server_in(&std::env::var_os("PATH")?)
}

/// `redis-server`, else `valkey-server`, from the directories of a PATH-like value.
pub fn find_redis_server_in(path: &std::ffi::OsStr) -> Option<PathBuf> {
    for name in ["redis-server", "valkey-server"] {
        for dir in std::env::split_paths(path) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Some(candidate);
            }
        }
    }
    None
}

/// How a pool server on a port answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// It answered PING with this password.
    Ours,
    /// Something answered but refused the password.
    WrongPassword,
    /// Something listens but does not speak Redis (or not in time).
    Foreign,
    /// Nothing listens.
    Nothing,
}

/// Ask `host:port` whether a Redis with `password` answers there, within `timeout`.
pub async fn probe(host: &str, port: u16, password: &str, timeout: Duration) -> Probe {
    let connect = tokio::time::timeout(timeout, tokio::net::TcpStream::connect((host, port)));
    let mut stream = match connect.await {
        Ok(Ok(s)) => s,
        Ok(Err(_)) => return Probe::Nothing,
        Err(_) => return Probe::Foreign,
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let auth = format!(
        "*2\r\n$4\r\nAUTH\r\n${}\r\n{}\r\n*1\r\n$4\r\nPING\r\n",
        password.len(),
        password
    );
    let exchange = async {
        stream.write_all(auth.as_bytes()).await?;
        let mut buf = vec![0u8; 512];
        let mut got = Vec::new();
        while !got.ends_with(b"+PONG\r\n") && !got.starts_with(b"-") {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(got)
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok(reply)) if reply.starts_with(b"+OK\r\n+PONG") => Probe::Ours,
        Ok(Ok(reply)) if reply.starts_with(b"-WRONGPASS") || reply.starts_with(b"-ERR") => {
            Probe::WrongPassword
        }
        _ => Probe::Foreign,
    }
}

/// Start a dedicated redis-server for a head node, or find one already serving this port and
/// password (`Ok(None)`).
///
/// # Errors
/// A [`ServerError`] naming the fix: binary missing, port taken, another password there, or
/// the server failing to come up (with its last log lines).
pub async fn start_redis_server(
    options: &RedisServerOptions,
) -> Result<Option<RedisProcess>, ServerError> {
    let port = options.port;
    let host = options.local_address();
    match probe(&host, port, &options.password, Duration::from_secs(2)).await {
        Probe::Ours => {
            tracing::info!(port, "a pool server already runs on this port");
            return Ok(None);
        }
        Probe::WrongPassword => return Err(ServerError::OtherPassword { port }),
        Probe::Foreign => return Err(ServerError::PortInUse { port }),
        Probe::Nothing => {}
    }
    let program = match &options.program {
        Some(p) => p.clone(),
        None => find_redis_server().ok_or(ServerError::NotFound)?,
    };
    let dir = options.dir.clone();
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ServerError::Io { path, source }
    };
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let conf_path = dir.join("redis.conf");
    let log_path = dir.join("redis.log");
    let conf = render_config(options, &dir, &log_path);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600) // it holds the password
        .open(&conf_path)
        .map_err(io(&conf_path))?;
    file.write_all(conf.as_bytes()).map_err(io(&conf_path))?;
    drop(file);
    let _ = std::fs::remove_file(&log_path);

    let mut child = dc_gpu::proc::spawn_service(dc_gpu::proc::SpawnSpec {
        program: program.clone(),
        args: vec![conf_path.clone().into_os_string()],
        env: vec![],
    })
    .await
    .map_err(|e| ServerError::DidNotStart {
        port,
        reason: format!("cannot run {}: {e}", program.display()),
        log_tail: String::new(),
    })?;

    let started = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(ServerError::DidNotStart {
                port,
                reason: format!("it {}", dc_gpu::proc::describe_exit(&status)),
                log_tail: log_tail(&log_path),
            });
        }
        if probe(&host, port, &options.password, Duration::from_secs(1)).await == Probe::Ours {
            tracing::info!(port, pid = ?child.id(), dir = %dir.display(), "redis-server started");
            return Ok(Some(RedisProcess { child, port, dir }));
        }
        if started.elapsed() > Duration::from_secs(15) {
            let _ = dc_gpu::proc::stop_group(&mut child, Duration::from_secs(1)).await;
            return Err(ServerError::DidNotStart {
                port,
                reason: "no answer within 15 s".into(),
                log_tail: log_tail(&log_path),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn render_config(options: &RedisServerOptions, dir: &Path, log: &Path) -> String {
    // Quoted for redis.conf: backslash and double quote escaped.
    let quote = |s: &str| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""));
    format!(
        "# Generated by distributed-computing for a head node. Do not edit: rewritten on start.\n\
         port {port}\n\
         bind {bind}\n\
         protected-mode no\n\
         requirepass {password}\n\
         dir {dir}\n\
         logfile {log}\n\
         daemonize no\n\
         save \"\"\n\
         appendonly no\n\
         maxmemory-policy noeviction\n\
         tcp-keepalive 10\n",
        port = options.port,
        bind = options.bind.join(" "),
        password = quote(&options.password),
        dir = quote(&dir.to_string_lossy()),
        log = quote(&log.to_string_lossy()),
    )
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(10);
    lines[start..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::RedisServerOptions;

    #[test]
    fn the_local_address_is_one_the_server_listens_on() {
        let mut o = RedisServerOptions::new("pw", 8899, "/tmp/x");
        assert_eq!(o.local_address(), "127.0.0.1");
        o.bind = vec!["10.213.7.1".into()];
        assert_eq!(o.local_address(), "10.213.7.1");
        o.bind = vec!["10.213.7.1".into(), "127.0.0.1".into()];
        assert_eq!(o.local_address(), "127.0.0.1");
        o.bind = vec!["0.0.0.0".into()];
        assert_eq!(o.local_address(), "127.0.0.1");
    }
}
