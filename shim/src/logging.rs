//! The shim's logs go to containerd's log: containerd reads the `log` FIFO in
//! the bundle directory (the shim's working directory) and writes what comes
//! out of it into its own log under the task's id.
//!
//! The guest can make the shim log at will (its console, the agent's log
//! stream, bad device accesses), so: those events pass a token bucket
//! ([`GUEST_LINES_PER_SEC`], bursts of [`GUEST_BURST`]) and what it drops is
//! counted and reported every [`DROP_REPORT_EVERY`]; the writer is
//! non-blocking and lossy (a bounded queue to a writer thread), so a slow
//! log reader never stalls the task API or the VMM. Guest log levels are
//! capped at warn where they are re-emitted (husk-vsock).

use std::fs::OpenOptions;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use husk_hypervisor::rate_limit::TokenBucket;
use tracing_subscriber::filter::{filter_fn, FilterExt};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Lines per second the guest may put into containerd's log, per VM.
pub const GUEST_LINES_PER_SEC: f64 = 50.0;
/// Lines the guest may log at once after a quiet spell (a boot's worth).
pub const GUEST_BURST: f64 = 500.0;
/// How often dropped guest lines are reported.
pub const DROP_REPORT_EVERY: Duration = Duration::from_secs(10);
/// Lines queued for the FIFO before new ones are dropped.
const QUEUE_LINES: usize = 4096;

/// Targets whose events the guest triggers.
pub fn guest_triggered(target: &str) -> bool {
    target.starts_with("husk::console")
        || target.starts_with("husk::guest")
        || target.starts_with("husk_hypervisor::devices")
}

fn guest_budget() -> &'static TokenBucket {
    static BUDGET: OnceLock<TokenBucket> = OnceLock::new();
    BUDGET.get_or_init(|| TokenBucket::new(GUEST_LINES_PER_SEC, GUEST_BURST))
}

/// Sets the global tracing subscriber. `debug` is containerd's `-debug` flag.
pub fn init(debug: bool, level: &str) {
    let level = if debug { "debug" } else { level };
    // Our own crates at `level`; chatty dependencies at warn.
    let env = EnvFilter::try_from_env("HUSK_LOG").unwrap_or_else(|_| {
        EnvFilter::new(format!(
            "warn,husk_shim={level},husk_hypervisor={level},husk_vsock={level},husk={level}"
        ))
    });
    let budget = filter_fn(|meta| {
        !meta.is_event()
            || !guest_triggered(meta.target())
            || guest_budget().take_at(Instant::now())
    });
    let builder = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUE_LINES);
    // containerd created the FIFO and holds its read end open.
    let (writer, guard) = match OpenOptions::new().write(true).open("log") {
        Ok(fifo) => builder.finish(fifo),
        Err(_) => builder.finish(std::io::stderr()),
    };
    // Lives as long as the process: its drop would flush and stop the
    // writer thread.
    static GUARD: OnceLock<tracing_appender::non_blocking::WorkerGuard> = OnceLock::new();
    let _ = GUARD.set(guard);
    let layer = tracing_subscriber::fmt::layer()
        .with_ansi(false)
        .with_target(true)
        .with_writer(writer)
        .with_filter(env.and(budget));
    if tracing_subscriber::registry()
        .with(layer)
        .try_init()
        .is_err()
    {
        return;
    }
    let reporter = std::thread::Builder::new()
        .name("husk-log-drops".into())
        .spawn(|| loop {
            std::thread::sleep(DROP_REPORT_EVERY);
            let dropped = guest_budget().take_dropped();
            if dropped > 0 {
                tracing::warn!(
                    "{dropped} guest-triggered log lines dropped in the last {DROP_REPORT_EVERY:?} \
                     (over {GUEST_LINES_PER_SEC}/s)"
                );
            }
        });
    if let Err(e) = reporter {
        tracing::warn!("cannot start the log drop reporter: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_targets_are_the_guest_triggered_ones() {
        for t in [
            "husk::console",
            "husk::guest",
            "husk_hypervisor::devices::virtio::mmio",
        ] {
            assert!(guest_triggered(t), "{t}");
        }
        for t in ["husk_shim::service", "husk_hypervisor::vm"] {
            assert!(!guest_triggered(t), "{t}");
        }
    }
}
