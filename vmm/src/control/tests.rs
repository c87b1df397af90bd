//! Control socket tests: a real server and client over sockets in temporary directories.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::server::{check_private_dir, runtime_dir_from};
use super::*;
use crate::metrics::{PartitionMetrics, PoolMetrics};

struct Fixture {
    registry: Registry,
    pool: Arc<PoolMetrics>,
    parts: Vec<Arc<PartitionMetrics>>,
}

fn fixture() -> Fixture {
    let pool = Arc::new(PoolMetrics::default());
    pool.size_pages.store(65536, Relaxed);
    let parts: Vec<_> = (0..2).map(|_| Arc::new(PartitionMetrics::default())).collect();
    let registry = Registry::new(
        Some(pool.clone()),
        vec![
            RegisteredPartition::new("alpha", 128, 32, 200, parts[0].clone()),
            RegisteredPartition::new("bravo", 256, 0, 50, parts[1].clone()),
        ],
    );
    Fixture { registry, pool, parts }
}

/// A private (0700) temporary directory, as the default directory is.
fn private_tempdir() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    d
}

fn fast() -> Limits {
    Limits { request_timeout: Duration::from_millis(300), ..Limits::default() }
}

/// A raw connection: send bytes, read response lines.
struct Raw {
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl Raw {
    fn connect(path: &Path) -> Raw {
        let w = UnixStream::connect(path).unwrap();
        w.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        Raw { r: BufReader::new(w.try_clone().unwrap()), w }
    }

    fn send(&mut self, bytes: &[u8]) -> &mut Self {
        self.w.write_all(bytes).unwrap();
        self
    }

    fn response(&mut self) -> Response {
        let mut line = String::new();
        self.r.read_line(&mut line).unwrap();
        assert!(line.ends_with('\n'), "no complete response line: {line:?}");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad response {line:?}: {e}"))
    }

    fn error(&mut self) -> String {
        let r = self.response();
        assert!(!r.ok && r.stat.is_none(), "expected an error, got {r:?}");
        r.error.unwrap()
    }

    /// The server closed the connection (after what was already read). Closing with
    /// unread data (an oversized request) resets the connection.
    fn assert_closed(&mut self) {
        let mut rest = Vec::new();
        if let Err(e) = self.r.read_to_end(&mut rest) {
            assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
        }
        assert!(rest.is_empty(), "more after the last response: {:?}", String::from_utf8_lossy(&rest));
    }
}

fn leftovers(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_none_or(|e| e != "sock")).collect()
}

#[test]
fn stat_round_trip_sees_the_counters_change() {
    let dir = private_tempdir();
    let path = dir.path().join("a.sock");
    let f = fixture();
    f.pool.resident.store(1000, Relaxed);
    f.pool.faults.store(1200, Relaxed);
    f.parts[0].pmem.store(600, Relaxed);
    f.parts[0].hpi.store(10, Relaxed);
    f.parts[0].hpit_ns.store(1_500_000, Relaxed);
    let server = Server::start(&path, f.registry.clone()).unwrap();
    assert_eq!(server.path(), path);

    let s = request_stat(&path).unwrap();
    assert_eq!((s.version, s.pid, s.control_requests, s.control_rejected), (SNAPSHOT_VERSION, std::process::id(), 1, 0));
    let pool = s.pool.as_ref().unwrap();
    assert_eq!((pool.size_pages, pool.in_use_pages, pool.free_pages, pool.faults), (65536, 1000, 64536, 1200));
    assert_eq!(s.partitions.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["alpha", "bravo"]);
    let a = &s.partitions[0];
    assert_eq!((a.logical_mib, a.min_mib, a.weight, a.pmem_pages, a.hpi, a.hpit_ms), (128, 32, 200, 600, 10, 1.5));
    assert_eq!(a.state, PartitionState::Running);

    // The counters move; the next request sees them move.
    f.pool.resident.store(1500, Relaxed);
    f.parts[0].pmem.store(700, Relaxed);
    f.parts[1].page_outs.store(42, Relaxed);
    f.parts[1].pages_verified.store(9999, Relaxed);
    *f.parts[1].paused.lock().unwrap() = Some("paging device full".into());
    f.registry.partitions[0].set_outcome("exited ok");
    let t = request_stat(&path).unwrap();
    assert_eq!(t.control_requests, 2);
    assert!(t.uptime_ms >= s.uptime_ms);
    assert_eq!(t.pool.unwrap().in_use_pages, 1500);
    assert_eq!((t.partitions[0].pmem_pages, t.partitions[0].state_text().as_str()), (700, "ended: exited ok"));
    let b = &t.partitions[1];
    assert_eq!((b.page_outs, b.pages_verified, b.state), (42, 9999, PartitionState::Paused));
    assert_eq!(b.paused_reason.as_deref(), Some("paging device full"));
    assert_eq!(server.metrics().requests.load(Relaxed), 2);
}

