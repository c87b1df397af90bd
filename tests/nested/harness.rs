//! The nested harness: QEMU in software emulation (TCG) gives an L1 Linux an emulated AMD
//! CPU with SVM; L1 loads kvm_amd and runs amsvm, which boots L2 Linux guests
//! (NESTED-HARNESS.md). A scenario is an L1 shell script (with any files it needs) put in
//! `/scenario` of L1's initramfs; everything L1, amsvm and the guests print comes back on
//! the serial console, with the time it arrived, and the scenario's checks read it.
//!
//! Console conventions:
//! - `amsvm-l1: ...` lines come from L1 (its /init in guest-images/nested/build.sh, and
//!   the scenario scripts); `amsvm-l1: FAIL: why` says what went wrong in L1.
//! - `[name] ...` lines are partition `name`'s console, copied by amsvm (`--console`,
//!   `console_stdout`, or `amsvm boot`, whose partition is called `linux`); the guest's
//!   /init (guest-images/linux/build.sh) prints `amsvm-guest: ...` lines.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// The workspace root (tests/nested/../..).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("vmm/ lives in the workspace root").to_path_buf()
}

/// The L2 guest image built by guest-images/linux/build.sh; the tests fail (never skip)
/// when it is missing.
pub fn l2_dir() -> PathBuf {
    let dir = root().join("guest-images/linux/out");
    for f in ["vmlinuz", "initramfs.cpio.gz", "memverify"] {
        assert!(
            dir.join(f).is_file(),
            "{} is missing: the nested tests boot the Linux guest image; build it first with guest-images/linux/build.sh",
            dir.join(f).display()
        );
    }
    dir
}

/// QEMU TCG runs are CPU heavy (the machines have 2 cores): one scenario at a time, so
/// that each keeps to its time limit.
pub fn serialize() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// The L1 appliance built by guest-images/nested/build.sh around this build's amsvm.
pub struct L1 {
    pub kernel: PathBuf,
    pub cpio: PathBuf,
}

/// Build the L1 appliance once per test run (downloads are cached by the script).
pub fn l1() -> &'static L1 {
    static L1_IMAGE: OnceLock<Result<L1, String>> = OnceLock::new();
    let r = L1_IMAGE.get_or_init(|| {
        let l2 = l2_dir();
        let qemu = Command::new("qemu-system-x86_64").arg("--version").output();
        if !qemu.is_ok_and(|o| o.status.success()) {
            return Err("qemu-system-x86_64 is not installed (Debian: apt-get install qemu-system-x86); \
                        the nested harness boots L1 with it"
                .into());
        }
        let amsvm = release_amsvm()?;
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("nested-l1");
        let t = Instant::now();
        let o = Command::new(root().join("guest-images/nested/build.sh"))
            .env("AMSVM_BIN", &amsvm)
            .env("AMSVM_L2", &l2)
            .env("AMSVM_NESTED_OUT", &out)
            .output()
            .map_err(|e| format!("cannot run guest-images/nested/build.sh: {e}"))?;
        if !o.status.success() {
            return Err(format!(
                "guest-images/nested/build.sh failed ({}):\n{}{}",
                o.status,
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ));
        }
        report(&format!(
            "[nested] L1 appliance with {} built in {:.1} s ({})",
            amsvm.display(),
            t.elapsed().as_secs_f64(),
            out.display()
        ));
        Ok(L1 { kernel: out.join("vmlinuz"), cpio: out.join("l1.cpio") })
    });
    match r {
        Ok(l1) => l1,
        Err(e) => panic!("{e}"),
    }
}

