//! The workload's settings from a kernel command line, for VMMs other than amsvm (QEMU,
//! Firecracker, Cloud Hypervisor, amsvm's own Linux loader), which boot the image through
//! a CPL0 entry (`boot.rs`) and have no boot-info page to give it.
//!
//! Settings are `amsvm.<name>=<value>` words (documented in docs/workload.md), with the
//! names and defaults of amsvm's TOML `[partition.workload]`, so that a run under QEMU and
//! a run under amsvm with the same settings make the very same accesses. Virtio-mmio
//! devices come from `virtio_mmio.device=<size>@<base>:<irq>[:<id>]` words, the form QEMU's
//! microvm and Firecracker add to the command line (Linux's virtio_mmio module parameter).
//! Other words are ignored.
//!
//! Pure code, no I/O: `vmm/src/images.rs` compiles it for the host and tests it there.
//! [`parse`] fills a [`Settings`] in place (the image avoids moving large values).

use amsvm_abi::{balloon, pattern, WorkloadParams};

/// Prefix of the workload's own settings.
pub const PREFIX: &str = "amsvm.";
/// Most virtio-mmio devices taken from the command line (the boot-info page's limit).
pub const MAX_DEVICES: usize = amsvm_abi::layout::MAX_DEVICES;
/// Default least time between two progress lines on the console.
pub const DEFAULT_PROGRESS_MS: u64 = 1000;
/// Largest Zipf exponent amsvm's config accepts (`zipf_theta`), in thousandths.
pub const MAX_ZIPF_THETA_MILLI: u32 = 5000;

/// One `virtio_mmio.device=` entry: the register window and its interrupt (unused: the
/// workload polls). The device id is read from the device itself at probe time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MmioDevice {
    pub base: u64,
    pub size: u64,
    pub irq: u32,
}

/// Everything the command line sets.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// As amsvm would put them in the boot-info page (`seed` already mixed with `id`,
    /// `phase_accesses` 0 replaced by twice the working set, as amsvm's config does).
    pub workload: WorkloadParams,
    /// `amsvm.id`: the partition id stamped into every page.
    pub id: u32,
    /// `amsvm.tsc_khz`: the TSC frequency (0 = find it from CPUID or kvmclock).
    pub tsc_khz: u64,
    /// `amsvm.progress_ms`: least time between two progress lines (0 = at every report).
    pub progress_ms: u64,
    pub devices: [MmioDevice; MAX_DEVICES],
    pub device_count: usize,
}

/// The defaults of amsvm's TOML workload section (`vmm/src/config.rs`).
pub const DEFAULTS: Settings = Settings {
    workload: WorkloadParams {
        working_set_pages: 0,
        pattern: pattern::SEQUENTIAL,
        write_pct: 50,
        passes: 0,
        duration_ms: 0,
        seed: 1,
        zipf_theta_milli: 990,
        hot_pct: 10,
        hot_access_pct: 90,
        chaos: 0,
        phase_accesses: 0,
        report_every: 0,
        disk_test_blocks: 0,
        latency_from: u64::MAX,
        measure_latency: 0,
        balloon: balloon::COOPERATE,
        idle_pages: 0,
        turn_ms: 0,
        turns: 0,
        turn: 0,
        quiet_pct: 10,
        balloon_silent_ms: 0,
    },
    id: 0,
    tsc_khz: 0,
    progress_ms: DEFAULT_PROGRESS_MS,
    devices: [MmioDevice { base: 0, size: 0, irq: 0 }; MAX_DEVICES],
    device_count: 0,
};

/// A setting that cannot be used: the word as written (or the setting's name when it is
/// missing) and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bad<'a> {
    pub setting: &'a str,
    pub why: &'static str,
}

impl core::fmt::Display for Bad<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}: {}", self.setting, self.why)
    }
}

