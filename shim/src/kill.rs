//! Kill, and the VM as the kill boundary: a SIGKILL to the last thing
//! running in the VM ends it even when the guest does not answer.

use std::sync::Arc;

use crate::agent::ProcessRef;
use crate::container::Shim;
use crate::errors::*;
use crate::process::{Process, ProcessState};
use crate::sandbox::Sandbox;

/// SIGKILL's number (the task API carries signals as numbers).
pub const KILL_SIGNAL: u32 = 9;
/// What a process killed by SIGKILL exits with.
pub const KILLED_EXIT_STATUS: u32 = 128 + KILL_SIGNAL;

impl Shim {
    pub async fn kill(
        self: &Arc<Self>,
        id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> ttrpc::Result<()> {
        let container = self.container(id)?;
        let process = container.process(exec_id)?;
        match process.state() {
            ProcessState::Stopped(_) => {
                return Err(not_found(format!(
                    "{} of {id}: process already finished",
                    process.task_id()
                )))
            }
            // Not started: nothing in the guest runs yet (an exec only
            // exists here until Start).
            ProcessState::Created if !exec_id.is_empty() => {
                let (exit, first) = process.record_exit(128 + signal);
                if first {
                    self.events.exit(id, exec_id, 0, exit).await;
                }
                return Ok(());
            }
            _ => {}
        }
        let sandbox = self.sandbox()?;
        // SIGKILL to the last thing running in the VM: the VM is the kill
        // boundary. If the guest does not report the exit in time (a stuck
        // or lying agent), the VM is stopped and the exit reported anyway.
        let boundary = signal == KILL_SIGNAL && exec_id.is_empty() && self.is_last_running(id);
        if boundary {
            self.spawn_kill_boundary(&sandbox, &process);
        }
        let target = ProcessRef {
            container_id: id,
            exec_id,
        };
        let timeout = boundary.then_some(sandbox.kill_grace);
        match sandbox
            .agent
            .signal_process(target, signal, all, timeout)
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if boundary => {
                tracing::warn!(container = id, "{e}; the VM stops if no exit follows");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Whether container `id` is what keeps the VM busy: the task that
    /// booted it, or the only container still running.
    fn is_last_running(&self, id: &str) -> bool {
        id == self.sandbox_id
            || self
                .containers()
                .iter()
                .all(|c| c.id == id || c.init.state() != ProcessState::Running)
    }

    /// After a SIGKILL to `process`: unless it exits within the grace
    /// period, every process of the VM is reported killed (137) and the VM
    /// is stopped.
    fn spawn_kill_boundary(self: &Arc<Self>, sandbox: &Arc<Sandbox>, process: &Arc<Process>) {
        let (shim, sandbox, process) = (self.clone(), sandbox.clone(), process.clone());
        tokio::spawn(async move {
            let grace = sandbox.kill_grace;
            if tokio::time::timeout(grace, process.wait()).await.is_ok() {
                return;
            }
            tracing::warn!(
                sandbox = sandbox.id,
                "no exit {grace:?} after SIGKILL to {}: the guest does not answer; \
                 stopping the VM and reporting its processes killed",
                process.task_id()
            );
            for c in shim.containers() {
                let execs: Vec<Arc<Process>> = c.execs().into_iter().collect();
                for p in std::iter::once(c.init.clone()).chain(execs) {
                    let started = p.state() != ProcessState::Created;
                    let (exit, first) = p.record_exit(KILLED_EXIT_STATUS);
                    if first && started {
                        shim.events
                            .exit(&p.container_id, p.task_id(), p.pid(), exit)
                            .await;
                    }
                }
            }
            sandbox.stop_vm().await;
        });
    }
}
