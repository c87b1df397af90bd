//! What the control socket reports: a [`Snapshot`] of the counters of the pool and of
//! every partition, in AMS words (`pmem`, `hpi`, `hpit`, `loan`), built from a
//! [`Registry`] of the live counters.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::metrics::{PartitionMetrics, PoolMetrics};

/// Version of the snapshot's layout. Fields are only ever added (a reader ignores the
/// ones it does not know); a change that removes or redefines a field bumps this.
pub const SNAPSHOT_VERSION: u32 = 1;

/// Bytes per page (pool frames and partition pages alike).
pub const PAGE_SIZE: u64 = 4096;

const MIB: u64 = 1 << 20;

/// The counters a running amsvm exposes: the pool's and every partition's.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    /// The shared pool; `None` when every partition has its own RAM.
    pub pool: Option<Arc<PoolMetrics>>,
    pub partitions: Vec<RegisteredPartition>,
    /// When the instance started: `uptime_ms` counts from here.
    pub started: Option<Instant>,
    /// The paging-server VM, with `[paging] backend = "vm"`.
    pub paging_server: Option<std::sync::Weak<crate::paging_server::PagingServer>>,
}

/// One partition as the control socket sees it.
#[derive(Debug, Clone)]
pub struct RegisteredPartition {
    pub name: String,
    pub logical_mib: u64,
    pub min_mib: u64,
    pub metrics: Arc<PartitionMetrics>,
    /// How the partition ended (set by whoever supervises it; `None` while it runs).
    pub outcome: Arc<Mutex<Option<String>>>,
    /// Its supervisor's handle, to destroy or resume it (absent in registries built for
    /// display only).
    pub control: Option<Arc<crate::partition::PartitionControl>>,
}

impl RegisteredPartition {
    /// The entry of a partition whose weight is `weight` (stored in `metrics.tunables`,
    /// where the operator's changes go too).
    pub fn new(name: impl Into<String>, logical_mib: u64, min_mib: u64, weight: u8, metrics: Arc<PartitionMetrics>) -> Self {
        metrics.tunables.set_weight(weight);
        RegisteredPartition { name: name.into(), logical_mib, min_mib, metrics, outcome: Arc::default(), control: None }
    }

    /// The same entry, destroyable and resumable through `control`.
    pub fn with_control(mut self, control: Arc<crate::partition::PartitionControl>) -> Self {
        self.control = Some(control);
        self
    }

    /// Record how the partition ended (`Outcome`'s text, e.g. "exited ok"). Every clone
    /// of this entry (and of the registry holding it) sees it.
    pub fn set_outcome(&self, outcome: impl ToString) {
        *self.outcome.lock().unwrap_or_else(|e| e.into_inner()) = Some(outcome.to_string());
    }

    pub fn snapshot(&self) -> PartitionSnapshot {
        let m = &self.metrics;
        let outcome = self.outcome.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let paused = m.paused.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let balloon = m.balloon.lock().unwrap_or_else(|e| e.into_inner()).as_deref().map(BalloonSnapshot::from_state);
        let state = match (&outcome, &paused) {
            (Some(_), _) => PartitionState::Ended,
            (None, Some(_)) => PartitionState::Paused,
            (None, None) => PartitionState::Running,
        };
        PartitionSnapshot {
            name: self.name.clone(),
            logical_mib: self.logical_mib,
            min_mib: self.min_mib,
            weight: m.tunables.weight(),
            loan_policy: m.tunables.loan_policy(),
            state,
            paused_reason: paused,
            outcome,
            pmem_pages: m.pmem.load(Relaxed),
            loan_pages: balloon.as_ref().map_or(0, |b| b.loaned),
            loan_target_pages: balloon.as_ref().map_or(0, |b| b.target),
            hpi: m.hpi.load(Relaxed),
            hpit_ms: m.hpit_ns.load(Relaxed) as f64 / 1e6,
            zero_fills: m.zero_fills.load(Relaxed),
            page_outs: m.page_outs.load(Relaxed),
            page_out_writes: m.page_out_writes.load(Relaxed),
            page_out_zero: m.page_out_zero.load(Relaxed),
            page_out_clean: m.page_out_clean.load(Relaxed),
            cluster_reads: m.cluster_reads.load(Relaxed),
            pager_bytes: m.pager_bytes.load(Relaxed),
            pages_touched: m.pages_touched.load(Relaxed),
            pages_verified: m.pages_verified.load(Relaxed),
            pages_written: m.pages_written.load(Relaxed),
            verify_failures: m.verify_failures.load(Relaxed),
            disk_blocks_verified: m.disk_blocks_verified.load(Relaxed),
            disk_failures: m.disk_failures.load(Relaxed),
            exits: m.exits.load(Relaxed),
            resets: m.resets.load(Relaxed),
            rejected: m.rejected(),
            cpu_yields: m.cpu_yields.load(Relaxed),
            yielding: m.yielding.load(Relaxed),
            huge_collapses: m.huge_collapses.load(Relaxed),
            huge_fills: m.huge_fills.load(Relaxed),
            balloon,
        }
    }
}

