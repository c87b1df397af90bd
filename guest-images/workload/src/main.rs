//! amsvm's workload guest: a unikernel that runs entirely at CPL3 (see DESIGN.md and
//! `amsvm_abi`). It stamps and re-reads pages of a working set in a chosen access
//! pattern, verifying every word of every page it reads, and can first test a
//! virtio-blk device. Idle pages after the working set are stamped once and verified
//! at the end; a virtio-balloon driver may loan them (and free memory after them) to
//! the host. Settings come from `BootInfo::workload`; progress goes to amsvm through
//! the hypercall mailbox. Other VMMs (QEMU, Firecracker, Cloud Hypervisor) boot it
//! through the CPL0 entries of `boot.rs`, which build the boot-info page from the kernel
//! command line; it then reports through `platform.rs`. Described in `docs/workload.md`.
#![no_std]
#![no_main]

#[macro_use]
mod console;
mod acpi;
mod balloon;
mod boot;
mod chaos;
mod cmdline;
mod disk;
mod hc;
mod loan;
mod math;
mod page;
mod platform;
mod rt;
mod sampler;
mod virtio;

use amsvm_abi::{balloon as balloon_mode, exit, layout, pattern, BootInfo, Progress, WorkloadParams, BOOT_INFO_MAGIC, BOOT_INFO_VERSION};
use balloon::Balloon;
use loan::Check;
use core::sync::atomic::{AtomicBool, Ordering};
use page::{Expected, PAGE_SIZE};
use sampler::{Hotspot, PageSampler, Permutation, Rng, Zipf};

const PAGE: u64 = PAGE_SIZE as u64;
/// Verification failures printed on the console (the rest are only counted).
const MAX_PRINTED_FAILURES: u64 = 8;
/// Least time between two "pass" lines on the console.
const LINE_INTERVAL_NS: u64 = 1_000_000_000;
/// Alignment of a virtio-mmio register window.
const MMIO_ALIGN: u64 = 512;
/// Largest accepted Zipf exponent, in thousandths.
const MAX_ZIPF_THETA_MILLI: u32 = 10_000;

extern "C" {
    /// First byte after the loaded image (page aligned), from `link.ld`.
    static __image_end: u8;
}

/// Everything the run needs, derived from a validated boot-info page.
struct Plan {
    partition_id: u32,
    w: WorkloadParams,
    /// Working-set pages.
    n: u64,
    /// Idle pages, right after the working set (stamped pages `n..n + idle`).
    idle: u64,
    /// One version per stamped page (working set, then idle pages), at `free_start`:
    /// 0 = never written, else the version, or one of the markers of `loan`.
    versions: *mut u32,
    /// Page 0 of the working set.
    ws_base: u64,
    /// The virtio-blk window and the pages reserved for its driver (disk test or chaos
    /// mode).
    disk: Option<(u64, u64)>,
    /// The virtio-balloon window and the pages reserved for its driver (a balloon device
    /// and a mode other than IGNORE).
    balloon: Option<(u64, u64)>,
    /// `BootInfo::free_end` and `mem_bytes`.
    free_end: u64,
    mem_bytes: u64,
    /// Chaos mode's targets (`WorkloadParams::chaos`).
    chaos: Option<chaos::Targets>,
    report_every: u64,
    /// Access budget from `passes` (u64::MAX = none).
    max_accesses: u64,
    /// Time budget from `duration_ms` (0 = none).
    duration_ns: u64,
    /// Busy turns (`WorkloadParams::turn_ms`): pages accessed while quiet (0 = never
    /// quiet) and the length of a turn.
    quiet: u64,
    turn_ns: u64,
}

impl Plan {
    /// Is the workload busy at `now` (CLOCK nanoseconds)?
    fn busy_at(&self, now: u64) -> bool {
        self.quiet == 0 || (now / self.turn_ns) % self.w.turns as u64 == self.w.turn as u64
    }
}

