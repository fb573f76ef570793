//! `status`: the nodes the broker has seen in the last minute, their workers, and the active
//! pool, as a table (every name read from the broker escaped for the terminal) or JSON.

use std::process::ExitCode;
use std::time::Duration;

use serde::Serialize;

use super::Status;
use super::config::Config;

#[derive(Debug, Serialize)]
struct StatusReport {
    server: String,
    nodes: Vec<NodeReport>,
    pool: Option<PoolReport>,
}

#[derive(Debug, Serialize)]
struct NodeReport {
    node: String,
    host: String,
    devices: Vec<String>,
    slots: usize,
    busy: usize,
    idle: usize,
    starting: usize,
    /// Slots with no pool to serve (no worker process runs for them).
    waiting: usize,
    last_heartbeat_ms: u128,
}

#[derive(Debug, Serialize)]
struct PoolReport {
    session: String,
    kind: String,
    owner: String,
    workers: usize,
    nodes: usize,
    queued: usize,
    running: usize,
    done: usize,
    failed: usize,
}

pub(super) async fn run_status(cmd: Status) -> Result<ExitCode, String> {
    let config = Config::load(&cmd.connection, cmd.connection.config.as_ref())?;
    let target = config.target()?;
    let broker = crate::backends::connect_target(&target)
        .await
        .map_err(|e| e.to_string())?;
    let seen = broker
        .nodes(Duration::from_secs(60))
        .await
        .map_err(|e| e.to_string())?;
    let nodes = seen
        .iter()
        .map(|n| {
            let serving = || n.status.workers.iter().filter(|w| w.session.is_some());
            let count = |state| serving().filter(|w| w.state == state).count();
            NodeReport {
                node: n.status.node.to_string(),
                host: n.status.host.clone(),
                devices: n
                    .status
                    .workers
                    .iter()
                    .flat_map(|w| w.devices.iter().cloned())
                    .collect(),
                slots: n.status.workers.len(),
                busy: count(dc_core::broker::WorkerState::Busy),
                idle: count(dc_core::broker::WorkerState::Idle),
                starting: count(dc_core::broker::WorkerState::Starting),
                waiting: n.status.workers.len() - serving().count(),
                last_heartbeat_ms: n.ago.as_millis(),
            }
        })
        .collect();
    let pool = match broker
        .active_session(Duration::ZERO)
        .await
        .map_err(|e| e.to_string())?
    {
        Some(info) => {
            let stats = broker
                .session_stats(&info.id)
                .await
                .map_err(|e| e.to_string())?;
            Some(PoolReport {
                session: info.id.to_string(),
                kind: info.spec.kind.clone(),
                owner: info.spec.owner.clone(),
                workers: stats.workers,
                nodes: stats.nodes,
                queued: stats.queued,
                running: stats.running,
                done: stats.done,
                failed: stats.failed,
            })
        }
        None => None,
    };
    let report = StatusReport {
        server: match &target.url {
            Some(url) => dc_core::redact_url(url),
            None => format!("{}:{}", target.address, target.port),
        },
        nodes,
        pool,
    };
    if cmd.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?
        );
    } else {
        print_status(&report, &mut std::io::stdout().lock())
            .map_err(|e| format!("cannot print the status: {e}"))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `s` safe to print on a terminal: control characters (escape sequences, newlines, carriage
/// returns) and the invisible bidirectional-text controls are shown escaped (`\u{1b}`), so a
/// node or host name read from the broker cannot drive the terminal or disguise a line.
pub(super) fn printable(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        let invisible = matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}');
        if c.is_control() || invisible {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

fn print_status(report: &StatusReport, out: &mut impl std::io::Write) -> std::io::Result<()> {
    writeln!(out, "server: {}", printable(&report.server))?;
    writeln!(out, "nodes: {}", report.nodes.len())?;
    if !report.nodes.is_empty() {
        writeln!(
            out,
            "  {:<28} {:<20} {:>5} {:>5} {:>5} {:>8} {:>7} {:>9}  devices",
            "node", "host", "slots", "busy", "idle", "starting", "no pool", "heartbeat"
        )?;
        for n in &report.nodes {
            let devices: Vec<String> = n.devices.iter().map(|d| printable(d)).collect();
            writeln!(
                out,
                "  {:<28} {:<20} {:>5} {:>5} {:>5} {:>8} {:>7} {:>7}ms  {}",
                printable(&n.node),
                printable(&n.host),
                n.slots,
                n.busy,
                n.idle,
                n.starting,
                n.waiting,
                n.last_heartbeat_ms,
                if devices.is_empty() {
                    "cpu".to_string()
                } else {
                    devices.join(",")
                }
            )?;
        }
    }
    match &report.pool {
        Some(p) => {
            writeln!(
                out,
                "pool: {} (worker kind \"{}\", opened by {})",
                printable(&p.session),
                printable(&p.kind),
                printable(&p.owner)
            )?;
            writeln!(
                out,
                "  workers {} on {} node(s); jobs queued {}, running {}, done {}, failed {}",
                p.workers, p.nodes, p.queued, p.running, p.done, p.failed
            )?;
        }
        None => writeln!(out, "pool: none active")?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_escapes_what_would_drive_a_terminal() {
        assert_eq!(printable("node-1.lan"), "node-1.lan");
        assert_eq!(printable("naïve-ノード"), "naïve-ノード");
        assert_eq!(printable("a\u{1b}[2Jb"), "a\\u{1b}[2Jb");
        assert_eq!(printable("x\ny\rz\t"), "x\\ny\\rz\\t");
        assert_eq!(printable("evil\u{202e}txt.exe"), "evil\\u{202e}txt.exe");
        assert_eq!(printable("\u{9b}31m"), "\\u{9b}31m");
    }

    #[test]
    fn status_table_prints_no_control_character_from_the_broker() {
        let evil = "h\u{1b}]0;pwned\u{7}\u{1b}[2J\r\nfake line\u{202e}";
        let report = StatusReport {
            server: format!("redis://{evil}:8899"),
            nodes: vec![NodeReport {
                node: format!("{evil}-1"),
                host: evil.to_string(),
                devices: vec![format!("GPU-{evil}")],
                slots: 1,
                busy: 0,
                idle: 1,
                starting: 0,
                waiting: 0,
                last_heartbeat_ms: 12,
            }],
            pool: Some(PoolReport {
                session: evil.to_string(),
                kind: evil.to_string(),
                owner: evil.to_string(),
                workers: 1,
                nodes: 1,
                queued: 0,
                running: 0,
                done: 0,
                failed: 0,
            }),
        };
        let mut out = Vec::new();
        print_status(&report, &mut out).expect("print to a buffer");
        let text = String::from_utf8(out).expect("utf-8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 6, "{text}");
        assert!(
            !text
                .chars()
                .any(|c| (c.is_control() && c != '\n') || c == '\u{202e}'),
            "{text:?}"
        );
        assert!(text.contains("h\\u{1b}]0;pwned\\u{7}"), "{text}");
    }
}
