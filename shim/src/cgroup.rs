//! The VM in the pod's cgroup on the host. The shim is the VM: its vCPU
//! threads, device workers and guest RAM. Before the VM starts, the shim
//! process (all its threads, and every thread it starts later) joins the
//! cgroup containerd gave the task that boots the VM: the CRI sandbox's
//! `linux.cgroupsPath`, below the pod cgroup whose limits kubelet sets, or
//! the task's own for `ctr run`. So the pod's CPU and memory limits,
//! accounting and eviction cover the whole VM, whatever the guest does to
//! its own limits inside.
//!
//! Both drivers' path forms (cgroupfs `/a/b/c`, systemd `slice:prefix:name`)
//! and both hierarchies (v1, hybrid, unified v2) are handled by writing
//! cgroupfs directly, as runc's cgroupfs driver does; with the systemd
//! driver the scope is a plain directory, not a unit systemd manages.

use std::path::{Path, PathBuf};

/// Errors joining or leaving the cgroup.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("invalid cgroupsPath {path:?}: {why}")]
    BadPath { path: String, why: String },
    #[error("no cgroup hierarchy is mounted (read {mountinfo})")]
    NoHierarchy { mountinfo: String },
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// The cgroup below a hierarchy's root that `cgroups_path` names.
pub fn relative_path(cgroups_path: &str) -> Result<PathBuf, CgroupError> {
    let bad = |why: &str| CgroupError::BadPath {
        path: cgroups_path.to_string(),
        why: why.to_string(),
    };
    let rel = if cgroups_path.starts_with('/') || !cgroups_path.contains(':') {
        PathBuf::from(cgroups_path.trim_start_matches('/'))
    } else {
        let parts: Vec<&str> = cgroups_path.split(':').collect();
        let [slice, prefix, name] = parts[..] else {
            return Err(bad(
                "expected slice:prefix:name (systemd) or a path (cgroupfs)",
            ));
        };
        let slice = if slice.is_empty() {
            "system.slice"
        } else {
            slice
        };
        let scope = if prefix.is_empty() {
            format!("{name}.scope")
        } else {
            format!("{prefix}-{name}.scope")
        };
        expand_slice(slice).map_err(|why| bad(&why))?.join(scope)
    };
    let plain = rel.components().count() > 0
        && rel
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
    if !plain {
        return Err(bad("not a plain path below the cgroup root"));
    }
    Ok(rel)
}

/// systemd's slice naming: `a-b-c.slice` lives in `a.slice/a-b.slice/`.
fn expand_slice(slice: &str) -> Result<PathBuf, String> {
    let name = slice
        .strip_suffix(".slice")
        .ok_or_else(|| format!("{slice:?} is not a .slice"))?;
    if name == "-" {
        return Ok(PathBuf::new());
    }
    if name.is_empty() || name.contains('/') || name.starts_with('-') || name.contains("--") {
        return Err(format!("{slice:?} is not a valid slice name"));
    }
    let mut path = PathBuf::new();
    let mut prefix = String::new();
    for part in name.split('-') {
        if !prefix.is_empty() {
            prefix.push('-');
        }
        prefix.push_str(part);
        path.push(format!("{prefix}.slice"));
    }
    Ok(path)
}

/// Where each cgroup hierarchy is mounted, from /proc/self/mountinfo:
/// every cgroup (v1) mount and the cgroup2 one. (mount point, is v1 cpuset)
fn hierarchies(mountinfo: &str) -> Vec<(PathBuf, bool)> {
    let mut found = Vec::new();
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let mut right = right.split(' ');
        let fstype = right.next().unwrap_or_default();
        let options = right.nth(1).unwrap_or_default();
        let Some(mount_point) = left.split(' ').nth(4) else {
            continue;
        };
        let cpuset = options.split(',').any(|o| o == "cpuset");
        if fstype == "cgroup" || fstype == "cgroup2" {
            let point = PathBuf::from(mount_point);
            if !found.iter().any(|(p, _)| *p == point) {
                found.push((point, fstype == "cgroup" && cpuset));
            }
        }
    }
    found
}

