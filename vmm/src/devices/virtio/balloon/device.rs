//! The virtio-balloon device: features, configuration space, activation and the four
//! queues.

use std::any::Any;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend as _};

use super::{
    tag, BalloonState, Discard, F_DEFLATE_ON_OOM, F_MUST_TELL_HOST, F_PAGE_REPORTING, F_STATS_VQ,
    MAX_CHAIN_DESCRIPTORS, MAX_PFNS_PER_CHAIN, PFN_SHIFT, QUEUE_SIZE,
};
use crate::devices::virtio::{
    guest_caused_warning, read_config_image, VirtioDevice, VirtioError, VirtioInterrupt, TYPE_BALLOON,
    VIRTIO_F_VERSION_1,
};
use crate::GuestMemory;

const NAME: &str = "virtio-balloon";

/// Bytes of configuration space: `num_pages`, `actual`, `free_page_hint_cmd_id`,
/// `poison_val` (the last two unused: their features are not offered).
const CONFIG_SPACE_SIZE: usize = 16;

/// Size of one statistics entry: le16 tag, le64 value, packed.
const STAT_ENTRY: usize = 10;

/// What a queue is for, once the features are known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Inflate,
    Deflate,
    Stats,
    Reporting,
}

struct Active {
    mem: GuestMemory,
    queues: Vec<(Role, Queue)>,
    interrupt: Arc<VirtioInterrupt>,
    /// The statistics buffer the driver left with us, returned to ask for fresh figures.
    stats_head: Option<u16>,
}

/// A virtio-balloon device for one partition of `mem_bytes` of RAM from guest-physical 0.
pub struct VirtioBalloon {
    features: u64,
    acked: u64,
    queue_sizes: [u16; 4],
    /// One bit per guest page: in the balloon.
    inflated: Vec<u64>,
    pages: u64,
    discard: Arc<dyn Discard>,
    state: Arc<BalloonState>,
    active: Option<Active>,
}

impl VirtioBalloon {
    pub fn new(mem_bytes: u64, discard: Arc<dyn Discard>) -> VirtioBalloon {
        let pages = mem_bytes >> PFN_SHIFT;
        VirtioBalloon {
            features: (1u64 << VIRTIO_F_VERSION_1)
                | (1 << F_MUST_TELL_HOST)
                | (1 << F_STATS_VQ)
                | (1 << F_DEFLATE_ON_OOM)
                | (1 << F_PAGE_REPORTING),
            acked: 0,
            queue_sizes: [QUEUE_SIZE; 4],
            inflated: vec![0; pages.div_ceil(64) as usize],
            pages,
            discard,
            state: Arc::new(BalloonState::default()),
            active: None,
        }
    }

    pub fn state(&self) -> Arc<BalloonState> {
        self.state.clone()
    }

    /// Set the target balloon size (pages, at most the guest's RAM) and tell the driver.
    pub fn set_target(&mut self, pages: u64) {
        let pages = pages.min(self.pages).min(u32::MAX as u64);
        if self.state.target.swap(pages, Relaxed) != pages {
            if let Some(a) = &self.active {
                if let Err(e) = a.interrupt.signal_config_change() {
                    tracing::warn!("{NAME}: {e}");
                }
            }
        }
    }

    /// Return the statistics buffer the driver left with us: it refills it with fresh
    /// figures and hands it back (virtio 1.2, 5.5.6.3).
    pub fn request_stats(&mut self) {
        let Some(a) = self.active.as_mut() else { return };
        let Some(head) = a.stats_head.take() else { return };
        let Some((_, q)) = a.queues.iter_mut().find(|(r, _)| *r == Role::Stats) else { return };
        if q.add_used(&a.mem, head, 0).is_ok() {
            let _ = a.interrupt.signal_used_queue();
        }
    }

    fn is_inflated(&self, pfn: u64) -> bool {
        self.inflated[(pfn / 64) as usize] & (1 << (pfn % 64)) != 0
    }

    fn set_inflated(&mut self, pfn: u64, on: bool) {
        let w = &mut self.inflated[(pfn / 64) as usize];
        if on {
            *w |= 1 << (pfn % 64);
        } else {
            *w &= !(1 << (pfn % 64));
        }
    }

    /// Forget the balloon (device reset): pages in it are the driver's again.
    fn clear_balloon(&mut self) {
        self.inflated.iter_mut().for_each(|w| *w = 0);
        self.state.loaned.store(0, Relaxed);
    }

