//! The head node's dedicated `redis-server`: found on PATH, started with a generated config
//! (pool port, bind address, TLS with the head's own CA, ACL users, data in the state dir),
//! waited on until it answers.
//!
//! Nodes and pools log in as [`NODE_USER`], a user that may run the pool's protocol on the
//! pool's keys and nothing else; the `default` user is off; an admin user, whose secret is kept
//! only in the state directory (`admin-secret`), may do everything.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::process::Child;

use crate::tls::{HeadCerts, TlsTrust};
pub use crate::token::NODE_USER;

/// The head's administrator user: every command, for an operator with the state directory.
pub const ADMIN_USER: &str = "dc-admin";

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
    /// The secret of [`NODE_USER`]: the pool password, or a join token's secret.
    pub password: String,
    /// Whether the pool port speaks TLS (default true), with certificates from
    /// [`crate::tls::head_certs`] in `dir`.
    pub tls: bool,
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
            .field("tls", &self.tls)
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
            tls: true,
            port,
            bind: vec!["*".into(), "-::*".into()],
            dir: dir.into(),
            program: None,
        }
    }

    /// How a client on this machine trusts the server: its CA pinned (read from `dir`), or
    /// `None` without TLS.
    ///
    /// # Errors
    /// When the certificates cannot be read or made.
    pub fn client_tls(&self) -> std::io::Result<Option<TlsTrust>> {
        if !self.tls {
            return Ok(None);
        }
        prepare_dir(&self.dir)?;
        Ok(Some(TlsTrust::PinnedCa(
            crate::tls::head_certs(&self.dir)?.ca_sha256,
        )))
    }
}

/// The state directory, made 0700.
fn prepare_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// The admin user's secret in `dir/admin-secret` (0600): made once (256 random bits, hex).
pub fn admin_secret(dir: &Path) -> std::io::Result<String> {
    let path = dir.join("admin-secret");
    if let Ok(text) = std::fs::read_to_string(&path) {
        let text = text.trim();
        if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(text.to_string());
        }
    }
    let secret = random_secret()?;
    write_new_file(dir, "admin-secret", format!("{secret}\n").as_bytes())?;
    Ok(secret)
}

/// 256 random bits from the kernel, as 64 hex digits.
pub fn random_secret() -> std::io::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(crate::tls::hex(&bytes))
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
        dc_proc::stop_group(&mut self.child, Duration::from_secs(5)).await
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

