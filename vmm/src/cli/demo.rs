//! `amsvm demo`: overcommit to watch, with no config. The paging-server VM and N
//! workload partitions in a pool 1/overcommit the size of their memory. Each partition
//! is busy in its own turn and quiet in the others', so demand moves from partition to
//! partition: their idle memory is loaned through the balloons, and the working sets
//! of the quiet ones are paged out to make room for the busy one. The dashboard shows
//! it live (`--headless`: one line per interval); a summary table ends the run.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};

use clap::Args;

use crate::config::Config;
use crate::control::Registry;
use crate::dashboard;

use super::run::{print_summary, run_specs_observed, success, Control, Observed};
use super::{EXIT_BAD_INPUT, EXIT_GUEST_FAILED};

#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// Workload partitions.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=12))]
    partitions: u32,
    /// Logical memory of each partition, MiB.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(64..=4096))]
    logical_mib: u64,
    /// Overcommit: the partitions' memory over the pool's size (ignored with --pool-mib).
    #[arg(long, default_value_t = 2.0)]
    overcommit: f64,
    /// The pool's size, MiB (default: the partitions' memory / overcommit).
    #[arg(long)]
    pool_mib: Option<u64>,
    /// How long the workloads run, seconds.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(5..=86400))]
    seconds: u64,
    /// Where paging goes: "vm" (the paging-server VM) or "local" (in-process store).
    #[arg(long, default_value = "vm", value_parser = ["vm", "local"])]
    backend: String,
    /// Print one line per interval instead of the dashboard (for logs and CI).
    #[arg(long)]
    headless: bool,
    /// Seconds between dashboard refreshes or headless lines.
    #[arg(long, default_value_t = 1.0)]
    interval: f64,
    /// Serve Prometheus metrics over HTTP at ADDR (e.g. 127.0.0.1:9464), path /metrics.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
    /// Control socket for `amsvm stat`/`top` (default: <runtime dir>/<pid>.sock).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Paging files go here (default: a new directory under the system's temp dir,
    /// removed at the end).
    #[arg(long)]
    paging_dir: Option<PathBuf>,
    /// Print the demo's configuration as an `amsvm run` TOML file and exit.
    #[arg(long)]
    print_config: bool,
}

/// The workload's share of a partition: the working set, idle memory (what the balloon
/// loans first), and the share of the working set a quiet partition still touches.
const WORKING_SET_SHARE: f64 = 0.6;
const IDLE_SHARE: f64 = 0.2;
const QUIET_PCT: u32 = 25;

/// The demo as an `amsvm run` config.
pub fn config_text(a: &DemoArgs, paging_dir: &Path) -> Result<String, String> {
    if !(1.0..=8.0).contains(&a.overcommit) {
        return Err(format!("--overcommit {} must be between 1 and 8", a.overcommit));
    }
    let n = a.partitions as u64;
    let pool_mib = a.pool_mib.unwrap_or(((n * a.logical_mib) as f64 / a.overcommit).round() as u64);
    let ws = ((a.logical_mib as f64 * WORKING_SET_SHARE) as u64).max(1);
    let idle = (a.logical_mib as f64 * IDLE_SHARE) as u64;
    // Each partition is busy about twice during the run, for 1-10 s a turn.
    let turn_ms = (a.seconds * 1000 / (2 * n)).clamp(1000, 10_000);
    let mut t = String::new();
    let _ = writeln!(
        t,
        "# amsvm demo: {n} partitions of {} MiB in a {pool_mib} MiB pool ({:.2}x overcommit), {} backend.\n\
         # Each partition is busy (uniform accesses over {ws} MiB) one turn of {turn_ms} ms in {n},\n\
         # and quiet (only {QUIET_PCT}% of it) in the others; {idle} MiB each is idle memory to loan.\n",
        a.logical_mib,
        (n * a.logical_mib) as f64 / pool_mib.max(1) as f64,
        a.backend
    );
    let _ = writeln!(t, "[pool]\nsize_mib = {pool_mib}\npaging_dir = {:?}\n", paging_dir.display().to_string());
    let _ = writeln!(t, "[paging]\nbackend = {:?}\n", a.backend);
    for i in 0..n {
        let _ = writeln!(
            t,
            "[[partition]]\nname = \"p{i}\"\nlogical_mib = {}\nmin_mib = 16\nimage = \"workload\"\n\
             [partition.workload]\nworking_set_mib = {ws}\nidle_mib = {idle}\npattern = \"uniform\"\nwrite_pct = 20\n\
             duration_ms = {}\nseed = {}\nturn_ms = {turn_ms}\nturns = {n}\nturn = {i}\nquiet_pct = {QUIET_PCT}\n",
            a.logical_mib,
            a.seconds * 1000,
            i + 1
        );
    }
    Ok(t)
}