/// A v1 cpuset cgroup takes no tasks until it has CPUs and memory nodes:
/// a new one gets its parent's.
fn inherit_cpuset(dir: &Path) -> Result<(), CgroupError> {
    let Some(parent) = dir.parent() else {
        return Ok(());
    };
    for file in ["cpuset.cpus", "cpuset.mems"] {
        let mine = dir.join(file);
        let current = std::fs::read_to_string(&mine).unwrap_or_default();
        if current.trim().is_empty() {
            let theirs = std::fs::read_to_string(parent.join(file))
                .map_err(io_err("read", &parent.join(file)))?;
            std::fs::write(&mine, theirs.trim()).map_err(io_err("write", &mine))?;
        }
    }
    Ok(())
}

/// Makes `root/rel` one level at a time (cpuset levels get their parent's
/// CPUs) and returns it.
fn create(root: &Path, rel: &Path, cpuset: bool) -> Result<PathBuf, CgroupError> {
    let mut dir = root.to_path_buf();
    for part in rel.components() {
        dir.push(part);
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err("create", &dir)(e)),
        }
        if cpuset {
            inherit_cpuset(&dir)?;
        }
    }
    Ok(dir)
}

/// The cgroup directories (one per hierarchy) this process joined.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HostCgroup {
    pub dirs: Vec<PathBuf>,
}

impl HostCgroup {
    /// Moves this whole process into `cgroups_path` in every hierarchy.
    pub fn join(cgroups_path: &str) -> Result<HostCgroup, CgroupError> {
        Self::join_at(cgroups_path, Path::new("/proc/self/mountinfo"))
    }

    /// The directories [`HostCgroup::join`] would make for `cgroups_path`
    /// (recorded before the VM starts, so a shim killed during its boot
    /// leaves nothing `shim delete` does not know of).
    pub fn planned_dirs(cgroups_path: &str) -> Result<Vec<PathBuf>, CgroupError> {
        let rel = relative_path(cgroups_path)?;
        let mountinfo = Path::new("/proc/self/mountinfo");
        Ok(Self::roots(mountinfo)?
            .into_iter()
            .map(|(root, _)| root.join(&rel))
            .collect())
    }

    fn roots(mountinfo: &Path) -> Result<Vec<(PathBuf, bool)>, CgroupError> {
        let text = std::fs::read_to_string(mountinfo).map_err(io_err("read", mountinfo))?;
        let roots = hierarchies(&text);
        if roots.is_empty() {
            return Err(CgroupError::NoHierarchy {
                mountinfo: mountinfo.display().to_string(),
            });
        }
        Ok(roots)
    }

    fn join_at(cgroups_path: &str, mountinfo: &Path) -> Result<HostCgroup, CgroupError> {
        let rel = relative_path(cgroups_path)?;
        let roots = Self::roots(mountinfo)?;
        let mut joined = HostCgroup::default();
        let pid = std::process::id().to_string();
        for (root, cpuset) in roots {
            let dir = create(&root, &rel, cpuset)?;
            let procs = dir.join("cgroup.procs");
            // cgroup.procs moves every thread of the process.
            std::fs::write(&procs, &pid).map_err(io_err("join", &procs))?;
            joined.dirs.push(dir);
        }
        tracing::info!(
            "the VM runs in host cgroup {cgroups_path} ({:?})",
            joined.dirs
        );
        Ok(joined)
    }

    /// Moves this process to each hierarchy's root (a parent may have
    /// controllers that forbid member processes) and removes the cgroups.
    pub fn leave_and_remove(&self) {
        let pid = std::process::id().to_string();
        for dir in &self.dirs {
            if let Some(root) = hierarchy_root(dir) {
                let _ = std::fs::write(root.join("cgroup.procs"), &pid);
            }
        }
        for problem in Self::remove(&self.dirs) {
            tracing::warn!("{problem}");
        }
    }

