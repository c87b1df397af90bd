//! The control socket's client side, as `amsvm stat` uses it.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use super::protocol::{LoanTarget, Request, Response, MAX_RESPONSE_BYTES};
use super::{ControlError, Snapshot};

/// How long a client waits for each step (sending, the answer) before giving up.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Ask the amsvm listening on `path` for its counters, waiting at most [`CLIENT_TIMEOUT`].
pub fn request_stat(path: &Path) -> Result<Snapshot, ControlError> {
    request_stat_timeout(path, CLIENT_TIMEOUT)
}

/// [`request_stat`] with its own timeout.
pub fn request_stat_timeout(path: &Path, timeout: Duration) -> Result<Snapshot, ControlError> {
    match request(path, Request::Stat, timeout)? {
        Response { ok: true, stat: Some(s), .. } => Ok(s),
        Response { ok: true, stat: None, .. } => Err(protocol(path, "\"ok\" without \"stat\"")),
        Response { ok: false, error, .. } => {
            Err(ControlError::Remote { path: path.to_path_buf(), msg: error.unwrap_or_else(|| "(no message)".into()) })
        }
    }
}

/// Ask the amsvm listening on `path` to hold (or release) a partition's balloon target.
pub fn request_loan(path: &Path, partition: &str, target: LoanTarget) -> Result<(), ControlError> {
    request_done(path, Request::Loan { partition: partition.to_string(), target })
}

/// Ask the amsvm listening on `path` to change a partition's weight and/or loan policy.
pub fn request_set(
    path: &Path,
    partition: &str,
    weight: Option<u8>,
    loan_policy: Option<crate::config::LoanPolicy>,
) -> Result<(), ControlError> {
    request_done(path, Request::Set { partition: partition.to_string(), weight, loan_policy })
}

/// Ask the amsvm listening on `path` to destroy a running partition.
pub fn request_destroy(path: &Path, partition: &str) -> Result<(), ControlError> {
    request_done(path, Request::Destroy { partition: partition.to_string() })
}

/// Ask the amsvm listening on `path` to resume a partition paused on a paging error.
pub fn request_resume(path: &Path, partition: &str) -> Result<(), ControlError> {
    request_done(path, Request::Resume { partition: partition.to_string() })
}

/// Send a request that changes something; Ok when amsvm says it is done.
fn request_done(path: &Path, req: Request) -> Result<(), ControlError> {
    match request(path, req, CLIENT_TIMEOUT)? {
        Response { ok: true, .. } => Ok(()),
        Response { ok: false, error, .. } => {
            Err(ControlError::Remote { path: path.to_path_buf(), msg: error.unwrap_or_else(|| "(no message)".into()) })
        }
    }
}

fn protocol(path: &Path, msg: impl Into<String>) -> ControlError {
    ControlError::Protocol { path: path.to_path_buf(), msg: msg.into() }
}

/// Send one request and read its one-line response.
fn request(path: &Path, req: Request, timeout: Duration) -> Result<Response, ControlError> {
    let io_err = |op: &'static str| {
        move |e: std::io::Error| match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => ControlError::Timeout { path: path.to_path_buf(), timeout },
            _ => ControlError::Io { path: path.to_path_buf(), op, source: e },
        }
    };
    let mut stream = UnixStream::connect(path).map_err(|e| match e.kind() {
        ErrorKind::ConnectionRefused => ControlError::NotListening { path: path.to_path_buf() },
        ErrorKind::NotFound => ControlError::NoSocket { path: path.to_path_buf() },
        _ => ControlError::Io { path: path.to_path_buf(), op: "connecting to the control socket", source: e },
    })?;
    stream.set_read_timeout(Some(timeout)).map_err(io_err("setting a read timeout"))?;
    stream.set_write_timeout(Some(timeout)).map_err(io_err("setting a write timeout"))?;
    // A server that refuses the connection (busy) answers and closes at once, maybe
    // before the request is sent: then its answer is still there to read.
    let sent = stream.write_all(req.to_line().as_bytes());
    if let Err(e) = &sent {
        if !matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset) {
            return Err(io_err("sending the request")(sent.unwrap_err()));
        }
    }
    // A bounded read: at most MAX_RESPONSE_BYTES, whatever the other end sends. (The
    // timeout applies to each read; amsvm answers in one short burst.)
    let mut line = Vec::new();
    BufReader::new(stream.take(MAX_RESPONSE_BYTES as u64 + 1))
        .read_until(b'\n', &mut line)
        .map_err(io_err("reading the response"))?;
    if line.is_empty() {
        if let Err(e) = sent {
            return Err(io_err("sending the request")(e));
        }
    }
    if line.last() != Some(&b'\n') {
        return Err(protocol(
            path,
            if line.is_empty() {
                "the connection closed without an answer".to_string()
            } else if line.len() > MAX_RESPONSE_BYTES {
                format!("response longer than {MAX_RESPONSE_BYTES} bytes")
            } else {
                "the connection closed in the middle of the answer".to_string()
            },
        ));
    }
    serde_json::from_slice(&line).map_err(|e| protocol(path, format!("not an amsvm response: {e}")))
}
