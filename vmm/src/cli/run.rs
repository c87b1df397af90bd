//! `amsvm run CONFIG`: boot every partition, wait, print a per-partition summary.

use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use std::path::PathBuf;

use crate::config::{BootConfig, Config, PartitionSpec, PoolSpec};
use crate::control::{RegisteredPartition, Registry, Server};
use crate::metrics::PartitionMetrics;
use crate::partition::{self, Outcome, Partition, PartitionControl, PoolContext, Report, Shared};
use crate::pool::Pool;

use super::{EXIT_BAD_INPUT, EXIT_GUEST_FAILED};

/// Run already-validated partitions to the end. Errors while building (before any guest
/// runs) are returned; nothing is left running.
/// Where the control socket of a run goes.
#[derive(Debug, Clone)]
pub enum Control {
    /// No control socket.
    Off,
    /// `<runtime dir>/<pid>.sock`, found by `amsvm stat` without arguments.
    Default,
    At(PathBuf),
}

pub fn run_specs(specs: &[PartitionSpec], pool: Option<&PoolSpec>, control: Control, epoch: Instant) -> crate::Result<Vec<Report>> {
    run_specs_observed(specs, pool, control, None, epoch, None)
}

/// What an observer of running partitions sees: their counters, the host address
/// ranges of their guest RAM and the registry the control socket serves; `stop_all`
/// stops every partition.
pub struct Observed<'a> {
    pub metrics: &'a [Arc<PartitionMetrics>],
    pub guest_ranges: &'a [(u64, u64)],
    pub registry: &'a Registry,
    pub stop_all: &'a (dyn Fn() + Sync),
}

