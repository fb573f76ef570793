//! The command line's edges, with real processes: nodes that start before their server, config
//! files that say more (or less) than they configure, state directories someone else prepared,
//! services on the pool port that are not pool servers, and names that would drive a terminal.
//!
//! Custom harness: this executable is also the node binary (role `cli`, via `main_with_args`)
//! and the worker program (`__dc-worker`, via `serve_if_worker`).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use common::cluster::{
    NodeProc, PASSWORD, PoolServer, TempDir, free_port, run_cli, start_worker_node, status_json,
};
use common::{Probe, ProbeInit, TestResult, eventually};
use distributed_computing::broker::NodeRegistry;
use distributed_computing::broker::{NodeId, NodeStatus, WorkerId, WorkerState, WorkerStatus};
use distributed_computing::{Pool, PoolError};

fn main() -> ExitCode {
    common::registry().serve_if_worker();
    if let Some(code) = common::cluster::serve_cli_role() {
        return code;
    }
    let args = libtest_mimic::Arguments::from_args();
    let tests = trials![Duration::from_secs(120);
        a_node_started_before_its_server_waits_logs_every_10s_and_joins,
        a_waiting_node_stops_promptly_on_sigterm_and_on_dc_cli_stop,
        a_wrong_password_fails_at_once_instead_of_waiting,
        a_service_that_is_not_redis_is_named_as_such_at_once,
        the_connect_timeout_is_the_documented_5s,
        rediss_checks_the_certificate_and_keeps_the_secret,
        unknown_config_keys_and_directories_are_refused_and_the_loaded_file_is_logged,
        external_workers_cannot_replace_a_registered_kind,
        a_bind_address_that_is_not_an_address_is_refused,
        without_home_there_is_no_shared_state_dir,
        planted_symlinks_in_the_state_dir_are_never_followed,
        stop_signals_only_the_process_holding_the_lock,
        generated_files_are_private_whatever_was_there_before,
        status_escapes_names_read_from_the_broker,
    ];
    libtest_mimic::run(&args, tests).exit_code()
}

/// `start-node` flags for a worker node of `cpu` CPU workers on `port`.
fn worker_args(port: u16, cpu: usize, password: &str) -> Vec<String> {
    [
        "start-node",
        "-a",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-r",
        password,
        "--cpu-workers",
        &cpu.to_string(),
    ]
    .map(String::from)
    .to_vec()
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

const WAITING: &str = "waiting for the pool server";

/// Lines of `output` that contain `needle`.
fn lines_with<'a>(output: &'a str, needle: &str) -> Vec<&'a str> {
    output.lines().filter(|l| l.contains(needle)).collect()
}

async fn a_node_started_before_its_server_waits_logs_every_10s_and_joins() -> TestResult {
    let port = free_port()?;
    let started = Instant::now();
    let mut node = start_worker_node(port, 1, &[]).await?;
    check!(
        node.wait_for_output(WAITING, Duration::from_secs(20)).await,
        "the node never said it waits:\n{}",
        node.output()
    );
    let first = started.elapsed();
    // The second line says it still waits, 10 s after the first (not on every retry).
    let twice = eventually(Duration::from_secs(25), || async {
        lines_with(&node.output(), WAITING).len() >= 2
    })
    .await;
    check!(twice, "one waiting line only:\n{}", node.output());
    let second = started.elapsed();
    check!(
        second - first >= Duration::from_secs(9),
        "waiting lines {:?} apart:\n{}",
        second - first,
        node.output()
    );
    check!(!node.has_exited(), "the node exited:\n{}", node.output());

    let _server = PoolServer::start(port).await?;
    let up = Instant::now();
    let joined = eventually(Duration::from_secs(30), || async {
        status_json(port)
            .await
            .map(|json| json["nodes"].as_array().map_or(0, Vec::len) == 1)
            .unwrap_or(false)
    })
    .await;
    check!(joined, "the node never joined:\n{}", node.output());
    let pool = Pool::<Probe>::builder(ProbeInit::tagged("late-server"))
        .address("127.0.0.1")
        .port(port)
        .password(PASSWORD)
        .known_heads(common::cluster::known_heads())
        .connect()
        .await?;
    let out = pool.map((0..3).map(common::ProbeJob::Echo)).await?;
    check!(out.len() == 3, "{} results", out.len());
    eprintln!(
        "measured: waiting lines at {first:?} and {second:?}; joined {:?} after the server came up",
        up.elapsed()
    );
    pool.close().await?;
    node.stop().await?;
    Ok(())
}