    /// Removes cgroups left by a shim that is gone (`shim delete`).
    /// Removes `dirs`; what could not be removed, each said in a line.
    pub fn remove(dirs: &[PathBuf]) -> Vec<String> {
        let mut problems = Vec::new();
        for dir in dirs {
            if let Err(e) = std::fs::remove_dir(dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    problems.push(format!("cannot remove cgroup {}: {e}", dir.display()));
                }
            }
        }
        problems
    }
}

/// The mount point of the hierarchy `dir` is in.
fn hierarchy_root(dir: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    hierarchies(&text)
        .into_iter()
        .map(|(p, _)| p)
        .filter(|p| dir.starts_with(p))
        .max_by_key(|p| p.components().count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_drivers_path_forms() {
        assert_eq!(
            relative_path("/kubepods/burstable/pod12/abc").unwrap(),
            Path::new("kubepods/burstable/pod12/abc")
        );
        assert_eq!(
            relative_path("/default/t1").unwrap(),
            Path::new("default/t1")
        );
        assert_eq!(
            relative_path("kubepods-burstable-pod12.slice:cri-containerd:abc").unwrap(),
            Path::new(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod12.slice/cri-containerd-abc.scope"
            )
        );
        assert_eq!(
            relative_path(":cri-containerd:abc").unwrap(),
            Path::new("system.slice/cri-containerd-abc.scope")
        );
        for bad in [
            "/",
            "",
            "/a/../../etc",
            "a:b",
            "x.slice:p:n/../../y",
            "bad-:p:n",
            "a--b.slice:p:n",
        ] {
            assert!(relative_path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn finds_v1_and_v2_hierarchies() {
        let mountinfo = "\
25 30 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw,nsdelegate
28 25 0:25 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid - cgroup cgroup rw,cpu,cpuacct
29 25 0:26 / /sys/fs/cgroup/cpuset rw,nosuid - cgroup cgroup rw,cpuset
40 30 0:40 / /proc rw - proc proc rw";
        assert_eq!(
            hierarchies(mountinfo),
            vec![
                (PathBuf::from("/sys/fs/cgroup/unified"), false),
                (PathBuf::from("/sys/fs/cgroup/cpu,cpuacct"), false),
                (PathBuf::from("/sys/fs/cgroup/cpuset"), true),
            ]
        );
    }

    /// Joins a child process's own cgroup path on this host, checks it is
    /// there in every hierarchy, and removes it. Needs root.
    #[test]
    fn a_process_joins_and_leaves_every_hierarchy() {
        if !nix::unistd::geteuid().is_root() {
            assert!(std::env::var_os("CI").is_none(), "CI must run this as root");
            eprintln!("skipped: not root");
            return;
        }
        // In a child, so the test process itself stays where it is.
        let path = format!("/husk-test-{}/leaf", std::process::id());
        let child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "cgroup::tests::join_in_child", "--nocapture"])
            .env("HUSK_CGROUP_TEST_PATH", &path)
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&child.stdout);
        assert!(
            child.status.success(),
            "{out}{}",
            String::from_utf8_lossy(&child.stderr)
        );
        assert!(out.contains("joined"), "{out}");
        for (root, _) in hierarchies(&std::fs::read_to_string("/proc/self/mountinfo").unwrap()) {
            let parent = root.join(format!("husk-test-{}", std::process::id()));
            assert!(!parent.join("leaf").exists(), "{} left", parent.display());
            let _ = std::fs::remove_dir(parent);
        }
    }

    /// Runs in the child of the test above.
    #[test]
    fn join_in_child() {
        let Ok(path) = std::env::var("HUSK_CGROUP_TEST_PATH") else {
            return;
        };
        let cg = HostCgroup::join(&path).unwrap();
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        for line in own.lines() {
            assert!(line.ends_with(path.as_str()), "{line} in {own}");
        }
        assert!(!cg.dirs.is_empty());
        println!("joined {:?}", cg.dirs);
        cg.leave_and_remove();
        for dir in &cg.dirs {
            assert!(!dir.exists());
        }
    }
}
