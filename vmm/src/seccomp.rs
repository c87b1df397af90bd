//! Seccomp filters for amsvm's threads: each thread that serves guests or clients runs
//! under an allow-list of the system calls its kind needs, so that a guest (or a client
//! of the control socket or the metrics listener) that takes one of them over cannot
//! open files, make sockets, start programs or use KVM beyond what that thread uses.
//!
//! Kinds (see `docs/security.md` for which thread is which, and which stay unfiltered):
//! - [`Kind::Vcpu`]: a guest partition's vCPU threads (`<partition>-vcpuN`);
//! - [`Kind::Device`]: a partition's device event loop (`<partition>-dev`);
//! - [`Kind::Pager`]: the pool's userfaultfd fault handlers (`<partition>-pager`), the
//!   loaning policy (`pool-loans`) and the paging server's vCPU thread; pagers run that
//!   vCPU too ([`crate::kvm::vcpu::SharedVcpu::try_run`]);
//! - [`Kind::Control`]: the control socket's acceptor and connection threads and the
//!   Prometheus listener's threads.
//!
//! A filter is applied by the thread itself, first thing in its body, after its setup
//! (pinning). A forbidden system call raises SIGSYS ([`Mode::Enforce`]); the handler,
//! installed once per process, writes one line naming the thread and the call and ends
//! the process with [`EXIT_FORBIDDEN_SYSCALL`]. [`Mode::Log`] lets the call through and
//! has the kernel log it (`audit: type=1326 … comm="<thread>" … syscall=N` in dmesg).
//!
//! The mode is process-wide and set once, before threads start ([`set_mode`]): the
//! `amsvm` binary sets it from `--seccomp` (default `enforce`); a program that links the
//! library without setting it (unit tests, fuzzing) gets [`Mode::Off`].

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, Ordering::Relaxed};
use std::sync::{Once, OnceLock};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition as Cond, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Exit status of a process whose filtered thread made a forbidden system call
/// (128 + SIGSYS, as a shell reports a process killed by SIGSYS).
pub const EXIT_FORBIDDEN_SYSCALL: i32 = 128 + libc::SIGSYS;

/// What a filter does with a system call outside its allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// SIGSYS: print the thread and the call, end the process (status 159).
    Enforce,
    /// Allow it; the kernel logs it (audit type 1326 in dmesg).
    Log,
    /// No filters at all.
    Off,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Log => "log",
            Mode::Off => "off",
        }
    }
}

/// The kinds of filtered threads; each has its own allow-list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    Vcpu,
    Device,
    Pager,
    Control,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Vcpu, Kind::Device, Kind::Pager, Kind::Control];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Vcpu => "vcpu",
            Kind::Device => "device",
            Kind::Pager => "pager",
            Kind::Control => "control",
        }
    }
}

const MODE_UNSET: u8 = u8::MAX;
static MODE: AtomicU8 = AtomicU8::new(MODE_UNSET);

/// Set the process's mode (once, on the main thread, before any filtered thread starts).
pub fn set_mode(m: Mode) {
    MODE.store(m as u8, Relaxed);
    if m != Mode::Off {
        prepare_process();
    }
}

/// Take out of filtered threads' way what the C library would otherwise open files for,
/// lazily, in whichever thread gets there first (a filtered thread may open nothing):
/// - glibc's malloc, once a process has more arenas than its threshold, computes its
///   arena limit from the number of CPUs by opening `/sys/devices/system/cpu/online`
///   (seen from the metrics thread). The limit is set now, to glibc's own default of 8
///   arenas per CPU, so it never looks.
/// - glibc's malloc, the first time a thread's arena heap shrinks (often when a thread
///   ends), reads `/proc/sys/vm/overcommit_memory` once (seen from `pool-loans`). A
///   short-lived thread makes that happen now: it allocates and frees enough that its
///   heap shrinks.
/// - glibc reports a fatal error (heap corruption, a failed internal assertion) on
///   `/dev/tty`, which it opens then, unless `LIBC_FATAL_STDERR_` is set: then on
///   stderr (writev) before it aborts, and the message is not lost.
fn prepare_process() {
    if std::env::var_os("LIBC_FATAL_STDERR_").is_none() {
        // Edition 2021: safe to call; this runs on the main thread before any other.
        std::env::set_var("LIBC_FATAL_STDERR_", "1");
    }
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    // SAFETY: mallopt only sets a malloc parameter; no allocation is in progress on
    // another thread of ours that it could disturb (glibc locks its own state).
    unsafe { libc::mallopt(libc::M_ARENA_MAX, (8 * cpus).min(i32::MAX as usize) as i32) };
    let warm = std::thread::Builder::new().name("amsvm-warmup".into()).stack_size(64 << 10).spawn(|| {
        // Below the mmap threshold (128 KiB), so from the thread's arena; 768 KiB in
        // all, well above the trim threshold (128 KiB), so freeing them shrinks the heap.
        let blocks: Vec<Vec<u8>> = (0..8).map(|i| vec![i as u8 + 1; 96 << 10]).collect();
        std::hint::black_box(&blocks);
    });
    if let Ok(t) = warm {
        let _ = t.join();
    }
}

