//! VASI, amsvm's side: the virtio-mmio device through which the hypervisor asks the
//! paging-server VM for paging I/O (`docs/vasi.md`), and the [`Channel`] the pagers of
//! the partitions submit requests to.
//!
//! - A pager takes transfer-window pages, copies page-out data into them, submits a
//!   request and waits for its completion (copying page-in data out).
//! - The device hands queued requests to the paging server whenever it has request
//!   buffers available, wakes it (it idles in the WAIT hypercall), and routes
//!   completions back to the waiting pagers.
//! - When the paging server is restarted, requests it had not completed are handed back
//!   to their pagers, which copy their data into the new window and submit them again.
//!
//! Lock order: a transport's lock, then the channel's. Pagers never hold the channel's
//! lock while they take the transport's.

use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use paging_server::vasi::{self, Completion, Request, COMPLETION_BYTES, REQUEST_BYTES};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend as _};

use super::mmio::MmioTransport;
use super::{guest_caused_warning, read_config_image, VirtioDevice, VirtioError, VirtioInterrupt, VIRTIO_F_VERSION_1};
use crate::kvm::vcpu::SharedVcpu;
use crate::partition::Shared;
use crate::GuestMemory;

const NAME: &str = "vasi";
const QUEUE_SIZE: u16 = 64;

/// Counters of the channel (both directions).
#[derive(Debug, Default)]
pub struct VasiMetrics {
    pub requests: AtomicU64,
    pub completions: AtomicU64,
    /// Requests the paging server answered "bad request" (it found them malformed).
    pub refused_by_server: AtomicU64,
    /// Requests that failed on the paging device (I/O error, no space).
    pub io_errors: AtomicU64,
    /// Completions and buffers from the paging server that amsvm rejected: unknown id,
    /// unknown status, a malformed buffer.
    pub rejected: AtomicU64,
    /// Requests submitted again after a restart of the paging server.
    pub resubmitted: AtomicU64,
    /// Restarts of the paging server.
    pub restarts: AtomicU64,
}

impl crate::metrics::DeviceCounters for VasiMetrics {
    fn rejected(&self) -> u64 {
        self.rejected.load(Relaxed)
    }
}

/// Where a submitted request is.
#[derive(Debug)]
enum State {
    /// Waiting for a request buffer of the paging server.
    Queued,
    /// In the paging server's hands.
    Delivered,
    Done(Completion),
    /// The paging server restarted before completing it: its pager submits it again.
    Lost,
}

struct Inner {
    next_id: u64,
    queued: VecDeque<Request>,
    requests: HashMap<u64, State>,
    /// Free transfer-window pages.
    window_free: Vec<u32>,
    /// The paging server's memory and where the window is in it (None while it is down).
    mem: Option<GuestMemory>,
    /// Bumped at every restart.
    generation: u64,
}

/// The queue of paging requests between the partitions' pagers and the paging server.
pub struct Channel {
    inner: Mutex<Inner>,
    cv: Condvar,
    pub window_gpa: u64,
    pub window_pages: u32,
    pub config: vasi::Config,
    pub metrics: Arc<VasiMetrics>,
    /// The running paging server: its VASI transport (to hand over requests) and its
    /// shared state (to wake it).
    server: Mutex<(Weak<Mutex<MmioTransport>>, Weak<Shared>)>,
    /// The running paging server's vCPU, which a requester may run itself.
    vcpu: Mutex<Weak<SharedVcpu>>,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel").field("window_pages", &self.window_pages).field("devices", &self.config.devices).finish_non_exhaustive()
    }
}

/// A request's outcome as its pager sees it.
pub enum Outcome {
    Done(Completion),
    /// The paging server restarted: copy the data again and resubmit.
    Lost,
}

