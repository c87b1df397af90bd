use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

use super::render::{bar, spark_text};
use super::*;
use crate::control::{RegisteredPartition, Registry};
use crate::devices::virtio::balloon::BalloonState;
use crate::metrics::{PartitionMetrics, PoolMetrics};

const PAGES_PER_MIB: u64 = 256;

/// A pool of 512 MiB with `alpha` (120 MiB resident, 40 MiB loaned, target 48) and
/// `beta` (180 MiB resident, aggressive, nothing loaned).
fn setup() -> (Registry, Arc<PartitionMetrics>, Arc<PartitionMetrics>) {
    let pool = Arc::new(PoolMetrics::default());
    pool.size_pages.store(512 * PAGES_PER_MIB, Relaxed);
    pool.resident.store(300 * PAGES_PER_MIB, Relaxed);
    let a = Arc::new(PartitionMetrics::default());
    a.pmem.store(120 * PAGES_PER_MIB, Relaxed);
    a.hpi.store(1000, Relaxed);
    a.hpit_ns.store(12_345_678, Relaxed);
    a.page_outs.store(500, Relaxed);
    a.pages_verified.store(10_000, Relaxed);
    a.tunables.set_loan_policy(LoanPolicy::Default);
    let b = Arc::new(BalloonState::default());
    b.loaned.store(40 * PAGES_PER_MIB, Relaxed);
    b.target.store(48 * PAGES_PER_MIB, Relaxed);
    *a.balloon.lock().unwrap() = Some(b);
    let bm = Arc::new(PartitionMetrics::default());
    bm.pmem.store(180 * PAGES_PER_MIB + 128, Relaxed); // 180.5 MiB
    bm.hpi.store(5000, Relaxed);
    bm.page_outs.store(7, Relaxed);
    bm.pages_verified.store(100, Relaxed);
    bm.verify_failures.store(3, Relaxed);
    bm.tunables.set_loan_policy(LoanPolicy::Aggressive);
    let reg = Registry::new(
        Some(pool),
        vec![
            RegisteredPartition::new("alpha", 256, 16, 128, a.clone()),
            RegisteredPartition::new("beta", 512, 32, 200, bm.clone()),
        ],
    );
    (reg, a, bm)
}

/// Two snapshots 2 s apart: alpha 2400 hpi, 1801 page-outs, 100000 verified more;
/// beta's hpi went backwards (a restart), 3 page-outs and 1 verified more.
fn two_snapshots() -> (Snapshot, Snapshot) {
    let (reg, a, b) = setup();
    let mut s1 = reg.snapshot();
    s1.uptime_ms = 10_000;
    a.hpi.fetch_add(2400, Relaxed);
    a.page_outs.fetch_add(1801, Relaxed);
    a.pages_verified.fetch_add(100_000, Relaxed);
    b.hpi.store(10, Relaxed);
    b.page_outs.fetch_add(3, Relaxed);
    b.pages_verified.fetch_add(1, Relaxed);
    let mut s2 = reg.snapshot();
    s2.uptime_ms = 12_000;
    (s1, s2)
}

/// The table row of `name` in the rendered text, split in words.
fn row<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
    text.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|w| w.first() == Some(&name))
        .unwrap_or_else(|| panic!("no row for {name} in\n{text}"))
}

#[test]
fn rates_come_from_counter_deltas_and_uptime() {
    assert_eq!(rate_per_s(1000, 3400, 2000), 1200);
    assert_eq!(rate_per_s(0, 1801, 2000), 901, "900.5 rounds up");
    assert_eq!(rate_per_s(0, 1799, 2000), 900, "899.5 rounds up");
    assert_eq!(rate_per_s(5000, 10, 2000), 0, "a counter going backwards is no progress");
    assert_eq!(rate_per_s(0, 10, 0), 0);
    assert_eq!(rate_per_s(0, u64::MAX, 1), u64::MAX, "saturates");

    let (s1, s2) = two_snapshots();
    let mut d = Dashboard::new();
    d.update(s1.clone());
    assert_eq!(d.rates("alpha"), None, "the first snapshot gives no rate");
    d.update(s2.clone());
    assert_eq!(d.rates("alpha"), Some(Rates { hpi: 1200, page_outs: 901, verified: 50_000 }));
    assert_eq!(d.rates("beta"), Some(Rates { hpi: 0, page_outs: 2, verified: 1 }));
    // A snapshot with the same uptime (or an earlier one) adds no sample.
    d.update(s2.clone());
    assert_eq!(d.history("alpha").len(), 1);
    // Another instance (pid) starts over.
    let mut other = s2.clone();
    other.pid ^= 1;
    other.uptime_ms += 1000;
    d.update(other);
    assert_eq!(d.rates("alpha"), None);
    // History is bounded.
    let mut d = Dashboard::new();
    for i in 0..(HISTORY_LEN as u64 + 10) {
        let mut s = s1.clone();
        s.uptime_ms = 1000 * (i + 1);
        d.update(s);
    }
    assert_eq!(d.history("beta").len(), HISTORY_LEN);
}

