//! Helpers shared by the end-to-end tests.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

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
            assert!(f.len() >= 10, "short summary row: {l}");
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
                outcome: f[9..].join(" "),
            }
        })
        .collect()
}