    /// Discard runs of consecutive pages.
    fn discard_pfns(&self, pfns: &mut [u64]) -> u64 {
        let t0 = std::time::Instant::now();
        pfns.sort_unstable();
        let mut freed = 0;
        let mut i = 0;
        while i < pfns.len() {
            let mut j = i + 1;
            while j < pfns.len() && pfns[j] == pfns[j - 1] + 1 {
                j += 1;
            }
            freed += self.discard.discard(pfns[i] << PFN_SHIFT, ((j - i) as u64) << PFN_SHIFT);
            i = j;
        }
        self.state.discard_ns.fetch_add(t0.elapsed().as_nanos() as u64, Relaxed);
        freed
    }

    fn reject_chain(&self, why: &str) {
        let n = self.state.rejected_chains.fetch_add(1, Relaxed);
        guest_caused_warning(n, format_args!("{NAME}: rejected a descriptor chain: {why}"));
    }

    /// The descriptors of a chain as (address, length, device-writable), validated:
    /// inside guest memory, at most MAX_CHAIN_DESCRIPTORS, all in `writable` direction,
    /// each a multiple of `unit` bytes. Err names what is wrong.
    fn walk(
        chain: DescriptorChain<&GuestMemory>,
        mem: &GuestMemory,
        writable: bool,
        unit: u64,
    ) -> Result<Vec<(u64, u64)>, &'static str> {
        let mut out = Vec::new();
        let mut last_has_next = false;
        for (n, d) in chain.enumerate() {
            if n >= MAX_CHAIN_DESCRIPTORS {
                return Err("too many descriptors");
            }
            last_has_next = d.has_next();
            let (addr, len) = (d.addr().0, u64::from(d.len()));
            if d.is_write_only() != writable {
                return Err(if writable { "a device-readable descriptor in a reporting chain" } else { "a device-writable descriptor" });
            }
            if len == 0 {
                return Err("an empty buffer");
            }
            if len % unit != 0 {
                return Err("a length that is not a whole number of entries");
            }
            if addr.checked_add(len).is_none() || !mem.check_range(GuestAddress(addr), len as usize) {
                return Err("a buffer outside guest memory");
            }
            out.push((addr, len));
        }
        if last_has_next || out.is_empty() {
            return Err("a broken or empty chain");
        }
        Ok(out)
    }

    /// Page numbers of an inflate or deflate chain.
    fn read_pfns(mem: &GuestMemory, bufs: &[(u64, u64)]) -> Result<Vec<u64>, &'static str> {
        let total: u64 = bufs.iter().map(|b| b.1 / 4).sum();
        if total > MAX_PFNS_PER_CHAIN as u64 {
            return Err("too many page numbers");
        }
        let mut pfns = Vec::with_capacity(total as usize);
        let mut raw = Vec::new();
        for &(addr, len) in bufs {
            raw.resize(len as usize, 0);
            mem.read_slice(&mut raw, GuestAddress(addr)).map_err(|_| "a buffer outside guest memory")?;
            pfns.extend(raw.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as u64));
        }
        Ok(pfns)
    }

    fn inflate(&mut self, pfns: Vec<u64>) {
        let s = self.state.clone();
        let mut accepted = Vec::with_capacity(pfns.len());
        for pfn in pfns {
            if pfn >= self.pages {
                let n = s.rejected_out_of_range.fetch_add(1, Relaxed);
                guest_caused_warning(n, format_args!("{NAME}: inflate of page {pfn:#x}, beyond guest memory ({:#x} pages)", self.pages));
            } else if self.is_inflated(pfn) {
                let n = s.rejected_duplicate.fetch_add(1, Relaxed);
                guest_caused_warning(n, format_args!("{NAME}: page {pfn:#x} inflated twice"));
            } else {
                self.set_inflated(pfn, true);
                accepted.push(pfn);
            }
        }
        let n = accepted.len() as u64;
        let freed = self.discard_pfns(&mut accepted);
        s.frames_freed.fetch_add(freed, Relaxed);
        s.inflated.fetch_add(n, Relaxed);
        let loaned = s.loaned.fetch_add(n, Relaxed) + n;
        s.peak_loaned.fetch_max(loaned, Relaxed);
    }

    fn deflate(&mut self, pfns: Vec<u64>) {
        let s = self.state.clone();
        let mut n = 0;
        for pfn in pfns {
            if pfn < self.pages && self.is_inflated(pfn) {
                self.set_inflated(pfn, false);
                n += 1;
            } else {
                let k = s.rejected_not_inflated.fetch_add(1, Relaxed);
                guest_caused_warning(k, format_args!("{NAME}: deflate of page {pfn:#x}, which is not in the balloon"));
            }
        }
        s.deflated.fetch_add(n, Relaxed);
        s.loaned.fetch_sub(n, Relaxed);
    }

    fn take_stats(&self, mem: &GuestMemory, bufs: &[(u64, u64)]) {
        let mut raw = Vec::new();
        for &(addr, len) in bufs {
            let start = raw.len();
            raw.resize(start + len as usize, 0);
            if mem.read_slice(&mut raw[start..], GuestAddress(addr)).is_err() {
                return;
            }
        }
        let mut st = self.state.stats.lock().unwrap_or_else(|e| e.into_inner());
        for e in raw.chunks_exact(STAT_ENTRY) {
            let t = u16::from_le_bytes([e[0], e[1]]) as usize;
            let v = u64::from_le_bytes(e[2..10].try_into().expect("8 bytes"));
            if t < tag::COUNT {
                st.values[t] = Some(v);
            }
        }
        st.updates += 1;
    }

    fn report(&mut self, bufs: &[(u64, u64)]) {
        let t0 = std::time::Instant::now();
        let mut freed = 0;
        let mut pages = 0;
        for &(addr, len) in bufs {
            freed += self.discard.discard(addr, len);
            pages += len >> PFN_SHIFT;
        }
        self.state.reported.fetch_add(pages, Relaxed);
        self.state.frames_freed.fetch_add(freed, Relaxed);
        self.state.discard_ns.fetch_add(t0.elapsed().as_nanos() as u64, Relaxed);
    }

    fn queue_error(index: usize, source: virtio_queue::Error) -> VirtioError {
        VirtioError::Queue { device: NAME, queue: index, source }
    }

    /// One chain of queue `role`; returns whether to give it back now (the stats buffer
    /// stays with the device).
    fn handle_chain(&mut self, role: Role, chain: DescriptorChain<&GuestMemory>, mem: &GuestMemory) -> bool {
        let head = chain.head_index();
        let (writable, unit) = match role {
            Role::Inflate | Role::Deflate => (false, 4),
            Role::Stats => (false, STAT_ENTRY as u64),
            Role::Reporting => (true, 1 << PFN_SHIFT),
        };
        let bufs = match Self::walk(chain, mem, writable, unit) {
            Ok(b) if role == Role::Stats && b.iter().map(|d| d.1).sum::<u64>() > super::MAX_STATS_BYTES => {
                self.reject_chain("a statistics buffer larger than 64 entries");
                return true;
            }
            Ok(b) => b,
            Err(why) => {
                self.reject_chain(why);
                return true;
            }
        };
        match role {
            Role::Inflate | Role::Deflate => match Self::read_pfns(mem, &bufs) {
                Ok(pfns) if role == Role::Inflate => self.inflate(pfns),
                Ok(pfns) => self.deflate(pfns),
                Err(why) => self.reject_chain(why),
            },
            Role::Stats => {
                self.take_stats(mem, &bufs);
                // Keep it; give back the one held before, if the driver sent two.
                let old = self.active.as_mut().and_then(|a| a.stats_head.replace(head));
                if let Some(old) = old {
                    self.give_back_stats(old);
                }
                return false;
            }
            Role::Reporting => {
                if bufs.iter().any(|&(a, _)| a % (1 << PFN_SHIFT) != 0) {
                    self.reject_chain("a reported range that is not page aligned");
                } else {
                    self.report(&bufs);
                }
            }
        }
        true
    }

    /// Return an older statistics buffer (the driver sent a second one).
    fn give_back_stats(&mut self, old: u16) {
        if let Some(a) = self.active.as_mut() {
            if let Some((_, q)) = a.queues.iter_mut().find(|(r, _)| *r == Role::Stats) {
                if q.add_used(&a.mem, old, 0).is_ok() {
                    let _ = a.interrupt.signal_used_queue();
                }
            }
        }
    }
}