/// The amsvm that goes into L1: the release build. This build's binary when the tests are
/// optimized (`cargo test --release`); otherwise (plain `cargo test`, as CI runs the suite)
/// the release binary next to it, brought up to date with `cargo build --release`:
/// measured in the harness, a debug amsvm pages about half as fast, which takes the
/// overcommit scenario past its time limit.
fn release_amsvm() -> Result<PathBuf, String> {
    let this = PathBuf::from(env!("CARGO_BIN_EXE_amsvm"));
    if !cfg!(debug_assertions) {
        return Ok(this);
    }
    // target/debug/amsvm -> target
    let target = this.parent().and_then(Path::parent).ok_or_else(|| format!("no target directory above {}", this.display()))?;
    let t = Instant::now();
    let o = Command::new(env!("CARGO"))
        .args(["build", "--release", "-p", "vmm", "--bin", "amsvm"])
        .current_dir(root())
        .env("CARGO_TARGET_DIR", target)
        .output()
        .map_err(|e| format!("cannot run cargo build --release for the release amsvm: {e}"))?;
    if !o.status.success() {
        return Err(format!(
            "cargo build --release -p vmm --bin amsvm failed (the nested harness runs the release amsvm):\n{}",
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    report(&format!("[nested] debug test build: using the release amsvm (cargo build --release: {:.1} s)", t.elapsed().as_secs_f64()));
    Ok(target.join("release").join("amsvm"))
}

/// Print a line that `cargo test` does not capture (phase timings belong in the CI log
/// even when the test passes).
pub fn report(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// The CPU L1 gets: AMD with SVM and nested paging (TCG does not emulate VMX).
pub const QEMU_CPU: &str = "EPYC,+svm,+npt,-cx16";

/// A file in the scenario archive, under /scenario in L1.
#[derive(Clone)]
pub struct File {
    pub name: String,
    pub data: Vec<u8>,
    pub mode: u32,
}

impl File {
    pub fn text(name: &str, text: &str) -> File {
        File { name: name.into(), data: text.as_bytes().to_vec(), mode: 0o644 }
    }
    pub fn bytes(name: &str, data: Vec<u8>) -> File {
        File { name: name.into(), data, mode: 0o644 }
    }
}

/// Shell functions every scenario script starts with.
const PRELUDE: &str = r#"
SOCK=/tmp/amsvm.sock
# L1's heartbeat: a console that goes silent while it beats is a hang of amsvm or a
# guest; one that stops beating is a hang of L1 itself (see `run`).
(while sleep 5; do echo "amsvm-l1-alive"; done) &
say() { echo "amsvm-l1: $*"; }
fail() { echo "amsvm-l1: FAIL: $*"; }
# stat_until SECONDS PATTERN WHAT: poll `amsvm stat --json` until its output matches the
# grep -E PATTERN; print the matching snapshot ("amsvm-l1: stat {json}"), or FAIL.
stat_until() {
    limit=$(( $(cut -d. -f1 /proc/uptime) + $1 ))
    while :; do
        s=$(amsvm stat --json --socket $SOCK 2>&1)
        if echo "$s" | grep -qE "$2"; then
            say "stat $s"
            return 0
        fi
        if [ "$(cut -d. -f1 /proc/uptime)" -ge "$limit" ]; then
            fail "$3: not within $1 s; last stat: $s"
            return 1
        fi
        sleep 0.2
    done
}
"#;

/// A scenario: what L1 runs, and how long the whole QEMU run may take.
pub struct Scenario {
    pub name: &'static str,
    /// The L1 script (bash-less: busybox sh), run from /scenario after KVM is checked.
    pub script: String,
    pub files: Vec<File>,
    pub timeout: Duration,
}

/// One console line and when it arrived (seconds since QEMU was started).
#[derive(Debug, Clone)]
pub struct Line {
    pub t: f64,
    pub text: String,
}

#[derive(Debug, Clone, PartialEq)]
pub enum End {
    /// QEMU exited (L1 powered off, or rebooted on a panic: -no-reboot).
    Exited(Option<i32>),
    /// The run was killed at its time limit.
    TimedOut(Duration),
}

/// What a QEMU run printed.
pub struct Run {
    pub name: &'static str,
    pub lines: Vec<Line>,
    pub end: End,
    pub wall: f64,
    pub qemu_stderr: String,
    /// When L1 stopped running (seconds since QEMU's start): neither its heartbeat nor
    /// anything else came for `L1_SILENCE`.
    pub l1_hung_at: Option<f64>,
}

/// L1's heartbeat line (PRELUDE), kept out of `Run::lines`.
const ALIVE: &str = "amsvm-l1-alive";

/// How long L1 may go without its heartbeat (every 5 s) before it counts as hung.
const L1_SILENCE: Duration = Duration::from_secs(30);

/// Boot L1 with the scenario and collect the console until QEMU exits or the time limit.
///
/// One kind of failure is the emulator's, not amsvm's: L1 as a whole stops running (its
/// heartbeat stops, and nothing else is printed). The reboot scenario's run did so once in
/// CI (2026-12-05), with an L2 mid-boot; with two L1 vCPUs, QEMU's TCG nested SVM was seen
/// to leave a timer interrupt pending and never inject it (NESTED-HARNESS.md). Such a run
/// is ended at once, reported, and run once more; a second hang fails the scenario.
pub fn run(sc: Scenario) -> Run {
    let first = attempt(&sc);
    let Some(hung_at) = first.l1_hung_at else { return first };
    report(&format!(
        "[nested {}] L1 stopped running {:.1} s after QEMU's start (no heartbeat for {} s, last console line: {:?}): \
         a hang of the emulated machine, not of amsvm; running the scenario once more",
        sc.name,
        hung_at,
        L1_SILENCE.as_secs(),
        first.lines.last().map_or("", |l| l.text.as_str())
    ));
    attempt(&sc)
}

fn attempt(sc: &Scenario) -> Run {
    let l1 = l1();
    let _serial = serialize();
    let dir = tempfile::tempdir().unwrap();
    let initrd = dir.path().join("l1-scenario.cpio");
    let mut files = vec![File { name: "run.sh".into(), data: format!("{PRELUDE}\n{}", sc.script).into_bytes(), mode: 0o755 }];
    files.extend(sc.files.iter().cloned());
    let mut image = std::fs::read(&l1.cpio).unwrap_or_else(|e| panic!("{}: {e}", l1.cpio.display()));
    image.extend(newc(&files));
    std::fs::write(&initrd, image).unwrap();

    let t0 = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        // -cx16: with CMPXCHG16B, the 6.12 L1 kernel died about 1 boot in 8 of a double
        // fault right after SLUB's cmpxchg16b with EFLAGS garbage (QEMU 7.2 TCG, with
        // thread=single too); without it, no failure in the runs since. -smp 1: with 2
        // vCPUs, L2 sometimes waits forever for its first timer tick (NESTED-HARNESS.md).
        .args(["-accel", "tcg,thread=multi", "-cpu", QEMU_CPU, "-smp", "1", "-m", "2048"])
        .args(["-nodefaults", "-display", "none", "-serial", "stdio", "-monitor", "none", "-no-reboot"])
        .arg("-kernel")
        .arg(&l1.kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 panic=-1 mitigations=off quiet"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start qemu-system-x86_64");
    let (tx, rx) = std::sync::mpsc::channel::<Line>();
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut buf = Vec::new();
        while r.read_until(b'\n', &mut buf).is_ok_and(|n| n > 0) {
            let text = strip_ansi(&String::from_utf8_lossy(&buf));
            if tx.send(Line { t: t0.elapsed().as_secs_f64(), text }).is_err() {
                break;
            }
            buf.clear();
        }
    });
    let mut stderr = child.stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let mut lines = Vec::new();
    let deadline = t0 + sc.timeout;
    // The heartbeat starts with the scenario script; L1 is judged from then on.
    let mut last_alive: Option<f64> = None;
    let mut l1_hung_at = None;
    let keep = |l: Line, lines: &mut Vec<Line>, last_alive: &mut Option<f64>| {
        if l.text.trim() == ALIVE || l.text.starts_with("amsvm-l1: scenario start") {
            *last_alive = Some(l.t);
        }
        if l.text.trim() != ALIVE {
            lines.push(l);
        }
    };
    let end = loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(l) => keep(l, &mut lines, &mut last_alive),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                let st = child.wait().unwrap();
                break End::Exited(st.code());
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
        }
        let now = t0.elapsed().as_secs_f64();
        let silent_since = last_alive.map(|a| lines.last().map_or(a, |l| l.t.max(a)));
        let hung = silent_since.filter(|s| now - s >= L1_SILENCE.as_secs_f64());
        if Instant::now() >= deadline || hung.is_some() {
            let _ = child.kill();
            let _ = child.wait();
            while let Ok(l) = rx.try_recv() {
                keep(l, &mut lines, &mut last_alive);
            }
            l1_hung_at = hung;
            break End::TimedOut(sc.timeout);
        }
    };
    let _ = reader.join();
    let qemu_stderr = err_reader.join().unwrap_or_default();
    Run { name: sc.name, lines, end, wall: t0.elapsed().as_secs_f64(), qemu_stderr, l1_hung_at }
}

