//! `amsvm bench peers`: one overcommit scenario run the ways a KVM user can run it, in
//! one run, with the very same guest (the workload unikernel, booted by amsvm natively
//! and by QEMU through its PVH entry) and the same settings:
//!
//! - amsvm with its pool under `policy = "protect"` (working-set protection), paging
//!   through the paging-server VM and through the in-process store; and under
//!   `policy = "share"` (every partition its share at every moment) with the store;
//! - N QEMU microvm processes in one memory cgroup (v1) with a swap file on the same
//!   disk: what a KVM user does today. The cgroup's limit is the host memory amsvm used
//!   in the same run (its peak RSS: the pool plus the VMM and the paging-server VM), as
//!   it holds QEMU's own processes too; where the OOM killer ends a VM, the run is made
//!   again with more memory (a few times at most) and the limit used is printed;
//! - the same, each with a virtio-balloon whose target a simple policy sets over QMP
//!   (free memory the guest reports is taken back, given again when it runs short):
//!   the best a user gets from QEMU without amsvm.
//!
//! Every configuration's workloads verify every page they read; any failure fails the
//! benchmark.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};

use clap::Args;

use super::bench_pool::{chrono_like_date, vmstat, RemoveDir, Swap};
use super::run::{run_specs_observed, success, Control, Observed};
use super::{EXIT_BAD_INPUT, EXIT_GUEST_FAILED};
use crate::config::{Config, PagingBackend, ReclaimPolicy};

#[derive(Args, Debug)]
pub struct PeersArgs {
    /// Partitions (amsvm) or VMs (QEMU).
    #[arg(long, default_value_t = 4)]
    partitions: u32,
    /// RAM of each, MiB.
    #[arg(long, default_value_t = 256)]
    logical_mib: u64,
    /// Working set of each, MiB (a hot spot moves over it).
    #[arg(long, default_value_t = 150)]
    ws_mib: u64,
    /// Idle memory of each, MiB: stamped at start, then left alone (what a balloon can
    /// take back).
    #[arg(long, default_value_t = 50)]
    idle_mib: u64,
    /// Seconds each workload runs.
    #[arg(long, default_value_t = 12)]
    seconds: u64,
    /// Overcommit ratios (memory of all partitions / pool).
    #[arg(long, value_delimiter = ',', default_value = "1,1.5,2,3")]
    ratios: Vec<f64>,
    /// Where paging devices, the swap file and the QEMU logs go (the same disk).
    #[arg(long, default_value = "target/amsvm-peers")]
    dir: PathBuf,
    /// The QEMU binary.
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: String,
    /// The host's transparent huge pages for this run (`always`, `madvise` or `never`;
    /// put back afterwards). QEMU asks for huge pages for its guest RAM (`madvise`),
    /// which makes each access cheaper; amsvm's pool pages at 4 KiB. Default: as set.
    #[arg(long, value_parser = ["always", "madvise", "never"])]
    host_thp: Option<String>,
}

const MIB: u64 = 1 << 20;
/// An access that took longer than this waited (on a fault, a swap-in): a hit costs
/// about 1 us, the fastest fault tens.
const STALL_NS: f64 = 10_000.0;

/// The workload's settings, as `[partition.workload]` keys (amsvm's TOML) and as
/// `amsvm.<key>=<value>` words (the guest's command line under QEMU): one list, so
/// both run the very same accesses.
fn settings(a: &PeersArgs, i: u32) -> Vec<(&'static str, String)> {
    let ws_pages = a.ws_mib * 256;
    vec![
        ("working_set_mib", a.ws_mib.to_string()),
        ("idle_mib", a.idle_mib.to_string()),
        ("pattern", "hotspot".into()),
        ("hot_pct", "15".into()),
        ("hot_access_pct", "85".into()),
        ("phase_accesses", (ws_pages / 2).to_string()),
        ("write_pct", "30".into()),
        ("duration_ms", (a.seconds * 1000).to_string()),
        ("seed", (i + 1).to_string()),
        ("balloon", "cooperate".into()),
        // Time every access after the first pass over the working set.
        ("latency_from", ws_pages.to_string()),
    ]
}

/// How many times a QEMU configuration is run again with more memory when the OOM
/// killer ended one of its VMs.
const QEMU_OOM_RETRIES: u64 = 5;

