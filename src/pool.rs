//! The facade's [`Pool`] and [`PoolBuilder`]: `dc_core`'s pool with the [`Backends`]
//! connector preset, so `Pool::<W>::builder(init)` reaches head nodes and broker URLs without
//! naming a backend.
//!
//! Both are thin newtypes. `dc_core::Pool<W>` holds no backend in its type: its builder holds
//! the connector as a value (`Arc<dyn Connector>`, default [`LocalOnly`], which refuses network
//! targets). A type alias cannot change what `builder()` starts from, so the facade wraps:
//! - [`PoolBuilder<W>`] wraps `dc_core::PoolBuilder<W>` with `Arc::new(Backends::default())`
//!   preset, forwards every builder method, and its `connect` returns the facade's [`Pool`];
//!   [`PoolBuilder::backends`] sets a [`Backends`] value with options of its own, and
//!   [`PoolBuilder::connector`] any [`Connector`].
//! - [`Pool<W>`] wraps `dc_core::Pool<W>` and dereferences to it, so every method of the pool
//!   (`map`, `imap_unordered`, `update_workers`, `workers_count`, `close`, …) is called on it
//!   directly, and a `&Pool<W>` passes where a `&dc_core::Pool<W>` is expected. It is
//!   `Send + Sync` like the pool it wraps; share it in an `Arc`.
//!
//! [`LocalOnly`]: dc_core::LocalOnly

use std::ops::Deref;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use dc_core::{Broker, Connector, PoolError, Worker};
use dc_gpu::GpuSelection;

use crate::Backends;

/// A pool of workers of kind `W`, reaching head nodes and brokers through [`Backends`].
///
/// It dereferences to [`dc_core::Pool`], where its methods are documented: `map`,
/// `imap_unordered`, `update_workers`, `workers_count`, `nodes_count`, `close`, and more.
///
/// # Examples
/// ```no_run
/// use distributed_computing::{BoxError, Pool, PoolError, Worker, WorkerContext};
///
/// struct Double;
/// impl Worker for Double {
///     const KIND: &'static str = "double";
///     type Init = ();
///     type Job = u32;
///     type Output = u32;
///     type Update = ();
///     fn new(_: (), _: &WorkerContext) -> Result<Self, BoxError> { Ok(Double) }
///     fn run(&mut self, job: u32) -> Result<u32, BoxError> { Ok(job * 2) }
/// }
///
/// # async fn demo() -> Result<(), PoolError> {
/// let pool = Pool::<Double>::builder(())
///     .address("194.173.121.37")
///     .password("123456")
///     .connect()
///     .await?;
/// assert_eq!(pool.map(vec![1, 2, 3]).await?, vec![2, 4, 6]);
/// pool.close().await?;
/// # Ok(()) }
/// ```
pub struct Pool<W: Worker>(dc_core::Pool<W>);

impl<W: Worker> Pool<W> {
    /// Start building a pool whose workers are built with `init`; it reaches head nodes and
    /// broker URLs through [`Backends::default()`].
    pub fn builder(init: W::Init) -> PoolBuilder<W> {
        PoolBuilder(dc_core::Pool::<W>::builder(init).connector(Arc::new(Backends::default())))
    }

    /// The `dc_core` pool this wraps.
    pub fn into_inner(self) -> dc_core::Pool<W> {
        self.0
    }
}

impl<W: Worker> Deref for Pool<W> {
    type Target = dc_core::Pool<W>;

    fn deref(&self) -> &dc_core::Pool<W> {
        &self.0
    }
}

impl<W: Worker> AsRef<dc_core::Pool<W>> for Pool<W> {
    fn as_ref(&self) -> &dc_core::Pool<W> {
        &self.0
    }
}

impl<W: Worker> From<dc_core::Pool<W>> for Pool<W> {
    fn from(pool: dc_core::Pool<W>) -> Self {
        Pool(pool)
    }
}

impl<W: Worker> std::fmt::Debug for Pool<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Builds a [`Pool`]: say where the workers are, then `connect`. Every option is that of
/// [`dc_core::PoolBuilder`], documented there; the connector starts as
/// [`Backends::default()`].
///
/// # Examples
/// ```
/// use std::time::Duration;
/// use distributed_computing::{BoxError, Pool, PoolError, Worker, WorkerContext};
///
/// # struct Double;
/// # impl Worker for Double {
/// #     const KIND: &'static str = "double";
/// #     type Init = (); type Job = u32; type Output = u32; type Update = ();
/// #     fn new(_: (), _: &WorkerContext) -> Result<Self, BoxError> { Ok(Double) }
/// #     fn run(&mut self, job: u32) -> Result<u32, BoxError> { Ok(job * 2) }
/// # }
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// // Nothing listens on port 9 of this machine.
/// let refused = Pool::<Double>::builder(())
///     .broker("redis://127.0.0.1:9")
///     .connect_timeout(Duration::from_millis(300))
///     .connect()
///     .await;
/// assert!(matches!(refused, Err(PoolError::Unreachable(_))));
/// # });
/// ```
#[must_use = "a builder does nothing until `connect`"]
pub struct PoolBuilder<W: Worker>(dc_core::PoolBuilder<W>);

