//! Hostile-guest mode (`WorkloadParams::chaos`): before the disk test and the memory
//! workload, the guest sends what a VMM must refuse without harm to itself, to the host
//! or to other partitions, prints one short line per case with what came back, and then
//! checks that the hypercalls, the disk and the balloon still work.
//!
//! What is sent, in order (the counts are what `tests/e2e/chaos.rs` relies on):
//! 1. port I/O: reads and writes of 1, 2 and 4 bytes to ports [`UNCLAIMED_PORTS`] (12),
//!    and a 32-bit read of the hypercall port (1);
//! 2. MMIO: reads and writes of 1, 2, 4 and 8 bytes (8 per address) to
//!    [`UNCLAIMED_MMIO`], to the highest virtio-mmio slot without a device, and to the
//!    first address after RAM (each when it is free);
//! 3. hypercalls: an unknown number ([`BAD_HYPERCALL`]), and EXIT written with 8-bit and
//!    16-bit accesses (3); then CLOCK must still work and move forward;
//! 4. on the first virtio-blk device, if there is one:
//!    - 20 register accesses out of protocol order or of the wrong width (see
//!      [`registers`]);
//!    - 3 bad queue activations: a queue size that is not a power of two, a queue
//!      register write after DRIVER_OK, a descriptor table outside RAM;
//!    - 18 descriptor chains, one at a time (see [`chains`]): 16 malformed ones, one
//!      well-formed request of an unknown type, and one driver-ring index that jumps by
//!      more than the queue size;
//!    - then a reset and a normal verified write/flush/read-back of [`CHECK_BLOCKS`]
//!      blocks (counted in `disk_blocks_verified` / `disk_failures`);
//! 5. on the first virtio-balloon device, if there is one and the balloon driver will use
//!    it (`balloon` is not `ignore`), with VERSION_1, MUST_TELL_HOST, STATS_VQ and
//!    PAGE_REPORTING negotiated, one request at a time (see [`balloon_requests`]), 27
//!    requests in all:
//!    - 7 inflate or deflate buffers that are well formed but name page frame numbers
//!      the device must refuse, one refused number each: 2 beyond RAM (the first page
//!      after RAM, 0xffffffff), 2 inflated twice (the same page twice in one buffer, then
//!      once more), 3 deflated but not in the balloon (a page just deflated, a page never
//!      inflated, 0xffffffff). The one page these inflate is [`BalloonTarget::scratch`];
//!      between them it is deflated again (not counted), and must then read back zero;
//!    - 18 malformed chains ([`BALLOON_CHAINS`]): 10 on inflateq, 2 on deflateq, 2 on
//!      statsq, 4 on reporting_vq;
//!    - a driver-ring entry naming a descriptor beyond the queue (1);
//!    - a driver-ring index that jumps by more than the queue size (1; a device error,
//!      not a malformed chain);
//!    - then a reset, a normal setup (MUST_TELL_HOST) and one inflate and deflate of the
//!      scratch page, which must come back zero. The device is left reset for the
//!      balloon driver;
//! 6. one line with the number of requests sent.
//!
//! The guest works against any conforming device: every answer is only reported, a
//! chain the device never completes costs [`CASE_TIMEOUT_NS`], and the device is reset
//! and set up again whenever its queue state is no longer known.

use crate::balloon;
use crate::disk::{self, Failure};
use crate::hc;
use crate::virtio::{self, reg, status, Buf, Desc, Mmio, Queue, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};
use amsvm_abi::{layout, Progress, HYPERCALL_PORT};

/// Ports no PC device uses.
const UNCLAIMED_PORTS: [u16; 2] = [0x1234, 0xdead];
/// An address between RAM and the virtio-mmio window, above every RAM size.
pub const UNCLAIMED_MMIO: u64 = 0xCA00_0000;
/// A hypercall number the ABI does not define.
const BAD_HYPERCALL: u32 = 0x7777;
/// How long to wait for the device to complete one hostile chain. A conforming device
/// may drop a malformed chain without completing it.
const CASE_TIMEOUT_NS: u64 = 1_000_000_000;
/// Blocks written, flushed and read back after the hostile requests.
pub const CHECK_BLOCKS: u64 = 8;
/// A guest-physical address far beyond any RAM (256 TiB).
const FAR_AWAY: u64 = 0x1_0000_0000_0000;
/// What the data page holds for hostile writes, so a write that reaches the disk shows.
const HOSTILE_FILL: u8 = 0xc4;
/// Status byte value before a request; a device that writes no status leaves it.
const NO_STATUS: u8 = 0xff;
/// Request type no virtio-blk version defines.
const T_UNKNOWN: u32 = 0x55;

/// Where the hostile accesses go, from the validated boot-info page.
pub struct Targets {
    pub mem_bytes: u64,
    /// The highest virtio-mmio slot no device occupies.
    pub mmio_gap: Option<u64>,
    /// Whether [`UNCLAIMED_MMIO`] is outside every announced device window.
    pub unclaimed_free: bool,
    /// The first virtio-blk window and [`disk::AREA_PAGES`] pages for its queue.
    pub blk: Option<(u64, u64)>,
    /// The first virtio-balloon device, if the balloon driver will use it.
    pub balloon: Option<BalloonTarget>,
}

