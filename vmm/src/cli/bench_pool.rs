//! `amsvm bench pool`: page-in latency next to the raw userfaultfd round trip, and
//! workload throughput at several overcommit ratios next to the baseline users would
//! otherwise pick — the same partitions without a pool, in a memory cgroup the size of
//! the pool, with a swap file on the same disk. Everything in one run; one table.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use amsvm_abi::{pattern, WorkloadParams};
use clap::Args;

use super::run::{run_specs, success, Control};
use super::{EXIT_BAD_INPUT, EXIT_GUEST_FAILED};
use crate::config::{BootConfig, LoanPolicy, PagingBackend, PartitionSpec, PoolSpec};
use crate::partition::Report;

#[derive(Args, Debug)]
pub struct PoolBenchArgs {
    /// Partitions in the throughput runs.
    #[arg(long, default_value_t = 4)]
    partitions: u32,
    /// RAM of each partition, MiB.
    #[arg(long, default_value_t = 256)]
    logical_mib: u64,
    /// Working set of each partition, MiB.
    #[arg(long, default_value_t = 200)]
    ws_mib: u64,
    /// Seconds each throughput run lasts.
    #[arg(long, default_value_t = 8)]
    seconds: u64,
    /// Overcommit ratios (sum of partition RAM / pool).
    #[arg(long, value_delimiter = ',', default_value = "1,1.5,2,3")]
    ratios: Vec<f64>,
    /// Where paging stores, the swap file and the cgroup run's config go (same disk).
    #[arg(long, default_value = "target/amsvm-bench")]
    dir: PathBuf,
    /// Skip the cgroup + swap baseline (it needs root, the cgroup v1 memory
    /// controller and swapon).
    #[arg(long)]
    no_baseline: bool,
    /// Skip the paging-server (VM backend) runs.
    #[arg(long)]
    no_vm: bool,
}

const MIB: u64 = 1 << 20;

fn spec(id: u32, mem_mib: u64, w: WorkloadParams) -> PartitionSpec {
    super::bench::workload_spec(id, format!("b{id}"), mem_mib * MIB, w)
}

fn run(specs: &[PartitionSpec], pool: Option<&PoolSpec>) -> Result<Vec<Report>, String> {
    let reports = run_specs(specs, pool, Control::Off, Instant::now()).map_err(|e| e.to_string())?;
    if let Some(bad) = reports.iter().find(|r| !success(r)) {
        return Err(format!("partition {} did not end well: {}", bad.name, bad.outcome));
    }
    Ok(reports)
}

fn pool_spec(dir: &Path, size_mib: u64, raw: bool) -> PoolSpec {
    PoolSpec {
        size_bytes: size_mib * MIB,
        paging_dir: dir.join("paging"),
        backend: PagingBackend::Local,
        raw_uffd: raw,
        policy: crate::config::ReclaimPolicy::Share,
        rotate: std::time::Duration::from_secs(crate::config::DEFAULT_ROTATE_S),
        huge_pages: true,
    }
}

fn vm_pool_spec(dir: &Path, size_mib: u64) -> PoolSpec {
    PoolSpec { backend: PagingBackend::Vm, ..pool_spec(dir, size_mib, false) }
}

/// An access that took longer than this waited on a fault (a hit costs ~1 us: the
/// workload checks or writes 4 KiB; the fastest fault here costs tens of us).
const FAULTED_NS: f64 = 10_000.0;

/// Times of the accesses that faulted: (p50, p99, count), microseconds.
fn quantiles(r: &Report) -> (f64, f64, u64) {
    let m = &r.metrics;
    let us = |q| m.latency_quantile_above_ns(q, FAULTED_NS).map_or(f64::NAN, |ns| ns / 1000.0);
    (us(0.5), us(0.99), m.latency_samples_above(FAULTED_NS))
}

