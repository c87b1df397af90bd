//! Seccomp filters: a thread of each kind, under its real filter, is ended (status 159,
//! a line naming the thread and the call) by a forbidden system call, and survives an
//! allowed one. `amsvm seccomp-check` (hidden) makes the call on such a thread.

use std::os::unix::process::ExitStatusExt;
use std::process::Output;

use crate::common::{amsvm, text};

/// `amsvm seccomp-check --kind KIND --syscall CALL`, with `--seccomp MODE` if given.
fn check(kind: &str, call: &str, mode: Option<&str>) -> Output {
    let mut c = amsvm();
    c.env_remove("AMSVM_SECCOMP").args(["seccomp-check", "--kind", kind, "--syscall", call]);
    if let Some(m) = mode {
        c.args(["--seccomp", m]);
    }
    c.output().expect("cannot start amsvm")
}

/// The thread name `seccomp-check` gives a kind's thread.
fn thread(kind: &str) -> &'static str {
    match kind {
        "vcpu" => "amsvm-vcpu0",
        "device" => "amsvm-dev",
        "pager" => "amsvm-pager",
        "control" => "amsvm-control",
        _ => unreachable!(),
    }
}

fn assert_killed(kind: &str, call: &str, nr: u32, name: &str) {
    let o = check(kind, call, None);
    let (out, err) = text(&o);
    assert_eq!(
        o.status.code(),
        Some(159),
        "{kind} thread making {call}: expected exit status 159 from the SIGSYS handler, got {:?} (signal {:?})\nstdout: {out}\nstderr: {err}",
        o.status.code(),
        o.status.signal()
    );
    let want = format!("amsvm: seccomp: thread \"{}\" made forbidden syscall {nr} ({name}); exiting", thread(kind));
    assert!(err.contains(&want), "{kind} thread making {call}: stderr lacks `{want}`:\n{err}");
    assert!(!out.contains("survived"), "{kind} thread making {call} survived:\n{out}");
}

fn assert_survives(kind: &str, call: &str, mode: Option<&str>) {
    let o = check(kind, call, mode);
    let (out, err) = text(&o);
    assert!(
        o.status.success() && out.contains(&format!("thread \"{}\"", thread(kind))) && out.contains("survived"),
        "{kind} thread making {call} (mode {mode:?}) should survive: status {:?}\nstdout: {out}\nstderr: {err}",
        o.status
    );
}

#[test]
fn a_forbidden_syscall_ends_amsvm_naming_the_thread_and_the_call() {
    // (kind, call, syscall number on x86_64, name)
    let forbidden = [
        ("vcpu", "socket", 41, "socket"),
        ("vcpu", "execve", 59, "execve"),
        ("vcpu", "openat", 257, "openat"),
        ("vcpu", "ioctl-fionbio", 16, "ioctl"),
        ("vcpu", "mmap-exec", 9, "mmap"),
        ("device", "socket", 41, "socket"),
        ("device", "execve", 59, "execve"),
        ("device", "openat", 257, "openat"),
        ("pager", "socket", 41, "socket"),
        ("pager", "execve", 59, "execve"),
        ("pager", "ptrace", 101, "ptrace"),
        ("control", "execve", 59, "execve"),
        ("control", "openat", 257, "openat"),
        ("control", "socket", 41, "socket"),
        ("control", "kvm-run", 16, "ioctl"),
        ("control", "fork", 56, "clone"),
    ];
    for (kind, call, nr, name) in forbidden {
        assert_killed(kind, call, nr, name);
    }
}

#[test]
fn an_allowed_syscall_survives_and_the_switch_turns_filters_off_or_to_logging() {
    let allowed = [
        ("vcpu", "write"),
        ("vcpu", "kvm-run"),
        ("vcpu", "futex"),
        ("device", "write"),
        ("device", "kvm-run"),
        ("pager", "write"),
        ("pager", "kvm-run"),
        ("control", "write"),
        ("control", "ioctl-fionbio"),
        ("control", "thread"),
    ];
    for (kind, call) in allowed {
        assert_survives(kind, call, None);
    }
    // The forbidden call survives with the filters off, or only logged.
    assert_survives("vcpu", "socket", Some("off"));
    assert_survives("control", "execve", Some("off"));
    assert_survives("vcpu", "socket", Some("log"));
    // The switch also reads AMSVM_SECCOMP.
    let o = amsvm().env("AMSVM_SECCOMP", "off").args(["seccomp-check", "--kind", "pager", "--syscall", "socket"]).output().unwrap();
    assert!(o.status.success(), "AMSVM_SECCOMP=off: {:?}", text(&o));
}

#[test]
fn the_check_command_is_hidden_and_the_switch_is_documented() {
    let o = amsvm().arg("--help").output().unwrap();
    let (out, _) = text(&o);
    assert!(!out.contains("seccomp-check"), "seccomp-check shows in --help:\n{out}");
    assert!(out.contains("--seccomp"), "--seccomp is missing from --help:\n{out}");
}