/// [`run_specs`], with a Prometheus listener on `metrics_addr` if given (see
/// [`crate::prometheus`]), and `observe` called once every partition is built and
/// started (the partitions run on while it runs; it may stop them).
pub fn run_specs_observed(
    specs: &[PartitionSpec],
    pool_spec: Option<&PoolSpec>,
    control: Control,
    metrics_addr: Option<&str>,
    epoch: Instant,
    observe: Option<&(dyn Fn(Observed) + Sync)>,
) -> crate::Result<Vec<Report>> {
    let kvm = kvm_ioctls::Kvm::new().map_err(crate::Error::KvmOpen)?;
    // Bound first: a bad address fails before any VM exists.
    let metrics_listener =
        metrics_addr.map(crate::prometheus::MetricsListener::bind).transpose().map_err(crate::Error::Other)?;
    let image = crate::images::workload_elf();
    let pool = match pool_spec {
        None => None,
        Some(ps) => {
            std::fs::create_dir_all(&ps.paging_dir)
                .map_err(|source| crate::Error::Io { path: ps.paging_dir.clone(), source })?;
            let pool = if ps.raw_uffd { Pool::new_raw() } else { Pool::new(ps.size_bytes) }
                .map_err(|e| crate::Error::Other(format!("pool: {e}")))?;
            pool.set_policy(ps.policy, ps.rotate);
            pool.set_huge_pages(ps.huge_pages);
            // The paging server boots before the partitions that page to it.
            let server = match ps.backend {
                crate::config::PagingBackend::Local => None,
                crate::config::PagingBackend::Vm => {
                    Some(crate::paging_server::PagingServer::start(&kvm, specs, &ps.paging_dir, epoch)?)
                }
            };
            Some(PoolContext { pool, paging_dir: ps.paging_dir.clone(), server })
        }
    };
    let pool = pool.as_ref();
    for s in specs {
        partition::prepare_disks(s)?;
        if let BootConfig::Native { image: Some(p), .. } = &s.boot {
            let bytes = std::fs::read(p).map_err(|source| crate::Error::Io { path: p.clone(), source })?;
            crate::kvm::native::check_elf(p, &bytes, s.mem_bytes)?;
        }
    }
    // Partitions are built and started in parallel, each as soon as it is ready. The
    // checks above caught bad input before any VM existed; should a build still fail,
    // every other partition is stopped and the error returned.
    let n = specs.len();
    let ctls: Vec<_> = specs.iter().map(|_| Arc::new(PartitionControl::default())).collect();
    let metrics: Vec<_> = specs
        .iter()
        .map(|s| {
            let m = PartitionMetrics::default();
            m.tunables.set_loan_policy(s.loan_policy);
            Arc::new(m)
        })
        .collect();
    let registry = Registry::new(
        pool.map(|p| p.pool.metrics.clone()),
        specs
            .iter()
            .zip(&metrics)
            .zip(&ctls)
            .map(|((s, m), c)| RegisteredPartition::new(&s.name, s.mem_bytes >> 20, s.min_bytes >> 20, s.weight, m.clone()).with_control(c.clone()))
            .collect(),
    );
    let mut registry = registry;
    registry.paging_server = pool.and_then(|p| p.server.as_ref()).map(Arc::downgrade);
    let socket = match control {
        Control::Off => None,
        Control::Default => Some(crate::control::default_socket_path().map_err(|e| crate::Error::Other(e.to_string()))?),
        Control::At(p) => Some(p),
    };
    let _server = match socket {
        None => None,
        Some(p) => {
            let server = Server::start(&p, registry.clone()).map_err(|e| crate::Error::Other(e.to_string()))?;
            tracing::info!("control socket {}", p.display());
            Some(server)
        }
    };
    let _metrics_server = match metrics_listener {
        None => None,
        Some(listener) => {
            let (reg, counters) = (registry.clone(), _server.as_ref().map(|s| s.metrics().clone()));
            let server = listener.serve(move || {
                let mut s = reg.snapshot();
                if let Some(c) = &counters {
                    c.fill(&mut s);
                }
                s
            })
            .map_err(crate::Error::Other)?;
            eprintln!("amsvm: Prometheus metrics at http://{}/metrics", server.addr());
            Some(server)
        }
    };
    let ranges = Mutex::new(Vec::new());
    let built = (Mutex::new(0usize), Condvar::new());
    let build_error: Mutex<Option<crate::Error>> = Mutex::new(None);
    let mark_built = || {
        *built.0.lock().unwrap() += 1;
        built.1.notify_all();
    };
    // SIGINT/SIGTERM stop every partition cleanly (summary, paging files and control
    // socket removed); a second one ends amsvm at once.
    let term = Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        let _ = signal_hook::flag::register_conditional_shutdown(sig, 130, term.clone());
        let _ = signal_hook::flag::register(sig, term.clone());
    }
    let all_done = std::sync::atomic::AtomicBool::new(false);
    let reports = std::thread::scope(|sc| {
        {
            let (term, ctls, all_done, registry) = (&term, &ctls, &all_done, &registry);
            sc.spawn(move || {
                let mut paused_since: Vec<Option<Instant>> = vec![None; ctls.len()];
                while !all_done.load(std::sync::atomic::Ordering::Relaxed) {
                    if term.load(std::sync::atomic::Ordering::Relaxed) {
                        eprintln!("amsvm: stopping every partition (again to quit at once)");
                        ctls.iter().for_each(|c| c.stop());
                        return;
                    }
                    end_forgotten_pauses(ctls, registry, &mut paused_since);
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
            });
        }
        let handles: Vec<_> = specs
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let (kvm, ctls, metrics, ranges, build_error, mark_built, registry) =
                    (&kvm, &ctls, &metrics, &ranges, &build_error, &mark_built, &registry);
                sc.spawn(move || {
                    let t = Instant::now();
                    let shared = Shared::new(&s.name, metrics[i].clone(), epoch);
                    match Partition::build(kvm, s, shared, image, pool) {
                        Err(e) => {
                            build_error.lock().unwrap().get_or_insert(crate::Error::Other(format!("partition \"{}\": {e}", s.name)));
                            ctls.iter().for_each(|c| c.stop());
                            mark_built();
                            None
                        }
                        Ok(p) => {
                            tracing::debug!(partition = %s.name, "built in {:?} ({:?} since start)", t.elapsed(), epoch.elapsed());
                            ranges.lock().unwrap().extend(p.guest_ranges());
                            mark_built();
                            let report = partition::supervise(kvm, s, p, epoch, image, pool, &ctls[i]);
                            registry.partitions[i].set_outcome(&report.outcome);
                            Some(report)
                        }
                    }
                })
            })
            .collect();
        if let Some(f) = observe {
            let mut g = built.0.lock().unwrap();
            while *g < n {
                g = built.1.wait(g).unwrap();
            }
            drop(g);
            if build_error.lock().unwrap().is_none() {
                let ranges = ranges.lock().unwrap().clone();
                let stop_all = || ctls.iter().for_each(|c| c.stop());
                f(Observed { metrics: &metrics, guest_ranges: &ranges, registry: &registry, stop_all: &stop_all });
            }
        }
        let reports = handles.into_iter().map(|h| h.join().expect("partition supervisor panicked")).collect::<Vec<_>>();
        all_done.store(true, std::sync::atomic::Ordering::Relaxed);
        reports
    });
    if let Some(server) = pool.and_then(|p| p.server.as_ref()) {
        server.stop();
    }
    if let Some(e) = build_error.into_inner().unwrap() {
        return Err(e);
    }
    Ok(reports.into_iter().flatten().collect())
}

