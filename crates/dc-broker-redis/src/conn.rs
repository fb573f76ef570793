//! Connections to Redis: one shared multiplexed connection for scripts and small commands
//! (made on first use and kept), and free-lists of dedicated connections for blocking reads
//! and bulk chunk transfers. Every connection is made within the broker's connect timeout,
//! over TLS when the URL is `rediss://` or the options name a [`TlsTrust`].

use std::sync::Mutex;
use std::time::Duration;

use dc_core::BrokerError;
use redis::aio::MultiplexedConnection;
use redis::{
    AsyncConnectionConfig, ConnectionAddr, ErrorKind, RedisConnectionInfo, RedisError,
    ServerErrorKind,
};

use crate::tls::{TlsClient, TlsTrust};

/// Response timeout of bulk connections (one chunk of up to 32 MiB per command).
pub(crate) const BULK_TIMEOUT: Duration = Duration::from_secs(120);
/// Added to a blocking read's wait for its response timeout.
const BLOCK_SLACK: Duration = Duration::from_secs(5);
/// Dedicated connections kept per free-list; more are closed when handed back. Every idle
/// worker slot of a node blocks on a connection of its own, so a node keeps about one per slot:
/// closing them after each wait made a 1,000-slot node reconnect (TCP, `AUTH`, `HELLO`) on
/// nearly every idle moment, which cost a quarter of its throughput (`dc-cli bench` W6).
const FREE_LIST_MAX: usize = 1024;

/// Every connection this broker opens.
pub(crate) struct Conns {
    host: String,
    port: u16,
    /// How to log in (user, password, database), from the URL.
    login: RedisConnectionInfo,
    /// TLS, when the connections use it.
    tls: Option<TlsClient>,
    /// The connection every script and small command goes through, shared by clones: a
    /// multiplexed connection pipelines concurrent commands itself. Made like the dedicated
    /// ones, within the connect timeout; dropped on a connection error, and the next command
    /// makes a new one.
    shared: Mutex<Option<MultiplexedConnection>>,
    blocking: Mutex<Vec<MultiplexedConnection>>,
    bulk: Mutex<Vec<MultiplexedConnection>>,
    connect_timeout: Duration,
    /// Response timeout of the shared and named connections (scripts and small commands).
    response_timeout: Duration,
    /// The URL with its password replaced, for messages.
    pub(crate) target: String,
}

impl std::fmt::Debug for Conns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conns")
            .field("target", &self.target)
            .field("connect_timeout", &self.connect_timeout)
            .finish_non_exhaustive()
    }
}

/// Which free-list a dedicated connection comes from.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Kind {
    /// `XREAD BLOCK`: response timeout = wait + 5 s, set per use.
    Blocking,
    /// Chunk `HSET`/`HGET`: response timeout 120 s.
    Bulk,
}

/// A dedicated connection; goes back to its free-list when dropped, unless discarded.
pub(crate) struct Dedicated<'a> {
    conn: Option<MultiplexedConnection>,
    conns: &'a Conns,
    kind: Kind,
}

impl Dedicated<'_> {
    pub(crate) fn conn(&mut self) -> &mut MultiplexedConnection {
        self.conn
            .as_mut()
            .expect("a dedicated connection is present until dropped or discarded")
    }

    /// Close it instead of reusing it (after an error or a timeout it may be out of step).
    pub(crate) fn discard(mut self) {
        self.conn = None;
    }
}

