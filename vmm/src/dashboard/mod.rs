//! A live view of a running amsvm: the pool and every partition, refreshed every
//! interval, with keys to change a partition's weight and loan policy. Used by
//! `amsvm top` (over the control socket, [`SocketSource`]) and `amsvm demo` (in-process,
//! a [`Registry`]); [`run_headless`] prints one line per interval instead.
//!
//! Numbers on the screen and in [`Dashboard::headless_line`] are formatted simply, so a
//! test can compare them with a [`Snapshot`]:
//! - MiB with one decimal (`{:.1}` of [`PartitionSnapshot::pmem_mib`] and friends);
//! - rates as integers per second: `delta * 1000 / dt_ms` rounded to the nearest
//!   (halves up), where `delta` is a counter's increase between two consecutive
//!   snapshots (0 when it went backwards, e.g. after a restart) and `dt_ms` the increase
//!   of `uptime_ms` ([`rate_per_s`]); `-` before there are two snapshots;
//! - `hpit` in ms with one decimal (cumulative), weights and failures as integers.

mod render;
mod run;

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::time::Duration;

use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};

use crate::config::LoanPolicy;
use crate::control::{PartitionSnapshot, Registry, Snapshot};

pub use render::render_to_text;
pub use run::{run_headless, run_headless_count, run_tui};

/// Samples of rates kept per partition (the sparklines' length).
pub const HISTORY_LEN: usize = 60;

/// The step by which `+` and `-` change a weight.
pub const WEIGHT_STEP: u8 = 16;

/// How long [`SocketSource`] waits for a snapshot (the screen does not refresh meanwhile).
pub const SOCKET_TIMEOUT: Duration = Duration::from_secs(2);

/// Where the dashboard gets its numbers and sends its changes.
pub trait Source {
    /// The counters now.
    fn snapshot(&mut self) -> Result<Snapshot, String>;
    /// Change a partition's weight and/or loan policy.
    fn set(&mut self, partition: &str, weight: Option<u8>, loan_policy: Option<LoanPolicy>) -> Result<(), String>;
}

/// In-process: the registry of the amsvm this is (`amsvm demo`).
impl Source for Registry {
    fn snapshot(&mut self) -> Result<Snapshot, String> {
        Ok(Registry::snapshot(self))
    }

    fn set(&mut self, partition: &str, weight: Option<u8>, loan_policy: Option<LoanPolicy>) -> Result<(), String> {
        Registry::set(self, partition, weight, loan_policy)
    }
}

/// Another amsvm, over its control socket (`amsvm top`).
#[derive(Debug, Clone)]
pub struct SocketSource(pub PathBuf);

impl Source for SocketSource {
    fn snapshot(&mut self) -> Result<Snapshot, String> {
        crate::control::request_stat_timeout(&self.0, SOCKET_TIMEOUT).map_err(|e| e.to_string())
    }

    fn set(&mut self, partition: &str, weight: Option<u8>, loan_policy: Option<LoanPolicy>) -> Result<(), String> {
        crate::control::request_set(&self.0, partition, weight, loan_policy).map_err(|e| e.to_string())
    }
}

/// A partition's rates over one interval, per second (see [`rate_per_s`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rates {
    /// Hypervisor page-ins.
    pub hpi: u64,
    /// Pages paged out.
    pub page_outs: u64,
    /// Pages the workload verified.
    pub verified: u64,
}

/// `delta * 1000 / dt_ms` rounded to the nearest integer (halves up), where `delta` is
/// `cur - prev`, or 0 when the counter went backwards (the partition restarted).
pub fn rate_per_s(prev: u64, cur: u64, dt_ms: u64) -> u64 {
    if dt_ms == 0 {
        return 0;
    }
    let delta = cur.saturating_sub(prev) as u128;
    let dt = dt_ms as u128;
    u64::try_from((delta * 1000 + dt / 2) / dt).unwrap_or(u64::MAX)
}

impl Rates {
    /// The rates from `prev` to `cur`, `dt_ms` apart.
    pub fn between(prev: &PartitionSnapshot, cur: &PartitionSnapshot, dt_ms: u64) -> Rates {
        Rates {
            hpi: rate_per_s(prev.hpi, cur.hpi, dt_ms),
            page_outs: rate_per_s(prev.page_outs, cur.page_outs, dt_ms),
            verified: rate_per_s(prev.pages_verified, cur.pages_verified, dt_ms),
        }
    }
}