pub fn bench_pool(a: PoolBenchArgs) -> i32 {
    if a.partitions == 0 || a.ws_mib == 0 || a.ws_mib + 8 > a.logical_mib || a.ratios.iter().any(|r| *r < 1.0) {
        eprintln!("amsvm: bench pool: need partitions >= 1, 0 < ws_mib <= logical_mib - 8, ratios >= 1");
        return EXIT_BAD_INPUT;
    }
    if let Err(e) = std::fs::create_dir_all(&a.dir) {
        eprintln!("amsvm: {}: {e}", a.dir.display());
        return EXIT_BAD_INPUT;
    }
    match bench(&a) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("amsvm: bench pool: {e}");
            EXIT_GUEST_FAILED
        }
    }
}

fn bench(a: &PoolBenchArgs) -> Result<(), String> {
    // --- Latency: one partition, uniform random over twice the pool: about half the
    // accesses page in (random, so neighbours brought in with a fault rarely help).
    // The raw round trip: a first touch served by a bare UFFDIO_COPY.
    let lat_ws = 64;
    let lat_pages = lat_ws * 256;
    let touch_once = WorkloadParams {
        working_set_pages: lat_pages,
        pattern: pattern::SEQUENTIAL,
        write_pct: 100,
        passes: 1,
        seed: 1,
        hot_pct: 10,
        phase_accesses: lat_pages,
        measure_latency: 1,
        latency_from: 0,
        ..Default::default()
    };
    eprintln!("latency: raw userfaultfd round trip ...");
    let raw = run(&[spec(0, lat_ws + 16, touch_once)], Some(&pool_spec(&a.dir, 0, true)))?;
    // amsvm page-ins: the pool holds half the working set; from the second pass on every
    // access pages one page in (and, amortized, one out).
    let paging = WorkloadParams { passes: 4, latency_from: lat_pages, pattern: pattern::UNIFORM, ..touch_once };
    eprintln!("latency: amsvm page-in ...");
    let amsvm = run(&[spec(0, lat_ws + 16, paging)], Some(&pool_spec(&a.dir, lat_ws / 2 + 8, false)))?;
    let (raw_p50, raw_p99, raw_n) = quantiles(&raw[0]);
    let (p50, p99, n) = quantiles(&amsvm[0]);
    let hpi = amsvm[0].metrics.hpi.load(Relaxed);
    let vm_latency = if a.no_vm {
        None
    } else {
        eprintln!("latency: amsvm page-in through the paging server ...");
        let r = run(&[spec(0, lat_ws + 16, paging)], Some(&vm_pool_spec(&a.dir, lat_ws / 2 + 8)))?;
        Some(quantiles(&r[0]))
    };

    // --- Throughput at each ratio, amsvm and baseline.
    let total_mib = a.partitions as u64 * a.logical_mib;
    let ws_pages = a.ws_mib * 256;
    let w = WorkloadParams {
        working_set_pages: ws_pages,
        pattern: pattern::HOTSPOT,
        write_pct: 30,
        duration_ms: a.seconds * 1000,
        hot_pct: 15,
        hot_access_pct: 85,
        phase_accesses: ws_pages / 2,
        ..Default::default()
    };
    let specs: Vec<_> = (0..a.partitions).map(|i| spec(i, a.logical_mib, WorkloadParams { seed: i as u64 + 1, ..w })).collect();
    let rate = |reports: &[(u64, u64)]| -> f64 {
        // Verified pages in the timed loop (the final check pass verifies every page once
        // more after it), per second.
        reports.iter().map(|&(v, _)| v.saturating_sub(ws_pages)).sum::<u64>() as f64 / a.seconds as f64
    };
    let mut rows = Vec::new();
    let swap = if a.no_baseline { None } else { Some(Swap::on(&a.dir, a.partitions as u64 * a.ws_mib + 256)?) };
    for &ratio in &a.ratios {
        let pool_mib = (total_mib as f64 / ratio).round() as u64;
        eprintln!("throughput at {ratio}x ({pool_mib} MiB pool): amsvm ...");
        let r = run(&specs, Some(&pool_spec(&a.dir, pool_mib, false)))?;
        let ours: Vec<(u64, u64)> = r.iter().map(|r| (r.metrics.pages_verified.load(Relaxed), r.metrics.hpi.load(Relaxed))).collect();
        let writes: u64 = r.iter().map(|r| r.metrics.page_out_writes.load(Relaxed)).sum();
        let hpi: u64 = ours.iter().map(|o| o.1).sum();
        let base = match &swap {
            None => Base::Skipped,
            Some(_) => {
                eprintln!("throughput at {ratio}x: baseline (cgroup {pool_mib} MiB + swap) ...");
                match baseline(a, &specs, pool_mib)? {
                    Some(b) => Base::Ran(rate(&b.0), b.1, b.2),
                    None => Base::OomKilled,
                }
            }
        };
        rows.push((ratio, pool_mib, rate(&ours), hpi, writes, base));
    }
    drop(swap);

    // --- The paging-server backend at 2x, next to the local store.
    let vm_2x = if a.no_vm {
        None
    } else {
        let pool_mib = total_mib / 2;
        eprintln!("throughput at 2x ({pool_mib} MiB pool) through the paging server ...");
        let r = run(&specs, Some(&vm_pool_spec(&a.dir, pool_mib)))?;
        let ours: Vec<(u64, u64)> = r.iter().map(|r| (r.metrics.pages_verified.load(Relaxed), r.metrics.hpi.load(Relaxed))).collect();
        eprintln!("throughput at 2x ({pool_mib} MiB pool) with the local store, for the same table ...");
        let l = run(&specs, Some(&pool_spec(&a.dir, pool_mib, false)))?;
        let local: Vec<(u64, u64)> = l.iter().map(|r| (r.metrics.pages_verified.load(Relaxed), r.metrics.hpi.load(Relaxed))).collect();
        Some((rate(&ours), ours.iter().map(|o| o.1).sum::<u64>(), rate(&local), local.iter().map(|o| o.1).sum::<u64>()))
    };

    // --- Loaning: the same partitions, but half of each one's memory is idle (stamped
    // at start, then left alone) and its balloon driver cooperates; the pool is 2x
    // overcommitted. Once with the loaning policy on, once off (hypervisor paging only).
    let idle_mib = a.logical_mib.saturating_sub(a.ws_mib / 2 + 16).min(a.ws_mib);
    let loan_ws = (a.ws_mib / 2).max(1) * 256;
    let wl = WorkloadParams {
        working_set_pages: loan_ws,
        phase_accesses: loan_ws / 2,
        idle_pages: idle_mib * 256,
        balloon: amsvm_abi::balloon::COOPERATE,
        ..w
    };
    let pool_mib = total_mib / 2;
    let mut loan_rows = Vec::new();
    for policy in [LoanPolicy::Default, LoanPolicy::Off] {
        eprintln!("loaning at 2x ({pool_mib} MiB pool), loan_policy {policy} ...");
        let specs: Vec<_> = (0..a.partitions)
            .map(|i| PartitionSpec { loan_policy: policy, ..spec(i, a.logical_mib, WorkloadParams { seed: i as u64 + 1, ..wl }) })
            .collect();
        let r = run(&specs, Some(&pool_spec(&a.dir, pool_mib, false)))?;
        let sum = |f: &dyn Fn(&Report) -> u64| r.iter().map(f).sum::<u64>();
        let bal = |r: &Report, f: &dyn Fn(&crate::devices::virtio::balloon::BalloonState) -> u64| {
            r.metrics.balloon.lock().unwrap_or_else(|e| e.into_inner()).as_deref().map_or(0, f)
        };
        let verified = sum(&|r| r.metrics.pages_verified.load(Relaxed).saturating_sub(loan_ws));
        let balloon_pages = sum(&|r| bal(r, &|b| b.frames_freed.load(Relaxed)));
        let balloon_ns = sum(&|r| bal(r, &|b| b.discard_ns.load(Relaxed)));
        let paged = sum(&|r| r.metrics.page_outs.load(Relaxed));
        let paged_ns = sum(&|r| r.metrics.page_out_ns.load(Relaxed));
        let peak_loan = sum(&|r| bal(r, &|b| b.peak_loaned.load(Relaxed)));
        let mibs = |pages: u64, ns: u64| if ns == 0 { f64::NAN } else { pages as f64 * 4096.0 / MIB as f64 / (ns as f64 / 1e9) };
        loan_rows.push((
            policy,
            verified as f64 / a.seconds as f64,
            sum(&|r| r.metrics.hpi.load(Relaxed)),
            peak_loan,
            balloon_pages,
            mibs(balloon_pages, balloon_ns),
            paged,
            mibs(paged, paged_ns),
        ));
    }

    out!();
    out!("amsvm bench pool — {}", chrono_like_date());
    out!();
    out!("page-in latency (guest-measured time of each access that faulted, i.e. took > {} us)", FAULTED_NS / 1000.0);
    out!("  raw: every page of {lat_ws} MiB touched once; amsvm: uniform random over {lat_ws} MiB, pool {} MiB, after a warm-up pass", lat_ws / 2 + 8);
    out!("{:<44} {:>10} {:>10} {:>10}", "", "p50 us", "p99 us", "samples");
    out!("{:<44} {:>10.1} {:>10.1} {:>10}", "raw userfaultfd round trip (UFFDIO_COPY)", raw_p50, raw_p99, raw_n);
    out!("{:<44} {:>10.1} {:>10.1} {:>10}", format!("amsvm page-in ({hpi} hpi)"), p50, p99, n);
    out!("{:<44} {:>10.2} {:>10.2}", "amsvm / raw", p50 / raw_p50, p99 / raw_p99);
    out!();
    out!(
        "throughput: {} partitions x {} MiB, working set {} MiB each, hot spots moving, 30% writes, {} s per run",
        a.partitions, a.logical_mib, a.ws_mib, a.seconds
    );
    out!(
        "{:>6} {:>9} {:>14} {:>10} {:>12} {:>14} {:>10} {:>10} {:>12}",
        "ratio", "pool MiB", "amsvm vpg/s", "amsvm hpi", "amsvm writes", "baseline vpg/s", "swap-ins", "swap-outs", "amsvm/base"
    );
    for (ratio, pool_mib, ours, hpi, writes, base) in rows {
        match base {
            Base::Ran(b, sin, sout) => out!(
                "{:>5.1}x {:>9} {:>14.0} {:>10} {:>12} {:>14.0} {:>10} {:>10} {:>12.2}",
                ratio, pool_mib, ours, hpi, writes, b, sin, sout, ours / b
            ),
            Base::OomKilled => out!(
                "{:>5.1}x {:>9} {:>14.0} {:>10} {:>12} {:>14} {:>10} {:>10} {:>12}",
                ratio, pool_mib, ours, hpi, writes, "OOM-killed", "-", "-", "-"
            ),
            Base::Skipped => out!("{:>5.1}x {:>9} {:>14.0} {:>10} {:>12} {:>14} {:>10} {:>10} {:>12}", ratio, pool_mib, ours, hpi, writes, "-", "-", "-", "-"),
        }
    }
    out!("vpg/s: pages verified per second, all partitions together (the workload checks every word of every page it reads)");
    if let (Some((vp50, vp99, vn)), Some((vm_rate, vm_hpi, local_rate, local_hpi))) = (vm_latency, vm_2x) {
        out!();
        out!("paging backends: the in-process store and the paging-server VM (VASI), same runs as above");
        out!("{:<28} {:>10} {:>10} {:>10} {:>14} {:>10}", "", "p50 us", "p99 us", "samples", "2x vpg/s", "2x hpi");
        out!("{:<28} {:>10.1} {:>10.1} {:>10} {:>14.0} {:>10}", "local store", p50, p99, n, local_rate, local_hpi);
        out!("{:<28} {:>10.1} {:>10.1} {:>10} {:>14.0} {:>10}", "paging-server VM", vp50, vp99, vn, vm_rate, vm_hpi);
        out!(
            "{:<28} {:>10.2} {:>10.2} {:>10} {:>14.2}   (targets: p50 <= 1.5, throughput >= 0.70)",
            "VM / local",
            vp50 / p50,
            vp99 / p99,
            "",
            vm_rate / local_rate
        );
    }
    out!();
    out!(
        "loaning: {} partitions x {} MiB, working set {} MiB + {} MiB idle each, pool {} MiB (2x), {} s per run",
        a.partitions,
        a.logical_mib,
        loan_ws / 256,
        idle_mib,
        pool_mib,
        a.seconds
    );
    out!(
        "{:>11} {:>12} {:>10} {:>13} {:>15} {:>15} {:>13} {:>13}",
        "loan_policy", "vpg/s", "hpi", "peak loan MiB", "balloon MiB", "balloon MiB/s", "paged MiB", "paging MiB/s"
    );
    let base = loan_rows.iter().find(|r| r.0 == LoanPolicy::Off).map(|r| r.1);
    for (policy, vpg, hpi, peak, bpages, brate, ppages, prate) in &loan_rows {
        out!(
            "{:>11} {:>12.0} {:>10} {:>13.1} {:>15.1} {:>15.0} {:>13.1} {:>13.0}",
            policy.to_string(),
            vpg,
            hpi,
            *peak as f64 / 256.0,
            *bpages as f64 / 256.0,
            brate,
            *ppages as f64 / 256.0,
            prate
        );
    }
    if let (Some(on), Some(off)) = (loan_rows.iter().find(|r| r.0 == LoanPolicy::Default).map(|r| r.1), base) {
        out!("throughput with loaning / without: {:.2}", on / off);
    }
    out!("MiB/s: pages reclaimed per second of the reclaiming thread's time (balloon: dropping inflated pages; paging: page-out)");
    Ok(())
}

