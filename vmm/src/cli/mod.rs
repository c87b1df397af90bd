//! amsvm subcommands. Exit status: 0 success, 1 a guest failed (verification failure,
//! crash), 2 bad input (command line, config, images) — with a one-line error.

/// `println!` for amsvm's own output: a reader that went away (`amsvm run ... | head`)
/// does not end amsvm with a panic; the rest of its output is dropped and the
/// partitions run on to their end (and exit status).
macro_rules! out {
    () => {
        $crate::cli::out_line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::cli::out_line(format_args!($($arg)*))
    };
}

mod bench;
mod bench_peers;
mod bench_pool;
mod boot;
mod demo;
mod faults;
mod loan;
mod partition_ops;
mod run;
mod seccomp_check;
mod stat;
mod top;

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

/// Set once stdout could not be written: nothing more goes there.
static STDOUT_GONE: AtomicBool = AtomicBool::new(false);

/// One line on stdout (see [`out!`]). The first failure other than a closed pipe is
/// reported on stderr.
pub(crate) fn out_line(args: std::fmt::Arguments) {
    if STDOUT_GONE.load(Relaxed) {
        return;
    }
    let mut o = std::io::stdout().lock();
    if let Err(e) = o.write_fmt(args).and_then(|()| o.write_all(b"\n")) {
        STDOUT_GONE.store(true, Relaxed);
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            eprintln!("amsvm: stdout: {e}; its output is dropped from here on");
        }
    }
}

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "amsvm", version, about = "Run partitions out of one shared memory pool on KVM")]
pub struct Cli {
    #[command(subcommand)]
    cmd: Command,
    /// Seccomp filters on vCPU, device, pager and control threads: `enforce` ends amsvm
    /// (status 159) on a forbidden system call, `log` only logs it (dmesg), `off`.
    #[arg(long, global = true, value_enum, env = "AMSVM_SECCOMP", default_value = "enforce")]
    seccomp: crate::seccomp::Mode,
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
    /// End a running partition now (its memory and paging device go back to the pool).
    Destroy(partition_ops::PartitionArgs),
    /// Resume a partition the pool paused on a paging-device error, once the device
    /// works again.
    Resume(partition_ops::PartitionArgs),
    /// The fault campaign: runs of the overcommit scenario with faults injected (the
    /// paging server killed, paging I/O errors and ENOSPC, a partition destroyed in its
    /// page-in, a silent balloon, a flooded control socket); prints injected vs survived.
    Faults(faults::FaultArgs),
    /// Measurements (not tests): print tables of measured figures.
    Bench {
        #[command(subcommand)]
        what: bench::BenchCmd,
    },
    /// Apply a thread kind's seccomp filter on a thread and make one system call (tests).
    #[command(hide = true)]
    SeccompCheck(seccomp_check::CheckArgs),
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
    crate::seccomp::set_mode(cli.seccomp);
    // The amsvm processes this one starts (`bench`) run in the same mode. Edition 2021:
    // safe to call; no other thread runs yet.
    std::env::set_var("AMSVM_SECCOMP", cli.seccomp.name());
    match cli.cmd {
        Command::Run { config, console, socket, metrics } => run::run(&config, console, socket, metrics),
        Command::Boot(args) => boot::boot(args),
        Command::Demo(args) => demo::demo(args),
        Command::Stat(args) => stat::stat(args),
        Command::Loan(args) => loan::loan(args),
        Command::Top(args) => top::top(args),
        Command::Faults(args) => faults::faults(args),
        Command::Destroy(args) => partition_ops::destroy(args),
        Command::Resume(args) => partition_ops::resume(args),
        Command::Bench { what } => bench::bench(what),
        Command::SeccompCheck(args) => seccomp_check::seccomp_check(args),
    }
}