/// The process's mode: what [`set_mode`] set, else [`Mode::Off`].
pub fn mode() -> Mode {
    match MODE.load(Relaxed) {
        x if x == Mode::Enforce as u8 => Mode::Enforce,
        x if x == Mode::Log as u8 => Mode::Log,
        _ => Mode::Off,
    }
}

/// Errors building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("building the {kind} filter: {source}")]
    Build { kind: &'static str, source: seccompiler::BackendError },
    #[error("compiling the {kind} filter: {source}")]
    Compile { kind: &'static str, source: seccompiler::BackendError },
    #[error("installing the {kind} filter: {source}")]
    Install { kind: &'static str, source: seccompiler::Error },
}

/// Apply `kind`'s filter to the calling thread, as the process's mode says. A filter
/// that cannot be installed in `enforce` mode ends the process (a thread must not run
/// unconfined when confinement was asked for); in `log` mode it is reported and the
/// thread goes on.
pub fn apply(kind: Kind) {
    let m = mode();
    if m == Mode::Off {
        return;
    }
    if let Err(e) = try_apply(kind, m) {
        let name = std::thread::current().name().unwrap_or("?").to_string();
        if m == Mode::Enforce {
            eprintln!("amsvm: seccomp: thread \"{name}\": {e}; exiting (--seccomp off runs without filters)");
            std::process::exit(1);
        }
        tracing::error!("seccomp: thread \"{name}\": {e}; it runs without a filter");
    }
}

fn try_apply(kind: Kind, m: Mode) -> Result<(), SeccompError> {
    remember_thread_name();
    if m == Mode::Enforce {
        install_sigsys_handler();
    }
    if kind == Kind::Control {
        // Threads that start threads: clone3 takes its flags in memory a filter cannot
        // read, so it is answered ENOSYS and glibc falls back to clone, whose flags the
        // allow-list checks (threads only, no new processes). Installed first: installing
        // a filter is itself a system call (prctl, seccomp) the allow-list must pass.
        static CLONE3: OnceLock<BpfProgram> = OnceLock::new();
        let p = match CLONE3.get() {
            Some(p) => p,
            None => {
                let p = clone3_enosys().map_err(|source| SeccompError::Build { kind: kind.name(), source })?;
                CLONE3.get_or_init(|| p)
            }
        };
        seccompiler::apply_filter(p).map_err(|source| SeccompError::Install { kind: kind.name(), source })?;
    }
    let prog = program(kind, m)?;
    seccompiler::apply_filter(prog).map_err(|source| SeccompError::Install { kind: kind.name(), source })?;
    Ok(())
}

/// The compiled filter of `kind` in mode `m` (compiled once per process).
fn program(kind: Kind, m: Mode) -> Result<&'static BpfProgram, SeccompError> {
    static PROGRAMS: [[OnceLock<BpfProgram>; 2]; 4] = [const { [const { OnceLock::new() }; 2] }; 4];
    let slot = &PROGRAMS[kind as usize][(m == Mode::Log) as usize];
    if let Some(p) = slot.get() {
        return Ok(p);
    }
    let p = compile(kind, m, std::env::consts::ARCH.try_into().expect("amsvm runs on x86_64"))?;
    Ok(slot.get_or_init(|| p))
}

/// Build and compile `kind`'s filter for `arch`.
pub fn compile(kind: Kind, m: Mode, arch: TargetArch) -> Result<BpfProgram, SeccompError> {
    let mismatch = if m == Mode::Log { SeccompAction::Log } else { SeccompAction::Trap };
    let rules = allow_list(kind).map_err(|source| SeccompError::Build { kind: kind.name(), source })?;
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, arch)
        .map_err(|source| SeccompError::Build { kind: kind.name(), source })?;
    filter.try_into().map_err(|source| SeccompError::Compile { kind: kind.name(), source })
}

/// The second filter of threads that start threads: clone3 gets ENOSYS, all else passes
/// (to the allow-list, which decides).
fn clone3_enosys() -> Result<BpfProgram, seccompiler::BackendError> {
    let arch: TargetArch = std::env::consts::ARCH.try_into().expect("amsvm runs on x86_64");
    let rules = [(libc::SYS_clone3, vec![])].into_iter().collect();
    SeccompFilter::new(rules, SeccompAction::Allow, SeccompAction::Errno(libc::ENOSYS as u32), arch)?.try_into()
}

/// `_IOC(dir, type, nr, size)` of the Linux ioctl encoding (x86_64).
const fn ioc(dir: u64, ty: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (ty << 8) | nr
}
const IOC_NONE: u64 = 0;
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;

