//! `amsvm faults`: the fault campaign. Runs of the overcommit scenario (partitions in a
//! pool half their size, hot spots moving) while faults are injected: the paging-server
//! VM killed at random moments, paging devices failing with EIO or refusing writes
//! with ENOSPC, a partition destroyed while its own page-in is in flight, a balloon
//! driver that goes silent, and the control socket flooded with malformed requests.
//! Every run ends with the workloads' own verification (every page they read is
//! checked, and a final pass checks them all); the campaign prints what it injected,
//! what was survived, and fails if anything was not.
//!
//! A fault counts as survived when amsvm handled it as designed and the run still
//! ended with every partition's work verified and no failure: the paging server came
//! back after each kill; injected I/O errors were retried, or paused the partition
//! until the fault ended and it was resumed; the destroyed partition's memory and
//! paging slots went back; the silent balloon was noticed and its partition paged
//! instead; every malformed request was answered with an error; and the pool's
//! resident memory never went above its size.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use clap::Args;

use super::run::{run_specs_observed, success, Control, Observed};
use super::{EXIT_BAD_INPUT, EXIT_GUEST_FAILED};
use crate::config::Config;
use crate::control::{PartitionState, Registry, Snapshot};
use crate::partition::{Outcome, Report};

#[derive(Args, Debug)]
pub struct FaultArgs {
    /// The short campaign (for CI): every fault injected, fewer runs and kills.
    #[arg(long)]
    short: bool,
    /// Paging-server kills in all (default: 100, or 6 with --short).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    kills: Option<u32>,
    /// Seed of the random moments (default: from the clock; printed, to repeat a run).
    #[arg(long)]
    seed: Option<u64>,
    /// Only these faults, comma separated: ps-kill, eio, enospc, destroy, balloon, flood.
    #[arg(long, value_delimiter = ',', value_parser = ["ps-kill", "eio", "enospc", "destroy", "balloon", "flood"])]
    only: Vec<String>,
    /// Where paging devices and partition logs go (default: a new directory under the
    /// system's temp dir, removed at the end).
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// The scenario: partitions of this size in a pool half their total, each working on
/// most of its memory with a moving hot spot.
const PARTITIONS: u32 = 3;
const LOGICAL_MIB: u64 = 64;
const POOL_MIB: u64 = PARTITIONS as u64 * LOGICAL_MIB / 2;
const WS_MIB: u64 = 40;

/// Paging-server kills per run of the ps-kill row.
const KILLS_PER_RUN: u32 = 20;

/// One row of the campaign's table.
#[derive(Debug, Default)]
struct Row {
    fault: &'static str,
    backend: &'static str,
    runs: u32,
    injected: u64,
    survived: u64,
    verified: u64,
    failures: u64,
    paused: u64,
    resumed: u64,
    /// What amsvm reported about the faults (restarts, retries, rejections...).
    reported: String,
    /// Why some injected faults do not count as survived.
    problems: Vec<String>,
}

impl Row {
    fn new(fault: &'static str, backend: &'static str) -> Row {
        Row { fault, backend, ..Row::default() }
    }

    /// Add a finished run: its verification and pause counters; false (with the
    /// problem noted) if a partition that should have ended well did not.
    fn add_run(&mut self, end: &RunEnd, expect_destroyed: Option<&str>) -> bool {
        self.runs += 1;
        let mut ok = true;
        for r in &end.reports {
            let m = &r.metrics;
            self.verified += m.pages_verified.load(Relaxed);
            self.failures += m.verify_failures.load(Relaxed) + m.disk_failures.load(Relaxed);
            self.paused += m.pauses.load(Relaxed);
            self.resumed += m.resumes.load(Relaxed);
            let fine = if expect_destroyed == Some(r.name.as_str()) {
                r.outcome == Outcome::Destroyed && m.verify_failures.load(Relaxed) == 0
            } else {
                success(r)
            };
            if !fine {
                ok = false;
                self.problems.push(format!("run {}: partition {}: {} ({} failures)", self.runs, r.name, r.outcome, m.verify_failures.load(Relaxed)));
            }
        }
        if let Some(p) = &end.snapshot.pool {
            if p.peak_in_use_pages > p.size_pages {
                ok = false;
                self.problems.push(format!("run {}: the pool peaked at {} pages, above its {}", self.runs, p.peak_in_use_pages, p.size_pages));
            }
        }
        ok
    }

