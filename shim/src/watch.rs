//! What the shim watches in the background of a running VM: each started
//! process's exit, the guest's OOM kills, and the VM's own end.

use std::collections::HashMap;
use std::sync::Arc;

use crate::agent::ProcessRef;
use crate::container::Shim;
use crate::process::{Process, LOST_EXIT_STATUS};
use crate::sandbox::Sandbox;

impl Shim {
    /// OOM events (a long poll kept open on the agent) and the VM's own exit.
    pub(crate) fn spawn_watchers(self: &Arc<Self>, sandbox: &Arc<Sandbox>) {
        let (shim, sb) = (self.clone(), sandbox.clone());
        tokio::spawn(async move {
            let mut oom_gate = OomGate::default();
            loop {
                match sb.agent.next_oom_event().await {
                    Ok(id) => {
                        // Only this shim's containers, and one event per
                        // container and second: the guest sends these.
                        if shim.container(&id).is_ok() && oom_gate.admit(&id) {
                            tracing::info!(container = id, "OOM kill in the guest");
                            shim.events.oom(&id).await;
                        }
                    }
                    Err(e) => {
                        tracing::debug!("OOM event stream ended: {e}");
                        break;
                    }
                }
            }
        });
        let sb = sandbox.clone();
        tokio::spawn(async move {
            let reason = sb.vm.exited().await;
            // Why, as far as the guest said (a kernel panic prints its
            // reason on the console even when quiet).
            let output = sb.vm.last_output().unwrap_or_default();
            tracing::warn!(
                sandbox = sb.id,
                "VM ended: {reason}; its tasks are reported lost; last guest output: {output}"
            );
            // Tear the VMM down so every open agent call fails instead of
            // hanging; processes still running are reported as lost.
            sb.stop_vm().await;
        });
    }

    /// Waits in the agent for the process to end, then records and
    /// publishes its exit (after its output is drained).
    pub(crate) fn spawn_exit_monitor(
        self: &Arc<Self>,
        sandbox: &Arc<Sandbox>,
        process: &Arc<Process>,
    ) {
        let (shim, sandbox, process) = (self.clone(), sandbox.clone(), process.clone());
        tokio::spawn(async move {
            let target = ProcessRef {
                container_id: &process.container_id,
                exec_id: process.exec_id.as_deref().unwrap_or_default(),
            };
            let status = match sandbox.agent.wait_process(target).await {
                Ok(status) => u32::try_from(status).unwrap_or(LOST_EXIT_STATUS),
                Err(e) => {
                    tracing::warn!(
                        container = process.container_id,
                        exec = process.task_id(),
                        "lost the process: {e}"
                    );
                    LOST_EXIT_STATUS
                }
            };
            let (exit, first) = process.finish(status).await;
            if first {
                shim.events
                    .exit(
                        &process.container_id,
                        process.task_id(),
                        process.pid(),
                        exit,
                    )
                    .await;
            }
        });
    }
}

/// Coalesces OOM events: one per container per [`OomGate::WINDOW`].
#[derive(Default)]
struct OomGate {
    last: HashMap<String, std::time::Instant>,
}

impl OomGate {
    const WINDOW: std::time::Duration = std::time::Duration::from_secs(1);
    /// Containers remembered at most (ids come from the guest).
    const MAX_TRACKED: usize = 1024;

    fn admit(&mut self, id: &str) -> bool {
        self.admit_at(id, std::time::Instant::now())
    }

    fn admit_at(&mut self, id: &str, now: std::time::Instant) -> bool {
        if let Some(last) = self.last.get(id) {
            if now.saturating_duration_since(*last) < Self::WINDOW {
                return false;
            }
        }
        if self.last.len() >= Self::MAX_TRACKED {
            self.last.clear();
        }
        self.last.insert(id.to_string(), now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oom_events_are_coalesced_per_container() {
        let mut gate = OomGate::default();
        let t0 = std::time::Instant::now();
        assert!(gate.admit_at("c1", t0));
        assert!(!gate.admit_at("c1", t0 + std::time::Duration::from_millis(500)));
        assert!(gate.admit_at("c2", t0));
        assert!(gate.admit_at("c1", t0 + std::time::Duration::from_secs(2)));
    }
}