#[test]
fn socket_is_private_and_removed_on_drop() {
    let dir = private_tempdir();
    let path = dir.path().join("p.sock");
    let server = Server::start(&path, Registry::default()).unwrap();
    let meta = std::fs::symlink_metadata(&path).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600);
    assert!(leftovers(dir.path()).is_empty(), "bind directory left behind: {:?}", leftovers(dir.path()));
    // A pool-less registry answers too.
    let s = request_stat(&path).unwrap();
    assert!(s.pool.is_none() && s.partitions.is_empty());
    drop(server);
    assert!(!path.exists(), "socket file left after drop");
    assert!(matches!(request_stat(&path), Err(ControlError::NoSocket { .. })));
}

#[test]
fn drop_leaves_a_socket_that_is_no_longer_ours() {
    let dir = private_tempdir();
    let path = dir.path().join("r.sock");
    let server = Server::start(&path, Registry::default()).unwrap();
    std::fs::remove_file(&path).unwrap();
    std::fs::write(&path, b"someone else's").unwrap();
    drop(server);
    assert_eq!(std::fs::read(&path).unwrap(), b"someone else's");
}

#[test]
fn malformed_requests_are_answered_counted_and_the_server_keeps_serving() {
    let dir = private_tempdir();
    let path = dir.path().join("m.sock");
    let server = Server::start_with(&path, fixture().registry, fast()).unwrap();

    // Bad JSON and an unknown cmd: error answers, the connection stays usable.
    let mut c = Raw::connect(&path);
    assert!(c.send(b"stat please\n").error().starts_with("request is not JSON"));
    assert_eq!(c.send(b"{\"cmd\":\"frobnicate\"}\n").error(), "unknown cmd \"frobnicate\" (known: stat, loan, set, destroy, resume, kill-paging-server)");
    assert!(c.send(b"{\"cmd\":\"stat\"").send(b"}\r\n").response().ok, "a request split over two writes");
    assert!(c.send(b"[]\n").error().contains("JSON object"));
    drop(c);

    // An oversized line: an error, then the connection is closed.
    let mut c = Raw::connect(&path);
    let e = c.send(&vec![b'x'; 64 << 10]).error();
    assert!(e.contains(&format!("longer than {MAX_REQUEST_BYTES} bytes")), "{e}");
    c.assert_closed();

    // A client that never sends: dropped after the request timeout, with an error.
    let t = Instant::now();
    let mut c = Raw::connect(&path);
    assert!(c.error().starts_with("no complete request within"));
    c.assert_closed();
    assert!(t.elapsed() >= Duration::from_millis(300) && t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    // Half a request, then silence: the same.
    let mut c = Raw::connect(&path);
    assert!(c.send(b"{\"cmd\":").error().starts_with("no complete request within"));
    c.assert_closed();

    // Not counted: a connection closed without a request (what discovery does), a last
    // request without its newline, and lingering after a good request.
    drop(UnixStream::connect(&path).unwrap());
    let mut c = Raw::connect(&path);
    c.send(b"{\"cmd\":\"stat\"}");
    c.w.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(c.response().ok);
    c.assert_closed();
    let mut c = Raw::connect(&path);
    assert!(c.send(b"{\"cmd\":\"stat\"}\n").response().ok);
    c.assert_closed();

    let s = request_stat(&path).unwrap();
    assert_eq!(s.control_rejected, 6, "3 on the first connection, oversized, silent, half");
    assert_eq!(s.control_requests, 4);
    assert_eq!(s.partitions.len(), 2);
    assert_eq!(server.metrics().rejected.load(Relaxed), 6);
}

#[test]
fn connections_beyond_the_limit_are_refused_busy() {
    let dir = private_tempdir();
    let path = dir.path().join("b.sock");
    let limits = Limits { max_connections: 1, request_timeout: Duration::from_secs(2), ..Limits::default() };
    let server = Server::start_with(&path, Registry::default(), limits).unwrap();
    let silent = Raw::connect(&path);
    // FIFO accept: the silent connection holds the only slot.
    std::thread::sleep(Duration::from_millis(50));
    match request_stat(&path) {
        Err(e @ ControlError::Remote { .. }) => assert!(e.to_string().contains("busy"), "{e}"),
        other => panic!("expected busy, got {other:?}"),
    }
    assert_eq!(server.metrics().busy.load(Relaxed), 1);
    drop(silent);
    // Once the slot is free again the server answers.
    let t = Instant::now();
    loop {
        match request_stat(&path) {
            Ok(s) => {
                assert!(s.control_busy >= 1);
                break;
            }
            Err(e) if t.elapsed() < Duration::from_secs(5) => {
                assert!(e.to_string().contains("busy"), "{e}");
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("server did not recover: {e}"),
        }
    }
}

#[test]
fn stale_socket_is_reused_live_one_refused() {
    let dir = private_tempdir();
    let path = dir.path().join("s.sock");
    // A socket whose listener is gone, as after a crash.
    drop(UnixListener::bind(&path).unwrap());
    assert!(std::fs::symlink_metadata(&path).unwrap().file_type().is_socket());
    assert!(matches!(request_stat(&path), Err(ControlError::NotListening { .. })));
    let first = Server::start(&path, fixture().registry).unwrap();
    assert_eq!(request_stat(&path).unwrap().partitions.len(), 2);

    // A second instance on the same live path fails, naming it; the first keeps going.
    let e = Server::start(&path, Registry::default()).err().expect("second server started on a live socket");
    assert!(matches!(e, ControlError::InUse { .. }));
    assert_eq!(e.to_string(), format!("another amsvm is running with control socket {}; give --socket", path.display()));
    assert_eq!(request_stat(&path).unwrap().partitions.len(), 2);
    assert!(leftovers(dir.path()).is_empty());
    drop(first);
}

#[test]
fn refuses_to_replace_what_is_not_a_socket() {
    let dir = private_tempdir();
    let path = dir.path().join("f.sock");
    std::fs::write(&path, b"data").unwrap();
    let e = Server::start(&path, Registry::default()).err().unwrap();
    assert!(matches!(e, ControlError::NotASocket { .. }), "{e}");
    assert!(e.to_string().contains(&path.display().to_string()));
    assert_eq!(std::fs::read(&path).unwrap(), b"data");

    let long = dir.path().join("x".repeat(120));
    assert!(matches!(Server::start(&long, Registry::default()), Err(ControlError::PathTooLong { .. })));
    // Short enough for a socket, too long for the temporary name it is bound through:
    // the error names the path asked for and the length that would fit.
    let deep = dir.path().join("y".repeat(95 - dir.path().as_os_str().len() - 1));
    std::fs::create_dir(&deep).unwrap();
    let edge = deep.join("a.sock");
    match Server::start(&edge, Registry::default()) {
        Err(ControlError::PathTooLong { path, len, max }) => assert!(path == edge && len == 102 && max < 102, "{max}"),
        other => panic!("expected PathTooLong, got {:?}", other.map(|s| s.path().to_path_buf())),
    }
    assert_eq!(std::fs::read_dir(&deep).unwrap().count(), 0, "bind directory left behind");
}

#[test]
fn client_times_out_on_a_server_that_never_answers() {
    let dir = private_tempdir();
    let path = dir.path().join("mute.sock");
    let _listener = UnixListener::bind(&path).unwrap();
    let t = Instant::now();
    let e = request_stat_timeout(&path, Duration::from_millis(200)).unwrap_err();
    assert!(matches!(e, ControlError::Timeout { .. }), "{e}");
    assert!(t.elapsed() < Duration::from_secs(3));
    assert!(e.to_string().contains("mute.sock"), "{e}");
}

#[test]
fn discover_finds_exactly_one_live_socket() {
    let dir = private_tempdir();
    let d = dir.path();
    let e = discover(&d.join("missing")).unwrap_err();
    assert_eq!(e.to_string(), format!("no running amsvm found (looked in {})", d.join("missing").display()));
    assert!(matches!(discover(d), Err(ControlError::NotFound { .. })));

    // A stale socket alone is nobody; it is removed.
    drop(UnixListener::bind(d.join("99.sock")).unwrap());
    assert!(matches!(discover(d), Err(ControlError::NotFound { .. })));
    assert!(!d.join("99.sock").exists());

    drop(UnixListener::bind(d.join("98.sock")).unwrap());
    std::fs::write(d.join("notes.txt"), b"").unwrap();
    let one = Server::start(&d.join("1.sock"), Registry::default()).unwrap();
    assert_eq!(discover(d).unwrap(), d.join("1.sock"));
    assert!(request_stat(&discover(d).unwrap()).is_ok());

    let two = Server::start(&d.join("2.sock"), Registry::default()).unwrap();
    let e = discover(d).unwrap_err();
    assert!(matches!(&e, ControlError::Ambiguous { sockets, .. } if sockets.len() == 2), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("1.sock") && msg.contains("2.sock") && msg.contains("--socket"), "{msg}");
    drop(one);
    assert_eq!(discover(d).unwrap(), d.join("2.sock"));
    // The probes were not counted as malformed requests.
    assert_eq!(two.metrics().rejected.load(Relaxed), 0);
}

#[test]
fn directories_open_to_others_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("open");
    std::fs::create_dir(&d).unwrap();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o770)).unwrap();
    let e = discover(&d).unwrap_err();
    assert!(matches!(e, ControlError::UnsafeDir { .. }), "{e}");
    assert!(e.to_string().contains("chmod 700"), "{e}");
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
    assert!(check_private_dir(&d).is_ok());
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&d, &link).unwrap();
    assert!(matches!(check_private_dir(&link), Err(ControlError::UnsafeDir { .. })));
}