pub(super) fn chrono_like_date() -> String {
    Command::new("date").arg("-u").arg("+%Y-%m-%d %H:%M UTC").output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default()
}

/// What the baseline did at one ratio.
enum Base {
    /// pages verified per second, swap-ins, swap-outs
    Ran(f64, u64, u64),
    /// The memory cgroup's OOM killer ended it.
    OomKilled,
    Skipped,
}

/// A swap file, on while it lives.
pub(super) struct Swap(PathBuf);

impl Swap {
    pub(super) fn on(dir: &Path, mib: u64) -> Result<Swap, String> {
        let path = dir.join("swapfile");
        let _ = Command::new("swapoff").arg(&path).output(); // a left-over one, if any
        let _ = std::fs::remove_file(&path);
        let sh = |args: &[&str]| -> Result<(), String> {
            let out = Command::new(args[0]).args(&args[1..]).output().map_err(|e| format!("{}: {e}", args[0]))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!("{} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
            }
        };
        let p = path.to_str().ok_or("swap path is not UTF-8")?;
        // dd, not fallocate: swapon refuses files with holes or unwritten extents on some
        // file systems.
        sh(&["dd", "if=/dev/zero", &format!("of={p}"), "bs=1M", &format!("count={mib}"), "status=none"])?;
        sh(&["chmod", "600", p])?;
        sh(&["mkswap", "-q", p])?;
        sh(&["swapon", p]).map_err(|e| format!("{e} (the baseline needs root and swap on a file; use --no-baseline to skip it)"))?;
        Ok(Swap(path))
    }
}

