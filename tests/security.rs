//! Trust on a real network, with real processes: the pool port speaks TLS only; nodes and pools
//! join with a head's token alone, or with a password that pins the head's certificate on first
//! use; the broker user they hold can run the protocol and nothing else; the secret shows in no
//! process's command line or environment and in no log line but the banner's.
//!
//! Custom harness: this executable is also the node binary (role `cli`, via `main_with_args`)
//! and the worker program (`__dc-worker`, via `serve_if_worker`).

mod common;

use std::path::Path;
use std::process::ExitCode;
use std::process::Stdio;
use std::time::Duration;

use common::cluster::{
    NodeProc, PASSWORD, TempDir, children_of, free_port, head_token, known_heads, register_head,
    start_head_process,
};
use common::{Probe, ProbeInit, ProbeJob, TestResult, eventually};
use distributed_computing::{JoinToken, Pool, PoolError};

fn main() -> ExitCode {
    common::registry().serve_if_worker();
    if let Some(code) = common::cluster::serve_cli_role() {
        return code;
    }
    let args = libtest_mimic::Arguments::from_args();
    let tests = trials![Duration::from_secs(180);
        a_head_without_password_is_joined_with_its_token_alone,
        the_pool_port_speaks_tls_only_and_the_node_user_cannot_administer,
        a_password_pins_the_head_on_first_use_and_a_changed_certificate_is_refused,
        the_secret_shows_in_no_command_line_environment_or_log,
        a_short_password_gets_a_warning_saying_how_fast_it_falls,
    ];
    libtest_mimic::run(&args, tests).exit_code()
}

/// A head on a free loopback port with `extra` flags (no password unless given); its port.
async fn head(
    extra: &[&str],
    env: &[(&str, &str)],
) -> Result<(NodeProc, u16), Box<dyn std::error::Error>> {
    let port = free_port()?;
    let p = port.to_string();
    let mut args = vec![
        "start-node",
        "--head",
        "--bind",
        "127.0.0.1",
        "-p",
        &p,
        "--cpu-workers",
        "1",
    ];
    args.extend_from_slice(extra);
    let head = start_head_process(port, &args, env).await?;
    Ok((head, port))
}

