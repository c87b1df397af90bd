//! The loaning policy: cooperative memory management before hypervisor paging.
//!
//! A thread per pool watches its free frames. When they fall below the low watermark
//! ([`LOW_WATERMARK`] of the pool) it asks partitions to loan pages through their
//! virtio-balloon devices, enough to bring the free frames back up to the high watermark;
//! when free frames stay well above it ([`DEFLATE_ABOVE`]) it gives loans back. Hypervisor paging
//! (the fault path) remains the fallback: for partitions whose driver does not
//! cooperate, and for demand faster than the guests inflate.
//!
//! Who loans how much:
//! - `loan_policy = "off"`: never asked.
//! - `"default"`: at most the free memory its balloon statistics show (MEMFREE).
//! - `"aggressive"`: up to everything above its `min_mib` (the guest gives what it can).
//! - Never below `min_mib`: a partition's loan leaves it at least `min_mib` of RAM.
//! - The request is shared in proportion to what each partition can give times
//!   `256 - weight` (a lower weight loans first), capped at what it can give.
//! - Deflating returns loans to the highest-weight partitions first.
//! - A target held by the operator (`amsvm loan NAME MIB`) is applied as is and the
//!   partition is left out until it is released (`amsvm loan NAME auto`).
//! - A partition whose balloon does not move toward its target for
//!   [`UNRESPONSIVE_AFTER`] is left out (and its target set back to its loan) until its
//!   loan changes again or [`RETRY_AFTER`] has passed.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use super::{PartitionPool, Pool};
use crate::config::LoanPolicy;

/// How often the policy looks at the pool (it is also woken when a fault finds the free
/// frames below the low watermark).
pub const INTERVAL: Duration = Duration::from_millis(50);

/// Loaning starts when free frames fall below this share of the pool...
pub const LOW_WATERMARK: f64 = 1.0 / 8.0;
/// ... and asks for enough to bring them up to this share.
pub const HIGH_WATERMARK: f64 = 1.0 / 4.0;
/// Loans are given back while free frames stay above this share (a gap above the high
/// watermark, so that a loan is not returned as soon as it is made).
pub const DEFLATE_ABOVE: f64 = 3.0 / 8.0;
/// Most pages given back per round: demand that comes back finds loans still out
/// rather than having to reclaim them again.
const MAX_DEFLATE_PER_ROUND: u64 = 4096;

/// How long a balloon may stay short of its target without moving before the policy
/// stops counting on it (a driver that is merely slow — its guest is paging hard, say —
/// moves within this).
pub const UNRESPONSIVE_AFTER: Duration = Duration::from_secs(5);
/// How long an unresponsive balloon is left out before the policy asks it again.
pub const RETRY_AFTER: Duration = Duration::from_secs(10);

/// How often the policy asks each driver for fresh statistics.
const STATS_EVERY: Duration = Duration::from_millis(250);

/// What the policy knows about one partition's balloon between rounds.
#[derive(Default)]
pub(super) struct LoanTrack {
    /// The loan when it last changed, and when.
    last_loan: u64,
    since: Option<Instant>,
    pub(super) unresponsive: bool,
    last_stats: Option<Instant>,
}

/// One partition as the policy sees it in a round.
struct Candidate {
    p: Arc<PartitionPool>,
    loaned: u64,
    /// Pages it could still loan.
    room: u64,
    weight: u8,
}

/// The policy thread of `pool` (ends when the pool is dropped).
pub(super) fn run(pool: Weak<Pool>) {
    loop {
        let Some(pool) = pool.upgrade() else { return };
        round(&pool);
        pool.apply_cpu_yield();
        let s = pool.lock();
        let _ = pool.loan_wake.wait_timeout(s, INTERVAL);
    }
}