impl Drop for Swap {
    fn drop(&mut self) {
        let _ = Command::new("swapoff").arg(&self.0).status();
        let _ = std::fs::remove_file(&self.0);
    }
}

pub(super) fn vmstat(key: &str) -> u64 {
    std::fs::read_to_string("/proc/vmstat")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix(key).and_then(|v| v.trim().parse().ok())))
        .unwrap_or(0)
}

/// The same partitions without a pool, in a memory cgroup (v1) of `pool_mib` with swap:
/// per partition (pages verified, hpi=0), and the swap-ins and swap-outs it caused.
/// Per partition (pages verified, hpi), then swap-ins and swap-outs.
type BaselineResult = (Vec<(u64, u64)>, u64, u64);

/// `Ok(None)`: the memory cgroup's OOM killer ended the run (the kernel could not
/// reclaim fast enough), which is a result too.
fn baseline(a: &PoolBenchArgs, specs: &[PartitionSpec], pool_mib: u64) -> Result<Option<BaselineResult>, String> {
    let cg = PathBuf::from(format!("/sys/fs/cgroup/memory/amsvm-bench-{}", std::process::id()));
    std::fs::create_dir_all(&cg).map_err(|e| format!("{}: {e} (the baseline needs the cgroup v1 memory controller)", cg.display()))?;
    let _rm = RemoveDir(cg.clone());
    std::fs::write(cg.join("memory.limit_in_bytes"), (pool_mib * MIB).to_string()).map_err(|e| format!("memory.limit_in_bytes: {e}"))?;
    // The config of the baseline run: the same workload, no pool.
    let mut cfg = String::new();
    for s in specs {
        let BootConfig::Native { workload: w, .. } = &s.boot else { unreachable!() };
        cfg += &format!(
            "[[partition]]\nname = \"{}\"\nlogical_mib = {}\nimage = \"workload\"\n[partition.workload]\n\
             working_set_mib = {}\npattern = \"hotspot\"\nwrite_pct = {}\nduration_ms = {}\nseed = {}\nhot_pct = {}\n\
             hot_access_pct = {}\nphase_accesses = {}\n",
            s.name,
            s.mem_bytes / MIB,
            w.working_set_pages / 256,
            w.write_pct,
            w.duration_ms,
            w.seed ^ ((s.id as u64) << 32),
            w.hot_pct,
            w.hot_access_pct,
            w.phase_accesses
        );
    }
    let cfg_path = a.dir.join("baseline.toml");
    std::fs::write(&cfg_path, cfg).map_err(|e| format!("{}: {e}", cfg_path.display()))?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let (sin, sout) = (vmstat("pswpin "), vmstat("pswpout "));
    let out = Command::new("sh")
        .arg("-c")
        .arg("echo $$ > \"$1/cgroup.procs\" && shift && exec \"$@\"")
        .arg("sh")
        .arg(&cg)
        .arg(&exe)
        .args(["run", "--socket"])
        .arg(a.dir.join("baseline.sock"))
        .arg(&cfg_path)
        .output()
        .map_err(|e| format!("cannot start the baseline run: {e}"))?;
    let (sin, sout) = (vmstat("pswpin ").saturating_sub(sin), vmstat("pswpout ").saturating_sub(sout));
    let stdout = String::from_utf8_lossy(&out.stdout);
    {
        use std::os::unix::process::ExitStatusExt;
        if out.status.signal() == Some(libc::SIGKILL) {
            return Ok(None);
        }
    }
    if !out.status.success() {
        return Err(format!(
            "baseline run failed ({}; a memory cgroup kills on OOM when swap runs out): {}\n{stdout}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    // Rows of the summary table: name, touched, verified, ...
    let rows: Vec<(u64, u64)> = stdout
        .lines()
        .filter(|l| specs.iter().any(|s| l.starts_with(&format!("{} ", s.name))))
        .filter_map(|l| l.split_whitespace().nth(2).and_then(|v| v.parse().ok()).map(|v| (v, 0)))
        .collect();
    if rows.len() != specs.len() {
        return Err(format!("cannot read the baseline's summary:\n{stdout}"));
    }
    Ok(Some((rows, sin, sout)))
}

pub(super) struct RemoveDir(pub(super) PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}
