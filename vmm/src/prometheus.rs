//! Prometheus metrics: the control socket's counters in the Prometheus text exposition
//! format (version 0.0.4), served over HTTP at `/metrics` by `--metrics ADDR`.
//!
//! Every family has HELP and TYPE lines. Counters end in `_total` and only grow while
//! the instance runs; gauges are values now. Partition families carry a `partition`
//! label. Sizes are in bytes and times in seconds, as Prometheus names them.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::control::Snapshot;

/// Content type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A label value with `\`, `"` and newlines escaped as the format requires.
fn escape(v: &str) -> String {
    let mut o = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => o.push_str("\\\\"),
            '"' => o.push_str("\\\""),
            '\n' => o.push_str("\\n"),
            c => o.push(c),
        }
    }
    o
}

/// Writes families: each `family` call writes HELP and TYPE, then its samples.
struct Writer {
    out: String,
}

impl Writer {
    fn family(&mut self, name: &str, kind: &str, help: &str, samples: impl IntoIterator<Item = (Vec<(&'static str, String)>, f64)>) {
        let samples: Vec<_> = samples.into_iter().collect();
        if samples.is_empty() {
            return;
        }
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
        for (labels, v) in samples {
            self.out.push_str(name);
            if !labels.is_empty() {
                let l: Vec<_> = labels.iter().map(|(k, v)| format!("{k}=\"{}\"", escape(v))).collect();
                let _ = write!(self.out, "{{{}}}", l.join(","));
            }
            let _ = writeln!(self.out, " {v}");
        }
    }

    fn one(&mut self, name: &str, kind: &str, help: &str, v: f64) {
        self.family(name, kind, help, [(vec![], v)]);
    }
}

/// The snapshot in the text exposition format.
pub fn exposition(s: &Snapshot) -> String {
    let mut w = Writer { out: String::new() };
    w.one("amsvm_uptime_seconds", "gauge", "Seconds since this amsvm started.", s.uptime_ms as f64 / 1e3);
    w.one("amsvm_control_requests_total", "counter", "Control-socket requests answered.", s.control_requests as f64);
    w.one("amsvm_control_rejected_total", "counter", "Malformed control-socket requests rejected.", s.control_rejected as f64);
    if let Some(p) = &s.pool {
        let b = |pages: u64| (pages * p.page_size) as f64;
        w.one("amsvm_pool_size_bytes", "gauge", "Size of the shared memory pool.", b(p.size_pages));
        w.one("amsvm_pool_in_use_bytes", "gauge", "Pool frames resident for partitions.", b(p.in_use_pages));
        w.one("amsvm_pool_free_bytes", "gauge", "Pool frames free.", b(p.free_pages));
        w.one("amsvm_pool_peak_in_use_bytes", "gauge", "Most pool frames ever resident at once.", b(p.peak_in_use_pages));
        w.one("amsvm_pool_faults_total", "counter", "Guest page faults the pool served.", p.faults as f64);
        w.one("amsvm_pool_reclaims_total", "counter", "Reclaim rounds (page-outs to make room).", p.reclaims as f64);
        w.one("amsvm_pool_frame_waits_total", "counter", "Waits for a frame nobody could free yet.", p.frame_waits as f64);
    }
    if let Some(ps) = &s.paging_server {
        w.one("amsvm_paging_server_starts_total", "counter", "Times the paging-server VM was started.", ps.starts as f64);
        w.one("amsvm_paging_server_requests_total", "counter", "VASI requests submitted.", ps.requests as f64);
        w.one("amsvm_paging_server_completions_total", "counter", "VASI requests completed.", ps.completions as f64);
        w.one("amsvm_paging_server_resubmitted_total", "counter", "VASI requests submitted again after a restart.", ps.resubmitted as f64);
        w.one("amsvm_paging_server_io_errors_total", "counter", "VASI requests failed on a paging device.", ps.io_errors as f64);
        w.one("amsvm_paging_server_rejected_total", "counter", "VASI completions amsvm rejected.", ps.rejected as f64);
    }
    let parts = &s.partitions;
    let page = crate::control::PAGE_SIZE;
    let per = |f: &dyn Fn(&crate::control::PartitionSnapshot) -> f64| {
        parts.iter().map(|p| (vec![("partition", p.name.clone())], f(p))).collect::<Vec<_>>()
    };
    w.family(
        "amsvm_partition_info",
        "gauge",
        "Always 1; labels give the partition's state and loan policy.",
        parts.iter().map(|p| {
            (vec![("partition", p.name.clone()), ("state", p.state.to_string()), ("loan_policy", p.loan_policy.to_string())], 1.0)
        }),
    );
    w.family("amsvm_partition_logical_bytes", "gauge", "Logical memory (guest RAM size).", per(&|p| (p.logical_mib << 20) as f64));
    w.family("amsvm_partition_min_bytes", "gauge", "Memory never reclaimed below.", per(&|p| (p.min_mib << 20) as f64));
    w.family("amsvm_partition_weight", "gauge", "Weight 0-255: higher keeps memory longer.", per(&|p| p.weight as f64));
    w.family("amsvm_partition_pmem_bytes", "gauge", "Memory resident in the pool (AMS pmem).", per(&|p| (p.pmem_pages * page) as f64));
    w.family("amsvm_partition_loan_bytes", "gauge", "Memory loaned through the balloon (AMS loan).", per(&|p| (p.loan_pages * page) as f64));
    w.family("amsvm_partition_loan_target_bytes", "gauge", "The balloon's target.", per(&|p| (p.loan_target_pages * page) as f64));
    w.family("amsvm_partition_pager_bytes", "gauge", "Bytes the paging device holds.", per(&|p| p.pager_bytes as f64));
    w.family("amsvm_partition_hpi_total", "counter", "Hypervisor page-ins.", per(&|p| p.hpi as f64));
    w.family("amsvm_partition_hpit_seconds_total", "counter", "Time vCPUs were blocked on page-ins.", per(&|p| p.hpit_ms / 1e3));
    w.family("amsvm_partition_zero_fills_total", "counter", "First touches given zero-filled frames.", per(&|p| p.zero_fills as f64));
    w.family("amsvm_partition_page_outs_total", "counter", "Pages paged out.", per(&|p| p.page_outs as f64));
    w.family("amsvm_partition_page_out_writes_total", "counter", "Page-outs written to the paging device.", per(&|p| p.page_out_writes as f64));
    w.family("amsvm_partition_cluster_reads_total", "counter", "Pages read back with a faulting neighbour.", per(&|p| p.cluster_reads as f64));
    w.family("amsvm_partition_pages_touched_total", "counter", "Workload page accesses (guest-reported).", per(&|p| p.pages_touched as f64));
    w.family("amsvm_partition_pages_verified_total", "counter", "Pages the workload read and verified (guest-reported).", per(&|p| p.pages_verified as f64));
    w.family("amsvm_partition_pages_written_total", "counter", "Pages the workload wrote (guest-reported).", per(&|p| p.pages_written as f64));
    w.family("amsvm_partition_verify_failures_total", "counter", "Pages that failed verification (guest-reported).", per(&|p| p.verify_failures as f64));
    w.family("amsvm_partition_exits_total", "counter", "vCPU exits to amsvm.", per(&|p| p.exits as f64));
    w.family("amsvm_partition_resets_total", "counter", "Resets (reboots).", per(&|p| p.resets as f64));
    w.family("amsvm_partition_rejected_total", "counter", "Malformed guest requests rejected.", per(&|p| p.rejected as f64));
    w.family(
        "amsvm_partition_cpu_yields_total",
        "counter",
        "Times it started yielding its vCPUs' CPU because it was thrashing (pool policy protect).",
        per(&|p| p.cpu_yields as f64),
    );
    w.family(
        "amsvm_partition_huge_collapses_total",
        "counter",
        "2 MiB ranges of resident memory collapsed into huge pages (pool, huge_pages).",
        per(&|p| p.huge_collapses as f64),
    );
    w.family(
        "amsvm_partition_huge_fills_total",
        "counter",
        "First touches served with a whole 2 MiB huge page (pool, huge_pages).",
        per(&|p| p.huge_fills as f64),
    );
    w.family("amsvm_partition_yielding", "gauge", "1 while its vCPUs yield their CPU (thrashing).", per(&|p| f64::from(u8::from(p.yielding))));
    let balloons: Vec<_> = parts.iter().filter_map(|p| p.balloon.as_ref().map(|b| (p.name.clone(), b))).collect();
    let per_balloon = |f: &dyn Fn(&crate::control::BalloonSnapshot) -> u64| {
        balloons.iter().map(|(n, b)| (vec![("partition", n.clone())], f(b) as f64)).collect::<Vec<_>>()
    };
    w.family("amsvm_balloon_inflated_pages_total", "counter", "Pages the balloon driver inflated.", per_balloon(&|b| b.inflated));
    w.family("amsvm_balloon_deflated_pages_total", "counter", "Pages the balloon driver deflated.", per_balloon(&|b| b.deflated));
    w.family("amsvm_balloon_reported_pages_total", "counter", "Pages the guest reported free.", per_balloon(&|b| b.reported));
    w.family("amsvm_balloon_frames_freed_total", "counter", "Pool frames freed by the balloon.", per_balloon(&|b| b.frames_freed));
    w.out
}

/// A bound listening socket, not serving yet: bind before anything else starts, so
/// that a bad address fails before any VM exists.
pub struct MetricsListener {
    listener: std::net::TcpListener,
    addr: SocketAddr,
}

impl MetricsListener {
    pub fn bind(addr: &str) -> Result<MetricsListener, String> {
        let listener = std::net::TcpListener::bind(addr).map_err(|e| format!("metrics listener on {addr}: {e}"))?;
        let local = listener.local_addr().map_err(|e| format!("metrics listener on {addr}: {e}"))?;
        Ok(MetricsListener { listener, addr: local })
    }

    /// Answer `GET /metrics` with `exposition(snapshot())` until the server is dropped.
    pub fn serve(self, snapshot: impl Fn() -> Snapshot + Send + 'static) -> Result<MetricsServer, String> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let listener = self.listener;
        let thread = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                // The filter comes first: tiny_http's accepting thread and the threads it
                // starts for connections, which read the requests, inherit it.
                crate::seccomp::apply(crate::seccomp::Kind::Control);
                let h = match tiny_http::Server::from_listener(listener, None) {
                    Ok(h) => Arc::new(h),
                    Err(e) => {
                        let _ = tx.send(Err(format!("metrics listener: {e}")));
                        return;
                    }
                };
                let _ = tx.send(Ok(h.clone()));
                for req in h.incoming_requests() {
                    let path = req.url().split('?').next().unwrap_or("");
                    let resp = if *req.method() != tiny_http::Method::Get {
                        tiny_http::Response::from_string("only GET\n").with_status_code(405)
                    } else if path == "/metrics" {
                        let header = tiny_http::Header::from_bytes(&b"Content-Type"[..], CONTENT_TYPE.as_bytes())
                            .expect("a valid header");
                        tiny_http::Response::from_string(exposition(&snapshot())).with_header(header)
                    } else {
                        tiny_http::Response::from_string("amsvm: metrics are at /metrics\n").with_status_code(404)
                    };
                    let _ = req.respond(resp);
                }
            })
            .map_err(|e| format!("metrics listener: spawning its thread: {e}"))?;
        // The server is dropped last by `MetricsServer` on the caller's thread (its drop
        // connects to the listener to wake the accepting thread: not a filtered call).
        let http = match rx.recv() {
            Ok(r) => r?,
            Err(_) => return Err("metrics listener: its thread ended before serving".into()),
        };
        Ok(MetricsServer { http, addr: self.addr, thread: Some(thread) })
    }
}

