//! A process the agent started in a container (its init or an exec): its
//! pid, stdio, and exit status as WaitProcess reports it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::sync::{oneshot, watch};

use crate::reaper::ExitStatus;
use crate::stdio::ProcessIo;

/// How a process ended, as reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exit {
    /// Exit code, or 128 + signal.
    pub status: i32,
    pub at: SystemTime,
}

impl Exit {
    pub fn unix_nanos(&self) -> i64 {
        self.at
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
            .unwrap_or(0)
    }
}

pub struct Process {
    pub pid: Pid,
    /// `None` for the container's init process.
    pub exec_id: Option<String>,
    pub io: Arc<ProcessIo>,
    /// Reaped (the pid may be reused from then on).
    reaped: AtomicBool,
    /// Reaped: its status, before its output is drained.
    reaped_tx: watch::Sender<Option<Exit>>,
    /// Reaped and its output streams finished: what WaitProcess reports.
    exit: watch::Sender<Option<Exit>>,
}

impl Process {
    /// `status` is the reaper's receiver for `pid`; `on_reaped` runs once
    /// the process is reaped (before its output is drained).
    pub fn start(
        pid: Pid,
        exec_id: Option<String>,
        io: ProcessIo,
        status: oneshot::Receiver<ExitStatus>,
        on_reaped: impl FnOnce(Exit) + Send + 'static,
    ) -> Arc<Process> {
        let process = Arc::new(Process {
            pid,
            exec_id,
            io: Arc::new(io),
            reaped: AtomicBool::new(false),
            reaped_tx: watch::channel(None).0,
            exit: watch::channel(None).0,
        });
        let p = process.clone();
        tokio::spawn(async move {
            let status = match status.await {
                Ok(status) => status.code(),
                // The reaper dropped our waiter: it stopped, and the agent
                // with it. Report what shells report for "unknown".
                Err(_) => 255,
            };
            let exit = Exit {
                status,
                at: SystemTime::now(),
            };
            p.reaped.store(true, Ordering::SeqCst);
            tracing::debug!(pid = p.pid.as_raw(), exec = ?p.exec_id, status, "process exited");
            p.reaped_tx.send_replace(Some(exit));
            on_reaped(exit);
            p.io.outputs_finished().await;
            p.exit.send_replace(Some(exit));
        });
        process
    }

    pub fn has_exited(&self) -> bool {
        self.reaped.load(Ordering::SeqCst)
    }

    /// Waits until the process is reaped (its output may still be flowing).
    pub async fn reaped(&self) -> Exit {
        wait(&self.reaped_tx).await
    }

    /// Waits until the process exited and its output streams finished.
    pub async fn wait(&self) -> Exit {
        wait(&self.exit).await
    }

    /// Signals the process unless it was already reaped (its pid may belong
    /// to someone else then): that is not an error.
    pub fn signal(&self, signal: Signal) -> nix::Result<()> {
        if self.has_exited() {
            return Ok(());
        }
        match kill(self.pid, signal) {
            Err(nix::errno::Errno::ESRCH) => Ok(()),
            other => other,
        }
    }
}

async fn wait(tx: &watch::Sender<Option<Exit>>) -> Exit {
    let mut rx = tx.subscribe();
    loop {
        if let Some(exit) = *rx.borrow_and_update() {
            return exit;
        }
        // The sender lives in the Process we borrow: it cannot close.
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}