impl Drop for Dedicated<'_> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            let mut list = lock(self.conns.list(self.kind));
            if list.len() < FREE_LIST_MAX {
                list.push(conn);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Conns {
    /// Set up the client (nothing is connected yet): `redis://` is plain unless `tls` names a
    /// trust; `rediss://` is TLS, with the system's roots unless `tls` says otherwise.
    pub(crate) fn new(
        url: &str,
        connect_timeout: Duration,
        response_timeout: Duration,
        tls: Option<&TlsTrust>,
    ) -> Result<Self, BrokerError> {
        use redis::IntoConnectionInfo;
        let target = dc_core::redact_url(url);
        let bad_url = |e: RedisError| {
            tracing::debug!(error = %e, "cannot use Redis URL {target}");
            BrokerError::UnsupportedUrl(target.clone())
        };
        // The redis crate parses TLS URLs only in its own TLS builds; TLS is done here.
        let (plain, secure) = match url.strip_prefix("rediss://") {
            Some(rest) => (format!("redis://{rest}"), true),
            None => (url.to_string(), false),
        };
        let info = plain.as_str().into_connection_info().map_err(bad_url)?;
        let ConnectionAddr::Tcp(host, port) = info.addr().clone() else {
            return Err(BrokerError::UnsupportedUrl(target));
        };
        let trust = match (tls, secure) {
            (Some(trust), _) => Some(trust.clone()),
            (None, true) => Some(TlsTrust::System),
            (None, false) => None,
        };
        let tls = trust
            .map(|trust| TlsClient::new(&trust, &host, port))
            .transpose()
            .map_err(|e| BrokerError::Connection(format!("{target}: {e}")))?;
        Ok(Conns {
            host,
            port,
            // No CLIENT SETINFO: a head's node user may not run it.
            login: info.redis_settings().clone().set_skip_set_lib_name(),
            tls,
            shared: Mutex::new(None),
            blocking: Mutex::new(Vec::new()),
            bulk: Mutex::new(Vec::new()),
            connect_timeout,
            response_timeout,
            target,
        })
    }

    fn list(&self, kind: Kind) -> &Mutex<Vec<MultiplexedConnection>> {
        match kind {
            Kind::Blocking => &self.blocking,
            Kind::Bulk => &self.bulk,
        }
    }

    /// The shared connection for scripts and small commands (a clone: commands from many
    /// tasks are pipelined on it).
    pub(crate) async fn control(&self) -> Result<MultiplexedConnection, BrokerError> {
        if let Some(conn) = lock(&self.shared).as_ref() {
            return Ok(conn.clone());
        }
        let conn = self.connect(self.response_timeout).await?;
        // Two tasks may have connected at once: keep the first, drop the other.
        Ok(lock(&self.shared).get_or_insert(conn).clone())
    }

    /// A dedicated connection from the free-list of `kind`, connecting a new one if it is empty.
    pub(crate) async fn dedicated(&self, kind: Kind) -> Result<Dedicated<'_>, BrokerError> {
        let reused = lock(self.list(kind)).pop();
        let conn = match reused {
            Some(conn) => conn,
            None => {
                self.connect(match kind {
                    Kind::Blocking => BLOCK_SLACK,
                    Kind::Bulk => BULK_TIMEOUT,
                })
                .await?
            }
        };
        Ok(Dedicated {
            conn: Some(conn),
            conns: self,
            kind,
        })
    }

    /// A new connection of its own, named with `CLIENT SETNAME` so that the server (and
    /// `CLIENT LIST`) can tell whose it is; it closes when its holder's process dies.
    pub(crate) async fn named(&self, name: &str) -> Result<MultiplexedConnection, BrokerError> {
        let mut conn = self.connect(self.response_timeout).await?;
        redis::cmd("CLIENT")
            .arg("SETNAME")
            .arg(name)
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| self.error(e))?;
        Ok(conn)
    }

    /// A new connection of its own, answers bounded by `response_timeout`.
    pub(crate) async fn raw(
        &self,
        response_timeout: Duration,
    ) -> Result<MultiplexedConnection, BrokerError> {
        self.connect(response_timeout).await
    }

    /// A new connection (TCP, TLS when set, then the log-in), within the connect timeout.
    async fn connect(
        &self,
        response_timeout: Duration,
    ) -> Result<MultiplexedConnection, BrokerError> {
        let config = AsyncConnectionConfig::new().set_response_timeout(Some(response_timeout));
        let made = async {
            let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
                .await
                .map_err(|e| BrokerError::Connection(format!("{}: {e}", self.target)))?;
            let _ = tcp.set_nodelay(true);
            let (conn, driver) = match &self.tls {
                Some(tls) => {
                    let stream = tls.handshake(tcp).await.map_err(|e| self.tls_error(e))?;
                    MultiplexedConnection::new_with_config(&self.login, stream, config)
                        .await
                        .map(|(c, d)| (c, futures::future::FutureExt::boxed(d)))
                }
                None => MultiplexedConnection::new_with_config(&self.login, tcp, config)
                    .await
                    .map(|(c, d)| (c, futures::future::FutureExt::boxed(d))),
            }
            .map_err(|e| self.error(e))?;
            tokio::spawn(driver);
            if let Some(tls) = &self.tls {
                tls.connected();
            }
            Ok(conn)
        };
        tokio::time::timeout(self.connect_timeout + Duration::from_millis(100), made)
            .await
            .map_err(|_| self.timed_out())?
    }

    /// A failed TLS handshake: a refused certificate is final (like a refused password); a
    /// peer that does not speak TLS is not a pool server's TLS port; anything else is
    /// transient.
    fn tls_error(&self, e: std::io::Error) -> BrokerError {
        if let Some(why) = crate::tls::refusal(&e) {
            return BrokerError::Auth(format!("{}: {why}", self.target));
        }
        if crate::tls::not_tls(&e) {
            return BrokerError::Protocol(format!(
                "{}: the service there does not speak the Redis protocol over TLS (is it the \
                 pool's port? a head started with --no-tls is reached with --no-tls): {e}",
                self.target
            ));
        }
        BrokerError::Connection(format!("{}: TLS handshake: {e}", self.target))
    }

    /// Set a blocking connection's response timeout for a read that blocks up to `wait`.
    pub(crate) fn arm(conn: &mut Dedicated<'_>, wait: Duration) {
        conn.conn().set_response_timeout(wait + BLOCK_SLACK);
    }

    pub(crate) fn timed_out(&self) -> BrokerError {
        BrokerError::Connection(format!(
            "{}: no answer within {:?}",
            self.target, self.connect_timeout
        ))
    }

    /// Classify a Redis error: auth, connection trouble (transient), session gone, or protocol.
    pub(crate) fn error(&self, e: RedisError) -> BrokerError {
        let code = e.code().unwrap_or_default();
        let text = e.to_string();
        if e.kind() == ErrorKind::AuthenticationFailed
            || matches!(code, "WRONGPASS" | "NOAUTH")
            || text.contains("WRONGPASS")
            || text.contains("NOAUTH")
            || text.contains("invalid password")
        {
            return BrokerError::Auth(format!(
                "{}: the Redis server refused the password ({text})",
                self.target
            ));
        }
        if code == "DCGONE" || text.contains("DCGONE") {
            return BrokerError::SessionGone(String::new());
        }
        if e.kind() == ErrorKind::Parse {
            // Whatever answered is not a Redis server (a web server, ssh…): not worth a retry.
            lock(&self.shared).take();
            return BrokerError::Protocol(format!(
                "{}: the service there does not speak the Redis protocol (is it the pool's port?): {text}",
                self.target
            ));
        }
        let broken = e.is_io_error()
            || e.is_timeout()
            || e.is_connection_dropped()
            || e.is_connection_refusal();
        if broken {
            // The shared connection may be the broken (or cut off) one: the next command
            // reconnects.
            lock(&self.shared).take();
        }
        if broken
            || matches!(
                e.kind(),
                ErrorKind::Server(
                    ServerErrorKind::BusyLoading
                        | ServerErrorKind::TryAgain
                        | ServerErrorKind::ClusterDown
                        | ServerErrorKind::MasterDown
                        | ServerErrorKind::ReadOnly
                )
            )
        {
            return BrokerError::Connection(format!("{}: {text}", self.target));
        }
        BrokerError::Protocol(format!("{}: {text}", self.target))
    }
}