#[test]
fn default_dir_follows_xdg_runtime_dir() {
    assert_eq!(runtime_dir_from(Some("/run/user/1000".as_ref())), Path::new("/run/user/1000/amsvm"));
    let fallback = runtime_dir_from(None);
    assert!(fallback.to_str().unwrap().starts_with("/tmp/amsvm-"), "{}", fallback.display());
    assert_eq!(runtime_dir_from(Some("relative".as_ref())), fallback);
    assert_eq!(runtime_dir_from(Some("".as_ref())), fallback);
}

#[test]
fn destroy_and_resume_name_what_stands_in_the_way() {
    let f = fixture();
    // A registry built for display only offers neither.
    assert_eq!(f.registry.destroy("alpha").unwrap_err(), "cannot destroy partition \"alpha\": this instance does not offer it");
    assert!(f.registry.resume("zulu").unwrap_err().starts_with("no partition named \"zulu\""));
    // With a supervisor's handle: a partition that is not running (nothing started
    // yet) cannot be resumed; one that has ended cannot be destroyed.
    let ctl = Arc::new(crate::partition::PartitionControl::default());
    let mut registry = f.registry.clone();
    registry.partitions[0] = registry.partitions[0].clone().with_control(ctl);
    assert_eq!(registry.resume("alpha").unwrap_err(), "cannot resume partition \"alpha\": it is not running in a pool");
    registry.partitions[0].set_outcome("exited ok");
    assert_eq!(registry.destroy("alpha").unwrap_err(), "cannot destroy partition \"alpha\": it has ended (exited ok)");
}