/// The virtio-balloon device chaos mode attacks, and the memory it may use for that.
pub struct BalloonTarget {
    /// The device's register window.
    pub mmio: u64,
    /// The balloon driver's [`balloon::AREA_PAGES`] reserved pages: chaos mode runs
    /// before the driver starts, and the driver sets up every page it uses afresh.
    pub area: u64,
    /// A page chaos mode owns and the workload never verifies: the first page after the
    /// idle pages (never touched by the workload), or, when the stamped pages fill the
    /// free RAM, the driver's statistics page (which the driver fills before using it).
    /// It is inflated and deflated; nothing else touches it while it is in the balloon.
    pub scratch: u64,
    /// Where the buffer of [`TOO_MANY_PFNS`] page frame numbers points: RAM the device
    /// must not read (the working set, still untouched and zero).
    pub bulk: u64,
}

/// Why chaos mode stopped early.
pub enum ChaosError {
    /// CLOCK did not move forward after the bad hypercalls.
    Clock { first: u64, second: u64 },
    Disk(Failure),
    /// The balloon could not be set up again, or a normal request on it failed.
    Balloon(virtio::Error),
}

impl core::fmt::Display for ChaosError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ChaosError::Clock { first, second } => {
                write!(f, "CLOCK stopped working after bad hypercalls ({first} then {second} ns)")
            }
            ChaosError::Disk(e) => e.fmt(f),
            ChaosError::Balloon(e) => write!(f, "balloon: {e}"),
        }
    }
}

impl From<Failure> for ChaosError {
    fn from(e: Failure) -> Self {
        ChaosError::Disk(e)
    }
}

impl From<virtio::Error> for ChaosError {
    fn from(e: virtio::Error) -> Self {
        ChaosError::Disk(Failure::Virtio(e))
    }
}

/// Runs chaos mode; counts the final check's blocks in `p`.
pub fn run(t: &Targets, partition_id: u32, p: &mut Progress) -> Result<(), ChaosError> {
    let mut sent = 0u32;
    sent += ports();
    println!("chaos: unclaimed ports: done");
    let mut addrs = [None; 3];
    addrs[0] = t.unclaimed_free.then_some(UNCLAIMED_MMIO);
    addrs[1] = t.mmio_gap;
    addrs[2] = (t.mem_bytes.checked_add(8).is_some_and(|end| end <= layout::MAX_RAM)).then_some(t.mem_bytes);
    for a in addrs.into_iter().flatten() {
        sent += mmio_widths(a);
        println!("chaos: unclaimed MMIO {a:#x}: done");
    }
    sent += hypercalls()?;

    if let Some((base, area)) = t.blk {
        // SAFETY: `configure` checked the window and reserved the pages for the disk
        // test's driver, which is not running.
        let mmio = unsafe { Mmio::new(base) };
        let (offered, _) = mmio.negotiate(disk::DEVICE_ID, |_| 0)?;
        mmio.reset()?;
        sent += registers(&mmio, offered);
        sent += activations(&mmio, area, t.mem_bytes)?;
        sent += chains(&mmio, area, t.mem_bytes)?;
        if offered & disk::F_RO != 0 {
            println!("chaos: read-only disk, no write check");
        } else {
            // SAFETY: as above; `disk::run` resets the device first.
            unsafe { disk::run(base, area, CHECK_BLOCKS, partition_id, p) }?;
            println!("chaos: disk works: {} blocks verified, {} failed", p.disk_blocks_verified, p.disk_failures);
        }
    }

    if let Some(b) = &t.balloon {
        // SAFETY: `configure` checked the window and reserved the area for the balloon
        // driver, which has not started; `scratch` and `bulk` are chaos mode's (see
        // `BalloonTarget`).
        let mmio = unsafe { Mmio::new(b.mmio) };
        sent += balloon_requests(&mmio, b, t.mem_bytes)?;
        balloon_works(&mmio, b)?;
    }
    println!("chaos: {sent} hostile requests sent{}", if t.blk.is_none() { " (no virtio-blk device)" } else { "" });
    Ok(())
}

