//! `amsvm bench ...`: measurements that print tables. They never pass or fail on time.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use amsvm_abi::{pattern, WorkloadParams};
use clap::Subcommand;

use crate::config::{BootConfig, PartitionSpec};

use super::run::{run_specs_observed, success, Observed};
use super::{EXIT_BAD_INPUT, EXIT_GUEST_FAILED};

#[derive(Subcommand, Debug)]
pub enum BenchCmd {
    /// Time from start to each partition's first guest exit, and the VMM's own memory
    /// per partition (RSS outside guest RAM).
    Startup {
        /// Partitions started together in each run.
        #[arg(long, default_value_t = 4)]
        partitions: u32,
        /// RAM of each partition in MiB.
        #[arg(long, default_value_t = 128)]
        mem_mib: u64,
        /// Runs to take the median over.
        #[arg(long, default_value_t = 10)]
        runs: u32,
    },
    /// Page-in latency next to the raw userfaultfd round trip, and throughput at
    /// several overcommit ratios next to a memory cgroup with swap.
    Pool(super::bench_pool::PoolBenchArgs),
    /// One overcommit scenario three ways with the same guest: amsvm's pool (paging-server
    /// VM and local store), QEMU microvm VMs in a memory cgroup with swap, and the same
    /// with virtio-balloon driven over QMP; one table.
    Peers(super::bench_peers::PeersArgs),
    /// One measured run of `startup` (internal).
    #[command(hide = true)]
    StartupChild {
        #[arg(long)]
        partitions: u32,
        #[arg(long)]
        mem_mib: u64,
    },
}

pub fn bench(cmd: BenchCmd) -> i32 {
    match cmd {
        BenchCmd::Startup { partitions, mem_mib, runs } => startup(partitions, mem_mib, runs),
        BenchCmd::StartupChild { partitions, mem_mib } => startup_child(partitions, mem_mib << 20),
        BenchCmd::Pool(args) => super::bench_pool::bench_pool(args),
        BenchCmd::Peers(args) => super::bench_peers::bench_peers(args),
    }
}

/// Resident bytes of this process outside the given host ranges (guest RAM), from
/// /proc/self/smaps.
pub fn rss_outside(ranges: &[(u64, u64)]) -> u64 {
    let Ok(text) = std::fs::read_to_string("/proc/self/smaps") else { return 0 };
    let mut total = 0u64;
    let mut skip = false;
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        let Some(first) = parts.next() else { continue };
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                skip = ranges.iter().any(|&(s, l)| a < s + l && s < b);
                continue;
            }
        }
        if first == "Rss:" && !skip {
            total += parts.next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) * 1024;
        }
    }
    total
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if v.is_empty() {
        return f64::NAN;
    }
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

fn mono_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A single-vCPU partition of `mem_bytes` running the built-in workload `w`, as the
/// benches start them (no disk, no console, default pool settings).
pub(super) fn workload_spec(id: u32, name: String, mem_bytes: u64, w: WorkloadParams) -> PartitionSpec {
    PartitionSpec {
        role: crate::config::PartitionRole::Guest,
        id,
        name,
        mem_bytes,
        min_bytes: 0,
        weight: crate::config::DEFAULT_WEIGHT,
        paging_file: None,
        loan_policy: crate::config::LoanPolicy::Default,
        vcpus: 1,
        boot: BootConfig::Native { image: None, workload: w },
        disks: vec![],
        console_stdout: false,
        log_path: None,
        huge_pages: true,
    }
}

fn bench_specs(n: u32, mem_bytes: u64) -> Vec<PartitionSpec> {
    (0..n)
        .map(|i| {
            let w = WorkloadParams {
                working_set_pages: 256,
                pattern: pattern::SEQUENTIAL,
                write_pct: 50,
                duration_ms: 300,
                seed: i as u64 + 1,
                hot_pct: 10,
                hot_access_pct: 90,
                phase_accesses: 512,
                ..Default::default()
            };
            workload_spec(i, format!("p{i}"), mem_bytes, w)
        })
        .collect()
}

