//! Reaps every child of the agent (as PID 1 that includes every orphan in
//! the guest) and delivers exact exit statuses to whoever registered for a
//! pid. Unregistered pids are just reaped.
//!
//! The race to avoid: a child that exits before its waiter is registered
//! would be reaped anonymously and its status lost. So spawning happens
//! under [`Reaper::lock`]: while a [`SpawnGuard`] is held the reaper does not
//! call `waitpid`, and the guard registers the new pid before releasing.
//! libcontainer relies on this too: it `waitpid`s its own intermediate
//! process while the guard is held.
//!
//! A guard may be held for seconds (creating a container in a nested-KVM
//! guest) on a blocking thread, so the reaper never blocks on it: it skips
//! that round and reaps again when the guard is dropped.
//!
//! Do not use `tokio::process` (or anything else that waits on its own
//! children) in the agent: `waitpid(-1)` here would take their statuses.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use husk_util::sync::lock;
use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{oneshot, Notify};

/// How a process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    Exited(i32),
    Signaled { signal: i32, core_dumped: bool },
}

impl ExitStatus {
    /// Shell convention, as containerd reports it: the exit code, or
    /// 128 + signal number.
    pub fn code(self) -> i32 {
        match self {
            ExitStatus::Exited(code) => code,
            ExitStatus::Signaled { signal, .. } => 128 + signal,
        }
    }
}

type Table = HashMap<Pid, oneshot::Sender<ExitStatus>>;

#[derive(Clone, Default)]
pub struct Reaper {
    waiters: Arc<Mutex<Table>>,
    /// Signalled when a [`SpawnGuard`] is dropped.
    released: Arc<Notify>,
}

/// Holds off reaping; see the module docs.
pub struct SpawnGuard<'a> {
    /// `None` only inside `drop`.
    table: Option<MutexGuard<'a, Table>>,
    released: &'a Notify,
}

impl SpawnGuard<'_> {
    /// Registers interest in `pid`'s exit status. Registering a pid twice
    /// replaces the earlier waiter (whose receiver then sees an error).
    pub fn register(&mut self, pid: Pid) -> oneshot::Receiver<ExitStatus> {
        let (tx, rx) = oneshot::channel();
        if let Some(table) = self.table.as_mut() {
            table.insert(pid, tx);
        }
        rx
    }
}

impl Drop for SpawnGuard<'_> {
    fn drop(&mut self) {
        // Unlock first: the reaper may run as soon as it is notified.
        drop(self.table.take());
        self.released.notify_one();
    }
}