async fn a_waiting_node_stops_promptly_on_sigterm_and_on_dc_cli_stop() -> TestResult {
    let port = free_port()?;
    let mut node = start_worker_node(port, 0, &[]).await?;
    check!(
        node.wait_for_output(WAITING, Duration::from_secs(20)).await,
        "never waited:\n{}",
        node.output()
    );
    let signalled = Instant::now();
    node.signal(nix::sys::signal::Signal::SIGTERM)?;
    let status = node.exit_within(Duration::from_secs(5)).await;
    check!(
        status.is_some_and(|s| s.success()),
        "SIGTERM did not stop a waiting node within 5 s: {status:?}\n{}",
        node.output()
    );
    let after_sigterm = signalled.elapsed();

    let mut node = start_worker_node(port, 0, &[]).await?;
    check!(
        node.wait_for_output(WAITING, Duration::from_secs(20)).await,
        "never waited:\n{}",
        node.output()
    );
    let dir = node.state_dir().display().to_string();
    let asked = Instant::now();
    let (stop, out, err) = run_cli(&["stop", "--state-dir", &dir], &[], &[], None).await?;
    check!(
        stop.success() && out.contains("stopped"),
        "dc-cli stop: {stop:?}\n{out}\n{err}"
    );
    let status = node.exit_within(Duration::from_secs(5)).await;
    check!(
        status.is_some_and(|s| s.success()),
        "the node did not exit after dc-cli stop: {status:?}\n{}",
        node.output()
    );
    eprintln!(
        "measured: exit {after_sigterm:?} after SIGTERM; dc-cli stop returned after {:?}",
        asked.elapsed()
    );
    Ok(())
}

async fn a_wrong_password_fails_at_once_instead_of_waiting() -> TestResult {
    let port = free_port()?;
    let _server = PoolServer::start(port).await?;
    let started = Instant::now();
    let mut node = NodeProc::start(&strs(&worker_args(port, 0, "not-the-password")), &[]).await?;
    let status = node.exit_within(Duration::from_secs(15)).await;
    check!(
        status.is_some_and(|s| !s.success()),
        "a node with a wrong password did not fail: {status:?}\n{}",
        node.output()
    );
    // The exit can come before the reader has collected the last lines.
    let told = node
        .wait_for_output("refused the password", Duration::from_secs(5))
        .await;
    let output = node.output();
    check!(told, "unclear error:\n{output}");
    check!(!output.contains(WAITING), "it waited:\n{output}");
    check!(
        !output.contains("not-the-password"),
        "the password leaked:\n{output}"
    );
    eprintln!("measured: failed after {:?}", started.elapsed());
    Ok(())
}

/// A TCP service on a free port that answers every connection like a web server, then closes.
async fn not_redis() -> Result<(u16, tokio::task::JoinHandle<()>), Box<dyn std::error::Error>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = stream.read(&mut buf).await;
                let _ = stream
                    .write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                    .await;
            });
        }
    });
    Ok((port, task))
}

async fn a_service_that_is_not_redis_is_named_as_such_at_once() -> TestResult {
    let (port, service) = not_redis().await?;
    let p = port.to_string();
    let (status, _, err) = run_cli(
        &["status", "-a", "127.0.0.1", "-p", &p, "-r", PASSWORD],
        &[],
        &[],
        None,
    )
    .await?;
    check!(!status.success(), "status succeeded");
    check!(
        err.contains("does not speak the Redis protocol") && err.contains(&format!(":{port}")),
        "unclear error: {err}"
    );
    let mut node = NodeProc::start(&strs(&worker_args(port, 0, PASSWORD)), &[]).await?;
    let exit = node.exit_within(Duration::from_secs(15)).await;
    check!(
        exit.is_some_and(|s| !s.success()),
        "a node pointed at a web server did not fail at once: {exit:?}\n{}",
        node.output()
    );
    check!(
        node.wait_for_output("does not speak the Redis protocol", Duration::from_secs(5))
            .await,
        "{}",
        node.output()
    );
    service.abort();
    Ok(())
}

