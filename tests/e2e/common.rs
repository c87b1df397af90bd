//! Helpers shared by the end-to-end tests.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn amsvm() -> Command {
    assert!(
        Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: the end-to-end tests boot real VMs and need KVM"
    );
    let mut c = Command::new(env!("CARGO_BIN_EXE_amsvm"));
    c.env("AMSVM_LOG", "warn");
    c
}

/// Write `text` as `name` in `dir` and return its path.
pub fn write_config(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

pub fn run_config(path: &Path) -> Output {
    amsvm().arg("run").arg(path).output().expect("cannot start amsvm")
}

pub fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

/// One row of `amsvm run`'s summary table.
#[derive(Debug, Clone)]
pub struct Row {
    pub name: String,
    pub touched: u64,
    pub verified: u64,
    pub written: u64,
    pub failures: u64,
    pub disk_ok: u64,
    pub disk_bad: u64,
    pub exits: u64,
    pub rejected: u64,
    pub hpi: u64,
    /// Milliseconds vCPUs were blocked on page-ins.
    pub hpit_ms: f64,
    pub page_outs: u64,
    /// Highest balloon loan, pages (0 without a balloon).
    pub peak_loan: u64,
    pub outcome: String,
}

/// Parse the summary table that `amsvm run` prints on stdout.
pub fn summary(stdout: &str) -> Vec<Row> {
    let mut lines = stdout.lines().skip_while(|l| !l.starts_with("partition "));
    let header = lines.next().expect("no summary table in output");
    assert!(header.contains("verified") && header.contains("failures"));
    lines
        .take_while(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert!(f.len() >= 14, "short summary row: {l}");
            let n = |i: usize| f[i].parse::<u64>().unwrap_or_else(|_| panic!("bad number in summary row: {l}"));
            Row {
                name: f[0].to_string(),
                touched: n(1),
                verified: n(2),
                written: n(3),
                failures: n(4),
                disk_ok: n(5),
                disk_bad: n(6),
                exits: n(7),
                rejected: n(8),
                hpi: n(9),
                hpit_ms: f[10].parse().unwrap_or_else(|_| panic!("bad hpit-ms in summary row: {l}")),
                page_outs: n(11),
                peak_loan: n(12),
                outcome: f[13..].join(" "),
            }
        })
        .collect()
}

/// A minimal static ELF64 x86-64 native image: `code` at 2 MiB (the entry point), in one
/// segment of `memsz` bytes.
pub fn tiny_elf(code: &[u8], memsz: u64) -> Vec<u8> {
    let mut b = vec![0u8; 0x1000];
    b[..4].copy_from_slice(b"\x7fELF");
    b[4] = 2;
    b[5] = 1;
    b[6] = 1;
    b[16..18].copy_from_slice(&2u16.to_le_bytes());
    b[18..20].copy_from_slice(&62u16.to_le_bytes());
    b[20..24].copy_from_slice(&1u32.to_le_bytes());
    b[24..32].copy_from_slice(&0x20_0000u64.to_le_bytes());
    b[32..40].copy_from_slice(&64u64.to_le_bytes());
    b[52..54].copy_from_slice(&64u16.to_le_bytes());
    b[54..56].copy_from_slice(&56u16.to_le_bytes());
    b[56..58].copy_from_slice(&1u16.to_le_bytes());
    let ph = 64;
    b[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes());
    b[ph + 4..ph + 8].copy_from_slice(&5u32.to_le_bytes());
    b[ph + 8..ph + 16].copy_from_slice(&0x800u64.to_le_bytes());
    b[ph + 16..ph + 24].copy_from_slice(&0x20_0000u64.to_le_bytes());
    b[ph + 24..ph + 32].copy_from_slice(&0x20_0000u64.to_le_bytes());
    b[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes());
    b[ph + 40..ph + 48].copy_from_slice(&memsz.max(code.len() as u64).to_le_bytes());
    b[0x800..0x800 + code.len()].copy_from_slice(code);
    b
}

/// x86 snippets for hand-made native images.
pub mod asm {
    /// `mov dx, port; mov al, v; out dx, al`
    pub fn outb(port: u16, v: u8) -> Vec<u8> {
        let p = port.to_le_bytes();
        vec![0x66, 0xba, p[0], p[1], 0xb0, v, 0xee]
    }
    /// `jmp $`
    pub const SPIN: [u8; 2] = [0xeb, 0xfe];
    /// `ud2`
    pub const UD2: [u8; 2] = [0x0f, 0x0b];
}

/// Resident bytes of every anonymous mapping of exactly `size` bytes in `pid` (the
/// guest RAM regions), from /proc/PID/smaps; with the number of such mappings.
pub fn guest_rss(pid: u32, size: u64) -> Option<(u64, usize)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let mut total = 0;
    let mut count = 0;
    let mut in_guest = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                in_guest = b - a == size;
                count += in_guest as usize;
                continue;
            }
        }
        if in_guest && first == "Rss:" {
            total += line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024;
        }
    }
    Some((total, count))
}

/// Wait until every thread of `pid` is stopped (SIGSTOP is delivered asynchronously).
pub fn all_stopped(pid: u32) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(2) {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return false };
        let stopped = tasks.filter_map(|t| t.ok()).all(|t| {
            std::fs::read_to_string(t.path().join("stat"))
                .map(|st| st.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('T') || rest.starts_with('t')))
                .unwrap_or(true)
        });
        if stopped {
            return true;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    false
}

/// Run `amsvm run path` and sample, from the host side, the resident memory of its
/// `regions` guest RAM regions of `region_size` bytes every 20 ms. The process is stopped
/// for each sample, so that the regions are read at one instant (a frame moving from one
/// partition to another is never counted twice). Returns the exit status, stdout, stderr
/// and the samples (bytes).
pub fn run_sampled(path: &Path, region_size: u64, regions: usize) -> (std::process::ExitStatus, String, String, Vec<u64>) {
    use std::io::Read;
    let mut child = amsvm().arg("run").arg(path).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let pid = child.id();
    let mut samples = Vec::new();
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
        let s = all_stopped(pid).then(|| guest_rss(pid, region_size)).flatten();
        // SAFETY: as above.
        unsafe { libc::kill(pid as i32, libc::SIGCONT) };
        if let Some((rss, n)) = s {
            if n == regions {
                samples.push(rss);
            }
        }
        assert!(t0.elapsed() < Duration::from_secs(300), "amsvm did not finish in 5 minutes");
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = child.wait().unwrap();
    let (mut stdout, mut stderr) = (String::new(), String::new());
    child.stdout.take().unwrap().read_to_string(&mut stdout).unwrap();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    (status, stdout, stderr, samples)
}