/// `redis-cli` over TLS (the certificate not checked: this is the test's own head) as `user`
/// with `secret` (through the environment); (stdout, stderr).
async fn redis_cli_as(
    port: u16,
    user: &str,
    secret: &str,
    tls: bool,
    args: &[&str],
) -> Result<(String, String), Box<dyn std::error::Error>> {
    let mut cmd = tokio::process::Command::new("redis-cli");
    cmd.args([
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "--no-auth-warning",
        "--user",
        user,
    ]);
    if tls {
        cmd.args(["--tls", "--insecure"]);
    }
    let out = tokio::time::timeout(
        Duration::from_secs(10),
        cmd.env("REDISCLI_AUTH", secret)
            .args(args)
            .stdin(Stdio::null())
            .output(),
    )
    .await??;
    Ok((
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

async fn a_head_without_password_is_joined_with_its_token_alone() -> TestResult {
    let (head, port) = head(&[], &[]).await?;
    let token_text = head_token(port).ok_or("the head wrote no join-token")?;
    let token = JoinToken::parse(&token_text)?;
    check!(
        token.secret.len() == 64,
        "a 256-bit secret in hex: {} chars",
        token.secret.len()
    );
    check!(token.ca_sha256.is_some(), "the token pins the head's CA");
    check!(token.port == port, "token port {}", token.port);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(head.state_dir().join("join-token"))?.permissions(),
    );
    check!(mode & 0o077 == 0, "join-token mode {mode:o}");
    // `token show` prints it, and its JSON has exactly the documented keys.
    let dir = head.state_dir().to_string_lossy().into_owned();
    let (status, out, err) = common::cluster::run_cli(
        &["token", "show", "--state-dir", &dir, "--json"],
        &[],
        &[],
        None,
    )
    .await?;
    check!(status.success(), "token show: {err}");
    let json: serde_json::Value = serde_json::from_str(&out)?;
    let mut keys: Vec<&str> = json
        .as_object()
        .ok_or("not an object")?
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    check!(
        keys == ["address", "ca_sha256", "port", "secret", "user"],
        "keys {keys:?}"
    );
    check!(
        json["secret"] == token.secret.as_str() && json["port"] == port,
        "{json}"
    );

    // A node with the token file only (no address, no password): it joins.
    let copy = TempDir::new("token-copy")?;
    let file = copy.path().join("join-token");
    std::fs::write(&file, format!("{token_text}\n"))?;
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let file_arg = file.to_string_lossy().into_owned();
    let node = NodeProc::start(
        &[
            "start-node",
            "--token-file",
            &file_arg,
            "--cpu-workers",
            "1",
            "--heartbeat-ms",
            "300",
        ],
        &[],
    )
    .await?;
    let pool = Pool::<Probe>::builder(ProbeInit::tagged("token"))
        .token(&token_text)
        .connect()
        .await?;
    let both = eventually(Duration::from_secs(60), || async {
        pool.nodes_count().await.unwrap_or(0) == 2 && pool.workers_count().await.unwrap_or(0) == 2
    })
    .await;
    check!(both, "the token node never joined:\n{}", node.output());
    let out = pool.map((0..20).map(ProbeJob::Echo)).await?;
    check!(out.len() == 20, "{} results", out.len());
    pool.close().await?;

    // A token whose CA hash is another's is refused before the secret is sent: an auth error.
    let mut forged = token.clone();
    forged.ca_sha256 = Some([0x5a; 32]);
    let refused = Pool::<Probe>::builder(ProbeInit::tagged("forged"))
        .token(&forged.to_string())
        .connect()
        .await;
    match refused {
        Err(PoolError::Auth(message)) => {
            check!(message.contains("join token"), "{message}");
            check!(
                !message.contains(&token.secret),
                "the secret leaked: {message}"
            );
        }
        other => return Err(format!("a forged CA hash was not refused: {:?}", other.err()).into()),
    }
    // A damaged token is a configuration error that does not echo it.
    let damaged = Pool::<Probe>::builder(ProbeInit::tagged("damaged"))
        .token(&token_text.replace("dc1:", "dc1:zz"))
        .connect()
        .await;
    match damaged {
        Err(PoolError::Config(message)) => {
            check!(
                !message.contains(&token.secret),
                "the secret leaked: {message}"
            )
        }
        other => return Err(format!("a damaged token: {:?}", other.err()).into()),
    }
    drop(node);
    drop(head);
    Ok(())
}

async fn the_pool_port_speaks_tls_only_and_the_node_user_cannot_administer() -> TestResult {
    let (_head, port) = head(&[], &[]).await?;
    let token = JoinToken::parse(&head_token(port).ok_or("no token")?)?;
    // `is_server_running` sees the TLS server (it sends no secret), and nothing on a free
    // port.
    let free = free_port()?;
    let seen = tokio::task::spawn_blocking(move || {
        (
            distributed_computing::is_server_running(port),
            distributed_computing::is_server_running(free),
        )
    })
    .await?;
    check!(
        seen == (true, false),
        "is_server_running (head, free port): {seen:?}"
    );
    // Plain Redis on the pool port gets no answer.
    let (out, _) = redis_cli_as(port, "dc-node", &token.secret, false, &["PING"]).await?;
    check!(!out.contains("PONG"), "a plain client was answered: {out}");
    // Over TLS the node user runs the protocol's commands...
    let (out, err) = redis_cli_as(port, "dc-node", &token.secret, true, &["PING"]).await?;
    check!(out.contains("PONG"), "PING over TLS: {out} {err}");
    // ... and no administration, on no key outside the pool's.
    let denied: &[&[&str]] = &[
        &["CONFIG", "SET", "requirepass", "x"],
        &["CONFIG", "GET", "dir"],
        &["ACL", "SETUSER", "evil", "on", ">x", "+@all"],
        &["ACL", "LIST"],
        &["MONITOR"],
        &["FLUSHALL"],
        &["FLUSHDB"],
        &["SHUTDOWN", "NOSAVE"],
        &["REPLICAOF", "127.0.0.1", "1"],
        &["SLAVEOF", "127.0.0.1", "1"],
        &["DEBUG", "SLEEP", "0"],
        &["MODULE", "LIST"],
        &["KEYS", "*"],
        &["SCRIPT", "FLUSH"],
        &["SCRIPT", "KILL"],
        &["CLIENT", "KILL", "ID", "999999"],
        &["SET", "other:x", "1"],
        &["EVAL", "return redis.call('FLUSHALL')", "0"],
    ];
    for command in denied {
        let (out, err) = redis_cli_as(port, "dc-node", &token.secret, true, command).await?;
        check!(
            // NOPERM from the ACL; DEBUG and MODULE are also off in every Redis 7 by default.
            out.contains("NOPERM") || err.contains("NOPERM") || out.contains("not allowed"),
            "{command:?} was not denied to the node user: {out} {err}"
        );
    }
    // The default user is off: no password opens it.
    let (out, err) = redis_cli_as(port, "default", &token.secret, true, &["PING"]).await?;
    check!(
        !out.contains("PONG"),
        "the default user answered: {out} {err}"
    );
    // The server is still up and the admin (secret in the state dir) can administer.
    let (out, _) = redis_cli_as(port, "dc-node", &token.secret, true, &["PING"]).await?;
    check!(out.contains("PONG"), "the server went down: {out}");
    let admin = common::cluster::admin_secret(port).ok_or("no admin secret")?;
    let (out, err) = redis_cli_as(
        port,
        "dc-admin",
        &admin,
        true,
        &["CONFIG", "GET", "tls-port"],
    )
    .await?;
    check!(
        out.contains(&port.to_string()),
        "the admin cannot administer: {out} {err}"
    );
    Ok(())
}

/// The entry for `127.0.0.1:port` in the known-heads file.
fn pinned(port: u16) -> Option<String> {
    let text = std::fs::read_to_string(known_heads()).ok()?;
    text.lines()
        .find(|l| l.starts_with(&format!("127.0.0.1:{port} ")))
        .map(str::to_string)
}

async fn a_password_pins_the_head_on_first_use_and_a_changed_certificate_is_refused() -> TestResult
{
    let (mut first, port) = head(&["-r", PASSWORD], &[]).await?;
    check!(pinned(port).is_none(), "pinned before any connection");
    let pool = common::cluster::pool(port, "tofu").await?;
    let entry = pinned(port).ok_or("the first connection pinned nothing")?;
    let token = JoinToken::parse(&head_token(port).ok_or("no token")?)?;
    let ca = token
        .ca_sha256
        .map(|h| h.iter().map(|b| format!("{b:02x}")).collect::<String>());
    check!(
        ca.as_ref().is_some_and(|ca| entry.ends_with(ca.as_str())),
        "pinned {entry}, the head's CA is {ca:?}"
    );
    pool.close().await?;
    first.stop().await?;

    // Another head (a new state dir: a new CA) on the same port and password.
    let state = TempDir::new("second-head")?;
    let p = port.to_string();
    let second = NodeProc::start_in(
        &[
            "start-node",
            "--head",
            "--bind",
            "127.0.0.1",
            "-p",
            &p,
            "-r",
            PASSWORD,
            "--cpu-workers",
            "1",
        ],
        &[],
        state,
    )
    .await?;
    register_head(port, second.state_dir());
    check!(
        second
            .wait_for_output(
                &format!("start-node -p {port} -a "),
                Duration::from_secs(30)
            )
            .await,
        "the second head never started:\n{}",
        second.output()
    );
    let refused = common::cluster::pool(port, "changed").await;
    let file = known_heads().to_string_lossy().into_owned();
    match refused {
        Err(PoolError::Auth(message)) => {
            check!(
                message.contains(&file) && message.contains("line"),
                "{message}"
            );
            check!(
                !message.contains(PASSWORD),
                "the password leaked: {message}"
            );
        }
        other => {
            return Err(format!("a changed certificate was not refused: {:?}", other.err()).into());
        }
    }
    // A node is refused the same way, at once (no waiting for a server that answers).
    let mut node = common::cluster::start_worker_node(port, 1, &[]).await?;
    let exit = node.exit_within(Duration::from_secs(20)).await;
    check!(
        exit.is_some_and(|s| !s.success()) && node.output().contains(&file),
        "a node joined a head whose certificate changed: {exit:?}\n{}",
        node.output()
    );
    // The known-heads entry is still the first head's.
    check!(pinned(port) == Some(entry), "the pin changed");
    // The token, which names the new CA, still works.
    let pool = Pool::<Probe>::builder(ProbeInit::tagged("token-after"))
        .token(&head_token(port).ok_or("no token")?)
        .connect()
        .await?;
    pool.close().await?;
    Ok(())
}

/// Whether any of `pids`' command line or environment holds `secret`; the first that does.
fn holder(pids: &[u32], secret: &str) -> Option<(u32, &'static str)> {
    for &pid in pids {
        for what in ["cmdline", "environ"] {
            let raw = std::fs::read(format!("/proc/{pid}/{what}")).unwrap_or_default();
            if String::from_utf8_lossy(&raw).contains(secret) {
                return Some((pid, what));
            }
        }
    }
    None
}

/// The node process and every process below it.
fn tree(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    let mut i = 0;
    while i < all.len() {
        all.extend(children_of(all[i]));
        i += 1;
    }
    all
}

async fn the_secret_shows_in_no_command_line_environment_or_log() -> TestResult {
    let (head, port) = head(&[], &[("DC_LOG", "trace")]).await?;
    let token_text = head_token(port).ok_or("no token")?;
    let secret = JoinToken::parse(&token_text)?.secret;
    // One node with the token in its environment, one with a token file.
    let copy = TempDir::new("secret-copy")?;
    let file = copy.path().join("token");
    std::fs::write(&file, &token_text)?;
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let file_arg = file.to_string_lossy().into_owned();
    let by_env = NodeProc::start(
        &["start-node", "--cpu-workers", "1"],
        &[("DC_TOKEN", token_text.as_str()), ("DC_LOG", "trace")],
    )
    .await?;
    let by_file = NodeProc::start(
        &[
            "start-node",
            "--token-file",
            &file_arg,
            "--cpu-workers",
            "1",
        ],
        &[("DC_LOG", "trace")],
    )
    .await?;
    let pool = Pool::<Probe>::builder(ProbeInit::tagged("secret"))
        .token(&token_text)
        .connect()
        .await?;
    let all = eventually(Duration::from_secs(60), || async {
        pool.workers_count().await.unwrap_or(0) == 3
    })
    .await;
    check!(
        all,
        "not every node joined:\n{}\n{}",
        by_env.output(),
        by_file.output()
    );
    let out = pool.map((0..30).map(ProbeJob::Echo)).await?;
    check!(out.len() == 30, "{} results", out.len());

    let head_pid = head.pid().ok_or("head gone")?;
    let env_pid = by_env.pid().ok_or("node gone")?;
    let file_pid = by_file.pid().ok_or("node gone")?;
    let mut processes = tree(head_pid);
    processes.extend(tree(file_pid));
    // The node given DC_TOKEN holds it itself; its workers must not.
    let env_workers: Vec<u32> = tree(env_pid).into_iter().skip(1).collect();
    check!(
        !env_workers.is_empty(),
        "the DC_TOKEN node has no worker processes"
    );
    processes.extend(&env_workers);
    check!(processes.len() >= 5, "processes seen: {processes:?}");
    if let Some((pid, what)) = holder(&processes, &secret) {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        return Err(format!("the secret is in the {what} of pid {pid} ({})", comm.trim()).into());
    }
    // Logs at trace level: only the banner's DC_TOKEN line shows it.
    pool.close().await?;
    for (name, output) in [
        ("head", head.output()),
        ("env node", by_env.output()),
        ("file node", by_file.output()),
    ] {
        let leaks: Vec<&str> = output
            .lines()
            .filter(|l| l.contains(&secret) && !l.starts_with("DC_TOKEN=dc1:"))
            .collect();
        check!(leaks.is_empty(), "the {name} logged the secret: {leaks:?}");
    }
    check!(
        head.output()
            .lines()
            .filter(|l| l.contains(&secret))
            .count()
            == 1,
        "the banner shows the token once"
    );
    let _ = Path::new(&file_arg);
    Ok(())
}

async fn a_short_password_gets_a_warning_saying_how_fast_it_falls() -> TestResult {
    let (head, _port) = head(&["-r", "123456"], &[]).await?;
    check!(
        head.wait_for_output("tries them all within", Duration::from_secs(5))
            .await,
        "no weak-password warning:\n{}",
        head.output()
    );
    check!(
        !head.output().contains("123456"),
        "the password was printed:\n{}",
        head.output()
    );
    // A password file others can read gets a warning too.
    let dir = TempDir::new("pw-file")?;
    let file = dir.path().join("pw");
    std::fs::write(&file, "a-long-enough-pool-password\n")?;
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
    let file_arg = file.to_string_lossy().into_owned();
    let (_, _, err) = common::cluster::run_cli(
        &[
            "status",
            "-a",
            "127.0.0.1",
            "-p",
            "1",
            "--password-file",
            &file_arg,
        ],
        &[],
        &[],
        None,
    )
    .await?;
    check!(
        err.contains("can be read by other users"),
        "no warning for a 0644 password file: {err}"
    );
    Ok(())
}