/// The status line's message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Status {
    text: String,
    error: bool,
}

/// The dashboard's state: the latest snapshot, rate histories, the selection and the
/// status line. Feed it with [`update`](Self::update), draw it with
/// [`render`](Self::render), give it keys with [`on_key`](Self::on_key).
#[derive(Debug, Default)]
pub struct Dashboard {
    snap: Option<Snapshot>,
    /// Per partition name: the rates of the last [`HISTORY_LEN`] intervals, oldest first.
    history: HashMap<String, VecDeque<Rates>>,
    selected: usize,
    status: Status,
}

impl Dashboard {
    pub fn new() -> Self {
        Self::default()
    }

    /// Take a new snapshot: rates from the counters' increase since the previous one
    /// (a partition seen for the first time, or another instance, starts without).
    pub fn update(&mut self, s: Snapshot) {
        let selected_name = self.selected_name().map(str::to_string);
        let prev = self.snap.take();
        // Another process (pid) or a clock that did not move: no rates this time.
        let dt_ms =
            prev.as_ref().filter(|p| p.pid == s.pid).and_then(|p| s.uptime_ms.checked_sub(p.uptime_ms)).filter(|&dt| dt > 0);
        if prev.as_ref().is_some_and(|p| p.pid != s.pid) {
            self.history.clear();
        }
        self.history.retain(|name, _| s.partitions.iter().any(|p| &p.name == name));
        for p in &s.partitions {
            let before = prev.as_ref().and_then(|prev| prev.partitions.iter().find(|q| q.name == p.name));
            if let (Some(before), Some(dt)) = (before, dt_ms) {
                let h = self.history.entry(p.name.clone()).or_default();
                if h.len() == HISTORY_LEN {
                    h.pop_front();
                }
                h.push_back(Rates::between(before, p, dt));
            }
        }
        // The selection follows its partition by name when the list changes.
        self.selected = selected_name
            .and_then(|n| s.partitions.iter().position(|p| p.name == n))
            .unwrap_or(self.selected)
            .min(s.partitions.len().saturating_sub(1));
        self.snap = Some(s);
    }

    /// The latest snapshot.
    pub fn snapshot(&self) -> Option<&Snapshot> {
        self.snap.as_ref()
    }

    /// A partition's rates over the last interval (`None` before two snapshots).
    pub fn rates(&self, partition: &str) -> Option<Rates> {
        self.history.get(partition).and_then(|h| h.back().copied())
    }

    /// A partition's rates over the last [`HISTORY_LEN`] intervals, oldest first.
    pub fn history(&self, partition: &str) -> Vec<Rates> {
        self.history.get(partition).map(|h| h.iter().copied().collect()).unwrap_or_default()
    }

    /// The selected partition's name.
    pub fn selected_name(&self) -> Option<&str> {
        self.snap.as_ref().and_then(|s| s.partitions.get(self.selected)).map(|p| p.name.as_str())
    }

    /// The status line's text (the last change made, or the last error).
    pub fn status(&self) -> &str {
        &self.status.text
    }

    /// Show `text` in the status line (in red when `error`).
    pub fn set_status(&mut self, text: impl Into<String>, error: bool) {
        self.status = Status { text: text.into(), error };
    }

    fn status_is_error(&self) -> bool {
        self.status.error
    }

    /// Handle a key; `false` means quit. Up/Down or k/j select a partition, `+`/`-`
    /// change its weight by [`WEIGHT_STEP`] (within 0..=255), `l` cycles its loan policy
    /// (off, default, aggressive), q/Esc/Ctrl-C quit. Changes go through `src`; what it
    /// answers goes to the status line.
    pub fn on_key(&mut self, key: KeyEvent, src: &mut dyn Source) -> bool {
        if key.kind == KeyEventKind::Release {
            return true;
        }
        let n = self.snap.as_ref().map_or(0, |s| s.partitions.len());
        match key.code {
            KeyCode::Char('c') if key.modifiers.contains(KeyModifiers::CONTROL) => return false,
            KeyCode::Char('q') | KeyCode::Esc => return false,
            KeyCode::Up | KeyCode::Char('k') => self.selected = self.selected.saturating_sub(1),
            KeyCode::Down | KeyCode::Char('j') => self.selected = (self.selected + 1).min(n.saturating_sub(1)),
            KeyCode::Char('+') | KeyCode::Char('=') => self.change_weight(true, src),
            KeyCode::Char('-') => self.change_weight(false, src),
            KeyCode::Char('l') => self.cycle_loan_policy(src),
            _ => {}
        }
        true
    }

