//! Connections to Redis. A broker uses three kinds, all made the same way (TCP, TLS when the
//! URL is `rediss://` or the options name a [`TlsTrust`], then the log-in, within the connect
//! timeout) and differing in what they carry and in their response timeout:
//!
//! 1. **The shared connection** carries every script and small command of a broker and its
//!    clones: a multiplexed connection pipelines concurrent commands itself. It is made on first
//!    use and kept, with no check per use (a check costs a round trip before each script);
//!    a command that finds it broken drops it, and the next command makes a new one.
//! 2. **Blocking connections** carry `XREAD BLOCK`: a read that blocks holds its connection,
//!    so it never goes on the shared one. Response timeout: the read's wait plus 5 s, set per
//!    read ([`Conns::arm`]).
//! 3. **Bulk connections** carry chunk `HSET`/`HGET` of big payloads (response timeout 120 s),
//!    so that 16 MiB chunks never delay the small commands behind them.
//!
//! Blocking and bulk connections are *dedicated*: each comes from a pool of its kind, a
//! `deadpool` pool whose manager ([`Dialer`]) makes connections as above and recycles them
//! without a check. The rules of these pools:
//!
//! 1. A holder hands its connection back by dropping it. After an error or a timeout it
//!    [discards](Dedicated::discard) it instead (the connection may be out of step): the
//!    connection leaves the pool and closes.
//! 2. A pool holds at most [`POOL_MAX`] connections, in use and idle together. Every idle worker
//!    slot of a node blocks on a connection of its own, so a node keeps about one per slot:
//!    closing them after each wait made a 1,000-slot node reconnect (TCP, `AUTH`, `HELLO`) on
//!    nearly every idle moment, which cost a quarter of its throughput.
//! 3. A caller never waits for another's connection: when all [`POOL_MAX`] are in use, it gets
//!    one of its own, made the same way and closed when dropped. So up to 1,024 worker slots
//!    (and a pool's result reader) reuse their connections; slots beyond that reconnect for each
//!    wait, and none blocks behind another.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use dc_core::util::lock;
use dc_core::{BrokerError, Cause};
use deadpool::managed::{self, Metrics, Object, Pool, PoolError, QueueMode, Timeouts};
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
/// Dedicated connections a pool holds, per kind (see the module docs).
pub(crate) const POOL_MAX: usize = 1024;
/// Checking a connection out of a pool never waits: a full pool answers at once.
const NO_WAIT: Timeouts = Timeouts {
    wait: Some(Duration::ZERO),
    create: None,
    recycle: None,
};

/// Every connection this broker opens.
pub(crate) struct Conns {
    server: Arc<Server>,
    blocking: Pool<Dialer>,
    bulk: Pool<Dialer>,
}

impl std::fmt::Debug for Conns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conns")
            .field("target", &self.server.target)
            .field("connect_timeout", &self.server.connect_timeout)
            .finish_non_exhaustive()
    }
}

/// Where the server is, how to log in, and the shared connection.
pub(crate) struct Server {
    host: String,
    port: u16,
    /// How to log in (user, password, database), from the URL.
    login: RedisConnectionInfo,
    /// TLS, when the connections use it.
    tls: Option<TlsClient>,
    /// The shared connection (see the module docs), shared by clones of the broker.
    shared: Mutex<Option<MultiplexedConnection>>,
    connect_timeout: Duration,
    /// Response timeout of the shared and named connections (scripts and small commands).
    response_timeout: Duration,
    /// The URL with its password replaced, for messages.
    target: String,
}

/// Which pool a dedicated connection comes from.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Kind {
    /// `XREAD BLOCK`: response timeout = wait + 5 s, set per use.
    Blocking,
    /// Chunk `HSET`/`HGET`: response timeout 120 s.
    Bulk,
}

impl Kind {
    /// The response timeout a new connection of this kind starts with.
    fn response_timeout(self) -> Duration {
        match self {
            Kind::Blocking => BLOCK_SLACK,
            Kind::Bulk => BULK_TIMEOUT,
        }
    }
}