async fn the_connect_timeout_is_the_documented_5s() -> TestResult {
    // Accepts connections and never answers: only the connect timeout ends the attempt.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let held = tokio::spawn(async move {
        let mut streams = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            streams.push(stream);
        }
    });
    let started = Instant::now();
    let result = Pool::<Probe>::builder(ProbeInit::tagged("silent"))
        .address("127.0.0.1")
        .port(port)
        .password(PASSWORD)
        .known_heads(common::cluster::known_heads())
        .connect()
        .await;
    let took = started.elapsed();
    held.abort();
    check!(
        matches!(result, Err(PoolError::Unreachable(_))),
        "expected Unreachable, got {:?}",
        result.err()
    );
    check!(
        took >= Duration::from_millis(4500) && took < Duration::from_secs(8),
        "gave up after {took:?}, not the documented 5 s"
    );
    eprintln!("measured: a silent server is given up after {took:?}");
    Ok(())
}

async fn rediss_checks_the_certificate_and_keeps_the_secret() -> TestResult {
    let port = free_port()?;
    let server = PoolServer::start(port).await?;
    let p = port.to_string();
    // The head's own CA is no public root: the system's roots refuse it, at once.
    let url = format!("rediss://dc-node:{PASSWORD}@localhost:{p}");
    let (status, _, err) = run_cli(&["status", "--broker", &url], &[], &[], None).await?;
    check!(!status.success(), "status trusted a private CA: {err}");
    check!(err.contains("certificate"), "{err}");
    check!(!err.contains(PASSWORD), "the password leaked: {err}");
    // With that CA named (--tls-ca), the certificate checks out for the name `localhost`.
    let ca = server
        .dir()
        .join(format!("redis-{port}"))
        .join("tls-ca.crt");
    let ca = ca.to_string_lossy();
    let (status, out, err) = run_cli(
        &["status", "--broker", &url, "--tls-ca", &ca, "--json"],
        &[],
        &[],
        None,
    )
    .await?;
    check!(
        status.success(),
        "status over rediss:// with --tls-ca failed: {err}"
    );
    check!(out.contains("\"nodes\""), "{out}");
    Ok(())
}

async fn unknown_config_keys_and_directories_are_refused_and_the_loaded_file_is_logged()
-> TestResult {
    let dir = TempDir::new("config")?;
    let port = free_port()?.to_string();
    // ./dc.toml with a misspelt key: refused, naming the key and the file.
    std::fs::write(dir.path().join("dc.toml"), "cpu_workerz = 4\n")?;
    let (status, _, err) = run_cli(
        &["status", "-a", "127.0.0.1", "-p", &port, "-r", PASSWORD],
        &[],
        &[],
        Some(dir.path()),
    )
    .await?;
    check!(!status.success(), "a misspelt key was accepted");
    check!(
        err.contains("cpu_workerz") && err.contains("dc.toml"),
        "the error names neither key nor file: {err}"
    );
    // --config naming a directory: refused.
    let sub = dir.path().join("conf.d");
    std::fs::create_dir(&sub)?;
    let sub_arg = sub.display().to_string();
    let (status, _, err) = run_cli(
        &[
            "status",
            "-a",
            "127.0.0.1",
            "-p",
            &port,
            "-r",
            PASSWORD,
            "--config",
            &sub_arg,
        ],
        &[],
        &[],
        Some(dir.path()),
    )
    .await?;
    check!(!status.success(), "a directory was taken as config");
    check!(err.contains("not a file"), "{err}");
    // A good ./dc.toml is loaded and says so (the status then fails: nothing listens).
    std::fs::write(dir.path().join("dc.toml"), format!("port = {port}\n"))?;
    let (_, _, err) = run_cli(
        &["status", "-a", "127.0.0.1", "-r", PASSWORD],
        &[],
        &[],
        Some(dir.path()),
    )
    .await?;
    check!(
        err.contains("configuration file loaded")
            && err.contains(&format!("{}", dir.path().join("dc.toml").display())),
        "no INFO line names the loaded file: {err}"
    );
    check!(
        err.contains(&format!(":{port}")),
        "the file's port was not used: {err}"
    );
    Ok(())
}

