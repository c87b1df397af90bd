//! A partition: one KVM VM with its memory, devices, event loop and vCPU threads, built
//! in one fixed order (VM → memory → event manager → vCPUs → devices), run, and rebuilt
//! from scratch when the guest resets.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use amsvm_abi::{layout, DeviceInfo};
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::config::{PartitionRole, BootConfig, PartitionSpec};
use crate::devices::cmos;
use crate::devices::power::{self, AcpiPower, PowerEvent, PowerSink, ResetControl, I8042};
use crate::devices::serial::{ConsoleOut, SerialDevice, COM1_GSI, COM1_PORT};
use crate::devices::virtio::balloon::{BalloonHandle, VirtioBalloon};
use crate::devices::virtio::blk::VirtioBlock;
use crate::devices::virtio::vasi::VasiDevice;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::Bus;
use crate::kvm::vcpu::{self, BootKind, VcpuContext};
use crate::metrics::PartitionMetrics;
use crate::pager::local::LocalStore;
use crate::pool::{Attached, PartitionPool, PauseSink, Pool};
use crate::{Error, GuestMemory, Result};

/// How a partition run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A native image exited through the EXIT hypercall with this status.
    Exited(u64),
    /// The guest powered off (ACPI S5, HLT with nothing to wake it).
    PowerOff,
    /// The guest asked for a reset; the supervisor rebuilds it.
    Reset,
    /// The guest or KVM failed; the text says how.
    Crashed(String),
    /// Ended while paused because its paging device failed (nobody resumed it); the
    /// text names the device and error.
    Paused(String),
    /// amsvm stopped it.
    Stopped,
    /// Destroyed on the operator's request.
    Destroyed,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Exited(0) => write!(f, "exited ok"),
            Outcome::Exited(s) => write!(f, "exited with status {s}{}", exit_status_name(*s)),
            Outcome::PowerOff => write!(f, "powered off"),
            Outcome::Reset => write!(f, "reset"),
            Outcome::Crashed(why) => write!(f, "crashed: {why}"),
            Outcome::Paused(why) => write!(f, "paused: {why}"),
            Outcome::Stopped => write!(f, "stopped"),
            Outcome::Destroyed => write!(f, "destroyed on request"),
        }
    }
}

fn exit_status_name(s: u64) -> &'static str {
    use amsvm_abi::exit::*;
    match s {
        VERIFY_FAILED => " (verification failed)",
        BAD_CONFIG => " (bad settings)",
        DEVICE_ERROR => " (device error)",
        PANIC => " (panic)",
        _ => "",
    }
}

/// State shared by a partition's vCPU threads, devices and supervisor.
pub struct Shared {
    pub name: String,
    pub metrics: Arc<PartitionMetrics>,
    stop: AtomicBool,
    outcome: Mutex<Option<Outcome>>,
    done: Condvar,
    event: Mutex<bool>,
    event_cv: Condvar,
    start: Instant,
    epoch: Instant,
    /// Run when the guest calls WAIT, before it blocks or parks; true = there is work,
    /// return at once (the paging server hands over its completions this way).
    pre_wait: Mutex<Option<PreWait>>,
    /// Its memory in the pool, when it has one.
    pool: Mutex<Option<std::sync::Weak<PartitionPool>>>,
}

/// See [`Shared::set_pre_wait`].
pub type PreWait = Box<dyn Fn() -> bool + Send + Sync>;

impl Shared {
    pub fn new(name: &str, metrics: Arc<PartitionMetrics>, epoch: Instant) -> Arc<Self> {
        Arc::new(Shared {
            name: name.to_string(),
            metrics,
            stop: AtomicBool::new(false),
            outcome: Mutex::new(None),
            done: Condvar::new(),
            event: Mutex::new(false),
            event_cv: Condvar::new(),
            start: Instant::now(),
            epoch,
            pre_wait: Mutex::new(None),
            pool: Mutex::new(None),
        })
    }

    /// What the WAIT hypercall does first (see the field).
    pub fn set_pre_wait(&self, f: PreWait) {
        *self.pre_wait.lock().unwrap_or_else(|e| e.into_inner()) = Some(f);
    }