impl Registry {
    /// A registry whose uptime counts from now.
    pub fn new(pool: Option<Arc<PoolMetrics>>, partitions: Vec<RegisteredPartition>) -> Self {
        Registry { pool, partitions, started: Some(Instant::now()), paging_server: None }
    }

    fn find(&self, name: &str) -> Result<&RegisteredPartition, String> {
        self.partitions.iter().find(|p| p.name == name).ok_or_else(|| {
            let names: Vec<_> = self.partitions.iter().map(|p| p.name.as_str()).collect();
            format!("no partition named {name:?} (partitions: {})", names.join(", "))
        })
    }

    /// A running partition's handle, for `what` (destroy, resume).
    fn control_of(&self, name: &str, what: &str) -> Result<&crate::partition::PartitionControl, String> {
        let p = self.find(name)?;
        if let Some(o) = p.outcome.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            return Err(format!("cannot {what} partition {name:?}: it has ended ({o})"));
        }
        p.control.as_deref().ok_or_else(|| format!("cannot {what} partition {name:?}: this instance does not offer it"))
    }

    /// Destroy a running partition (see [`crate::partition::PartitionControl::destroy`]).
    pub fn destroy(&self, name: &str) -> Result<(), String> {
        self.control_of(name, "destroy")?.destroy();
        Ok(())
    }

    /// Resume a partition the pool paused on a paging-device error.
    pub fn resume(&self, name: &str) -> Result<(), String> {
        self.control_of(name, "resume")?.resume().map_err(|why| format!("cannot resume partition {name:?}: {why}"))
    }

    /// Change a partition's weight and/or loan policy while it runs (only partitions in
    /// a pool have either).
    pub fn set(&self, name: &str, weight: Option<u8>, loan_policy: Option<crate::config::LoanPolicy>) -> Result<(), String> {
        let p = self.find(name)?;
        if self.pool.is_none() {
            return Err(format!("partition {name:?} is not in a pool; weight and loan_policy apply to partitions in a [pool]"));
        }
        if weight.is_none() && loan_policy.is_none() {
            return Err("set: give \"weight\" and/or \"loan_policy\"".to_string());
        }
        if let Some(w) = weight {
            p.metrics.tunables.set_weight(w);
        }
        if let Some(lp) = loan_policy {
            p.metrics.tunables.set_loan_policy(lp);
        }
        Ok(())
    }

    /// Hold partition `name`'s balloon target, or hand it back to the loaning policy.
    pub fn set_loan(&self, name: &str, target: super::protocol::LoanTarget) -> Result<(), String> {
        let p = self.find(name)?;
        let b = p.metrics.balloon.lock().unwrap_or_else(|e| e.into_inner()).clone().ok_or_else(|| {
            format!("partition {name:?} has no balloon (only partitions in a [pool] have one)")
        })?;
        match target {
            super::protocol::LoanTarget::Auto => b.manual_target.store(u64::MAX, Relaxed),
            super::protocol::LoanTarget::Mib(m) => {
                let pages = m.saturating_mul(MIB / PAGE_SIZE);
                let max = p.logical_mib.saturating_sub(p.min_mib) * (MIB / PAGE_SIZE);
                if pages > max {
                    return Err(format!(
                        "partition {name:?}: a loan of {m} MiB would leave it less than its min_mib ({} MiB of {} MiB)",
                        p.min_mib, p.logical_mib
                    ));
                }
                b.manual_target.store(pages, Relaxed);
            }
        }
        Ok(())
    }

    /// The counters now. Control-socket counters are zero here; the server fills them in.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            version: SNAPSHOT_VERSION,
            pid: std::process::id(),
            uptime_ms: self.started.map_or(0, |t| t.elapsed().as_millis() as u64),
            control_requests: 0,
            control_rejected: 0,
            control_busy: 0,
            pool: self.pool.as_deref().map(PoolSnapshot::from_metrics),
            partitions: self.partitions.iter().map(RegisteredPartition::snapshot).collect(),
            paging_server: self.paging_server.as_ref().and_then(|w| w.upgrade()).map(|ps| {
                let m = &ps.channel.metrics;
                PagingServerSnapshot {
                    starts: ps.starts.load(Relaxed),
                    requests: m.requests.load(Relaxed),
                    completions: m.completions.load(Relaxed),
                    resubmitted: m.resubmitted.load(Relaxed),
                    refused_by_server: m.refused_by_server.load(Relaxed),
                    io_errors: m.io_errors.load(Relaxed),
                    rejected: m.rejected.load(Relaxed),
                }
            }),
        }
    }
}