async fn external_workers_cannot_replace_a_registered_kind() -> TestResult {
    let dir = TempDir::new("external")?;
    let config = dir.path().join("node.toml");
    std::fs::write(
        &config,
        "[external_workers]\nprobe = [\"/bin/sh\", \"-c\", \"echo replaced\"]\n",
    )?;
    let port = free_port()?;
    let mut args = worker_args(port, 1, PASSWORD);
    args.extend(["--config".into(), config.display().to_string()]);
    let mut node = NodeProc::start(&strs(&args), &[]).await?;
    let exit = node.exit_within(Duration::from_secs(15)).await;
    check!(
        exit.is_some_and(|s| !s.success()),
        "the node accepted a replacement of kind probe: {exit:?}\n{}",
        node.output()
    );
    check!(
        node.wait_for_output(
            "\"probe\" is a kind this node binary registers: an external program cannot replace it",
            Duration::from_secs(5)
        )
        .await,
        "{}",
        node.output()
    );
    Ok(())
}

async fn a_bind_address_that_is_not_an_address_is_refused() -> TestResult {
    for bind in [
        "127.0.0.1\nrequirepass \"\"",
        "127.0.0.1 0.0.0.0",
        "127.0.0.1,",
        "a;b",
    ] {
        let port = free_port()?.to_string();
        let mut head = NodeProc::start(
            &[
                "start-node",
                "--head",
                "--bind",
                bind,
                "-p",
                &port,
                "-r",
                PASSWORD,
            ],
            &[],
        )
        .await?;
        let exit = head.exit_within(Duration::from_secs(15)).await;
        check!(
            exit.is_some_and(|s| !s.success()),
            "--bind {bind:?} was accepted: {exit:?}\n{}",
            head.output()
        );
        check!(
            head.wait_for_output("bind address", Duration::from_secs(5))
                .await,
            "--bind {bind:?}: {}",
            head.output()
        );
        let conf = head.state_dir().join(format!("redis-{port}/redis.conf"));
        check!(!conf.exists(), "--bind {bind:?} wrote {}", conf.display());
    }
    Ok(())
}

async fn without_home_there_is_no_shared_state_dir() -> TestResult {
    let unset = ["HOME", "XDG_STATE_HOME", "DC_STATE_DIR"];
    let port = free_port()?.to_string();
    for args in [
        vec!["stop"],
        vec!["start-node", "-a", "127.0.0.1", "-p", &port, "-r", PASSWORD],
    ] {
        let (status, _, err) = run_cli(&args, &[], &unset, None).await?;
        check!(!status.success(), "{args:?} without HOME succeeded: {err}");
        check!(err.contains("no state directory"), "{args:?}: {err}");
    }
    let dir = TempDir::new("xdg")?;
    let xdg = dir.path().display().to_string();
    let (status, out, err) =
        run_cli(&["stop"], &[("XDG_STATE_HOME", &xdg)], &unset[..1], None).await?;
    check!(
        status.success() && out.contains(&format!("{xdg}/distributed-computing")),
        "XDG_STATE_HOME not used: {out}{err}"
    );
    Ok(())
}

fn mode(path: &Path) -> std::io::Result<u32> {
    Ok(std::fs::symlink_metadata(path)?.permissions().mode() & 0o7777)
}

