//! Counters, in one place, read by the CLI (and later by the control socket and the
//! Prometheus endpoint alike). Plain relaxed atomics: readers want recent values, not
//! a consistent snapshot across counters.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use amsvm_abi::Progress;

/// Per-partition counters.
#[derive(Debug, Default)]
pub struct PartitionMetrics {
    /// Workload progress as last reported by the guest (cumulative, guest-supplied).
    pub pages_touched: AtomicU64,
    pub pages_verified: AtomicU64,
    pub pages_written: AtomicU64,
    pub verify_failures: AtomicU64,
    pub disk_blocks_verified: AtomicU64,
    pub disk_failures: AtomicU64,
    /// Hypercalls handled, and those rejected (unknown number, bad size).
    pub hypercalls: AtomicU64,
    pub bad_hypercalls: AtomicU64,
    /// Guest port-I/O and MMIO accesses that no device claims.
    pub unknown_io: AtomicU64,
    pub unknown_mmio: AtomicU64,
    /// vCPU exits to the VMM.
    pub exits: AtomicU64,
    /// Nanoseconds from the start of the amsvm process (or command) to the first exit of
    /// vCPU 0: an upper bound of the time to the first guest instruction (0 = not yet).
    pub first_exit_ns: AtomicU64,
    /// Resets (reboots) of this partition.
    pub resets: AtomicU64,
    /// Counters of the partition's devices (all incarnations, across resets).
    pub devices: Mutex<Vec<Arc<dyn DeviceCounters>>>,
    /// Pool: pages of this partition resident in the pool now (AMS `pmem`).
    pub pmem: AtomicU64,
    /// Pool: hypervisor page-ins (pages read back from the paging device).
    pub hpi: AtomicU64,
    /// Pool: nanoseconds vCPUs (and device threads) were blocked on page-ins.
    pub hpit_ns: AtomicU64,
    /// Pool: first touches of never-used (or discarded) pages, given zero-filled frames.
    pub zero_fills: AtomicU64,
    /// Pool: pages paged out (frames taken back), and how they left:
    pub page_outs: AtomicU64,
    /// written to the paging device,
    pub page_out_writes: AtomicU64,
    /// recorded as all-zero (nothing written),
    pub page_out_zero: AtomicU64,
    /// unchanged since their last page-out (nothing written again).
    pub page_out_clean: AtomicU64,
    /// Pool: nanoseconds spent paging out (choosing victims, detaching, writing).
    pub page_out_ns: AtomicU64,
    /// Pool: pages read back together with a faulting neighbour (clustering).
    pub cluster_reads: AtomicU64,
    /// Pool: bytes this partition's paging device holds.
    pub pager_bytes: AtomicU64,
    /// Pool: paging-device operations tried again after an I/O error.
    pub pager_retries: AtomicU64,
    /// Pool: times the partition was paused on a paging-device error.
    pub pauses: AtomicU64,
    /// Pool: times the partition was resumed after a pause.
    pub resumes: AtomicU64,
    /// Pool (`policy = "protect"`): times the partition started yielding its vCPUs' CPU
    /// time because it had to page itself to run.
    pub cpu_yields: AtomicU64,
    /// Pool: its vCPU threads run at the lowest priority now (it is thrashing).
    pub yielding: AtomicBool,
    /// Pool (`huge_pages`): 2 MiB ranges of its memory collapsed into huge pages.
    pub huge_collapses: AtomicU64,
    /// Pool (`huge_pages`): first touches served with a whole 2 MiB huge page.
    pub huge_fills: AtomicU64,
    /// Pool: the partition is paused because of this error (empty: running).
    pub paused: Mutex<Option<String>>,
    /// The workload's access-time histogram (TSC cycles, `amsvm_abi::latency_bucket`),
    /// as reported at EXIT when it was asked to measure; guest-supplied.
    pub latency: Mutex<Vec<u64>>,
    /// TSC frequency of the partition's vCPUs, kHz (0: unknown).
    pub tsc_khz: AtomicU64,
    /// The partition's virtio-balloon (its current incarnation), if it has one.
    pub balloon: Mutex<Option<Arc<crate::devices::virtio::balloon::BalloonState>>>,
    /// Times the loaning policy found this partition's balloon not following its target.
    pub loan_unresponsive: AtomicU64,
    /// Settings an operator may change while the partition runs.
    pub tunables: Tunables,
}

/// A partition's settings that can change while it runs (the control socket's `set`,
/// `amsvm top`'s keys): the pool reads them at every decision.
#[derive(Debug, Default)]
pub struct Tunables {
    weight: AtomicU8,
    loan_policy: AtomicU8,
}

impl Tunables {
    /// 0–255: a higher weight keeps memory longer under pressure and loans last.
    pub fn weight(&self) -> u8 {
        self.weight.load(Relaxed)
    }

    pub fn set_weight(&self, w: u8) {
        self.weight.store(w, Relaxed);
    }

    pub fn loan_policy(&self) -> crate::config::LoanPolicy {
        use crate::config::LoanPolicy;
        match self.loan_policy.load(Relaxed) {
            0 => LoanPolicy::Off,
            2 => LoanPolicy::Aggressive,
            _ => LoanPolicy::Default,
        }
    }

