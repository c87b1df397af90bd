//! The workload guest under other VMMs (docs/workload.md, "Other VMMs"): QEMU's microvm
//! boots the very image amsvm embeds through its PVH entry, and amsvm's own Linux loader
//! boots it through the Linux x86-64 boot protocol. Settings come from the kernel command
//! line, progress and the result from the console, the exit status from QEMU's
//! isa-debug-exit device.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::common::*;

const QEMU: &str = "qemu-system-x86_64";
/// QEMU's isa-debug-exit turns the workload's status `s` into the exit code `2s + 1`.
const QEMU_OK: i32 = 1;
const QEMU_BAD_CONFIG: i32 = 2 * 2 + 1;

/// The workload ELF this build embeds in amsvm (vmm/build.rs).
fn workload_elf() -> &'static str {
    let path = vmm::images::workload_elf_path();
    assert!(Path::new(path).is_file(), "the workload image {path} that vmm/build.rs built is missing");
    path
}

/// QEMU's microvm with the flags the workload needs (docs/workload.md): `acpi=off`, or
/// microvm lists its virtio-mmio devices in the DSDT instead of on the command line;
/// virtio 1.x virtio-mmio (QEMU's default is the legacy interface); the debug-exit
/// device; no reboot on a triple fault.
fn qemu(mem_mib: u32, devices: &[&str], append: &str) -> Command {
    assert!(Path::new("/dev/kvm").exists(), "/dev/kvm is missing: the peer tests boot real VMs and need KVM");
    let found = Command::new(QEMU).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status();
    assert!(
        found.is_ok_and(|s| s.success()),
        "{QEMU} not found or not working: the peer tests boot the workload under QEMU; install qemu-system-x86 \
         (.ci/run does)"
    );
    let mut c = Command::new(QEMU);
    c.args(["-M", "microvm,acpi=off", "-enable-kvm", "-cpu", "EPYC", "-m", &mem_mib.to_string()]);
    c.args(["-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio", "-no-reboot"]);
    c.args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-global", "virtio-mmio.force-legacy=false"]);
    for d in devices {
        c.args(["-device", d]);
    }
    c.args(["-kernel", workload_elf(), "-append", append]);
    c.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    c
}

/// A console line read by [`Console`], with when it arrived.
struct Line {
    at: Duration,
    text: String,
}

/// The guest's console (QEMU's stdout), read on a thread as it comes.
struct Console {
    rx: mpsc::Receiver<Line>,
    lines: Vec<Line>,
}

impl Console {
    fn new(child: &mut Child, started: Instant) -> Console {
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for text in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(Line { at: started.elapsed(), text }).is_err() {
                    break;
                }
            }
        });
        Console { rx, lines: Vec::new() }
    }

    /// Waits (up to `timeout`) for a line starting with `prefix`; returns its index.
    fn wait_for(&mut self, prefix: &str, timeout: Duration) -> Option<usize> {
        if let Some(i) = self.lines.iter().position(|l| l.text.starts_with(prefix)) {
            return Some(i);
        }
        let deadline = Instant::now() + timeout;
        while let Ok(line) = self.rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            let hit = line.text.starts_with(prefix);
            self.lines.push(line);
            if hit {
                return Some(self.lines.len() - 1);
            }
        }
        None
    }

    /// Everything until the console closes.
    fn drain(&mut self) {
        while let Ok(line) = self.rx.recv_timeout(Duration::from_secs(5)) {
            self.lines.push(line);
        }
    }

    fn text(&self) -> String {
        self.lines.iter().map(|l| format!("{}\n", l.text)).collect()
    }
}

/// Waits for `child` to end within `timeout`, killing it otherwise.
fn wait_or_kill(child: &mut Child, timeout: Duration, console: &Console) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("QEMU did not end within {timeout:?}; console so far:\n{}", console.text());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `key=value` words of a console line (after its `name:` tag) as numbers.
fn fields(line: &str) -> Vec<(String, u64)> {
    line.split_whitespace()
        .skip(1)
        .filter_map(|w| w.split_once('='))
        .filter_map(|(k, v)| v.parse().ok().map(|v| (k.to_string(), v)))
        .collect()
}

fn field(line: &str, key: &str) -> u64 {
    fields(line)
        .into_iter()
        .find(|(k, _)| k == key)
        .unwrap_or_else(|| panic!("no {key}= in console line {line:?}"))
        .1
}

/// A QMP session on QEMU's control socket.
struct Qmp(BufReader<UnixStream>);

