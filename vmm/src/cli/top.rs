//! `amsvm top [--socket PATH] [--interval SECONDS] [--headless [--count N]]`: watch a
//! running amsvm live (the [`dashboard`](crate::dashboard)), or print one line per
//! interval with `--headless`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use crate::control;
use crate::dashboard::{self, SocketSource, Source};

use super::EXIT_BAD_INPUT;

/// The longest refresh interval, seconds.
const MAX_INTERVAL: f64 = 60.0;

#[derive(Args, Debug)]
pub struct TopArgs {
    /// The control socket of the amsvm to watch (default: the only one running, found in
    /// $XDG_RUNTIME_DIR/amsvm or /tmp/amsvm-<uid>).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Seconds between refreshes (more than 0, at most 60).
    #[arg(long, value_name = "SECONDS", default_value_t = 1.0)]
    interval: f64,
    /// Print one line per interval instead of the live screen (for logs and CI).
    #[arg(long)]
    headless: bool,
    /// With --headless: stop after N lines.
    #[arg(long, value_name = "N")]
    count: Option<u64>,
}

/// Exit status: 0 when the user quits (or --count lines are printed, or a signal ends
/// it); 2 with a one-line error on bad arguments, when no instance is found, or when
/// the instance stops answering.
pub fn top(a: TopArgs) -> i32 {
    let interval = match check(&a) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("amsvm: top: {e}");
            return EXIT_BAD_INPUT;
        }
    };
    let path = match a.socket.map_or_else(|| control::discover(&control::runtime_dir()), Ok) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("amsvm: {e}");
            return EXIT_BAD_INPUT;
        }
    };
    // SIGINT (in headless mode), SIGTERM and SIGHUP end the loop, so that the terminal
    // is restored.
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM, signal_hook::consts::SIGHUP] {
        if let Err(e) = signal_hook::flag::register(sig, stop.clone()) {
            eprintln!("amsvm: top: cannot handle signal {sig}: {e}");
            return EXIT_BAD_INPUT;
        }
    }
    let mut src = SocketSource(path);
    let result = if a.headless {
        dashboard::run_headless_count(&mut src, interval, None, &stop, a.count, &mut std::io::stdout().lock())
    } else {
        // Fail before taking over the terminal when the instance does not answer.
        src.snapshot().and_then(|_| dashboard::run_tui(&mut src, interval, None, &stop).map_err(|e| e.to_string()))
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("amsvm: {e}");
            EXIT_BAD_INPUT
        }
    }
}

/// The arguments make sense together: the interval, and a terminal unless headless.
fn check(a: &TopArgs) -> Result<Duration, String> {
    // (NaN fails the comparison too.)
    if !(a.interval > 0.0 && a.interval <= MAX_INTERVAL) {
        return Err(format!("--interval must be more than 0 and at most {MAX_INTERVAL} seconds (got {})", a.interval));
    }
    if a.count.is_some() && !a.headless {
        return Err("--count applies to --headless only".to_string());
    }
    if a.count == Some(0) {
        return Err("--count must be at least 1".to_string());
    }
    if !a.headless && !std::io::stdout().is_terminal() {
        return Err("stdout is not a terminal; use --headless".to_string());
    }
    Ok(Duration::from_secs_f64(a.interval))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(interval: f64, headless: bool, count: Option<u64>) -> TopArgs {
        TopArgs { socket: None, interval, headless, count }
    }

    #[test]
    fn arguments_are_checked() {
        assert_eq!(check(&args(0.5, true, Some(2))), Ok(Duration::from_millis(500)));
        assert_eq!(check(&args(60.0, true, None)), Ok(Duration::from_secs(60)));
        for bad in [0.0, -1.0, 60.5, f64::NAN, f64::INFINITY] {
            assert!(check(&args(bad, true, None)).unwrap_err().starts_with("--interval must be"), "{bad}");
        }
        assert_eq!(check(&args(1.0, true, Some(0))), Err("--count must be at least 1".into()));
        assert_eq!(check(&args(1.0, false, Some(1))), Err("--count applies to --headless only".into()));
    }
}