/// Parses `cmdline` into `s`, which must hold [`DEFAULTS`] (or earlier settings) on entry.
/// Later words win over earlier ones, as in Linux.
pub fn parse<'a>(cmdline: &'a [u8], s: &mut Settings) -> Result<(), Bad<'a>> {
    let mut working_set_mib: Option<(u64, &str)> = None;
    let mut idle_mib = 0u64;
    let mut seed = s.workload.seed;
    let mut phase_accesses = 0u64;
    for word in cmdline.split(|&b| b == b' ' || b == b'\t' || b == b'\n' || b == 0) {
        if word.is_empty() {
            continue;
        }
        let is_ours = word.starts_with(PREFIX.as_bytes());
        let is_mmio = word.starts_with(b"virtio_mmio.device=");
        if !is_ours && !is_mmio {
            continue;
        }
        let Ok(word) = core::str::from_utf8(word) else {
            return Err(Bad { setting: "amsvm.*", why: "a setting is not valid UTF-8" });
        };
        let bad = |why| Bad { setting: word, why };
        if is_mmio {
            let dev = parse_mmio_device(&word["virtio_mmio.device=".len()..]).ok_or(bad(
                "not <size>@<base>:<irq>[:<id>] (e.g. 512@0xfeb00e00:12)",
            ))?;
            if s.device_count == MAX_DEVICES {
                return Err(bad("more virtio-mmio devices than the workload takes (16)"));
            }
            s.devices[s.device_count] = dev;
            s.device_count += 1;
            continue;
        }
        let (name, value) = word[PREFIX.len()..].split_once('=').ok_or(bad("not name=value"))?;
        let w = &mut s.workload;
        let num = || number(value).ok_or(bad("not a number"));
        let num32 = || number(value).and_then(|v| u32::try_from(v).ok()).ok_or(bad("not a number below 2^32"));
        let pct = || num32().and_then(|v| if v <= 100 { Ok(v) } else { Err(bad("above 100")) });
        match name {
            "working_set_mib" => working_set_mib = Some((num()?, word)),
            "idle_mib" => idle_mib = num()?,
            "pattern" => {
                w.pattern = match value {
                    "sequential" => pattern::SEQUENTIAL,
                    "uniform" => pattern::UNIFORM,
                    "zipf" => pattern::ZIPF,
                    "hotspot" => pattern::HOTSPOT,
                    _ => return Err(bad("unknown pattern; use sequential, uniform, zipf or hotspot")),
                }
            }
            "write_pct" => w.write_pct = pct()?,
            "passes" => w.passes = num()?,
            "duration_ms" => w.duration_ms = num()?,
            "seed" => seed = num()?,
            "zipf_theta" => {
                w.zipf_theta_milli = thousandths(value)
                    .filter(|&m| m <= MAX_ZIPF_THETA_MILLI)
                    .ok_or(bad("not a number from 0 to 5 with at most 3 decimals"))?
            }
            "hot_pct" => {
                w.hot_pct = pct()?;
                if w.hot_pct == 0 {
                    return Err(bad("must be between 1 and 100"));
                }
            }
            "hot_access_pct" => w.hot_access_pct = pct()?,
            "phase_accesses" => phase_accesses = num()?,
            "report_every" => w.report_every = num()?,
            "disk_test_blocks" => w.disk_test_blocks = num()?,
            "balloon" => {
                w.balloon = match value {
                    "ignore" => balloon::IGNORE,
                    "cooperate" => balloon::COOPERATE,
                    "report" => balloon::COOPERATE_AND_REPORT,
                    _ => return Err(bad("unknown mode; use ignore, cooperate or report")),
                }
            }
            "turn_ms" => w.turn_ms = num()?,
            "turns" => w.turns = num32()?,
            "turn" => w.turn = num32()?,
            "quiet_pct" => w.quiet_pct = pct()?,
            "balloon_silent_ms" => w.balloon_silent_ms = num32()?,
            "latency_from" => {
                w.latency_from = num()?;
                w.measure_latency = 1;
            }
            "chaos" => return Err(bad("chaos mode runs under amsvm only (it aims at amsvm's devices and ports)")),
            "id" => s.id = num32()?,
            "tsc_khz" => {
                s.tsc_khz = num()?;
                if s.tsc_khz == 0 || s.tsc_khz > 100_000_000 {
                    return Err(bad("must be between 1 and 100000000 (kHz)"));
                }
            }
            "progress_ms" => s.progress_ms = num()?,
            _ => return Err(bad("unknown setting (see docs/workload.md)")),
        }
    }
    let w = &mut s.workload;
    let Some((mib, word)) = working_set_mib else {
        return Err(Bad { setting: "amsvm.working_set_mib", why: "missing: the working set size in MiB is required" });
    };
    let pages = mib.checked_mul(256).filter(|&p| p > 0).ok_or(Bad { setting: word, why: "must be at least 1 (MiB)" })?;
    w.working_set_pages = pages;
    w.idle_pages = idle_mib
        .checked_mul(256)
        .ok_or(Bad { setting: "amsvm.idle_mib", why: "too large" })?;
    if w.passes == 0 && w.duration_ms == 0 {
        return Err(Bad { setting: "amsvm.passes, amsvm.duration_ms", why: "set one (or both): the workload needs a limit" });
    }
    if w.turns > 1 {
        if w.turn >= w.turns {
            return Err(Bad { setting: "amsvm.turn", why: "must be below amsvm.turns" });
        }
        if w.turn_ms == 0 || w.turn_ms > 3_600_000 {
            return Err(Bad { setting: "amsvm.turn_ms", why: "must be between 1 and 3600000 when amsvm.turns > 1" });
        }
        if w.quiet_pct == 0 {
            return Err(Bad { setting: "amsvm.quiet_pct", why: "must be between 1 and 100 when amsvm.turns > 1" });
        }
    }
    // As amsvm's config does (`WorkloadConfig::to_params`).
    w.seed = seed ^ ((s.id as u64) << 32);
    w.phase_accesses = if phase_accesses == 0 { pages.saturating_mul(2) } else { phase_accesses };
    Ok(())
}