/// The counters of a running amsvm at one moment (each counter is read on its own:
/// counters are not consistent with each other to the page).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// [`SNAPSHOT_VERSION`] of the instance that answered.
    pub version: u32,
    pub pid: u32,
    pub uptime_ms: u64,
    /// Requests the control socket answered, malformed ones it rejected (bad JSON,
    /// unknown cmd, oversized line, silent client) and connections it refused because
    /// too many were open.
    #[serde(default)]
    pub control_requests: u64,
    #[serde(default)]
    pub control_rejected: u64,
    #[serde(default)]
    pub control_busy: u64,
    /// `None` without a shared pool (each partition has its own RAM).
    pub pool: Option<PoolSnapshot>,
    pub partitions: Vec<PartitionSnapshot>,
    /// The paging-server VM, with `[paging] backend = "vm"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paging_server: Option<PagingServerSnapshot>,
}

/// The paging-server VM and its VASI channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PagingServerSnapshot {
    /// Times it was started (1: never restarted).
    pub starts: u64,
    /// Requests submitted, completed, submitted again after a restart, refused by the
    /// paging server as malformed, failed on the paging device; completions amsvm
    /// rejected.
    pub requests: u64,
    pub completions: u64,
    pub resubmitted: u64,
    pub refused_by_server: u64,
    pub io_errors: u64,
    pub rejected: u64,
}

/// The shared pool (`lparstat -m`'s pool line).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolSnapshot {
    pub page_size: u64,
    pub size_pages: u64,
    /// Frames in use by partitions (the sum of their `pmem_pages`).
    pub in_use_pages: u64,
    pub free_pages: u64,
    pub peak_in_use_pages: u64,
    /// Faults served, reclaim rounds, and waits for a frame nobody could free yet.
    pub faults: u64,
    pub reclaims: u64,
    pub frame_waits: u64,
}

impl PoolSnapshot {
    pub fn from_metrics(m: &PoolMetrics) -> Self {
        let size = m.size_pages.load(Relaxed);
        let in_use = m.resident.load(Relaxed);
        PoolSnapshot {
            page_size: PAGE_SIZE,
            size_pages: size,
            in_use_pages: in_use,
            free_pages: size.saturating_sub(in_use),
            peak_in_use_pages: m.peak_resident.load(Relaxed),
            faults: m.faults.load(Relaxed),
            reclaims: m.reclaims.load(Relaxed),
            frame_waits: m.frame_waits.load(Relaxed),
        }
    }

    pub fn size_mib(&self) -> f64 {
        pages_mib(self.size_pages)
    }

    pub fn in_use_mib(&self) -> f64 {
        pages_mib(self.in_use_pages)
    }

    pub fn free_mib(&self) -> f64 {
        pages_mib(self.free_pages)
    }
}

/// Where a partition is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PartitionState {
    Running,
    /// Stopped by the pool on an error (`paused_reason` says which).
    Paused,
    /// Ended (`outcome` says how).
    Ended,
}