impl VirtioDevice for VirtioBalloon {
    fn device_type(&self) -> u32 {
        TYPE_BALLOON
    }

    fn name(&self) -> &'static str {
        NAME
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn device_features(&self) -> u64 {
        self.features
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features & self.features;
    }

    fn acked_features(&self) -> u64 {
        self.acked
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut c = [0u8; CONFIG_SPACE_SIZE];
        c[0..4].copy_from_slice(&(self.state.target.load(Relaxed) as u32).to_le_bytes());
        c[4..8].copy_from_slice(&(self.state.actual.load(Relaxed) as u32).to_le_bytes());
        read_config_image(&c, offset, data);
    }

    /// Only `actual` (bytes 4..8) is the driver's to write; partial writes update the
    /// bytes they cover.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let mut actual = (self.state.actual.load(Relaxed) as u32).to_le_bytes();
        for (k, &b) in data.iter().enumerate() {
            match offset.checked_add(k as u64) {
                Some(o @ 4..=7) => actual[o as usize - 4] = b,
                _ => tracing::debug!("{NAME}: ignored config write at {offset:#x}"),
            }
        }
        self.state.actual.store(u32::from_le_bytes(actual) as u64, Relaxed);
    }

    fn activate(&mut self, mem: GuestMemory, queues: Vec<Queue>, interrupt: Arc<VirtioInterrupt>) -> Result<(), VirtioError> {
        let mut roles = vec![Role::Inflate, Role::Deflate];
        if self.acked & (1 << F_STATS_VQ) != 0 {
            roles.push(Role::Stats);
        }
        if self.acked & (1 << F_PAGE_REPORTING) != 0 {
            roles.push(Role::Reporting);
        }
        // Queue i of the transport is the i-th negotiated role; queues beyond them stay
        // unused. Queues the driver left disabled keep their place (and are ignored).
        let qs: Vec<(Role, Queue)> = roles.into_iter().zip(queues).collect();
        if let Some((role, _)) = qs.iter().find(|(r, q)| !q.ready() && matches!(r, Role::Inflate | Role::Deflate)) {
            return Err(VirtioError::Activate { device: NAME, reason: format!("the driver did not enable the {role:?} queue") });
        }
        self.active = Some(Active { mem, queues: qs, interrupt, stats_head: None });
        self.state.active.store(true, Relaxed);
        Ok(())
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    /// The driver starts over: what it had in the balloon is its own again (virtio
    /// 1.2, 5.5.6.1: after a reset the balloon is empty).
    fn reset(&mut self) {
        self.active = None;
        self.acked = 0;
        self.state.active.store(false, Relaxed);
        self.state.actual.store(0, Relaxed);
        self.clear_balloon();
    }

    fn process_queue(&mut self, index: usize) -> Result<(), VirtioError> {
        let Some(a) = self.active.as_mut() else { return Ok(()) };
        let Some((role, q)) = a.queues.get(index) else {
            // A queue the transport has but the negotiated features do not create:
            // rejected and counted, the device goes on.
            let n = self.state.bad_notifications.fetch_add(1, Relaxed);
            guest_caused_warning(n, format_args!("{NAME}: notification of queue {index}, which the negotiated features do not create"));
            return Ok(());
        };
        if !q.ready() {
            return Ok(());
        }
        let (role, pos) = (*role, index);
        let mem = a.mem.clone();
        let mut used_any = false;
        let mut first_pass = true;
        loop {
            let a = self.active.as_mut().expect("active");
            a.queues[pos].1.disable_notification(&mem).map_err(|e| Self::queue_error(index, e))?;
            let mut handled = 0u32;
            loop {
                let a = self.active.as_mut().expect("active");
                let q = &mut a.queues[pos].1;
                let chain = q.iter(&mem).map_err(|e| Self::queue_error(index, e))?.next();
                let Some(chain) = chain else { break };
                handled += 1;
                let head = chain.head_index();
                if head >= q.size() {
                    self.state.invalid_heads.fetch_add(1, Relaxed);
                    continue;
                }
                if self.handle_chain(role, chain, &mem) {
                    let a = self.active.as_mut().expect("active");
                    a.queues[pos].1.add_used(&mem, head, 0).map_err(|e| Self::queue_error(index, e))?;
                    used_any = true;
                }
            }
            let a = self.active.as_mut().expect("active");
            if !a.queues[pos].1.enable_notification(&mem).map_err(|e| Self::queue_error(index, e))? {
                break;
            }
            if handled == 0 && !first_pass {
                return Err(VirtioError::InvalidQueue {
                    device: NAME,
                    queue: index,
                    reason: "available ring index moves but yields no descriptor chain".into(),
                });
            }
            first_pass = false;
        }
        let a = self.active.as_mut().expect("active");
        if used_any && a.queues[pos].1.needs_notification(&mem).map_err(|e| Self::queue_error(index, e))? {
            a.interrupt.signal_used_queue()?;
        }
        Ok(())
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}