/// Entered from `_start` (rt.rs) with the boot-info address amsvm wrote, or from
/// `boot::foreign_main` with the one it built.
extern "C" fn main(boot_info: *const BootInfo) -> ! {
    // First thing: one exit, so amsvm can time the start of the guest (`amsvm bench
    // startup` reports the time to the first exit as the time to the first instruction).
    let boot_ns = platform::clock_ns();
    let plan = configure(boot_info);
    print_settings(&plan);
    let setup_us = platform::clock_ns().saturating_sub(boot_ns) / 1000;
    println!("workload: ready {setup_us} us after its first instruction");
    let mut p = Progress::default();
    platform::progress(&p);

    if let Some(targets) = &plan.chaos {
        let r = chaos::run(targets, plan.partition_id, &mut p);
        platform::progress(&p);
        if let Err(e) = r {
            println!("chaos: {e}");
            finish(&p, 0, 0, true);
        }
    }

    if let Some((mmio, area)) = plan.disk.filter(|_| plan.w.disk_test_blocks > 0) {
        // SAFETY: `configure` checked the window and reserved `area` for the disk test.
        let r = unsafe { disk::run(mmio, area, plan.w.disk_test_blocks, plan.partition_id, &mut p) };
        platform::progress(&p);
        if let Err(e) = r {
            println!("disk: {e}");
            finish(&p, 0, 0, true);
        }
        println!("disk: {} blocks verified, {} failed", p.disk_blocks_verified, p.disk_failures);
    }

    stamp_idle(&plan, &mut p);
    // Built in place and never moved (see `Balloon`).
    let mut balloon = Balloon::off();
    if let Some((mmio, area)) = plan.balloon {
        let idle_base = plan.ws_base + plan.n * PAGE;
        let setup = balloon::Setup {
            mmio_base: mmio,
            area,
            mode: plan.w.balloon,
            idle_base,
            idle_pages: plan.idle,
            // Page frame numbers are le32: loan nothing above 16 TiB (the ABI's RAM ends
            // at 3 GiB anyway).
            loanable_pages: plan.free_end.min(1 << 44).saturating_sub(idle_base) / PAGE,
            // SAFETY: the idle pages' entries follow the working set's n entries.
            idle_versions: unsafe { plan.versions.add(plan.n as usize) },
            mem_bytes: plan.mem_bytes,
        };
        // SAFETY: `configure` checked the window and reserved `area`; from here on only
        // the driver writes the idle pages' versions, and nothing touches the pages from
        // `idle_base` on except the final pass (which skips loaned pages).
        unsafe { balloon.start(setup) };
        balloon.report_idle();
        balloon.poll();
    }

    let t0 = platform::clock_ns();
    let accesses = run(&plan, &mut p, t0, &mut balloon);
    balloon.poll();
    let reported = check_all(&plan, &mut p);
    let ms = platform::clock_ns().saturating_sub(t0) / 1_000_000;
    if balloon.started() {
        let b = &balloon;
        let c = &b.counters;
        println!(
            "balloon: inflated {}, deflated {}, loaned now {}, reported {} ({} read back zero, {} intact), stats served {}{}",
            c.inflated,
            c.deflated,
            b.loaned(),
            c.reported,
            reported.zero,
            reported.intact,
            c.stats_served,
            if b.failed() { "; device error" } else { "" }
        );
    }
    finish(&p, accesses, ms, balloon.failed())
}

/// Stamps every idle page once (version 1), as a normal page write.
fn stamp_idle(plan: &Plan, p: &mut Progress) {
    for i in plan.n..plan.n + plan.idle {
        // SAFETY: stamped page i < n + idle lies inside [free_start, free_end) and has a
        // version-table entry (checked in `configure`).
        unsafe {
            page::fill((plan.ws_base + i * PAGE) as *mut u64, &Expected::page(plan.partition_id, i, loan::IDLE_VERSION as u64));
            plan.versions.add(i as usize).write(loan::IDLE_VERSION);
        }
        p.pages_touched += 1;
        p.pages_written += 1;
        if (i + 1) % plan.report_every == 0 {
            platform::progress(p);
        }
    }
    platform::progress(p);
}

