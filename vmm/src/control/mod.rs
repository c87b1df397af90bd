//! The control socket: a running amsvm answers questions about its pool and partitions
//! on a Unix stream socket, one line of JSON per request and per response.
//!
//! ```text
//! -> {"cmd":"stat"}
//! <- {"ok":true,"stat":{"version":1,"pid":...,"pool":{...},"partitions":[...]}}
//! -> {"cmd":"loan","partition":"p0","mib":64}      (or "mib":"auto")
//! <- {"ok":true}
//! -> {"cmd":"set","partition":"p0","weight":200,"loan_policy":"aggressive"}
//! <- {"ok":true}
//! <- {"ok":false,"error":"unknown cmd \"frobnicate\" (known: stat, loan, set, kill-paging-server)"}
//! ```
//!
//! The socket is private to its user (mode 0600, created so that it is never reachable
//! by others, even for an instant). By default it is `<pid>.sock` in [`default_dir`];
//! clients find it with [`discover`]. Everything a client sends is untrusted: request
//! lines are bounded, silent clients time out, concurrent connections are bounded, and
//! every malformed request is answered with an error and counted (`control_rejected`).

mod client;
mod protocol;
mod server;
mod snapshot;

use std::path::PathBuf;
use std::time::Duration;

pub use client::{request_destroy, request_loan, request_resume, request_set, request_stat, request_stat_timeout, CLIENT_TIMEOUT};
pub use protocol::{LoanTarget, Request, Response, MAX_REQUEST_BYTES, MAX_RESPONSE_BYTES};
pub use server::{default_dir, default_socket_path, discover, runtime_dir, Limits, Server, ServerMetrics};
pub use snapshot::{
    BalloonSnapshot, PartitionSnapshot, PartitionState, PoolSnapshot, RegisteredPartition, Registry, Snapshot, PAGE_SIZE, SNAPSHOT_VERSION,
};

/// What can go wrong with the control socket. Every message names the path and the
/// problem, and where it helps, what to do.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("{}: {op}: {source}", .path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("another amsvm is running with control socket {}; give --socket", .path.display())]
    InUse { path: PathBuf },
    #[error("{} exists and is not a socket; refusing to replace it (give another --socket)", .path.display())]
    NotASocket { path: PathBuf },
    #[error("control socket path {} is too long ({len} bytes; a Unix socket path has at most {max})", .path.display())]
    PathTooLong { path: PathBuf, len: usize, max: usize },
    #[error("{}: {why}; refusing to use it for control sockets", .path.display())]
    UnsafeDir { path: PathBuf, why: String },
    #[error("no running amsvm found (looked in {})", .dir.display())]
    NotFound { dir: PathBuf },
    #[error("several amsvm instances are running ({}); choose one with --socket", list(.sockets))]
    Ambiguous { dir: PathBuf, sockets: Vec<PathBuf> },
    #[error("{}: no such control socket (is amsvm running?)", .path.display())]
    NoSocket { path: PathBuf },
    #[error("{}: nothing is listening on this control socket (amsvm is gone?)", .path.display())]
    NotListening { path: PathBuf },
    #[error("{}: no answer within {timeout:?}", .path.display())]
    Timeout { path: PathBuf, timeout: Duration },
    #[error("{}: bad response: {msg}", .path.display())]
    Protocol { path: PathBuf, msg: String },
    #[error("{}: amsvm answered with an error: {msg}", .path.display())]
    Remote { path: PathBuf, msg: String },
}

fn list(paths: &[PathBuf]) -> String {
    paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
}

impl ControlError {
    fn io(path: impl Into<PathBuf>, op: &'static str) -> impl FnOnce(std::io::Error) -> ControlError {
        let path = path.into();
        move |source| ControlError::Io { path, op, source }
    }
}

#[cfg(test)]
mod tests;