    /// Run the pre-WAIT work; true if it found work for the guest.
    pub fn pre_wait(&self) -> bool {
        self.pre_wait.lock().unwrap_or_else(|e| e.into_inner()).as_ref().is_some_and(|f| f())
    }

    /// Record how the partition ends (the first outcome wins) and stop it.
    pub fn finish(&self, o: Outcome) {
        let mut g = self.outcome.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_none() {
            *g = Some(o);
        }
        self.stop.store(true, Relaxed);
        self.done.notify_all();
        self.notify_event();
    }

    pub fn is_stopping(&self) -> bool {
        self.stop.load(Relaxed)
    }

    pub fn outcome(&self) -> Option<Outcome> {
        self.outcome.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn wait_outcome(&self) -> Outcome {
        let mut g = self.outcome.lock().unwrap_or_else(|e| e.into_inner());
        while g.is_none() {
            g = self.done.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        g.clone().unwrap()
    }

    /// Wake a vCPU blocked in the WAIT hypercall.
    pub fn notify_event(&self) {
        *self.event.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.event_cv.notify_all();
    }

    /// Take a pending event without blocking; true if there was one.
    pub fn take_event(&self) -> bool {
        std::mem::replace(&mut *self.event.lock().unwrap_or_else(|e| e.into_inner()), false)
    }

    /// Block until [`Shared::notify_event`] or `timeout`; true if an event arrived.
    pub fn wait_event(&self, timeout: Duration) -> bool {
        let g = self.event.lock().unwrap_or_else(|e| e.into_inner());
        let (mut g, _) = self
            .event_cv
            .wait_timeout_while(g, timeout, |ev| !*ev && !self.stop.load(Relaxed))
            .unwrap_or_else(|e| e.into_inner());
        std::mem::replace(&mut *g, false)
    }

    pub fn since_start_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    pub fn since_epoch_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }
}

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// A partition that is built and ready to start. Field order is drop order: vCPUs and
/// devices before the VM, the VM before its memory.
pub struct Partition {
    vcpus: Vec<VcpuFd>,
    event_manager: EventManager<Subscriber>,
    io: Bus,
    mmio: Bus,
    vm: Arc<VmFd>,
    pool: Option<Attached>,
    mem: GuestMemory,
    kind: BootKind,
    pub shared: Arc<Shared>,
    home: Option<usize>,
    /// The paging server's VASI channel: its vCPU is shared with the requesters.
    server_channel: Option<Arc<crate::devices::virtio::vasi::Channel>>,
}

/// What partitions need to draw their memory from the pool.
pub struct PoolContext {
    pub pool: Arc<Pool>,
    /// Where each partition's paging store file goes.
    pub paging_dir: PathBuf,
    /// The paging-server VM, with `[paging] backend = "vm"`.
    pub server: Option<Arc<crate::paging_server::PagingServer>>,
}

/// The virtio-mmio slot of device `i`.
pub fn device_slot(i: usize) -> (u64, u32) {
    (layout::MMIO_BASE + i as u64 * layout::MMIO_SIZE, layout::FIRST_DEVICE_IRQ + i as u32)
}

fn read_file(path: &Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })
        .and_then(|b| if b.is_empty() { Err(Error::Image { path: path.to_path_buf(), msg: format!("{what} is empty") }) } else { Ok(b) })
}

/// Open (creating when asked) the files behind a partition's disks, before any VM exists.
pub fn prepare_disks(spec: &PartitionSpec) -> Result<()> {
    for d in &spec.disks {
        if let Some(mib) = d.create_mib {
            if !d.path.exists() {
                let f = std::fs::File::create(&d.path).map_err(|source| Error::Io { path: d.path.clone(), source })?;
                f.set_len(mib << 20).map_err(|source| Error::Io { path: d.path.clone(), source })?;
            }
        }
        if !d.path.exists() {
            return Err(Error::Io {
                path: d.path.clone(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "disk image not found (set create_mib to create it)"),
            });
        }
    }
    Ok(())
}

