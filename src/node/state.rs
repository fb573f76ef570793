//! The state directory of a node: one node per directory, held by a lock the kernel releases
//! when the process dies, and a pid file `dc-cli stop` trusts only when the lock's holder wrote
//! it.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::{NodeError, default_state_dir};

/// Holds a state directory for one node: released when dropped (or when the process dies).
///
/// 1. The directory is created 0700 (an existing one must be ours and not writable by others).
/// 2. `node.lock` is opened without following a symlink and locked (`flock`, exclusive).
/// 3. `node.pid` is written new (0600, under a temporary name) and renamed into place, so a
///    planted `node.pid` symlink is replaced, never followed.
/// 4. `dc-cli stop` signals a pid only when the kernel says that process holds the lock and
///    `node.pid` names it ([`node_pid`]).
#[derive(Debug)]
pub(super) struct StateLock {
    _lock: nix::fcntl::Flock<File>,
    dir: PathBuf,
}

/// `open` flags for every file of the state dir: never follow a symlink, never block on a FIFO.
fn no_follow() -> i32 {
    (nix::fcntl::OFlag::O_NOFOLLOW | nix::fcntl::OFlag::O_NONBLOCK).bits()
}

/// Create `dir` (0700) or check that an existing one is a directory of ours that no one else
/// can write to.
pub(super) fn prepare_state_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let meta = std::fs::metadata(dir)?;
    let refuse = |why: String| {
        Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            why,
        ))
    };
    if !meta.is_dir() {
        return refuse("not a directory".into());
    }
    if effective_uid().is_some_and(|me| meta.uid() != me) {
        return refuse(format!(
            "owned by uid {}, not by this user: use a state dir of your own",
            meta.uid()
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return refuse(format!(
            "writable by other users (mode {:o}): chmod 700 it",
            meta.mode() & 0o7777
        ));
    }
    Ok(())
}

/// This process's effective uid (from `/proc/self/status`).
fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let uids = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    uids.split_whitespace().nth(1)?.parse().ok()
}

/// Open a state-dir file for reading, refusing symlinks and anything but a regular file.
pub(super) fn open_regular(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(no_follow())
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} is not a regular file", path.display()),
        ));
    }
    Ok(file)
}

/// Write `contents` to `dir/name` as a new 0600 file renamed into place (a symlink or a file
/// already at `name` is replaced, not written through).
pub(super) fn write_private_file(dir: &Path, name: &str, contents: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let temp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&temp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(no_follow())
        .open(&temp)?;
    let written = file.write_all(contents).and_then(|()| file.sync_all());
    drop(file);
    match written.and_then(|()| std::fs::rename(&temp, dir.join(name))) {
        Ok(()) => Ok(()),
        Err(e) => {
            let _ = std::fs::remove_file(&temp);
            Err(e)
        }
    }
}

/// The pid written in `dir/node.pid`, if it is a regular file holding one.
fn read_pid_file(dir: &Path) -> Option<u32> {
    use std::io::Read;
    let mut text = String::new();
    open_regular(&dir.join("node.pid"))
        .ok()?
        .take(32)
        .read_to_string(&mut text)
        .ok()?;
    text.trim().parse().ok()
}

