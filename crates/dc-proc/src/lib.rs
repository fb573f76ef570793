//! Supervised child processes for distributed-computing: spawning isolated worker processes
//! (and services such as the head node's redis-server), and stopping them.
//!
//! Every spawned process:
//!
//! 1. is forked from one long-lived supervisor thread, because `PR_SET_PDEATHSIG` fires when the
//!    *thread* that forked the child exits, not the process;
//! 2. gets its own process group, so a stop reaches the grandchildren a user's code starts (such
//!    as data loaders);
//! 3. gets `PR_SET_PDEATHSIG = SIGKILL`, so a node killed by SIGKILL leaves no worker holding GPU
//!    memory, and exits at once if its parent died before the signal was set;
//! 4. loses the pool's secrets ([`SECRET_ENV`]) from its environment;
//! 5. as a worker, gets one end of a Unix socket as file descriptor [`CHANNEL_FD`]: the dedicated
//!    channel for protocol frames, since user code prints to stdout.
//!
//! A stop ([`stop_group`]) sends SIGTERM to the group, waits a grace period, then sends SIGKILL
//! to the group and reaps the child.

use std::ffi::OsString;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

pub use nix::sys::signal::Signal;
use nix::sys::signal::killpg;
use nix::unistd::Pid;
use tokio::process::{Child, Command};

/// The file descriptor on which a worker process finds its protocol channel.
pub const CHANNEL_FD: i32 = 3;
/// Environment variable telling a worker process which descriptor holds its channel.
pub const CHANNEL_FD_ENV: &str = "DC_WORKER_FD";

/// What to start: program, arguments and the extra environment of one worker process.
#[derive(Debug, Clone)]
pub struct SpawnSpec {
    /// The executable (by default the node's own executable).
    pub program: PathBuf,
    /// Its arguments (for a Rust node binary: the hidden worker sub-command).
    pub args: Vec<OsString>,
    /// Variables added to the inherited environment (device isolation, worker identity).
    pub env: Vec<(String, String)>,
}

/// A spawned worker process and the agent's end of its protocol channel.
#[derive(Debug)]
pub struct SpawnedWorker {
    /// The child; its stdout and stderr are piped for the agent to forward.
    pub child: Child,
    /// The child's pid, which is also its process group id.
    pub pid: u32,
    /// The agent's end of the protocol channel.
    pub channel: UnixStream,
}

enum SpawnKind {
    /// A worker process: protocol channel on fd 3, piped stdout/stderr.
    Worker,
    /// A service (such as the head node's redis-server): inherited stdio, no channel.
    Service,
}

struct SpawnRequest {
    spec: SpawnSpec,
    kind: SpawnKind,
    runtime: tokio::runtime::Handle,
    reply: mpsc::SyncSender<io::Result<(Child, Option<UnixStream>)>>,
}

fn supervisor() -> io::Result<&'static mpsc::Sender<SpawnRequest>> {
    static SUPERVISOR: OnceLock<mpsc::Sender<SpawnRequest>> = OnceLock::new();
    if let Some(tx) = SUPERVISOR.get() {
        return Ok(tx);
    }
    let (tx, rx) = mpsc::channel::<SpawnRequest>();
    // The thread lives as long as the process: the statics keep the sender alive forever.
    std::thread::Builder::new()
        .name("dc-spawn-supervisor".into())
        .spawn(move || {
            for req in rx {
                let _guard = req.runtime.enter();
                let _ = req.reply.send(spawn_here(req.spec, req.kind));
            }
        })?;
    // A racing caller may have installed its own sender first; either thread works, and the
    // loser's thread ends once its sender (dropped here) is gone.
    Ok(SUPERVISOR.get_or_init(|| tx))
}

async fn spawn_via_supervisor(
    spec: SpawnSpec,
    kind: SpawnKind,
) -> io::Result<(Child, Option<UnixStream>)> {
    let runtime = tokio::runtime::Handle::current();
    let (reply, rx) = mpsc::sync_channel(1);
    supervisor()?
        .send(SpawnRequest {
            spec,
            kind,
            runtime,
            reply,
        })
        .map_err(|_| io::Error::other("spawn supervisor thread is gone"))?;
    tokio::task::spawn_blocking(move || {
        rx.recv()
            .unwrap_or_else(|_| Err(io::Error::other("spawn supervisor thread is gone")))
    })
    .await
    .map_err(io::Error::other)?
}