/// Prints the summary and exits with the verdict: DEVICE_ERROR if the disk test stopped
/// on a device error (or the balloon driver stopped on one), else VERIFY_FAILED if any
/// page or block read back wrong, else OK.
fn finish(p: &Progress, accesses: u64, ms: u64, device_error: bool) -> ! {
    let status = if device_error {
        exit::DEVICE_ERROR
    } else if p.verify_failures != 0 || p.disk_failures != 0 {
        exit::VERIFY_FAILED
    } else {
        exit::OK
    };
    let verdict = match status {
        exit::OK => "OK",
        exit::VERIFY_FAILED => "VERIFY_FAILED",
        _ => "DEVICE_ERROR",
    };
    println!(
        "workload: {} accesses in {} ms; touched {} verified {} written {} failures {}; disk {} ok {} bad; {}",
        accesses,
        ms,
        p.pages_touched,
        p.pages_verified,
        p.pages_written,
        p.verify_failures,
        p.disk_blocks_verified,
        p.disk_failures,
        verdict
    );
    platform::exit(status, p)
}

/// TSC cycles between two balloon polls while the balloon moves pages (3–10 ms at 1–3
/// GHz): a guest that pages hard makes few accesses per second, and its balloon must
/// still answer promptly, as an interrupt-driven driver would.
const BALLOON_POLL_CYCLES: u64 = 10_000_000;
/// TSC cycles between two polls once a poll found the target reached (13–40 ms). A poll
/// costs an exit (the target read; the status read is rarer, see `balloon.rs`), and
/// exits are dear here: polling every 2 M cycles cost 5 % of the workload's throughput,
/// and the 10 M-cycle poll still cost 7–9 % at 1x (pooled partitions with the balloon
/// ignored against cooperating, `amsvm run`, 20 s).
const BALLOON_IDLE_POLL_CYCLES: u64 = 40_000_000;

/// The access loop: returns the number of accesses made. The balloon driver is polled
/// whenever [`BALLOON_POLL_CYCLES`] (or, after a poll that moved nothing,
/// [`BALLOON_IDLE_POLL_CYCLES`]) passed, checked every 64 accesses with rdtsc, which
/// costs no exit.
fn run(plan: &Plan, p: &mut Progress, t0: u64, balloon: &mut Balloon) -> u64 {
    let w = &plan.w;
    let n = plan.n;
    let mut rng = Rng::new(w.seed);
    let mut sampler = match w.pattern {
        pattern::SEQUENTIAL => PageSampler::Sequential { n, next: 0 },
        pattern::UNIFORM => PageSampler::Uniform { n },
        // Exponent 0 gives every page the same weight.
        pattern::ZIPF if w.zipf_theta_milli == 0 => PageSampler::Uniform { n },
        pattern::ZIPF => PageSampler::Zipf {
            zipf: Zipf::new(n, w.zipf_theta_milli as f64 / 1000.0),
            perm: Permutation::new(n, w.seed ^ 0x5a49_5046_7065_726d),
        },
        _ => PageSampler::Hotspot(Hotspot::new(n, w.hot_pct, w.hot_access_pct, w.phase_accesses, &mut rng)),
    };
    let mut printed = 0;
    let mut accesses = 0u64;
    let mut next_report = plan.report_every;
    let mut passes_shown = 0;
    let mut last_line = t0;
    let latency_from = if w.measure_latency != 0 { w.latency_from } else { u64::MAX };
    // SAFETY: rdtsc has no memory effects; CPL3 may use it (CR4.TSD is clear).
    let mut last_poll = unsafe { core::arch::x86_64::_rdtsc() };
    let mut poll_every = BALLOON_POLL_CYCLES;
    let mut busy = plan.busy_at(platform::clock_ns());
    while accesses < plan.max_accesses {
        // Quiet: the first `quiet` pages only; the rest of the working set cools down.
        let i = if busy { sampler.sample(&mut rng) } else { rng.below(plan.quiet) };
        let write = rng.percent(w.write_pct);
        if accesses >= latency_from {
            // SAFETY: rdtsc has no memory effects; CPL3 may use it (CR4.TSD is clear).
            let t = unsafe { core::arch::x86_64::_rdtsc() };
            access(plan, i, write, p, &mut printed);
            // SAFETY: as above.
            let dt = unsafe { core::arch::x86_64::_rdtsc() }.wrapping_sub(t);
            platform::record_latency(dt);
        } else {
            access(plan, i, write, p, &mut printed);
        }
        accesses += 1;
        if accesses.is_multiple_of(64) && balloon.started() {
            // SAFETY: as above.
            let now = unsafe { core::arch::x86_64::_rdtsc() };
            if now.wrapping_sub(last_poll) >= poll_every {
                poll_every = if balloon.poll() { BALLOON_POLL_CYCLES } else { BALLOON_IDLE_POLL_CYCLES };
                last_poll = now;
            }
        }
        if accesses == next_report {
            next_report = next_report.saturating_add(plan.report_every);
            platform::progress(p);
            let now = platform::clock_ns();
            let elapsed = now.saturating_sub(t0);
            if plan.duration_ns != 0 && elapsed >= plan.duration_ns {
                break;
            }
            if w.balloon_silent_ms != 0 && balloon.started() && !balloon.silent() && elapsed >= w.balloon_silent_ms as u64 * 1_000_000 {
                balloon.go_silent();
                println!("balloon: the driver goes silent at {} ms (loaned now {})", elapsed / 1_000_000, balloon.loaned());
            }
            busy = plan.busy_at(now);
            let passes = accesses / n;
            if passes > passes_shown && now.saturating_sub(last_line) >= LINE_INTERVAL_NS {
                passes_shown = passes;
                last_line = now;
                println!(
                    "pass {} at {} ms: verified {} written {} failures {}",
                    passes,
                    elapsed / 1_000_000,
                    p.pages_verified,
                    p.pages_written,
                    p.verify_failures
                );
            }
        }
    }
    platform::progress(p);
    accesses
}