/// Raw port and MMIO accesses of a chosen width.
mod raw {
    pub fn inb(port: u16) -> u8 {
        let v: u8;
        // SAFETY: a port read exits to the VMM (or reaches a device); no memory changes.
        unsafe { core::arch::asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack, preserves_flags)) };
        v
    }
    pub fn inw(port: u16) -> u16 {
        let v: u16;
        // SAFETY: as for `inb`.
        unsafe { core::arch::asm!("in ax, dx", in("dx") port, out("ax") v, options(nomem, nostack, preserves_flags)) };
        v
    }
    pub fn inl(port: u16) -> u32 {
        let v: u32;
        // SAFETY: as for `inb`.
        unsafe { core::arch::asm!("in eax, dx", in("dx") port, out("eax") v, options(nomem, nostack, preserves_flags)) };
        v
    }
    pub fn outb(port: u16, v: u8) {
        // SAFETY: a port write exits to the VMM (or reaches a device); no memory changes.
        unsafe { core::arch::asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags)) };
    }
    pub fn outw(port: u16, v: u16) {
        // SAFETY: as for `outb`.
        unsafe { core::arch::asm!("out dx, ax", in("dx") port, in("ax") v, options(nomem, nostack, preserves_flags)) };
    }
    pub fn outl(port: u16, v: u32) {
        // SAFETY: as for `outb`.
        unsafe { core::arch::asm!("out dx, eax", in("dx") port, in("eax") v, options(nomem, nostack, preserves_flags)) };
    }

    /// A `width`-byte load (1, 2, 4 or 8) from `addr`, as one instruction.
    ///
    /// # Safety
    /// `addr` must be mapped and be device memory or RAM the caller may read.
    pub unsafe fn read(addr: u64, width: u8) -> u64 {
        let v: u64;
        // SAFETY: the caller vouches for the address; one load, no other effect.
        unsafe {
            match width {
                1 => core::arch::asm!("movzx {v:e}, byte ptr [{a}]", a = in(reg) addr, v = out(reg) v, options(nostack, preserves_flags)),
                2 => core::arch::asm!("movzx {v:e}, word ptr [{a}]", a = in(reg) addr, v = out(reg) v, options(nostack, preserves_flags)),
                4 => core::arch::asm!("mov {v:e}, dword ptr [{a}]", a = in(reg) addr, v = out(reg) v, options(nostack, preserves_flags)),
                _ => core::arch::asm!("mov {v}, qword ptr [{a}]", a = in(reg) addr, v = out(reg) v, options(nostack, preserves_flags)),
            }
        }
        v
    }

    /// A `width`-byte store (1, 2, 4 or 8) of `v` to `addr`, as one instruction.
    ///
    /// # Safety
    /// `addr` must be mapped and be device memory or RAM the caller may write.
    pub unsafe fn write(addr: u64, width: u8, v: u64) {
        // SAFETY: the caller vouches for the address; one store.
        unsafe {
            match width {
                1 => core::arch::asm!("mov byte ptr [{a}], {v:l}", a = in(reg) addr, v = in(reg) v, options(nostack, preserves_flags)),
                2 => core::arch::asm!("mov word ptr [{a}], {v:x}", a = in(reg) addr, v = in(reg) v, options(nostack, preserves_flags)),
                4 => core::arch::asm!("mov dword ptr [{a}], {v:e}", a = in(reg) addr, v = in(reg) v, options(nostack, preserves_flags)),
                _ => core::arch::asm!("mov qword ptr [{a}], {v}", a = in(reg) addr, v = in(reg) v, options(nostack, preserves_flags)),
            }
        }
    }
}

/// Port I/O nobody should claim: 13 accesses.
fn ports() -> u32 {
    let mut n = 0;
    for port in UNCLAIMED_PORTS {
        let _ = raw::inb(port);
        let _ = raw::inw(port);
        let _ = raw::inl(port);
        raw::outb(port, 0xa5);
        raw::outw(port, 0xdead);
        raw::outl(port, 0xdead_beef);
        n += 6;
    }
    // The hypercall port is write-only.
    let _ = raw::inl(HYPERCALL_PORT);
    n + 1
}

/// Reads and writes of every width at `addr`: 8 accesses.
fn mmio_widths(addr: u64) -> u32 {
    let mut n = 0;
    for width in [1u8, 2, 4, 8] {
        // SAFETY: `addr` is identity mapped (the first 4 GiB are) and no RAM or device
        // the guest uses (see `Targets`); the access exits to the VMM.
        unsafe {
            let _ = raw::read(addr, width);
            raw::write(addr, width, 0x5a5a_5a5a_5a5a_5a5a);
        }
        n += 2;
    }
    n
}

/// Bad hypercalls (3), then CLOCK must still move forward.
fn hypercalls() -> Result<u32, ChaosError> {
    raw::outl(HYPERCALL_PORT, BAD_HYPERCALL);
    // EXIT with the wrong access size must not end the partition.
    raw::outb(HYPERCALL_PORT, amsvm_abi::hc::EXIT as u8);
    raw::outw(HYPERCALL_PORT, amsvm_abi::hc::EXIT as u16);
    let first = hc::clock_ns();
    let second = hc::clock_ns();
    if second <= first {
        return Err(ChaosError::Clock { first, second });
    }
    println!("chaos: bad hypercalls: CLOCK still works");
    Ok(3)
}