/// The ioctl requests the filters allow, by name (a test checks the numbers against
/// <linux/kvm.h> and <linux/userfaultfd.h>).
pub mod ioctls {
    use super::*;
    const KVMIO: u64 = 0xAE;
    const UFFDIO: u64 = 0xAA;
    pub const KVM_RUN: u64 = ioc(IOC_NONE, KVMIO, 0x80, 0);
    pub const KVM_GET_REGS: u64 = ioc(IOC_READ, KVMIO, 0x81, std::mem::size_of::<kvm_bindings::kvm_regs>());
    pub const KVM_GET_DIRTY_LOG: u64 = ioc(IOC_WRITE, KVMIO, 0x42, std::mem::size_of::<kvm_bindings::kvm_dirty_log>());
    /// `struct uffdio_range` is 16 bytes, `uffdio_copy` and `uffdio_move` 40,
    /// `uffdio_zeropage` 32 (include/uapi/linux/userfaultfd.h).
    pub const UFFDIO_WAKE: u64 = ioc(IOC_READ, UFFDIO, 0x02, 16);
    pub const UFFDIO_COPY: u64 = ioc(IOC_READ | IOC_WRITE, UFFDIO, 0x03, 40);
    pub const UFFDIO_ZEROPAGE: u64 = ioc(IOC_READ | IOC_WRITE, UFFDIO, 0x04, 32);
    pub const UFFDIO_MOVE: u64 = ioc(IOC_READ | IOC_WRITE, UFFDIO, 0x05, 40);
    pub const FIONBIO: u64 = libc::FIONBIO;
}

/// An allow-list being built: system call → the rules that allow it (an empty list
/// allows it whatever its arguments).
#[derive(Default)]
struct AllowList(BTreeMap<i64, Option<Vec<SeccompRule>>>);

impl AllowList {
    /// Allow `nr` whatever its arguments.
    fn any(&mut self, nrs: &[i64]) -> &mut Self {
        for &nr in nrs {
            self.0.insert(nr, None);
        }
        self
    }

    /// Allow `nr` when all of `conds` hold (or any other rule of `nr` does).
    fn when(&mut self, nr: i64, conds: Vec<Cond>) -> Result<&mut Self, seccompiler::BackendError> {
        let rule = SeccompRule::new(conds)?;
        // (None: already allowed whatever the arguments.)
        if let Some(rules) = self.0.entry(nr).or_insert_with(|| Some(Vec::new())) {
            rules.push(rule);
        }
        Ok(self)
    }

    /// Allow `ioctl` with these request numbers only.
    fn ioctls(&mut self, reqs: &[u64]) -> Result<&mut Self, seccompiler::BackendError> {
        for &r in reqs {
            // The request is an `unsigned int` in the kernel: compare the low 32 bits.
            self.when(libc::SYS_ioctl, vec![Cond::new(1, Len::Dword, Op::Eq, r)?])?;
        }
        Ok(self)
    }

    fn into_rules(self) -> BTreeMap<i64, Vec<SeccompRule>> {
        self.0.into_iter().map(|(nr, r)| (nr, r.unwrap_or_default())).collect()
    }
}

/// The system calls every filtered thread may make: memory (never executable), locks,
/// sleeping and time, signal return and masks, thread exit, logging (write), and the
/// SIGSYS handler's own needs (write, exit_group).
fn base(a: &mut AllowList) -> Result<(), seccompiler::BackendError> {
    use libc::*;
    a.any(&[
        SYS_write,
        // glibc's fatal error messages (see `prepare_process`).
        SYS_writev,
        SYS_close,
        SYS_munmap,
        SYS_mremap,
        SYS_madvise,
        SYS_brk,
        SYS_futex,
        SYS_sched_yield,
        SYS_nanosleep,
        SYS_clock_nanosleep,
        SYS_clock_gettime,
        SYS_gettimeofday,
        SYS_getrandom,
        SYS_rt_sigreturn,
        SYS_rt_sigprocmask,
        SYS_sigaltstack,
        SYS_exit,
        SYS_exit_group,
        SYS_getpid,
        SYS_gettid,
        // A blocking call interrupted by a signal (a vCPU kick, SIGINT) and restarted.
        SYS_restart_syscall,
    ]);
    // Debug builds check that a descriptor is open before closing it (F_GETFD).
    a.when(SYS_fcntl, vec![Cond::new(1, Len::Dword, Op::Eq, F_GETFD as u64)?])?;
    let no_exec = || Cond::new(2, Len::Dword, Op::MaskedEq(PROT_EXEC as u64), 0);
    a.when(SYS_mmap, vec![no_exec()?])?;
    a.when(SYS_mprotect, vec![no_exec()?])?;
    // Signals only to threads of this process (abort, a vCPU kick).
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { getpid() } as u64;
    a.when(SYS_tgkill, vec![Cond::new(0, Len::Dword, Op::Eq, pid)?])?;
    // The SIGSYS handler reads the thread's name when it has none of its own.
    a.when(SYS_prctl, vec![Cond::new(0, Len::Dword, Op::Eq, PR_GET_NAME as u64)?])?;
    Ok(())
}

/// File I/O on descriptors already open: virtio-blk disks, the paging devices and the
/// local paging store (read, write, flush, punch holes), console logs.
const FILE_IO: &[i64] = &[
    libc::SYS_read,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_fallocate,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
];