impl Qmp {
    fn connect(path: &Path) -> Qmp {
        let t0 = Instant::now();
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if t0.elapsed() > Duration::from_secs(20) => panic!("cannot connect to QMP at {}: {e}", path.display()),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut q = Qmp(BufReader::new(s));
        q.reply(); // the greeting
        q.execute(r#"{"execute":"qmp_capabilities"}"#);
        q
    }

    /// The next message that is not an event.
    fn reply(&mut self) -> serde_json::Value {
        loop {
            let mut line = String::new();
            self.0.read_line(&mut line).expect("QMP read");
            let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("QMP sent {line:?}: {e}"));
            if v.get("event").is_none() {
                return v;
            }
        }
    }

    fn execute(&mut self, cmd: &str) -> serde_json::Value {
        self.0.get_mut().write_all(format!("{cmd}\n").as_bytes()).unwrap();
        let v = self.reply();
        assert!(v.get("return").is_some(), "QMP {cmd} failed: {v}");
        v["return"].clone()
    }
}

#[test]
fn qemu_boots_the_workload_through_pvh_and_its_balloon_follows_qmp() {
    const WS_MIB: u64 = 40;
    const IDLE_MIB: u64 = 24;
    let dir = tempfile::tempdir().unwrap();
    let qmp_path = dir.path().join("qmp.sock");
    let append = format!(
        "amsvm.working_set_mib={WS_MIB} amsvm.idle_mib={IDLE_MIB} amsvm.pattern=hotspot amsvm.write_pct=30 \
         amsvm.duration_ms=6000 amsvm.seed=1 amsvm.id=0 amsvm.progress_ms=250 amsvm.latency_from=0"
    );
    let started = Instant::now();
    let mut child = qemu(128, &["virtio-balloon-device"], &append)
        .args(["-qmp", &format!("unix:{},server=on,wait=off", qmp_path.display())])
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {QEMU}: {e}"));
    let mut console = Console::new(&mut child, started);
    let first = console.wait_for("progress: ", Duration::from_secs(60));
    let Some(first) = first else {
        let _ = child.kill();
        let _ = child.wait();
        console.drain();
        panic!("no progress line within 60 s; console:\n{}", console.text());
    };
    let time_to_progress = console.lines[first].at;

    // Take 48 MiB from the guest (it has 24 MiB of idle pages, and never-touched pages
    // after them), then give 32 MiB back.
    let mut qmp = Qmp::connect(&qmp_path);
    qmp.execute(r#"{"execute":"balloon","arguments":{"value":83886080}}"#);
    let t0 = Instant::now();
    let mut actual = 0;
    while t0.elapsed() < Duration::from_secs(10) {
        actual = qmp.execute(r#"{"execute":"query-balloon"}"#)["actual"].as_u64().unwrap();
        if actual == 80 << 20 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(actual, 80 << 20, "the balloon did not inflate to the target; console:\n{}", console.text());
    qmp.execute(r#"{"execute":"balloon","arguments":{"value":117440512}}"#);
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(10) {
        actual = qmp.execute(r#"{"execute":"query-balloon"}"#)["actual"].as_u64().unwrap();
        if actual == 112 << 20 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(actual, 112 << 20, "the balloon did not deflate to the target; console:\n{}", console.text());

    let status = wait_or_kill(&mut child, Duration::from_secs(60), &console);
    console.drain();
    let out = console.text();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    eprintln!("QEMU microvm, PVH entry: first progress line {:.0} ms after QEMU started", time_to_progress.as_secs_f64() * 1000.0);
    assert_eq!(status.code(), Some(QEMU_OK), "QEMU exit status (2 x workload status + 1)\nconsole:\n{out}\nstderr:\n{stderr}");

    assert!(out.contains("workload: booted through the pvh entry"), "{out}");
    assert!(out.contains("1 virtio-mmio device(s)"), "the balloon from the command line: {out}");
    // Progress lines: every one parses, time and counters only grow, and every access is
    // a verify, a write or a failure.
    let progress: Vec<&str> = out.lines().filter(|l| l.starts_with("progress: ")).collect();
    assert!(progress.len() >= 16, "6 s at one line per 250 ms: {out}");
    let mut prev = (0, 0);
    for l in &progress {
        let (t, touched) = (field(l, "t_ms"), field(l, "touched"));
        assert_eq!(touched, field(l, "verified") + field(l, "written") + field(l, "failures"), "{l}");
        assert_eq!(field(l, "failures"), 0, "{l}");
        assert!(t >= prev.0 && touched >= prev.1, "progress went backwards at {l}");
        prev = (t, touched);
    }
    // The end: status OK, no failures, and the final pass verified the whole working set
    // and the idle pages not loaned.
    let exit_line = out.lines().find(|l| l.starts_with("exit: ")).unwrap_or_else(|| panic!("no exit line: {out}"));
    assert!(exit_line.starts_with("exit: status=0 (OK)"), "{exit_line}");
    assert_eq!(field(exit_line, "failures"), 0);
    assert!(field(exit_line, "verified") > WS_MIB * 256, "{exit_line}");
    assert_eq!(
        field(exit_line, "touched"),
        field(exit_line, "verified") + field(exit_line, "written"),
        "{exit_line}"
    );
    assert!(out.lines().any(|l| l.starts_with("workload: ") && l.ends_with("failures 0; disk 0 ok 0 bad; OK")), "{out}");
    // The balloon driver followed both targets through QEMU's virtio-balloon.
    let balloon = out.lines().find(|l| l.starts_with("balloon: inflated")).unwrap_or_else(|| panic!("no balloon line: {out}"));
    let words: Vec<&str> = balloon.split([' ', ',']).filter(|w| !w.is_empty()).collect();
    let after = |w: &str| words.iter().position(|x| *x == w).and_then(|i| words.get(i + 1)).and_then(|v| v.parse::<u64>().ok());
    assert_eq!(after("inflated"), Some(48 * 256), "{balloon}");
    assert_eq!(after("deflated"), Some(32 * 256), "{balloon}");
    assert_eq!(words.iter().position(|w| *w == "now").and_then(|i| words[i + 1].parse::<u64>().ok()), Some(16 * 256), "{balloon}");
    assert!(!balloon.contains("device error"), "{balloon}");
    // The latency histogram (amsvm.latency_from=0): every access is in it.
    let lat = out.lines().find(|l| l.starts_with("latency: ")).unwrap_or_else(|| panic!("no latency line: {out}"));
    let buckets = lat.split("buckets=").nth(1).unwrap();
    let counted: u64 = buckets.split(',').map(|b| b.split_once(':').unwrap().1.parse::<u64>().unwrap()).sum();
    let accesses: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("workload: ").and_then(|l| l.split_once(" accesses in ")).map(|(n, _)| n.parse().unwrap()))
        .unwrap();
    assert_eq!(counted, accesses, "{lat}");
}

#[test]
fn qemu_names_a_bad_setting() {
    let mut child = qemu(128, &[], "amsvm.working_set_mib=8 amsvm.passes=1 amsvm.pattern=zigzag").spawn().unwrap();
    let mut console = Console::new(&mut child, Instant::now());
    let status = wait_or_kill(&mut child, Duration::from_secs(60), &console);
    console.drain();
    let out = console.text();
    assert_eq!(status.code(), Some(QEMU_BAD_CONFIG), "console:\n{out}");
    assert!(out.contains("workload: bad config: amsvm.pattern=zigzag: unknown pattern"), "{out}");
    assert!(out.contains("exit: status=2 (BAD_CONFIG)"), "{out}");

    // A working set larger than the guest's RAM is named too (after the command line,
    // by the same check amsvm's boot-info page goes through).
    let mut child = qemu(64, &[], "amsvm.working_set_mib=100 amsvm.passes=1").spawn().unwrap();
    let mut console = Console::new(&mut child, Instant::now());
    let status = wait_or_kill(&mut child, Duration::from_secs(60), &console);
    console.drain();
    let out = console.text();
    assert_eq!(status.code(), Some(QEMU_BAD_CONFIG), "console:\n{out}");
    assert!(out.contains("workload: bad config: working set of 25600 pages does not fit"), "{out}");
}

#[test]
fn amsvm_boots_the_workload_through_the_linux_boot_protocol() {
    let o = amsvm()
        .args(["boot", "--kernel", workload_elf(), "--mem", "64", "--cmdline"])
        .arg("amsvm.working_set_mib=16 amsvm.pattern=uniform amsvm.passes=3 amsvm.id=2")
        .output()
        .unwrap();
    let (stdout, stderr) = text(&o);
    assert_eq!(o.status.code(), Some(0), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("[linux] workload: booted through the linux entry"), "{stdout}");
    assert!(stdout.contains("[linux] workload: partition 2, 4096 pages (16 MiB)"), "{stdout}");
    let exit_line = stdout.lines().find_map(|l| l.strip_prefix("[linux] exit: ")).unwrap_or_else(|| panic!("{stdout}"));
    assert!(exit_line.starts_with("status=0 (OK)"), "{exit_line}");
    // 3 passes and the final pass over 4096 pages.
    assert_eq!(field(&format!("exit: {exit_line}"), "touched"), 4 * 4096, "{exit_line}");
    assert_eq!(field(&format!("exit: {exit_line}"), "failures"), 0, "{exit_line}");
    // The workload powers off through the ACPI tables amsvm's Linux loader writes.
    let rows = summary(&stdout);
    assert_eq!(rows[0].outcome, "powered off", "{stdout}");
}
