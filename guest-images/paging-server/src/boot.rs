//! The boot-info page and the memory plan: what amsvm gave the paging server, checked
//! before anything is touched.

use crate::{blk, fatal, virtio};
use amsvm_abi::{exit, layout, BootInfo, DeviceInfo, BOOT_INFO_MAGIC, BOOT_INFO_VERSION};
use paging_server::plan;
use paging_server::vasi::{self, Config, MAX_DEVICES};

pub const PAGE: u64 = 4096;

extern "C" {
    /// First byte after the loaded image (page aligned), from `link.ld`.
    static __image_end: u8;
}

/// What the boot-info page says, checked.
pub struct Boot {
    pub mem_bytes: u64,
    pub free_start: u64,
    pub free_end: u64,
    pub mailbox: u64,
    /// The VASI device's register window.
    pub vasi: u64,
    /// The virtio-blk devices' windows, in boot-info order: paging device `i` is
    /// `blk[i]`.
    pub blk: [u64; MAX_DEVICES],
    pub blk_count: usize,
}

macro_rules! ensure {
    ($cond:expr, $($arg:tt)*) => {
        if !$cond {
            fatal(exit::BAD_CONFIG, format_args!($($arg)*));
        }
    };
}

/// Checks the boot-info page as the workload does (magic, version, size, ports, a sane
/// free range after the image, the mailbox outside it, at most 16 devices) and finds
/// the VASI device and the virtio-blk devices.
pub fn validate(bi_ptr: *const BootInfo) -> Boot {
    let bi_addr = bi_ptr as u64;
    let bi_size = core::mem::size_of::<BootInfo>() as u64;
    ensure!(
        bi_addr != 0 && bi_addr.is_multiple_of(8) && bi_addr + bi_size <= layout::IMAGE_MIN,
        "boot-info address {:#x} is not an aligned address below the image",
        bi_addr
    );
    // SAFETY: an aligned address in the identity-mapped RAM below the image, written by
    // amsvm before entry and not changed afterwards. (Borrowed, not copied: a copy this
    // size would be an out-of-line memcpy call.)
    let bi = unsafe { &*bi_ptr };
    ensure!(bi.magic == BOOT_INFO_MAGIC, "boot-info magic {:#x}, want {:#x}", bi.magic, BOOT_INFO_MAGIC);
    ensure!(bi.version == BOOT_INFO_VERSION, "boot-info version {}, want {}", bi.version, BOOT_INFO_VERSION);
    ensure!(bi.size as u64 == bi_size, "boot-info size {}, want {}", bi.size, bi_size);
    ensure!(bi.serial_port == 0x3f8 && bi.hypercall_port == amsvm_abi::HYPERCALL_PORT, "unexpected ports");

    // Only the symbol's address is taken.
    let image_end = core::ptr::addr_of!(__image_end) as u64;
    let (mem, free_start, free_end) = (bi.mem_bytes, bi.free_start, bi.free_end);
    ensure!(
        free_start % PAGE == 0 && free_start >= image_end && free_start < free_end && free_end <= mem && mem <= layout::MAX_RAM,
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
            && mb.checked_add(mb_size).is_some_and(|end| end <= mem && (end <= layout::IMAGE_MIN || mb >= free_end)),
        "mailbox {:#x} is not in RAM outside the image and the free area",
        mb
    );
    crate::hc::configure(mb);
    ensure!(bi.device_count as usize <= layout::MAX_DEVICES, "device_count {} > {}", bi.device_count, layout::MAX_DEVICES);

    let devices = &bi.devices[..bi.device_count as usize];
    let window_ok = |d: &DeviceInfo| {
        d.mmio_base.is_multiple_of(PAGE) && d.mmio_base >= mem && d.mmio_size >= virtio::MIN_WINDOW && d.mmio_base.checked_add(d.mmio_size).is_some()
    };
    let mut vasi_base = None;
    let mut blk = [0u64; MAX_DEVICES];
    let mut blk_count = 0;
    for (i, d) in devices.iter().enumerate() {
        let named = match d.device_id {
            vasi::DEVICE_ID if vasi_base.is_none() => {
                vasi_base = Some(d.mmio_base);
                true
            }
            blk::DEVICE_ID => {
                ensure!(blk_count < MAX_DEVICES, "more than {} virtio-blk devices", MAX_DEVICES);
                blk[blk_count] = d.mmio_base;
                blk_count += 1;
                true
            }
            _ => false,
        };
        ensure!(
            !named || window_ok(d),
            "device {} (id {:#x}): window {:#x}+{:#x} is not a page-aligned window above RAM",
            i,
            d.device_id,
            d.mmio_base,
            d.mmio_size
        );
    }
    let Some(vasi) = vasi_base else { fatal(exit::BAD_CONFIG, format_args!("no VASI device (id {:#x})", vasi::DEVICE_ID)) };
    Boot { mem_bytes: mem, free_start, free_end, mailbox: mb, vasi, blk, blk_count }
}

