//! The head node's redis-server: started with a password on a free port, found again, and
//! clear errors when the port is taken or the binary is missing.

use std::time::Duration;

use dc_broker_redis::server::{
    Probe, RedisServerOptions, ServerError, find_redis_server_in, probe, start_redis_server,
};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
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
    assert_eq!(
        probe("127.0.0.1", port, "head-pw", Duration::from_secs(2)).await,
        Probe::Ours
    );
    assert_eq!(
        probe("127.0.0.1", port, "wrong", Duration::from_secs(2)).await,
        Probe::WrongPassword
    );
    let conf = std::fs::read_to_string(opts.dir.join("redis.conf")).expect("config");
    assert!(conf.contains("requirepass \"head-pw\""), "{conf}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(opts.dir.join("redis.conf"))
        .expect("meta")
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "the config holds the password: owner-only");
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
        probe("127.0.0.1", port, "head-pw", Duration::from_secs(1)).await,
        Probe::Nothing
    );
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
