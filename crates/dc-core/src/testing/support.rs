//! Helpers shared by the workspace's tests and `dc-cli bench`: loopback ports, temporary
//! directories removed on drop, and a process's resident memory.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::util::lock;

/// A free loopback port (free a moment ago), never one this process handed out before: a
/// server pinned on one port must not meet another server there later in the same run.
///
/// # Errors
/// When no loopback port can be bound.
///
/// # Examples
/// ```
/// let (a, b) = (dc_core::testing::support::free_port()?, dc_core::testing::support::free_port()?);
/// assert_ne!(a, b);
/// # Ok::<(), std::io::Error>(())
/// ```
pub fn free_port() -> std::io::Result<u16> {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut given = lock(&GIVEN);
        if !given.contains(&port) {
            given.push(port);
            return Ok(port);
        }
    }
}

/// A directory removed (with everything in it) when dropped.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A new directory `dc-<name>-<pid>-<n>` under the system's temp directory (`n` counts the
    /// directories this process made).
    ///
    /// # Errors
    /// When the directory cannot be created.
    ///
    /// # Examples
    /// ```
    /// let dir = dc_core::testing::support::TempDir::new("doc")?;
    /// let path = dir.path().to_path_buf();
    /// assert!(path.is_dir());
    /// drop(dir);
    /// assert!(!path.exists());
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn new(name: &str) -> std::io::Result<Self> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("dc-{name}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(TempDir(dir))
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Resident memory of process `pid` in KiB (`VmRSS` of `/proc/<pid>/status`); `None` where
/// the process is gone or the system has no such file.
///
/// # Examples
/// ```
/// let kib = dc_core::testing::support::rss_kib(std::process::id());
/// assert!(kib.is_none_or(|k| k > 0));
/// ```
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}