/// The manager of a dedicated pool: makes connections of one kind, recycles them unchecked.
pub(crate) struct Dialer {
    server: Arc<Server>,
    kind: Kind,
}

impl std::fmt::Debug for Dialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dialer")
            .field("target", &self.server.target)
            .field("kind", &self.kind)
            .finish()
    }
}

impl managed::Manager for Dialer {
    type Type = MultiplexedConnection;
    type Error = BrokerError;

    async fn create(&self) -> Result<MultiplexedConnection, BrokerError> {
        self.server.connect(self.kind.response_timeout()).await
    }

    async fn recycle(
        &self,
        _conn: &mut MultiplexedConnection,
        _metrics: &Metrics,
    ) -> managed::RecycleResult<BrokerError> {
        // No check: a connection that broke while idle fails its next command, which
        // discards it.
        Ok(())
    }
}

/// A dedicated connection; back to its pool when dropped, unless discarded.
pub(crate) enum Dedicated {
    /// Out of the pool.
    Pooled(Object<Dialer>),
    /// Made because the pool was full: closed when dropped.
    Own(MultiplexedConnection),
}

impl std::fmt::Debug for Dedicated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Dedicated::Pooled(_) => "Dedicated::Pooled",
            Dedicated::Own(_) => "Dedicated::Own",
        })
    }
}

impl Dedicated {
    pub(crate) fn conn(&mut self) -> &mut MultiplexedConnection {
        match self {
            Dedicated::Pooled(conn) => conn,
            Dedicated::Own(conn) => conn,
        }
    }

    /// Close it instead of reusing it (after an error or a timeout it may be out of step).
    pub(crate) fn discard(self) {
        match self {
            Dedicated::Pooled(conn) => drop(Object::take(conn)),
            Dedicated::Own(conn) => drop(conn),
        }
    }

    /// Hand it back after success; discard it after an error.
    pub(crate) fn finish<T>(self, result: redis::RedisResult<T>) -> redis::RedisResult<T> {
        if result.is_err() {
            self.discard();
        }
        result
    }
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
        let server = Arc::new(Server::new(url, connect_timeout, response_timeout, tls)?);
        let pool = |kind| {
            let dialer = Dialer {
                server: Arc::clone(&server),
                kind,
            };
            // Most recently used first: the idle connections beyond the busiest moment's
            // needs are the ones that stay unused.
            Pool::builder(dialer)
                .max_size(POOL_MAX)
                .queue_mode(QueueMode::Lifo)
                .build()
                .map_err(|e| BrokerError::Connection(format!("{}: {e}", server.target).into()))
        };
        Ok(Conns {
            blocking: pool(Kind::Blocking)?,
            bulk: pool(Kind::Bulk)?,
            server,
        })
    }

    /// The URL with its password replaced, for messages.
    pub(crate) fn target(&self) -> &str {
        &self.server.target
    }

    /// The shared connection for scripts and small commands (a clone: commands from many
    /// tasks are pipelined on it).
    pub(crate) async fn control(&self) -> Result<MultiplexedConnection, BrokerError> {
        if let Some(conn) = lock(&self.server.shared).as_ref() {
            return Ok(conn.clone());
        }
        let conn = self.server.connect(self.server.response_timeout).await?;
        // Two tasks may have connected at once: keep the first, drop the other.
        Ok(lock(&self.server.shared).get_or_insert(conn).clone())
    }

    /// A dedicated connection of `kind`: an idle one from its pool, a new one in the pool, or,
    /// when the pool is full, a new one of its own.
    pub(crate) async fn dedicated(&self, kind: Kind) -> Result<Dedicated, BrokerError> {
        let pool = match kind {
            Kind::Blocking => &self.blocking,
            Kind::Bulk => &self.bulk,
        };
        match pool.timeout_get(&NO_WAIT).await {
            Ok(conn) => Ok(Dedicated::Pooled(conn)),
            Err(PoolError::Backend(e)) => Err(e),
            Err(PoolError::Timeout(_)) => self
                .server
                .connect(kind.response_timeout())
                .await
                .map(Dedicated::Own),
            // The pool is never closed and has no hooks.
            Err(other) => Err(BrokerError::Connection(
                format!("{}: {other}", self.server.target).into(),
            )),
        }
    }

    /// A new connection of its own, named with `CLIENT SETNAME` so that the server (and
    /// `CLIENT LIST`) can tell whose it is; it closes when its holder's process dies.
    pub(crate) async fn named(&self, name: &str) -> Result<MultiplexedConnection, BrokerError> {
        let mut conn = self.server.connect(self.server.response_timeout).await?;
        redis::cmd("CLIENT")
            .arg("SETNAME")
            .arg(name)
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| self.error(e))?;
        Ok(conn)
    }

    /// Set a blocking connection's response timeout for a read that blocks up to `wait`.
    pub(crate) fn arm(conn: &mut Dedicated, wait: Duration) {
        conn.conn().set_response_timeout(wait + BLOCK_SLACK);
    }

    pub(crate) fn timed_out(&self) -> BrokerError {
        self.server.timed_out()
    }

    /// Classify a Redis error: auth, connection trouble (transient), session gone, or protocol.
    pub(crate) fn error(&self, e: RedisError) -> BrokerError {
        self.server.error(e)
    }
}