    fn all_survived(&self) -> bool {
        self.injected > 0 && self.survived == self.injected && self.failures == 0 && self.problems.is_empty()
    }
}

/// A small deterministic generator for the random moments (splitmix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A duration uniformly in `[lo, hi)` milliseconds.
    fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.next() % (hi - lo).max(1))
    }
}

/// How a run of the scenario ended.
struct RunEnd {
    reports: Vec<Report>,
    /// The registry's snapshot once every partition had ended.
    snapshot: Snapshot,
}

/// The scenario's config: `backend` paging, the workload of partition `i` given extra
/// settings by `extra(i)`.
fn scenario(dir: &Path, backend: &str, duration_ms: u64, extra: impl Fn(u32) -> String) -> String {
    let mut t = format!(
        "log_dir = {:?}\n[pool]\nsize_mib = {POOL_MIB}\npaging_dir = {:?}\n[paging]\nbackend = {backend:?}\n",
        dir.join("logs").display().to_string(),
        dir.join("paging").display().to_string()
    );
    for i in 0..PARTITIONS {
        t += &format!(
            "[[partition]]\nname = \"p{i}\"\nlogical_mib = {LOGICAL_MIB}\nmin_mib = 8\nimage = \"workload\"\n\
             [partition.workload]\nworking_set_mib = {WS_MIB}\npattern = \"hotspot\"\nhot_pct = 20\nhot_access_pct = 80\n\
             phase_accesses = 20000\nwrite_pct = 30\nduration_ms = {duration_ms}\nseed = {}\n{}\n",
            i + 1,
            extra(i)
        );
    }
    t
}

/// Is any partition still running (or paused)?
fn running(registry: &Registry) -> bool {
    registry.snapshot().partitions.iter().any(|p| p.state != PartitionState::Ended)
}

/// Sleep `d`, or less if every partition ends first; false if they have.
fn sleep_while_running(registry: &Registry, d: Duration) -> bool {
    let end = Instant::now() + d;
    while Instant::now() < end {
        if !running(registry) {
            return false;
        }
        std::thread::sleep((end - Instant::now()).min(Duration::from_millis(20)));
    }
    true
}

/// Run `text` with `inject` beside it (it returns when it is done injecting); then
/// wait for every partition to end.
fn run(text: &str, name: &str, socket: Option<&Path>, inject: &(dyn Fn(&Observed) + Sync)) -> Result<RunEnd, String> {
    let setup = Config::from_text(text, Path::new(name), Path::new(".")).map_err(|e| e.to_string())?;
    let pool = setup.pool.as_ref().ok_or("the scenario has a pool")?;
    let snapshot = Mutex::new(None);
    let observe = |o: Observed| {
        inject(&o);
        while running(o.registry) {
            std::thread::sleep(Duration::from_millis(50));
        }
        *snapshot.lock().unwrap() = Some(o.registry.snapshot());
    };
    let control = socket.map_or(Control::Off, |p| Control::At(p.to_path_buf()));
    let reports = run_specs_observed(&setup.specs, Some(pool), control, None, Instant::now(), Some(&observe)).map_err(|e| e.to_string())?;
    let snapshot = snapshot.into_inner().unwrap().ok_or("the partitions ended before the campaign could watch them")?;
    Ok(RunEnd { reports, snapshot })
}

/// Resume every paused partition (the operator, once the fault is over); how many.
fn resume_paused(registry: &Registry) -> u64 {
    let s = registry.snapshot();
    s.partitions.iter().filter(|p| p.state == PartitionState::Paused).filter(|p| registry.resume(&p.name).is_ok()).count() as u64
}