impl std::fmt::Display for PartitionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PartitionState::Running => "running",
            PartitionState::Paused => "paused",
            PartitionState::Ended => "ended",
        })
    }
}

/// One partition (`lparstat -m` / `vmstat -h` names where AMS has one).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartitionSnapshot {
    pub name: String,
    /// Configuration: RAM size, the floor never reclaimed below, and the weight 0-255.
    pub logical_mib: u64,
    pub min_mib: u64,
    pub weight: u8,
    /// How far the pool may ask it to loan (meaningful in a pool only).
    #[serde(default)]
    pub loan_policy: crate::config::LoanPolicy,
    pub state: PartitionState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    /// Pages resident in the pool now (AMS `pmem`).
    pub pmem_pages: u64,
    /// Pages loaned back through the balloon (AMS `loan`), and the balloon's target.
    pub loan_pages: u64,
    #[serde(default)]
    pub loan_target_pages: u64,
    /// Hypervisor page-ins, and milliseconds vCPUs were blocked on them (`vmstat -h`).
    pub hpi: u64,
    pub hpit_ms: f64,
    /// First touches given zero-filled frames.
    pub zero_fills: u64,
    /// Pages paged out, and how: written, recorded as all-zero, unchanged (not rewritten).
    pub page_outs: u64,
    pub page_out_writes: u64,
    pub page_out_zero: u64,
    pub page_out_clean: u64,
    /// Pages read back together with a faulting neighbour.
    pub cluster_reads: u64,
    /// Bytes the partition's paging device holds.
    pub pager_bytes: u64,
    /// Workload progress as reported by the guest.
    pub pages_touched: u64,
    pub pages_verified: u64,
    pub pages_written: u64,
    pub verify_failures: u64,
    pub disk_blocks_verified: u64,
    pub disk_failures: u64,
    pub exits: u64,
    pub resets: u64,
    /// Guest input rejected (unclaimed I/O, bad hypercalls, what devices rejected).
    pub rejected: u64,
    /// Pool `policy = "protect"`: times it started yielding its vCPUs' CPU because it
    /// was thrashing, and whether it does now.
    #[serde(default)]
    pub cpu_yields: u64,
    #[serde(default)]
    pub yielding: bool,
    /// Pool `huge_pages`: 2 MiB ranges collapsed into huge pages.
    #[serde(default)]
    pub huge_collapses: u64,
    /// Pool `huge_pages`: first touches served with a whole 2 MiB huge page.
    #[serde(default)]
    pub huge_fills: u64,
    /// The virtio-balloon, for partitions in a pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<BalloonSnapshot>,
}

/// A partition's virtio-balloon: the loan, its target, what the driver did and what
/// its statistics say.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BalloonSnapshot {
    /// The driver started the device.
    pub active: bool,
    /// Pages: target, in the balloon (device count), the highest loan, and `actual` as
    /// the driver wrote it (guest-supplied).
    pub target: u64,
    pub loaned: u64,
    pub peak_loaned: u64,
    pub actual: u64,
    /// Pages inflated, deflated and reported free, and pool frames freed by them.
    pub inflated: u64,
    pub deflated: u64,
    pub reported: u64,
    pub frames_freed: u64,
    /// Page numbers and chains the device rejected.
    pub rejected: u64,
    /// The guest's statistics (virtio names: free, total, available, caches, ...; bytes
    /// or counts as the guest reported them), and how many reports came.
    pub guest_stats: std::collections::BTreeMap<String, u64>,
    pub stats_updates: u64,
}

impl BalloonSnapshot {
    pub fn from_state(b: &crate::devices::virtio::balloon::BalloonState) -> Self {
        use crate::devices::virtio::balloon::tag;
        use crate::metrics::DeviceCounters;
        let st = b.guest_stats();
        BalloonSnapshot {
            active: b.active.load(Relaxed),
            target: b.target.load(Relaxed),
            loaned: b.loaned.load(Relaxed),
            peak_loaned: b.peak_loaned.load(Relaxed),
            actual: b.actual.load(Relaxed),
            inflated: b.inflated.load(Relaxed),
            deflated: b.deflated.load(Relaxed),
            reported: b.reported.load(Relaxed),
            frames_freed: b.frames_freed.load(Relaxed),
            rejected: b.rejected(),
            guest_stats: tag::NAMES.iter().zip(st.values).filter_map(|(n, v)| v.map(|v| (n.to_string(), v))).collect(),
            stats_updates: st.updates,
        }
    }
}

