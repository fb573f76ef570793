//! Test helpers: a dedicated password-protected redis-server shared by a test binary, and
//! unique key prefixes so that cases never see each other's sessions.

#![allow(dead_code, unreachable_pub)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The password of the dedicated server.
pub const PASSWORD: &str = "conformance-pw";

/// The Redis every developer machine of this project runs (no password).
pub const EXISTING: &str = "redis://127.0.0.1:6379";

/// A redis-server child. It is started through `sh`, which kills it as soon as this test
/// process exits (its stdin pipe closes), even when the test binary crashes.
#[derive(Debug)]
pub struct Server {
    _child: Child,
    pub port: u16,
}

impl Server {
    /// Its URL, with the password.
    pub fn url(&self) -> String {
        dc_broker_redis::redis_url("127.0.0.1", self.port, Some(PASSWORD))
    }
}

/// A port nothing listens on (at the time of asking).
pub fn free_port() -> u16 {
    dc_core::testing::support::free_port().expect("bind a free port")
}

/// The process-wide dedicated server, started on first use.
pub fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        let port = free_port();
        let script = "redis-server \"$@\" & pid=$!; read _; kill $pid; wait $pid";
        let child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("sh")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--requirepass",
                PASSWORD,
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(["--daemonize", "no", "--loglevel", "warning"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("start redis-server (apt-get install redis-server)");
        wait_until_it_answers(port);
        Server {
            _child: child,
            port,
        }
    })
}

fn wait_until_it_answers(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
            if s.write_all(b"PING\r\n").is_ok() {
                let mut buf = [0u8; 64];
                // NOAUTH is an answer too: the server is up.
                if matches!(s.read(&mut buf), Ok(n) if n > 0) {
                    return;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("redis-server on port {port} did not answer within 10 s");
}

/// A key prefix no other test uses.
pub fn unique_prefix() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "dc-test-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Delete the keys earlier test runs left on the existing Redis (sessions the conformance
/// cases never close), once per test binary: every `dc-test-<pid>-*` key of a process that is
/// no longer running.
pub fn sweep_stale_test_keys() {
    static SWEPT: OnceLock<()> = OnceLock::new();
    SWEPT.get_or_init(|| {
        let Ok(client) = redis::Client::open(EXISTING) else {
            return;
        };
        let Ok(mut conn) = client.get_connection() else {
            return;
        };
        let keys: Vec<String> = match redis::cmd("KEYS").arg("dc-test-*").query(&mut conn) {
            Ok(keys) => keys,
            Err(_) => return,
        };
        let stale: Vec<&String> = keys
            .iter()
            .filter(|k| {
                k.split('-')
                    .nth(2)
                    .and_then(|pid| pid.parse::<u32>().ok())
                    .is_some_and(|pid| {
                        pid != std::process::id()
                            && !std::path::Path::new(&format!("/proc/{pid}")).exists()
                    })
            })
            .collect();
        for batch in stale.chunks(500) {
            let _: redis::RedisResult<()> = redis::cmd("UNLINK").arg(batch).query(&mut conn);
        }
    });
}