/// `kind`'s allow-list.
pub fn allow_list(kind: Kind) -> Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::BackendError> {
    use ioctls::*;
    use libc::*;
    let mut a = AllowList::default();
    base(&mut a)?;
    match kind {
        Kind::Vcpu => {
            // Devices' registers (console log writes, queue notifications to eventfds:
            // `write`; a virtio device reset drains its eventfds: `read`), WAIT (futex),
            // and KVM_RUN; KVM_GET_REGS to report a crash.
            a.any(&[SYS_read]);
            a.ioctls(&[KVM_RUN, KVM_GET_REGS])?;
        }
        Kind::Device => {
            // The event loop (epoll on eventfds), virtio-blk I/O, balloon discards
            // (userfaultfd MOVE into the staging area, then MADV_DONTNEED), whose freed
            // slots the paging server is told of (which may run its vCPU here).
            a.any(FILE_IO).any(&[SYS_epoll_wait, SYS_epoll_pwait, SYS_epoll_ctl, SYS_mincore]);
            a.ioctls(&[UFFDIO_MOVE, UFFDIO_WAKE, UFFDIO_COPY, KVM_RUN, KVM_GET_REGS])?;
        }
        Kind::Pager => {
            // Fault service (poll and read the userfaultfd, install pages), page-out
            // (MOVE, MADV_DONTNEED), the paging store's file I/O, KVM's dirty log for
            // reference bits, and the paging server's vCPU (its devices run inline).
            a.any(FILE_IO).any(&[SYS_poll, SYS_ppoll, SYS_mincore]);
            a.ioctls(&[
                UFFDIO_COPY,
                UFFDIO_ZEROPAGE,
                UFFDIO_WAKE,
                UFFDIO_MOVE,
                KVM_GET_DIRTY_LOG,
                KVM_RUN,
                KVM_GET_REGS,
            ])?;
            // The pool's policy thread lowers (and restores) the priority of a
            // thrashing partition's vCPU threads (`[pool] policy = "protect"`).
            a.when(SYS_setpriority, vec![Cond::new(0, Len::Dword, Op::Eq, PRIO_PROCESS as u64)?])?;
        }
        Kind::Control => {
            // Sockets already listening: accept, read and write, time-outs and
            // non-blocking mode; new threads for connections (threads only).
            a.any(&[
                SYS_read,
                SYS_poll,
                SYS_ppoll,
                SYS_accept4,
                SYS_recvfrom,
                SYS_recvmsg,
                SYS_sendto,
                SYS_sendmsg,
                SYS_shutdown,
                SYS_setsockopt,
                SYS_getsockopt,
                SYS_getsockname,
                SYS_getpeername,
                SYS_clone3,
                SYS_set_robust_list,
                SYS_rseq,
                SYS_sched_getaffinity,
            ]);
            // tiny_http keeps a second handle on each accepted connection (dup).
            a.when(SYS_fcntl, vec![Cond::new(1, Len::Dword, Op::Eq, F_DUPFD_CLOEXEC as u64)?])?;
            // `resume` wakes the vCPUs a paused partition left waiting on a fault.
            a.ioctls(&[ioctls::FIONBIO, UFFDIO_WAKE])?;
            a.when(SYS_clone, vec![Cond::new(0, Len::Qword, Op::MaskedEq(CLONE_THREAD as u64), CLONE_THREAD as u64)?])?;
            a.when(SYS_prctl, vec![Cond::new(0, Len::Dword, Op::Eq, PR_SET_NAME as u64)?])?;
            // A new thread applies its own filter on top of the one it inherited: it may
            // only confine itself further (no_new_privs, then one more filter).
            a.when(SYS_prctl, vec![Cond::new(0, Len::Dword, Op::Eq, PR_SET_NO_NEW_PRIVS as u64)?])?;
            a.when(SYS_seccomp, vec![Cond::new(0, Len::Dword, Op::Eq, SECCOMP_SET_MODE_FILTER as u64)?])?;
        }
    }
    Ok(a.into_rules())
}

/// Number of system calls `kind` may make (some only with given arguments).
pub fn allowed_count(kind: Kind) -> usize {
    allow_list(kind).map(|r| r.len()).unwrap_or(0)
}

// --- The SIGSYS handler ---------------------------------------------------------------

/// Longest thread name kept for the SIGSYS message.
const NAME_MAX: usize = 48;

thread_local! {
    // Plain data with a constant initializer: no lazy initialization and no destructor,
    // so reading it from a signal handler takes no lock and makes no system call.
    static THREAD_NAME: Cell<([u8; NAME_MAX], u8)> = const { Cell::new(([0; NAME_MAX], 0)) };
}

fn remember_thread_name() {
    let t = std::thread::current();
    let name = t.name().unwrap_or("").as_bytes();
    let n = name.len().min(NAME_MAX);
    let mut buf = [0u8; NAME_MAX];
    buf[..n].copy_from_slice(&name[..n]);
    THREAD_NAME.with(|c| c.set((buf, n as u8)));
}

fn install_sigsys_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction with our handler and SA_SIGINFO is a valid action;
        // the handler is async-signal-safe (see `on_sigsys`).
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigsys as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) != 0 {
                tracing::error!("seccomp: cannot install the SIGSYS handler: {}", std::io::Error::last_os_error());
            }
        }
    });
}