/// The paging server killed at random moments, `kills` times over runs of
/// [`KILLS_PER_RUN`]. Each kill counts once the server is back.
fn ps_kill(dir: &Path, kills: u32, rng: &mut Rng, progress: &dyn Fn(&str)) -> Row {
    let mut row = Row::new("paging-server VM killed", "vm");
    let mut left = kills;
    while left > 0 {
        let k = left.min(KILLS_PER_RUN);
        left -= k;
        let moments: Vec<Duration> = (0..k).map(|_| rng.ms(100, 600)).collect();
        let duration_ms = 2_000 + moments.iter().map(|d| d.as_millis() as u64 + 150).sum::<u64>();
        let text = scenario(dir, "vm", duration_ms, |_| "balloon = \"ignore\"".into());
        let done = Mutex::new((0u64, 0u64, 0u64)); // kills, came back, resubmitted
        let inject = |o: &Observed| {
            let Some(ps) = o.registry.paging_server.as_ref().and_then(|w| w.upgrade()) else { return };
            let mut d = done.lock().unwrap();
            for m in &moments {
                // Each kill hits a running server: the previous one was restarted.
                let want = 1 + d.0;
                let t0 = Instant::now();
                while ps.starts.load(Relaxed) < want && t0.elapsed() < Duration::from_secs(30) {
                    std::thread::sleep(Duration::from_millis(5));
                }
                if !sleep_while_running(o.registry, *m) {
                    break;
                }
                ps.kill("killed by the fault campaign");
                d.0 += 1;
            }
            let t0 = Instant::now();
            while ps.starts.load(Relaxed) < 1 + d.0 && t0.elapsed() < Duration::from_secs(30) {
                std::thread::sleep(Duration::from_millis(5));
            }
            d.1 = (ps.starts.load(Relaxed) - 1).min(d.0);
            d.2 = ps.channel.metrics.resubmitted.load(Relaxed);
        };
        match run(&text, "amsvm faults (ps-kill)", None, &inject) {
            Err(e) => row.problems.push(e),
            Ok(end) => {
                let (killed, back, resubmitted) = *done.lock().unwrap();
                row.injected += killed;
                let ok = row.add_run(&end, None);
                if back < killed {
                    row.problems.push(format!("run {}: the paging server came back after {back} of {killed} kills", row.runs));
                }
                if ok {
                    row.survived += back;
                }
                row.reported = add_counts(&row.reported, &[("restarts", back), ("requests resubmitted", resubmitted)]);
                progress(&format!("ps-kill: run {} — {killed} kills, the server came back {back} times", row.runs));
            }
        }
        if row.injected < (kills - left) as u64 {
            break; // a run ended early: do not loop for ever
        }
    }
    row
}

/// "a 3, b 4" plus `more`, summed by name.
fn add_counts(text: &str, more: &[(&str, u64)]) -> String {
    let mut items: Vec<(String, u64)> = text
        .split(", ")
        .filter_map(|it| it.split_once(' ').and_then(|(n, name)| Some((name.to_string(), n.parse().ok()?))))
        .collect();
    for (name, n) in more {
        match items.iter_mut().find(|(k, _)| k == name) {
            Some(it) => it.1 += n,
            None => items.push((name.to_string(), *n)),
        }
    }
    items.iter().map(|(k, n)| format!("{n} {k}")).collect::<Vec<_>>().join(", ")
}

/// Every `EIO_EVERY`th paging-device I/O fails with EIO for a whole run.
const EIO_EVERY: u64 = 25;