impl Reaper {
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes the table: spawn, then [`SpawnGuard::register`], then drop.
    /// Blocks while another guard is held: call it off the async runtime.
    pub fn lock(&self) -> SpawnGuard<'_> {
        SpawnGuard {
            table: Some(lock(&self.waiters)),
            released: &self.released,
        }
    }

    /// Reaps every child that has exited; returns how many, or `None` when
    /// a [`SpawnGuard`] is held (nothing is reaped then).
    pub fn reap(&self) -> Option<usize> {
        let mut table = match self.waiters.try_lock() {
            Ok(table) => table,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        let mut reaped = 0;
        loop {
            let (pid, status) = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, ExitStatus::Exited(code)),
                Ok(WaitStatus::Signaled(pid, sig, core_dumped)) => (
                    pid,
                    ExitStatus::Signaled {
                        signal: sig as i32,
                        core_dumped,
                    },
                ),
                // Stopped/continued are only reported when asked for.
                Ok(WaitStatus::StillAlive) => break,
                Ok(_) => continue,
                Err(Errno::EINTR) => continue,
                // ECHILD: no children at all.
                Err(_) => break,
            };
            reaped += 1;
            match table.remove(&pid) {
                Some(waiter) => {
                    tracing::debug!(pid = pid.as_raw(), ?status, "child exited");
                    // The waiter may have given up; nothing to do then.
                    let _ = waiter.send(status);
                }
                None => tracing::debug!(pid = pid.as_raw(), ?status, "reaped orphan"),
            }
        }
        Some(reaped)
    }

    /// Reaps on every SIGCHLD, forever. Fails only if the signal handler
    /// cannot be installed.
    pub async fn run(self) -> std::io::Result<()> {
        let mut sigchld = signal(SignalKind::child())?;
        loop {
            // First round: children that exited before the handler was in
            // place. A held guard means: again once it is dropped (its
            // notification is stored if it comes before we wait).
            while self.reap().is_none() {
                self.released.notified().await;
            }
            if sigchld.recv().await.is_none() {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;
    use std::time::Duration;

    // The reaper under test is what waits for these children.
    #[allow(clippy::zombie_processes)]
    fn spawn(reaper: &Reaper, script: &str) -> (Pid, oneshot::Receiver<ExitStatus>) {
        let mut guard = reaper.lock();
        let child = Command::new("/bin/sh")
            .args(["-c", script])
            .spawn()
            .unwrap();
        let pid = Pid::from_raw(i32::try_from(child.id()).unwrap());
        (pid, guard.register(pid))
    }

    /// One test on purpose: `waitpid(-1)` takes any child of this process,
    /// so reaper tests must not run concurrently with each other (and no
    /// other test in this crate spawns children).
    #[tokio::test(flavor = "current_thread")]
    #[allow(clippy::zombie_processes)]
    async fn delivers_exact_statuses_and_reaps_strangers() {
        let reaper = Reaper::new();
        let task = tokio::spawn(reaper.clone().run());

        let (_, exited) = spawn(&reaper, "exit 3");
        let (_, killed) = spawn(&reaper, "kill -TERM $$; sleep 5");
        // Exits at once: without the guard it could be reaped before it
        // was registered; with it, the status must still arrive.
        let (_, quick) = spawn(&reaper, "exit 0");
        let stranger = Command::new("/bin/sh")
            .args(["-c", "exit 7"])
            .spawn()
            .unwrap();
        let stranger = Pid::from_raw(i32::try_from(stranger.id()).unwrap());

        let wait = |rx| tokio::time::timeout(Duration::from_secs(10), rx);
        let exited = wait(exited).await.unwrap().unwrap();
        assert_eq!(exited, ExitStatus::Exited(3));
        assert_eq!(exited.code(), 3);
        let killed = wait(killed).await.unwrap().unwrap();
        assert_eq!(
            killed,
            ExitStatus::Signaled {
                signal: libc_sigterm(),
                core_dumped: false
            }
        );
        assert_eq!(killed.code(), 128 + libc_sigterm());
        assert_eq!(wait(quick).await.unwrap().unwrap(), ExitStatus::Exited(0));

        // The unregistered child is reaped too: no zombie is left behind.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let state = std::fs::read_to_string(format!("/proc/{stranger}/stat"));
            match state {
                Err(_) => break, // gone: reaped
                Ok(_) if std::time::Instant::now() > deadline => panic!("{stranger} not reaped"),
                Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }

        // A guard held on another thread (as around a container build)
        // holds back reaping without blocking the runtime; the status still
        // arrives once it is dropped.
        let (release, released) = std::sync::mpsc::channel::<()>();
        let holder = {
            let reaper = reaper.clone();
            std::thread::spawn(move || {
                let mut guard = reaper.lock();
                let child = Command::new("/bin/sh")
                    .args(["-c", "exit 9"])
                    .spawn()
                    .unwrap();
                let rx = guard.register(Pid::from_raw(i32::try_from(child.id()).unwrap()));
                let _ = released.recv();
                drop(guard);
                rx
            })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        // The runtime is not blocked: timers still fire.
        tokio::time::sleep(Duration::from_millis(10)).await;
        release.send(()).unwrap();
        let rx = holder.join().unwrap();
        assert_eq!(wait(rx).await.unwrap().unwrap(), ExitStatus::Exited(9));
        task.abort();
    }

    fn libc_sigterm() -> i32 {
        nix::sys::signal::Signal::SIGTERM as i32
    }
}
