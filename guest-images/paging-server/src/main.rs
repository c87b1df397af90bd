//! amsvm's paging-server VM (the PowerVM VIOS role): a unikernel that runs entirely at
//! CPL3 (`docs/native-abi.md`). It owns one virtio-blk paging device per partition of
//! the pool and carries out the hypervisor's page-outs, page-ins, discards and flushes,
//! which arrive over VASI, a virtio-mmio device of amsvm's own. Data moves between the
//! devices and the transfer window in its RAM without a copy. Described in
//! `docs/vasi.md`; the device format and the records are the `paging-server` crate.
//!
//! The runtime (entry stub, `mem*`), hypercalls, console and virtio-mmio transport are
//! the workload image's files, compiled in here.
#![no_std]
#![no_main]

#[macro_use]
#[allow(dead_code, unused_macros)]
#[path = "../../workload/src/console.rs"]
mod console;
#[allow(dead_code)]
#[path = "../../workload/src/hc.rs"]
mod hc;
#[path = "../../workload/src/rt.rs"]
mod rt;
#[allow(dead_code)]
#[path = "../../workload/src/virtio.rs"]
mod virtio;

mod blk;
mod boot;
mod channel;
mod server;

use amsvm_abi::{exit, BootInfo, Progress};
use boot::PAGE;
use core::ptr::addr_of_mut;
use core::sync::atomic::{AtomicBool, Ordering};
use paging_server::format::{self, FormatError, Header, NAME_BYTES};
use paging_server::vasi::MAX_DEVICES;
use paging_server::{bitmap, plan};
use server::{Device, Server};

/// Longest WAIT when there is nothing to do (amsvm caps it at 100 ms anyway).
const WAIT_NS: u64 = 100_000_000;
/// PROGRESS at least every this many requests while busy (and whenever it goes idle).
const PROGRESS_EVERY: u64 = 256;
/// TSC cycles at least between two progress reports while requests keep coming (about
/// 10 ms at 2 GHz).
const PROGRESS_CYCLES: u64 = 20_000_000;

