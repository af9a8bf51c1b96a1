//! The container cgroups (cgroup v2) as the agent reads them: statistics,
//! member processes, signalling all of them, and OOM-kill events.
//!
//! Statistics are read here rather than with libcgroups' `stats()`: that
//! reads every controller's files (PSI, hugetlb, swap, ...) and fails as a
//! whole when one is missing; here each controller the guest lacks just
//! leaves its part unset, and only the files reported are read (every
//! syscall counts in a nested-KVM guest).

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use husk_protocol::agent::{ContainerStats, CpuStats, IoDeviceStats, MemoryStats, PidsStats};
use husk_util::sync::lock;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::Notify;

/// Where cgroup2 is mounted (libcontainer assumes it too).
pub const CGROUP_MOUNT: &str = "/sys/fs/cgroup";

/// `max` in a cgroup file.
pub const UNLIMITED: u64 = u64::MAX;

pub fn dir(cgroups_path: &Path) -> PathBuf {
    Path::new(CGROUP_MOUNT).join(cgroups_path.strip_prefix("/").unwrap_or(cgroups_path))
}

fn read(dir: &Path, file: &str) -> Option<String> {
    std::fs::read_to_string(dir.join(file)).ok()
}

/// `key value` lines (cpu.stat, memory.stat, memory.events).
pub fn flat_keyed(text: &str) -> HashMap<&str, u64> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k, v.trim().parse().ok()?))
        })
        .collect()
}

/// A single number, or `max`.
pub fn single_value(text: &str) -> Option<u64> {
    match text.trim() {
        "max" => Some(UNLIMITED),
        n => n.parse().ok(),
    }
}

/// io.stat: `MAJ:MIN rbytes=.. wbytes=.. rios=.. wios=.. ...` per device.
pub fn io_stat(text: &str) -> Vec<IoDeviceStats> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let (major, minor) = words.next()?.split_once(':')?;
            let mut dev = IoDeviceStats::new();
            dev.major = major.parse().ok()?;
            dev.minor = minor.parse().ok()?;
            for word in words {
                let Some((k, v)) = word.split_once('=') else {
                    continue;
                };
                let v = v.parse().unwrap_or(0);
                match k {
                    "rbytes" => dev.read_bytes = v,
                    "wbytes" => dev.write_bytes = v,
                    "rios" => dev.read_ops = v,
                    "wios" => dev.write_ops = v,
                    _ => {}
                }
            }
            Some(dev)
        })
        .collect()
}

/// Statistics of the cgroup at `dir`; `None` if the cgroup is gone.
pub fn stats(dir: &Path) -> Option<ContainerStats> {
    // cgroup.procs exists in every cgroup, with or without controllers.
    if !dir.join("cgroup.procs").exists() {
        return None;
    }
    let mut stats = ContainerStats::new();
    if let Some(text) = read(dir, "cpu.stat") {
        let kv = flat_keyed(&text);
        let get = |k| kv.get(k).copied().unwrap_or(0);
        let mut cpu = CpuStats::new();
        cpu.usage_usec = get("usage_usec");
        cpu.user_usec = get("user_usec");
        cpu.system_usec = get("system_usec");
        cpu.nr_periods = get("nr_periods");
        cpu.nr_throttled = get("nr_throttled");
        cpu.throttled_usec = get("throttled_usec");
        stats.cpu = Some(cpu).into();
    }
    if let Some(usage) = read(dir, "memory.current").and_then(|t| single_value(&t)) {
        let mut mem = MemoryStats::new();
        mem.usage = usage;
        mem.limit = read(dir, "memory.max")
            .and_then(|t| single_value(&t))
            .unwrap_or(UNLIMITED);
        mem.max_usage = read(dir, "memory.peak")
            .and_then(|t| single_value(&t))
            .unwrap_or(0);
        if let Some(text) = read(dir, "memory.stat") {
            let kv = flat_keyed(&text);
            mem.anon = kv.get("anon").copied().unwrap_or(0);
            mem.file = kv.get("file").copied().unwrap_or(0);
            mem.inactive_file = kv.get("inactive_file").copied().unwrap_or(0);
        }
        if let Some(text) = read(dir, "memory.events") {
            let kv = flat_keyed(&text);
            mem.oom_events = kv.get("oom").copied().unwrap_or(0);
            mem.oom_kill_events = kv.get("oom_kill").copied().unwrap_or(0);
        }
        stats.memory = Some(mem).into();
    }
    if let Some(current) = read(dir, "pids.current").and_then(|t| single_value(&t)) {
        let mut pids = PidsStats::new();
        pids.current = current;
        pids.limit = read(dir, "pids.max")
            .and_then(|t| single_value(&t))
            .unwrap_or(UNLIMITED);
        stats.pids = Some(pids).into();
    }
    if let Some(text) = read(dir, "io.stat") {
        stats.io = io_stat(&text);
    }
    Some(stats)
}

/// The processes in the cgroup at `dir` (it has no sub-cgroups).
pub fn procs(dir: &Path) -> io::Result<Vec<Pid>> {
    let text = std::fs::read_to_string(dir.join("cgroup.procs"))?;
    Ok(text
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .map(Pid::from_raw)
        .collect())
}