/// Builder methods that take `self` and options and return the builder, forwarded to
/// `dc_core::PoolBuilder`.
macro_rules! forward {
    ($($(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),*);)*) => {$(
        $(#[$doc])*
        #[doc = ""]
        #[doc = concat!("See [`dc_core::PoolBuilder::", stringify!($name), "`].")]
        pub fn $name(self, $($arg: $ty),*) -> Self {
            PoolBuilder(self.0.$name($($arg),*))
        }
    )*};
}

impl<W: Worker> PoolBuilder<W> {
    forward! {
        /// How long `connect` tries to reach a head node or broker (default 5 s).
        fn connect_timeout(timeout: Duration);
        /// How long a call rides out a broker it cannot reach (default 60 s).
        fn broker_outage_timeout(timeout: Duration);
        /// The pool password.
        fn password(password: impl Into<String>);
        /// A head's join token (`dc1:…`).
        fn token(token: &str);
        /// The CA certificate file that a `rediss://` broker's certificate must chain to.
        fn tls_ca(path: impl Into<PathBuf>);
        /// The known-heads file that pins a head reached with a password.
        fn known_heads(path: impl Into<PathBuf>);
        /// Speak plain Redis to a head started with `--no-tls`.
        fn no_tls();
        /// The head node's address (default `localhost`).
        fn address(address: impl Into<String>);
        /// The head node's pool port (default [`DEFAULT_PORT`](crate::DEFAULT_PORT)).
        fn port(port: u16);
        /// An existing broker by URL (`redis://`, `rediss://`).
        fn broker(url: impl Into<String>);
        /// A broker object built by the caller.
        fn broker_instance(broker: Arc<dyn Broker>);
        /// Embedded mode: no server; worker processes on this machine.
        fn local();
        /// Failed attempts before a job fails for good (default 3).
        fn max_attempts(n: u32);
        /// How long a job's lease (and the pool's session) lives without renewal.
        fn lease(lease: Duration);
        /// Automatic batching of tiny jobs (default on).
        fn auto_batching(on: bool);
        /// Local mode: CPU worker processes when there is no GPU.
        fn cpu_workers(n: usize);
        /// Local mode: which GPUs to use (default: all visible).
        fn gpus(gpus: GpuSelection);
        /// Local mode: worker processes per GPU (default 1).
        fn workers_per_gpu(n: usize);
        /// Local mode: run workers from this program instead of the current executable.
        fn worker_program(path: impl Into<PathBuf>);
        /// How this pool reaches head nodes and broker URLs, in place of [`Backends`].
        fn connector(connector: Arc<dyn Connector>);
    }

    /// Reach head nodes and broker URLs through `backends`, a [`Backends`] with options of its
    /// own (Redis options, a CA file, a known-heads file).
    ///
    /// # Examples
    /// ```
    /// use distributed_computing::{Backends, BoxError, Pool, Worker, WorkerContext};
    ///
    /// # struct Double;
    /// # impl Worker for Double {
    /// #     const KIND: &'static str = "double";
    /// #     type Init = (); type Job = u32; type Output = u32; type Update = ();
    /// #     fn new(_: (), _: &WorkerContext) -> Result<Self, BoxError> { Ok(Double) }
    /// #     fn run(&mut self, job: u32) -> Result<u32, BoxError> { Ok(job * 2) }
    /// # }
    /// let builder = Pool::<Double>::builder(())
    ///     .broker("rediss://redis.internal:6380/0")
    ///     .backends(Backends::new().tls_ca("/etc/ssl/private-ca.pem"));
    /// # let _ = builder;
    /// ```
    pub fn backends(self, backends: Backends) -> Self {
        self.connector(Arc::new(backends))
    }

    /// Connect: open a session (waiting while another pool is active) and, in local mode,
    /// start the worker processes.
    ///
    /// # Errors
    /// As [`dc_core::PoolBuilder::connect`]; reaching a head node or broker URL fails as
    /// [`Backends`] does ([`PoolError::Auth`], [`PoolError::Unreachable`],
    /// [`PoolError::Config`]).
    pub async fn connect(self) -> Result<Pool<W>, PoolError> {
        self.0.connect().await.map(Pool)
    }

    /// The `dc_core` builder this wraps, its connector included.
    pub fn into_inner(self) -> dc_core::PoolBuilder<W> {
        self.0
    }
}

impl<W: Worker> From<dc_core::PoolBuilder<W>> for PoolBuilder<W> {
    /// Wrap a `dc_core` builder as it is, its connector included.
    fn from(builder: dc_core::PoolBuilder<W>) -> Self {
        PoolBuilder(builder)
    }
}

impl<W: Worker> std::fmt::Debug for PoolBuilder<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}