fn tsc() -> u64 {
    // SAFETY: rdtsc has no memory effects; CPL3 may use it (CR4.TSD is clear).
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// The paging devices' driver state, built in place (moving it would be an out-of-line
/// `memcpy`, see docs/workload.md). Paging device `i` is `DEVICES[i]`.
static mut DEVICES: [Device; MAX_DEVICES] = [const { Device::UNSET }; MAX_DEVICES];

/// Entered from `_start` (rt.rs) with the boot-info address.
extern "C" fn main(boot_info: *const BootInfo) -> ! {
    let boot = boot::validate(boot_info);

    // VASI first: its configuration says where the window is and whose devices these are.
    // SAFETY: `validate` checked the window.
    let mmio = unsafe { channel::negotiate(boot.vasi) }.unwrap_or_else(|e| fatal(exit::DEVICE_ERROR, format_args!("VASI: {e}")));
    let Some(cfg) = channel::read_config(&mmio) else {
        fatal(exit::BAD_CONFIG, format_args!("VASI configuration names more than {MAX_DEVICES} paging devices"))
    };
    if cfg.devices as usize != boot.blk_count {
        fatal(
            exit::BAD_CONFIG,
            format_args!("VASI configuration names {} paging devices, the boot-info page lists {} virtio-blk devices", cfg.devices, boot.blk_count),
        );
    }
    let mem = boot::plan(&boot, &cfg);
    let n = boot.blk_count;

    // Every paging device: set up, header checked against the partition it serves.
    // SAFETY: `main` runs once, on the one vCPU: this is the only reference to DEVICES.
    let all: &mut [Device; MAX_DEVICES] = unsafe { &mut *addr_of_mut!(DEVICES) };
    let devices = &mut all[..n];
    for (i, d) in devices.iter_mut().enumerate() {
        // SAFETY: `validate` checked the window; the queue page is this device's and the
        // request page is used by one batch at a time.
        match unsafe { d.blk.setup(boot.blk[i], mem.device_queue(i), mem.blk_requests) } {
            Ok(()) => {}
            Err(e @ blk::SetupError::ReadOnly) => fatal(exit::BAD_CONFIG, format_args!("device {i}: {e}")),
            Err(e) => fatal(exit::DEVICE_ERROR, format_args!("device {i}: {e}")),
        }
        let bytes = d.blk.capacity_bytes();
        if bytes < format::HEADER_BYTES as u64 {
            fatal(exit::BAD_CONFIG, format_args!("device {i}: {bytes} bytes, too small for a paging-device header"));
        }
        d.blk.transfer(false, 0, mem.scratch, format::HEADER_BYTES as u64);
        if let Err(e) = d.blk.finish() {
            fatal(exit::DEVICE_ERROR, format_args!("device {i}: reading the header: {e}"));
        }
        // SAFETY: the scratch block, just filled by the device (which is done with it).
        let block = unsafe { core::slice::from_raw_parts(mem.scratch as *const u8, format::HEADER_BYTES) };
        d.layout = match Header::decode_for(block, bytes, cfg.partition_ids[i]) {
            Ok(h) => h.layout,
            Err(e) => fatal(exit::BAD_CONFIG, format_args!("device {i}: {}", Why(&e))),
        };
    }

    // The slot bitmaps, read into RAM after the queue pages.
    let bitmap_bytes: u64 = devices.iter().map(|d| d.layout.bitmap_bytes).sum();
    if mem.bitmaps + bitmap_bytes > mem.end {
        let need = (mem.bitmaps + bitmap_bytes - boot.free_start) / 1024;
        fatal(
            exit::BAD_CONFIG,
            format_args!(
                "needs {} KiB of RAM from {:#x} to the window at {:#x} for queues and slot bitmaps, has {} KiB",
                need,
                boot.free_start,
                cfg.window_gpa,
                (mem.end - boot.free_start) / 1024
            ),
        );
    }
    let mut at = mem.bitmaps;
    for (i, d) in devices.iter_mut().enumerate() {
        d.bitmap = at;
        at += d.layout.bitmap_bytes;
        let (offset, bytes) = (d.layout.bitmap_offset, d.layout.bitmap_bytes);
        d.blk.transfer(false, offset / blk::SECTOR, d.bitmap, bytes);
        if let Err(e) = d.blk.finish() {
            fatal(exit::DEVICE_ERROR, format_args!("device {i}: reading the slot bitmap: {e}"));
        }
    }
    debug_assert!(at - boot.free_start == plan::work_pages(devices.iter().map(|d| d.layout.slots)) * PAGE);

    // Ready: the channel goes live and every request buffer is made available.
    // SAFETY: the three pages are the channel's (see `boot::plan`).
    let mut vasi = match unsafe { channel::Vasi::start(mmio, mem.vasi_requests, mem.vasi_completions, mem.vasi_buffers) } {
        Ok(v) => v,
        Err(e) => fatal(exit::DEVICE_ERROR, format_args!("{e}")),
    };
    print!("paging-server: window {} pages at {:#x}, {} request buffers, {} devices (used/slots", cfg.window_pages, cfg.window_gpa, vasi.buffers(), n);
    for d in devices.iter() {
        print!(" {}/{}", bitmap::count(d.map(), d.layout.slots), d.layout.slots);
    }
    println!(")");

    let mut server = Server::new(devices, cfg.window_gpa, cfg.window_pages);
    let mut reported = server.counters;
    hc::progress(&reported);
    // Completions posted but not notified yet. The WAIT below hands them to amsvm (it
    // takes them before the WAIT parks), so a lone request costs two exits: its disk
    // I/O and the WAIT. A request that comes first notifies them, so none waits behind
    // another request's I/O.
    let mut posted = false;
    let mut last_report = tsc();
    loop {
        let mut handled = 0u64;
        loop {
            let (i, len) = match vasi.next_request() {
                Ok(Some(r)) => r,
                Ok(None) => break,
                Err(e) => channel_failed(&vasi, &server.counters, e),
            };
            if posted {
                vasi.notify_completions();
                posted = false;
            }
            if len == 0 {
                // amsvm had no request for it after all: not a request, just give it back.
                vasi.recycle(i);
                handled += 1;
                continue;
            }
            let completion = server.handle(vasi.request_bytes(i, len));
            vasi.recycle(i);
            if let Some(c) = completion {
                if let Err(e) = vasi.complete(&c) {
                    channel_failed(&vasi, &server.counters, e);
                }
                posted = true;
            }
            handled += 1;
            if handled.is_multiple_of(PROGRESS_EVERY) {
                reported = server.counters;
                hc::progress(&reported);
            }
        }
        if handled > 0 && !posted {
            // Only buffers came back (no completion to hand over): tell amsvm, and look
            // again before waiting.
            vasi.notify();
            continue;
        }
        // Counters go out at most every PROGRESS_CYCLES while requests keep coming (a
        // PROGRESS is an exit, which costs tens of microseconds here), and when idle.
        let now = tsc();
        if server.counters != reported && now.wrapping_sub(last_report) >= PROGRESS_CYCLES {
            reported = server.counters;
            last_report = now;
            hc::progress(&reported);
        }
        // amsvm takes the posted completions and the buffers that came back before the
        // WAIT parks, and ends it when it puts a request in the used ring (the wake-up
        // is latched, so one that came since the last look ends the WAIT at once).
        posted = false;
        if !hc::wait(WAIT_NS) {
            if server.counters != reported {
                reported = server.counters;
                last_report = tsc();
                hc::progress(&reported);
            }
            if let Err(e) = vasi.check_device() {
                channel_failed(&vasi, &server.counters, e);
            }
        }
    }
}

/// The channel broke: nothing more can be served.
fn channel_failed(vasi: &channel::Vasi, p: &Progress, e: channel::Error) -> ! {
    vasi.fail();
    fatal_with(exit::DEVICE_ERROR, p, format_args!("{e}"))
}

/// One console line, then EXIT with `status` (zero counters).
fn fatal(status: u64, args: core::fmt::Arguments<'_>) -> ! {
    fatal_with(status, &Progress::default(), args)
}

/// One console line, then EXIT with `status` and the counters `p`.
fn fatal_with(status: u64, p: &Progress, args: core::fmt::Arguments<'_>) -> ! {
    println!("paging-server: {}", args);
    hc::exit(status, p)
}

/// What is wrong with a paging device's header, for the console.
struct Why<'a>(&'a FormatError);