/// Spawn one isolated worker process from the supervisor thread.
///
/// The child gets: its own process group, `PR_SET_PDEATHSIG = SIGKILL`, stdin from `/dev/null`,
/// piped stdout and stderr, and the channel on descriptor [`CHANNEL_FD`] (announced in
/// [`CHANNEL_FD_ENV`]).
///
/// # Errors
/// When the program cannot be started (missing, not executable) or the socket pair fails.
pub async fn spawn_isolated(spec: SpawnSpec) -> io::Result<SpawnedWorker> {
    let (child, channel) = spawn_via_supervisor(spec, SpawnKind::Worker).await?;
    let pid = child
        .id()
        .ok_or_else(|| io::Error::other("worker process exited before its pid was read"))?;
    let channel = channel.ok_or_else(|| io::Error::other("worker spawned without a channel"))?;
    Ok(SpawnedWorker {
        child,
        pid,
        channel,
    })
}

/// Spawn a supervised service process (the head node's redis-server): its own process group
/// and a parent-death signal, like a worker, but with stdin from `/dev/null`, stdout and stderr
/// inherited, and no protocol channel. `kill_on_drop` is set.
///
/// # Errors
/// When the program cannot be started.
pub async fn spawn_service(spec: SpawnSpec) -> io::Result<Child> {
    spawn_via_supervisor(spec, SpawnKind::Service)
        .await
        .map(|(child, _)| child)
}

/// Environment variables that hold a pool's secrets: removed from every spawned process's
/// environment (workers and the pool server).
pub const SECRET_ENV: &[&str] = &["DC_PASSWORD", "DC_TOKEN"];

fn spawn_here(spec: SpawnSpec, kind: SpawnKind) -> io::Result<(Child, Option<UnixStream>)> {
    let parent_pid = libc::pid_t::try_from(std::process::id()).map_err(io::Error::other)?;
    let mut cmd = Command::new(&spec.program);
    cmd.args(&spec.args);
    // The node's secrets stay with the node: job code and the pool server never see them.
    for secret in SECRET_ENV {
        cmd.env_remove(secret);
    }
    cmd.envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .process_group(0)
        .kill_on_drop(true);
    let channel = match kind {
        SpawnKind::Worker => {
            cmd.env(CHANNEL_FD_ENV, CHANNEL_FD.to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            Some(UnixStream::pair()?)
        }
        SpawnKind::Service => None,
    };
    let child_fd = channel.as_ref().map(|(_, theirs)| theirs.as_raw_fd());
    #[expect(
        unsafe_code,
        reason = "pre_exec runs in the forked child; the closure only makes async-signal-safe \
                  system calls (prctl, getppid, fcntl, dup2, _exit) on values copied in before \
                  the fork, and allocates nothing"
    )]
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl: then nobody would signal us.
            if libc::getppid() != parent_pid {
                libc::_exit(1);
            }
            let Some(child_fd) = child_fd else {
                return Ok(());
            };
            if child_fd == CHANNEL_FD {
                // Same number: only the close-on-exec flag must go.
                let flags = libc::fcntl(child_fd, libc::F_GETFD);
                if flags < 0 || libc::fcntl(child_fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0
                {
                    return Err(io::Error::last_os_error());
                }
            } else if libc::dup2(child_fd, CHANNEL_FD) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    // Our copy of the child's end closes here, so the channel ends when the child does.
    Ok((child, channel.map(|(ours, _theirs)| ours)))
}

/// Send `signal` to the whole process group led by `pid`. A group that is already gone is fine.
pub fn signal_group(pid: u32, signal: Signal) {
    let Ok(raw) = i32::try_from(pid) else { return };
    let _ = killpg(Pid::from_raw(raw), signal);
}

