//! The control socket's server: one thread accepts connections, each connection is
//! served by its own short-lived thread (at most [`Limits::max_connections`] at once),
//! and every request line is bounded in length and in time.

use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::protocol::{Request, Response, MAX_REQUEST_BYTES};
use super::{ControlError, Registry, Snapshot};

/// Longest path a Unix socket can be bound to (`sun_path` holds 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Bounds on what clients can make the server do.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Time a client has to send a complete request line, counted from the connection
    /// (or from the previous response). A client that sends nothing is dropped after it.
    pub request_timeout: Duration,
    /// Time a response may take to be written (a client that never reads is dropped).
    pub write_timeout: Duration,
    /// Connections served at once; more are answered "busy" and closed at once.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { request_timeout: Duration::from_secs(2), write_timeout: Duration::from_secs(2), max_connections: 16 }
    }
}

/// The control socket's own counters (shown in every snapshot).
#[derive(Debug, Default)]
pub struct ServerMetrics {
    /// Well-formed requests answered.
    pub requests: AtomicU64,
    /// Malformed requests: bad JSON, unknown cmd, oversized line, no complete request in
    /// time. Each one was answered with an error (when the client could still read it).
    pub rejected: AtomicU64,
    /// Connections refused because [`Limits::max_connections`] were open.
    pub busy: AtomicU64,
}

impl ServerMetrics {
    /// Put these counters into a snapshot of the registry.
    pub fn fill(&self, s: &mut Snapshot) {
        s.control_requests = self.requests.load(Relaxed);
        s.control_rejected = self.rejected.load(Relaxed);
        s.control_busy = self.busy.load(Relaxed);
    }
}

/// A running control socket. Dropping it stops the accepting thread and removes the
/// socket file (if it is still the one this server created).
pub struct Server {
    path: PathBuf,
    /// Device and inode of the socket file, to remove only our own.
    file_id: (u64, u64),
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
    metrics: Arc<ServerMetrics>,
}

impl Server {
    /// Listen on `path` (mode 0600) with the default [`Limits`].
    pub fn start(path: &Path, registry: Registry) -> Result<Server, ControlError> {
        Self::start_with(path, registry, Limits::default())
    }

    /// Listen on `path` (mode 0600). A stale socket at `path` (nobody answers) is
    /// replaced; a live one is an error naming it, and so is anything that is not a
    /// socket.
    pub fn start_with(path: &Path, registry: Registry, limits: Limits) -> Result<Server, ControlError> {
        check_path_len(path)?;
        clear_stale(path)?;
        let listener = bind_private(path)?;
        // From here on the socket file exists: remove it again if starting fails.
        let setup = (|| {
            let meta = fs::symlink_metadata(path).map_err(ControlError::io(path, "reading the new socket"))?;
            listener.set_nonblocking(true).map_err(ControlError::io(path, "setting the socket non-blocking"))?;
            let stop = EventFd::new(EFD_NONBLOCK).map_err(ControlError::io(path, "creating the stop eventfd"))?;
            Ok(((meta.dev(), meta.ino()), Arc::new(stop)))
        })();
        let (file_id, stop) = match setup {
            Ok(s) => s,
            Err(e) => {
                let _ = fs::remove_file(path);
                return Err(e);
            }
        };
        let metrics = Arc::new(ServerMetrics::default());
        let acceptor = Acceptor {
            listener,
            stop: stop.clone(),
            registry: Arc::new(registry),
            metrics: metrics.clone(),
            limits: Arc::new(limits),
            active: Arc::new(AtomicUsize::new(0)),
        };
        let thread = match std::thread::Builder::new().name("amsvm-control".into()).spawn(move || {
            crate::seccomp::apply(crate::seccomp::Kind::Control);
            acceptor.run()
        }) {
            Ok(t) => t,
            Err(e) => {
                let _ = fs::remove_file(path);
                return Err(ControlError::Io { path: path.to_path_buf(), op: "starting the control thread", source: e });
            }
        };
        tracing::debug!(path = %path.display(), "control socket listening");
        Ok(Server { path: path.to_path_buf(), file_id, stop, thread: Some(thread), metrics })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn metrics(&self) -> &Arc<ServerMetrics> {
        &self.metrics
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Err(e) = self.stop.write(1) {
            tracing::warn!("cannot stop the control thread: {e}");
        } else if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // Remove the socket file only if it is still ours (not replaced by someone else).
        if let Ok(m) = fs::symlink_metadata(&self.path) {
            if (m.dev(), m.ino()) == self.file_id {
                let _ = fs::remove_file(&self.path);
            }
        }
    }
}

fn check_path_len(path: &Path) -> Result<(), ControlError> {
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(ControlError::PathTooLong { path: path.to_path_buf(), len, max: MAX_SOCKET_PATH });
    }
    Ok(())
}

