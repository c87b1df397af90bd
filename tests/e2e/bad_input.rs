//! Bad input: a one-line error naming the file/field, exit status 2, no panic.

use std::path::Path;

use crate::common::*;

fn expect_bad_input(args: &[&str], cwd: &Path, must_contain: &[&str]) {
    let out = amsvm().args(args).current_dir(cwd).output().unwrap();
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "args {args:?}\nstdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let err_lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("amsvm: ") && !l.starts_with("amsvm: starting")).collect();
    assert_eq!(err_lines.len(), 1, "expected one error line, got:\n{stderr}");
    for m in must_contain {
        assert!(err_lines[0].contains(m), "error line lacks {m:?}: {}", err_lines[0]);
    }
}

const WL: &str = "[partition.workload]\nworking_set_mib = 4\npasses = 1\n";

fn native(name: &str, mib: u64, image: &str) -> String {
    format!("[[partition]]\nname = \"{name}\"\nlogical_mib = {mib}\nimage = \"{image}\"\n{WL}")
}

#[test]
fn config_errors_name_file_and_field() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    let unknown = write_config(p, "unknown.toml", &format!("{}colour = \"red\"\n", native("a", 32, "workload").replace(WL, "")));
    expect_bad_input(&["run", unknown.to_str().unwrap()], p, &["unknown.toml:5", "colour"]);
    let dup = write_config(p, "dup.toml", &(native("a", 32, "workload") + &native("a", 32, "workload")));
    expect_bad_input(&["run", dup.to_str().unwrap()], p, &["dup.toml", "\"a\"", "duplicate"]);
    let zero = write_config(p, "zero.toml", &native("z", 0, "workload"));
    expect_bad_input(&["run", zero.to_str().unwrap()], p, &["zero.toml", "logical_mib", "0 MiB"]);
    let huge = write_config(p, "huge.toml", &native("h", 1 << 30, "workload"));
    expect_bad_input(&["run", huge.to_str().unwrap()], p, &["huge.toml", "logical_mib", "larger than this host"]);
    let bad_toml = write_config(p, "broken.toml", "[[partition]\nname=");
    expect_bad_input(&["run", bad_toml.to_str().unwrap()], p, &["broken.toml:1"]);
    expect_bad_input(&["run", "does-not-exist.toml"], p, &["does-not-exist.toml", "cannot read"]);
    let ok = write_config(p, "ok.toml", &native("a", 32, "workload"));
    expect_bad_input(&["run", ok.to_str().unwrap(), "--metrics", "not-an-address"], p, &["metrics listener on not-an-address"]);
    expect_bad_input(&["demo", "--headless", "--overcommit", "9"], p, &["--overcommit 9 must be between 1 and 8"]);
    expect_bad_input(&["demo", "--headless", "--interval", "0"], p, &["--interval 0 must be above 0"]);
    expect_bad_input(&["top", "--headless", "--socket", "/nonexistent/amsvm.sock"], p, &["/nonexistent/amsvm.sock"]);
    expect_bad_input(&["destroy", "p0", "--socket", "/nonexistent/amsvm.sock"], p, &["/nonexistent/amsvm.sock"]);
    expect_bad_input(&["resume", "p0", "--socket", "/nonexistent/amsvm.sock"], p, &["/nonexistent/amsvm.sock"]);
}

#[test]
fn image_errors_name_the_image() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path();
    let missing = write_config(p, "missing.toml", &native("m", 32, "nope.elf"));
    expect_bad_input(&["run", missing.to_str().unwrap()], p, &["nope.elf"]);
    std::fs::write(p.join("corrupt.elf"), b"\x7fELF this is not really an image").unwrap();
    let corrupt = write_config(p, "corrupt.toml", &native("c", 32, "corrupt.elf"));
    expect_bad_input(&["run", corrupt.to_str().unwrap()], p, &["corrupt.elf"]);
    // A valid ELF whose segment lies beyond the partition's 8 MiB of RAM.
    std::fs::write(p.join("big.elf"), tiny_elf(&[0xeb, 0xfe], 0x80_0000)).unwrap();
    let big = write_config(p, "big.toml", "[[partition]]\nname = \"b\"\nlogical_mib = 8\nimage = \"big.elf\"\n");
    expect_bad_input(&["run", big.to_str().unwrap()], p, &["big.elf", "does not fit in guest memory"]);
    // Linux (`amsvm boot`): missing and corrupt kernels, bad memory sizes.
    expect_bad_input(&["boot", "--kernel", "no-such-vmlinuz", "--mem", "64"], p, &["no-such-vmlinuz"]);
    std::fs::write(p.join("junk-vmlinuz"), vec![0x5au8; 8192]).unwrap();
    expect_bad_input(&["boot", "--kernel", "junk-vmlinuz", "--mem", "64"], p, &["junk-vmlinuz"]);
    expect_bad_input(&["boot", "--kernel", "junk-vmlinuz", "--mem", "0"], p, &["--mem", "0 MiB"]);
    expect_bad_input(&["boot", "--kernel", "junk-vmlinuz", "--mem", "99999999"], p, &["--mem", "larger than this host"]);
}
