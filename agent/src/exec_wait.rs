//! Start returns once the container's process runs its own program.
//!
//! libcontainer's start only tells the container's init process to go on:
//! it still runs the agent's code (forked from the agent) until its execve.
//! A signal sent meanwhile reaches a PID namespace's init that has no
//! handler, and the kernel drops it: a StopContainer right after
//! StartContainer (kubelet deleting a pod it just started, critest's stop
//! test) then waits out its whole grace period, though the program
//! (busybox `top`, say) handles SIGTERM. runc has the same window, but
//! short; in a guest whose kernel is emulated it lasts long enough to be
//! hit. So start waits, bounded, until the process's executable is no
//! longer the agent's.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::unistd::Pid;

/// How often the wait looks.
const POLL: Duration = Duration::from_millis(1);

/// Which file an executable is (device, inode): `None` when `path` cannot be
/// resolved (the process is gone, or a zombie).
pub fn identity(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// The agent's own executable, which a container's process runs until it
/// execs (read once: it does not change).
pub fn agent_identity() -> Option<(u64, u64)> {
    static AGENT: OnceLock<Option<(u64, u64)>> = OnceLock::new();
    *AGENT.get_or_init(|| identity(Path::new("/proc/self/exe")))
}

/// Waits until `pid`'s executable is not `forked_from` (it exec'd, or it is
/// gone), or `bound` passed. Returns whether it saw the exec (or the end).
pub async fn wait_for_exec(pid: Pid, forked_from: (u64, u64), bound: Duration) -> bool {
    let exe = format!("/proc/{pid}/exe");
    let started = Instant::now();
    loop {
        if identity(Path::new(&exe)) != Some(forked_from) {
            return true;
        }
        if started.elapsed() >= bound {
            return false;
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[tokio::test]
    async fn returns_when_the_process_execs_or_is_gone() {
        let sh = identity(Path::new("/bin/sh")).unwrap();
        // A shell that execs sleep after a while: until then its
        // executable is the shell's.
        let mut child = Command::new("/bin/sh")
            .args(["-c", "sleep 0.3; exec sleep 5"])
            .spawn()
            .unwrap();
        let pid = Pid::from_raw(i32::try_from(child.id()).unwrap());
        assert!(wait_for_exec(pid, sh, Duration::from_secs(30)).await);
        let sleep = identity(Path::new(&format!("/proc/{pid}/exe"))).unwrap();
        assert_ne!(sleep, sh, "returned while the shell still ran");
        child.kill().unwrap();
        child.wait().unwrap();
        // Gone: at once.
        assert!(wait_for_exec(pid, sleep, Duration::from_secs(30)).await);
    }

    #[tokio::test]
    async fn gives_up_at_the_bound() {
        // spawn returns once the child exec'd: its executable stays sleep.
        let mut child = Command::new("sleep").arg("5").spawn().unwrap();
        let pid = Pid::from_raw(i32::try_from(child.id()).unwrap());
        let exe = identity(Path::new(&format!("/proc/{pid}/exe"))).unwrap();
        assert!(!wait_for_exec(pid, exe, Duration::from_millis(50)).await);
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