/// Stop a worker process: SIGTERM to its group, up to `grace` to exit, then SIGKILL to the
/// group, and reap it. Returns how it ended.
///
/// # Errors
/// Only when waiting for the child fails at the OS level.
pub async fn stop_group(child: &mut Child, grace: Duration) -> io::Result<ExitStatus> {
    let pid = child.id();
    if let Some(pid) = pid {
        signal_group(pid, Signal::SIGTERM);
        if let Ok(status) = tokio::time::timeout(grace, child.wait()).await {
            // The leader is gone; grandchildren in its group may not be.
            signal_group(pid, Signal::SIGKILL);
            return status;
        }
        signal_group(pid, Signal::SIGKILL);
    }
    child.wait().await
}

/// How a process ended, in words: "exited with code 3", "killed by signal 9 (SIGKILL)".
#[must_use]
pub fn describe_exit(status: &ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(code) = status.code() {
        return format!("exited with code {code}");
    }
    match status.signal() {
        Some(sig) => {
            let name = Signal::try_from(sig)
                .map(|s| s.as_str().to_string())
                .unwrap_or_else(|_| "unknown".into());
            let core = if status.core_dumped() {
                ", core dumped"
            } else {
                ""
            };
            format!("killed by signal {sig} ({name}{core})")
        }
        None => format!("ended ({status})"),
    }
}

/// In a worker process: adopt the protocol channel its agent passed on [`CHANNEL_FD`].
///
/// Returns `None` when this process was not started as a worker (no [`CHANNEL_FD_ENV`], or the
/// descriptor is not a socket), and on every call after the first.
pub fn take_inherited_channel() -> Option<UnixStream> {
    static TAKEN: AtomicBool = AtomicBool::new(false);
    let fd: i32 = std::env::var(CHANNEL_FD_ENV).ok()?.parse().ok()?;
    let stat = nix::sys::stat::fstat(fd).ok()?;
    if stat.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return None;
    }
    if TAKEN.swap(true, Ordering::SeqCst) {
        return None;
    }
    #[expect(
        unsafe_code,
        reason = "from_raw_fd takes ownership of a descriptor checked to be an open socket, \
                  and the TAKEN flag makes this the only owner it ever gets"
    )]
    let stream = unsafe { <UnixStream as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let _ = nix::fcntl::fcntl(
        stream.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    );
    Some(stream)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::io::Read;
    use std::time::Instant;

    use super::*;

    fn sh(script: &str) -> SpawnSpec {
        SpawnSpec {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            env: vec![("DC_TEST_GREETING".to_owned(), "hello".to_owned())],
        }
    }

    #[test]
    fn exits_are_described_by_code_or_signal() {
        let status = |script: &str| {
            std::process::Command::new("/bin/sh")
                .args(["-c", script])
                .status()
                .unwrap()
        };
        assert_eq!(describe_exit(&status("exit 3")), "exited with code 3");
        assert_eq!(
            describe_exit(&status("kill -9 $$")),
            "killed by signal 9 (SIGKILL)"
        );
    }

    #[tokio::test]
    async fn worker_gets_its_channel_on_fd_3_and_its_env() {
        let script = "printf '%s %s' \"$DC_WORKER_FD\" \"$DC_TEST_GREETING\" >&3";
        let mut worker = spawn_isolated(sh(script)).await.unwrap();
        assert_eq!(worker.child.id(), Some(worker.pid));
        let status = worker.child.wait().await.unwrap();
        assert!(status.success(), "{}", describe_exit(&status));
        let mut said = String::new();
        worker.channel.read_to_string(&mut said).unwrap();
        assert_eq!(said, "3 hello");
    }

    #[tokio::test]
    async fn stop_escalates_to_kill_when_term_is_ignored() {
        let mut obeys = spawn_service(sh("exec sleep 30")).await.unwrap();
        let status = stop_group(&mut obeys, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(describe_exit(&status), "killed by signal 15 (SIGTERM)");

        let mut ignores = spawn_isolated(sh("trap '' TERM; echo ready >&3; sleep 30; exit 0"))
            .await
            .unwrap();
        // Stop only once the shell has installed its trap.
        let mut ready = [0; 6];
        ignores.channel.read_exact(&mut ready).unwrap();
        assert_eq!(&ready, b"ready\n");
        let started = Instant::now();
        let grace = Duration::from_millis(300);
        let status = stop_group(&mut ignores.child, grace).await.unwrap();
        assert!(started.elapsed() >= grace);
        assert_eq!(describe_exit(&status), "killed by signal 9 (SIGKILL)");
    }
}