/// One access to working-set page `i`: restamp it with the next version, or verify it.
fn access(plan: &Plan, i: u64, write: bool, p: &mut Progress, printed: &mut u64) {
    // SAFETY: i < n; the table has n entries (checked in `configure`).
    let slot = unsafe { plan.versions.add(i as usize) };
    // SAFETY: as above.
    let version = unsafe { slot.read() };
    let addr = plan.ws_base + i * PAGE;
    p.pages_touched += 1;
    if write {
        // Version 0 means "never written" and the highest values are markers; skip them
        // should the counter ever wrap.
        let next = loan::next_version(version);
        // SAFETY: page i of the working set, inside [free_start, free_end).
        unsafe { page::fill(addr as *mut u64, &Expected::page(plan.partition_id, i, next as u64)) };
        // SAFETY: as above.
        unsafe { slot.write(next) };
        p.pages_written += 1;
    } else {
        verify(plan, i, version, p, printed);
    }
}

/// Verifies stamped page `i` (working set or idle) against `version`; true if it matched.
fn verify(plan: &Plan, i: u64, version: u32, p: &mut Progress, printed: &mut u64) -> bool {
    let addr = plan.ws_base + i * PAGE;
    let exp = Expected::page(plan.partition_id, i, version as u64);
    // SAFETY: stamped page i, inside [free_start, free_end).
    match unsafe { page::verify(addr as *const u64, &exp) } {
        Ok(()) => {
            p.pages_verified += 1;
            true
        }
        Err(m) => {
            p.verify_failures += 1;
            if *printed < MAX_PRINTED_FAILURES {
                *printed += 1;
                print!(
                    "VERIFY FAILED page {} want v{}: {} bad words, first word {} want {:#x} found {:#x}; page has ",
                    i, version, m.bad_words, m.word, m.expected, m.found
                );
                if m.found_magic() == amsvm_abi::PAGE_STAMP_MAGIC {
                    println!("stamp p{} page {} v{}", m.found_partition(), m.found_index(), m.found_version());
                } else if m.found_stamp == [0; 3] {
                    println!("zeros at offset 0");
                } else {
                    println!("no stamp");
                }
            }
            false
        }
    }
}

/// Reported pages found by the final pass, by what they held.
#[derive(Clone, Copy, Default)]
struct Reported {
    zero: u64,
    intact: u64,
}

/// The final pass: every page of the working set is verified once more, and every idle
/// page that is not loaned: exactly (its stamp, or zero once deflated), or, if it was
/// reported free, all zero or its intact stamp.
fn check_all(plan: &Plan, p: &mut Progress) -> Reported {
    let mut printed = 0;
    let mut reported = Reported::default();
    for i in 0..plan.n + plan.idle {
        // SAFETY: i < n + idle entries of the table.
        let version = unsafe { plan.versions.add(i as usize).read() };
        match loan::check(version) {
            Check::Skip => continue,
            Check::Exact(v) => {
                p.pages_touched += 1;
                verify(plan, i, v, p, &mut printed);
            }
            Check::ZeroOr(v) => {
                p.pages_touched += 1;
                // A stamped page starts with the (non-zero) magic: a zero first word
                // means the page must be all zero.
                // SAFETY: stamped page i, inside [free_start, free_end).
                let zero = unsafe { ((plan.ws_base + i * PAGE) as *const u64).read_volatile() } == 0;
                if verify(plan, i, if zero { 0 } else { v }, p, &mut printed) {
                    if zero {
                        reported.zero += 1;
                    } else {
                        reported.intact += 1;
                    }
                }
            }
        }
        if (i + 1) % plan.report_every == 0 {
            platform::progress(p);
        }
    }
    platform::progress(p);
    reported
}

