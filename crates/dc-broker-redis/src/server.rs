//! The head node's dedicated `redis-server`: found on PATH, started with a generated config
//! (password, pool port, bind address, data in the state dir), waited on until it answers.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
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
    /// A `bind` entry is not an IP address or a host name.
    #[error(
        "bind address {address:?} is not an IP address or a host name ({reason}): pass --bind with comma-separated addresses such as 127.0.0.1,10.0.0.5"
    )]
    InvalidBind {
        /// The entry, as given.
        address: String,
        /// What is wrong with it.
        reason: &'static str,
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

/// Check the addresses a pool server is to listen on: each an IP address or a host name,
/// optionally with redis-server's `-` prefix (listen there only if the address exists), or
/// `*` / `::*` (every IPv4 / IPv6 interface). Nothing else reaches the generated redis.conf.
///
/// # Errors
/// [`ServerError::InvalidBind`] naming the first bad entry.
///
/// # Examples
/// ```
/// use dc_broker_redis::server::check_bind;
///
/// assert!(check_bind(&["127.0.0.1".into(), "-::1".into(), "head-1.lan".into()]).is_ok());
/// assert!(check_bind(&["127.0.0.1\nrequirepass x".into()]).is_err());
/// ```
pub fn check_bind(addresses: &[String]) -> Result<(), ServerError> {
    for address in addresses {
        check_bind_entry(address).map_err(|reason| ServerError::InvalidBind {
            address: address.clone(),
            reason,
        })?;
    }
    Ok(())
}

fn check_bind_entry(entry: &str) -> Result<(), &'static str> {
    let address = entry.strip_prefix('-').unwrap_or(entry);
    if address.is_empty() {
        return Err("empty");
    }
    if address.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("it contains whitespace or control characters");
    }
    if matches!(address, "*" | "::*") || address.parse::<std::net::IpAddr>().is_ok() {
        return Ok(());
    }
    // A host name (RFC 1123): dot-separated labels of letters, digits and inner hyphens.
    let label_ok = |label: &str| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    let name = address.strip_suffix('.').unwrap_or(address);
    if name.len() <= 253 && name.split('.').all(label_ok) {
        return Ok(());
    }
    Err("only letters, digits, '-', '.' and ':' (IPv6) are allowed")
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
    check_bind(&options.bind)?;
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
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(io(&dir))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(io(&dir))?;
    let conf_path = dir.join("redis.conf");
    let log_path = dir.join("redis.log");
    let conf = render_config(options, &dir, &log_path);
    // It holds the password: a new 0600 file renamed into place, whatever was there before.
    write_new_file(&dir, "redis.conf", conf.as_bytes()).map_err(io(&conf_path))?;
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

/// Write `dir/name` as a new 0600 file (never following a symlink) renamed into place.
fn write_new_file(dir: &Path, name: &str, contents: &[u8]) -> std::io::Result<()> {
    let temp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&temp);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600) // O_EXCL: a symlink planted at `temp` is not followed either
        .open(&temp)
        .and_then(|mut file| file.write_all(contents));
    match written.and_then(|()| std::fs::rename(&temp, dir.join(name))) {
        Ok(()) => Ok(()),
        Err(e) => {
            let _ = std::fs::remove_file(&temp);
            Err(e)
        }
    }
}

/// A value quoted for redis.conf: backslash, double quote and every control character escaped,
/// so no value can end its line.
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            c if c.is_control() => {
                for b in c.to_string().bytes() {
                    out.push_str(&format!("\\x{b:02x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn render_config(options: &RedisServerOptions, dir: &Path, log: &Path) -> String {
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
    use super::{RedisServerOptions, check_bind, render_config};
    use std::path::Path;

    #[test]
    fn bind_takes_ip_addresses_and_host_names_only() {
        let ok = |a: &str| check_bind(&[a.to_string()]).is_ok();
        for good in [
            "*",
            "-::*",
            "127.0.0.1",
            "-::1",
            "::",
            "10.0.0.5",
            "fe80::1",
            "localhost",
            "head-1.example.org",
            "head.",
        ] {
            assert!(ok(good), "{good:?} refused");
        }
        for bad in [
            "127.0.0.1\nrequirepass \"\"",
            "127.0.0.1 10.0.0.1",
            "host\r",
            "a\u{1b}[31m",
            "",
            "-",
            "-bad-.host",
            "under_score",
            "x;y",
            "\"quoted\"",
            "bad..host",
            "h\u{0}",
        ] {
            assert!(!ok(bad), "{bad:?} accepted");
        }
        let error = check_bind(&["127.0.0.1".into(), "1.2.3.4\nport 1".into()])
            .expect_err("a newline is refused")
            .to_string();
        assert!(error.contains("1.2.3.4\\nport 1"), "{error}");
    }

    #[test]
    fn no_value_can_add_a_line_to_redis_conf() {
        let mut o = RedisServerOptions::new("pw\"\\ \nrequirepass x", 8899, "/tmp/x");
        o.bind = vec!["127.0.0.1".into()];
        let dir = Path::new("/tmp/a\nb\u{85}");
        let conf = render_config(&o, dir, &dir.join("redis.log"));
        assert_eq!(conf.lines().count(), 12, "{conf}");
        assert!(
            conf.contains("requirepass \"pw\\\"\\\\ \\x0arequirepass x\"\n"),
            "{conf}"
        );
        assert!(conf.contains("dir \"/tmp/a\\x0ab\\xc2\\x85\"\n"), "{conf}");
    }

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