async fn planted_symlinks_in_the_state_dir_are_never_followed() -> TestResult {
    let port = free_port()?;
    let _server = PoolServer::start(port).await?;
    let victims = TempDir::new("victims")?;
    let victim = victims.path().join("precious");
    std::fs::write(&victim, "precious contents\n")?;

    // node.pid planted as a symlink: replaced by the node's own file, the target untouched.
    let state = TempDir::new("planted-pid")?;
    std::os::unix::fs::symlink(&victim, state.path().join("node.pid"))?;
    let node = NodeProc::start_in(&strs(&worker_args(port, 0, PASSWORD)), &[], state).await?;
    let pid_file = node.state_dir().join("node.pid");
    let written = eventually(Duration::from_secs(20), || async {
        std::fs::symlink_metadata(&pid_file).is_ok_and(|m| m.file_type().is_file())
    })
    .await;
    check!(written, "node.pid never became a file:\n{}", node.output());
    let pid = node.pid().ok_or("node gone")?;
    check!(
        std::fs::read_to_string(&pid_file)?.trim() == pid.to_string(),
        "node.pid does not hold the node's pid"
    );
    check!(
        mode(&pid_file)? == 0o600,
        "node.pid mode {:o}",
        mode(&pid_file)?
    );
    check!(
        std::fs::read_to_string(&victim)? == "precious contents\n",
        "the symlink's target was overwritten"
    );
    drop(node);

    // node.lock planted as a symlink: the node refuses the state dir.
    let state = TempDir::new("planted-lock")?;
    std::os::unix::fs::symlink(&victim, state.path().join("node.lock"))?;
    let mut node = NodeProc::start_in(&strs(&worker_args(port, 0, PASSWORD)), &[], state).await?;
    let exit = node.exit_within(Duration::from_secs(15)).await;
    check!(
        exit.is_some_and(|s| !s.success()),
        "a node.lock symlink was followed: {exit:?}\n{}",
        node.output()
    );
    check!(
        std::fs::read_to_string(&victim)? == "precious contents\n",
        "the symlink's target was changed"
    );
    Ok(())
}

async fn stop_signals_only_the_process_holding_the_lock() -> TestResult {
    let state = TempDir::new("stop")?;
    let lock = state.path().join("node.lock");
    // Another process (this test) holds the lock; node.pid names an unrelated process.
    let file = std::fs::File::create(&lock)?;
    let held = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| format!("cannot lock {}: {e}", lock.display()))?;
    let mut decoy = tokio::process::Command::new("sleep")
        .arg("120")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let decoy_pid = decoy.id().ok_or("decoy gone")?;
    std::fs::write(state.path().join("node.pid"), format!("{decoy_pid}\n"))?;
    check!(
        distributed_computing::is_node_running_in(state.path()),
        "the lock does not show as held"
    );
    let dir = state.path().display().to_string();
    let (status, out, err) = run_cli(&["stop", "--state-dir", &dir], &[], &[], None).await?;
    check!(!status.success(), "stop claimed success: {out}{err}");
    check!(err.contains("not signalling"), "{out}{err}");
    // Had stop signalled the holder, this test process would have died of SIGTERM.
    check!(
        matches!(decoy.try_wait(), Ok(None)),
        "stop signalled a process that is not the node"
    );
    drop(held);
    let _ = decoy.kill().await;
    Ok(())
}