/// What one configuration did, all partitions together.
#[derive(Debug, Default, Clone)]
struct Measured {
    /// Pages verified per second in the timed loop.
    vpg: f64,
    /// Per-access stalls (accesses over [`STALL_NS`]): p50, p99 in microseconds, count.
    stall_p50: f64,
    stall_p99: f64,
    stalls: u64,
    /// Accesses the workloads timed (stalled or not).
    timed: u64,
    /// Pages each partition (VM) verified in the timed loop; OOM-killed VMs left out.
    per: Vec<u64>,
    /// Pages read from and written to paging devices (amsvm) or swap (QEMU).
    read: u64,
    written: u64,
    /// Peak host memory of the whole configuration, MiB.
    peak_mib: f64,
    /// amsvm: the pool's peak (guest memory the pool granted), MiB.
    pool_peak_mib: Option<f64>,
    /// QEMU: VMs the memory cgroup's OOM killer ended (the others then had their
    /// memory: such a run is not comparable).
    oom: u32,
}

/// A latency histogram: (bucket floor in ns, count).
type Histogram = Vec<(f64, u64)>;

/// p50 and p99 of the stalls (µs), how many stalls, and how many accesses were timed.
fn stall_quantiles(h: &Histogram) -> (f64, f64, u64, u64) {
    let timed = h.iter().map(|x| x.1).sum();
    let mut h: Vec<(f64, u64)> = h.iter().copied().filter(|&(ns, n)| ns >= STALL_NS && n > 0).collect();
    h.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total: u64 = h.iter().map(|x| x.1).sum();
    let q = |q: f64| {
        let want = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        h.iter().find(|x| {
            seen += x.1;
            seen >= want
        })
        .map_or(f64::NAN, |x| x.0 / 1000.0)
    };
    (q(0.5), q(0.99), total, timed)
}

/// amsvm: the scenario through `amsvm run`'s own code, in this process.
fn amsvm_run(a: &PeersArgs, pool_mib: u64, backend: PagingBackend, policy: ReclaimPolicy) -> Result<Measured, String> {
    let mut text = format!(
        "[pool]\nsize_mib = {pool_mib}\npaging_dir = {:?}\npolicy = \"{}\"\n[paging]\nbackend = \"{}\"\n",
        a.dir.join("paging").display().to_string(),
        if policy == ReclaimPolicy::Protect { "protect" } else { "share" },
        if backend == PagingBackend::Vm { "vm" } else { "local" }
    );
    for i in 0..a.partitions {
        text += &format!("[[partition]]\nname = \"p{i}\"\nlogical_mib = {}\nmin_mib = 16\nimage = \"workload\"\n[partition.workload]\n", a.logical_mib);
        for (k, v) in settings(a, i) {
            let quoted = if v.parse::<u64>().is_ok() { v } else { format!("{v:?}") };
            text += &format!("{k} = {quoted}\n");
        }
    }
    let setup = Config::from_text(&text, Path::new("amsvm bench peers"), Path::new(".")).map_err(|e| e.to_string())?;
    // Peak RSS of this process from here on (writing 5 to clear_refs resets VmHWM).
    std::fs::write("/proc/self/clear_refs", "5").map_err(|e| format!("resetting the peak RSS: {e}"))?;
    // The pool's peak, read once every partition has ended.
    let pool_peak = std::sync::Mutex::new(0u64);
    let observe = |o: Observed| {
        while o.registry.snapshot().partitions.iter().any(|p| p.state != crate::control::PartitionState::Ended) {
            std::thread::sleep(Duration::from_millis(50));
        }
        *pool_peak.lock().unwrap() = o.registry.snapshot().pool.map_or(0, |p| p.peak_in_use_pages);
    };
    let reports = run_specs_observed(&setup.specs, setup.pool.as_ref(), Control::Off, None, Instant::now(), Some(&observe))
        .map_err(|e| e.to_string())?;
    if let Some(bad) = reports.iter().find(|r| !success(r)) {
        return Err(format!("amsvm: partition {} did not end well: {}", bad.name, bad.outcome));
    }
    let peak_kib = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("VmHWM:").and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())))
        .unwrap_or(0);
    use std::sync::atomic::Ordering::Relaxed as R;
    let final_pass = (a.ws_mib + a.idle_mib) * 256;
    let per: Vec<u64> = reports.iter().map(|r| r.metrics.pages_verified.load(R).saturating_sub(final_pass)).collect();
    let verified: u64 = per.iter().sum();
    let mut hist = Histogram::new();
    for r in &reports {
        let khz = r.metrics.tsc_khz.load(R);
        let lat = r.metrics.latency.lock().unwrap_or_else(|e| e.into_inner());
        for (b, &n) in lat.iter().enumerate() {
            if khz > 0 && n > 0 {
                hist.push((amsvm_abi::latency_bucket_floor(b) as f64 * 1e6 / khz as f64, n));
            }
        }
    }
    let (p50, p99, stalls, timed) = stall_quantiles(&hist);
    let pool_peak = *pool_peak.lock().unwrap();
    Ok(Measured {
        vpg: verified as f64 / a.seconds as f64,
        stall_p50: p50,
        stall_p99: p99,
        stalls,
        timed,
        per,
        read: reports.iter().map(|r| r.metrics.hpi.load(R) + r.metrics.cluster_reads.load(R)).sum(),
        written: reports.iter().map(|r| r.metrics.page_out_writes.load(R)).sum(),
        peak_mib: peak_kib as f64 / 1024.0,
        pool_peak_mib: Some(pool_peak as f64 / 256.0),
        oom: 0,
    })
}