fn eio(dir: &Path, backend: &'static str, progress: &dyn Fn(&str)) -> Row {
    let mut row = Row::new("paging device I/O error", backend);
    let text = scenario(dir, backend, 5_000, |_| "balloon = \"ignore\"".into());
    let f = crate::faults::get();
    let before = f.eio_injected.load(Relaxed);
    let inject = |o: &Observed| {
        f.set_eio_every(EIO_EVERY);
        // An error that outlasts the retries pauses its partition: the operator resumes it.
        while sleep_while_running(o.registry, Duration::from_millis(100)) {
            resume_paused(o.registry);
        }
    };
    let r = run(&text, "amsvm faults (eio)", None, &inject);
    f.set_eio_every(0);
    match r {
        Err(e) => row.problems.push(e),
        Ok(end) => {
            row.injected = f.eio_injected.load(Relaxed) - before;
            let retries: u64 = end.reports.iter().map(|r| r.metrics.pager_retries.load(Relaxed)).sum();
            if row.add_run(&end, None) {
                row.survived = row.injected;
            }
            row.reported = add_counts("", &[("retries", retries)]);
            progress(&format!("eio ({backend}): {} errors injected, {retries} retries", row.injected));
        }
    }
    row
}

/// Windows in which every paging-device write fails with ENOSPC; after each the
/// operator resumes what was paused. A window counts once a write was refused in it.
fn enospc(dir: &Path, backend: &'static str, windows: u32, rng: &mut Rng, progress: &dyn Fn(&str)) -> Row {
    let mut row = Row::new("paging device full", backend);
    let plan: Vec<(Duration, Duration)> = (0..windows).map(|_| (rng.ms(300, 800), rng.ms(300, 700))).collect();
    let duration_ms = 2_500 + plan.iter().map(|(a, b)| (*a + *b).as_millis() as u64).sum::<u64>();
    let text = scenario(dir, backend, duration_ms, |_| "balloon = \"ignore\"".into());
    let f = crate::faults::get();
    let counted = Mutex::new((0u64, 0u64)); // windows with a refusal, writes refused
    let inject = |o: &Observed| {
        for (before, length) in &plan {
            if !sleep_while_running(o.registry, *before) {
                break;
            }
            let refused = f.enospc_injected.load(Relaxed);
            f.set_no_space(true);
            sleep_while_running(o.registry, *length);
            f.set_no_space(false);
            let n = f.enospc_injected.load(Relaxed) - refused;
            let mut c = counted.lock().unwrap();
            c.0 += u64::from(n > 0);
            c.1 += n;
            drop(c);
            // Space is back: the operator resumes the paused partitions.
            resume_paused(o.registry);
        }
        while sleep_while_running(o.registry, Duration::from_millis(100)) {
            resume_paused(o.registry);
        }
    };
    let r = run(&text, "amsvm faults (enospc)", None, &inject);
    f.set_no_space(false);
    match r {
        Err(e) => row.problems.push(e),
        Ok(end) => {
            let (hit, refused) = *counted.lock().unwrap();
            row.injected = hit;
            if row.add_run(&end, None) {
                row.survived = hit;
            }
            if row.paused > row.resumed {
                row.problems.push(format!("{} pauses, {} resumes", row.paused, row.resumed));
            }
            row.reported = add_counts("", &[("writes refused", refused), ("pauses", row.paused)]);
            progress(&format!("enospc ({backend}): {hit} of {windows} windows refused {refused} writes; {} pauses, {} resumes", row.paused, row.resumed));
        }
    }
    row
}