impl StateLock {
    pub(super) fn acquire(dir: &Path) -> Result<Self, NodeError> {
        use std::os::unix::fs::OpenOptionsExt;
        let io = |source| NodeError::StateDir {
            dir: dir.to_path_buf(),
            source,
        };
        prepare_state_dir(dir).map_err(io)?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .custom_flags(no_follow())
            .open(dir.join("node.lock"))
            .map_err(io)?;
        if !file.metadata().map_err(io)?.is_file() {
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "node.lock is not a regular file",
            )));
        }
        let lock = match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        {
            Ok(lock) => lock,
            Err((_, _)) => {
                return Err(NodeError::AlreadyRunning {
                    pid: shown_pid(dir),
                    dir: dir.to_path_buf(),
                });
            }
        };
        write_private_file(
            dir,
            "node.pid",
            format!("{}\n", std::process::id()).as_bytes(),
        )
        .map_err(io)?;
        Ok(StateLock {
            _lock: lock,
            dir: dir.to_path_buf(),
        })
    }

    pub(super) fn is_held(dir: &Path) -> bool {
        let Ok(file) = open_regular(&dir.join("node.lock")) else {
            return false;
        };
        nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).is_err()
    }

    /// The pid of the process holding `dir/node.lock`, as the kernel lists it in `/proc/locks`.
    fn holder(dir: &Path) -> Option<u32> {
        use std::os::unix::fs::MetadataExt;
        let meta = open_regular(&dir.join("node.lock")).ok()?.metadata().ok()?;
        let device = format!(
            "{:02x}:{:02x}:{}",
            nix::sys::stat::major(meta.dev()),
            nix::sys::stat::minor(meta.dev()),
            meta.ino()
        );
        let table = std::fs::read_to_string("/proc/locks").ok()?;
        let flocks: Vec<(u32, &str)> = table
            .lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                // "1: FLOCK  ADVISORY  WRITE 12345 fe:00:10010695 0 EOF"; waiters carry "->".
                match fields.as_slice() {
                    [_, "FLOCK", _, "WRITE", pid, id, ..] => Some((pid.parse().ok()?, *id)),
                    _ => None,
                }
            })
            .collect();
        if let Some((pid, _)) = flocks.iter().find(|(_, id)| *id == device) {
            return Some(*pid);
        }
        // Stacked file systems (overlayfs) may list another device: the inode alone, if unique.
        let inode = format!(":{}", meta.ino());
        let mut same: Vec<u32> = flocks
            .iter()
            .filter(|(_, id)| id.ends_with(&inode))
            .map(|(pid, _)| *pid)
            .collect();
        same.dedup();
        (same.len() == 1).then(|| same[0])
    }
}

/// The pid a running node recorded, for messages.
pub(super) fn shown_pid(dir: &Path) -> String {
    read_pid_file(dir)
        .map(|pid| pid.to_string())
        .unwrap_or_else(|| "unknown".into())
}

impl Drop for StateLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.dir.join("node.pid"));
    }
}

/// Whether a node runs with the default state directory on this machine (false when there is
/// no default state directory: see [`default_state_dir`]).
pub fn is_node_running() -> bool {
    default_state_dir().is_ok_and(|dir| is_node_running_in(&dir))
}

/// Whether a node runs with state directory `dir`.
pub fn is_node_running_in(dir: &Path) -> bool {
    StateLock::is_held(dir)
}

/// Who runs with state directory `dir`, as [`node_pid_checked`] tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum NodeProcess {
    /// No process holds the directory's lock.
    None,
    /// This process holds the lock and wrote `node.pid`: it is the node.
    Running(u32),
    /// The lock is held, but `node.pid` does not name its holder (planted, stale, or another
    /// program holds the lock): nothing should be signalled.
    Unverified {
        /// The holder of the lock, if the kernel could tell.
        holder: Option<u32>,
        /// What `node.pid` says, if it holds a pid.
        recorded: Option<u32>,
    },
}

/// The pid of the node running with state directory `dir`: `Some` only when a process holds
/// the directory's lock and `node.pid` names that very process.
pub fn node_pid(dir: &Path) -> Option<u32> {
    match node_pid_checked(dir) {
        NodeProcess::Running(pid) => Some(pid),
        _ => None,
    }
}

/// Who holds state directory `dir`: the lock's holder (from the kernel's lock table) checked
/// against the pid `node.pid` records.
pub fn node_pid_checked(dir: &Path) -> NodeProcess {
    if !StateLock::is_held(dir) {
        return NodeProcess::None;
    }
    let holder = StateLock::holder(dir);
    let recorded = read_pid_file(dir);
    match (holder, recorded) {
        (Some(h), Some(r)) if h == r => NodeProcess::Running(h),
        _ => NodeProcess::Unverified { holder, recorded },
    }
}