/// A QMP connection (QEMU's JSON control protocol).
struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Qmp {
    fn connect(path: &Path, deadline: Instant) -> Result<Qmp, String> {
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => return Err(format!("QMP {}: {e}", path.display())),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
        let mut q = Qmp { r: BufReader::new(s.try_clone().map_err(|e| e.to_string())?), w: s };
        q.line()?; // the greeting
        q.cmd(r#"{"execute":"qmp_capabilities"}"#)?;
        Ok(q)
    }

    fn line(&mut self) -> Result<serde_json::Value, String> {
        let mut l = String::new();
        if self.r.read_line(&mut l).map_err(|e| format!("QMP: {e}"))? == 0 {
            return Err("QMP: closed".into());
        }
        serde_json::from_str(&l).map_err(|e| format!("QMP: {e}: {l}"))
    }

    /// Send a command; its "return" value (events in between are skipped).
    fn cmd(&mut self, json: &str) -> Result<serde_json::Value, String> {
        writeln!(self.w, "{json}").map_err(|e| format!("QMP: {e}"))?;
        loop {
            let v = self.line()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(format!("QMP {json}: {e}"));
            }
        }
    }
}

/// The balloon policy of the QEMU + balloon configuration, every 250 ms for each VM: the
/// guest's free memory above 4 MiB is taken back (inflate); a guest with less than
/// 2 MiB free gets 16 MiB back (deflate). A user's script would do about this.
fn balloon_policy(qmps: &mut [Qmp], logical: u64, stop: &AtomicBool) {
    const PATH: &str = "/machine/peripheral/balloon0";
    for q in qmps.iter_mut() {
        let _ = q.cmd(&format!(r#"{{"execute":"qom-set","arguments":{{"path":"{PATH}","property":"guest-stats-polling-interval","value":1}}}}"#));
    }
    while !stop.load(Relaxed) {
        std::thread::sleep(Duration::from_millis(250));
        for q in qmps.iter_mut() {
            let stats = q.cmd(&format!(r#"{{"execute":"qom-get","arguments":{{"path":"{PATH}","property":"guest-stats"}}}}"#));
            let actual = q.cmd(r#"{"execute":"query-balloon"}"#).ok().and_then(|v| v["actual"].as_u64());
            let (Ok(stats), Some(actual)) = (stats, actual) else { continue };
            let Some(free) = stats["stats"]["stat-free-memory"].as_u64() else { continue };
            let target = if free > 4 * MIB {
                // Never below 16 MiB: the guest's own code and tables live there.
                actual.saturating_sub(free - 4 * MIB).max(16 * MIB)
            } else if free < 2 * MIB {
                (actual + 16 * MIB).min(logical)
            } else {
                continue;
            };
            let _ = q.cmd(&format!(r#"{{"execute":"balloon","arguments":{{"value":{target}}}}}"#));
        }
    }
}

/// The same workloads as N QEMU microvm processes in one memory cgroup of `pool_mib`
/// (with the swap file on), with virtio-balloon and the policy above if `balloon`.
fn qemu_run(a: &PeersArgs, elf: &Path, limit_mib: u64, balloon: bool) -> Result<Measured, String> {
    let cg = PathBuf::from(format!("/sys/fs/cgroup/memory/amsvm-peers-{}", std::process::id()));
    std::fs::create_dir_all(&cg).map_err(|e| format!("{}: {e} (needs the cgroup v1 memory controller)", cg.display()))?;
    let _rm = RemoveDir(cg.clone());
    std::fs::write(cg.join("memory.limit_in_bytes"), (limit_mib * MIB).to_string()).map_err(|e| format!("memory.limit_in_bytes: {e}"))?;
    let (sin, sout) = (vmstat("pswpin "), vmstat("pswpout "));
    let mut children: Vec<(Child, PathBuf)> = Vec::new();
    let kill_all = |children: &mut Vec<(Child, PathBuf)>| {
        for (c, _) in children.iter_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    };
    for i in 0..a.partitions {
        let log = a.dir.join(format!("qemu{i}.log"));
        let qmp = a.dir.join(format!("qemu{i}.qmp"));
        let _ = std::fs::remove_file(&qmp);
        let cmdline: Vec<String> = std::iter::once(format!("amsvm.id={i}"))
            .chain(settings(a, i).into_iter().map(|(k, v)| format!("amsvm.{k}={v}")))
            .collect();
        let mut args: Vec<String> = [
            // acpi=off: QEMU then lists its virtio-mmio devices on the kernel command
            // line (docs/workload.md, Other VMMs); force-legacy=false: virtio 1.0 devices.
            "-M", "microvm,acpi=off", "-global", "virtio-mmio.force-legacy=false", "-no-reboot", "-enable-kvm", "-cpu", "EPYC",
            "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
            "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(["-m".into(), format!("{}M", a.logical_mib), "-kernel".into(), elf.display().to_string(), "-append".into(), cmdline.join(" ")]);
        if balloon {
            args.extend(["-device".into(), "virtio-balloon-device,id=balloon0".into(), "-qmp".into(), format!("unix:{},server=on,wait=off", qmp.display())]);
        }
        let out = std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let child = Command::new("sh")
            .arg("-c")
            .arg("echo $$ > \"$1/cgroup.procs\" && shift && exec \"$@\"")
            .arg("sh")
            .arg(&cg)
            .arg(&a.qemu)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(out.try_clone().map_err(|e| e.to_string())?)
            .stderr(out)
            .spawn();
        match child {
            Ok(c) => children.push((c, log)),
            Err(e) => {
                kill_all(&mut children);
                return Err(format!("cannot start {}: {e}", a.qemu));
            }
        }
    }
    let stop = AtomicBool::new(false);
    let deadline = Instant::now() + Duration::from_secs(a.seconds * 4 + 120);
    let statuses = std::thread::scope(|sc| {
        if balloon {
            let qmp_paths: Vec<PathBuf> = (0..a.partitions).map(|i| a.dir.join(format!("qemu{i}.qmp"))).collect();
            let stop = &stop;
            let logical = a.logical_mib * MIB;
            sc.spawn(move || {
                let qmps: Result<Vec<Qmp>, String> = qmp_paths.iter().map(|p| Qmp::connect(p, Instant::now() + Duration::from_secs(10))).collect();
                match qmps {
                    Ok(mut q) => balloon_policy(&mut q, logical, stop),
                    Err(e) => eprintln!("amsvm: bench peers: balloon policy: {e}"),
                }
            });
        }
        let mut statuses = Vec::new();
        for (c, _) in children.iter_mut() {
            let st = loop {
                match c.try_wait() {
                    Ok(Some(s)) => break Some(s),
                    Ok(None) if Instant::now() > deadline => break None,
                    Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                    Err(_) => break None,
                }
            };
            statuses.push(st);
        }
        stop.store(true, Relaxed);
        statuses
    });
    if statuses.iter().any(Option::is_none) {
        kill_all(&mut children);
        return Err("a QEMU VM did not finish in time".into());
    }
    let (sin, sout) = (vmstat("pswpin ").saturating_sub(sin), vmstat("pswpout ").saturating_sub(sout));
    let peak = std::fs::read_to_string(cg.join("memory.max_usage_in_bytes")).ok().and_then(|s| s.trim().parse::<u64>().ok()).unwrap_or(0);
    let mut m = Measured { read: sin, written: sout, peak_mib: peak as f64 / MIB as f64, ..Measured::default() };
    let mut verified = 0;
    let mut hist = Histogram::new();
    let final_pass = (a.ws_mib + a.idle_mib) * 256;
    for ((_, log), st) in children.iter().zip(&statuses) {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let Some(exit) = text.lines().find(|l| l.starts_with("exit: ")) else {
            use std::os::unix::process::ExitStatusExt;
            if st.and_then(|s| s.signal()) == Some(libc::SIGKILL) {
                m.oom += 1;
                m.per.push(0);
                continue;
            }
            return Err(format!("{}: no exit line ({:?}); the VM's output:\n{}", log.display(), st, tail(&text)));
        };
        let field = |k: &str| exit.split_whitespace().find_map(|w| w.strip_prefix(k)).and_then(|v| v.parse::<u64>().ok());
        if !exit.starts_with("exit: status=0 ") || field("failures=") != Some(0) {
            return Err(format!("{}: the workload did not end well: {exit}", log.display()));
        }
        let v = field("verified=").unwrap_or(0).saturating_sub(final_pass);
        verified += v;
        m.per.push(v);
        if let Some(l) = text.lines().find(|l| l.starts_with("latency: ")) {
            hist.extend(parse_latency(l).ok_or_else(|| format!("{}: bad latency line: {l}", log.display()))?);
        }
    }
    m.vpg = verified as f64 / a.seconds as f64;
    (m.stall_p50, m.stall_p99, m.stalls, m.timed) = stall_quantiles(&hist);
    Ok(m)
}

/// `latency: tsc_khz=K buckets=FLOOR:COUNT,...` (floors in TSC cycles) as (ns, count).
fn parse_latency(l: &str) -> Option<Histogram> {
    let khz: f64 = l.split_whitespace().find_map(|w| w.strip_prefix("tsc_khz="))?.parse().ok()?;
    let buckets = l.split_whitespace().find_map(|w| w.strip_prefix("buckets="))?;
    if khz <= 0.0 {
        return None;
    }
    buckets
        .split(',')
        .filter(|b| !b.is_empty())
        .map(|b| {
            let (floor, n) = b.split_once(':')?;
            Some((floor.parse::<f64>().ok()? * 1e6 / khz, n.parse().ok()?))
        })
        .collect()
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

pub fn bench_peers(a: PeersArgs) -> i32 {
    if a.partitions == 0 || a.ws_mib == 0 || a.ws_mib + a.idle_mib + 16 > a.logical_mib || a.ratios.iter().any(|r| *r < 1.0) || a.seconds == 0 {
        eprintln!("amsvm: bench peers: need partitions >= 1, seconds >= 1, 0 < ws_mib and ws_mib + idle_mib + 16 <= logical_mib, ratios >= 1");
        return EXIT_BAD_INPUT;
    }
    if let Err(e) = std::fs::create_dir_all(&a.dir) {
        eprintln!("amsvm: {}: {e}", a.dir.display());
        return EXIT_BAD_INPUT;
    }
    match Command::new(&a.qemu).arg("--version").output() {
        Ok(o) if o.status.success() => {}
        _ => {
            eprintln!("amsvm: bench peers: cannot run {} (install qemu-system-x86, or give --qemu PATH)", a.qemu);
            return EXIT_BAD_INPUT;
        }
    }
    match bench(&a) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("amsvm: bench peers: {e}");
            EXIT_GUEST_FAILED
        }
    }
}

/// `/sys/kernel/mm/transparent_hugepage/enabled`.
const THP_ENABLED: &str = "/sys/kernel/mm/transparent_hugepage/enabled";

/// The host's THP mode now: the bracketed word of `always [madvise] never`.
fn host_thp() -> Result<String, String> {
    let text = std::fs::read_to_string(THP_ENABLED).map_err(|e| format!("{THP_ENABLED}: {e}"))?;
    thp_selected(&text).map(str::to_string).ok_or_else(|| format!("{THP_ENABLED}: cannot read {:?}", text.trim()))
}

fn thp_selected(text: &str) -> Option<&str> {
    text.split_whitespace().find_map(|w| w.strip_prefix('[').and_then(|w| w.strip_suffix(']')))
}

/// A THP mode set for the run; the one before is put back on drop.
struct ThpMode(Option<String>);

impl ThpMode {
    fn set(mode: Option<&str>) -> Result<ThpMode, String> {
        let Some(mode) = mode else { return Ok(ThpMode(None)) };
        let before = host_thp()?;
        std::fs::write(THP_ENABLED, mode).map_err(|e| format!("{THP_ENABLED}: setting {mode}: {e} (needs root)"))?;
        Ok(ThpMode(Some(before)))
    }
}

impl Drop for ThpMode {
    fn drop(&mut self) {
        if let Some(before) = &self.0 {
            if let Err(e) = std::fs::write(THP_ENABLED, before) {
                eprintln!("amsvm: bench peers: {THP_ENABLED}: putting back {before}: {e}");
            }
        }
    }
}

/// Every configuration starts from the same host memory: the page cache dropped and
/// free memory compacted. Both sides ask for huge pages (`MADV_HUGEPAGE`), and with the
/// host's THP defrag mode `madvise` a huge page that free memory cannot give at once is
/// made by direct compaction on the faulting thread: without this, whichever
/// configuration ran first after another's memory was freed paid for it (measured: a
/// first `amsvm run` at 1x 7 % slower than the same run repeated; in the bench, the
/// paging-VM row at 1x, which runs first, 0.88 of QEMU against the local store's 0.97,
/// and equal to it once the host was settled).
fn settle_host() -> Result<(), String> {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    for (file, value) in [("/proc/sys/vm/drop_caches", "3"), ("/proc/sys/vm/compact_memory", "1")] {
        std::fs::write(file, value).map_err(|e| format!("{file}: {e} (bench peers runs as root)"))?;
    }
    Ok(())
}

fn bench(a: &PeersArgs) -> Result<(), String> {
    let _thp = ThpMode::set(a.host_thp.as_deref())?;
    let thp = host_thp()?;
    let elf = a.dir.join("workload.elf");
    std::fs::write(&elf, crate::images::workload_elf()).map_err(|e| format!("{}: {e}", elf.display()))?;
    let total = a.partitions as u64 * a.logical_mib;
    let swap = Swap::on(&a.dir, total + 256)?;
    let mut rows = Vec::new();
    for &ratio in &a.ratios {
        let pool_mib = (total as f64 / ratio).round() as u64;
        let run = |name: &str, f: &dyn Fn() -> Result<Measured, String>| -> Result<Measured, String> {
            eprintln!("{ratio}x ({pool_mib} MiB): {name} ...");
            settle_host()?;
            f().map_err(|e| format!("{ratio}x, {name}: {e}"))
        };
        let vm = run("amsvm, paging-server VM", &|| amsvm_run(a, pool_mib, PagingBackend::Vm, ReclaimPolicy::Protect))?;
        let local = run("amsvm, local store", &|| amsvm_run(a, pool_mib, PagingBackend::Local, ReclaimPolicy::Protect))?;
        let share = run("amsvm, local store, share", &|| amsvm_run(a, pool_mib, PagingBackend::Local, ReclaimPolicy::Share))?;
        // QEMU gets the same host memory amsvm used: the pool plus amsvm's own overhead
        // (the VMM and the paging-server VM), as the cgroup holds QEMU's processes too.
        let limit_mib = [&vm, &local, &share].iter().map(|m| m.peak_mib.ceil() as u64).fold(pool_mib, u64::max);
        // A run in which the memory cgroup's OOM killer ended a VM is no baseline (the
        // others ran with its memory): run it again with more memory, a few times at
        // most. What QEMU got is printed; more than amsvm had only favours QEMU.
        let step = (pool_mib / 10).max(16);
        let qemu = |name: &str, balloon: bool| -> Result<(Measured, u64), String> {
            let mut limit = limit_mib;
            loop {
                let m = run(&format!("{name}, cgroup limit {limit} MiB"), &|| qemu_run(a, &elf, limit, balloon))?;
                if m.oom == 0 || limit >= limit_mib + QEMU_OOM_RETRIES * step {
                    return Ok((m, limit));
                }
                eprintln!("  ({} of {} VMs OOM-killed: again with {} MiB)", m.oom, a.partitions, limit + step);
                limit += step;
            }
        };
        let (swap_run, swap_limit) = qemu("QEMU + swap", false)?;
        let (balloon, balloon_limit) = qemu("QEMU + swap + balloon", true)?;
        rows.push((
            ratio,
            pool_mib,
            [limit_mib, swap_limit, balloon_limit],
            [
                ("amsvm (paging VM)", vm),
                ("amsvm (local store)", local),
                ("amsvm (local, share)", share),
                ("QEMU + swap", swap_run),
                ("QEMU + swap + balloon", balloon),
            ],
        ));
    }
    drop(swap);
    out!();
    out!("amsvm bench peers — {}", chrono_like_date());
    out!(
        "{} partitions x {} MiB, working set {} MiB (hot spot 15% / 85% of accesses, moving) + {} MiB idle each, 30% writes, {} s; host THP {thp}; each configuration after drop_caches and compact_memory",
        a.partitions, a.logical_mib, a.ws_mib, a.idle_mib, a.seconds
    );
    out!(
        "{:>6} {:>8}  {:<22} {:>10} {:>8} {:>8} {:>9} {:>9} {:>10} {:>10} {:>10} {:>9}",
        "ratio", "pool MiB", "configuration", "vpg/s", "min/max", "stall/1k", "stall p50", "stall p99", "pages in", "pages out", "peak MiB", "vs QEMU"
    );
    for (ratio, pool_mib, _, runs) in &rows {
        let (sw, bal) = (&runs[3].1, &runs[4].1);
        for (name, m) in runs {
            // A QEMU run in which a VM was OOM-killed is no baseline: the others ran
            // with its memory.
            let ratio_to = |q: &Measured| if q.oom > 0 { "n/a".to_string() } else { format!("{:.2}", m.vpg / q.vpg) };
            let vs = if name.starts_with("amsvm") { format!("{}/{}", ratio_to(sw), ratio_to(bal)) } else { String::new() };
            let (lo, hi) = (m.per.iter().min().copied().unwrap_or(0), m.per.iter().max().copied().unwrap_or(0));
            out!(
                "{:>5.1}x {:>8}  {:<22} {:>10.0} {:>8.2} {:>8.1} {:>9.1} {:>9.1} {:>10} {:>10} {:>10.0} {:>9}{}",
                ratio,
                pool_mib,
                name,
                m.vpg,
                lo as f64 / hi.max(1) as f64,
                m.stalls as f64 * 1000.0 / m.timed.max(1) as f64,
                m.stall_p50,
                m.stall_p99,
                m.read,
                m.written,
                m.peak_mib,
                vs,
                if m.oom > 0 { format!("  ({} of {} VMs OOM-killed)", m.oom, a.partitions) } else { String::new() }
            );
        }
    }
    out!("vpg/s: pages verified per second, all partitions together; min/max: the slowest partition's over the fastest's;");
    out!("stall: guest-timed accesses over {} us, in us; stall/1k: of every 1000 timed accesses, how many stalled;", STALL_NS / 1000.0);
    out!("pages in/out: read from / written to the paging devices (amsvm) or swap (QEMU, /proc/vmstat);");
    out!("peak: amsvm's peak RSS (VmHWM, the VMM and the paging-server VM included); QEMU: the cgroup's max_usage_in_bytes;");
    out!("vs QEMU: amsvm's vpg/s over QEMU + swap's / over QEMU + swap + balloon's (n/a: a VM of that run was OOM-killed).");
    out!("amsvm's pool: policy \"protect\" (working sets protected in a rotating order) unless marked \"share\".");
    for (ratio, _, [limit_mib, swap_limit, balloon_limit], runs) in &rows {
        let peaks: Vec<String> =
            runs[..3].iter().map(|(n, m)| format!("{:.0} MiB {}", m.pool_peak_mib.unwrap_or(f64::NAN), n.trim_start_matches("amsvm "))).collect();
        out!(
            "{ratio:.1}x: amsvm pool peak (guest memory granted) {}; amsvm's peak RSS {limit_mib} MiB; QEMU's cgroup limit {swap_limit} MiB (swap), {balloon_limit} MiB (balloon)",
            peaks.join(", ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::thp_selected;

    #[test]
    fn the_host_thp_mode_is_the_bracketed_word() {
        assert_eq!(thp_selected("always [madvise] never\n"), Some("madvise"));
        assert_eq!(thp_selected("[always] madvise never"), Some("always"));
        assert_eq!(thp_selected("always madvise [never]"), Some("never"));
        assert_eq!(thp_selected("always madvise never"), None);
    }
}