/// Sends `signal` to every process in the cgroup at `dir`. SIGKILL goes
/// through cgroup.kill (Linux 5.14+), which also catches processes forked
/// while it runs.
pub fn signal_all(dir: &Path, signal: Signal) -> io::Result<()> {
    if signal == Signal::SIGKILL {
        match std::fs::write(dir.join("cgroup.kill"), "1") {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound && dir.exists() => {}
            Err(e) => return Err(e),
        }
    }
    for pid in procs(dir)? {
        match kill(pid, signal) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// OOM kills not yet handed to a GetOomEvent call, oldest first.
#[derive(Default)]
pub struct OomEvents {
    queue: Mutex<VecDeque<String>>,
    added: Notify,
}

impl OomEvents {
    pub fn push(&self, container_id: &str) {
        lock(&self.queue).push_back(container_id.to_owned());
        self.added.notify_waiters();
    }

    /// The next event. Cancel-safe: an event is only taken when returned.
    pub async fn next(&self) -> String {
        loop {
            let added = self.added.notified();
            tokio::pin!(added);
            // Registered before looking, so a push in between wakes us.
            added.as_mut().enable();
            if let Some(id) = lock(&self.queue).pop_front() {
                return id;
            }
            added.await;
        }
    }
}

/// Reports every increase of `oom_kill` in the cgroup's memory.events as an
/// event for `container_id`, until the cgroup goes away. kernfs wakes
/// pollers of memory.events (POLLPRI) when it changes, so this needs no
/// inotify (the guest kernel has none) and no polling loop. Returns at once
/// when the cgroup has no memory controller (as on hosts with cgroup v1).
pub async fn watch_oom(dir: PathBuf, container_id: String, events: std::sync::Arc<OomEvents>) {
    let path = dir.join("memory.events");
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) => {
            tracing::debug!(
                container = container_id,
                "no OOM events from {}: {e}",
                path.display()
            );
            return;
        }
    };
    // SAFETY: the File owns its descriptor and lives inside the AsyncFd,
    // which never swaps it.
    let fd = match unsafe { AsyncFd::register_with_interest(file, Interest::PRIORITY) } {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!(
                container = container_id,
                "cannot watch {}: {e}",
                path.display()
            );
            return;
        }
    };
    let mut seen = None;
    let mut buf = [0u8; 512];
    loop {
        let kills = match fd.get_ref().read_at(&mut buf, 0) {
            Ok(n) => String::from_utf8_lossy(&buf[..n])
                .lines()
                .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse::<u64>().ok())
                .unwrap_or(0),
            // ENODEV: the cgroup was removed.
            Err(_) => return,
        };
        let before = seen.unwrap_or(kills);
        for _ in before..kills {
            tracing::info!(container = container_id, "OOM kill in the container");
            events.push(&container_id);
        }
        seen = Some(kills);
        match fd.ready(Interest::PRIORITY).await {
            Ok(mut guard) => guard.clear_ready(),
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cgroup_files() {
        let kv = flat_keyed("usage_usec 10\nuser_usec 7\nsystem_usec 3\nbogus\n");
        assert_eq!(kv["usage_usec"], 10);
        assert_eq!(kv.len(), 3);
        assert_eq!(single_value("max\n"), Some(UNLIMITED));
        assert_eq!(single_value("4096\n"), Some(4096));
        assert_eq!(single_value("x"), None);
        let io =
            io_stat("254:0 rbytes=4096 wbytes=8192 rios=1 wios=2 dbytes=0 dios=0\n8:0 rbytes=1\n");
        assert_eq!(io.len(), 2);
        assert_eq!((io[0].major, io[0].minor), (254, 0));
        assert_eq!((io[0].read_bytes, io[0].write_bytes), (4096, 8192));
        assert_eq!((io[0].read_ops, io[0].write_ops), (1, 2));
        assert_eq!(io[1].read_bytes, 1);
    }

    #[test]
    fn stats_leave_missing_controllers_unset() {
        let dir = tempfile::tempdir().unwrap();
        assert!(stats(dir.path()).is_none());
        std::fs::write(dir.path().join("cgroup.procs"), "").unwrap();
        std::fs::write(dir.path().join("memory.current"), "1000\n").unwrap();
        std::fs::write(dir.path().join("memory.max"), "max\n").unwrap();
        std::fs::write(
            dir.path().join("memory.events"),
            "low 0\nhigh 0\nmax 3\noom 2\noom_kill 1\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("memory.stat"),
            "anon 10\nfile 20\ninactive_file 5\n",
        )
        .unwrap();
        let s = stats(dir.path()).unwrap();
        assert!(s.cpu.is_none() && s.pids.is_none() && s.io.is_empty());
        let m = s.memory.unwrap();
        assert_eq!((m.usage, m.limit, m.max_usage), (1000, UNLIMITED, 0));
        assert_eq!((m.anon, m.file, m.inactive_file), (10, 20, 5));
        assert_eq!((m.oom_events, m.oom_kill_events), (2, 1));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn oom_events_wait_for_a_push_and_keep_order() {
        let events = std::sync::Arc::new(OomEvents::default());
        let waiter = tokio::spawn({
            let events = events.clone();
            async move { (events.next().await, events.next().await) }
        });
        tokio::task::yield_now().await;
        events.push("a");
        events.push("b");
        assert_eq!(waiter.await.unwrap(), ("a".into(), "b".into()));
        // A cancelled wait takes nothing.
        let cancelled =
            tokio::time::timeout(std::time::Duration::from_millis(10), events.next()).await;
        assert!(cancelled.is_err());
        events.push("c");
        assert_eq!(events.next().await, "c");
    }
}
