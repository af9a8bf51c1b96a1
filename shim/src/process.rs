//! One process in the guest as the task API sees it: a container's init
//! process or an exec. Its exit is known only once the agent reported it AND
//! its output copies finished; waiters are woken then.

use std::sync::Mutex;

use husk_util::sync::lock;
use std::time::SystemTime;

use containerd_shim::api::Status;
use tokio::sync::watch;

use crate::io::{AttachedIo, Stdio};

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    pub status: u32,
    pub at: SystemTime,
}

/// Where a process is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessState {
    Created,
    /// A Start is in flight (a second Start is refused).
    Starting,
    Running,
    Stopped(Exit),
}

pub struct Process {
    pub container_id: String,
    /// None for the container's init process.
    pub exec_id: Option<String>,
    pub stdio: Stdio,
    /// An exec's process spec (JSON) until it starts.
    pub spec: Mutex<Option<Vec<u8>>>,
    pid: Mutex<u32>,
    state: Mutex<ProcessState>,
    exit_tx: watch::Sender<Option<Exit>>,
    io: tokio::sync::Mutex<AttachedIo>,
}

/// Exit status for a process whose end the agent could not report (the VM
/// or the agent went away): what a shell reports for an unknown failure.
pub const LOST_EXIT_STATUS: u32 = 255;

impl Process {
    pub fn new(container_id: &str, exec_id: Option<&str>, stdio: Stdio) -> Self {
        Self {
            container_id: container_id.to_string(),
            exec_id: exec_id.map(str::to_string),
            stdio,
            spec: Mutex::new(None),
            pid: Mutex::new(0),
            state: Mutex::new(ProcessState::Created),
            exit_tx: watch::channel(None).0,
            io: tokio::sync::Mutex::new(AttachedIo::default()),
        }
    }

    /// The id the task API uses: the exec id, or the container id.
    pub fn task_id(&self) -> &str {
        self.exec_id.as_deref().unwrap_or(&self.container_id)
    }

    pub fn pid(&self) -> u32 {
        *lock(&self.pid)
    }

    pub fn set_pid(&self, pid: u32) {
        *lock(&self.pid) = pid;
    }

    pub fn state(&self) -> ProcessState {
        *lock(&self.state)
    }

    /// Claims the Start of a created process: false if it was started
    /// (or is being started, or ended) already.
    pub fn begin_start(&self) -> bool {
        let mut state = lock(&self.state);
        let created = *state == ProcessState::Created;
        if created {
            *state = ProcessState::Starting;
        }
        created
    }

    /// A Start that failed: the process is created again.
    pub fn abort_start(&self) {
        let mut state = lock(&self.state);
        if *state == ProcessState::Starting {
            *state = ProcessState::Created;
        }
    }

    /// Marks the process running (unless it already stopped).
    pub fn set_running(&self) {
        let mut state = lock(&self.state);
        if matches!(*state, ProcessState::Created | ProcessState::Starting) {
            *state = ProcessState::Running;
        }
    }

    pub async fn set_io(&self, io: AttachedIo) {
        *self.io.lock().await = io;
    }

    pub async fn close_stdin(&self) {
        self.io.lock().await.close_stdin();
    }

    /// Records the exit once output is drained; returns it (the first exit
    /// recorded wins).
    pub async fn finish(&self, status: u32) -> (Exit, bool) {
        self.io.lock().await.wait_outputs().await;
        self.record_exit(status)
    }

    /// Records the exit without waiting for the output (a VM that does not
    /// answer will never send the rest). The first exit recorded stays;
    /// `true` when this call recorded it, so its caller publishes it.
    pub fn record_exit(&self, status: u32) -> (Exit, bool) {
        let mut state = lock(&self.state);
        if let ProcessState::Stopped(exit) = *state {
            return (exit, false);
        }
        let exit = Exit {
            status,
            at: SystemTime::now(),
        };
        *state = ProcessState::Stopped(exit);
        drop(state);
        self.exit_tx.send_replace(Some(exit));
        (exit, true)
    }

    /// Waits for the exit.
    pub async fn wait(&self) -> Exit {
        let mut rx = self.exit_tx.subscribe();
        loop {
            if let Some(exit) = *rx.borrow_and_update() {
                return exit;
            }
            if rx.changed().await.is_err() {
                // The sender lives as long as self: unreachable, but never hang.
                return Exit {
                    status: LOST_EXIT_STATUS,
                    at: SystemTime::now(),
                };
            }
        }
    }

    /// The task API's status for this process (`paused` from its container).
    pub fn status(&self, paused: bool) -> Status {
        match self.state() {
            ProcessState::Created | ProcessState::Starting => Status::CREATED,
            ProcessState::Running if paused => Status::PAUSED,
            ProcessState::Running => Status::RUNNING,
            ProcessState::Stopped(_) => Status::STOPPED,
        }
    }

    pub fn exit(&self) -> Option<Exit> {
        match self.state() {
            ProcessState::Stopped(exit) => Some(exit),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waiters_see_the_first_exit() {
        let p = std::sync::Arc::new(Process::new("c", None, Stdio::default()));
        assert_eq!(p.status(false), Status::CREATED);
        p.set_running();
        assert_eq!(p.status(true), Status::PAUSED);
        let waiter = {
            let p = p.clone();
            tokio::spawn(async move { p.wait().await })
        };
        let (exit, first) = p.finish(3).await;
        assert!(first);
        assert_eq!(
            p.finish(9).await,
            (exit, false),
            "a later exit does not overwrite"
        );
        assert_eq!(p.record_exit(137), (exit, false));
        assert_eq!(waiter.await.unwrap(), exit);
        assert_eq!(exit.status, 3);
        assert_eq!(p.status(false), Status::STOPPED);
        // Waiting after the exit returns at once.
        assert_eq!(p.wait().await, exit);
    }
}