fn print_settings(plan: &Plan) {
    let w = &plan.w;
    print!(
        "workload: partition {}, {} pages ({} MiB) at {:#x}, ",
        plan.partition_id,
        plan.n,
        (plan.n * PAGE) >> 20,
        plan.ws_base
    );
    match w.pattern {
        pattern::SEQUENTIAL => print!("sequential"),
        pattern::UNIFORM => print!("uniform"),
        pattern::ZIPF => print!("zipf s={}.{:03}", w.zipf_theta_milli / 1000, w.zipf_theta_milli % 1000),
        _ => print!("hotspot {}% gets {}%, moves every {}", w.hot_pct, w.hot_access_pct, w.phase_accesses),
    }
    print!(
        ", {}% writes, passes {}, {} ms, seed {}, disk blocks {}{}",
        w.write_pct,
        w.passes,
        w.duration_ms,
        w.seed,
        w.disk_test_blocks,
        if w.chaos != 0 { ", chaos" } else { "" }
    );
    if plan.idle > 0 {
        print!(", {} idle pages", plan.idle);
    }
    if plan.quiet > 0 {
        print!(", busy in turn {} of {} ({} ms each; quiet: {} pages)", w.turn, w.turns, w.turn_ms, plan.quiet);
    }
    if plan.balloon.is_some() {
        print!(", balloon {}", if w.balloon == balloon_mode::COOPERATE { "cooperate" } else { "report" });
    }
    println!();
}

/// Reports unusable settings and exits with BAD_CONFIG.
fn bad_config(args: core::fmt::Arguments<'_>) -> ! {
    println!("workload: bad config: {}", args);
    platform::exit(exit::BAD_CONFIG, &Progress::default())
}

macro_rules! ensure {
    ($cond:expr, $($arg:tt)*) => {
        if !$cond {
            bad_config(format_args!($($arg)*));
        }
    };
}