/// A partition destroyed while one of its page-ins is held in flight (between claiming
/// the page and reading it from the paging device), once per run.
fn destroy(dir: &Path, runs: u32, rng: &mut Rng, progress: &dyn Fn(&str)) -> Row {
    let mut row = Row::new("partition destroyed in its page-in", "vm");
    let victim = format!("p{}", PARTITIONS - 1);
    let f = crate::faults::get();
    for _ in 0..runs {
        let text = scenario(dir, "vm", 5_000, |_| "balloon = \"ignore\"".into());
        let wait = rng.ms(500, 1_500);
        let held = Mutex::new(None::<Result<u64, String>>);
        let inject = |o: &Observed| {
            if !sleep_while_running(o.registry, wait) {
                return;
            }
            f.hold_page_ins(Some(&victim));
            let t0 = Instant::now();
            while f.held_now.load(Relaxed) == 0 && t0.elapsed() < Duration::from_secs(3) {
                std::thread::sleep(Duration::from_millis(1));
            }
            let in_flight = f.held_now.load(Relaxed);
            let r = if in_flight == 0 {
                Err("no page-in of the victim within 3 s".to_string())
            } else {
                o.registry.destroy(&victim).map(|()| in_flight)
            };
            // Let the teardown start with the page-in still held, then let it go on.
            std::thread::sleep(Duration::from_millis(50));
            f.hold_page_ins(None);
            *held.lock().unwrap() = Some(r);
        };
        let r = run(&text, "amsvm faults (destroy)", None, &inject);
        f.hold_page_ins(None);
        match (r, held.into_inner().unwrap()) {
            (Err(e), _) => row.problems.push(e),
            (Ok(_), None) => row.problems.push("the run ended before the destroy".into()),
            (Ok(_), Some(Err(e))) => row.problems.push(e),
            (Ok(end), Some(Ok(in_flight))) => {
                row.injected += 1;
                let mut ok = row.add_run(&end, Some(&victim));
                let v = end.reports.iter().find(|r| r.name == victim).expect("the victim's report");
                let (pmem, slots) = (v.metrics.pmem.load(Relaxed), v.metrics.pager_bytes.load(Relaxed));
                if pmem != 0 || slots != 0 {
                    ok = false;
                    row.problems.push(format!("run {}: the destroyed partition still holds {pmem} frames and {slots} paging bytes", row.runs));
                }
                if ok {
                    row.survived += 1;
                }
                row.reported = add_counts(&row.reported, &[("page-ins in flight", in_flight)]);
                progress(&format!("destroy: run {} — {victim} destroyed with {in_flight} page-in(s) in flight: {}", row.runs, v.outcome));
            }
        }
    }
    row
}

/// The balloon driver of p0 goes silent; the operator then asks it to loan everything
/// it can (weight 0, aggressive). The policy must notice and page it instead.
fn balloon(dir: &Path, progress: &dyn Fn(&str)) -> Row {
    let mut row = Row::new("balloon driver silent", "vm");
    const SILENT_MS: u32 = 1_500;
    let text = scenario(dir, "vm", 11_000, |i| {
        let silent = if i == 0 { format!("balloon_silent_ms = {SILENT_MS}\n") } else { String::new() };
        format!("balloon = \"cooperate\"\nidle_mib = 8\n{silent}")
    });
    let inject = |o: &Observed| {
        if sleep_while_running(o.registry, Duration::from_millis(SILENT_MS as u64 + 300)) {
            let _ = o.registry.set("p0", Some(0), Some(crate::config::LoanPolicy::Aggressive));
        }
    };
    match run(&text, "amsvm faults (balloon)", None, &inject) {
        Err(e) => row.problems.push(e),
        Ok(end) => {
            let log = std::fs::read_to_string(dir.join("logs/p0.log")).unwrap_or_default();
            let went_silent = log.contains("balloon: the driver goes silent");
            let p0 = &end.reports[0].metrics;
            let noticed = p0.loan_unresponsive.load(Relaxed);
            row.injected = u64::from(went_silent);
            if !went_silent {
                row.problems.push("p0's balloon driver never went silent (see logs/p0.log)".into());
            }
            let ok = row.add_run(&end, None);
            if noticed == 0 {
                row.problems.push("the loan policy never noticed the silent balloon".into());
            }
            if ok && went_silent && noticed > 0 {
                row.survived = 1;
            }
            row.reported = add_counts("", &[("times noticed unresponsive", noticed), ("page-outs of p0", p0.page_outs.load(Relaxed))]);
            progress(&format!("balloon: p0 went silent: {went_silent}; noticed {noticed} times"));
        }
    }
    row
}