/// Where everything the image uses lies (see `docs/vasi.md`):
///
/// ```text
/// free_start: VASI request queue | VASI completion queue | VASI buffers
///           | virtio-blk request page | scratch block | one queue page per device
///           | slot bitmaps, device by device | unused ... window (or free_end)
/// window_gpa: the transfer window (window_pages), used for transfers only
/// ```
pub struct Memory {
    pub vasi_requests: u64,
    pub vasi_completions: u64,
    pub vasi_buffers: u64,
    pub blk_requests: u64,
    pub scratch: u64,
    /// Queue page of paging device `i`: `device_queues + i * PAGE`.
    pub device_queues: u64,
    /// First bitmap page.
    pub bitmaps: u64,
    /// End of the memory the image may use for itself (the window or `free_end`).
    pub end: u64,
}

impl Memory {
    pub fn device_queue(&self, i: usize) -> u64 {
        self.device_queues + i as u64 * PAGE
    }
}

/// Checks the transfer window (page aligned, inside RAM, at or above `free_start`, so
/// outside the image and every boot structure, and not over the mailbox) and places the
/// image's own pages below it.
pub fn plan(boot: &Boot, cfg: &Config) -> Memory {
    let window = cfg.window_gpa;
    let window_end = (cfg.window_pages as u64).checked_mul(PAGE).and_then(|b| window.checked_add(b));
    let mb_end = boot.mailbox + core::mem::size_of::<amsvm_abi::Mailbox>() as u64;
    ensure!(
        cfg.window_pages > 0
            && window.is_multiple_of(PAGE)
            && window >= boot.free_start
            && window_end.is_some_and(|end| end <= boot.mem_bytes && (mb_end <= window || boot.mailbox >= end)),
        "transfer window of {} pages at {:#x}: must be page aligned, not empty, at or above free_start {:#x}, inside RAM (ends {:#x}) and clear of the mailbox",
        cfg.window_pages,
        window,
        boot.free_start,
        boot.mem_bytes
    );
    let start = boot.free_start;
    let end = boot.free_end.min(window);
    let devices = boot.blk_count as u64;
    let fixed = plan::FIXED_WORK_PAGES + devices;
    ensure!(
        start + fixed * PAGE <= end,
        "{} KiB of RAM between {:#x} and the window at {:#x}: queues and buffers alone need {} KiB",
        (end.saturating_sub(start)) / 1024,
        start,
        window,
        fixed * PAGE / 1024
    );
    Memory {
        vasi_requests: start,
        vasi_completions: start + PAGE,
        vasi_buffers: start + 2 * PAGE,
        blk_requests: start + 3 * PAGE,
        scratch: start + 4 * PAGE,
        device_queues: start + plan::FIXED_WORK_PAGES * PAGE,
        bitmaps: start + fixed * PAGE,
        end,
    }
}