/// What is at a socket path.
enum Probe {
    /// An instance answers there.
    Live,
    /// A socket nobody listens on (its instance died), or nothing at all.
    Stale,
}

/// Connect to `path` to learn whether an instance listens there. The connection is
/// closed at once without a request; the server does not count that as malformed.
fn probe(path: &Path) -> Result<Probe, ControlError> {
    match UnixStream::connect(path) {
        Ok(_) => Ok(Probe::Live),
        Err(e) if matches!(e.kind(), ErrorKind::ConnectionRefused | ErrorKind::NotFound) => Ok(Probe::Stale),
        Err(e) => Err(ControlError::Io { path: path.to_path_buf(), op: "checking the existing socket", source: e }),
    }
}

/// Make `path` free for a new socket: nothing there, or a stale socket (removed). A live
/// socket or anything other than a socket is an error.
fn clear_stale(path: &Path) -> Result<(), ControlError> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ControlError::Io { path: path.to_path_buf(), op: "checking the socket path", source: e }),
        Ok(m) if !m.file_type().is_socket() => Err(ControlError::NotASocket { path: path.to_path_buf() }),
        Ok(_) => match probe(path)? {
            Probe::Live => Err(ControlError::InUse { path: path.to_path_buf() }),
            Probe::Stale => {
                tracing::info!(path = %path.display(), "removing a stale control socket");
                match fs::remove_file(path) {
                    Err(e) if e.kind() != ErrorKind::NotFound => {
                        Err(ControlError::Io { path: path.to_path_buf(), op: "removing the stale socket", source: e })
                    }
                    _ => Ok(()),
                }
            }
        },
    }
}

/// A directory of mode 0700 beside the socket path, removed (with what is left in it)
/// when dropped.
struct PrivateDir(PathBuf);

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = fs::remove_file(self.0.join("s"));
        let _ = fs::remove_dir(&self.0);
    }
}

/// Bind a listening socket at `path` with mode 0600 and never a moment when others
/// could connect: the socket is bound inside a fresh 0700 directory next to `path`,
/// made 0600 there, then hard-linked to `path` (which fails if `path` was taken in the
/// meantime, so a live socket is never replaced). No umask change: that would race
/// with other threads creating files.
fn bind_private(path: &Path) -> Result<UnixListener, ControlError> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tries = 0;
    let dir = loop {
        let d = parent.join(format!(".amsvm-{}-{}", std::process::id(), SEQ.fetch_add(1, Relaxed)));
        match fs::DirBuilder::new().mode(0o700).create(&d) {
            Ok(()) => break PrivateDir(d),
            // Names taken by someone else: a few more tries, not an endless loop.
            Err(e) if e.kind() == ErrorKind::AlreadyExists && tries < 16 => tries += 1,
            Err(e) => return Err(ControlError::Io { path: d, op: "creating a private directory for the socket", source: e }),
        }
    };
    let tmp = dir.0.join("s");
    let (len, tmp_len) = (path.as_os_str().len(), tmp.as_os_str().len());
    if tmp_len > MAX_SOCKET_PATH {
        // Binding goes through the longer temporary name: say what fits for `path`.
        let max = MAX_SOCKET_PATH.saturating_sub(tmp_len.saturating_sub(len));
        return Err(ControlError::PathTooLong { path: path.to_path_buf(), len, max });
    }
    let listener = UnixListener::bind(&tmp).map_err(ControlError::io(&tmp, "binding the control socket"))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600)).map_err(ControlError::io(&tmp, "setting mode 0600"))?;
    match fs::hard_link(&tmp, path) {
        Ok(()) => Ok(listener),
        // Another instance took the path between our check and now.
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Err(ControlError::InUse { path: path.to_path_buf() }),
        Err(e) => Err(ControlError::Io { path: path.to_path_buf(), op: "creating the control socket", source: e }),
    }
}