#[test]
fn screen_shows_each_partitions_figures_and_rates() {
    let (s1, s2) = two_snapshots();
    let mut d = Dashboard::new();
    d.update(s1);
    let text = render_to_text(&d, 160, 40);
    assert_eq!(row(&text, "alpha")[7..11], ["-", "12.3", "-", "-"], "no rates before two snapshots:\n{text}");

    d.update(s2);
    let text = render_to_text(&d, 160, 40);
    let header = text.lines().find(|l| l.split_whitespace().next() == Some("name")).expect(&text);
    assert_eq!(
        header.split_whitespace().collect::<Vec<_>>(),
        [
            "name",
            "state",
            "weight",
            "policy",
            "pmem",
            "loan",
            "loan-tgt",
            "hpi/s",
            "hpit-ms",
            "po/s",
            "vpg/s",
            "fail",
            "vpg/s-history"
        ]
    );
    let a = row(&text, "alpha");
    assert_eq!(
        a[..12],
        ["alpha", "running", "128", "default", "120.0", "40.0", "48.0", "1200", "12.3", "901", "50000", "0"],
        "{text}"
    );
    assert_eq!(a[12], "█", "one history sample, the largest");
    let b = row(&text, "beta");
    assert_eq!(b[..12], ["beta", "running", "200", "aggressive", "180.5", "0.0", "0.0", "0", "0.0", "2", "1", "3"], "{text}");
    // Header, pool and footer.
    assert!(text.lines().next().unwrap().starts_with(&format!("amsvm pid {}, up 12.0 s", std::process::id())), "{text}");
    assert!(text.contains("pool 512.0 MiB: in use 300.0, free 212.0"), "{text}");
    assert!(text.contains("alpha 120.0") && text.contains("beta 180.5") && text.contains("free 212.0"), "{text}");
    assert!(text.contains("loaned 40.0 (given back, not resident)"), "{text}");
    assert!(text.contains("of 768.0 logical"), "{text}");
    assert!(text.contains("l loan policy  q quit"), "{text}");
    // The selected partition's panel.
    assert!(text.contains("alpha: running"), "{text}");
    assert!(text.contains("hpi/s now 1200, max 1200"), "{text}");

    // Small screens and no snapshot do not panic.
    for (w, h) in [(20, 5), (80, 10), (1, 1)] {
        render_to_text(&d, w, h);
    }
    assert!(render_to_text(&Dashboard::new(), 80, 10).contains("waiting for the first snapshot"));
    let mut none = Dashboard::new();
    none.update(Registry::new(None, vec![]).snapshot());
    assert!(render_to_text(&none, 80, 10).contains("pool: none"));
}

/// A source that records the changes asked for, and fails them when told to.
#[derive(Default)]
struct Fake {
    calls: Vec<(String, Option<u8>, Option<LoanPolicy>)>,
    fail: bool,
    snapshots: Vec<Snapshot>,
}

impl Source for Fake {
    fn snapshot(&mut self) -> Result<Snapshot, String> {
        if self.snapshots.is_empty() {
            Err("the instance is gone".into())
        } else {
            Ok(self.snapshots.remove(0))
        }
    }

    fn set(&mut self, partition: &str, weight: Option<u8>, loan_policy: Option<LoanPolicy>) -> Result<(), String> {
        self.calls.push((partition.to_string(), weight, loan_policy));
        if self.fail {
            Err(format!("no partition named {partition:?}"))
        } else {
            Ok(())
        }
    }
}