/// Ask `host:port` whether a pool server answers there to [`NODE_USER`] with `password`
/// (over TLS with `tls`), within `timeout`.
pub async fn probe(
    host: &str,
    port: u16,
    password: &str,
    tls: Option<&TlsTrust>,
    timeout: Duration,
) -> Probe {
    if tokio::time::timeout(timeout, tokio::net::TcpStream::connect((host, port)))
        .await
        .is_ok_and(|c| c.is_err())
    {
        return Probe::Nothing;
    }
    let url = crate::redis_url_as(host, port, NODE_USER, password);
    let options = crate::RedisOptions {
        connect_timeout: timeout,
        response_timeout: timeout,
        tls: tls.cloned(),
        ..crate::RedisOptions::default()
    };
    match crate::RedisBroker::connect(&url, options).await {
        Ok(_) => Probe::Ours,
        Err(dc_core::BrokerError::Auth(_)) => Probe::WrongPassword,
        Err(_) => Probe::Foreign,
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
    let dir = options.dir.clone();
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ServerError::Io { path, source }
    };
    prepare_dir(&dir).map_err(io(&dir))?;
    let certs = if options.tls {
        Some(crate::tls::head_certs(&dir).map_err(io(&dir))?)
    } else {
        None
    };
    let tls = certs.as_ref().map(|c| TlsTrust::PinnedCa(c.ca_sha256));
    let admin = admin_secret(&dir).map_err(io(&dir.join("admin-secret")))?;
    match probe(
        &host,
        port,
        &options.password,
        tls.as_ref(),
        Duration::from_secs(2),
    )
    .await
    {
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
    let conf_path = dir.join("redis.conf");
    let log_path = dir.join("redis.log");
    let conf = render_config(options, &dir, &log_path, certs.as_ref(), &admin)?;
    // It holds the password: a new 0600 file renamed into place, whatever was there before.
    write_new_file(&dir, "redis.conf", conf.as_bytes()).map_err(io(&conf_path))?;
    let _ = std::fs::remove_file(&log_path);

    let mut child = dc_proc::spawn_service(dc_proc::SpawnSpec {
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
                reason: format!("it {}", dc_proc::describe_exit(&status)),
                log_tail: log_tail(&log_path),
            });
        }
        if probe(
            &host,
            port,
            &options.password,
            tls.as_ref(),
            Duration::from_secs(1),
        )
        .await
            == Probe::Ours
        {
            tracing::info!(port, pid = ?child.id(), dir = %dir.display(), "redis-server started");
            return Ok(Some(RedisProcess { child, port, dir }));
        }
        if started.elapsed() > Duration::from_secs(15) {
            let _ = dc_proc::stop_group(&mut child, Duration::from_secs(1)).await;
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
pub(crate) fn write_new_file(dir: &Path, name: &str, contents: &[u8]) -> std::io::Result<()> {
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

fn render_config(
    options: &RedisServerOptions,
    dir: &Path,
    log: &Path,
    certs: Option<&HeadCerts>,
    admin_secret: &str,
) -> Result<String, ServerError> {
    let listen = match certs {
        Some(c) => format!(
            "port 0\n\
             tls-port {port}\n\
             tls-cert-file {chain}\n\
             tls-key-file {key}\n\
             tls-ca-cert-file {ca}\n\
             tls-auth-clients no\n\
             tls-protocols \"TLSv1.2 TLSv1.3\"\n",
            port = options.port,
            chain = quote(&c.chain.to_string_lossy()),
            key = quote(&c.key.to_string_lossy()),
            ca = quote(&c.ca_cert.to_string_lossy()),
        ),
        None => format!("port {}\n", options.port),
    };
    let acl = crate::acl::render_acl(
        NODE_USER,
        &options.password,
        ADMIN_USER,
        admin_secret,
        crate::RedisOptions::default().prefix.as_str(),
    )
    .map(|acl| acl.trim_end().to_string())
    .map_err(|e| ServerError::Io {
        path: dir.join("redis.conf"),
        source: std::io::Error::other(e.to_string()),
    })?;
    Ok(format!(
        "# Generated by distributed-computing for a head node. Do not edit: rewritten on start.\n\
         {listen}\
         bind {bind}\n\
         protected-mode no\n\
         {acl}\n\
         dir {dir}\n\
         logfile {log}\n\
         daemonize no\n\
         save \"\"\n\
         appendonly no\n\
         maxmemory-policy noeviction\n\
         tcp-keepalive 10\n",
        bind = options.bind.join(" "),
        dir = quote(&dir.to_string_lossy()),
        log = quote(&log.to_string_lossy()),
    ))
}

/// This machine's name, when it can go in a certificate (else empty).
pub(crate) fn host_name_for_certs() -> String {
    let name = dc_core::agent::host_name();
    if check_bind_entry(&name).is_ok() && name.parse::<std::net::IpAddr>().is_err() {
        name
    } else {
        String::new()
    }
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
        let conf = render_config(&o, dir, &dir.join("redis.log"), None, &"0".repeat(64))
            .expect("rendered");
        assert!(!conf.contains("requirepass"), "{conf}");
        assert!(
            !conf.contains("pw\""),
            "the clear password is in the config: {conf}"
        );
        assert!(conf.contains("dir \"/tmp/a\\x0ab\\xc2\\x85\"\n"), "{conf}");
        let lines: Vec<&str> = conf.lines().collect();
        let expected = [
            "port",
            "bind",
            "protected-mode",
            "user",
            "user",
            "user",
            "dir",
            "logfile",
            "daemonize",
            "save",
            "appendonly",
            "maxmemory-policy",
            "tcp-keepalive",
        ];
        let firsts: Vec<&str> = lines[1..]
            .iter()
            .map(|l| l.split(' ').next().unwrap_or(""))
            .collect();
        assert_eq!(firsts, expected, "{conf}");
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