/// Register accesses out of protocol order or of the wrong width, starting from a reset
/// device: 20 accesses. Leaves the device reset.
fn registers(mmio: &Mmio, offered: u64) -> u32 {
    let base = mmio.base();
    let mut n = 0;
    let mut bad = |f: &dyn Fn()| {
        f();
        n += 1;
    };
    // Queue registers before FEATURES_OK.
    bad(&|| mmio.write(reg::QUEUE_NUM, 8));
    bad(&|| mmio.write(reg::QUEUE_DESC_LOW, 0x1000));
    bad(&|| mmio.write(reg::QUEUE_READY, 1));
    // DRIVER before ACKNOWLEDGE.
    bad(&|| mmio.set_status(status::DRIVER));
    mmio.set_status(status::ACKNOWLEDGE);
    mmio.set_status(status::ACKNOWLEDGE | status::DRIVER);
    // DRIVER_OK without FEATURES_OK.
    bad(&|| mmio.set_status(status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK));
    // Feature bits above 63 (none exist).
    bad(&|| {
        mmio.write(reg::DRIVER_FEATURES_SEL, 2);
        mmio.write(reg::DRIVER_FEATURES, u32::MAX);
    });
    // Every feature that was not offered, then FEATURES_OK.
    let unoffered = !offered | virtio::F_VERSION_1;
    mmio.write(reg::DRIVER_FEATURES_SEL, 0);
    mmio.write(reg::DRIVER_FEATURES, unoffered as u32);
    mmio.write(reg::DRIVER_FEATURES_SEL, 1);
    mmio.write(reg::DRIVER_FEATURES, (unoffered >> 32) as u32);
    bad(&|| mmio.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK));
    let refused = mmio.status() & status::FEATURES_OK == 0;
    // Control registers with widths other than 32 bits, or unaligned. A 1-byte write of
    // 0 to Status is harmless even to a device that takes it as a reset.
    let rd = |off: u64, width: u8| {
        // SAFETY: inside the device's register window (MIN_WINDOW bytes, checked when
        // the boot-info page was validated).
        let _ = unsafe { raw::read(base + off, width) };
    };
    let wr = |off: u64, width: u8, v: u64| {
        // SAFETY: as for `rd`.
        unsafe { raw::write(base + off, width, v) };
    };
    bad(&|| rd(reg::STATUS, 1));
    bad(&|| rd(reg::MAGIC, 2));
    bad(&|| rd(reg::MAGIC + 2, 4));
    bad(&|| rd(reg::MAGIC, 8));
    bad(&|| wr(reg::STATUS, 1, 0));
    bad(&|| wr(reg::QUEUE_SEL, 2, 0));
    // A write-only register read, a reserved register read and written, a read-only
    // register written.
    bad(&|| rd(reg::QUEUE_NOTIFY, 4));
    bad(&|| rd(RESERVED, 4));
    bad(&|| mmio.write(RESERVED, 0xffff_ffff));
    bad(&|| mmio.write(reg::MAGIC, 0));
    // Notifications of queues that do not exist.
    bad(&|| mmio.write(reg::QUEUE_NOTIFY, 7));
    bad(&|| mmio.write(reg::QUEUE_NOTIFY, u32::MAX));
    // Clearing a status bit without a reset.
    bad(&|| mmio.set_status(status::ACKNOWLEDGE));
    let st = mmio.status();
    println!(
        "chaos: {n} out-of-protocol register accesses: unoffered features {}, status then {st:#x}",
        if refused { "refused" } else { "ACCEPTED" }
    );
    let _ = mmio.reset();
    n
}

/// A register no virtio-mmio version defines (between DeviceFeaturesSel and
/// DriverFeatures).
const RESERVED: u64 = 0x018;

/// Queue setups the device must refuse at DRIVER_OK: 3 hostile requests. Leaves the
/// device reset.
fn activations(mmio: &Mmio, area: u64, mem_bytes: u64) -> Result<u32, ChaosError> {
    let mut n = 0;
    for (what, size, desc) in [("queue size 3", 3u32, area), ("descriptor table after RAM", 8, mem_bytes)] {
        mmio.negotiate(disk::DEVICE_ID, |_| 0)?;
        mmio.write(reg::QUEUE_SEL, 0);
        let ring = area + 0x400;
        let used = area + 0x800;
        mmio.write(reg::QUEUE_NUM, size);
        mmio.write(reg::QUEUE_DESC_LOW, desc as u32);
        mmio.write(reg::QUEUE_DESC_HIGH, (desc >> 32) as u32);
        mmio.write(reg::QUEUE_DRIVER_LOW, ring as u32);
        mmio.write(reg::QUEUE_DRIVER_HIGH, (ring >> 32) as u32);
        mmio.write(reg::QUEUE_DEVICE_LOW, used as u32);
        mmio.write(reg::QUEUE_DEVICE_HIGH, (used >> 32) as u32);
        mmio.write(reg::QUEUE_READY, 1);
        mmio.driver_ok();
        n += 1;
        let st = mmio.status();
        if n == 1 {
            // Queue registers are frozen after DRIVER_OK.
            mmio.write(reg::QUEUE_READY, 0);
            n += 1;
        }
        println!("chaos: {what}: status {st:#x}{}", needs_reset(st));
        mmio.reset()?;
    }
    Ok(n)
}

fn needs_reset(st: u32) -> &'static str {
    if st & status::DEVICE_NEEDS_RESET != 0 {
        " (needs reset)"
    } else {
        ""
    }
}

/// What the device did with one hostile chain.
enum Answer {
    /// Completed; the status byte and the used length.
    Status(u8, u32),
    /// Completed without writing the status byte.
    NoStatus(u32),
    /// Completed with a descriptor id that is not the chain's head.
    OtherId(u32),
    NoCompletion,
    NeedsReset,
}

/// The first virtio-blk device, set up with one queue for hostile chains.
struct Session<'a> {
    mmio: &'a Mmio,
    queue: Queue,
    area: u64,
    capacity: u64,
}