impl core::fmt::Display for Why<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.0 {
            FormatError::Blank => f.write_str("blank, not formatted as a paging device"),
            FormatError::NotAPagingDevice => f.write_str("not an amsvm paging device (no AMSVMPG1 header)"),
            FormatError::BadChecksum => f.write_str("paging-device header checksum is wrong"),
            FormatError::UnsupportedVersion(v) => write!(f, "paging-device format version {v}, want {}", format::VERSION),
            FormatError::UnsupportedPageSize(p) => write!(f, "paging-device page size {p}, want 4096"),
            FormatError::BadLayout => f.write_str("paging-device header has an inconsistent layout"),
            FormatError::Truncated { header_bytes, device_bytes } => {
                write!(f, "device has {device_bytes} bytes, its header says {header_bytes}")
            }
            FormatError::WrongPartition { found_id, found_name, expected_id } => {
                write!(f, "belongs to partition {found_id} \"{}\", not to partition {expected_id}", Name(found_name))
            }
        }
    }
}

/// A partition name from a header: up to the first NUL, printable ASCII only.
struct Name<'a>(&'a [u8; NAME_BYTES]);

impl core::fmt::Display for Name<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        use core::fmt::Write;
        for &b in self.0.iter().take_while(|&&b| b != 0) {
            f.write_char(if b.is_ascii_graphic() || b == b' ' { b as char } else { '?' })?;
        }
        Ok(())
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    static PANICKING: AtomicBool = AtomicBool::new(false);
    if !PANICKING.swap(true, Ordering::Relaxed) {
        println!("paging-server: {}", info);
    }
    hc::exit_keep_progress(exit::PANIC)
}