/// Remove terminal colour sequences (amsvm's tracing output) and the line end.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\u{1b}' && it.peek() == Some(&'[') {
            it.next();
            for d in it.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else if c != '\r' && c != '\n' {
            out.push(c);
        }
    }
    out
}

/// An uncompressed newc cpio archive of `files` under `scenario/`; the kernel unpacks it
/// over the L1 archive it is appended to.
fn newc(files: &[File]) -> Vec<u8> {
    fn entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, data: &[u8]) {
        let header = format!(
            "070701{ino:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        );
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
        out.extend_from_slice(data);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
    }
    let mut out = Vec::new();
    entry(&mut out, 1, "scenario", 0o040755, &[]);
    for (i, f) in files.iter().enumerate() {
        entry(&mut out, 2 + i as u32, &format!("scenario/{}", f.name), 0o100000 | f.mode, &f.data);
    }
    entry(&mut out, 0, "TRAILER!!!", 0, &[]);
    out
}

impl Run {
    /// The first line containing `needle`.
    pub fn find(&self, needle: &str) -> Option<&Line> {
        self.lines.iter().find(|l| l.text.contains(needle))
    }

    /// Every line containing `needle`.
    pub fn all<'a>(&'a self, needle: &'a str) -> impl Iterator<Item = &'a Line> + 'a {
        self.lines.iter().filter(move |l| l.text.contains(needle))
    }

    /// Partition `name`'s console lines, without the `[name] ` prefix.
    pub fn guest<'a>(&'a self, name: &str) -> impl Iterator<Item = (f64, &'a str)> + 'a {
        let prefix = format!("[{name}] ");
        self.lines.iter().filter_map(move |l| l.text.strip_prefix(prefix.as_str()).map(|t| (l.t, t)))
    }

    /// The value after `amsvm-l1: <key>` in L1's output, e.g. `amsvm exit status`.
    pub fn l1_value(&self, key: &str) -> Option<&str> {
        let needle = format!("amsvm-l1: {key} ");
        self.lines.iter().find_map(|l| l.text.strip_prefix(needle.as_str()).map(str::trim))
    }

    /// The last `n` console lines (for failure messages).
    pub fn tail(&self, n: usize) -> String {
        let skip = self.lines.len().saturating_sub(n);
        let mut s = String::new();
        for l in &self.lines[skip..] {
            s += &format!("{:7.2} {}\n", l.t, l.text);
        }
        s
    }

    /// A failure message: what went wrong, then the end of the console.
    pub fn failure(&self, why: &str) -> String {
        format!(
            "nested scenario {}: {why}\n--- last console lines (seconds since QEMU started) ---\n{}--- QEMU stderr (warnings) ---\n{}",
            self.name,
            self.tail(60),
            self.qemu_stderr.lines().filter(|l| !l.contains("TCG doesn't support requested feature")).collect::<Vec<_>>().join("\n")
        )
    }

    /// Did L1 come up with KVM and run the scenario to its end? The reason if not.
    pub fn check_l1(&self) -> Result<(), String> {
        if let Some(l) = self.find("amsvm-l1: FAIL:") {
            let first_l1_fail = l.text.trim_start_matches("amsvm-l1: FAIL: ").to_string();
            if self.find("amsvm-l1: kvm ready").is_none() {
                return Err(self.failure(&format!("L1 did not get a working KVM: {first_l1_fail}")));
            }
        }
        if let Some(p) = self.l1_panic() {
            return Err(self.failure(&format!("the L1 kernel crashed: {p}")));
        }
        if self.find("amsvm-l1: init").is_none() {
            return Err(self.failure(match self.end {
                End::TimedOut(_) => "L1 never reached its /init (QEMU hung?)",
                End::Exited(_) => "QEMU exited before L1 reached its /init",
            }));
        }
        if self.find("amsvm-l1: kvm ready").is_none() {
            return Err(self.failure("L1 never reported a working KVM (kvm_amd with nested paging, /dev/kvm)"));
        }
        let last_phase = self.lines.iter().rev().find(|l| l.text.starts_with("amsvm-l1:")).map_or("none", |l| l.text.as_str());
        if let Some(at) = self.l1_hung_at {
            return Err(self.failure(&format!(
                "L1 stopped running {at:.1} s after QEMU's start, again (no heartbeat or other output for {} s; \
                 last phase reached: {last_phase})",
                L1_SILENCE.as_secs()
            )));
        }
        match (&self.end, self.l1_value("scenario exit status")) {
            (End::TimedOut(d), _) => Err(self.failure(&format!(
                "the run did not finish within its {} s limit (last phase reached: {})",
                d.as_secs(),
                last_phase
            ))),
            (End::Exited(_), None) => Err(self.failure("QEMU exited before the scenario script ended")),
            (End::Exited(_), Some(_)) => Ok(()),
        }
    }

    /// An L1 kernel panic or oops (not a guest's: those come with a `[name]` prefix).
    pub fn l1_panic(&self) -> Option<String> {
        self.lines
            .iter()
            .find(|l| {
                let kernel = l.text.starts_with("[ ") || !l.text.starts_with('[');
                kernel && (l.text.contains("Kernel panic") || l.text.contains("Oops:") || l.text.contains("BUG:"))
            })
            .map(|l| l.text.clone())
    }

    /// The time of the first line containing `needle`.
    pub fn at(&self, needle: &str) -> Option<f64> {
        self.find(needle).map(|l| l.t)
    }

    /// Print the phase timings: each named marker with the time it was reached and the
    /// time since the previous one.
    pub fn timings(&self, phases: &[(&str, Option<f64>)]) {
        let mut s = format!("[nested {}] phases (s since QEMU start):", self.name);
        let mut prev = 0.0;
        for (label, t) in phases {
            match t {
                Some(t) => {
                    s += &format!(" {label} {t:.1} (+{:.1});", t - prev);
                    prev = *t;
                }
                None => s += &format!(" {label} -;"),
            }
        }
        s += &format!(" QEMU exit {:.1}", self.wall);
        report(&s);
    }

    /// The timings every scenario has: L1 /init, KVM ready, the scenario's end.
    pub fn l1_phases(&self) -> Vec<(&'static str, Option<f64>)> {
        vec![("L1 /init", self.at("amsvm-l1: init")), ("kvm_amd ready", self.at("amsvm-l1: kvm ready"))]
    }
}

/// The kernel command line of an L2 guest that runs `cmd` (no double quotes in it: the
/// guest's /init reads `amsvm.run="..."`).
pub fn l2_cmdline(cmd: &str) -> String {
    assert!(!cmd.contains('"'), "the guest command must not contain double quotes: {cmd}");
    format!("console=ttyS0 panic=-1 quiet amsvm.run=\"{cmd}\"")
}