/// The accepting thread and what it hands to each connection.
struct Acceptor {
    listener: UnixListener,
    stop: Arc<EventFd>,
    registry: Arc<Registry>,
    metrics: Arc<ServerMetrics>,
    limits: Arc<Limits>,
    active: Arc<AtomicUsize>,
}

/// Counts a connection as open while it lives.
struct ActiveGuard(Arc<AtomicUsize>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

impl Acceptor {
    fn run(self) {
        loop {
            let mut fds = [
                libc::pollfd { fd: self.listener.as_raw_fd(), events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: self.stop.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            ];
            // SAFETY: `fds` is an array of two initialized pollfd that outlives the call,
            // and the length passed is its length; both fds stay open (owned by `self`).
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!("control socket: poll failed: {e}; the control socket stops answering");
                return;
            }
            if fds[1].revents != 0 {
                return;
            }
            if fds[0].revents == 0 {
                continue;
            }
            match self.listener.accept() {
                Ok((stream, _)) => self.admit(stream),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted | ErrorKind::ConnectionAborted) => {}
                Err(e) => {
                    // Out of file descriptors or memory: back off instead of spinning.
                    tracing::warn!("control socket: accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    /// Serve a new connection on its own thread, or refuse it when too many are open.
    fn admit(&self, stream: UnixStream) {
        if self.active.load(Relaxed) >= self.limits.max_connections {
            self.metrics.busy.fetch_add(1, Relaxed);
            // Best effort and never blocking: the socket's buffer is empty, the line short.
            let mut stream = stream;
            if stream.set_nonblocking(true).is_ok() {
                let msg = format!("busy: {} control connections are open; try again", self.limits.max_connections);
                let _ = stream.write_all(Response::error(msg).to_line().as_bytes());
            }
            return;
        }
        self.active.fetch_add(1, Relaxed);
        let guard = ActiveGuard(self.active.clone());
        let (registry, metrics, limits) = (self.registry.clone(), self.metrics.clone(), self.limits.clone());
        let spawned = std::thread::Builder::new().name("amsvm-control-conn".into()).spawn(move || {
            crate::seccomp::apply(crate::seccomp::Kind::Control);
            let _guard = guard;
            Connection { stream, buf: Vec::with_capacity(MAX_REQUEST_BYTES), registry: &registry, metrics: &metrics, limits: &limits }
                .serve();
        });
        if let Err(e) = spawned {
            tracing::warn!("control socket: cannot start a connection thread: {e}");
        }
    }
}

/// What reading one request line gave.
enum LineRead {
    Line(Vec<u8>),
    /// The client closed its side; `Some` holds a last line sent without a newline.
    Eof(Option<Vec<u8>>),
    TooLong,
    /// No complete line in time; `partial` when some of one had arrived.
    TimedOut { partial: bool },
    Failed,
}

struct Connection<'a> {
    stream: UnixStream,
    /// Bytes received and not yet handled (never more than MAX_REQUEST_BYTES).
    buf: Vec<u8>,
    registry: &'a Registry,
    metrics: &'a ServerMetrics,
    limits: &'a Limits,
}

impl Connection<'_> {
    fn serve(mut self) {
        // Accepted sockets are blocking on Linux; make sure, since reads rely on timeouts.
        if self.stream.set_nonblocking(false).is_err() || self.stream.set_write_timeout(Some(self.limits.write_timeout)).is_err() {
            return;
        }
        let mut served = 0u64;
        loop {
            let line = match self.read_line() {
                LineRead::Line(l) => l,
                LineRead::Eof(Some(l)) => {
                    self.answer(&l);
                    return;
                }
                LineRead::Eof(None) | LineRead::Failed => return,
                LineRead::TooLong => {
                    self.metrics.rejected.fetch_add(1, Relaxed);
                    let msg = format!("request line longer than {MAX_REQUEST_BYTES} bytes; closing the connection");
                    self.send(&Response::error(msg));
                    return;
                }
                LineRead::TimedOut { partial } => {
                    // A client that made its requests and then lingers is not at fault.
                    if partial || served == 0 {
                        self.metrics.rejected.fetch_add(1, Relaxed);
                        let msg = format!("no complete request within {:?}; closing the connection", self.limits.request_timeout);
                        self.send(&Response::error(msg));
                    }
                    return;
                }
            };
            if !self.answer(&line) {
                return;
            }
            served += 1;
        }
    }

    /// Answer one request line; false if the answer could not be sent.
    fn answer(&mut self, line: &[u8]) -> bool {
        let response = match Request::parse(line) {
            Ok(Request::Stat) => {
                self.metrics.requests.fetch_add(1, Relaxed);
                let mut s = self.registry.snapshot();
                self.metrics.fill(&mut s);
                Response::stat(s)
            }
            Ok(Request::KillPagingServer) => {
                self.metrics.requests.fetch_add(1, Relaxed);
                match self.registry.paging_server.as_ref().and_then(|w| w.upgrade()) {
                    Some(ps) => {
                        ps.kill("killed on request");
                        Response::done()
                    }
                    None => Response::error("this amsvm runs no paging server ([paging] backend = \"vm\")"),
                }
            }
            Ok(Request::Set { partition, weight, loan_policy }) => {
                self.metrics.requests.fetch_add(1, Relaxed);
                match self.registry.set(&partition, weight, loan_policy) {
                    Ok(()) => Response::done(),
                    Err(msg) => Response::error(msg),
                }
            }
            Ok(Request::Destroy { partition }) => {
                self.metrics.requests.fetch_add(1, Relaxed);
                self.registry.destroy(&partition).map_or_else(Response::error, |()| Response::done())
            }
            Ok(Request::Resume { partition }) => {
                self.metrics.requests.fetch_add(1, Relaxed);
                self.registry.resume(&partition).map_or_else(Response::error, |()| Response::done())
            }
            Ok(Request::Loan { partition, target }) => {
                self.metrics.requests.fetch_add(1, Relaxed);
                match self.registry.set_loan(&partition, target) {
                    Ok(()) => Response::done(),
                    Err(msg) => Response::error(msg),
                }
            }
            Err(msg) => {
                self.metrics.rejected.fetch_add(1, Relaxed);
                Response::error(msg)
            }
        };
        self.send(&response)
    }

    fn send(&mut self, r: &Response) -> bool {
        self.stream.write_all(r.to_line().as_bytes()).is_ok()
    }

    /// Read up to the next newline, within the request timeout and MAX_REQUEST_BYTES.
    fn read_line(&mut self) -> LineRead {
        let deadline = Instant::now() + self.limits.request_timeout;
        let mut chunk = [0u8; 1024];
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.buf.drain(..=i).collect();
                line.pop();
                return LineRead::Line(line);
            }
            if self.buf.len() >= MAX_REQUEST_BYTES {
                return LineRead::TooLong;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.stream.set_read_timeout(Some(left)).is_err() {
                return LineRead::TimedOut { partial: !self.buf.is_empty() };
            }
            let want = chunk.len().min(MAX_REQUEST_BYTES - self.buf.len());
            match self.stream.read(&mut chunk[..want]) {
                Ok(0) => {
                    let rest = std::mem::take(&mut self.buf);
                    let last = if rest.iter().all(u8::is_ascii_whitespace) { None } else { Some(rest) };
                    return LineRead::Eof(last);
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return LineRead::TimedOut { partial: !self.buf.is_empty() }
                }
                Err(_) => return LineRead::Failed,
            }
        }
    }
}

fn uid() -> u32 {
    // SAFETY: getuid has no preconditions, touches no memory of ours and cannot fail.
    unsafe { libc::getuid() }
}

/// Where control sockets live by default (not created here): `$XDG_RUNTIME_DIR/amsvm`
/// when XDG_RUNTIME_DIR is set to an absolute path, else `/tmp/amsvm-<uid>`.
pub fn runtime_dir() -> PathBuf {
    runtime_dir_from(std::env::var_os("XDG_RUNTIME_DIR").as_deref())
}

pub(super) fn runtime_dir_from(xdg_runtime_dir: Option<&std::ffi::OsStr>) -> PathBuf {
    match xdg_runtime_dir {
        Some(d) if Path::new(d).is_absolute() => Path::new(d).join("amsvm"),
        _ => PathBuf::from(format!("/tmp/amsvm-{}", uid())),
    }
}

/// [`runtime_dir`], created with mode 0700 if missing. A directory that is not ours or
/// that others can reach (group/other permissions) is refused.
pub fn default_dir() -> Result<PathBuf, ControlError> {
    let d = runtime_dir();
    match fs::DirBuilder::new().mode(0o700).create(&d) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
        Err(e) => return Err(ControlError::Io { path: d, op: "creating the control socket directory", source: e }),
    }
    check_private_dir(&d)?;
    Ok(d)
}

/// This process's default control socket: `<pid>.sock` in [`default_dir`].
pub fn default_socket_path() -> Result<PathBuf, ControlError> {
    Ok(default_dir()?.join(format!("{}.sock", std::process::id())))
}

/// Refuse a directory that is a symlink, not ours, or open to group/other.
pub(super) fn check_private_dir(d: &Path) -> Result<(), ControlError> {
    let m = fs::symlink_metadata(d).map_err(ControlError::io(d, "checking the control socket directory"))?;
    let unsafe_dir = |why: String| Err(ControlError::UnsafeDir { path: d.to_path_buf(), why });
    if !m.is_dir() {
        return unsafe_dir("not a directory (or a symlink)".into());
    }
    if m.uid() != uid() {
        return unsafe_dir(format!("owned by uid {}, not by us (uid {})", m.uid(), uid()));
    }
    if m.mode() & 0o077 != 0 {
        return unsafe_dir(format!("mode {:o} lets others in (it must be 700: chmod 700 it)", m.mode() & 0o7777));
    }
    Ok(())
}

/// The one live control socket in `dir` (`*.sock` that an instance answers on). Stale
/// sockets are ignored and removed. None or several live ones are errors naming them.
pub fn discover(dir: &Path) -> Result<PathBuf, ControlError> {
    match fs::symlink_metadata(dir) {
        Err(e) if e.kind() == ErrorKind::NotFound => return Err(ControlError::NotFound { dir: dir.to_path_buf() }),
        _ => check_private_dir(dir)?,
    }
    let mut live = Vec::new();
    for entry in fs::read_dir(dir).map_err(ControlError::io(dir, "listing control sockets"))? {
        let entry = entry.map_err(ControlError::io(dir, "listing control sockets"))?;
        let path = entry.path();
        let is_socket = entry.file_type().is_ok_and(|t| t.is_socket());
        if !is_socket || path.extension().is_none_or(|e| e != "sock") {
            continue;
        }
        match probe(&path) {
            Ok(Probe::Live) => live.push(path),
            Ok(Probe::Stale) => {
                tracing::debug!(path = %path.display(), "removing a stale control socket");
                let _ = fs::remove_file(&path);
            }
            Err(e) => tracing::debug!("{e}"),
        }
    }
    live.sort();
    match live.len() {
        0 => Err(ControlError::NotFound { dir: dir.to_path_buf() }),
        1 => Ok(live.remove(0)),
        _ => Err(ControlError::Ambiguous { dir: dir.to_path_buf(), sockets: live }),
    }
}