/// A number as Linux's `memparse` reads one: decimal or `0x` hexadecimal, optionally
/// followed by K, M or G (binary multiples). None if malformed or above 2^64.
fn mem_number(s: &str) -> Option<u64> {
    let (digits, shift) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 10),
        b'm' | b'M' => (&s[..s.len() - 1], 20),
        b'g' | b'G' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let v = number(digits)?;
    v.checked_mul(1 << shift)
}

/// A decimal or `0x` hexadecimal u64.
fn number(s: &str) -> Option<u64> {
    let (digits, radix) = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => (hex, 16),
        None => (s, 10),
    };
    if digits.is_empty() {
        return None;
    }
    let mut v: u64 = 0;
    for c in digits.bytes() {
        let d = (c as char).to_digit(radix)? as u64;
        v = v.checked_mul(radix as u64)?.checked_add(d)?;
    }
    Some(v)
}

/// A non-negative decimal with at most three decimals, in thousandths ("0.99" = 990).
fn thousandths(s: &str) -> Option<u32> {
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if int.is_empty() || frac.len() > 3 || !int.bytes().chain(frac.bytes()).all(|c| c.is_ascii_digit()) {
        return None;
    }
    let int: u32 = number(int).and_then(|v| u32::try_from(v).ok())?;
    let mut milli = 0u32;
    for (i, c) in frac.bytes().enumerate() {
        milli += (c - b'0') as u32 * [100, 10, 1][i];
    }
    int.checked_mul(1000)?.checked_add(milli)
}

/// `<size>@<base>:<irq>[:<id>]` (the optional platform device id is ignored).
fn parse_mmio_device(s: &str) -> Option<MmioDevice> {
    let (size, rest) = s.split_once('@')?;
    let (base, rest) = rest.split_once(':')?;
    let irq = rest.split_once(':').map_or(rest, |(irq, _)| irq);
    let dev = MmioDevice {
        base: mem_number(base)?,
        size: mem_number(size)?,
        irq: number(irq).and_then(|v| u32::try_from(v).ok())?,
    };
    (dev.size > 0 && dev.base.checked_add(dev.size).is_some()).then_some(dev)
}