impl Session<'_> {
    fn start(mmio: &Mmio, area: u64) -> Result<Session<'_>, ChaosError> {
        mmio.negotiate(disk::DEVICE_ID, |_| 0)?;
        // SAFETY: the first page of the area is the queue's (see `Targets::blk`).
        let queue = unsafe { Queue::setup(mmio, area) }?;
        mmio.driver_ok();
        let capacity = mmio.config_u64(disk::CFG_CAPACITY);
        Ok(Session { mmio, queue, area, capacity })
    }

    fn restart(&mut self) -> Result<(), ChaosError> {
        self.mmio.reset()?;
        let s = Session::start(self.mmio, self.area)?;
        self.queue = s.queue;
        Ok(())
    }

    fn req(&self) -> u64 {
        self.area + 4096
    }

    fn data(&self) -> u64 {
        self.area + 2 * 4096
    }

    fn hdr(&self) -> u64 {
        self.req() + disk::HDR_OFFSET
    }

    fn status_addr(&self) -> u64 {
        self.req() + disk::STATUS_OFFSET
    }

    fn header(&self, ty: u32, sector: u64) {
        let h = self.hdr() as *mut u32;
        // SAFETY: the request page belongs to chaos mode.
        unsafe {
            h.write_volatile(ty);
            h.add(1).write_volatile(0);
            (h.add(2) as *mut u64).write_volatile(sector);
        }
    }

    /// Sends the chain `descs` (descriptors 0.., at most the queue size) with `head` in
    /// the driver ring and the ring index moved on by `advance`; waits for the answer
    /// and prints it. The device is set up again when its queue state is unknown.
    fn case(&mut self, what: &str, descs: &[Desc], head: u16, advance: u16) -> Result<(), ChaosError> {
        // SAFETY: the status byte lies in the request page.
        unsafe { (self.status_addr() as *mut u8).write_volatile(NO_STATUS) };
        for (i, d) in descs.iter().enumerate() {
            self.queue.write_desc(i as u16, *d);
        }
        self.queue.publish(self.mmio, head, advance);
        let answer = match self.queue.wait_used(self.mmio, hc::clock_ns, CASE_TIMEOUT_NS) {
            Ok((id, len)) if id == u32::from(head) => {
                // SAFETY: as above.
                match unsafe { (self.status_addr() as *const u8).read_volatile() } {
                    NO_STATUS => Answer::NoStatus(len),
                    s => Answer::Status(s, len),
                }
            }
            Ok((id, _)) => Answer::OtherId(id),
            Err(virtio::Error::Timeout) => Answer::NoCompletion,
            Err(virtio::Error::NeedsReset) => Answer::NeedsReset,
            Err(e) => return Err(e.into()),
        };
        print!("chaos: {what}: ");
        let resync = match answer {
            Answer::Status(s, len) => {
                println!("status {s}, used len {len}");
                false
            }
            Answer::NoStatus(len) => {
                println!("no status, used len {len}");
                false
            }
            Answer::OtherId(id) => {
                println!("used id {id}");
                true
            }
            Answer::NoCompletion => {
                println!("no completion");
                true
            }
            Answer::NeedsReset => {
                println!("device needs reset (status {:#x})", self.mmio.status());
                true
            }
        };
        // A ring index that jumped leaves the queue state unknown whatever the answer.
        if resync || advance != 1 {
            self.restart()?;
        }
        Ok(())
    }
}

fn d(addr: u64, len: u32, flags: u16, next: u16) -> Desc {
    Desc { addr, len, flags, next }
}