/// How long a paused partition waits to be resumed once nothing else runs: then it is
/// ended (as "paused: ...") so that the run ends. While other partitions run, it waits.
pub const PAUSE_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// End the partitions that have been paused for [`PAUSE_GRACE`] while every other one
/// has ended or is paused too: nobody is left whose work might free what they wait for,
/// and the run should end rather than hang. `since` tracks when each was first seen
/// paused.
fn end_forgotten_pauses(ctls: &[Arc<PartitionControl>], registry: &Registry, since: &mut [Option<Instant>]) {
    let ended = |i: usize| registry.partitions[i].outcome.lock().unwrap_or_else(|e| e.into_inner()).is_some();
    let paused: Vec<bool> = ctls.iter().map(|c| c.paused().is_some()).collect();
    for (s, &p) in since.iter_mut().zip(&paused) {
        if !p {
            *s = None;
        } else if s.is_none() {
            *s = Some(Instant::now());
        }
    }
    if !(0..ctls.len()).all(|i| ended(i) || paused[i]) {
        return;
    }
    for (i, c) in ctls.iter().enumerate() {
        if since[i].is_some_and(|t| t.elapsed() >= PAUSE_GRACE) && !ended(i) {
            tracing::warn!(partition = %registry.partitions[i].name, "paused for {PAUSE_GRACE:?} with nothing else running: ending it");
            c.stop();
        }
    }
}

/// Did the partition end well?
pub fn success(r: &Report) -> bool {
    matches!(r.outcome, Outcome::Exited(0) | Outcome::PowerOff) && r.metrics.verify_failures.load(std::sync::atomic::Ordering::Relaxed) == 0
        && r.metrics.disk_failures.load(std::sync::atomic::Ordering::Relaxed) == 0
}

pub fn print_summary(reports: &[Report]) {
    use std::sync::atomic::Ordering::Relaxed;
    out!(
        "{:<16} {:>12} {:>12} {:>12} {:>9} {:>10} {:>9} {:>10} {:>9} {:>10} {:>10} {:>10} {:>10}  outcome",
        "partition", "touched", "verified", "written", "failures", "disk-ok", "disk-bad", "exits", "rejected", "hpi", "hpit-ms",
        "page-outs", "peak-loan"
    );
    for r in reports {
        let m = &r.metrics;
        out!(
            "{:<16} {:>12} {:>12} {:>12} {:>9} {:>10} {:>9} {:>10} {:>9} {:>10} {:>10.1} {:>10} {:>10}  {}",
            r.name,
            m.pages_touched.load(Relaxed),
            m.pages_verified.load(Relaxed),
            m.pages_written.load(Relaxed),
            m.verify_failures.load(Relaxed),
            m.disk_blocks_verified.load(Relaxed),
            m.disk_failures.load(Relaxed),
            m.exits.load(Relaxed),
            m.rejected(),
            m.hpi.load(Relaxed),
            m.hpit_ns.load(Relaxed) as f64 / 1e6,
            m.page_outs.load(Relaxed),
            m.balloon.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map_or(0, |b| b.peak_loaned.load(Relaxed)),
            r.outcome
        );
    }
}

pub fn run(config: &Path, console: bool, socket: Option<PathBuf>, metrics: Option<String>) -> i32 {
    let epoch = Instant::now();
    let (mut specs, pool) = match Config::from_file(config) {
        Ok(s) => (s.specs, s.pool),
        Err(e) => {
            eprintln!("amsvm: {e}");
            return EXIT_BAD_INPUT;
        }
    };
    if console {
        specs.iter_mut().for_each(|s| s.console_stdout = true);
    }
    eprintln!("amsvm: starting {} partition(s) from {}", specs.len(), config.display());
    let control = socket.map_or(Control::Default, Control::At);
    let reports = match run_specs_observed(&specs, pool.as_ref(), control, metrics.as_deref(), epoch, None) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("amsvm: {e}");
            return EXIT_BAD_INPUT;
        }
    };
    print_summary(&reports);
    if reports.iter().all(success) {
        0
    } else {
        EXIT_GUEST_FAILED
    }
}