impl Channel {
    pub fn new(window_gpa: u64, window_pages: u32, partition_ids: &[u32]) -> Arc<Channel> {
        let mut ids = [0u32; vasi::MAX_DEVICES];
        ids[..partition_ids.len()].copy_from_slice(partition_ids);
        Arc::new(Channel {
            inner: Mutex::new(Inner {
                next_id: 1,
                queued: VecDeque::new(),
                requests: HashMap::new(),
                window_free: (0..window_pages).rev().collect(),
                mem: None,
                generation: 0,
            }),
            cv: Condvar::new(),
            window_gpa,
            window_pages,
            config: vasi::Config { window_gpa, window_pages, devices: partition_ids.len() as u32, partition_ids: ids },
            metrics: Arc::new(VasiMetrics::default()),
            server: Mutex::new((Weak::new(), Weak::new())),
            vcpu: Mutex::new(Weak::new()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A (re)started paging server: its memory, VASI transport and shared state. Requests
    /// the previous one had not completed are handed back to their pagers.
    pub fn attach_server(&self, mem: GuestMemory, transport: &Arc<Mutex<MmioTransport>>, shared: &Arc<Shared>) {
        *self.server.lock().unwrap_or_else(|e| e.into_inner()) = (Arc::downgrade(transport), Arc::downgrade(shared));
        let mut g = self.lock();
        if g.generation > 0 {
            self.metrics.restarts.fetch_add(1, Relaxed);
        }
        g.generation += 1;
        g.mem = Some(mem);
        g.queued.clear();
        for st in g.requests.values_mut() {
            if matches!(st, State::Queued | State::Delivered) {
                *st = State::Lost;
            }
        }
        drop(g);
        self.cv.notify_all();
    }

    /// The (re)started paging server's vCPU, once it runs.
    pub fn attach_vcpu(&self, v: &Arc<SharedVcpu>) {
        *self.vcpu.lock().unwrap_or_else(|e| e.into_inner()) = Arc::downgrade(v);
    }

    /// The paging server's memory without a running paging server (fuzzing).
    #[doc(hidden)]
    pub fn attach_memory(&self, mem: GuestMemory) {
        self.lock().mem = Some(mem);
    }

    /// Queue a request without waiting for it (fuzzing: requests for the device to
    /// hand out).
    #[doc(hidden)]
    pub fn queue_request(&self, mut req: Request) {
        let mut g = self.lock();
        req.id = g.next_id;
        g.next_id += 1;
        g.requests.insert(req.id, State::Queued);
        g.queued.push_back(req);
    }

    /// The paging server is gone (until [`attach_server`](Self::attach_server)).
    pub fn detach_server(&self) {
        *self.vcpu.lock().unwrap_or_else(|e| e.into_inner()) = Weak::new();
        *self.server.lock().unwrap_or_else(|e| e.into_inner()) = (Weak::new(), Weak::new());
        self.lock().mem = None;
    }

    /// Take `n` contiguous window pages (waits for them); their first page.
    pub fn take_window(&self, n: u32) -> u32 {
        let mut g = self.lock();
        loop {
            // Contiguous runs: the free list is kept sorted descending, so look for n
            // consecutive values.
            if let Some(first) = take_run(&mut g.window_free, n) {
                return first;
            }
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }

    pub fn give_window(&self, first: u32, n: u32) {
        let mut g = self.lock();
        g.window_free.extend(first..first + n);
        g.window_free.sort_unstable_by(|a, b| b.cmp(a));
        drop(g);
        self.cv.notify_all();
    }

    /// The memory of paging server `generation`, if that one is still the running one.
    /// (A clone keeps it mapped even if that server ends meanwhile.)
    fn mem_of(&self, generation: u64) -> Option<GuestMemory> {
        let g = self.lock();
        g.mem.clone().filter(|_| g.generation == generation)
    }

    /// Copy `data` into the window of paging server `generation` from page `first`
    /// (false if that server is down or was replaced: a window filled for one server
    /// must never be handed to the next, whose window holds something else).
    pub fn write_window(&self, generation: u64, first: u32, data: &[&[u8]]) -> bool {
        let Some(mem) = self.mem_of(generation) else { return false };
        data.iter().enumerate().all(|(k, d)| {
            mem.write_slice(&d[..4096], GuestAddress(self.window_gpa + (first as u64 + k as u64) * 4096)).is_ok()
        })
    }

    /// Copy `buf.len()` bytes out of the window of paging server `generation` from page
    /// `first` (false if that server was replaced before the copy began: the data it
    /// read is in the old server's window, not in the new one's).
    pub fn read_window(&self, generation: u64, first: u32, buf: &mut [u8]) -> bool {
        let Some(mem) = self.mem_of(generation) else { return false };
        mem.read_slice(buf, GuestAddress(self.window_gpa + first as u64 * 4096)).is_ok()
    }

    /// The running paging server's generation (bumped at every restart).
    pub fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// Wait until a paging server is attached (or `timeout`); its generation.
    pub fn wait_up(&self, timeout: Duration) -> Option<u64> {
        let deadline = Instant::now() + timeout;
        let mut g = self.lock();
        while g.mem.is_none() {
            let left = deadline.checked_duration_since(Instant::now())?;
            g = self.cv.wait_timeout(g, left).unwrap_or_else(|e| e.into_inner()).0;
        }
        Some(g.generation)
    }

    /// Submit a request (its `id` is set here) to paging server `generation` and wait
    /// for its outcome. `Lost` at once if that server was replaced already: the window
    /// it was prepared in is not the running server's. (Submitted while that server is
    /// down, it is handed back as `Lost` when the next one attaches.)
    pub fn call(&self, generation: u64, mut req: Request) -> Outcome {
        let id = {
            let mut g = self.lock();
            if g.generation != generation {
                drop(g);
                self.metrics.resubmitted.fetch_add(1, Relaxed);
                return Outcome::Lost;
            }
            let id = g.next_id;
            g.next_id += 1;
            req.id = id;
            g.queued.push_back(req);
            g.requests.insert(id, State::Queued);
            id
        };
        self.metrics.requests.fetch_add(1, Relaxed);
        // Serve it on this thread if the paging server is idle; else wake it.
        let vcpu = self.vcpu.lock().unwrap_or_else(|e| e.into_inner()).upgrade();
        if !vcpu.is_some_and(|v| v.try_run(|| self.deliver() > 0)) {
            self.kick();
        }
        let mut g = self.lock();
        loop {
            match g.requests.get(&id) {
                Some(State::Done(_)) | Some(State::Lost) => break,
                _ => {}
            }
            g = self.cv.wait_timeout(g, Duration::from_millis(100)).unwrap_or_else(|e| e.into_inner()).0;
        }
        match g.requests.remove(&id) {
            Some(State::Done(c)) => Outcome::Done(c),
            _ => {
                self.metrics.resubmitted.fetch_add(1, Relaxed);
                Outcome::Lost
            }
        }
    }

    /// The oldest request the paging server holds, and how long it has been waiting:
    /// for noticing a paging server that stopped answering.
    pub fn outstanding(&self) -> usize {
        let g = self.lock();
        g.requests.values().filter(|s| matches!(s, State::Queued | State::Delivered)).count()
    }

    /// Take the completions the paging server posted and hand it queued requests (it
    /// calls this on its vCPU's thread before a WAIT); the number of requests delivered.
    pub fn service(&self) -> usize {
        self.with_device(|d| {
            if let Err(e) = d.take_completions() {
                d.reject(format_args!("completions taken at WAIT: {e}"));
            }
            d.pump()
        })
        .unwrap_or(0)
    }

    /// Put queued requests into the paging server's request buffers; how many.
    fn deliver(&self) -> usize {
        self.with_device(VasiDevice::pump).unwrap_or(0)
    }

    /// Run `f` on the running paging server's VASI device, under its transport's lock.
    fn with_device<R>(&self, f: impl FnOnce(&mut VasiDevice) -> R) -> Option<R> {
        let t = self.server.lock().unwrap_or_else(|e| e.into_inner()).0.upgrade()?;
        let mut t = t.lock().unwrap_or_else(|e| e.into_inner());
        t.device_mut().as_any_mut().downcast_mut::<VasiDevice>().map(f)
    }

    /// Hand queued requests to the paging server if it has buffers for them, and wake it.
    fn kick(&self) {
        let shared = self.server.lock().unwrap_or_else(|e| e.into_inner()).1.upgrade();
        let delivered = self.deliver();
        if delivered > 0 {
            if let Some(sh) = shared {
                sh.notify_event();
            }
        }
    }

    /// Next queued request, if any (the device calls this with a buffer in hand).
    fn next_queued(&self) -> Option<Request> {
        let mut g = self.lock();
        let r = g.queued.pop_front()?;
        if let Some(st) = g.requests.get_mut(&r.id) {
            *st = State::Delivered;
        }
        Some(r)
    }

    /// A request taken by [`next_queued`](Self::next_queued) could not be delivered.
    fn requeue_front(&self, r: Request) {
        let mut g = self.lock();
        if let Some(st) = g.requests.get_mut(&r.id) {
            *st = State::Queued;
        }
        g.queued.push_front(r);
    }

    /// A completion from the paging server; false if no request waits for it.
    fn complete(&self, c: Completion) -> bool {
        let mut g = self.lock();
        match g.requests.get_mut(&c.id) {
            Some(st @ State::Delivered) => {
                *st = State::Done(c);
                drop(g);
                self.metrics.completions.fetch_add(1, Relaxed);
                match c.status {
                    vasi::status::BAD_REQUEST => {
                        self.metrics.refused_by_server.fetch_add(1, Relaxed);
                    }
                    vasi::status::IO_ERROR | vasi::status::NO_SPACE => {
                        self.metrics.io_errors.fetch_add(1, Relaxed);
                    }
                    _ => {}
                }
                self.cv.notify_all();
                true
            }
            _ => false,
        }
    }
}

/// Take `n` consecutive values from a descending list; the lowest of them.
fn take_run(free: &mut Vec<u32>, n: u32) -> Option<u32> {
    let n = n as usize;
    if n == 0 || free.len() < n {
        return None;
    }
    // Descending: a run of n consecutive pages is free[i..i+n] with free[i] - free[i+n-1] == n-1.
    let i = (0..=free.len() - n).rev().find(|&i| free[i] - free[i + n - 1] == (n - 1) as u32)?;
    let first = free[i + n - 1];
    free.drain(i..i + n);
    Some(first)
}

struct Active {
    mem: GuestMemory,
    requests: Queue,
    completions: Queue,
    interrupt: Arc<VirtioInterrupt>,
}

/// The VASI device of the paging-server VM.
pub struct VasiDevice {
    channel: Arc<Channel>,
    acked: u64,
    queue_sizes: [u16; 2],
    active: Option<Active>,
}

impl VasiDevice {
    pub fn new(channel: Arc<Channel>) -> VasiDevice {
        VasiDevice { channel, acked: 0, queue_sizes: [QUEUE_SIZE; 2], active: None }
    }

    fn reject(&self, why: std::fmt::Arguments<'_>) {
        let n = self.channel.metrics.rejected.fetch_add(1, Relaxed);
        guest_caused_warning(n, format_args!("{NAME}: rejected: {why}"));
    }

    /// Fill request buffers with queued requests; returns how many were delivered.
    fn pump(&mut self) -> usize {
        if self.active.is_none() {
            return 0;
        }
        let mut delivered = 0;
        loop {
            if self.channel.lock().queued.is_empty() {
                break;
            }
            let a = self.active.as_mut().expect("active");
            let chain = match a.requests.iter(&a.mem) {
                Ok(mut it) => it.next(),
                Err(_) => None,
            };
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let mem = a.mem.clone();
            // One device-writable descriptor of at least REQUEST_BYTES, inside memory.
            let descs: Vec<_> = chain.take(2).collect();
            let ok = descs.len() == 1
                && descs[0].is_write_only()
                && descs[0].len() as usize >= REQUEST_BYTES
                && mem.check_range(descs[0].addr(), REQUEST_BYTES);
            if !ok {
                self.reject(format_args!("request buffer {head} is not one device-writable buffer of {REQUEST_BYTES} bytes"));
                let a = self.active.as_mut().expect("active");
                let _ = a.requests.add_used(&a.mem, head, 0);
                continue;
            }
            let Some(req) = self.channel.next_queued() else {
                // Raced with nothing: return the buffer unused (length 0 means "no
                // request"; the paging server makes it available again).
                let a = self.active.as_mut().expect("active");
                let _ = a.requests.add_used(&a.mem, head, 0);
                break;
            };
            if mem.write_slice(&req.encode(), descs[0].addr()).is_err() {
                self.channel.requeue_front(req);
                break;
            }
            let a = self.active.as_mut().expect("active");
            if a.requests.add_used(&a.mem, head, REQUEST_BYTES as u32).is_err() {
                self.channel.requeue_front(req);
                break;
            }
            delivered += 1;
        }
        if delivered > 0 {
            if let Some(a) = self.active.as_ref() {
                let _ = a.interrupt.signal_used_queue();
            }
        }
        delivered
    }

    fn take_completions(&mut self) -> Result<(), VirtioError> {
        loop {
            let Some(a) = self.active.as_mut() else { return Ok(()) };
            let mem = a.mem.clone();
            let chain = a.completions.iter(&mem).map_err(|source| VirtioError::Queue { device: NAME, queue: 1, source })?.next();
            let Some(chain) = chain else { return Ok(()) };
            let head = chain.head_index();
            let mut bytes = Vec::new();
            let mut bad = None;
            for (n, d) in chain.enumerate() {
                if n >= 16 {
                    bad = Some("more than 16 descriptors");
                    break;
                }
                let len = d.len() as usize;
                if d.is_write_only() || !len.is_multiple_of(COMPLETION_BYTES) || bytes.len() + len > 64 * COMPLETION_BYTES {
                    bad = Some("not device-readable whole completions");
                    break;
                }
                let start = bytes.len();
                bytes.resize(start + len, 0);
                if mem.read_slice(&mut bytes[start..], d.addr()).is_err() {
                    bad = Some("outside the paging server's memory");
                    break;
                }
            }
            match bad {
                Some(why) => self.reject(format_args!("completion buffer {head}: {why}")),
                None => {
                    for rec in bytes.chunks_exact(COMPLETION_BYTES) {
                        match Completion::decode(rec) {
                            Ok(c) => {
                                if !self.channel.complete(c) {
                                    self.reject(format_args!("completion of request {}, which is not outstanding", c.id));
                                }
                            }
                            Err(e) => self.reject(format_args!("completion: {e:?}")),
                        }
                    }
                }
            }
            let a = self.active.as_mut().expect("active");
            a.completions.add_used(&mem, head, 0).map_err(|source| VirtioError::Queue { device: NAME, queue: 1, source })?;
        }
    }
}

impl VirtioDevice for VasiDevice {
    fn device_type(&self) -> u32 {
        vasi::DEVICE_ID
    }

    fn name(&self) -> &'static str {
        NAME
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn device_features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features & self.device_features();
    }

    fn acked_features(&self) -> u64 {
        self.acked
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_image(&self.channel.config.encode(), offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        tracing::debug!("{NAME}: ignored config write at {offset:#x}");
    }

    fn activate(&mut self, mem: GuestMemory, mut queues: Vec<Queue>, interrupt: Arc<VirtioInterrupt>) -> Result<(), VirtioError> {
        if queues.len() != 2 || !queues.iter().all(|q| q.ready()) {
            return Err(VirtioError::Activate { device: NAME, reason: "both queues must be enabled".into() });
        }
        let completions = queues.pop().expect("two queues");
        let requests = queues.pop().expect("two queues");
        self.active = Some(Active { mem, requests, completions, interrupt });
        Ok(())
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked = 0;
    }

    fn process_queue(&mut self, index: usize) -> Result<(), VirtioError> {
        match index as u16 {
            vasi::REQUEST_QUEUE => {
                self.pump();
                Ok(())
            }
            vasi::COMPLETION_QUEUE => {
                // Request buffers come back before their completions: fill them again.
                let r = self.take_completions();
                self.pump();
                r
            }
            _ => Err(VirtioError::InvalidQueue { device: NAME, queue: index, reason: "no such queue".into() }),
        }
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_runs() {
        let mut f: Vec<u32> = (0..8).rev().collect();
        assert_eq!(take_run(&mut f, 3), Some(0));
        assert_eq!(take_run(&mut f, 5), Some(3));
        assert_eq!(take_run(&mut f, 1), None);
        let mut f = vec![9, 8, 6, 5, 4, 1];
        assert_eq!(take_run(&mut f, 3), Some(4));
        assert_eq!(f, vec![9, 8, 1]);
        assert_eq!(take_run(&mut f, 2), Some(8));
        assert_eq!(take_run(&mut f, 2), None);
    }
}

#[cfg(test)]
mod device_tests {
    //! The device against a test driver (virtio-queue's mock queues): requests go into
    //! the paging server's buffers, completions come back to their callers, and every
    //! malformed buffer or completion is rejected and counted.

    use super::*;
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;

    const MEM: u64 = 16 << 20;

    fn mem() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap()
    }

    fn desc(addr: u64, len: u32, writable: bool) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, if writable { VRING_DESC_F_WRITE as u16 } else { 0 }, 0))
    }

    #[test]
    fn requests_reach_the_server_and_completions_their_callers() {
        let m = mem();
        let channel = Channel::new(MEM - 64 * 4096, 64, &[0, 1]);
        let mut dev = VasiDevice::new(channel.clone());
        let rq = MockSplitQueue::create(&m, GuestAddress(0), QUEUE_SIZE);
        let cq = MockSplitQueue::create(&m, GuestAddress(0x1_0000), QUEUE_SIZE);
        dev.ack_features(1 << VIRTIO_F_VERSION_1);
        let irq = Arc::new(VirtioInterrupt::new().unwrap());
        dev.activate(m.clone(), vec![rq.create_queue().unwrap(), cq.create_queue().unwrap()], irq).unwrap();
        // A caller submits while the server has no buffer yet: the request waits.
        let caller = {
            let ch = channel.clone();
            std::thread::spawn(move || match ch.call(ch.generation(), Request::new(0, vasi::op::PAGE_IN, 1, 3, &[7, 8])) {
                Outcome::Done(c) => c,
                Outcome::Lost => panic!("lost"),
            })
        };
        while channel.lock().queued.is_empty() {
            std::thread::yield_now();
        }
        // The server posts a too-small buffer (rejected, returned) and a good one.
        rq.add_desc_chains(&[desc(0x20_0000, 64, true), desc(0x20_1000, REQUEST_BYTES as u32, true)], 0).unwrap();
        dev.process_queue(0).unwrap();
        assert_eq!(channel.metrics.rejected.load(Relaxed), 1);
        assert_eq!(rq.used().idx().load(), 2);
        let mut b = [0u8; REQUEST_BYTES];
        m.read_slice(&mut b, GuestAddress(0x20_1000)).unwrap();
        let req = Request::decode(&b).unwrap();
        assert_eq!((req.op, req.device, req.window_page, req.slots()), (vasi::op::PAGE_IN, 1, 3, &[7u32, 8][..]));
        // Completions: one for nobody, one with a bad status, a device-writable buffer,
        // then the real one.
        let bogus = Completion { id: req.id + 100, status: vasi::status::OK, count: 2 }.encode();
        let mut bad_status = Completion { id: req.id, status: vasi::status::OK, count: 2 }.encode();
        bad_status[8] = 77;
        m.write_slice(&bogus, GuestAddress(0x30_0000)).unwrap();
        m.write_slice(&bad_status, GuestAddress(0x30_0010)).unwrap();
        cq.add_desc_chains(&[desc(0x30_0000, 32, false), desc(0x30_0100, 16, true)], 0).unwrap();
        dev.process_queue(1).unwrap();
        assert_eq!(channel.metrics.rejected.load(Relaxed), 4, "unknown id, unknown status, writable buffer");
        assert!(!caller.is_finished());
        let good = Completion { id: req.id, status: vasi::status::OK, count: 2 }.encode();
        m.write_slice(&good, GuestAddress(0x30_0200)).unwrap();
        cq.add_desc_chains(&[desc(0x30_0200, 16, false)], 2).unwrap();
        dev.process_queue(1).unwrap();
        let c = caller.join().unwrap();
        assert_eq!((c.status, c.count), (vasi::status::OK, 2));
        assert_eq!(channel.metrics.completions.load(Relaxed), 1);
        // A second completion of the same request is no longer expected.
        cq.add_desc_chains(&[desc(0x30_0200, 16, false)], 3).unwrap();
        dev.process_queue(1).unwrap();
        assert_eq!(channel.metrics.rejected.load(Relaxed), 5);
    }

    #[test]
    fn a_restart_hands_requests_back_to_their_callers() {
        let m = mem();
        let channel = Channel::new(MEM - 4096, 1, &[0]);
        let caller = {
            let ch = channel.clone();
            std::thread::spawn(move || matches!(ch.call(ch.generation(), Request::new(0, vasi::op::FLUSH, 0, 0, &[])), Outcome::Lost))
        };
        while channel.lock().queued.is_empty() {
            std::thread::yield_now();
        }
        let t = Arc::new(Mutex::new(crate::devices::virtio::mmio::MmioTransport::for_tests(Box::new(VasiDevice::new(channel.clone())), m.clone())));
        let shared = Shared::new("ps", Arc::default(), Instant::now());
        channel.attach_server(m, &t, &shared);
        assert!(caller.join().unwrap(), "the caller learns its request was lost and submits it again");
    }

    /// A window filled for one paging server is never handed to the next one: after a
    /// restart the old generation's window can neither be written nor read, and a
    /// request prepared in it comes back `Lost` without reaching the new server.
    #[test]
    fn windows_and_requests_are_bound_to_the_server_they_were_prepared_for() {
        let channel = Channel::new(MEM - 4096, 1, &[0]);
        let attach = |m: &GuestMemory| {
            let t = Arc::new(Mutex::new(crate::devices::virtio::mmio::MmioTransport::for_tests(Box::new(VasiDevice::new(channel.clone())), m.clone())));
            let shared = Shared::new("ps", Arc::default(), Instant::now());
            channel.attach_server(m.clone(), &t, &shared);
            (t, shared)
        };
        let (old, new) = (mem(), mem());
        let _first = attach(&old);
        let g1 = channel.generation();
        let page = [0x5au8; 4096];
        assert!(channel.write_window(g1, 0, &[&page[..]]));
        let mut back = [0u8; 4096];
        assert!(channel.read_window(g1, 0, &mut back) && back == page);
        // The paging server is replaced (its window in the new memory holds zeros).
        let _second = attach(&new);
        let g2 = channel.generation();
        assert_ne!(g1, g2);
        assert!(!channel.write_window(g1, 0, &[&page[..]]), "the old server's window is gone");
        assert!(!channel.read_window(g1, 0, &mut back), "data read by the old server is not in the new window");
        let before = channel.metrics.resubmitted.load(Relaxed);
        assert!(matches!(channel.call(g1, Request::new(0, vasi::op::PAGE_OUT, 0, 0, &[1])), Outcome::Lost));
        assert!(channel.lock().queued.is_empty(), "nothing prepared for the old server reaches the new one");
        assert_eq!(channel.metrics.resubmitted.load(Relaxed), before + 1);
        assert!(channel.write_window(g2, 0, &[&page[..]]) && channel.read_window(g2, 0, &mut back) && back == page);
    }
}