/// Validates the boot-info page and lays out the free RAM: `[free_start: version
/// table][disk driver pages][balloon driver pages][working set][idle pages][never
/// touched]` up to `free_end`.
fn configure(bi_ptr: *const BootInfo) -> Plan {
    let bi_addr = bi_ptr as u64;
    let bi_size = core::mem::size_of::<BootInfo>() as u64;
    // Off amsvm, `boot.rs` built the page (and the mailbox) inside the image.
    let ours = platform::foreign();
    ensure!(
        bi_addr != 0 && bi_addr.is_multiple_of(8) && (ours || bi_addr + bi_size <= layout::IMAGE_MIN),
        "boot-info address {:#x} is not an aligned address below the image",
        bi_addr
    );
    // SAFETY: an aligned address in the identity-mapped RAM below the image, written by
    // amsvm before entry and not changed afterwards (or a static of boot.rs). (Borrowed,
    // not copied: a copy this size would be an out-of-line memcpy call.)
    let bi = unsafe { &*bi_ptr };
    ensure!(bi.magic == BOOT_INFO_MAGIC, "boot-info magic {:#x}, want {:#x}", bi.magic, BOOT_INFO_MAGIC);
    ensure!(bi.version == BOOT_INFO_VERSION, "boot-info version {}, want {}", bi.version, BOOT_INFO_VERSION);
    ensure!(bi.size as u64 == bi_size, "boot-info size {}, want {}", bi.size, bi_size);
    // `serial_port` and `hypercall_port` are the ABI's fixed ports (see console.rs, hc.rs).
    ensure!(bi.serial_port == 0x3f8 && bi.hypercall_port == amsvm_abi::HYPERCALL_PORT, "unexpected ports");

    // Only the symbol's address is taken.
    let image_end = core::ptr::addr_of!(__image_end) as u64;
    let (mem, free_start, free_end) = (bi.mem_bytes, bi.free_start, bi.free_end);
    ensure!(
        free_start % PAGE == 0 && free_start >= image_end && free_start < free_end && free_end <= mem,
        "free RAM [{:#x}, {:#x}) of {:#x} bytes: must be page aligned, after the image (ends {:#x}) and inside RAM",
        free_start,
        free_end,
        mem,
        image_end
    );
    let mb_size = core::mem::size_of::<amsvm_abi::Mailbox>() as u64;
    let mb = bi.mailbox;
    ensure!(
        mb != 0
            && mb % 8 == 0
            && (ours || mb.checked_add(mb_size).is_some_and(|end| end <= mem && (end <= layout::IMAGE_MIN || mb >= free_end))),
        "mailbox {:#x} is not in RAM outside the image and the free area",
        mb
    );
    hc::configure(mb);
    ensure!(bi.device_count as usize <= layout::MAX_DEVICES, "device_count {} > {}", bi.device_count, layout::MAX_DEVICES);

    let w = bi.workload;
    let n = w.working_set_pages;
    ensure!(n > 0, "working_set_pages is 0");
    ensure!(w.pattern <= pattern::HOTSPOT, "unknown pattern {}", w.pattern);
    ensure!(w.write_pct <= 100, "write_pct {} > 100", w.write_pct);
    ensure!(w.passes != 0 || w.duration_ms != 0, "neither passes nor duration_ms is set");
    match w.pattern {
        pattern::ZIPF => ensure!(
            w.zipf_theta_milli <= MAX_ZIPF_THETA_MILLI,
            "zipf_theta_milli {} is above {}",
            w.zipf_theta_milli,
            MAX_ZIPF_THETA_MILLI
        ),
        pattern::HOTSPOT => ensure!(
            (1..=100).contains(&w.hot_pct) && w.hot_access_pct <= 100,
            "hot_pct {} must be 1..=100 and hot_access_pct {} at most 100",
            w.hot_pct,
            w.hot_access_pct
        ),
        _ => {}
    }

    if w.turns > 1 {
        ensure!(
            w.turn < w.turns && w.turn_ms > 0 && w.turn_ms <= 3_600_000 && (1..=100).contains(&w.quiet_pct),
            "busy turns: turn {} of {} turns of {} ms, quiet_pct {} (need turn < turns, 1..=3600000 ms, quiet_pct 1..=100)",
            w.turn,
            w.turns,
            w.turn_ms,
            w.quiet_pct
        );
    }
    ensure!(w.chaos <= 1, "chaos {} is not 0 (off) or 1 (on)", w.chaos);
    ensure!(
        w.balloon <= balloon_mode::COOPERATE_AND_REPORT,
        "balloon {} is not 0 (ignore), 1 (cooperate) or 2 (cooperate and report)",
        w.balloon
    );

    let devices = &bi.devices[..bi.device_count as usize];
    // amsvm and Firecracker space windows 4 KiB apart, QEMU's microvm 512 bytes.
    let window_ok = |d: &amsvm_abi::DeviceInfo| {
        d.mmio_base.is_multiple_of(MMIO_ALIGN) && d.mmio_base >= mem && d.mmio_size >= virtio::MIN_WINDOW && d.mmio_base.checked_add(d.mmio_size).is_some()
    };
    let blk = devices.iter().find(|d| d.device_id == disk::DEVICE_ID);
    if blk.is_none() && w.disk_test_blocks > 0 {
        bad_config(format_args!("disk_test_blocks is {} but there is no virtio-blk device", w.disk_test_blocks));
    }
    // The disk test needs the disk; chaos mode uses it when there is one.
    let disk = match blk {
        Some(d) if w.disk_test_blocks > 0 || w.chaos != 0 => {
            ensure!(
                window_ok(d),
                "virtio-blk window {:#x}+{:#x} is not a 512-byte-aligned window above RAM",
                d.mmio_base,
                d.mmio_size
            );
            Some(d.mmio_base)
        }
        _ => None,
    };
    // With IGNORE the balloon device is never touched.
    let balloon = match devices.iter().find(|d| d.device_id == balloon::DEVICE_ID) {
        Some(d) if w.balloon != balloon_mode::IGNORE => {
            ensure!(
                window_ok(d),
                "virtio-balloon window {:#x}+{:#x} is not a 512-byte-aligned window above RAM",
                d.mmio_base,
                d.mmio_size
            );
            Some(d.mmio_base)
        }
        _ => None,
    };

    // Bookkeeping first (version table, driver pages), then the working set, then the
    // idle pages.
    let avail = (free_end - free_start) / PAGE;
    let disk_pages = if disk.is_some() { disk::AREA_PAGES } else { 0 };
    let balloon_pages = if balloon.is_some() { balloon::AREA_PAGES } else { 0 };
    let reserved = disk_pages + balloon_pages;
    let table_pages = |stamped: u64| (stamped * 4).div_ceil(PAGE);
    // Whether `stamped` pages and their table fit next to the reserved pages.
    let fits = |stamped: Option<u64>| {
        stamped.is_some_and(|s| s <= avail && table_pages(s) + reserved + s <= avail)
    };
    // The most stamped pages that fit.
    let max_stamped = || {
        let mut max = avail.saturating_sub(reserved) * 1024 / 1025;
        while max > 0 && !fits(Some(max)) {
            max -= 1;
        }
        while fits(Some(max + 1)) {
            max += 1;
        }
        max
    };
    if !fits(Some(n)) {
        bad_config(format_args!(
            "working set of {} pages does not fit in {} free pages (at most {} pages fit)",
            n,
            avail,
            max_stamped()
        ));
    }
    let idle = w.idle_pages;
    if !fits(n.checked_add(idle)) {
        bad_config(format_args!(
            "idle_pages {} do not fit after a working set of {} pages in {} free pages (at most {} idle pages fit)",
            idle,
            n,
            avail,
            max_stamped().saturating_sub(n)
        ));
    }
    let stamped = n + idle;
    let versions = free_start;
    let disk_area = versions + table_pages(stamped) * PAGE;
    let balloon_area = disk_area + disk_pages * PAGE;
    let ws_base = balloon_area + balloon_pages * PAGE;
    // SAFETY: the table lies in the free RAM this image owns.
    unsafe { rt::fill_bytes(versions as *mut u8, 0, (table_pages(stamped) * PAGE) as usize) };

    let report_every = if w.report_every == 0 { amsvm_abi::DEFAULT_REPORT_EVERY } else { w.report_every };
    Plan {
        partition_id: bi.partition_id,
        w,
        n,
        idle,
        versions: versions as *mut u32,
        ws_base,
        disk: disk.map(|mmio| (mmio, disk_area)),
        balloon: balloon.map(|mmio| (mmio, balloon_area)),
        free_end,
        mem_bytes: mem,
        chaos: (w.chaos != 0).then(|| {
            let claimed = |a: u64| devices.iter().any(|d| a >= d.mmio_base && a - d.mmio_base < d.mmio_size);
            chaos::Targets {
                mem_bytes: mem,
                mmio_gap: (0..layout::MAX_DEVICES as u64)
                    .rev()
                    .map(|i| layout::MMIO_BASE + i * layout::MMIO_SIZE)
                    .find(|&a| !claimed(a)),
                unclaimed_free: !claimed(chaos::UNCLAIMED_MMIO),
                blk: disk.map(|mmio| (mmio, disk_area)),
                // The balloon driver's device and pages, before the driver starts.
                balloon: balloon.map(|mmio| {
                    let after_stamped = ws_base + stamped * PAGE;
                    chaos::BalloonTarget {
                        mmio,
                        area: balloon_area,
                        scratch: if after_stamped < free_end { after_stamped } else { balloon_area + 5 * PAGE },
                        bulk: ws_base,
                    }
                }),
            }
        }),
        report_every,
        max_accesses: if w.passes == 0 { u64::MAX } else { w.passes.saturating_mul(n) },
        duration_ns: w.duration_ms.saturating_mul(1_000_000),
        quiet: if w.turns > 1 { (n * w.quiet_pct as u64 / 100).max(1) } else { 0 },
        turn_ns: w.turn_ms.saturating_mul(1_000_000).max(1),
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    static PANICKING: AtomicBool = AtomicBool::new(false);
    if !PANICKING.swap(true, Ordering::Relaxed) {
        println!("workload: {}", info);
    }
    platform::exit_keep_progress(exit::PANIC)
}
