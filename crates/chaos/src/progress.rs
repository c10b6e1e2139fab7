//! What the run tells while it runs, on stderr: a progress bar (rate, ETA)
//! and one line per event (a fault, a process started). The report and the
//! summary line go to stdout, so they can be captured on their own.

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use crate::load::Stats;

/// The bar while the load runs; lines printed meanwhile go above it.
static BAR: OnceLock<ProgressBar> = OnceLock::new();

/// Prints a line on stderr, above the bar if one is shown. Lines are
/// stamped with the time since the run started, to line up with the logs.
pub fn say(line: &str) {
    static START: OnceLock<Instant> = OnceLock::new();
    let elapsed = START.get_or_init(Instant::now).elapsed().as_secs_f64();
    let line = format!("[{elapsed:7.1}s] {line}");
    match BAR.get() {
        Some(bar) if !bar.is_finished() => bar.suspend(|| eprintln!("{line}")),
        _ => eprintln!("{line}"),
    }
}

/// Shows a bar over `duration` of load (hidden when stderr is not a
/// terminal, as in `make test`) and refreshes it twice a second from the
/// load's counters until the returned task is aborted.
pub fn start(duration: Duration, faults: usize, stats: Arc<Stats>) -> tokio::task::JoinHandle<()> {
    let bar = BAR.get_or_init(|| {
        ProgressBar::new(duration.as_secs().max(1)).with_style(
            ProgressStyle::with_template(
                "{spinner} load {elapsed_precise} [{bar:40}] {pos}/{len}s ETA {eta}\n  {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        )
    });
    let bar = bar.clone();
    let started = Instant::now();
    // Commands acknowledged before the load (account opening) are not in
    // the rate.
    let base = stats.acked.load(Ordering::Relaxed);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tick.tick().await;
            let elapsed = started.elapsed();
            if elapsed.as_secs() > bar.length().unwrap_or(0) {
                // Faults that waited for a slow recovery extend the load.
                bar.set_length(elapsed.as_secs());
            }
            bar.set_position(elapsed.as_secs());
            bar.set_message(message(&stats, base, elapsed, faults));
        }
    })
}

/// Stops showing the bar (the report follows).
pub fn finish() {
    if let Some(bar) = BAR.get() {
        bar.finish_and_clear();
    }
}

fn message(stats: &Stats, base: u64, elapsed: Duration, faults: usize) -> String {
    let acked = stats.acked.load(Ordering::Relaxed);
    let rate = acked.saturating_sub(base) as f64 / elapsed.as_secs_f64().max(0.001);
    format!(
        "{acked} acked ({rate:.0}/s), {} refused, {} resends, {} internal, faults {}/{faults}",
        stats.refused.load(Ordering::Relaxed),
        stats.resends.load(Ordering::Relaxed),
        stats.internal.load(Ordering::Relaxed),
        stats.faults.load(Ordering::Relaxed),
    )
}
