//! `amsvm boot --kernel K ...`: boot one Linux guest with its console on stdout.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;

use crate::config::{check_mem_mib, BootConfig, DiskConfig, PartitionSpec, MAX_VCPUS};

use super::run::{print_summary, run_specs, success};
use super::{EXIT_BAD_INPUT, EXIT_GUEST_FAILED};

#[derive(Args, Debug)]
pub struct BootArgs {
    /// Linux kernel: bzImage or ELF vmlinux.
    #[arg(long)]
    kernel: PathBuf,
    /// initramfs.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = "console=ttyS0 reboot=k panic=1")]
    cmdline: String,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 256)]
    mem: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// A virtio-blk disk (repeat for more).
    #[arg(long)]
    disk: Vec<PathBuf>,
    /// Console log file (the console always goes to stdout too).
    #[arg(long)]
    log: Option<PathBuf>,
    /// Back guest RAM with 4 KiB pages only (by default it asks the host for transparent
    /// huge pages, as the config's `huge_pages = true` does).
    #[arg(long)]
    no_huge_pages: bool,
}

pub fn boot(a: BootArgs) -> i32 {
    let epoch = Instant::now();
    let mem_bytes = match check_mem_mib("--mem", a.mem, amsvm_abi::layout::MAX_RAM) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("amsvm: {e}");
            return EXIT_BAD_INPUT;
        }
    };
    if a.vcpus == 0 || a.vcpus > MAX_VCPUS {
        eprintln!("amsvm: --vcpus {}: must be between 1 and {MAX_VCPUS}", a.vcpus);
        return EXIT_BAD_INPUT;
    }
    let spec = PartitionSpec {
        role: crate::config::PartitionRole::Guest,
        id: 0,
        name: "linux".into(),
        mem_bytes,
        min_bytes: 0,
        weight: crate::config::DEFAULT_WEIGHT,
        paging_file: None,
        loan_policy: crate::config::LoanPolicy::Default,
        vcpus: a.vcpus,
        boot: BootConfig::Linux { kernel: a.kernel, initrd: a.initrd, cmdline: a.cmdline },
        disks: a.disk.into_iter().map(|path| DiskConfig { path, read_only: false, create_mib: None }).collect(),
        console_stdout: true,
        log_path: a.log,
        huge_pages: !a.no_huge_pages,
    };
    match run_specs(std::slice::from_ref(&spec), None, super::run::Control::Default, epoch) {
        Err(e) => {
            eprintln!("amsvm: {e}");
            EXIT_BAD_INPUT
        }
        Ok(reports) => {
            print_summary(&reports);
            if reports.iter().all(success) {
                0
            } else {
                EXIT_GUEST_FAILED
            }
        }
    }
}