/// Offset of `si_syscall` in x86_64's `siginfo_t` (after signo, errno, code, padding,
/// and `si_call_addr`).
const SI_SYSCALL_OFFSET: usize = 24;

/// A fixed buffer for the message: no allocation in the handler.
struct Msg {
    buf: [u8; 192],
    len: usize,
}

impl Msg {
    fn push(&mut self, s: &[u8]) {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s[..n]);
        self.len += n;
    }

    fn push_num(&mut self, v: i64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        let (neg, mut u) = (v < 0, v.unsigned_abs());
        loop {
            i -= 1;
            digits[i] = b'0' + (u % 10) as u8;
            u /= 10;
            if u == 0 {
                break;
            }
        }
        if neg {
            self.push(b"-");
        }
        self.push(&digits[i..]);
    }
}

/// The message the SIGSYS handler writes, e.g. `amsvm: seccomp: thread "p0-vcpu0"
/// made forbidden syscall 41 (socket); exiting`.
fn violation_message(name: &[u8], nr: i64) -> Msg {
    let mut m = Msg { buf: [0; 192], len: 0 };
    m.push(b"amsvm: seccomp: thread \"");
    m.push(name);
    m.push(b"\" made forbidden syscall ");
    m.push_num(nr);
    if let Some(s) = syscall_name(nr) {
        m.push(b" (");
        m.push(s.as_bytes());
        m.push(b")");
    }
    m.push(b"; exiting\n");
    m
}

/// Async-signal-safe: reads the siginfo and a thread-local buffer, formats into a stack
/// buffer, then write(2) and exit_group(2), both allowed by every filter.
extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for a SA_SIGINFO handler; for a seccomp
    // SIGSYS its `_sigsys` member is filled, and si_syscall lies at this offset.
    let nr = unsafe { (info as *const u8).add(SI_SYSCALL_OFFSET).cast::<i32>().read_unaligned() } as i64;
    let (mut buf, mut len) = THREAD_NAME.try_with(|c| c.get()).unwrap_or(([0; NAME_MAX], 0));
    if len == 0 {
        // A thread that inherited its filter: the kernel's name for it (16 bytes).
        let mut comm = [0u8; 16];
        // SAFETY: PR_GET_NAME writes at most 16 bytes (NUL included) into `comm`.
        if unsafe { libc::prctl(libc::PR_GET_NAME, comm.as_mut_ptr()) } == 0 {
            let n = comm.iter().position(|&b| b == 0).unwrap_or(16);
            buf[..n].copy_from_slice(&comm[..n]);
            len = n as u8;
        }
    }
    let m = violation_message(&buf[..len as usize], nr);
    // SAFETY: write and _exit are async-signal-safe; the buffer lives on this stack.
    unsafe {
        libc::write(2, m.buf.as_ptr().cast(), m.len);
        libc::_exit(EXIT_FORBIDDEN_SYSCALL);
    }
}

/// Names of system calls a compromised thread would reach for, and of those amsvm's
/// threads make (x86_64 numbers); others are reported by number.
pub fn syscall_name(nr: i64) -> Option<&'static str> {
    SYSCALL_NAMES.iter().find(|(n, _)| *n == nr).map(|(_, s)| *s)
}