impl Partition {
    /// Build a partition: nothing runs yet. On error everything built so far is dropped.
    pub fn build(
        kvm: &Kvm,
        spec: &PartitionSpec,
        shared: Arc<Shared>,
        workload_image: &[u8],
        pool: Option<&PoolContext>,
    ) -> Result<Partition> {
        // Read the boot image first: bad input fails before a VM exists.
        let kind = match spec.boot {
            BootConfig::Native { .. } => BootKind::Native,
            BootConfig::Linux { .. } => BootKind::Linux,
        };
        let native_image = match &spec.boot {
            _ if matches!(spec.role, PartitionRole::PagingServer(_)) => {
                Some((PathBuf::from("<built-in paging server>"), crate::images::paging_server_elf().to_vec()))
            }
            BootConfig::Native { image: Some(p), .. } => Some((p.clone(), read_file(p, "image")?)),
            BootConfig::Native { image: None, .. } => Some((PathBuf::from("<built-in workload>"), workload_image.to_vec())),
            BootConfig::Linux { .. } => None,
        };

        // Memory (drawn from the pool when there is one: attached before anything
        // touches it) and the VM.
        let mem = crate::kvm::memory::create(spec.mem_bytes, spec.huge_pages)?;
        let home = home_cpu(spec);
        let pool = match pool {
            None => None,
            Some(ctx) => {
                let pager: Arc<dyn crate::pager::Pager> = match &ctx.server {
                    Some(server) => Arc::new(server.pager(spec)),
                    None => {
                        let file = spec.paging_file.clone().unwrap_or_else(|| ctx.paging_dir.join(format!("{}.pages", spec.name)));
                        Arc::new(LocalStore::create(&file).map_err(|e| Error::Other(format!("paging store: {e}")))?)
                    }
                };
                let pager = Arc::new(crate::pager::Retrying::new(pager, shared.metrics.clone()));
                let (base, len) = crate::kvm::memory::host_ranges(&mem)[0];
                // A paused partition waits to be resumed (`PartitionControl::resume`)
                // or ended (by whoever supervises the run).
                let on_pause: PauseSink = Box::new(|_| {});
                let pp = PartitionPool::attach(
                    &ctx.pool,
                    &spec.name,
                    base,
                    len,
                    spec.min_bytes,
                    spec.weight,
                    spec.loan_policy,
                    pager,
                    shared.metrics.clone(),
                    on_pause,
                    home,
                )
                .map_err(|e| Error::Other(format!("pool: {e}")))?;
                pp.set_order(spec.id);
                *shared.pool.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::downgrade(&pp));
                Some(Attached(pp))
            }
        };
        // The pool's clock reads write references from KVM's dirty log, which maps guest
        // memory at 4 KiB only: not with huge pages (see `pool::huge`).
        let dirty_log = pool.as_ref().is_some_and(|a| !a.0.huge_pages());
        let vm = Arc::new(crate::kvm::vm::create(kvm, &mem, dirty_log)?);
        if let Some(att) = pool.as_ref().filter(|_| dirty_log) {
            // The pool's clock learns which resident pages the guest wrote from KVM's
            // dirty log (see `PartitionPool::set_reference_source`).
            let (vm, len) = (vm.clone(), spec.mem_bytes as usize);
            att.0.set_reference_source(Box::new(move || vm.get_dirty_log(0, len).ok()));
        }

        // Event manager.
        let mut event_manager: EventManager<Subscriber> =
            EventManager::new().map_err(|e| Error::Device(format!("event manager: {e:?}")))?;

        // vCPUs (after the irqchip, before devices that may touch LAPIC state).
        let mut vcpus = Vec::new();
        for id in 0..spec.vcpus {
            vcpus.push(vm.create_vcpu(id as u64).map_err(Error::kvm("KVM_CREATE_VCPU"))?);
        }