/// One measured run, in a fresh process: prints `key value` lines for the parent.
fn startup_child(n: u32, mem_bytes: u64) -> i32 {
    let epoch_mono = mono_ns();
    let epoch = Instant::now();
    let before = rss_outside(&[]);
    let sample = Mutex::new((0u64, 0u64));
    let observe = |o: Observed| {
        let t = Instant::now();
        while o.metrics.iter().any(|m| m.first_exit_ns.load(Relaxed) == 0) && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(100));
        let during = rss_outside(o.guest_ranges);
        let total = rss_outside(&[]);
        *sample.lock().unwrap() = (during, total.saturating_sub(during));
    };
    let reports = match run_specs_observed(&bench_specs(n, mem_bytes), None, super::run::Control::Off, None, epoch, Some(&observe)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("amsvm: {e}");
            return EXIT_BAD_INPUT;
        }
    };
    for r in &reports {
        out!("first_exit_mono_ns {}", epoch_mono + r.metrics.first_exit_ns.load(Relaxed));
    }
    let (during, guest) = *sample.lock().unwrap();
    out!("rss_before {before}");
    out!("rss_during {during}");
    out!("guest_rss {guest}");
    out!("failed {}", reports.iter().filter(|r| !success(r)).count());
    0
}

fn startup(n: u32, mem_mib: u64, runs: u32) -> i32 {
    if n == 0 || runs == 0 {
        eprintln!("amsvm: --partitions and --runs must be at least 1");
        return EXIT_BAD_INPUT;
    }
    if let Err(e) = crate::config::check_mem_mib("--mem-mib", mem_mib, amsvm_abi::layout::MAX_RAM) {
        eprintln!("amsvm: {e}");
        return EXIT_BAD_INPUT;
    }
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("amsvm: cannot find my own executable: {e}");
            return EXIT_BAD_INPUT;
        }
    };
    let mut first_ms = Vec::new();
    let (mut incr, mut whole, mut base) = (Vec::new(), Vec::new(), Vec::new());
    let mut failures = 0u64;
    // One warm-up run (page cache), then the measured runs; each run is a fresh process,
    // timed from just before it is spawned, as `amsvm run` would be.
    for run in 0..=runs {
        let t_spawn = mono_ns();
        let out = std::process::Command::new(&exe)
            .args(["bench", "startup-child", "--partitions", &n.to_string(), "--mem-mib", &mem_mib.to_string()])
            .output();
        let out = match out {
            Ok(o) if o.status.success() => o,
            Ok(o) => {
                eprintln!("amsvm: measured run failed: {}", String::from_utf8_lossy(&o.stderr).trim());
                return EXIT_GUEST_FAILED;
            }
            Err(e) => {
                eprintln!("amsvm: cannot start a measured run: {e}");
                return EXIT_BAD_INPUT;
            }
        };
        let text = String::from_utf8_lossy(&out.stdout);
        let mut vals: Vec<(String, u64)> = Vec::new();
        for l in text.lines() {
            if let Some((k, v)) = l.split_once(' ') {
                if let Ok(v) = v.trim().parse() {
                    vals.push((k.to_string(), v));
                }
            }
        }
        let get = |k: &str| vals.iter().find(|(key, _)| key == k).map(|(_, v)| *v).unwrap_or(0);
        failures += get("failed");
        eprint!("\rrun {run}/{runs}");
        if run == 0 {
            continue;
        }
        for (_, v) in vals.iter().filter(|(k, _)| k == "first_exit_mono_ns") {
            first_ms.push(v.saturating_sub(t_spawn) as f64 / 1e6);
        }
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        incr.push(mib(get("rss_during").saturating_sub(get("rss_before"))) / n as f64);
        whole.push(mib(get("rss_during")) / n as f64);
        base.push(mib(get("rss_before")));
    }
    eprintln!();
    let mut sorted = first_ms.clone();
    let p50 = median(&mut sorted);
    let max = sorted.last().copied().unwrap_or(f64::NAN);
    let per128 = p50 * 128.0 / mem_mib as f64;
    out!("amsvm bench startup: {n} partitions x {mem_mib} MiB started together, {runs} runs (fresh process each, after one warm-up)");
    out!("{:<60} {:>10} {:>10}", "figure", "median", "target");
    out!("{:<60} {:>8.2}ms {:>10}", "process spawn -> partition's first guest exit", p50, "");
    out!("{:<60} {:>8.2}ms {:>8}ms", "  per 128 MiB of partition RAM", per128, 10);
    out!("{:<60} {:>8.2}ms {:>10}", "  slowest partition of any run", max, "");
    out!("{:<60} {:>7.2}MiB {:>7}MiB", "VMM RSS outside guest RAM, whole process / partitions", median(&mut whole), 5);
    out!("{:<60} {:>7.2}MiB {:>10}", "  increment per partition (RSS after - before partitions)", median(&mut incr), "");
    out!("{:<60} {:>7.2}MiB {:>10}", "  process RSS before any partition", median(&mut base), "");
    out!("first guest exit = the workload's first instruction is a CLOCK hypercall; its exit is an upper bound of the first instruction");
    if failures > 0 {
        eprintln!("amsvm: {failures} partition run(s) did not end cleanly");
        return EXIT_GUEST_FAILED;
    }
    0
}