/// Malformed requests the flood sends, each on its own connection: (what, bytes).
fn malformed() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("not JSON", b"hello amsvm\n".to_vec()),
        ("a JSON array", b"[1,2,3]\n".to_vec()),
        ("no cmd", b"{\"partition\":\"p0\"}\n".to_vec()),
        ("cmd not a string", b"{\"cmd\":7}\n".to_vec()),
        ("unknown cmd", b"{\"cmd\":\"format-disk\"}\n".to_vec()),
        ("loan without mib", b"{\"cmd\":\"loan\",\"partition\":\"p0\"}\n".to_vec()),
        ("weight 300", b"{\"cmd\":\"set\",\"partition\":\"p0\",\"weight\":300}\n".to_vec()),
        ("destroy without partition", b"{\"cmd\":\"destroy\"}\n".to_vec()),
        ("binary", (0u8..=255).filter(|&b| b != b'\n').chain(std::iter::once(b'\n')).collect()),
        ("a line over 4 KiB", [vec![b'x'; 5000], vec![b'\n']].concat()),
        ("invalid UTF-8", b"{\"cmd\":\"\xff\xfe\"}\n".to_vec()),
        ("half a line, then EOF", b"{\"cmd\":\"st".to_vec()),
    ]
}

/// Send one malformed request and read the answer: true if it was an error.
fn send_malformed(sock: &Path, bytes: &[u8]) -> bool {
    let Ok(mut s) = UnixStream::connect(sock) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    if s.write_all(bytes).is_err() {
        // A line over the limit may be cut off by the server's answer and close.
    }
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut line = String::new();
    let _ = BufReader::new(Read::by_ref(&mut s).take(1 << 20)).read_line(&mut line);
    serde_json::from_str::<serde_json::Value>(&line).is_ok_and(|v| v["ok"] == false && v["error"].is_string())
}

/// The control socket flooded from four threads while the scenario runs, then held by
/// idle connections beyond the server's limit; a valid `stat` must still be answered,
/// and the server must have counted every malformed request (as rejected, or refused
/// as busy).
fn flood(dir: &Path, rounds: u32, progress: &dyn Fn(&str)) -> Row {
    let mut row = Row::new("control socket flood", "local");
    let sock = dir.join("faults.sock");
    let text = scenario(dir, "local", 6_000, |_| "balloon = \"ignore\"".into());
    // Sent, answered with an error, counted by the server, a valid stat answered after.
    let counts = Mutex::new((0u64, 0u64, 0u64, false));
    const IDLE: u64 = 20;
    let inject = |_: &Observed| {
        let cases = malformed();
        let counted = || crate::control::request_stat(&sock).map_or(0, |s| s.control_rejected + s.control_busy);
        let before = counted();
        let (sent, errors) = std::thread::scope(|sc| {
            let threads: Vec<_> = (0..4)
                .map(|_| {
                    sc.spawn(|| {
                        let (mut sent, mut errors) = (0u64, 0u64);
                        for _ in 0..rounds {
                            for (_, bytes) in &cases {
                                sent += 1;
                                errors += u64::from(send_malformed(&sock, bytes));
                            }
                        }
                        (sent, errors)
                    })
                })
                .collect();
            threads.into_iter().map(|t| t.join().unwrap()).fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
        });
        // Connections that send nothing: those beyond the limit are refused "busy" at
        // once, the others are dropped with an error after the request timeout.
        let idle: Vec<_> = (0..IDLE).filter_map(|_| UnixStream::connect(&sock).ok()).collect();
        let mut idle_errors = 0;
        for s in idle {
            let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
            let mut line = String::new();
            let _ = BufReader::new(s).read_line(&mut line);
            idle_errors += u64::from(serde_json::from_str::<serde_json::Value>(&line).is_ok_and(|v| v["ok"] == false));
        }
        let after = crate::control::request_stat(&sock).ok();
        let stat_ok = after.is_some();
        let counted = after.map_or(0, |s| s.control_rejected + s.control_busy).saturating_sub(before);
        *counts.lock().unwrap() = (sent + IDLE, errors + idle_errors, counted, stat_ok);
    };
    match run(&text, "amsvm faults (flood)", Some(&sock), &inject) {
        Err(e) => row.problems.push(e),
        Ok(end) => {
            let (sent, errors, counted, stat_ok) = *counts.lock().unwrap();
            row.injected = sent;
            let ok = row.add_run(&end, None);
            if !stat_ok {
                row.problems.push("a valid stat was not answered after the flood".into());
            }
            if errors < sent {
                row.problems.push(format!("{} of {sent} malformed requests got no error answer", sent - errors));
            }
            if counted != sent {
                row.problems.push(format!("the server counted {counted} of {sent} malformed requests"));
            }
            if ok && stat_ok && counted == sent {
                row.survived = errors;
            }
            row.reported = add_counts("", &[("counted by the server", counted), ("error answers", errors)]);
            progress(&format!("flood: {sent} malformed requests and idle connections, {errors} error answers, {counted} counted"));
        }
    }
    row
}

