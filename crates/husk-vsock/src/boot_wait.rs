//! Waiting for the guest agent while its VM boots: patient with a guest that
//! keeps showing signs of life (a slow host), quick with one that stopped
//! (a stuck guest), and saying what the guest did last when it gives up.

use std::path::Path;
use std::time::Duration;

use tokio::time::Instant;

use husk_protocol::AgentServiceClient;

use crate::client::agent_client;

/// How often the wait looks at the guest's progress.
const POLL: Duration = Duration::from_millis(250);

pub use husk_util::guest::GuestWatch;

/// When to give up on a boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootLimits {
    /// No sign of progress for this long.
    pub stall: Duration,
    /// This long in all, progress or not.
    pub max: Duration,
}

/// Why the agent did not come up. Each names what the guest did last.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error(
        "no sign of progress from the booting guest for {:.0} s (boot running {:.0} s); {guest}",
        quiet.as_secs_f64(), elapsed.as_secs_f64()
    )]
    Stalled {
        quiet: Duration,
        elapsed: Duration,
        guest: String,
    },
    #[error(
        "the boot took longer than {:.0} s although the guest kept making progress; {guest}",
        max.as_secs_f64()
    )]
    TooLong { max: Duration, guest: String },
    #[error("the VM ended while the guest booted ({reason}) after {:.0} s; {guest}", elapsed.as_secs_f64())]
    Ended {
        reason: String,
        elapsed: Duration,
        guest: String,
    },
    #[error("{source}; {guest}")]
    Connect {
        #[source]
        source: crate::Error,
        guest: String,
    },
}

/// Connects to the agent through `uds` while `guest` boots, within
/// `limits`. Returns the client and how long the boot took.
pub async fn wait_for_agent(
    uds: &Path,
    guest: &(dyn GuestWatch + Sync),
    limits: BootLimits,
) -> Result<(AgentServiceClient, Duration), BootError> {
    let started = Instant::now();
    let connect = agent_client(uds, limits.max);
    tokio::pin!(connect);
    let mut tick = tokio::time::interval(POLL);
    let mut last = (guest.progress(), Instant::now());
    loop {
        tokio::select! {
            connected = &mut connect => {
                return match connected {
                    Ok(client) => Ok((client, started.elapsed())),
                    // The connect attempts share the cap.
                    Err(crate::Error::Timeout { .. }) => Err(BootError::TooLong {
                        max: limits.max,
                        guest: guest.describe(),
                    }),
                    Err(source) => Err(BootError::Connect { source, guest: guest.describe() }),
                };
            }
            _ = tick.tick() => {}
        }
        let elapsed = started.elapsed();
        if let Some(reason) = guest.ended() {
            return Err(BootError::Ended {
                reason,
                elapsed,
                guest: guest.describe(),
            });
        }
        let progress = guest.progress();
        if progress != last.0 {
            last = (progress, Instant::now());
        }
        let quiet = last.1.elapsed();
        if quiet >= limits.stall {
            return Err(BootError::Stalled {
                quiet,
                elapsed,
                guest: guest.describe(),
            });
        }
        if elapsed >= limits.max {
            return Err(BootError::TooLong {
                max: limits.max,
                guest: guest.describe(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Mutex;

    /// A guest whose progress the test moves; no agent ever answers.
    #[derive(Default)]
    struct FakeGuest {
        progress: AtomicU64,
        ended: Mutex<Option<String>>,
    }

    impl GuestWatch for FakeGuest {
        fn progress(&self) -> u64 {
            self.progress.load(Ordering::SeqCst)
        }
        fn ended(&self) -> Option<String> {
            self.ended.lock().unwrap().clone()
        }
        fn describe(&self) -> String {
            format!("fake guest at {}", self.progress())
        }
    }

    async fn fail(guest: &FakeGuest, limits: BootLimits) -> BootError {
        let dir = tempfile::tempdir().unwrap();
        match wait_for_agent(&dir.path().join("none"), guest, limits).await {
            Ok(_) => panic!("no agent listens, yet the wait succeeded"),
            Err(e) => e,
        }
    }

    fn limits(stall_ms: u64, max_ms: u64) -> BootLimits {
        BootLimits {
            stall: Duration::from_millis(stall_ms),
            max: Duration::from_millis(max_ms),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_guest_without_progress_fails_at_the_stall_bound() {
        let guest = FakeGuest::default();
        let started = tokio::time::Instant::now();
        let err = fail(&guest, limits(2_000, 60_000)).await;
        assert!(matches!(err, BootError::Stalled { .. }), "{err}");
        let waited = started.elapsed();
        assert!(waited >= Duration::from_secs(2) && waited < Duration::from_secs(3));
        assert!(err.to_string().contains("fake guest at 0"), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_guest_that_keeps_progressing_waits_until_the_cap() {
        let guest = std::sync::Arc::new(FakeGuest::default());
        let mover = guest.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                mover.progress.fetch_add(1, Ordering::SeqCst);
            }
        });
        let started = tokio::time::Instant::now();
        let err = fail(&guest, limits(2_000, 10_000)).await;
        assert!(matches!(err, BootError::TooLong { .. }), "{err}");
        assert!(
            started.elapsed() >= Duration::from_secs(10),
            "past the stall bound"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_vm_that_ends_fails_at_once_with_its_reason() {
        let guest = FakeGuest::default();
        *guest.ended.lock().unwrap() = Some("crashed: triple fault".into());
        let started = tokio::time::Instant::now();
        let err = fail(&guest, limits(60_000, 60_000)).await;
        assert!(err.to_string().contains("triple fault"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(1));
    }
}