        // Devices.
        let mut io = Bus::new();
        let mut mmio = Bus::new();
        let sink: PowerSink = {
            let shared = shared.clone();
            Arc::new(move |e| {
                shared.finish(match e {
                    PowerEvent::PowerOff => Outcome::PowerOff,
                    PowerEvent::Reset => Outcome::Reset,
                })
            })
        };
        let bus_err = |e: crate::devices::BusError| Error::Device(e.to_string());
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| Error::Device(format!("eventfd: {e}")))?;
        vm.register_irqfd(&serial_irq, COM1_GSI).map_err(Error::kvm("KVM_IRQFD (serial)"))?;
        let append = shared.metrics.resets.load(Relaxed) > 0;
        let console = ConsoleOut::new(spec.log_path.as_deref(), append, spec.console_stdout.then(|| spec.name.clone()))
            .map_err(|source| Error::Io { path: spec.log_path.clone().unwrap_or_default(), source })?;
        io.insert(COM1_PORT, 8, Arc::new(Mutex::new(SerialDevice::new(serial_irq, console)))).map_err(bus_err)?;
        io.insert(power::ACPI_SLEEP_CONTROL_PORT, power::ACPI_PORTS_LEN, Arc::new(Mutex::new(AcpiPower(sink.clone()))))
            .map_err(bus_err)?;
        io.insert(cmos::CMOS_PORT, cmos::CMOS_PORTS_LEN, Arc::new(Mutex::new(cmos::Cmos::default()))).map_err(bus_err)?;
        io.insert(power::PCI_RESET_PORT, 1, Arc::new(Mutex::new(ResetControl(sink.clone())))).map_err(bus_err)?;
        io.insert(power::I8042_DATA_PORT, power::I8042_CMD_PORT - power::I8042_DATA_PORT + 1, Arc::new(Mutex::new(I8042(sink))))
            .map_err(bus_err)?;

        let mut devices = Vec::new();
        // The paging server: its VASI device first, its disks (the paging devices) after
        // it, every queue notification handled on its vCPU's exit.
        let inline = if let PartitionRole::PagingServer(channel) = &spec.role {
            let (base, gsi) = device_slot(0);
            let t = MmioTransport::new_inline(Box::new(VasiDevice::new(channel.clone())), mem.clone(), &vm, base, gsi)
                .map_err(|e| Error::Device(format!("paging server: VASI device: {e}")))?;
            shared.metrics.add_device(channel.metrics.clone());
            shared.metrics.add_device(t.metrics());
            let t = Arc::new(Mutex::new(t));
            mmio.insert(base, layout::MMIO_SIZE, t.clone()).map_err(bus_err)?;
            channel.attach_server(mem.clone(), &t, &shared);
            // Completions the paging server posted before a WAIT are taken then.
            let ch = Arc::downgrade(channel);
            shared.set_pre_wait(Box::new(move || ch.upgrade().is_some_and(|c| c.service() > 0)));
            devices.push(DeviceInfo { mmio_base: base, mmio_size: layout::MMIO_SIZE, device_id: paging_server::vasi::DEVICE_ID, irq: gsi });
            true
        } else {
            false
        };
        for (i, d) in spec.disks.iter().enumerate() {
            let (base, gsi) = device_slot(devices.len());
            let id = format!("{}-disk{i}", spec.name);
            let mut blk = VirtioBlock::new(&d.path, d.read_only, &id)
                .map_err(|e| Error::Device(format!("partition \"{}\": disk {}: {e}", spec.name, d.path.display())))?;
            if inline {
                blk.set_paging_device();
            }
            shared.metrics.add_device(blk.metrics());
            let t = if inline {
                MmioTransport::new_inline(Box::new(blk), mem.clone(), &vm, base, gsi)
            } else {
                MmioTransport::new(Box::new(blk), mem.clone(), &vm, base, gsi)
            }
            .map_err(|e| Error::Device(format!("partition \"{}\": virtio-mmio for disk {i}: {e}", spec.name)))?;
            shared.metrics.add_device(t.metrics());
            let t = Arc::new(Mutex::new(t));
            mmio.insert(base, layout::MMIO_SIZE, t.clone()).map_err(bus_err)?;
            if !inline {
                event_manager.add_subscriber(t);
            }
            devices.push(DeviceInfo { mmio_base: base, mmio_size: layout::MMIO_SIZE, device_id: 2, irq: gsi });
        }
        // A partition in a pool has a virtio-balloon: the cooperative path of the pool.
        if let Some(att) = &pool {
            let i = devices.len();
            let (base, gsi) = device_slot(i);
            let discard: Arc<dyn crate::devices::virtio::balloon::Discard> = att.0.clone();
            let balloon = VirtioBalloon::new(spec.mem_bytes, discard);
            let state = balloon.state();
            shared.metrics.add_device(state.clone());
            *shared.metrics.balloon.lock().unwrap_or_else(|e| e.into_inner()) = Some(state.clone());
            let t = MmioTransport::new(Box::new(balloon), mem.clone(), &vm, base, gsi)
                .map_err(|e| Error::Device(format!("partition \"{}\": virtio-mmio for the balloon: {e}", spec.name)))?;
            shared.metrics.add_device(t.metrics());
            let t = Arc::new(Mutex::new(t));
            att.0.set_balloon(BalloonHandle::new(state, &t));
            mmio.insert(base, layout::MMIO_SIZE, t.clone()).map_err(bus_err)?;
            event_manager.add_subscriber(t);
            devices.push(DeviceInfo { mmio_base: base, mmio_size: layout::MMIO_SIZE, device_id: 5, irq: gsi });
        }

        // Boot.
        match (&spec.boot, native_image) {
            (BootConfig::Native { workload, .. }, Some((path, bytes))) => {
                let bis = crate::kvm::native::BootInfoSpec {
                    partition_id: spec.id,
                    vcpus: spec.vcpus,
                    mem_bytes: spec.mem_bytes,
                    image_end: 0,
                    devices: &devices,
                    workload: *workload,
                };
                let img = crate::kvm::native::prepare(&mem, &path, &bytes, bis)?;
                if let Ok(khz) = vcpus[0].get_tsc_khz() {
                    shared.metrics.tsc_khz.store(khz as u64, Relaxed);
                }
                crate::kvm::vm::mask_legacy_pic(&vm)?;
                crate::kvm::native::setup_vcpu(kvm, &vcpus[0], img.entry)?;
            }
            (BootConfig::Linux { kernel, initrd, cmdline }, _) => {
                let image = crate::kvm::linux::LinuxImage {
                    kernel: kernel.clone(),
                    initrd: initrd.clone(),
                    cmdline: cmdline.clone(),
                };
                let slots: Vec<_> = devices
                    .iter()
                    .map(|d| crate::kvm::linux::VirtioMmioSlot { base: d.mmio_base, size: d.mmio_size, gsi: d.irq })
                    .collect();
                let boot = crate::kvm::linux::load(&mem, &image, spec.vcpus as u8, &slots)
                    .map_err(|e| Error::Other(e.to_string()))?;
                for (id, v) in vcpus.iter().enumerate() {
                    crate::kvm::linux::setup_vcpu(kvm, v, id as u8, spec.vcpus as u8, (id == 0).then_some(&boot))
                        .map_err(|e| Error::Other(e.to_string()))?;
                }
            }
            (BootConfig::Native { .. }, None) => unreachable!("native image read above"),
        }

        let server_channel = match &spec.role {
            PartitionRole::PagingServer(c) => Some(c.clone()),
            PartitionRole::Guest => None,
        };
        Ok(Partition { vcpus, event_manager, io, mmio, vm, pool, mem, kind, shared, home, server_channel })
    }

    /// Host address ranges `(start, len)` of this partition's guest RAM.
    pub fn guest_ranges(&self) -> Vec<(u64, u64)> {
        crate::kvm::memory::host_ranges(&self.mem)
    }

    /// Start the vCPU threads and the device event loop.
    pub fn start(self) -> Result<Running> {
        vcpu::install_kick_handler();
        let home = if self.pool.is_some() { self.home } else { None };
        let Partition { vcpus, mut event_manager, io, mmio, vm, pool, mem, kind, shared, server_channel, .. } = self;
        let mut threads = Vec::new();
        let em_shared = shared.clone();
        let em = std::thread::Builder::new()
            .name(format!("{}-dev", shared.name))
            .spawn(move || {
                crate::seccomp::apply(crate::seccomp::Kind::Device);
                while !em_shared.is_stopping() {
                    if let Err(e) = event_manager.run_with_timeout(50) {
                        em_shared.finish(Outcome::Crashed(format!("device event loop failed: {e:?}")));
                    }
                }
            })
            .map_err(|e| Error::Other(format!("cannot start device thread: {e}")))?;
        let mut shared_vcpu = None;
        for (id, mut fd) in vcpus.into_iter().enumerate() {
            let ctx = VcpuContext {
                id: id as u32,
                kind,
                io: io.clone(),
                mmio: mmio.clone(),
                mem: mem.clone(),
                shared: shared.clone(),
                park_on_wait: false,
            };
            let body: Box<dyn FnOnce() + Send> = match &server_channel {
                // The paging server (one vCPU): requesters may run it themselves.
                Some(channel) => {
                    let sv = Arc::new(vcpu::SharedVcpu::new(fd, ctx));
                    channel.attach_vcpu(&sv);
                    let me = sv.clone();
                    shared_vcpu = Some(sv);
                    // Its devices run inline on it (paging I/O), as when a pager runs it.
                    Box::new(move || {
                        crate::seccomp::apply(crate::seccomp::Kind::Pager);
                        me.serve()
                    })
                }
                None => {
                    let pp = pool.as_ref().map(|a| a.0.clone());
                    Box::new(move || {
                    if let Some(cpu) = home {
                        pin_current_thread(cpu);
                    }
                    if let Some(pp) = pp {
                        // SAFETY: gettid has no arguments and cannot fail.
                        pp.add_vcpu_thread(unsafe { libc::gettid() });
                    }
                    crate::seccomp::apply(crate::seccomp::Kind::Vcpu);
                    vcpu::run(&mut fd, &ctx)
                })
                }
            };
            let t = std::thread::Builder::new()
                .name(format!("{}-vcpu{id}", shared.name))
                .spawn(body)
                .map_err(|e| Error::Other(format!("cannot start vCPU thread: {e}")))?;
            threads.push(t);
        }
        Ok(Running { threads, em: Some(em), shared, shared_vcpu, _vm: vm, _pool: pool, _mem: mem })
    }
}

