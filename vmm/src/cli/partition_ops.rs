//! `amsvm destroy NAME` and `amsvm resume NAME` (`--socket PATH`): end a running
//! partition now, or resume one the pool paused on a paging-device error once the
//! device works again.

use std::path::PathBuf;

use clap::Args;

use crate::control::{self, ControlError};

use super::EXIT_BAD_INPUT;

#[derive(Args, Debug)]
pub struct PartitionArgs {
    /// The partition.
    partition: String,
    /// The control socket of the amsvm to ask (default: the only one running).
    #[arg(long)]
    socket: Option<PathBuf>,
}

fn ask(a: PartitionArgs, op: fn(&std::path::Path, &str) -> Result<(), ControlError>) -> i32 {
    let r = a.socket.map_or_else(|| control::discover(&control::runtime_dir()), Ok).and_then(|p| op(&p, &a.partition));
    match r {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("amsvm: {e}");
            EXIT_BAD_INPUT
        }
    }
}

/// Exit status: 0 when the partition is being destroyed; 2 with a one-line error.
pub fn destroy(a: PartitionArgs) -> i32 {
    ask(a, control::request_destroy)
}

/// Exit status: 0 when the partition was resumed; 2 with a one-line error.
pub fn resume(a: PartitionArgs) -> i32 {
    ask(a, control::request_resume)
}