    fn selected_partition_mut(&mut self) -> Option<&mut PartitionSnapshot> {
        let i = self.selected;
        self.snap.as_mut().and_then(|s| s.partitions.get_mut(i))
    }

    fn change_weight(&mut self, up: bool, src: &mut dyn Source) {
        let Some(p) = self.selected_partition_mut() else {
            self.set_status("no partition to change", true);
            return;
        };
        let (name, old) = (p.name.clone(), p.weight);
        let new = if up { old.saturating_add(WEIGHT_STEP) } else { old.saturating_sub(WEIGHT_STEP) };
        if new == old {
            self.set_status(format!("{name}: weight already {old} (0..=255)"), false);
            return;
        }
        match src.set(&name, Some(new), None) {
            Ok(()) => {
                // Shown at once (and a second key press builds on it); the next snapshot
                // confirms it.
                if let Some(p) = self.selected_partition_mut() {
                    p.weight = new;
                }
                self.set_status(format!("{name}: weight {new}"), false);
            }
            Err(e) => self.set_status(format!("{name}: cannot set weight {new}: {e}"), true),
        }
    }

    fn cycle_loan_policy(&mut self, src: &mut dyn Source) {
        let Some(p) = self.selected_partition_mut() else {
            self.set_status("no partition to change", true);
            return;
        };
        let (name, new) = (p.name.clone(), p.loan_policy.next());
        match src.set(&name, None, Some(new)) {
            Ok(()) => {
                if let Some(p) = self.selected_partition_mut() {
                    p.loan_policy = new;
                }
                self.set_status(format!("{name}: loan policy {new}"), false);
            }
            Err(e) => self.set_status(format!("{name}: cannot set loan policy {new}: {e}"), true),
        }
    }

    /// One line for logs and CI:
    /// `t=12.0s pool 480.0/512.0 MiB free 32.0 | p0 w 128 lp default pmem 120.0 loan 40.0
    /// hpi/s 1200 po/s 900 vpg/s 50000 fail 0 | p1 ...` (`pool none` without a pool;
    /// `-` for rates before two snapshots; ` paused`/` ended` after a partition that is
    /// not running).
    pub fn headless_line(&self) -> String {
        let Some(s) = &self.snap else {
            return "t=? no snapshot yet".to_string();
        };
        let mut o = format!("t={:.1}s", s.uptime_ms as f64 / 1000.0);
        match &s.pool {
            Some(p) => o += &format!(" pool {:.1}/{:.1} MiB free {:.1}", p.in_use_mib(), p.size_mib(), p.free_mib()),
            None => o += " pool none",
        }
        for p in &s.partitions {
            let r = self.rates(&p.name);
            o += &format!(
                " | {} w {} lp {} pmem {:.1} loan {:.1} hpi/s {} po/s {} vpg/s {} fail {}",
                one_line(&p.name),
                p.weight,
                p.loan_policy,
                p.pmem_mib(),
                p.loan_mib(),
                rate_text(r.map(|r| r.hpi)),
                rate_text(r.map(|r| r.page_outs)),
                rate_text(r.map(|r| r.verified)),
                p.verify_failures
            );
            if p.state != crate::control::PartitionState::Running {
                o += &format!(" {}", p.state);
            }
        }
        o
    }
}

/// A rate as printed: the integer, or `-` when there is none yet.
fn rate_text(r: Option<u64>) -> String {
    r.map_or_else(|| "-".to_string(), |r| r.to_string())
}

/// `s` without line breaks or other control characters (names come from a config).
fn one_line(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { '?' } else { c }).collect()
}

#[cfg(test)]
mod tests;