/// A started partition.
pub struct Running {
    threads: Vec<JoinHandle<()>>,
    em: Option<JoinHandle<()>>,
    pub shared: Arc<Shared>,
    /// The paging server's vCPU, which other threads may be running.
    shared_vcpu: Option<Arc<vcpu::SharedVcpu>>,
    // Drop order: the VM, then the pool attachment, then guest memory.
    _vm: Arc<VmFd>,
    _pool: Option<Attached>,
    _mem: GuestMemory,
}

impl Running {
    /// Wait for the partition to end; kicks every vCPU out of the guest and joins all
    /// threads before returning.
    pub fn wait(mut self) -> Outcome {
        let outcome = self.shared.wait_outcome();
        use std::os::unix::thread::JoinHandleExt;
        for t in self.threads.drain(..) {
            while !t.is_finished() {
                // SAFETY: the thread is alive (not finished, not joined) so its pthread
                // handle is valid; the kick signal has a no-op handler installed.
                unsafe { libc::pthread_kill(t.as_pthread_t(), vcpu::kick_signal()) };
                if let Some(sv) = &self.shared_vcpu {
                    sv.kick();
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            let _ = t.join();
        }
        if let Some(em) = self.em.take() {
            let _ = em.join();
        }
        outcome
    }
}

/// The end of a partition's life, as `amsvm run` reports it.
#[derive(Debug, Clone)]
pub struct Report {
    pub name: String,
    pub outcome: Outcome,
    pub metrics: Arc<PartitionMetrics>,
}

/// Resets tolerated before a partition is declared to be in a reset loop.
pub const MAX_RESETS: u64 = 16;

/// Ends, resumes or looks at a supervised partition from outside, whatever incarnation
/// is running.
#[derive(Default)]
pub struct PartitionControl {
    /// How it was ended from outside, once it was.
    ended: Mutex<Option<Outcome>>,
    current: Mutex<Option<Arc<Shared>>>,
}

impl std::fmt::Debug for PartitionControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartitionControl").field("ended", &*self.ended.lock().unwrap_or_else(|e| e.into_inner())).finish_non_exhaustive()
    }
}

