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
}

pub fn bench(cmd: BenchCmd) -> i32 {
    match cmd {
        BenchCmd::Startup { partitions, mem_mib, runs } => startup(partitions, mem_mib, runs),
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

fn startup(n: u32, mem_mib: u64, runs: u32) -> i32 {
    if n == 0 || runs == 0 {
        eprintln!("amsvm: --partitions and --runs must be at least 1");
        return EXIT_BAD_INPUT;
    }
    let mem_bytes = match crate::config::check_mem_mib("--mem-mib", mem_mib, amsvm_abi::layout::MAX_RAM) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("amsvm: {e}");
            return EXIT_BAD_INPUT;
        }
    };
    let specs: Vec<PartitionSpec> = (0..n)
        .map(|i| PartitionSpec {
            id: i,
            name: format!("p{i}"),
            mem_bytes,
            vcpus: 1,
            boot: BootConfig::Native {
                image: None,
                workload: WorkloadParams {
                    working_set_pages: 256,
                    pattern: pattern::SEQUENTIAL,
                    write_pct: 50,
                    duration_ms: 300,
                    seed: i as u64 + 1,
                    hot_pct: 10,
                    hot_access_pct: 90,
                    phase_accesses: 512,
                    ..Default::default()
                },
            },
            disks: vec![],
            console_stdout: false,
            log_path: None,
        })
        .collect();
    // Warm up once (page cache, lazily loaded code), then measure.
    let mut first_ms = Vec::new();
    let mut overhead = Vec::new();
    let mut base_rss = Vec::new();
    let mut failures = 0;
    for run in 0..=runs {
        let before = rss_outside(&[]);
        let sample = Mutex::new(0u64);
        let observe = |o: Observed| {
            // Sample once every partition has reached its guest.
            let t = Instant::now();
            while o.metrics.iter().any(|m| m.first_exit_ns.load(Relaxed) == 0) && t.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(1));
            }
            std::thread::sleep(Duration::from_millis(100));
            *sample.lock().unwrap() = rss_outside(o.guest_ranges);
        };
        let epoch = Instant::now();
        let reports = match run_specs_observed(&specs, epoch, Some(&observe)) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("amsvm: {e}");
                return EXIT_BAD_INPUT;
            }
        };
        failures += reports.iter().filter(|r| !success(r)).count();
        if run == 0 {
            continue;
        }
        for r in &reports {
            first_ms.push(r.metrics.first_exit_ns.load(Relaxed) as f64 / 1e6);
        }
        let during = *sample.lock().unwrap();
        overhead.push(during.saturating_sub(before) as f64 / n as f64 / (1 << 20) as f64);
        base_rss.push(before as f64 / (1 << 20) as f64);
        eprint!("\rrun {run}/{runs}");
    }
    eprintln!();
    let per_128 = |ms: f64| ms * 128.0 / mem_mib as f64;
    let (p50_first, max_first) = {
        let mut v = first_ms.clone();
        let m = median(&mut v);
        (m, v.last().copied().unwrap_or(f64::NAN))
    };
    println!("amsvm bench startup: {n} partitions x {mem_mib} MiB, {runs} runs (after one warm-up)");
    println!("{:<52} {:>12} {:>12}", "figure", "median", "target");
    println!("{:<52} {:>10.2}ms {:>12}", "start -> first guest exit, per partition", p50_first, "");
    println!("{:<52} {:>10.2}ms {:>10}ms", "  same, per 128 MiB of partition RAM", per_128(p50_first), 10);
    println!("{:<52} {:>10.2}ms {:>12}", "  slowest partition, any run", max_first, "");
    println!("{:<52} {:>10.2}MiB {:>9}MiB", "VMM RSS outside guest RAM, per partition", median(&mut overhead), 5);
    println!("{:<52} {:>10.2}MiB {:>12}", "process RSS before partitions (shared by all)", median(&mut base_rss), "");
    println!("first guest exit: the guest's first port write (console or hypercall), an upper bound of its first instruction");
    if failures > 0 {
        eprintln!("amsvm: {failures} partition run(s) did not end cleanly");
        return EXIT_GUEST_FAILED;
    }
    0
}