const SYSCALL_NAMES: &[(i64, &str)] = &[
    (libc::SYS_read, "read"),
    (libc::SYS_write, "write"),
    (libc::SYS_open, "open"),
    (libc::SYS_close, "close"),
    (libc::SYS_stat, "stat"),
    (libc::SYS_fstat, "fstat"),
    (libc::SYS_lstat, "lstat"),
    (libc::SYS_poll, "poll"),
    (libc::SYS_lseek, "lseek"),
    (libc::SYS_mmap, "mmap"),
    (libc::SYS_mprotect, "mprotect"),
    (libc::SYS_munmap, "munmap"),
    (libc::SYS_brk, "brk"),
    (libc::SYS_rt_sigaction, "rt_sigaction"),
    (libc::SYS_rt_sigprocmask, "rt_sigprocmask"),
    (libc::SYS_ioctl, "ioctl"),
    (libc::SYS_pread64, "pread64"),
    (libc::SYS_pwrite64, "pwrite64"),
    (libc::SYS_readv, "readv"),
    (libc::SYS_writev, "writev"),
    (libc::SYS_access, "access"),
    (libc::SYS_pipe, "pipe"),
    (libc::SYS_mremap, "mremap"),
    (libc::SYS_mincore, "mincore"),
    (libc::SYS_madvise, "madvise"),
    (libc::SYS_dup, "dup"),
    (libc::SYS_dup2, "dup2"),
    (libc::SYS_nanosleep, "nanosleep"),
    (libc::SYS_getpid, "getpid"),
    (libc::SYS_sendfile, "sendfile"),
    (libc::SYS_socket, "socket"),
    (libc::SYS_connect, "connect"),
    (libc::SYS_accept, "accept"),
    (libc::SYS_sendto, "sendto"),
    (libc::SYS_recvfrom, "recvfrom"),
    (libc::SYS_sendmsg, "sendmsg"),
    (libc::SYS_recvmsg, "recvmsg"),
    (libc::SYS_shutdown, "shutdown"),
    (libc::SYS_bind, "bind"),
    (libc::SYS_listen, "listen"),
    (libc::SYS_getsockname, "getsockname"),
    (libc::SYS_getpeername, "getpeername"),
    (libc::SYS_socketpair, "socketpair"),
    (libc::SYS_setsockopt, "setsockopt"),
    (libc::SYS_getsockopt, "getsockopt"),
    (libc::SYS_clone, "clone"),
    (libc::SYS_fork, "fork"),
    (libc::SYS_vfork, "vfork"),
    (libc::SYS_execve, "execve"),
    (libc::SYS_exit, "exit"),
    (libc::SYS_wait4, "wait4"),
    (libc::SYS_kill, "kill"),
    (libc::SYS_uname, "uname"),
    (libc::SYS_fcntl, "fcntl"),
    (libc::SYS_flock, "flock"),
    (libc::SYS_fsync, "fsync"),
    (libc::SYS_fdatasync, "fdatasync"),
    (libc::SYS_truncate, "truncate"),
    (libc::SYS_ftruncate, "ftruncate"),
    (libc::SYS_getdents64, "getdents64"),
    (libc::SYS_getcwd, "getcwd"),
    (libc::SYS_chdir, "chdir"),
    (libc::SYS_rename, "rename"),
    (libc::SYS_mkdir, "mkdir"),
    (libc::SYS_rmdir, "rmdir"),
    (libc::SYS_link, "link"),
    (libc::SYS_unlink, "unlink"),
    (libc::SYS_symlink, "symlink"),
    (libc::SYS_readlink, "readlink"),
    (libc::SYS_chmod, "chmod"),
    (libc::SYS_chown, "chown"),
    (libc::SYS_umask, "umask"),
    (libc::SYS_getuid, "getuid"),
    (libc::SYS_ptrace, "ptrace"),
    (libc::SYS_setuid, "setuid"),
    (libc::SYS_setgid, "setgid"),
    (libc::SYS_sigaltstack, "sigaltstack"),
    (libc::SYS_prctl, "prctl"),
    (libc::SYS_mount, "mount"),
    (libc::SYS_umount2, "umount2"),
    (libc::SYS_gettid, "gettid"),
    (libc::SYS_futex, "futex"),
    (libc::SYS_sched_setaffinity, "sched_setaffinity"),
    (libc::SYS_sched_getaffinity, "sched_getaffinity"),
    (libc::SYS_epoll_create, "epoll_create"),
    (libc::SYS_getdents, "getdents"),
    (libc::SYS_clock_gettime, "clock_gettime"),
    (libc::SYS_clock_nanosleep, "clock_nanosleep"),
    (libc::SYS_exit_group, "exit_group"),
    (libc::SYS_epoll_wait, "epoll_wait"),
    (libc::SYS_epoll_ctl, "epoll_ctl"),
    (libc::SYS_tgkill, "tgkill"),
    (libc::SYS_openat, "openat"),
    (libc::SYS_mkdirat, "mkdirat"),
    (libc::SYS_newfstatat, "newfstatat"),
    (libc::SYS_unlinkat, "unlinkat"),
    (libc::SYS_renameat, "renameat"),
    (libc::SYS_linkat, "linkat"),
    (libc::SYS_ppoll, "ppoll"),
    (libc::SYS_set_robust_list, "set_robust_list"),
    (libc::SYS_epoll_pwait, "epoll_pwait"),
    (libc::SYS_fallocate, "fallocate"),
    (libc::SYS_accept4, "accept4"),
    (libc::SYS_eventfd2, "eventfd2"),
    (libc::SYS_epoll_create1, "epoll_create1"),
    (libc::SYS_pipe2, "pipe2"),
    (libc::SYS_preadv, "preadv"),
    (libc::SYS_pwritev, "pwritev"),
    (libc::SYS_sched_yield, "sched_yield"),
    (libc::SYS_getrandom, "getrandom"),
    (libc::SYS_memfd_create, "memfd_create"),
    (libc::SYS_userfaultfd, "userfaultfd"),
    (libc::SYS_execveat, "execveat"),
    (libc::SYS_statx, "statx"),
    (libc::SYS_rseq, "rseq"),
    (libc::SYS_clone3, "clone3"),
    (libc::SYS_pidfd_open, "pidfd_open"),
    (libc::SYS_openat2, "openat2"),
    (libc::SYS_rt_sigreturn, "rt_sigreturn"),
    (libc::SYS_restart_syscall, "restart_syscall"),
    (libc::SYS_gettimeofday, "gettimeofday"),
    (libc::SYS_seccomp, "seccomp"),
    (libc::SYS_bpf, "bpf"),
    (libc::SYS_process_vm_readv, "process_vm_readv"),
    (libc::SYS_process_vm_writev, "process_vm_writev"),
];