// Compiled for the host by `vmm/src/images.rs` (`cargo test -p vmm --lib images`).
#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(line: &str) -> Result<Settings, String> {
        let mut s = DEFAULTS;
        parse(line.as_bytes(), &mut s).map(|()| s).map_err(|e| e.to_string())
    }

    #[test]
    fn settings_map_to_the_boot_info_fields_as_amsvm_config_does() {
        let s = parse_str(
            "console=ttyS0 amsvm.working_set_mib=40 amsvm.pattern=hotspot amsvm.duration_ms=5000 amsvm.seed=7 amsvm.id=3 \
             amsvm.write_pct=30 amsvm.hot_pct=20 amsvm.hot_access_pct=80 amsvm.idle_mib=8 amsvm.balloon=report \
             amsvm.report_every=1024 amsvm.turns=4 amsvm.turn=1 amsvm.turn_ms=250 amsvm.quiet_pct=5 \
             amsvm.tsc_khz=2500000 amsvm.progress_ms=200 amsvm.latency_from=100 amsvm.disk_test_blocks=16 \
             amsvm.balloon_silent_ms=900 amsvm.zipf_theta=1.25 amsvm.passes=3",
        )
        .unwrap();
        let w = s.workload;
        assert_eq!((w.working_set_pages, w.idle_pages), (40 * 256, 8 * 256));
        assert_eq!((w.pattern, w.write_pct, w.passes, w.duration_ms), (pattern::HOTSPOT, 30, 3, 5000));
        // amsvm mixes the partition id into the seed, and moves the hot spot every two
        // working sets by default.
        assert_eq!(w.seed, 7 ^ (3 << 32));
        assert_eq!(w.phase_accesses, 2 * 40 * 256);
        assert_eq!((w.hot_pct, w.hot_access_pct, w.zipf_theta_milli), (20, 80, 1250));
        assert_eq!((w.balloon, w.report_every, w.disk_test_blocks), (balloon::COOPERATE_AND_REPORT, 1024, 16));
        assert_eq!((w.turns, w.turn, w.turn_ms, w.quiet_pct, w.balloon_silent_ms), (4, 1, 250, 5, 900));
        assert_eq!((w.measure_latency, w.latency_from, w.chaos), (1, 100, 0));
        assert_eq!((s.id, s.tsc_khz, s.progress_ms, s.device_count), (3, 2_500_000, 200, 0));
    }

    #[test]
    fn defaults_are_amsvm_config_defaults() {
        let s = parse_str("amsvm.working_set_mib=1 amsvm.passes=1").unwrap();
        let w = s.workload;
        assert_eq!((w.pattern, w.write_pct, w.seed, w.zipf_theta_milli), (pattern::SEQUENTIAL, 50, 1, 990));
        assert_eq!((w.hot_pct, w.hot_access_pct, w.quiet_pct, w.balloon), (10, 90, 10, balloon::COOPERATE));
        assert_eq!((w.measure_latency, w.latency_from, w.phase_accesses), (0, u64::MAX, 512));
        assert_eq!((s.id, s.tsc_khz, s.progress_ms), (0, 0, DEFAULT_PROGRESS_MS));
        // Later words win; hexadecimal numbers are taken.
        let s = parse_str("amsvm.working_set_mib=1 amsvm.passes=1 amsvm.seed=0x10 amsvm.seed=5").unwrap();
        assert_eq!(s.workload.seed, 5);
        assert_eq!(parse_str("amsvm.working_set_mib=0x2 amsvm.passes=1").unwrap().workload.working_set_pages, 512);
    }

    #[test]
    fn virtio_mmio_devices_as_qemu_and_firecracker_write_them() {
        let s = parse_str(
            "amsvm.working_set_mib=1 amsvm.duration_ms=10 virtio_mmio.device=512@0xfeb00e00:12 \
             virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=0x1000@0xd0001000:6:1",
        )
        .unwrap();
        assert_eq!(s.device_count, 3);
        assert_eq!(s.devices[0], MmioDevice { base: 0xfeb0_0e00, size: 512, irq: 12 });
        assert_eq!(s.devices[1], MmioDevice { base: 0xd000_0000, size: 4096, irq: 5 });
        assert_eq!(s.devices[2], MmioDevice { base: 0xd000_1000, size: 4096, irq: 6 });
        for bad in ["512@0xfeb00e00", "@0x1000:5", "0@0x1000:5", "512@0xzz:5", "512@0x1000:x", "512@0xffffffffffffffff:5"] {
            let e = parse_str(&format!("amsvm.working_set_mib=1 amsvm.passes=1 virtio_mmio.device={bad}")).unwrap_err();
            assert!(e.starts_with(&format!("virtio_mmio.device={bad}: not <size>@<base>")), "{bad}: {e}");
        }
        let many: String = (0..17).map(|i| format!(" virtio_mmio.device=512@{:#x}:5", 0xd000_0000u64 + i * 512)).collect();
        let e = parse_str(&format!("amsvm.working_set_mib=1 amsvm.passes=1{many}")).unwrap_err();
        assert!(e.contains("more virtio-mmio devices"), "{e}");
    }

    #[test]
    fn a_bad_setting_is_named() {
        let base = "amsvm.working_set_mib=1 amsvm.passes=1";
        for (extra, want) in [
            ("amsvm.pattern=zigzag", "amsvm.pattern=zigzag: unknown pattern"),
            ("amsvm.write_pct=101", "amsvm.write_pct=101: above 100"),
            ("amsvm.passes=many", "amsvm.passes=many: not a number"),
            ("amsvm.zipf_theta=0.9999", "amsvm.zipf_theta=0.9999: not a number from 0 to 5"),
            ("amsvm.zipf_theta=5.5", "amsvm.zipf_theta=5.5: not a number from 0 to 5"),
            ("amsvm.hot_pct=0", "amsvm.hot_pct=0: must be between 1 and 100"),
            ("amsvm.balloon=maybe", "amsvm.balloon=maybe: unknown mode"),
            ("amsvm.chaos=1", "amsvm.chaos=1: chaos mode runs under amsvm only"),
            ("amsvm.tsc_khz=0", "amsvm.tsc_khz=0: must be between 1"),
            ("amsvm.id=4294967296", "amsvm.id=4294967296: not a number below 2^32"),
            ("amsvm.working_set", "amsvm.working_set: not name=value"),
            ("amsvm.workingset_mib=4", "amsvm.workingset_mib=4: unknown setting"),
            ("amsvm.working_set_mib=0", "amsvm.working_set_mib=0: must be at least 1"),
            ("amsvm.turns=2 amsvm.turn=2 amsvm.turn_ms=5", "amsvm.turn: must be below amsvm.turns"),
            ("amsvm.turns=2 amsvm.turn=1", "amsvm.turn_ms: must be between 1 and 3600000"),
        ] {
            let e = parse_str(&format!("{base} {extra}")).unwrap_err();
            assert!(e.starts_with(want), "{extra}: got {e:?}, want {want:?}");
        }
        assert!(parse_str("amsvm.passes=1").unwrap_err().starts_with("amsvm.working_set_mib: missing"));
        assert!(parse_str("amsvm.working_set_mib=1").unwrap_err().starts_with("amsvm.passes, amsvm.duration_ms: set one"));
        let mut s = DEFAULTS;
        assert_eq!(parse(b"amsvm.seed=\xff", &mut s).unwrap_err().why, "a setting is not valid UTF-8");
        // Words that are not ours are left alone, whatever they hold.
        assert!(parse_str("console=ttyS0 reboot=k virtio_mmio.foo=1 \u{e9} amsvm.working_set_mib=1 amsvm.passes=1").is_ok());
    }
}
