//! The paging-server VM (`[paging] backend = "vm"`, `docs/vasi.md`): formatting the
//! paging devices, booting the paging server before the partitions, and keeping it
//! running — it is restarted when it dies or stops answering, and the requests it had
//! not completed are submitted again. Partitions waiting on it simply wait meanwhile.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::Kvm;
use paging_server::format::{self, FormatError, Header, Layout};

use crate::config::{BootConfig, PartitionRole, PartitionSpec, DiskConfig};
use crate::devices::virtio::vasi::Channel;
use crate::metrics::PartitionMetrics;
use crate::pager::vm::VmPager;
use crate::partition::{Outcome, Partition, Shared};
use crate::{Error, Result};

/// The paging server's own RAM (never drawn from the pool), transfer window included.
pub const SERVER_MEM_BYTES: u64 = 24 << 20;
/// The transfer window: the top of its RAM.
pub const WINDOW_PAGES: u32 = 512;
/// Where the transfer window starts in the paging server's RAM.
pub const WINDOW_GPA: u64 = SERVER_MEM_BYTES - WINDOW_PAGES as u64 * 4096;
/// A paging server that holds requests without completing any for this long is
/// considered hung and restarted.
pub const HANG_TIMEOUT: Duration = Duration::from_secs(5);

/// One partition's paging device.
struct Device {
    path: PathBuf,
    slots: u64,
}

pub struct PagingServer {
    pub channel: Arc<Channel>,
    devices: Vec<Device>,
    pub metrics: Arc<PartitionMetrics>,
    current: Mutex<Option<Arc<Shared>>>,
    stop: AtomicBool,
    /// Times the paging server was started (1 = never restarted).
    pub starts: AtomicU64,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

fn name_of(n: &[u8; format::NAME_BYTES]) -> String {
    format::name_str(n).map_or_else(|| "(unreadable name)".to_string(), str::to_string)
}

/// Create or re-format the paging device of partition `id`/`name` at `path` for `slots`
/// pages. A device that belongs to another partition, or is something else, is refused.
pub fn format_device(path: &Path, id: u32, name: &str, slots: u64) -> Result<()> {
    let io = |source| Error::Io { path: path.to_path_buf(), source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let f = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).map_err(io)?;
    let size = f.metadata().map_err(io)?.len();
    if size > 0 {
        let mut block = vec![0u8; format::HEADER_BYTES.min(size as usize)];
        f.read_exact_at(&mut block, 0).map_err(io)?;
        match Header::decode_for(&block, size, id) {
            Ok(_) | Err(FormatError::Blank) => {}
            Err(FormatError::WrongPartition { found_id, found_name, .. }) => {
                return Err(Error::Other(format!(
                    "paging device {} belongs to partition \"{}\" (id {found_id}), not to partition \"{name}\" (id {id})",
                    path.display(),
                    name_of(&found_name)
                )))
            }
            Err(e) => return Err(Error::Other(format!("paging device {}: not a paging device of partition \"{name}\": {e:?}", path.display()))),
        }
    }
    let h = Header::new(id, name, slots);
    let l = h.layout;
    // A fresh slot map: nothing paged out yet in this run. The data area stays sparse.
    f.set_len(l.data_offset).map_err(io)?;
    f.set_len(l.device_bytes).map_err(io)?;
    f.write_all_at(&vec![0u8; l.bitmap_bytes as usize], l.bitmap_offset).map_err(io)?;
    f.write_all_at(&h.encode(), 0).map_err(io)?;
    Ok(())
}

/// The paging-server VM as a partition: the VASI device of `channel`, then `devices`
/// (paging device `i` is `devices[i]`), [`SERVER_MEM_BYTES`] of RAM of its own, one vCPU,
/// its console to `log_path`.
pub(crate) fn server_spec(channel: &Arc<Channel>, devices: &[PathBuf], log_path: Option<PathBuf>) -> PartitionSpec {
    PartitionSpec {
        role: PartitionRole::PagingServer(channel.clone()),
        id: u32::MAX,
        name: "paging-server".into(),
        mem_bytes: SERVER_MEM_BYTES,
        min_bytes: 0,
        weight: 0,
        paging_file: None,
        loan_policy: crate::config::LoanPolicy::Off,
        vcpus: 1,
        boot: BootConfig::Native { image: None, workload: Default::default() },
        disks: devices.iter().map(|p| DiskConfig { path: p.clone(), read_only: false, create_mib: None }).collect(),
        console_stdout: false,
        log_path,
        // It touches little of its RAM, scattered: 4 KiB pages keep its footprint exact.
        huge_pages: false,
    }
}

impl PagingServer {
    /// Format a paging device for every partition and boot the paging server; it is kept
    /// running until [`stop`](Self::stop).
    pub fn start(kvm: &Kvm, partitions: &[PartitionSpec], paging_dir: &Path, epoch: Instant) -> Result<Arc<PagingServer>> {
        let mut devices = Vec::new();
        for p in partitions {
            let path = p.paging_file.clone().unwrap_or_else(|| paging_dir.join(format!("{}.pgdev", p.name)));
            let slots = p.mem_bytes / 4096;
            format_device(&path, p.id, &p.name, slots)?;
            devices.push(Device { path, slots });
        }
        let ids: Vec<u32> = partitions.iter().map(|p| p.id).collect();
        let channel = Channel::new(WINDOW_GPA, WINDOW_PAGES, &ids);
        let log_path = partitions.first().and_then(|p| p.log_path.as_ref()).and_then(|l| l.parent()).map(|d| d.join("paging-server.log"));
        let paths: Vec<PathBuf> = devices.iter().map(|d| d.path.clone()).collect();
        let spec = server_spec(&channel, &paths, log_path);
        let server = Arc::new(PagingServer {
            channel,
            devices,
            metrics: Arc::new(PartitionMetrics::default()),
            current: Mutex::new(None),
            stop: AtomicBool::new(false),
            starts: AtomicU64::new(0),
            threads: Mutex::new(Vec::new()),
        });
        // The first build's errors (no image, bad device) are the caller's.
        let first = Partition::build(kvm, &spec, Shared::new(&spec.name, server.metrics.clone(), epoch), &[], None)?;
        let kvm = Kvm::new().map_err(Error::KvmOpen)?;
        let s = server.clone();
        let supervisor = std::thread::Builder::new()
            .name("paging-server".into())
            .spawn(move || s.supervise(&kvm, &spec, first, epoch))
            .map_err(|e| Error::Other(format!("cannot start the paging server's supervisor: {e}")))?;
        let s = server.clone();
        let watchdog = std::thread::Builder::new()
            .name("paging-watchdog".into())
            .spawn(move || s.watch())
            .map_err(|e| Error::Other(format!("cannot start the paging server's watchdog: {e}")))?;
        server.threads.lock().unwrap_or_else(|e| e.into_inner()).extend([supervisor, watchdog]);
        Ok(server)
    }