/// Descriptor chains a device must not execute as asked: 16 malformed chains, one
/// request of an unknown type and one driver-ring index jump (18 in all; the last two
/// are answered by a conforming device without counting as malformed chains).
fn chains(mmio: &Mmio, area: u64, mem_bytes: u64) -> Result<u32, ChaosError> {
    let mut s = Session::start(mmio, area)?;
    let cap = s.capacity;
    let blocks = cap / disk::SECTORS_PER_BLOCK;
    // Hostile writes aim at the last block, away from the blocks the disk tests write.
    let target = blocks.saturating_sub(1) * disk::SECTORS_PER_BLOCK;
    let (hdr, st, data) = (s.hdr(), s.status_addr(), s.data());
    // SAFETY: the data page belongs to chaos mode.
    unsafe { crate::rt::fill_bytes(data as *mut u8, HOSTILE_FILL, 4096) };
    const N: u16 = DESC_F_NEXT;
    const W: u16 = DESC_F_WRITE;
    let out = disk::T_OUT;
    let inn = disk::T_IN;
    let mut n = 0u32;
    let mut case = |s: &mut Session, what: &str, ty: u32, sector: u64, descs: &[Desc]| {
        s.header(ty, sector);
        n += 1;
        s.case(what, descs, 0, 1)
    };

    // Buffers outside guest RAM.
    case(&mut s, "header outside RAM", out, target, &[d(FAR_AWAY, 16, N, 1), d(data, 4096, N, 2), d(st, 1, W, 0)])?;
    case(&mut s, "read across the end of RAM", inn, target, &[d(hdr, 16, N, 1), d(mem_bytes - 512, 4096, N | W, 2), d(st, 1, W, 0)])?;
    case(&mut s, "read into the device window", inn, target, &[d(hdr, 16, N, 1), d(mmio.base(), 4096, N | W, 2), d(st, 1, W, 0)])?;
    case(&mut s, "data length 0xffffffff", out, target, &[d(hdr, 16, N, 1), d(data, u32::MAX, N, 2), d(st, 1, W, 0)])?;
    // Wrong directions.
    case(&mut s, "header device-writable", out, target, &[d(hdr, 16, N | W, 1), d(data, 4096, N | W, 2), d(st, 1, W, 0)])?;
    case(&mut s, "write from device-writable data", out, target, &[d(hdr, 16, N, 1), d(data, 4096, N | W, 2), d(st, 1, W, 0)])?;
    case(&mut s, "read into device-readable data", inn, target, &[d(hdr, 16, N, 1), d(data, 4096, N, 2), d(st, 1, W, 0)])?;
    // Sectors beyond the capacity, and a length that is not whole sectors.
    case(&mut s, "write at the capacity", out, cap, &[d(hdr, 16, N, 1), d(data, 4096, N, 2), d(st, 1, W, 0)])?;
    case(&mut s, "write across the end of the disk", out, cap.saturating_sub(1), &[d(hdr, 16, N, 1), d(data, 4096, N, 2), d(st, 1, W, 0)])?;
    case(&mut s, "sector overflow", out, u64::MAX - 3, &[d(hdr, 16, N, 1), d(data, 4096, N, 2), d(st, 1, W, 0)])?;
    case(&mut s, "write of 100 bytes", out, target, &[d(hdr, 16, N, 1), d(data, 100, N, 2), d(st, 1, W, 0)])?;
    // Broken chains.
    case(&mut s, "no status descriptor", out, target, &[d(hdr, 16, N, 1), d(data, 4096, 0, 0)])?;
    case(&mut s, "chain looping on itself", out, target, &[d(hdr, 16, N, 0)])?;
    case(&mut s, "next beyond the queue", out, target, &[d(hdr, 16, N, 0xfff0)])?;
    case(&mut s, "indirect table outside RAM", out, target, &[d(FAR_AWAY, 64, DESC_F_INDIRECT, 0)])?;
    // A driver-ring entry naming a descriptor the queue does not have.
    s.header(out, target);
    n += 1;
    s.case("head beyond the queue", &[d(hdr, 16, N, 1), d(data, 4096, N, 2), d(st, 1, W, 0)], 100, 1)?;
    // Well-formed, but a type no device knows: UNSUPP.
    s.header(T_UNKNOWN, 0);
    n += 1;
    s.case("unknown request type", &[d(hdr, 16, N, 1), d(st, 1, W, 0)], 0, 1)?;
    // The driver-ring index jumps by more than the queue size.
    s.header(out, target);
    n += 1;
    let jump = s.queue.size() + 100;
    s.case("ring index jump", &[d(hdr, 16, N, 1), d(data, 4096, N, 2), d(st, 1, W, 0)], 0, jump)?;
    let _ = mmio.reset();
    Ok(n)
}

/// Balloon feature bits (virtio 1.2 §5.5.3).
const F_MUST_TELL_HOST: u64 = 1 << 0;
const F_STATS_VQ: u64 = 1 << 1;
const F_PAGE_REPORTING: u64 = 1 << 5;
/// Features chaos mode negotiates with the balloon: every queue exists.
const BALLOON_FEATURES: u64 = F_MUST_TELL_HOST | F_STATS_VQ | F_PAGE_REPORTING;
/// The balloon's queues, numbered as [`BALLOON_FEATURES`] make them.
const INFLATEQ: usize = 0;
const DEFLATEQ: usize = 1;
const STATSQ: usize = 2;
const REPORTQ: usize = 3;
const PAGE: u64 = 4096;
/// More page frame numbers than amsvm takes in one inflate or deflate chain (64 Ki).
const TOO_MANY_PFNS: u32 = 64 * 1024 + 1;
/// Malformed balloon chains sent by [`balloon_requests`].
pub const BALLOON_CHAINS: u32 = 18;
/// How long a normal balloon request may take after the hostile ones.
const WORKS_TIMEOUT_NS: u64 = 30_000_000_000;
/// What the scratch page holds before it is inflated, so a page the device kept shows.
const SCRATCH_FILL: u8 = 0x5c;

/// The balloon, set up with [`BALLOON_FEATURES`] for hostile requests; queue `i` in page
/// `i` of the area (statsq and reporting_vq only if offered), page frame numbers in
/// page 4.
struct BalloonSession<'a> {
    mmio: &'a Mmio,
    area: u64,
    queues: [Option<Queue>; 4],
}

