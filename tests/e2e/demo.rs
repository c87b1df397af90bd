//! `amsvm demo --headless`: the paging-server VM and four partitions at 2x overcommit.
//! While it runs, the test scrapes its Prometheus endpoint with a real parser, renders
//! the dashboard from the control socket's counters and checks the screen against
//! them, and changes a partition's weight and loan policy through the dashboard's keys.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::Stdio;
use std::time::{Duration, Instant};

use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use vmm::config::LoanPolicy;
use vmm::control::{request_stat, Snapshot};
use vmm::dashboard::{render_to_text, Dashboard, SocketSource};

use crate::common::*;

fn scrape(addr: &str) -> prometheus_parse::Scrape {
    let mut c = std::net::TcpStream::connect(addr).expect("connect to the metrics listener");
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(c, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut r = String::new();
    c.read_to_string(&mut r).unwrap();
    let (head, body) = r.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.contains(" 200 "), "{head}");
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("a valid exposition")
}

/// `metric{partition=...}` values by partition.
fn by_partition(s: &prometheus_parse::Scrape, metric: &str) -> HashMap<String, f64> {
    s.samples
        .iter()
        .filter(|x| x.metric == metric)
        .map(|x| {
            let v = match x.value {
                prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) => v,
                ref v => panic!("{metric}: not a counter or gauge: {v:?}"),
            };
            (x.labels.get("partition").expect("a partition label").to_string(), v)
        })
        .collect()
}

fn single(s: &prometheus_parse::Scrape, metric: &str) -> f64 {
    match s.samples.iter().find(|x| x.metric == metric).unwrap_or_else(|| panic!("no {metric}")).value {
        prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) => v,
        ref v => panic!("{metric}: {v:?}"),
    }
}

fn key(c: KeyCode) -> KeyEvent {
    KeyEvent::new(c, KeyModifiers::NONE)
}