    /// The pager of partition `spec` (its device index is its position in the config).
    pub fn pager(&self, spec: &PartitionSpec) -> VmPager {
        let i = spec.id as usize;
        let d = &self.devices[i.min(self.devices.len() - 1)];
        VmPager::new(self.channel.clone(), i as u32, d.path.clone(), d.slots)
    }

    fn supervise(&self, kvm: &Kvm, spec: &PartitionSpec, first: Partition, epoch: Instant) {
        let mut next = Some(first);
        while !self.stop.load(Relaxed) {
            let built = match next.take() {
                Some(p) => Ok(p),
                None => Partition::build(kvm, spec, Shared::new(&spec.name, self.metrics.clone(), epoch), &[], None),
            };
            let outcome = match built.and_then(|p| p.start()) {
                Err(e) => Outcome::Crashed(format!("could not be started: {e}")),
                Ok(running) => {
                    *self.current.lock().unwrap_or_else(|e| e.into_inner()) = Some(running.shared.clone());
                    self.starts.fetch_add(1, Relaxed);
                    if self.stop.load(Relaxed) {
                        running.shared.finish(Outcome::Stopped);
                    }
                    running.wait()
                }
            };
            self.channel.detach_server();
            if self.stop.load(Relaxed) {
                break;
            }
            tracing::warn!("paging server ended ({outcome}); restarting it");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Restart a paging server that holds requests and completes none for
    /// [`HANG_TIMEOUT`].
    fn watch(&self) {
        let mut last = (self.channel.metrics.completions.load(Relaxed), Instant::now());
        while !self.stop.load(Relaxed) {
            std::thread::sleep(Duration::from_millis(200));
            let done = self.channel.metrics.completions.load(Relaxed);
            if done != last.0 || self.channel.outstanding() == 0 {
                last = (done, Instant::now());
            } else if last.1.elapsed() >= HANG_TIMEOUT {
                self.kill("stopped answering");
                last = (done, Instant::now());
            }
        }
    }

    /// End the running paging server (it is restarted).
    pub fn kill(&self, why: &str) {
        if let Some(s) = self.current.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            tracing::warn!("paging server {why}: stopping it");
            s.finish(Outcome::Crashed(format!("paging server {why}")));
        }
    }

    /// Stop the paging server for good and remove the paging devices.
    pub fn stop(&self) {
        self.stop.store(true, Relaxed);
        if let Some(s) = self.current.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            s.finish(Outcome::Stopped);
        }
        for t in self.threads.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            let _ = t.join();
        }
        for d in &self.devices {
            let _ = std::fs::remove_file(&d.path);
        }
    }

    /// Layout of paging device `i` (tests and tools).
    pub fn layout(&self, i: usize) -> Option<Layout> {
        self.devices.get(i).map(|d| Layout::for_slots(d.slots))
    }
}

#[cfg(test)]
#[path = "paging_server_tests.rs"]
mod tests;