/// The system calls `amsvm seccomp-check` can make (a hidden command for the tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Probe {
    /// socket(AF_UNIX, SOCK_STREAM).
    Socket,
    /// execve of a path that does not exist (harmless if allowed).
    Execve,
    /// openat of /dev/null, read-only.
    Openat,
    /// ptrace(PTRACE_PEEKDATA) of pid 0 (fails if allowed: no such tracee).
    Ptrace,
    /// mmap of an anonymous executable page.
    MmapExec,
    /// ioctl(FIONBIO) on a pipe.
    IoctlFionbio,
    /// ioctl(KVM_RUN) on a descriptor that is not open (EBADF if allowed).
    KvmRun,
    /// write of an empty buffer to stdout.
    Write,
    /// A thread-local futex wake.
    Futex,
    /// Start a thread and join it (clone3, then clone with CLONE_THREAD).
    Thread,
    /// clone without CLONE_THREAD: a new process (which exits at once if allowed).
    Fork,
}

impl Probe {
    pub fn syscall(self) -> i64 {
        match self {
            Probe::Socket => libc::SYS_socket,
            Probe::Execve => libc::SYS_execve,
            Probe::Openat => libc::SYS_openat,
            Probe::Ptrace => libc::SYS_ptrace,
            Probe::MmapExec => libc::SYS_mmap,
            Probe::IoctlFionbio | Probe::KvmRun => libc::SYS_ioctl,
            Probe::Write => libc::SYS_write,
            Probe::Futex => libc::SYS_futex,
            Probe::Thread => libc::SYS_clone3,
            Probe::Fork => libc::SYS_clone,
        }
    }

    /// Make the call on this thread; its raw result (or -errno).
    fn make(self, pipe_fd: i32) -> i64 {
        let word = 0u32;
        // SAFETY: each call is made with arguments the kernel validates, on memory we
        // own for the call's duration; none changes this process's memory or files
        // beyond a descriptor (closed again) or an anonymous page (unmapped again).
        let r = unsafe {
            match self {
                Probe::Socket => libc::syscall(libc::SYS_socket, libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0),
                Probe::Execve => {
                    let path = c"/nonexistent/amsvm-seccomp-check";
                    let argv = [path.as_ptr(), std::ptr::null()];
                    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
                    libc::syscall(libc::SYS_execve, path.as_ptr(), argv.as_ptr(), envp.as_ptr())
                }
                Probe::Openat => libc::syscall(libc::SYS_openat, libc::AT_FDCWD, c"/dev/null".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC),
                Probe::Ptrace => libc::syscall(libc::SYS_ptrace, libc::PTRACE_PEEKDATA, 0, 0, 0),
                Probe::MmapExec => libc::syscall(
                    libc::SYS_mmap,
                    0,
                    4096,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                ),
                Probe::IoctlFionbio => {
                    let on: libc::c_int = 1;
                    libc::syscall(libc::SYS_ioctl, pipe_fd, libc::FIONBIO, &on)
                }
                Probe::KvmRun => libc::syscall(libc::SYS_ioctl, -1, ioctls::KVM_RUN, 0),
                Probe::Write => libc::syscall(libc::SYS_write, 1, [0u8; 1].as_ptr(), 0),
                Probe::Futex => libc::syscall(libc::SYS_futex, &word as *const u32, libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG, 1),
                Probe::Thread => match std::thread::Builder::new().spawn(|| 7i64).map(|t| t.join()) {
                    Ok(Ok(v)) => v,
                    _ => -1,
                },
                Probe::Fork => {
                    let pid = libc::syscall(libc::SYS_clone, libc::SIGCHLD, 0, 0, 0, 0);
                    if pid == 0 {
                        libc::_exit(0);
                    }
                    pid
                }
            }
        };
        let r = if r < 0 { -(std::io::Error::last_os_error().raw_os_error().unwrap_or(0) as i64) } else { r };
        // Undo what an allowed call made.
        match self {
            // SAFETY: closing the descriptor the call returned, which nothing else uses.
            Probe::Socket | Probe::Openat if r >= 0 => unsafe {
                libc::close(r as i32);
            },
            // SAFETY: unmapping the page the call mapped, which nothing else uses.
            Probe::MmapExec if r >= 0 => unsafe {
                libc::munmap(r as *mut libc::c_void, 4096);
            },
            _ => {}
        }
        r
    }
}

/// The name `seccomp-check` gives its thread of `kind`.
pub fn check_thread_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Vcpu => "amsvm-vcpu0",
        Kind::Device => "amsvm-dev",
        Kind::Pager => "amsvm-pager",
        Kind::Control => "amsvm-control",
    }
}

