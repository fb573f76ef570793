//! `amqps://`: a RabbitMQ node of this test's own (its port speaks TLS only, with a CA and a
//! server certificate made here) runs the conformance suite over TLS with the CA trusted
//! through `AmqpOptions::tls_ca`; without that CA, and in plain AMQP, the same port refuses
//! the client.
//!
//! Needs `rabbitmq-server` (as installed by the Debian package: the node's scripts under
//! `/usr/lib/rabbitmq/bin`, or `DC_RABBITMQ_BIN`).

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dc_broker_amqp::{AmqpBroker, AmqpOptions};
use dc_core::testing::support::{TempDir, free_port};
use dc_core::{Broker, BrokerError};
use futures::FutureExt;

fn bin(name: &str) -> PathBuf {
    let dir = std::env::var("DC_RABBITMQ_BIN").unwrap_or_else(|_| "/usr/lib/rabbitmq/bin".into());
    Path::new(&dir).join(name)
}

/// A RabbitMQ node listening with TLS only on a free loopback port; shut down when dropped.
struct TlsNode {
    dir: TempDir,
    name: String,
    port: u16,
    child: Child,
}

impl TlsNode {
    fn env<'a>(&'a self, cmd: &'a mut Command) -> &'a mut Command {
        let d = self.dir.path();
        cmd.env("RABBITMQ_CONF_ENV_FILE", d.join("env.conf"))
            .env("RABBITMQ_NODENAME", &self.name)
            .env("RABBITMQ_CONFIG_FILE", d.join("rabbitmq"))
            .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", d.join("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("plugins"))
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .env("HOME", d)
    }

    fn start() -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        let dir = TempDir::new("rabbitmq-tls")?;
        let d = dir.path().to_path_buf();
        let port = free_port()?;
        let dist = free_port()?;
        // A CA, and a server certificate it signs for localhost.
        let ca_key = rcgen::KeyPair::generate()?;
        let mut ca = rcgen::CertificateParams::default();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "dc tls test CA");
        let ca_cert = ca.self_signed(&ca_key)?;
        let server_key = rcgen::KeyPair::generate()?;
        let server = rcgen::CertificateParams::new(vec!["localhost".to_string()])?;
        let server_cert = server.signed_by(&server_key, &ca_cert, &ca_key)?;
        std::fs::write(d.join("ca.pem"), ca_cert.pem())?;
        std::fs::write(d.join("server.pem"), server_cert.pem())?;
        std::fs::write(d.join("server.key"), server_key.serialize_pem())?;
        std::fs::write(
            d.join("rabbitmq.conf"),
            format!(
                "listeners.tcp = none\n\
                 listeners.ssl.default = 127.0.0.1:{port}\n\
                 distribution.listener.port_range.min = {dist}\n\
                 distribution.listener.port_range.max = {dist}\n\
                 ssl_options.cacertfile = {d}/ca.pem\n\
                 ssl_options.certfile = {d}/server.pem\n\
                 ssl_options.keyfile = {d}/server.key\n\
                 ssl_options.verify = verify_none\n\
                 ssl_options.fail_if_no_peer_cert = false\n",
                d = d.display()
            ),
        )?;
        std::fs::write(d.join("env.conf"), "")?;
        std::fs::write(d.join("plugins"), "[].\n")?;
        let name = format!("dctls{}@localhost", std::process::id());
        let mut node = TlsNode {
            dir,
            name,
            port,
            child: Command::new("true").spawn()?,
        };
        let mut cmd = Command::new(bin("rabbitmq-server"));
        node.env(&mut cmd)
            .env("RABBITMQ_DIST_PORT", dist.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        node.child = cmd.spawn()?;
        let deadline = Instant::now() + Duration::from_secs(90);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                return Err("the TLS RabbitMQ node did not listen within 90 s".into());
            }
            if let Some(status) = node.child.try_wait()? {
                return Err(format!("rabbitmq-server exited: {status}").into());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(node)
    }

    fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    fn url(&self, scheme: &str) -> String {
        format!("{scheme}://guest:guest@localhost:{}/%2f", self.port)
    }
}

impl Drop for TlsNode {
    fn drop(&mut self) {
        let mut cmd = Command::new(bin("rabbitmqctl"));
        let _ = self
            .env(&mut cmd)
            .args(["-n", &self.name, "shutdown"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_runs_the_conformance_suite_and_refuses_an_unknown_ca_or_plain_amqp() {
    let node = tokio::task::spawn_blocking(TlsNode::start)
        .await
        .expect("join")
        .map_err(|e| e.to_string())
        .expect("a TLS RabbitMQ node of the test's own");
    let options = |ns: &str| {
        AmqpOptions::default()
            .namespace(ns)
            .tls_ca(node.ca())
            .connect_timeout(Duration::from_secs(10))
    };

    let mut failed = Vec::new();
    for (i, case) in dc_core::testing::all_cases().into_iter().enumerate() {
        let ns = format!("tls{i}");
        let broker = AmqpBroker::connect(&node.url("amqps"), &options(&ns))
            .await
            .expect("amqps with the CA trusted");
        let shared: Arc<dyn Broker> = Arc::new(broker.clone());
        let outcome = std::panic::AssertUnwindSafe((case.run)(shared))
            .catch_unwind()
            .await;
        let _ = broker.remove_namespace().await;
        broker.close().await;
        if outcome.is_err() {
            failed.push(case.name);
        }
    }
    assert!(
        failed.is_empty(),
        "conformance cases failed over TLS: {failed:?}"
    );

    // Without the CA (the system's roots only), the server's certificate is refused.
    let untrusted = AmqpBroker::connect(
        &node.url("amqps"),
        &AmqpOptions::default().connect_timeout(Duration::from_secs(5)),
    )
    .await;
    assert!(
        matches!(untrusted, Err(BrokerError::Connection(_))),
        "a server certificate from an unknown CA was accepted: {untrusted:?}"
    );
    // Plain AMQP to a TLS-only port gets nowhere.
    let plain = AmqpBroker::connect(
        &node.url("amqp"),
        &AmqpOptions::default().connect_timeout(Duration::from_secs(5)),
    )
    .await;
    assert!(plain.is_err(), "plain AMQP reached a TLS-only port");
}
