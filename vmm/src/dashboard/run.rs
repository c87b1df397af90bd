//! The loops: the terminal dashboard ([`run_tui`]) and one line per interval
//! ([`run_headless`]).

use std::io::{self, ErrorKind, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, Once};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use ratatui::backend::CrosstermBackend;
use ratatui::crossterm::event::{self, Event, KeyEventKind};
use ratatui::crossterm::{cursor, execute, terminal};
use ratatui::Terminal;

use super::{Dashboard, Source};

/// How long snapshots may fail in a row before [`run_tui`] gives up.
pub const GIVE_UP_AFTER: Duration = Duration::from_secs(2);

/// How often a failing snapshot is tried again (at most; the interval if shorter).
const RETRY: Duration = Duration::from_millis(250);

/// The longest wait between looks at `stop`.
const STOP_POLL: Duration = Duration::from_millis(50);

/// The thread whose terminal is in raw mode and on the alternate screen, if any.
static TUI_THREAD: Mutex<Option<ThreadId>> = Mutex::new(None);

/// Raw mode and the alternate screen, for as long as this lives: dropping it (on
/// return, error or unwinding) restores the terminal. A panic hook restores it before
/// the panic message is printed, so that the message is seen.
struct TerminalGuard;

impl TerminalGuard {
    fn enter() -> io::Result<TerminalGuard> {
        static HOOK: Once = Once::new();
        HOOK.call_once(|| {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                let mine = *TUI_THREAD.lock().unwrap_or_else(|e| e.into_inner()) == Some(std::thread::current().id());
                if mine {
                    restore_terminal();
                }
                previous(info);
            }));
        });
        *TUI_THREAD.lock().unwrap_or_else(|e| e.into_inner()) = Some(std::thread::current().id());
        // From here, whatever fails is undone by the guard's drop.
        let guard = TerminalGuard;
        terminal::enable_raw_mode()?;
        execute!(io::stdout(), terminal::EnterAlternateScreen, cursor::Hide)?;
        Ok(guard)
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        restore_terminal();
    }
}

/// Leave raw mode and the alternate screen, once (whoever comes first: the guard or
/// the panic hook).
fn restore_terminal() {
    if TUI_THREAD.lock().unwrap_or_else(|e| e.into_inner()).take().is_some() {
        let _ = terminal::disable_raw_mode();
        let _ = execute!(io::stdout(), terminal::LeaveAlternateScreen, cursor::Show);
    }
}

/// The live dashboard on the terminal (raw mode, alternate screen; restored on every
/// way out), refreshed every `interval`. Returns when the user quits, `until` passes or
/// `stop` is set. A failing snapshot shows in the status line and the last numbers
/// stay; after [`GIVE_UP_AFTER`] of failures in a row it returns the error.
pub fn run_tui(src: &mut dyn Source, interval: Duration, until: Option<Instant>, stop: &AtomicBool) -> io::Result<()> {
    let _guard = TerminalGuard::enter()?;
    let mut term = Terminal::new(CrosstermBackend::new(io::stdout()))?;
    let mut d = Dashboard::new();
    let mut next = Instant::now();
    let mut failing_since: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if stop.load(Ordering::Relaxed) || until.is_some_and(|u| now >= u) {
            return Ok(());
        }
        let mut redraw = false;
        if now >= next {
            match src.snapshot() {
                Ok(s) => {
                    if failing_since.take().is_some() {
                        d.set_status("", false);
                    }
                    d.update(s);
                    next += interval;
                    if next < now {
                        next = now + interval;
                    }
                }
                Err(e) => {
                    let since = *failing_since.get_or_insert(now);
                    if now.duration_since(since) > GIVE_UP_AFTER {
                        return Err(io::Error::other(format!("no snapshot for more than {GIVE_UP_AFTER:?}: {e}")));
                    }
                    d.set_status(format!("cannot read the counters (showing the last ones): {e}"), true);
                    next = now + interval.min(RETRY);
                }
            }
            redraw = true;
        }
        if redraw {
            term.draw(|f| d.render(f))?;
        }
        let now = Instant::now();
        let mut timeout = next.saturating_duration_since(now).min(STOP_POLL);
        if let Some(u) = until {
            timeout = timeout.min(u.saturating_duration_since(now));
        }
        if event::poll(timeout)? {
            match event::read()? {
                Event::Key(k) if k.kind != KeyEventKind::Release => {
                    if !d.on_key(k, src) {
                        return Ok(());
                    }
                    term.draw(|f| d.render(f))?;
                }
                Event::Resize(..) => {
                    term.autoresize()?;
                    term.draw(|f| d.render(f))?;
                }
                _ => {}
            }
        }
    }
}

/// [`Dashboard::headless_line`] every `interval` into `out` (flushed each time): the
/// first snapshot is taken at once, the first line printed one interval later (so that
/// every line has rates). Ends with `Ok` when `until` passes, `stop` is set or `out` is
/// closed (a broken pipe), with `Err` when a snapshot fails (unless `stop` is set) or
/// `out` cannot be written.
pub fn run_headless(
    src: &mut dyn Source,
    interval: Duration,
    until: Option<Instant>,
    stop: &AtomicBool,
    out: &mut dyn Write,
) -> Result<(), String> {
    run_headless_count(src, interval, until, stop, None, out)
}

/// [`run_headless`], ending after `count` lines when given.
pub fn run_headless_count(
    src: &mut dyn Source,
    interval: Duration,
    until: Option<Instant>,
    stop: &AtomicBool,
    count: Option<u64>,
    out: &mut dyn Write,
) -> Result<(), String> {
    let mut d = Dashboard::new();
    let mut lines = 0u64;
    let mut first = true;
    let mut next = Instant::now();
    loop {
        match src.snapshot() {
            Ok(s) => d.update(s),
            Err(_) if stop.load(Ordering::Relaxed) => return Ok(()),
            Err(e) => return Err(e),
        }
        // The first snapshot only starts the rates.
        if !first {
            let line = d.headless_line();
            if let Err(e) = writeln!(out, "{line}").and_then(|_| out.flush()) {
                return if e.kind() == ErrorKind::BrokenPipe { Ok(()) } else { Err(format!("cannot write: {e}")) };
            }
            lines += 1;
            if count.is_some_and(|c| lines >= c) {
                return Ok(());
            }
        }
        first = false;
        next += interval;
        let now = Instant::now();
        if next < now {
            next = now + interval;
        }
        // Wait for the next tick, looking at `stop` and `until` meanwhile.
        loop {
            let now = Instant::now();
            if stop.load(Ordering::Relaxed) || until.is_some_and(|u| now >= u) {
                return Ok(());
            }
            if now >= next {
                break;
            }
            std::thread::sleep(next.duration_since(now).min(STOP_POLL));
        }
    }
}