/// One round of the policy.
fn round(pool: &Pool) {
    let (free, parts) = {
        let s = pool.lock();
        (pool.capacity.saturating_sub(s.resident), s.partitions.iter().filter_map(Weak::upgrade).collect::<Vec<_>>())
    };
    let cap = pool.capacity as f64;
    let (low, high, deflate_above) =
        ((cap * LOW_WATERMARK) as u64, (cap * HIGH_WATERMARK) as u64, (cap * DEFLATE_ABOVE) as u64);
    let now = Instant::now();
    let mut cands = Vec::new();
    for p in parts {
        let Some(b) = p.balloon() else { continue };
        let st = &b.state;
        if !st.active.load(Relaxed) || p.is_detached() {
            continue;
        }
        if let Some(t) = st.manual() {
            // Held by the operator: the policy neither asks nor gives back.
            b.set_target(t);
            continue;
        }
        let loaned = st.loaned.load(Relaxed);
        let target = st.target.load(Relaxed);
        // The device is called only after the loan_track lock is released: returning the
        // stats buffer writes the virtqueue's used ring in guest memory, and when that page
        // is paged out the write waits for the partition's fault handler, which takes
        // loan_track (`pending_loan`) when it picks victims. Holding it across the call
        // deadlocked a pool of Linux guests (nested harness, overcommit scenario).
        let (stats_due, gave_up);
        let room = {
            let mut tr = p.loan_track();
            stats_due = tr.last_stats.is_none_or(|t| now.duration_since(t) >= STATS_EVERY);
            if stats_due {
                tr.last_stats = Some(now);
            }
            let retry = tr.unresponsive && tr.since.is_some_and(|t| now.duration_since(t) >= RETRY_AFTER);
            let moved = loaned != tr.last_loan || tr.since.is_none() || retry;
            gave_up = !moved && target > loaned && tr.since.is_some_and(|t| now.duration_since(t) >= UNRESPONSIVE_AFTER);
            if moved {
                tr.last_loan = loaned;
                tr.since = Some(now);
                tr.unresponsive = false;
            } else if gave_up {
                if !tr.unresponsive {
                    tracing::info!(partition = %p.name, "balloon does not follow its target ({target} pages, {loaned} loaned): reclaiming by paging");
                    p.metrics().loan_unresponsive.fetch_add(1, Relaxed);
                }
                tr.unresponsive = true;
                tr.since = Some(now);
            }
            if tr.unresponsive {
                0
            } else {
                let above_min = (p.npages as u64).saturating_sub(p.min_pages).saturating_sub(loaned);
                match p.loan_policy() {
                    LoanPolicy::Off => 0,
                    LoanPolicy::Default => {
                        let free = b.state.guest_stats().get(crate::devices::virtio::balloon::tag::MEMFREE).unwrap_or(0) / 4096;
                        // What is already asked for but not yet given counts as given.
                        free.saturating_sub(target.saturating_sub(loaned)).min(above_min)
                    }
                    LoanPolicy::Aggressive => above_min.saturating_sub(target.saturating_sub(loaned)),
                }
            }
        };
        if stats_due {
            b.request_stats();
        }
        if gave_up {
            b.set_target(loaned);
        }
        cands.push(Candidate { weight: p.weight(), loaned: loaned.max(target), room, p });
    }
    if free < low {
        // Ask for enough to reach the high watermark, shared by room x (256 - weight),
        // less what was asked for before and is still on its way.
        let pending: u64 = cands.iter().map(|c| c.p.pending_loan()).sum();
        let mut want = (high - free).saturating_sub(pending);
        let mut open: Vec<usize> = (0..cands.len()).filter(|&i| cands[i].room > 0).collect();
        let mut ask = vec![0u64; cands.len()];
        while want > 0 && !open.is_empty() {
            let total: f64 = open.iter().map(|&i| cands[i].room as f64 * (256 - cands[i].weight as u32) as f64).sum();
            let mut given = 0;
            let mut still = Vec::new();
            for &i in &open {
                let share = (want as f64 * cands[i].room as f64 * (256 - cands[i].weight as u32) as f64 / total).ceil() as u64;
                let left = cands[i].room - ask[i];
                let take = share.min(left).min(want - given);
                ask[i] += take;
                given += take;
                if ask[i] < cands[i].room {
                    still.push(i);
                }
            }
            want -= given;
            if given == 0 {
                break;
            }
            open = still;
        }
        for (c, a) in cands.iter().zip(ask) {
            if a > 0 {
                c.p.balloon().expect("candidate has a balloon").set_target(c.loaned + a);
            }
        }
    } else if free > deflate_above {
        // Give back what the pool can spare, highest weight first.
        let mut spare = (free - deflate_above).min(MAX_DEFLATE_PER_ROUND);
        cands.sort_by_key(|c| std::cmp::Reverse(c.weight));
        for c in &cands {
            if spare == 0 {
                break;
            }
            let b = c.p.balloon().expect("candidate has a balloon");
            let target = b.state.target.load(Relaxed);
            if target == 0 {
                continue;
            }
            let back = target.min(spare);
            b.set_target(target - back);
            spare -= back;
        }
    }
}