/// The row of the rendered screen that starts with partition `name`'s cell.
fn screen_row<'a>(screen: &'a str, name: &str) -> &'a str {
    screen
        .lines()
        .find(|l| l.trim_start_matches(['│', '|', ' ', '>']).starts_with(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no row for {name} on screen:\n{screen}"))
}

#[test]
fn demo_runs_four_partitions_with_loaning_and_paging_and_is_watchable() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("demo.sock");
    let mut child = amsvm()
        .args(["demo", "--headless", "--seconds", "30", "--metrics", "127.0.0.1:0", "--socket"])
        .arg(&sock)
        .arg("--paging-dir")
        .arg(dir.path().join("paging"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // stderr names the metrics address; keep reading it so the child never blocks.
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let err_reader = std::thread::spawn(move || {
        let mut all = String::new();
        for l in stderr.lines().map_while(Result::ok) {
            if let Some(a) = l.split("http://").nth(1).and_then(|r| r.strip_suffix("/metrics")) {
                let _ = tx.send(a.to_string());
            }
            all += &l;
            all.push('\n');
        }
        all
    });
    let mut stdout = child.stdout.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        stdout.read_to_string(&mut s).unwrap();
        s
    });
    let addr = rx.recv_timeout(Duration::from_secs(60)).expect("the demo names its metrics address");

    // Wait until the partitions run and page.
    let t0 = Instant::now();
    let first: Snapshot = loop {
        assert!(t0.elapsed() < Duration::from_secs(60), "the demo did not start paging within 60 s");
        std::thread::sleep(Duration::from_millis(300));
        if let Ok(s) = request_stat(&sock) {
            if s.partitions.len() == 4 && s.partitions.iter().any(|p| p.page_outs > 0) {
                break s;
            }
        }
    };
    assert_eq!(first.paging_server.as_ref().map(|p| p.starts), Some(1), "the paging-server VM runs");
    let pool = first.pool.as_ref().expect("a pool");
    assert_eq!(pool.size_pages, 512 * 256, "4 x 256 MiB at 2x is a 512 MiB pool");

    // Prometheus: parsed by a real parser; counters move between two scrapes.
    let m1 = scrape(&addr);
    assert_eq!(single(&m1, "amsvm_pool_size_bytes"), (512u64 << 20) as f64);
    assert_eq!(single(&m1, "amsvm_paging_server_starts_total"), 1.0);
    assert!(m1.docs.contains_key("amsvm_partition_pages_verified_total"), "HELP lines");
    let v1 = by_partition(&m1, "amsvm_partition_pages_verified_total");
    assert_eq!(v1.len(), 4, "{v1:?}");

    // The dashboard, rendered from two control-socket snapshots: every partition's row
    // shows the snapshot's numbers.
    std::thread::sleep(Duration::from_secs(1));
    let a = request_stat(&sock).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let b = request_stat(&sock).unwrap();
    let mut d = Dashboard::default();
    d.update(a.clone());
    d.update(b.clone());
    let screen = render_to_text(&d, 160, 40);
    // Per second, rounded half up: delta * 1000 / milliseconds.
    let dt_ms = b.uptime_ms - a.uptime_ms;
    let per_s = |x: u64, y: u64| ((y - x) * 1000 + dt_ms / 2) / dt_ms;
    for (pa, pb) in a.partitions.iter().zip(&b.partitions) {
        let row = screen_row(&screen, &pb.name);
        let cells: Vec<&str> = row.split(['│', '|', ' ']).filter(|c| !c.is_empty()).collect();
        for want in [
            format!("{:.1}", pb.pmem_mib()),
            format!("{:.1}", pb.loan_mib()),
            format!("{:.1}", pb.loan_target_mib()),
            pb.weight.to_string(),
            pb.loan_policy.to_string(),
            per_s(pa.hpi, pb.hpi).to_string(),
            per_s(pa.pages_verified, pb.pages_verified).to_string(),
            per_s(pa.page_outs, pb.page_outs).to_string(),
        ] {
            assert!(cells.contains(&want.as_str()), "{}: {want} not on screen in row {row:?}\n{screen}", pb.name);
        }
    }
    let pool_b = b.pool.as_ref().unwrap();
    assert!(screen.contains(&format!("{:.1}", pool_b.free_mib())), "pool free {:.1} MiB not on screen:\n{screen}", pool_b.free_mib());

    // Keys change weight and loan policy live, through the control socket.
    let mut src = SocketSource(sock.clone());
    let mut d = Dashboard::default();
    d.update(request_stat(&sock).unwrap());
    assert!(d.on_key(key(KeyCode::Down), &mut src));
    assert!(d.on_key(key(KeyCode::Char('+')), &mut src));
    assert!(d.on_key(key(KeyCode::Char('l')), &mut src));
    let s = request_stat(&sock).unwrap();
    let p1 = s.partitions.iter().find(|p| p.name == "p1").unwrap();
    assert_eq!((p1.weight, p1.loan_policy), (128 + 16, LoanPolicy::Aggressive), "p1 after Down, '+', 'l'");
    assert!(!d.on_key(key(KeyCode::Char('q')), &mut src), "q quits");

    // amsvm top, attached over the socket, prints one line per interval.
    let top = amsvm().args(["top", "--headless", "--count", "2", "--interval", "0.5", "--socket"]).arg(&sock).output().unwrap();
    let top_out = String::from_utf8_lossy(&top.stdout);
    assert!(top.status.success(), "amsvm top: {}", String::from_utf8_lossy(&top.stderr));
    assert_eq!(top_out.lines().count(), 2, "{top_out}");
    for l in top_out.lines() {
        assert!(l.starts_with("t=") && ["p0", "p1", "p2", "p3"].iter().all(|p| l.contains(&format!("| {p} "))), "{l}");
        assert!(l.contains("p1 w 144 lp aggressive"), "top shows p1's new weight and policy: {l}");
    }

    let m2 = scrape(&addr);
    let v2 = by_partition(&m2, "amsvm_partition_pages_verified_total");
    assert!(v2.iter().all(|(p, v)| *v >= v1[p]), "counters never go down: {v1:?} -> {v2:?}");
    assert!(v2.iter().any(|(p, v)| *v > v1[p]), "verified pages move: {v1:?} -> {v2:?}");
    assert_eq!(by_partition(&m2, "amsvm_partition_weight")["p1"], 144.0);

    let status = child.wait().unwrap();
    let out = out_reader.join().unwrap();
    let err = err_reader.join().unwrap();
    assert!(status.success(), "demo failed: {status}\nstdout:\n{out}\nstderr:\n{err}");
    let lines = out.lines().filter(|l| l.starts_with("t=")).count();
    assert!(lines >= 20, "one headless line per second for 30 s, got {lines}:\n{out}");
    let rows = summary(&out);
    assert_eq!(rows.len(), 4, "{out}");
    for r in &rows {
        assert_eq!(r.failures, 0, "{r:?}");
        assert!(r.verified > 0, "{r:?}");
        assert_eq!(r.outcome, "exited ok", "{r:?}");
    }
    let (loaned, hpi, outs): (u64, u64, u64) =
        rows.iter().fold((0, 0, 0), |(l, h, o), r| (l + r.peak_loan, h + r.hpi, o + r.page_outs));
    assert!(loaned > 0 && hpi > 0 && outs > 0, "loaning and paging: peak loans {loaned}, hpi {hpi}, page-outs {outs}\n{out}");
    assert!(rows.iter().all(|r| r.hpi == 0 || r.hpit_ms > 0.0), "page-ins take time: {rows:?}");
}