impl PartitionControl {
    /// Stop it (amsvm is stopping).
    pub fn stop(&self) {
        self.end(Outcome::Stopped);
    }

    /// Destroy it on the operator's request: its vCPUs stop wherever they are (in a
    /// page-in too), its memory and paging device go back to the pool.
    pub fn destroy(&self) {
        self.end(Outcome::Destroyed);
    }

    /// End it with `o` (a paused partition ends as paused, with its reason).
    fn end(&self, o: Outcome) {
        let o = match (o, self.paused()) {
            (Outcome::Stopped, Some(why)) => Outcome::Paused(why),
            (o, _) => o,
        };
        self.ended.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(o.clone());
        if let Some(s) = self.current.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            s.finish(o);
        }
    }

    fn is_ended(&self) -> bool {
        self.ended.lock().unwrap_or_else(|e| e.into_inner()).is_some()
    }

    /// Why the running incarnation is paused, if it is.
    pub fn paused(&self) -> Option<String> {
        let cur = self.current.lock().unwrap_or_else(|e| e.into_inner()).clone()?;
        let why = cur.metrics.paused.lock().unwrap_or_else(|e| e.into_inner()).clone();
        why.filter(|_| !cur.is_stopping())
    }

    /// Resume it after a pause (see [`crate::pool::PartitionPool::resume`]).
    pub fn resume(&self) -> std::result::Result<(), String> {
        let cur = self.current.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let pool = cur.filter(|s| !s.is_stopping()).and_then(|s| s.pool.lock().unwrap_or_else(|e| e.into_inner()).as_ref().and_then(|w| w.upgrade()));
        match pool {
            None => Err("it is not running in a pool".to_string()),
            Some(p) if p.resume() => Ok(()),
            Some(_) => Err("it is not paused".to_string()),
        }
    }

    fn set_current(&self, s: Arc<Shared>) {
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = Some(s.clone());
        if let Some(o) = self.ended.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            s.finish(o);
        }
    }
}