impl BalloonSession<'_> {
    fn start(mmio: &Mmio, area: u64) -> Result<BalloonSession<'_>, ChaosError> {
        let (_, features) = mmio.negotiate(balloon::DEVICE_ID, |_| BALLOON_FEATURES).map_err(ChaosError::Balloon)?;
        let mut s = BalloonSession { mmio, area, queues: [None, None, None, None] };
        // Compact numbering: a queue whose feature is missing takes no index.
        let mut index = 0u16;
        for (role, feature) in [(INFLATEQ, 0), (DEFLATEQ, 0), (STATSQ, F_STATS_VQ), (REPORTQ, F_PAGE_REPORTING)] {
            if feature != 0 && features & feature == 0 {
                continue;
            }
            // SAFETY: page `role` < 4 of the area is the queue's (see `BalloonTarget`).
            let q = unsafe { Queue::setup_index(mmio, index, area + role as u64 * PAGE) }.map_err(ChaosError::Balloon)?;
            s.queues[role] = Some(q);
            index += 1;
        }
        mmio.driver_ok();
        Ok(s)
    }

    fn restart(&mut self) -> Result<(), ChaosError> {
        self.mmio.reset().map_err(ChaosError::Balloon)?;
        let s = BalloonSession::start(self.mmio, self.area)?;
        self.queues = s.queues;
        Ok(())
    }

    /// The page of page frame numbers (the second half holds statistics buffers).
    fn buf(&self) -> u64 {
        self.area + 4 * PAGE
    }

    /// Writes `pfns` (at most 512) at the start of the page-number page; returns their
    /// length in bytes.
    fn pfns(&self, pfns: &[u32]) -> u32 {
        for (k, &p) in pfns.iter().enumerate() {
            // SAFETY: k < 512 le32 entries in the first half of the page (reserved).
            unsafe { (self.buf() as *mut u32).add(k).write_volatile(p) };
        }
        pfns.len() as u32 * 4
    }

    /// Sends the chain `descs` on queue `which` with `head` in the driver ring and the
    /// ring index moved on by `advance`, waits for the answer and prints it; returns 1
    /// (a request sent) or 0 if the queue was not negotiated. The device is set up again
    /// when its queue state is unknown.
    fn case(&mut self, which: usize, what: &str, descs: &[Desc], head: u16, advance: u16) -> Result<u32, ChaosError> {
        let Some(q) = self.queues[which].as_mut() else { return Ok(0) };
        for (i, d) in descs.iter().enumerate() {
            q.write_desc(i as u16, *d);
        }
        q.publish(self.mmio, head, advance);
        print!("chaos: balloon {what}: ");
        let resync = match q.wait_used(self.mmio, hc::clock_ns, CASE_TIMEOUT_NS) {
            Ok((id, len)) if id == u32::from(head) => {
                println!("used len {len}");
                false
            }
            Ok((id, _)) => {
                println!("used id {id}");
                true
            }
            Err(virtio::Error::Timeout) => {
                println!("no completion");
                true
            }
            Err(virtio::Error::NeedsReset) => {
                println!("device needs reset (status {:#x})", self.mmio.status());
                true
            }
            Err(e) => return Err(ChaosError::Balloon(e)),
        };
        if resync || advance != 1 {
            self.restart()?;
        }
        Ok(1)
    }

    /// One buffer of the page frame numbers `pfns` on `which`.
    fn pfn_case(&mut self, which: usize, what: &str, pfns: &[u32]) -> Result<u32, ChaosError> {
        let len = self.pfns(pfns);
        self.case(which, what, &[d(self.buf(), len, 0, 0)], 0, 1)
    }
}

/// Whether the page at `addr` reads all zero.
fn page_is_zero(addr: u64) -> bool {
    // SAFETY: the caller's page (scratch), not in the balloon when this is called.
    (0..PAGE as usize / 8).all(|k| unsafe { (addr as *const u64).add(k).read_volatile() } == 0)
}

