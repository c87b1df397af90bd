//! `amsvm seccomp-check` (hidden): proves a thread kind's seccomp filter on one system
//! call, for the end-to-end tests. See `crate::seccomp::check`.

use clap::Args;

use crate::seccomp::{Kind, Probe};

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// The thread kind whose filter the probing thread applies.
    #[arg(long, value_enum)]
    kind: Kind,
    /// The system call it then makes.
    #[arg(long, value_enum)]
    syscall: Probe,
}

pub fn seccomp_check(a: CheckArgs) -> i32 {
    crate::seccomp::check(a.kind, a.syscall)
}