fn key(c: KeyCode) -> KeyEvent {
    KeyEvent::new(c, KeyModifiers::NONE)
}

#[test]
fn keys_select_and_change_weight_and_loan_policy() {
    let (_, s2) = two_snapshots();
    let mut d = Dashboard::new();
    let mut src = Fake::default();
    d.update(s2.clone());
    assert_eq!(d.selected_name(), Some("alpha"));
    assert!(d.on_key(key(KeyCode::Up), &mut src));
    assert_eq!(d.selected_name(), Some("alpha"), "stays on the first");
    assert!(d.on_key(key(KeyCode::Char('+')), &mut src));
    assert_eq!(src.calls.pop(), Some(("alpha".into(), Some(144), None)));
    assert_eq!(d.status(), "alpha: weight 144");
    assert!(d.on_key(key(KeyCode::Down), &mut src));
    assert!(d.on_key(key(KeyCode::Char('j')), &mut src));
    assert_eq!(d.selected_name(), Some("beta"), "stays on the last");
    d.on_key(key(KeyCode::Char('+')), &mut src);
    d.on_key(key(KeyCode::Char('+')), &mut src);
    assert_eq!(src.calls, [("beta".into(), Some(216), None), ("beta".into(), Some(232), None)], "each press builds on the last");
    d.on_key(key(KeyCode::Char('-')), &mut src);
    assert_eq!(src.calls.pop(), Some(("beta".into(), Some(216), None)));
    assert_eq!(row(&render_to_text(&d, 160, 40), "beta")[2], "216", "shown before the next snapshot");
    // beta is aggressive: l cycles to off, then default.
    src.calls.clear();
    d.on_key(key(KeyCode::Char('l')), &mut src);
    d.on_key(key(KeyCode::Char('l')), &mut src);
    d.on_key(key(KeyCode::Char('l')), &mut src);
    assert_eq!(
        src.calls,
        [
            ("beta".into(), None, Some(LoanPolicy::Off)),
            ("beta".into(), None, Some(LoanPolicy::Default)),
            ("beta".into(), None, Some(LoanPolicy::Aggressive))
        ]
    );
    assert_eq!(d.status(), "beta: loan policy aggressive");
    // Clamped at 255 and 0.
    src.calls.clear();
    for _ in 0..10 {
        d.on_key(key(KeyCode::Char('+')), &mut src);
    }
    assert_eq!(src.calls.last(), Some(&("beta".into(), Some(255), None)));
    assert_eq!(src.calls.len(), 3, "232, 248, 255, then nothing to change");
    assert_eq!(d.status(), "beta: weight already 255 (0..=255)");
    d.on_key(key(KeyCode::Char('k')), &mut src);
    for _ in 0..20 {
        d.on_key(key(KeyCode::Char('-')), &mut src);
    }
    assert_eq!(src.calls.last(), Some(&("alpha".into(), Some(0), None)));
    // Errors go to the status line, and the weight shown does not change.
    src.fail = true;
    assert!(d.on_key(key(KeyCode::Char('+')), &mut src));
    assert!(d.status().contains("alpha: cannot set weight 16: no partition named"), "{}", d.status());
    assert_eq!(d.snapshot().unwrap().partitions[0].weight, 0);
    // The selection follows its partition by name.
    d.on_key(key(KeyCode::Down), &mut src);
    let mut s = s2.clone();
    s.partitions.reverse();
    d.update(s);
    assert_eq!(d.selected_name(), Some("beta"));
    // Quit.
    assert!(!d.on_key(key(KeyCode::Char('q')), &mut src));
    assert!(!d.on_key(key(KeyCode::Esc), &mut src));
    assert!(!d.on_key(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL), &mut src));
    assert!(d.on_key(key(KeyCode::Char('c')), &mut src), "plain c does nothing");
    // Without partitions, nothing to change.
    let mut d = Dashboard::new();
    assert!(d.on_key(key(KeyCode::Char('+')), &mut src));
    assert_eq!(d.status(), "no partition to change");
}