async fn generated_files_are_private_whatever_was_there_before() -> TestResult {
    let port = free_port()?;
    let parent = TempDir::new("private")?;
    let state = parent.path().join("new/state");
    // A world-readable redis.conf from an earlier run (its dir made where the state dir
    // will be, then the state dir made private again).
    let redis_dir = state.join(format!("redis-{port}"));
    std::fs::create_dir_all(&redis_dir)?;
    std::fs::write(redis_dir.join("redis.conf"), "# old\n")?;
    std::fs::set_permissions(
        redis_dir.join("redis.conf"),
        std::fs::Permissions::from_mode(0o666),
    )?;
    std::fs::set_permissions(&redis_dir, std::fs::Permissions::from_mode(0o755))?;
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700))?;
    let p = port.to_string();
    let args = [
        "start-node",
        "--head",
        "--bind",
        "127.0.0.1",
        "-p",
        &p,
        "-r",
        PASSWORD,
        "--cpu-workers",
        "0",
    ];
    let mut head = NodeProc::start_in(&args, &[], TempDir(state.clone())).await?;
    check!(
        head.wait_for_output(&format!("start-node -p {p} -a "), Duration::from_secs(30))
            .await,
        "the head never came up:\n{}",
        head.output()
    );
    let conf = redis_dir.join("redis.conf");
    check!(mode(&conf)? == 0o600, "redis.conf mode {:o}", mode(&conf)?);
    check!(
        mode(&redis_dir)? == 0o700,
        "redis dir mode {:o}",
        mode(&redis_dir)?
    );
    check!(
        mode(&state.join("node.pid"))? == 0o600,
        "node.pid mode {:o}",
        mode(&state.join("node.pid"))?
    );
    check!(
        std::fs::read_to_string(&conf)?.contains("user dc-node on"),
        "redis.conf was not rewritten"
    );
    head.stop().await?;

    // A state dir that does not exist yet is created 0700.
    let fresh = parent.path().join("fresh/state");
    let port = free_port()?;
    let _server = PoolServer::start(port).await?;
    let node = NodeProc::start_in(
        &strs(&worker_args(port, 0, PASSWORD)),
        &[],
        TempDir(fresh.clone()),
    )
    .await?;
    let made = eventually(Duration::from_secs(20), || async {
        fresh.join("node.pid").exists()
    })
    .await;
    check!(made, "the node never wrote its pid:\n{}", node.output());
    check!(mode(&fresh)? == 0o700, "state dir mode {:o}", mode(&fresh)?);

    // A state dir others can write to is refused.
    let open = parent.path().join("open");
    std::fs::create_dir(&open)?;
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777))?;
    let mut node =
        NodeProc::start_in(&strs(&worker_args(port, 0, PASSWORD)), &[], TempDir(open)).await?;
    let exit = node.exit_within(Duration::from_secs(15)).await;
    check!(
        exit.is_some_and(|s| !s.success())
            && node
                .wait_for_output("writable by other users", Duration::from_secs(5))
                .await,
        "a world-writable state dir was used: {exit:?}\n{}",
        node.output()
    );
    Ok(())
}

async fn status_escapes_names_read_from_the_broker() -> TestResult {
    let port = free_port()?;
    let _server = PoolServer::start(port).await?;
    let broker = common::cluster::head_broker(port).await?;
    let evil = "x\u{1b}]0;owned\u{7}\u{1b}[2J\r\nnode: fake\u{202e}";
    // The node id names the node's Redis connection, which Redis keeps printable: the host
    // name and the device ids carry the escape sequences.
    let node = NodeId("n-planted".into());
    broker
        .heartbeat(&NodeStatus {
            node: node.clone(),
            host: format!("h-{evil}"),
            kinds: vec!["probe".into()],
            workers: vec![WorkerStatus {
                worker: WorkerId(format!("{}/0", node.0)),
                session: None,
                state: WorkerState::Idle,
                devices: vec![format!("GPU-{evil}")],
            }],
            leases: vec![],
        })
        .await?;
    // A second node whose status entry is not CBOR at all: skipped, and counted.
    let garbled = NodeId("n-garbled".into());
    broker
        .heartbeat(&NodeStatus {
            node: garbled.clone(),
            host: "h-garbled".into(),
            kinds: vec![],
            workers: vec![],
            leases: vec![],
        })
        .await?;
    common::cluster::redis_cli(
        port,
        &[
            "SET",
            &format!("dc:node:{}", garbled.0),
            "\u{ff} not a status",
        ],
    )
    .await?;
    let p = port.to_string();
    let (status, out, err) = run_cli(
        &["status", "-a", "127.0.0.1", "-p", &p, "-r", PASSWORD],
        &[],
        &[],
        None,
    )
    .await?;
    check!(status.success(), "status failed: {err}");
    check!(
        out.contains("nodes: 1"),
        "the planted node is not listed:\n{out}"
    );
    check!(
        !out.chars()
            .any(|c| (c.is_control() && c != '\n') || c == '\u{202e}'),
        "a control character reached the terminal: {out:?}"
    );
    check!(
        out.contains("h-x\\u{1b}]0;owned\\u{7}\\u{1b}[2J\\r\\nnode: fake\\u{202e}")
            && out.contains("GPU-x\\u{1b}]0;owned"),
        "the name is not shown escaped: {out}"
    );
    check!(
        !out.lines().any(|l| l.starts_with("node: fake")),
        "a name forged a line: {out}"
    );
    check!(
        !out.contains("h-garbled")
            && err.contains("skipped node entries in the broker that cannot be read")
            && err.contains("unreadable=1"),
        "the unreadable entry is not skipped and counted:\n{out}\n{err}"
    );
    Ok(())
}