    pub fn set_loan_policy(&self, p: crate::config::LoanPolicy) {
        use crate::config::LoanPolicy;
        let v = match p {
            LoanPolicy::Off => 0,
            LoanPolicy::Default => 1,
            LoanPolicy::Aggressive => 2,
        };
        self.loan_policy.store(v, Relaxed);
    }
}

/// What every device model reports to its partition's metrics.
pub trait DeviceCounters: Send + Sync + std::fmt::Debug {
    /// Guest requests or register accesses the device rejected: malformed descriptor
    /// chains, out-of-range requests, accesses out of protocol.
    fn rejected(&self) -> u64;
}

impl DeviceCounters for crate::devices::virtio::mmio::MmioMetrics {
    fn rejected(&self) -> u64 {
        self.bad_accesses.load(Relaxed)
            + self.bad_notifications.load(Relaxed)
            + self.activation_failures.load(Relaxed)
            + self.feature_rejections.load(Relaxed)
    }
}

impl DeviceCounters for crate::devices::virtio::blk::BlockMetrics {
    fn rejected(&self) -> u64 {
        self.rejected_chains.load(Relaxed) + self.invalid_heads.load(Relaxed) + self.read_only_rejections.load(Relaxed)
    }
}

impl PartitionMetrics {
    /// Take cumulative progress counters from the guest. Guest-supplied: the counters are
    /// only displayed, never used to size or index anything.
    pub fn set_progress(&self, p: &Progress) {
        self.pages_touched.store(p.pages_touched, Relaxed);
        self.pages_verified.store(p.pages_verified, Relaxed);
        self.pages_written.store(p.pages_written, Relaxed);
        self.verify_failures.store(p.verify_failures, Relaxed);
        self.disk_blocks_verified.store(p.disk_blocks_verified, Relaxed);
        self.disk_failures.store(p.disk_failures, Relaxed);
    }

    /// Everything rejected from the guest: unclaimed port/MMIO accesses, bad hypercalls
    /// and what the devices rejected.
    pub fn rejected(&self) -> u64 {
        let devices: u64 = self.devices.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|d| d.rejected()).sum();
        self.unknown_io.load(Relaxed) + self.unknown_mmio.load(Relaxed) + self.bad_hypercalls.load(Relaxed) + devices
    }

    pub fn add_device(&self, d: Arc<dyn DeviceCounters>) {
        self.devices.lock().unwrap_or_else(|e| e.into_inner()).push(d);
    }

    /// The `q` quantile (0..=1) of the access-time histogram, in nanoseconds (the floor
    /// of the bucket it falls in); None without samples or TSC frequency.
    pub fn latency_quantile_ns(&self, q: f64) -> Option<f64> {
        self.latency_quantile_above_ns(q, 0.0)
    }

    /// Like [`Self::latency_quantile_ns`], over the accesses that took at least `min_ns`
    /// (e.g. those that waited on a fault); with their count.
    pub fn latency_quantile_above_ns(&self, q: f64, min_ns: f64) -> Option<f64> {
        let h = self.latency.lock().unwrap_or_else(|e| e.into_inner());
        let khz = self.tsc_khz.load(Relaxed);
        if khz == 0 {
            return None;
        }
        let ns = |b: usize| amsvm_abi::latency_bucket_floor(b) as f64 * 1e6 / khz as f64;
        let first = (0..h.len()).find(|&b| ns(b) >= min_ns).unwrap_or(h.len());
        let total: u64 = h[first..].iter().sum();
        if total == 0 {
            return None;
        }
        let want = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (b, &n) in h.iter().enumerate().skip(first) {
            seen += n;
            if seen >= want {
                return Some(amsvm_abi::latency_bucket_floor(b) as f64 * 1e6 / khz as f64);
            }
        }
        None
    }

    /// Accesses in the access-time histogram that took at least `min_ns`.
    pub fn latency_samples_above(&self, min_ns: f64) -> u64 {
        let h = self.latency.lock().unwrap_or_else(|e| e.into_inner());
        let khz = self.tsc_khz.load(Relaxed);
        if khz == 0 {
            return 0;
        }
        h.iter()
            .enumerate()
            .filter(|&(b, _)| amsvm_abi::latency_bucket_floor(b) as f64 * 1e6 / khz as f64 >= min_ns)
            .map(|(_, &n)| n)
            .sum()
    }

    pub fn progress(&self) -> Progress {
        Progress {
            pages_touched: self.pages_touched.load(Relaxed),
            pages_verified: self.pages_verified.load(Relaxed),
            pages_written: self.pages_written.load(Relaxed),
            verify_failures: self.verify_failures.load(Relaxed),
            disk_blocks_verified: self.disk_blocks_verified.load(Relaxed),
            disk_failures: self.disk_failures.load(Relaxed),
        }
    }
}

/// Counters of the shared pool.
#[derive(Debug, Default)]
pub struct PoolMetrics {
    /// The budget, in pages.
    pub size_pages: AtomicU64,
    /// Frames in use (resident partition pages, counted when granted).
    pub resident: AtomicU64,
    /// Faults served (all partitions).
    pub faults: AtomicU64,
    /// Reclaim rounds (a fault found the pool full and paged something out).
    pub reclaims: AtomicU64,
    /// Times a fault had to wait for a frame that nobody could free yet.
    pub frame_waits: AtomicU64,
    /// Highest `resident` ever seen.
    pub peak_resident: AtomicU64,
}