fn print_table(rows: &[Row]) {
    out!(
        "{:<36} {:<7} {:>4} {:>8} {:>8} {:>14} {:>8} {:>6} {:>7}  reported",
        "fault", "backend", "runs", "injected", "survived", "pages verified", "failures", "paused", "resumed"
    );
    for r in rows {
        out!(
            "{:<36} {:<7} {:>4} {:>8} {:>8} {:>14} {:>8} {:>6} {:>7}  {}",
            r.fault, r.backend, r.runs, r.injected, r.survived, r.verified, r.failures, r.paused, r.resumed, r.reported
        );
    }
}

/// Removes the campaign's own directory at the end.
struct TempDir(Option<PathBuf>);

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Some(d) = &self.0 {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

pub fn faults(a: FaultArgs) -> i32 {
    let kills = a.kills.unwrap_or(if a.short { 6 } else { 100 });
    let seed = a.seed.unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64));
    let (dir, _cleanup) = match &a.dir {
        Some(d) => (d.clone(), TempDir(None)),
        None => {
            let d = std::env::temp_dir().join(format!("amsvm-faults-{}", std::process::id()));
            (d.clone(), TempDir(Some(d)))
        }
    };
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("amsvm: {}: {e}", dir.display());
        return EXIT_BAD_INPUT;
    }
    let want = |f: &str| a.only.is_empty() || a.only.iter().any(|o| o == f);
    let mut rng = Rng(seed);
    let t0 = Instant::now();
    let progress = |m: &str| eprintln!("[{:>6.1} s] {m}", t0.elapsed().as_secs_f64());
    eprintln!(
        "amsvm faults: {} campaign, seed {seed}; scenario: {PARTITIONS} partitions of {LOGICAL_MIB} MiB in a {POOL_MIB} MiB pool, \
         hot spots moving over {WS_MIB} MiB each",
        if a.short { "short" } else { "full" }
    );
    let mut rows = Vec::new();
    if want("ps-kill") {
        rows.push(ps_kill(&dir, kills, &mut rng, &progress));
    }
    if want("eio") {
        rows.push(eio(&dir, "vm", &progress));
        if !a.short {
            rows.push(eio(&dir, "local", &progress));
        }
    }
    if want("enospc") {
        let windows = if a.short { 2 } else { 4 };
        rows.push(enospc(&dir, "vm", windows, &mut rng, &progress));
        if !a.short {
            rows.push(enospc(&dir, "local", windows, &mut rng, &progress));
        }
    }
    if want("destroy") {
        rows.push(destroy(&dir, if a.short { 1 } else { 3 }, &mut rng, &progress));
    }
    if want("balloon") {
        rows.push(balloon(&dir, &progress));
    }
    if want("flood") {
        rows.push(flood(&dir, if a.short { 2 } else { 10 }, &progress));
    }
    out!();
    print_table(&rows);
    let bad: Vec<_> = rows.iter().filter(|r| !r.all_survived()).collect();
    out!();
    if bad.is_empty() {
        out!("every injected fault survived, 0 verification failures ({:.0} s, seed {seed})", t0.elapsed().as_secs_f64());
        0
    } else {
        for r in bad {
            out!("NOT SURVIVED: {} ({}): {} of {} survived", r.fault, r.backend, r.survived, r.injected);
            for p in &r.problems {
                out!("  {p}");
            }
        }
        EXIT_GUEST_FAILED
    }
}