/// Run a built partition and rebuild it on every reset until it ends.
pub fn supervise(
    kvm: &Kvm,
    spec: &PartitionSpec,
    first: Partition,
    epoch: Instant,
    workload_image: &[u8],
    pool: Option<&PoolContext>,
    ctl: &PartitionControl,
) -> Report {
    let metrics = first.shared.metrics.clone();
    let mut next = Some(first);
    loop {
        let built = match next.take() {
            Some(p) => Ok(p),
            None => Partition::build(kvm, spec, Shared::new(&spec.name, metrics.clone(), epoch), workload_image, pool),
        };
        let outcome = match built {
            Err(e) => Outcome::Crashed(format!("rebuild after reset failed: {e}")),
            Ok(p) => {
                let shared = p.shared.clone();
                match p.start() {
                    Err(e) => Outcome::Crashed(e.to_string()),
                    Ok(running) => {
                        ctl.set_current(shared);
                        running.wait()
                    }
                }
            }
        };
        if outcome == Outcome::Reset && !ctl.is_ended() {
            let n = metrics.resets.fetch_add(1, Relaxed) + 1;
            if n <= MAX_RESETS {
                tracing::info!(partition = %spec.name, "reset #{n}: rebuilding the partition");
                continue;
            }
            return Report { name: spec.name.clone(), outcome: Outcome::Crashed(format!("reset loop: {n} resets")), metrics };
        }
        return Report { name: spec.name.clone(), outcome, metrics };
    }
}

/// The CPU a single-vCPU partition's vCPU thread and pool fault handler share: one of the
/// CPUs this process may run on, round robin by partition id. A fault then wakes its
/// handler, and the handler the vCPU, on one CPU with no cross-CPU wake-up: measured
/// here, that halves the userfaultfd round trip (88 to 38 µs p50, `amsvm bench pool`).
/// Partitions with several vCPUs are not pinned (they would lose their parallelism).
pub fn home_cpu(spec: &PartitionSpec) -> Option<usize> {
    if spec.vcpus != 1 {
        return None;
    }
    // SAFETY: sched_getaffinity fills the zeroed set we own for the calling thread's process.
    let allowed: Vec<usize> = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return None;
        }
        (0..libc::CPU_SETSIZE as usize).filter(|&c| libc::CPU_ISSET(c, &set)).collect()
    };
    if allowed.is_empty() {
        return None;
    }
    Some(allowed[spec.id as usize % allowed.len()])
}

/// Run the calling thread on `cpu` only (best effort: a failure leaves it unpinned).
pub fn pin_current_thread(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t with one bit set, applied to the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            tracing::debug!("cannot pin a thread to CPU {cpu}: {}", std::io::Error::last_os_error());
        }
    }
}