/// Hostile balloon requests (see the module documentation for the list): returns how
/// many were sent (27 with every queue). Leaves the device reset.
fn balloon_requests(mmio: &Mmio, t: &BalloonTarget, mem_bytes: u64) -> Result<u32, ChaosError> {
    let mut s = BalloonSession::start(mmio, t.area)?;
    // RAM ends below 4 GiB (layout::MAX_RAM): page numbers fit in 32 bits.
    let after_ram = (mem_bytes / PAGE) as u32;
    let scratch = (t.scratch / PAGE) as u32;
    // A page of the image: never inflated, so only ever deflated.
    let never = (layout::IMAGE_MIN / PAGE) as u32;
    let mut n = 0;

    // Page frame numbers the device must refuse, one in each buffer.
    n += s.pfn_case(INFLATEQ, "inflate of the first page after RAM", &[after_ram])?;
    n += s.pfn_case(INFLATEQ, "inflate of page 0xffffffff", &[u32::MAX])?;
    // SAFETY: the scratch page is chaos mode's and not in the balloon.
    unsafe { crate::rt::fill_bytes(t.scratch as *mut u8, SCRATCH_FILL, PAGE as usize) };
    n += s.pfn_case(INFLATEQ, "inflate of one page twice in one buffer", &[scratch, scratch])?;
    n += s.pfn_case(INFLATEQ, "inflate of a page in the balloon", &[scratch])?;
    // Not hostile: the page goes back (MUST_TELL_HOST: usable once the buffer is back).
    let len = s.pfns(&[scratch]);
    s.case(DEFLATEQ, "deflate of that page (valid)", &[d(s.buf(), len, 0, 0)], 0, 1)?;
    println!("chaos: balloon scratch page after deflate: {}", if page_is_zero(t.scratch) { "reads zero" } else { "holds data" });
    n += s.pfn_case(DEFLATEQ, "deflate of a page deflated already", &[scratch])?;
    n += s.pfn_case(DEFLATEQ, "deflate of a page never inflated", &[never])?;
    n += s.pfn_case(DEFLATEQ, "deflate of page 0xffffffff", &[u32::MAX])?;

    // Malformed chains. The page-number page names the scratch page, so a chain the
    // device takes anyway shows as a loan.
    let len = s.pfns(&[scratch]);
    let (buf, stats) = (s.buf(), s.buf() + PAGE / 2);
    const N: u16 = DESC_F_NEXT;
    const W: u16 = DESC_F_WRITE;
    let mut c = 0;
    let mut chain = |s: &mut BalloonSession, which: usize, what: &str, descs: &[Desc]| {
        c += 1;
        s.case(which, what, descs, 0, 1)
    };
    n += chain(&mut s, INFLATEQ, "inflate buffer device-writable", &[d(buf, len, W, 0)])?;
    n += chain(&mut s, INFLATEQ, "inflate buffer of 7 bytes", &[d(buf, 7, 0, 0)])?;
    n += chain(&mut s, INFLATEQ, "inflate buffer across the end of RAM", &[d(mem_bytes - 4, 8, 0, 0)])?;
    n += chain(&mut s, INFLATEQ, "inflate buffer outside RAM", &[d(FAR_AWAY, len, 0, 0)])?;
    n += chain(&mut s, INFLATEQ, "inflate buffer of 0xfffffffc bytes", &[d(buf, 0xffff_fffc, 0, 0)])?;
    n += chain(&mut s, INFLATEQ, "inflate chain readable then writable", &[d(buf, len, N, 1), d(buf, len, W, 0)])?;
    n += chain(&mut s, INFLATEQ, "inflate chain looping on itself", &[d(buf, len, N, 0)])?;
    n += chain(&mut s, INFLATEQ, "inflate chain with next beyond the queue", &[d(buf, len, N, 0xfff0)])?;
    n += chain(&mut s, INFLATEQ, "inflate indirect table outside RAM", &[d(FAR_AWAY, 64, DESC_F_INDIRECT, 0)])?;
    n += chain(&mut s, INFLATEQ, "inflate of 65537 page numbers", &[d(t.bulk, TOO_MANY_PFNS * 4, 0, 0)])?;
    n += chain(&mut s, DEFLATEQ, "deflate buffer device-writable", &[d(buf, len, W, 0)])?;
    n += chain(&mut s, DEFLATEQ, "deflate buffer of 2 bytes", &[d(buf, 2, 0, 0)])?;
    n += chain(&mut s, STATSQ, "statistics buffer of 11 bytes", &[d(stats, 11, 0, 0)])?;
    n += chain(&mut s, STATSQ, "statistics buffer device-writable", &[d(stats, 80, W, 0)])?;
    // Free page reports cover only the page-number page (and, misaligned, half the next
    // reserved page), so a report the device takes anyway costs nothing.
    n += chain(&mut s, REPORTQ, "report at an unaligned address", &[d(buf + PAGE / 2, PAGE as u32, W, 0)])?;
    n += chain(&mut s, REPORTQ, "report device-readable", &[d(buf, PAGE as u32, 0, 0)])?;
    n += chain(&mut s, REPORTQ, "report of 100 bytes", &[d(buf, 100, W, 0)])?;
    n += chain(&mut s, REPORTQ, "report beyond RAM", &[d(mem_bytes, PAGE as u32, W, 0)])?;
    debug_assert_eq!(c, BALLOON_CHAINS);

    // A driver-ring entry naming a descriptor the queue does not have.
    n += s.case(INFLATEQ, "head beyond the queue", &[d(buf, len, 0, 0)], 100, 1)?;
    // The driver-ring index jumps by more than the queue size.
    let jump = s.queues[INFLATEQ].as_ref().map_or(0, |q| q.size()) + 100;
    n += s.case(INFLATEQ, "ring index jump", &[d(buf, len, 0, 0)], 0, jump)?;
    mmio.reset().map_err(ChaosError::Balloon)?;
    Ok(n)
}

/// After the hostile requests: set the balloon up as a normal driver would
/// (MUST_TELL_HOST), inflate the scratch page and deflate it, and report whether it came
/// back zero (the device discarded it). Leaves the device reset.
fn balloon_works(mmio: &Mmio, t: &BalloonTarget) -> Result<(), ChaosError> {
    let e = ChaosError::Balloon;
    mmio.negotiate(balloon::DEVICE_ID, |_| F_MUST_TELL_HOST).map_err(e)?;
    // SAFETY: pages 0 and 1 of the area (see `BalloonTarget`).
    let mut inflate = unsafe { Queue::setup_index(mmio, 0, t.area) }.map_err(e)?;
    // SAFETY: as above.
    let mut deflate = unsafe { Queue::setup_index(mmio, 1, t.area + PAGE) }.map_err(e)?;
    mmio.driver_ok();
    let buf = t.area + 4 * PAGE;
    // SAFETY: the first entry of the page-number page; the scratch page is chaos mode's
    // and not in the balloon (the device was reset).
    unsafe {
        (buf as *mut u32).write_volatile((t.scratch / PAGE) as u32);
        crate::rt::fill_bytes(t.scratch as *mut u8, SCRATCH_FILL, PAGE as usize);
    }
    let b = [Buf { addr: buf, len: 4, device_writes: false }];
    inflate.request(mmio, &b, hc::clock_ns, WORKS_TIMEOUT_NS).map_err(e)?;
    deflate.request(mmio, &b, hc::clock_ns, WORKS_TIMEOUT_NS).map_err(e)?;
    let zero = page_is_zero(t.scratch);
    mmio.reset().map_err(e)?;
    println!(
        "chaos: balloon works: page {:#x} inflated and deflated, {}",
        t.scratch,
        if zero { "came back zero" } else { "kept its contents" }
    );
    Ok(())
}
