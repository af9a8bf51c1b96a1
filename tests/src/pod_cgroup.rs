//! What kubelet does for a pod with a CPU limit, for tests: a pod cgroup on
//! the host with a CFS quota (cgroup v1's cpu controller, or v2's cpu.max),
//! named as the pods' `cgroup_parent`; the runtime puts the pod's sandbox
//! below it. Reads back the CPU the pod used and which cgroup a process's
//! threads are in; removed on drop.

use std::path::{Path, PathBuf};
use std::time::Duration;

pub struct PodCgroup {
    /// The `cgroup_parent` to give CRI (a cgroupfs path).
    pub parent: String,
    /// The directory holding the CPU limit (v1 cpu, or v2).
    cpu_dir: PathBuf,
    /// The directory holding the CPU usage (v1 cpuacct, or v2).
    acct_dir: PathBuf,
    v2: bool,
}

const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The v1 hierarchy that has `file` (cpu and cpuacct may be mounted
/// together or apart).
fn v1_root_with(file: &str) -> Option<PathBuf> {
    ["cpu,cpuacct", "cpu", "cpuacct"]
        .iter()
        .map(|d| Path::new(CGROUP_ROOT).join(d))
        .find(|p| p.join(file).exists())
}

impl PodCgroup {
    /// A pod cgroup limited to `millicores` of CPU.
    pub fn with_cpu_limit(name: &str, millicores: u64) -> PodCgroup {
        let cgroup = PodCgroup::unlimited(name);
        cgroup.set_cpu_limit(millicores);
        cgroup
    }

    /// A pod cgroup with no CPU limit (yet: [`PodCgroup::set_cpu_limit`]).
    pub fn unlimited(name: &str) -> PodCgroup {
        let parent = format!("/{name}");
        let v2 = Path::new(CGROUP_ROOT).join("cgroup.controllers").exists();
        let (cpu_dir, acct_dir) = if v2 {
            let dir = Path::new(CGROUP_ROOT).join(name);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(
                Path::new(CGROUP_ROOT).join("cgroup.subtree_control"),
                "+cpu",
            )
            .unwrap();
            (dir.clone(), dir)
        } else {
            let root = v1_root_with("cpu.cfs_quota_us").expect("no cgroup v1 cpu controller");
            let dir = root.join(name);
            std::fs::create_dir_all(&dir).unwrap();
            let acct = v1_root_with("cpuacct.usage").expect("no cgroup v1 cpuacct controller");
            let acct_dir = acct.join(name);
            std::fs::create_dir_all(&acct_dir).unwrap();
            (dir, acct_dir)
        };
        PodCgroup {
            parent,
            cpu_dir,
            acct_dir,
            v2,
        }
    }

    /// Limits the pod cgroup to `millicores` of CPU (a CFS quota).
    pub fn set_cpu_limit(&self, millicores: u64) {
        let period: u64 = 100_000;
        let quota = period * millicores / 1000;
        if self.v2 {
            std::fs::write(self.cpu_dir.join("cpu.max"), format!("{quota} {period}")).unwrap();
        } else {
            std::fs::write(self.cpu_dir.join("cpu.cfs_period_us"), period.to_string()).unwrap();
            std::fs::write(self.cpu_dir.join("cpu.cfs_quota_us"), quota.to_string()).unwrap();
        }
    }

    /// CPU time used by everything in the pod cgroup so far.
    pub fn cpu_used(&self) -> Duration {
        if self.v2 {
            let stat = std::fs::read_to_string(self.acct_dir.join("cpu.stat")).unwrap();
            let usec = stat
                .lines()
                .find_map(|l| l.strip_prefix("usage_usec "))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            Duration::from_micros(usec)
        } else {
            let path = self.acct_dir.join("cpuacct.usage");
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let ns = text
                .trim()
                .parse()
                .unwrap_or_else(|e| panic!("{text:?}: {e}"));
            Duration::from_nanos(ns)
        }
    }

    /// Whether every thread of `pid` is in this pod cgroup in the CPU
    /// hierarchy (per /proc/<pid>/task/*/cgroup). Returns the threads that
    /// are not.
    pub fn threads_outside(&self, pid: u32) -> Vec<String> {
        let mut outside = Vec::new();
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
        for task in tasks.flatten() {
            let cgroups = std::fs::read_to_string(task.path().join("cgroup")).unwrap_or_default();
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            let line = cgroups.lines().find(|l| {
                if self.v2 {
                    l.starts_with("0::")
                } else {
                    l.split(':')
                        .nth(1)
                        .is_some_and(|c| c.split(',').any(|c| c == "cpu"))
                }
            });
            let inside = line
                .and_then(|l| l.splitn(3, ':').nth(2))
                .is_some_and(|p| p.starts_with(&format!("{}/", self.parent)));
            if !inside {
                outside.push(format!("{} ({})", comm.trim(), line.unwrap_or("?")));
            }
        }
        outside
    }

    /// Child cgroups still below the pod cgroup (the runtime's, if it
    /// leaked them).
    pub fn children(&self) -> Vec<String> {
        std::fs::read_dir(&self.cpu_dir)
            .map(|d| {
                d.flatten()
                    .filter(|e| e.path().is_dir())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for PodCgroup {
    /// Removes the pod cgroup in every hierarchy (the runtimes create the
    /// path in each), with whatever child cgroups a failed test left (their
    /// processes are gone by now).
    fn drop(&mut self) {
        let mut roots: Vec<PathBuf> = std::fs::read_dir(CGROUP_ROOT)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        roots.push(PathBuf::from(CGROUP_ROOT));
        for root in roots {
            let dir = root.join(self.parent.trim_start_matches('/'));
            if let Ok(children) = std::fs::read_dir(&dir) {
                for child in children.flatten().filter(|c| c.path().is_dir()) {
                    let _ = std::fs::remove_dir(child.path());
                }
            }
            let _ = std::fs::remove_dir(dir);
        }
    }
}
