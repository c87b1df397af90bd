//! The `amsvm` binary: parses the command line and hands over to `vmm::cli`.
fn main() {
    std::process::exit(vmm::cli::main());
}