/// The HTTP listener, serving. It stops when dropped.
pub struct MetricsServer {
    http: Arc<tiny_http::Server>,
    addr: SocketAddr,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MetricsServer {
    /// Listen on `addr` and answer `GET /metrics` with `exposition(snapshot())`.
    pub fn start(addr: &str, snapshot: impl Fn() -> Snapshot + Send + 'static) -> Result<MetricsServer, String> {
        MetricsListener::bind(addr)?.serve(snapshot)
    }

    /// The address it listens on (with the port the kernel chose for port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.http.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{RegisteredPartition, Registry};
    use crate::metrics::{PartitionMetrics, PoolMetrics};
    use std::io::{Read, Write};
    use std::sync::atomic::Ordering::Relaxed;

    fn scrape(addr: SocketAddr, path: &str) -> (String, String) {
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        write!(c, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
        let mut r = String::new();
        c.read_to_string(&mut r).unwrap();
        let (head, body) = r.split_once("\r\n\r\n").unwrap();
        (head.to_string(), body.to_string())
    }

    #[test]
    fn served_counters_parse_and_move() {
        let pool = Arc::new(PoolMetrics::default());
        pool.size_pages.store(1000, Relaxed);
        let m = Arc::new(PartitionMetrics::default());
        m.hpi.store(5, Relaxed);
        m.pmem.store(256, Relaxed);
        let reg = Registry::new(Some(pool), vec![RegisteredPartition::new("p0", 64, 0, 7, m.clone())]);
        let r = reg.clone();
        let server = MetricsServer::start("127.0.0.1:0", move || r.snapshot()).unwrap();
        let (head, body) = scrape(server.addr(), "/metrics");
        assert!(head.starts_with("HTTP/1.") && head.contains(" 200 "), "{head}");
        assert!(head.to_ascii_lowercase().contains("text/plain; version=0.0.4"), "{head}");
        let lines = body.lines().map(|l| Ok(l.to_string()));
        let parsed = prometheus_parse::Scrape::parse(lines).unwrap();
        let value = |scrape: &prometheus_parse::Scrape, name: &str| {
            let s = scrape.samples.iter().find(|s| s.metric == name).unwrap_or_else(|| panic!("{name} missing"));
            assert_eq!(s.labels.get("partition"), Some("p0"));
            match s.value {
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) => v,
                ref v => panic!("{name}: {v:?}"),
            }
        };
        assert_eq!(value(&parsed, "amsvm_partition_hpi_total"), 5.0);
        assert_eq!(value(&parsed, "amsvm_partition_pmem_bytes"), 1048576.0);
        assert_eq!(value(&parsed, "amsvm_partition_weight"), 7.0);
        assert_eq!(value(&parsed, "amsvm_partition_yielding"), 0.0);
        assert!(parsed.docs.contains_key("amsvm_partition_hpi_total"), "HELP lines are read");
        m.hpi.store(9, Relaxed);
        m.cpu_yields.store(3, Relaxed);
        m.yielding.store(true, Relaxed);
        let (_, body) = scrape(server.addr(), "/metrics");
        let parsed = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap();
        assert_eq!(value(&parsed, "amsvm_partition_hpi_total"), 9.0);
        assert_eq!(value(&parsed, "amsvm_partition_cpu_yields_total"), 3.0);
        assert_eq!(value(&parsed, "amsvm_partition_yielding"), 1.0);
        let (head, _) = scrape(server.addr(), "/other");
        assert!(head.contains(" 404 "), "{head}");
        // Label values are escaped.
        let odd = Registry::new(None, vec![RegisteredPartition::new("a\"b\\c\nd", 64, 0, 7, Arc::default())]);
        let text = exposition(&odd.snapshot());
        assert!(text.contains(r#"amsvm_partition_hpi_total{partition="a\"b\\c\nd"} 0"#), "{text}");
        // Every family has HELP and TYPE, and no sample is left without them.
        for l in body.lines().filter(|l| !l.starts_with('#')) {
            let name = l.split(['{', ' ']).next().unwrap();
            assert!(body.contains(&format!("# TYPE {name} ")), "{name} has no TYPE");
            assert!(body.contains(&format!("# HELP {name} ")), "{name} has no HELP");
        }
    }
}
