//! Head nodes: a pool server and a worker node on this machine, the node reaching the server
//! where it listens with the server's own join token.

use std::path::PathBuf;

use super::state::{StateLock, shown_pid};
use super::{
    NodeError, NodeHandle, NodeOptions, ServerHandle, ServerOptions, default_state_dir, start_node,
    start_server,
};

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
    #[must_use]
    pub fn port(mut self, port: u16) -> Self {
        self.server = self.server.port(port);
        self.node = self.node.port(port);
        self
    }

    /// Addresses the server listens on (default: every interface).
    #[must_use]
    pub fn bind(mut self, addresses: Vec<String>) -> Self {
        self.server = self.server.bind(addresses);
        self
    }

    /// The state directory of both the server and the local node.
    #[must_use]
    pub fn state_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        let dir = dir.into();
        self.server = self.server.state_dir(dir.clone());
        self.node = self.node.state_dir(dir);
        self
    }

    /// Change the local node's options (GPUs, CPU workers, worker program…).
    #[must_use]
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
