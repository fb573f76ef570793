//! The head node's redis-server: started with a password on a free port, found again, and
//! clear errors when the port is taken or the binary is missing.

use std::time::Duration;

use dc_broker_redis::server::{
    Probe, RedisServerOptions, ServerError, find_redis_server_in, probe, start_redis_server,
};

fn free_port() -> u16 {
    dc_core::testing::support::free_port().expect("bind a free port")
}

fn options(port: u16, name: &str) -> RedisServerOptions {
    let dir = std::env::temp_dir().join(format!("dc-head-{name}-{}-{port}", std::process::id()));
    let mut options = RedisServerOptions::new("head-pw", port, dir);
    options.bind = vec!["127.0.0.1".into()];
    options
}

#[tokio::test]
async fn head_server_starts_with_password_and_is_found_again() {
    let port = free_port();
    let opts = options(port, "start");
    let mut redis = start_redis_server(&opts)
        .await
        .expect("start")
        .expect("started here");
    let tls = opts
        .client_tls()
        .expect("certificates")
        .expect("TLS by default");
    let secs = Duration::from_secs;
    assert_eq!(
        probe("127.0.0.1", port, "head-pw", Some(&tls), secs(2)).await,
        Probe::Ours
    );
    assert_eq!(
        probe("127.0.0.1", port, "wrong", Some(&tls), secs(2)).await,
        Probe::WrongPassword
    );
    // TLS only: a plain client gets nothing it can use, and is told nothing.
    assert_ne!(
        probe("127.0.0.1", port, "head-pw", None, secs(2)).await,
        Probe::Ours
    );
    // Another head's CA (another state dir) is refused before the password is sent.
    let stranger = options(port, "stranger");
    let theirs = stranger.client_tls().expect("certificates").expect("TLS");
    assert_eq!(
        probe("127.0.0.1", port, "head-pw", Some(&theirs), secs(2)).await,
        Probe::WrongPassword
    );
    let conf = std::fs::read_to_string(opts.dir.join("redis.conf")).expect("config");
    assert!(conf.contains(&format!("tls-port {port}\n")), "{conf}");
    assert!(conf.contains("port 0\n"), "no plain port: {conf}");
    assert!(conf.contains("user default off"), "{conf}");
    assert!(
        !conf.contains("head-pw"),
        "the clear password is in the config: {conf}"
    );
    use std::os::unix::fs::PermissionsExt;
    for file in ["redis.conf", "tls-server.key", "tls-ca.key", "admin-secret"] {
        let mode = std::fs::metadata(opts.dir.join(file))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{file} is owner-only");
    }
    // Same port and password: already running, nothing new started.
    assert!(start_redis_server(&opts).await.expect("again").is_none());
    // Same port, other password: a clear error.
    let mut other = opts.clone();
    other.password = "another".into();
    assert!(matches!(
        start_redis_server(&other).await,
        Err(ServerError::OtherPassword { .. })
    ));
    redis.terminate().await.expect("terminate");
    assert_eq!(
        probe("127.0.0.1", port, "head-pw", Some(&tls), secs(1)).await,
        Probe::Nothing
    );
    let _ = std::fs::remove_dir_all(&opts.dir);
    let _ = std::fs::remove_dir_all(&stranger.dir);
}

#[tokio::test]
async fn without_tls_the_server_speaks_plain_redis_with_the_same_users() {
    let port = free_port();
    let mut opts = options(port, "plain");
    opts.tls = false;
    let mut redis = start_redis_server(&opts)
        .await
        .expect("start")
        .expect("started here");
    assert_eq!(
        probe("127.0.0.1", port, "head-pw", None, Duration::from_secs(2)).await,
        Probe::Ours
    );
    let conf = std::fs::read_to_string(opts.dir.join("redis.conf")).expect("config");
    assert!(
        conf.contains(&format!("port {port}\n")) && !conf.contains("tls-port"),
        "{conf}"
    );
    assert!(conf.contains("user default off"), "{conf}");
    redis.terminate().await.expect("terminate");
    let _ = std::fs::remove_dir_all(&opts.dir);
}

#[tokio::test]
async fn a_port_taken_by_another_program_is_a_clear_error() {
    // Something that accepts connections but never speaks Redis.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            held.push(sock);
        }
    });
    let err = start_redis_server(&options(port, "taken"))
        .await
        .expect_err("the port is taken");
    assert!(
        matches!(err, ServerError::PortInUse { port: p } if p == port),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("choose another port with -p"),
        "{err}"
    );
}

#[test]
fn a_missing_binary_is_named_with_the_fix() {
    assert_eq!(
        find_redis_server_in(std::ffi::OsStr::new("/nonexistent-dir")),
        None
    );
    let message = ServerError::NotFound.to_string();
    assert!(
        message.contains("apt-get install redis-server"),
        "{message}"
    );
    assert!(message.contains("--broker redis://"), "{message}");
}