impl Server {
    /// Where and how to connect (nothing is connected yet): `redis://` is plain unless `tls`
    /// names a trust; `rediss://` is TLS, with the system's roots unless `tls` says otherwise.
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
            .map_err(|e| BrokerError::Connection(format!("{target}: {e}").into()))?;
        Ok(Server {
            host,
            port,
            // No CLIENT SETINFO: a head's node user may not run it.
            login: info.redis_settings().clone().set_skip_set_lib_name(),
            tls,
            shared: Mutex::new(None),
            connect_timeout,
            response_timeout,
            target,
        })
    }

    /// A new connection (TCP, TLS when set, then the log-in), within the connect timeout.
    pub(crate) async fn connect(
        &self,
        response_timeout: Duration,
    ) -> Result<MultiplexedConnection, BrokerError> {
        let config = AsyncConnectionConfig::new().set_response_timeout(Some(response_timeout));
        let made = async {
            let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
                .await
                .map_err(|e| {
                    BrokerError::Connection(Cause::with_source(format!("{}: {e}", self.target), e))
                })?;
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
            return BrokerError::Auth(format!("{}: {why}", self.target).into());
        }
        if crate::tls::not_tls(&e) {
            return BrokerError::Protocol(
                format!(
                    "{}: the service there does not speak the Redis protocol over TLS (is it the \
                 pool's port? a head started with --no-tls is reached with --no-tls): {e}",
                    self.target
                )
                .into(),
            );
        }
        BrokerError::Connection(Cause::with_source(
            format!("{}: TLS handshake: {e}", self.target),
            e,
        ))
    }

    fn timed_out(&self) -> BrokerError {
        BrokerError::Connection(
            format!(
                "{}: no answer within {:?}",
                self.target, self.connect_timeout
            )
            .into(),
        )
    }

    /// Classify a Redis error (see [`Conns::error`]); on connection trouble the shared
    /// connection is dropped, since it may be the broken one.
    fn error(&self, e: RedisError) -> BrokerError {
        let code = e.code().unwrap_or_default();
        let text = e.to_string();
        if e.kind() == ErrorKind::AuthenticationFailed
            || matches!(code, "WRONGPASS" | "NOAUTH")
            || text.contains("WRONGPASS")
            || text.contains("NOAUTH")
            || text.contains("invalid password")
        {
            return BrokerError::Auth(
                format!(
                    "{}: the Redis server refused the password ({text})",
                    self.target
                )
                .into(),
            );
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
            ).into());
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
            return BrokerError::Connection(Cause::with_source(
                format!("{}: {text}", self.target),
                e,
            ));
        }
        BrokerError::Protocol(Cause::with_source(format!("{}: {text}", self.target), e))
    }
}
