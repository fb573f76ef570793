//! The MLP sweep on a head node: opens a pool with the head's join token (`--token-file FILE`
//! or `DC_TOKEN`), or on `-a HOST -p PORT` with the pool password (`DC_PASSWORD`, or `-r`),
//! streams results with `imap_unordered`, broadcasts each new best with `update_workers`, and
//! prints the results table.
//!
//! ```text
//! cargo run --release --example sweep_client -- --token-file join-token
//! ```
//!
//! Start the nodes first with the `sweep_node` example (same worker kind).

mod mlp;

use std::process::ExitCode;

use distributed_computing::{BoxError, DEFAULT_PORT, Pool};
use mlp::{DatasetSpec, MlpSweep, sweep};

fn main() -> ExitCode {
    mlp::run_client("sweep_client", client())
}

struct Target {
    address: String,
    port: u16,
    password: String,
    token: Option<String>,
}

fn parse_args() -> Result<Target, BoxError> {
    let mut target = Target {
        address: std::env::var("DC_ADDRESS").unwrap_or_else(|_| "localhost".into()),
        port: match std::env::var("DC_PORT") {
            Ok(p) => p.parse()?,
            Err(_) => DEFAULT_PORT,
        },
        password: std::env::var("DC_PASSWORD").unwrap_or_default(),
        token: std::env::var("DC_TOKEN").ok().filter(|t| !t.is_empty()),
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "-a" | "--address" => target.address = value,
            "-p" | "--port" => target.port = value.parse()?,
            "-r" | "--password" => target.password = value,
            "--token-file" => target.token = Some(std::fs::read_to_string(value)?),
            other => {
                return Err(format!(
                    "unknown flag {other}: use --token-file FILE, or -a HOST -p PORT -r PASSWORD"
                )
                .into());
            }
        }
    }
    if target.password.is_empty() && target.token.is_none() {
        return Err(
            "no token and no password: pass --token-file FILE (or DC_TOKEN), or set DC_PASSWORD"
                .into(),
        );
    }
    Ok(target)
}

async fn client() -> Result<(), BoxError> {
    let target = parse_args()?;
    let mut builder = Pool::<MlpSweep>::builder(DatasetSpec::default());
    builder = match &target.token {
        Some(token) => builder.token(token),
        None => builder
            .address(target.address)
            .port(target.port)
            .password(target.password),
    };
    let pool = builder.connect().await?;
    let outcome = sweep(&pool).await;
    let closed = pool.close().await;
    outcome?;
    closed?;
    Ok(())
}
