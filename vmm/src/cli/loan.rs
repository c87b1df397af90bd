//! `amsvm loan NAME MIB|auto [--socket PATH]`: hold a partition's balloon target in a
//! running amsvm (the pool's loaning policy leaves it alone), or hand it back to the
//! policy with `auto`.

use std::path::PathBuf;

use clap::Args;

use crate::control::{self, LoanTarget};

use super::EXIT_BAD_INPUT;

#[derive(Args, Debug)]
pub struct LoanArgs {
    /// The partition.
    partition: String,
    /// The balloon target in MiB, or `auto` to let the pool's loaning policy decide.
    target: String,
    /// The control socket of the amsvm to ask (default: the only one running).
    #[arg(long)]
    socket: Option<PathBuf>,
}

/// Exit status: 0 when the target was set; 2 with a one-line error otherwise.
pub fn loan(a: LoanArgs) -> i32 {
    let target = if a.target == "auto" {
        LoanTarget::Auto
    } else {
        match a.target.parse::<u64>() {
            Ok(m) => LoanTarget::Mib(m),
            Err(_) => {
                eprintln!("amsvm: loan: target {:?} is neither a number of MiB nor \"auto\"", a.target);
                return EXIT_BAD_INPUT;
            }
        }
    };
    let r = a
        .socket
        .map_or_else(|| control::discover(&control::runtime_dir()), Ok)
        .and_then(|p| control::request_loan(&p, &a.partition, target));
    match r {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("amsvm: {e}");
            EXIT_BAD_INPUT
        }
    }
}