/// Removes the demo's own paging directory at the end.
struct TempDir(Option<PathBuf>);

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Some(d) = &self.0 {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

pub fn demo(a: DemoArgs) -> i32 {
    let epoch = Instant::now();
    if !(a.interval > 0.0 && a.interval <= 60.0) {
        eprintln!("amsvm: --interval {} must be above 0 and at most 60 seconds", a.interval);
        return EXIT_BAD_INPUT;
    }
    let (paging_dir, _cleanup) = match &a.paging_dir {
        Some(d) => (d.clone(), TempDir(None)),
        None => {
            let d = std::env::temp_dir().join(format!("amsvm-demo-{}", std::process::id()));
            (d.clone(), TempDir(if a.print_config { None } else { Some(d) }))
        }
    };
    let text = match config_text(&a, &paging_dir) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("amsvm: {e}");
            return EXIT_BAD_INPUT;
        }
    };
    if a.print_config {
        out!("{}", text.strip_suffix('\n').unwrap_or(&text));
        return 0;
    }
    let setup = match Config::from_text(&text, Path::new("amsvm demo"), Path::new(".")) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("amsvm: {e}");
            return EXIT_BAD_INPUT;
        }
    };
    if !a.headless && !std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        eprintln!("amsvm: stdout is not a terminal; use --headless");
        return EXIT_BAD_INPUT;
    }
    let pool = setup.pool.as_ref().expect("the demo's config has a pool");
    eprintln!(
        "amsvm demo: paging-server VM ({} backend) and {} partitions of {} MiB in a {} MiB pool, {} s",
        a.backend,
        a.partitions,
        a.logical_mib,
        pool.size_bytes >> 20,
        a.seconds
    );
    let interval = Duration::from_secs_f64(a.interval);
    let watch_error = std::sync::Mutex::new(None);
    let observe = |o: Observed| {
        // The dashboard ends when every partition has ended (or the user quits).
        let stop = AtomicBool::new(false);
        std::thread::scope(|sc| {
            sc.spawn(|| {
                while !stop.load(Relaxed) {
                    let s = o.registry.snapshot();
                    if s.partitions.iter().all(|p| p.state == crate::control::PartitionState::Ended) {
                        stop.store(true, Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            });
            let mut src: Registry = o.registry.clone();
            let r = if a.headless {
                dashboard::run_headless(&mut src, interval, None, &stop, &mut std::io::stdout())
            } else {
                dashboard::run_tui(&mut src, interval, None, &stop).map_err(|e| format!("dashboard: {e}"))
            };
            if !stop.load(Relaxed) {
                // The user quit (or the dashboard failed): stop the partitions.
                (o.stop_all)();
            }
            stop.store(true, Relaxed);
            if let Err(e) = r {
                *watch_error.lock().unwrap() = Some(e);
            }
        });
    };
    let control = a.socket.clone().map_or(Control::Default, Control::At);
    let reports = match run_specs_observed(&setup.specs, Some(pool), control, a.metrics.as_deref(), epoch, Some(&observe)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("amsvm: {e}");
            return EXIT_BAD_INPUT;
        }
    };
    if let Some(e) = watch_error.into_inner().unwrap() {
        eprintln!("amsvm: {e}");
    }
    out!();
    print_summary(&reports);
    if reports.iter().all(success) {
        0
    } else {
        EXIT_GUEST_FAILED
    }
}