#[test]
fn headless_line_has_the_figures_on_one_line() {
    let (s1, s2) = two_snapshots();
    let mut d = Dashboard::new();
    assert_eq!(d.headless_line(), "t=? no snapshot yet");
    d.update(s1);
    let line = d.headless_line();
    assert!(line.contains("| alpha w 128 lp default pmem 120.0 loan 40.0 hpi/s - po/s - vpg/s - fail 0 |"), "{line}");
    d.update(s2);
    let line = d.headless_line();
    assert_eq!(
        line,
        "t=12.0s pool 300.0/512.0 MiB free 212.0 \
         | alpha w 128 lp default pmem 120.0 loan 40.0 hpi/s 1200 po/s 901 vpg/s 50000 fail 0 \
         | beta w 200 lp aggressive pmem 180.5 loan 0.0 hpi/s 0 po/s 2 vpg/s 1 fail 3"
    );
}

#[test]
fn headless_loop_prints_lines_and_ends() {
    let (reg, a, _) = setup();
    let stop = AtomicBool::new(false);
    let mut out = Vec::new();
    let mut src = reg.clone();
    a.hpi.fetch_add(1, Relaxed);
    run_headless_count(&mut src, Duration::from_millis(10), None, &stop, Some(3), &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    assert_eq!(text.lines().count(), 3, "{text}");
    assert!(text.lines().all(|l| l.starts_with("t=") && l.contains("| alpha w 128") && !l.contains("hpi/s -")), "{text}");

    // A failing source ends it with its error, unless stopping.
    let mut fake = Fake::default();
    assert_eq!(
        run_headless(&mut fake, Duration::from_millis(10), None, &stop, &mut Vec::new()),
        Err("the instance is gone".into())
    );
    let (s1, s2) = two_snapshots();
    fake.snapshots = vec![s1, s2];
    let mut out = Vec::new();
    assert!(run_headless(&mut fake, Duration::from_millis(10), None, &stop, &mut out).is_err());
    assert_eq!(String::from_utf8(out).unwrap().lines().count(), 1, "one line from two snapshots");
    stop.store(true, Relaxed);
    assert_eq!(run_headless(&mut fake, Duration::from_millis(10), None, &stop, &mut Vec::new()), Ok(()));
    // `until` ends it.
    let stop = AtomicBool::new(false);
    let t = std::time::Instant::now();
    let until = Some(t + Duration::from_millis(100));
    run_headless(&mut reg.clone(), Duration::from_secs(10), until, &stop, &mut Vec::new()).unwrap();
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[test]
fn registry_and_socket_sources_read_and_change() {
    let (reg, _, _) = setup();
    let mut src = reg.clone();
    Source::set(&mut src, "beta", Some(7), Some(LoanPolicy::Off)).unwrap();
    let s = Source::snapshot(&mut src).unwrap();
    assert_eq!((s.partitions[1].weight, s.partitions[1].loan_policy), (7, LoanPolicy::Off));
    assert!(Source::set(&mut src, "gamma", Some(7), None).is_err());

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.sock");
    let mut sock = SocketSource(path.clone());
    assert!(sock.snapshot().is_err(), "no server yet");
    let _server = crate::control::Server::start(&path, reg).unwrap();
    sock.set("alpha", Some(99), Some(LoanPolicy::Aggressive)).unwrap();
    let s = sock.snapshot().unwrap();
    assert_eq!((s.partitions[0].weight, s.partitions[0].loan_policy), (99, LoanPolicy::Aggressive));
    assert!(sock.set("gamma", Some(1), None).unwrap_err().contains("gamma"));
}

#[test]
fn bars_fill_their_width_in_proportion() {
    let st = ratatui::style::Style::new();
    let widths = |segs: &[(u64, &'static str)], w| -> Vec<usize> {
        let segs: Vec<_> = segs.iter().map(|&(v, c)| (v, st, c)).collect();
        bar(&segs, w).iter().map(|s| s.content.chars().count()).collect()
    };
    assert_eq!(widths(&[(1, "a"), (1, "b"), (2, "c")], 40), [10, 10, 20]);
    assert_eq!(widths(&[(1, "a"), (1, "b"), (1, "c")], 10).iter().sum::<usize>(), 10);
    assert_eq!(widths(&[(0, "a"), (5, "b")], 7), [7], "empty segments are left out");
    assert_eq!(widths(&[(0, "a")], 4), [4], "nothing: a blank bar");
    assert_eq!(spark_text(&[0, 1, 50, 100]), "▁▂▅█");
    assert_eq!(spark_text(&[]), "");
}