impl PartitionSnapshot {
    pub fn pmem_mib(&self) -> f64 {
        pages_mib(self.pmem_pages)
    }

    pub fn loan_mib(&self) -> f64 {
        pages_mib(self.loan_pages)
    }

    pub fn loan_target_mib(&self) -> f64 {
        pages_mib(self.loan_target_pages)
    }

    pub fn pager_mib(&self) -> f64 {
        self.pager_bytes as f64 / MIB as f64
    }

    /// `state`, with the pause reason or the outcome when there is one.
    pub fn state_text(&self) -> String {
        match (&self.state, &self.paused_reason, &self.outcome) {
            (PartitionState::Ended, _, Some(o)) => format!("ended: {o}"),
            (PartitionState::Paused, Some(r), _) => format!("paused: {r}"),
            (PartitionState::Running, _, _) if self.yielding => "running (thrashing: yields its CPU)".to_string(),
            (s, _, _) => s.to_string(),
        }
    }
}

fn pages_mib(pages: u64) -> f64 {
    (pages * PAGE_SIZE) as f64 / MIB as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_reads_the_live_counters() {
        let pool = Arc::new(PoolMetrics::default());
        pool.size_pages.store(1000, Relaxed);
        pool.resident.store(300, Relaxed);
        pool.peak_resident.store(400, Relaxed);
        pool.faults.store(7, Relaxed);
        let m = Arc::new(PartitionMetrics::default());
        m.pmem.store(256, Relaxed);
        m.hpi.store(3, Relaxed);
        m.hpit_ns.store(2_500_000, Relaxed);
        m.pager_bytes.store(3 << 20, Relaxed);
        m.unknown_io.store(2, Relaxed);
        let p = RegisteredPartition::new("alpha", 128, 16, 200, m.clone());
        let reg = Registry::new(Some(pool), vec![p.clone()]);
        let s = reg.snapshot();
        assert_eq!(s.version, SNAPSHOT_VERSION);
        assert_eq!(s.pid, std::process::id());
        let pool = s.pool.unwrap();
        assert_eq!((pool.size_pages, pool.in_use_pages, pool.free_pages, pool.peak_in_use_pages), (1000, 300, 700, 400));
        assert_eq!(pool.faults, 7);
        let a = &s.partitions[0];
        assert_eq!((a.name.as_str(), a.logical_mib, a.min_mib, a.weight), ("alpha", 128, 16, 200));
        assert_eq!((a.pmem_pages, a.pmem_mib(), a.hpi, a.hpit_ms, a.pager_mib()), (256, 1.0, 3, 2.5, 3.0));
        assert_eq!((a.rejected, a.state, a.state_text()), (2, PartitionState::Running, "running".to_string()));

        *m.paused.lock().unwrap() = Some("paging device full".into());
        let a = reg.snapshot().partitions.remove(0);
        assert_eq!((a.state, a.state_text()), (PartitionState::Paused, "paused: paging device full".to_string()));
        // The outcome set through one clone is seen through every other.
        p.set_outcome("exited ok");
        let a = reg.clone().snapshot().partitions.remove(0);
        assert_eq!((a.state, a.state_text()), (PartitionState::Ended, "ended: exited ok".to_string()));
    }

    #[test]
    fn json_uses_ams_names_and_round_trips() {
        let reg = Registry::new(None, vec![RegisteredPartition::new("a", 64, 0, 128, Arc::default())]);
        let s = reg.snapshot();
        let j = serde_json::to_string(&s).unwrap();
        for key in ["\"pmem_pages\":", "\"hpi\":", "\"hpit_ms\":", "\"loan_pages\":", "\"page_outs\":", "\"state\":\"running\"", "\"pool\":null"] {
            assert!(j.contains(key), "{key} missing in {j}");
        }
        assert!(!j.contains("outcome"), "no outcome while running: {j}");
        assert_eq!(serde_json::from_str::<Snapshot>(&j).unwrap(), s);
    }
}
