//! `dc-cli`: the command line of distributed-computing.
//!
//! This first release has `devices` (what GPUs a node here would use, and each worker's
//! environment); `start-node`, `status` and `stop` arrive with the Redis backend.

use std::process::ExitCode;

const HELP: &str = "\
dc-cli — distributed GPU computations made easy

USAGE:
    dc-cli <COMMAND> [OPTIONS]

COMMANDS:
    devices [--gpus auto|none|LIST]   List the GPUs a node on this machine would use (one
                                      worker process each) and the environment each worker gets.
                                      Honours CUDA_VISIBLE_DEVICES and DC_FAKE_GPUS=N.
    help                              Print this help.

OPTIONS:
    -h, --help       Print this help.
    -V, --version    Print the version.

Coming with the Redis backend: start-node (--head, -a, -p, -r), status, stop.
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        None | Some("help" | "-h" | "--help") => {
            print!("{HELP}");
            ExitCode::SUCCESS
        }
        Some("-V" | "--version") => {
            println!("dc-cli {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Some("devices") => devices(&args[1..]),
        Some(other) => {
            eprintln!("dc-cli: unknown command {other:?}\n\n{HELP}");
            ExitCode::from(2)
        }
    }
}

fn devices(args: &[String]) -> ExitCode {
    let selection = match args {
        [] => dc_gpu::GpuSelection::Auto,
        [flag, value] if flag == "--gpus" => match value.parse() {
            Ok(sel) => sel,
            Err(e) => {
                eprintln!("dc-cli devices: {e}");
                return ExitCode::from(2);
            }
        },
        _ => {
            eprintln!("dc-cli devices: usage: dc-cli devices [--gpus auto|none|LIST]");
            return ExitCode::from(2);
        }
    };
    let inventory = dc_gpu::discover_with(&dc_gpu::EnvSnapshot::from_process(), &selection);
    for warning in &inventory.warnings {
        eprintln!("warning: {warning}");
    }
    if inventory.gpus.is_empty() {
        println!(
            "no GPUs: {}",
            inventory.cpu_reason.as_deref().unwrap_or("none found")
        );
        println!("a node here runs CPU workers only when asked (--cpu-workers N)");
        return ExitCode::SUCCESS;
    }
    println!(
        "{} GPU(s), found in {:.1} ms:",
        inventory.gpus.len(),
        inventory.took.as_secs_f64() * 1e3
    );
    for gpu in &inventory.gpus {
        println!(
            "  [{}] {}  {}  {:.0} GiB  bus {}",
            gpu.index,
            gpu.uuid,
            gpu.name,
            gpu.memory_total as f64 / (1u64 << 30) as f64,
            gpu.pci_bus_id
        );
        let env: Vec<String> = dc_gpu::worker_env(Some(gpu))
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        println!("      worker env: {}", env.join(" "));
    }
    ExitCode::SUCCESS
}