/// `amsvm seccomp-check`: start a thread named like one of `kind`, apply `kind`'s real
/// filter (as the process's mode says), make `probe`'s call. A forbidden call ends the
/// process in the SIGSYS handler (status 159); one that was allowed prints what it
/// returned and returns 0.
pub fn check(kind: Kind, probe: Probe) -> i32 {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 fills the two-element array we own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        eprintln!("amsvm seccomp-check: pipe2: {}", std::io::Error::last_os_error());
        return 1;
    }
    let name = check_thread_name(kind);
    let t = std::thread::Builder::new().name(name.into()).spawn(move || {
        apply(kind);
        probe.make(fds[0])
    });
    let r = match t.map(|t| t.join()) {
        Ok(Ok(r)) => r,
        _ => {
            eprintln!("amsvm seccomp-check: the {name} thread could not run");
            return 1;
        }
    };
    let nr = probe.syscall();
    println!(
        "seccomp-check: thread \"{name}\" ({} filter, {:?} mode) made syscall {nr} ({}) and survived; it returned {r}",
        kind.name(),
        mode(),
        syscall_name(nr).unwrap_or("?"),
    );
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_compiles_for_x86_64_in_both_modes() {
        for kind in Kind::ALL {
            for m in [Mode::Enforce, Mode::Log] {
                let p = compile(kind, m, TargetArch::x86_64).unwrap_or_else(|e| panic!("{kind:?} {m:?}: {e}"));
                assert!(!p.is_empty() && p.len() < 4096, "{kind:?}: {} instructions", p.len());
            }
        }
        assert!(!clone3_enosys().unwrap().is_empty());
    }

    #[test]
    fn the_handlers_calls_are_allowed_everywhere_and_dangerous_ones_nowhere() {
        for kind in Kind::ALL {
            let rules = allow_list(kind).unwrap();
            for nr in [libc::SYS_write, libc::SYS_exit_group, libc::SYS_rt_sigreturn, libc::SYS_futex] {
                assert!(rules.contains_key(&nr), "{kind:?} must allow {}", syscall_name(nr).unwrap());
            }
            for nr in [
                libc::SYS_execve,
                libc::SYS_execveat,
                libc::SYS_openat,
                libc::SYS_open,
                libc::SYS_socket,
                libc::SYS_connect,
                libc::SYS_ptrace,
                libc::SYS_fork,
                libc::SYS_mount,
                libc::SYS_kill,
                libc::SYS_userfaultfd,
                libc::SYS_memfd_create,
            ] {
                assert!(!rules.contains_key(&nr), "{kind:?} must not allow {}", syscall_name(nr).unwrap());
            }
        }
    }

    #[test]
    fn allow_lists_stay_small() {
        // `cargo test -p vmm --lib seccomp -- --nocapture` prints them (docs/security.md).
        for kind in Kind::ALL {
            let rules = allow_list(kind).unwrap();
            let names: Vec<String> = rules
                .iter()
                .map(|(nr, r)| {
                    let n = syscall_name(*nr).map_or_else(|| nr.to_string(), str::to_string);
                    if r.is_empty() { n } else { format!("{n}[{} rule(s)]", r.len()) }
                })
                .collect();
            println!("{kind:?}: {} syscalls: {}", rules.len(), names.join(" "));
            assert!(rules.len() <= 50, "{kind:?} allows {} system calls", rules.len());
        }
    }

    #[test]
    fn vcpus_get_no_sockets_or_files_and_only_their_ioctls() {
        let v = allow_list(Kind::Vcpu).unwrap();
        for nr in [libc::SYS_accept4, libc::SYS_pread64, libc::SYS_fallocate, libc::SYS_clone, libc::SYS_clone3] {
            assert!(!v.contains_key(&nr), "vcpu must not allow {}", syscall_name(nr).unwrap());
        }
        // ioctl is allowed by request: one rule per request number.
        assert_eq!(v[&libc::SYS_ioctl].len(), 2);
        let c = allow_list(Kind::Control).unwrap();
        assert_eq!(c[&libc::SYS_ioctl].len(), 2, "control: FIONBIO and UFFDIO_WAKE only");
    }

    #[test]
    fn ioctl_numbers_match_the_kernels() {
        // From <linux/kvm.h> and <linux/userfaultfd.h> on x86_64.
        assert_eq!(ioctls::KVM_RUN, 0xae80);
        assert_eq!(ioctls::KVM_GET_REGS, 0x8090_ae81);
        assert_eq!(ioctls::KVM_GET_DIRTY_LOG, 0x4010_ae42);
        assert_eq!(ioctls::UFFDIO_WAKE, 0x8010_aa02);
        assert_eq!(ioctls::UFFDIO_COPY, 0xc028_aa03);
        assert_eq!(ioctls::UFFDIO_ZEROPAGE, 0xc020_aa04);
        assert_eq!(ioctls::UFFDIO_MOVE, 0xc028_aa05);
    }

    #[test]
    fn the_violation_message_names_the_thread_and_the_call() {
        let m = violation_message(b"p0-vcpu0", libc::SYS_socket);
        assert_eq!(
            std::str::from_utf8(&m.buf[..m.len]).unwrap(),
            "amsvm: seccomp: thread \"p0-vcpu0\" made forbidden syscall 41 (socket); exiting\n"
        );
        let m = violation_message(b"x", 999);
        assert!(std::str::from_utf8(&m.buf[..m.len]).unwrap().ends_with("syscall 999; exiting\n"));
    }
}
