//! A network namespace joined to the root namespace by a veth pair, and worker nodes started
//! inside one: a node whose link the test can cut for real (partition tests, the chaos soak).
//! Needs root and iproute2 (`ip netns`).

use std::process::Stdio;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, BufReader};

use super::cluster::{PASSWORD, ROLE, TempDir};

type BoxError = Box<dyn std::error::Error>;

/// Names of the namespaces and links these tests make start with this, then the pid.
const PREFIX: &str = "dcp";

/// Run `ip ARGS`; an error names the command and what it printed.
fn ip(args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run `ip` (iproute2 is needed for the partition test): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A network namespace and a veth pair joining it to the root namespace, with a private /30;
/// deleted on drop.
pub struct Netns {
    ns: String,
    host_if: String,
    ns_if: String,
    pub host_ip: String,
    pub ns_ip: String,
}

impl Netns {
    pub fn create() -> Result<Self, String> {
        if effective_uid() != Some(0) {
            return Err(
                "the partition test needs root to make a network namespace and a veth pair \
                 (CI runs as root); run it as root"
                    .into(),
            );
        }
        ip(&["netns", "list"]).map_err(|e| format!("`ip netns` is not available: {e}"))?;
        remove_leftovers();
        let pid = std::process::id();
        let stem = format!("{PREFIX}{pid}");
        let octet = free_octet(pid)?;
        let net = Netns {
            ns: format!("{stem}n"),
            host_if: format!("{stem}h"),
            ns_if: format!("{stem}g"),
            host_ip: format!("10.213.{octet}.1"),
            ns_ip: format!("10.213.{octet}.2"),
        };
        // From here on, whatever fails, the drop deletes what was made.
        ip(&["netns", "add", &net.ns])?;
        ip(&[
            "link",
            "add",
            &net.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &net.ns_if,
            "netns",
            &net.ns,
        ])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/30", net.host_ip),
            "dev",
            &net.host_if,
        ])?;
        ip(&["link", "set", &net.host_if, "up"])?;
        ip(&[
            "-n",
            &net.ns,
            "addr",
            "add",
            &format!("{}/30", net.ns_ip),
            "dev",
            &net.ns_if,
        ])?;
        ip(&["-n", &net.ns, "link", "set", "lo", "up"])?;
        ip(&["-n", &net.ns, "link", "set", &net.ns_if, "up"])?;
        Ok(net)
    }

    /// Cut the link: the namespace's end goes down, so the namespace has no route to the head
    /// and the head's packets to it are dropped (no reset reaches either side).
    pub fn cut(&self) -> Result<(), String> {
        ip(&["-n", &self.ns, "link", "set", &self.ns_if, "down"]).map(drop)
    }

    /// Bring the link back (the kernel restores the /30's route).
    pub fn restore(&self) -> Result<(), String> {
        ip(&["-n", &self.ns, "link", "set", &self.ns_if, "up"]).map(drop)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.host_if]);
        let _ = ip(&["netns", "del", &self.ns]);
    }
}

/// This process's effective uid, from `/proc/self/status`.
fn effective_uid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// Delete namespaces and links of earlier runs of this test whose process is gone (a run killed
/// before its drop ran); those of a run still going are left alone.
fn remove_leftovers() {
    let stale = |name: &str| {
        name.strip_prefix(PREFIX)
            .and_then(|rest| rest.get(..rest.len().saturating_sub(1)))
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists())
    };
    if let Ok(list) = ip(&["netns", "list"]) {
        for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
            if stale(name) {
                let _ = ip(&["netns", "del", name]);
            }
        }
    }
    if let Ok(list) = ip(&["-o", "link", "show"]) {
        for line in list.lines() {
            let Some(name) = line.split(':').nth(1) else {
                continue;
            };
            let name = name.trim().split('@').next().unwrap_or_default();
            if stale(name) {
                let _ = ip(&["link", "del", name]);
            }
        }
    }
}

/// A third octet for 10.213.X.0/30 that no address or route of this machine uses.
fn free_octet(pid: u32) -> Result<u32, String> {
    let addrs = ip(&["-o", "-4", "addr", "show"])?;
    let routes = ip(&["-4", "route", "show", "table", "all"])?;
    (0..250)
        .map(|i| (pid + i) % 250 + 1)
        .find(|octet| {
            let net = format!("10.213.{octet}.");
            !addrs.contains(&net) && !routes.contains(&net)
        })
        .ok_or_else(|| "no free 10.213.X.0/30 for the test's veth pair".into())
}

/// A worker node started through the CLI inside the namespace (`ip netns exec` replaces itself
/// with this executable, so the child's pid is the node's); killed when dropped.
pub struct NsNode {
    pub child: tokio::process::Child,
    output: Arc<Mutex<Vec<String>>>,
    _dir: TempDir,
}

impl NsNode {
    pub fn start(net: &Netns, port: u16) -> Result<Self, BoxError> {
        let dir = TempDir::new("partition-node")?;
        let mut cmd = tokio::process::Command::new("ip");
        cmd.args(["netns", "exec", &net.ns])
            .arg(std::env::current_exe()?)
            .args([
                "start-node",
                "-a",
                &net.host_ip,
                "-p",
                &port.to_string(),
                "-r",
                PASSWORD,
                "--cpu-workers",
                "1",
                "--heartbeat-ms",
                "200",
            ])
            .arg("--state-dir")
            .arg(dir.path())
            .env(ROLE, "cli")
            .env("DC_LOG", "info")
            .env("DC_KNOWN_HEADS", super::cluster::known_heads())
            .env_remove("DC_FAKE_GPUS")
            .env_remove("CUDA_VISIBLE_DEVICES")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn()?;
        let output = Arc::new(Mutex::new(Vec::new()));
        let streams: [Option<Box<dyn tokio::io::AsyncRead + Unpin + Send>>; 2] = [
            child.stdout.take().map(|s| Box::new(s) as _),
            child.stderr.take().map(|s| Box::new(s) as _),
        ];
        for stream in streams.into_iter().flatten() {
            let output = output.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stream).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    output.lock().expect("output lock").push(line);
                }
            });
        }
        Ok(NsNode {
            child,
            output,
            _dir: dir,
        })
    }

    pub fn output(&self) -> String {
        self.output.lock().expect("output lock").join("\n")
    }
}
