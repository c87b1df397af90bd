//! Builds the guest images that ship inside amsvm: the workload unikernel in
//! `guest-images/workload` and the paging server in `guest-images/paging-server`. Each
//! is a `no_std`, `no_main` program for the host target, linked as a static non-PIE ELF,
//! so it cannot be a normal dependency: it is built by a nested `cargo build --release`
//! with its own target directory (under OUT_DIR, so it never waits on the lock of the
//! outer build's target directory) and a clean environment. Their paths are exported as
//! `AMSVM_WORKLOAD_ELF` and `AMSVM_PAGING_SERVER_ELF` for `src/images.rs`.

use std::env;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The image runs on the same CPU as the VMM; no other Rust target is needed.
const TARGET: &str = "x86_64-unknown-linux-gnu";
/// Static, non-PIE code; no RELRO (which also keeps calls direct instead of through a
/// GOT); no unwinding. The link arguments live in the workload's own build.rs.
const RUSTFLAGS: &[&str] = &["-C", "relocation-model=static", "-C", "relro-level=off", "-C", "panic=abort"];

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let root = manifest_dir.parent().expect("vmm/ lives in the workspace root").to_path_buf();
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let workload = root.join("guest-images").join("workload");
    let server = root.join("guest-images").join("paging-server");

    println!("cargo:rerun-if-changed=build.rs");
    for dir in [&workload, &server] {
        for f in ["src", "Cargo.toml", "Cargo.lock", "build.rs", "link.ld", ".cargo"] {
            println!("cargo:rerun-if-changed={}", dir.join(f).display());
        }
    }
    for p in [root.join("abi").join("src"), root.join("abi").join("Cargo.toml"), root.join("paging-server").join("src")] {
        println!("cargo:rerun-if-changed={}", p.display());
    }

    let elf = build_image("workload", &workload, &out_dir.join("guest-images"));
    println!("cargo:rustc-env=AMSVM_WORKLOAD_ELF={}", elf.display());
    let elf = build_image("paging-server", &server, &out_dir.join("guest-images-server"));
    println!("cargo:rustc-env=AMSVM_PAGING_SERVER_ELF={}", elf.display());
}

fn build_image(name: &str, dir: &Path, target_dir: &Path) -> PathBuf {
    let cargo = env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(dir)
        .arg("build")
        .arg("--release")
        .arg("--target")
        .arg(TARGET)
        .arg("--target-dir")
        .arg(target_dir);
    // The nested cargo must not inherit the outer build's configuration: its flags,
    // target directory, profile overrides, wrappers (clippy), jobserver, or the
    // variables cargo sets for this build script.
    for (key, _) in env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if leaks_from_outer_build(key) {
            cmd.env_remove(key);
        }
    }
    cmd.env("CARGO_ENCODED_RUSTFLAGS", RUSTFLAGS.join("\x1f"));

    let output = match cmd.output() {
        Ok(o) => o,
        Err(e) => fail(&format!("cannot run {} to build {}: {e}", cargo.to_string_lossy(), dir.display())),
    };
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        eprintln!("{stderr}");
        eprintln!("{}", String::from_utf8_lossy(&output.stdout));
        fail(&format!("building the {name} image in {} failed ({}); its compiler output is above", dir.display(), output.status));
    }
    // Surface the workload's own warnings, which would otherwise stay hidden.
    for line in stderr.lines() {
        if line.starts_with("warning") || line.trim_start().starts_with("-->") {
            println!("cargo:warning={name}: {line}");
        }
    }
    let elf = target_dir.join(TARGET).join("release").join(name);
    if !elf.is_file() {
        fail(&format!("the {name} build succeeded but {} is missing", elf.display()));
    }
    elf
}

fn leaks_from_outer_build(key: &str) -> bool {
    // Kept: where cargo and its registries live, and how to reach them.
    const KEEP_PREFIXES: &[&str] = &["CARGO_HOME", "CARGO_NET_", "CARGO_HTTP_", "CARGO_REGISTRIES_", "CARGO_REGISTRY_"];
    const DROP: &[&str] = &[
        "RUSTFLAGS",
        "RUSTDOCFLAGS",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTC_LINKER",
        "MAKEFLAGS",
        "MFLAGS",
        "OUT_DIR",
        "TARGET",
        "HOST",
        "NUM_JOBS",
        "OPT_LEVEL",
        "DEBUG",
        "PROFILE",
    ];
    if key == "CARGO" || KEEP_PREFIXES.iter().any(|p| key.starts_with(p)) {
        return false;
    }
    key.starts_with("CARGO_") || key.starts_with("__CARGO") || DROP.contains(&key)
}

fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    std::process::exit(1)
}
