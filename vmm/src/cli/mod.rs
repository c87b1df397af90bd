//! amsvm subcommands. Exit status: 0 success, 1 a guest failed (verification failure,
//! crash), 2 bad input (command line, config, images) — with a one-line error.

mod bench;
mod bench_pool;
mod boot;
mod demo;
mod loan;
mod run;
mod stat;
mod top;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "amsvm", version, about = "Run partitions out of one shared memory pool on KVM")]
pub struct Cli {
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot every partition a config names and wait for them; print a summary.
    Run {
        /// The TOML configuration.
        config: PathBuf,
        /// Copy every partition's console to stdout, prefixed with its name.
        #[arg(long)]
        console: bool,
        /// Control socket for `amsvm stat` (default: <runtime dir>/<pid>.sock).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Serve Prometheus metrics over HTTP at ADDR (e.g. 127.0.0.1:9464), path /metrics.
        #[arg(long, value_name = "ADDR")]
        metrics: Option<String>,
    },
    /// Overcommit to watch, no config needed: the paging-server VM and four workload
    /// partitions at 2x, with demand moving between them (dashboard, or `--headless`).
    Demo(demo::DemoArgs),
    /// Boot one Linux guest.
    Boot(boot::BootArgs),
    /// Print the counters of a running amsvm (pool and partitions), read from its
    /// control socket.
    Stat(stat::StatArgs),
    /// Hold a partition's balloon target in a running amsvm (`auto`: let the pool's
    /// loaning policy decide again).
    Loan(loan::LoanArgs),
    /// Watch a running amsvm live: the pool and every partition, with keys to change weights and loan policies (`--headless`: one line per interval).
    Top(top::TopArgs),
    /// Measurements (not tests): print tables of measured figures.
    Bench {
        #[command(subcommand)]
        what: bench::BenchCmd,
    },
}

/// Exit status for bad input.
pub const EXIT_BAD_INPUT: i32 = 2;
/// Exit status when a guest failed.
pub const EXIT_GUEST_FAILED: i32 = 1;

pub fn main() -> i32 {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("AMSVM_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { EXIT_BAD_INPUT } else { 0 };
        }
    };
    match cli.cmd {
        Command::Run { config, console, socket, metrics } => run::run(&config, console, socket, metrics),
        Command::Boot(args) => boot::boot(args),
        Command::Demo(args) => demo::demo(args),
        Command::Stat(args) => stat::stat(args),
        Command::Loan(args) => loan::loan(args),
        Command::Top(args) => top::top(args),
        Command::Bench { what } => bench::bench(what),
    }
}
