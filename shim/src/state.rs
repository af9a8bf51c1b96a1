//! What the shim persists in each task's bundle so that `shim delete` (run
//! by containerd after a shim crashed) can clean up: the VM died with the
//! shim process, but mounts and sockets on the host outlive it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

const STATE_FILE: &str = "husk-state.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskState {
    /// The sandbox directory (share, sockets) this task lives in.
    pub sandbox_dir: PathBuf,
    /// This task's directory inside the share.
    pub container_dir: PathBuf,
    /// Whether this task booted the sandbox (its deletion removes it).
    pub owns_sandbox: bool,
    /// The host cgroups the VM ran in (removed with the sandbox).
    #[serde(default)]
    pub cgroup_dirs: Vec<PathBuf>,
}

impl TaskState {
    pub fn save(&self, bundle: &Path) -> std::io::Result<()> {
        let path = bundle.join(STATE_FILE);
        let tmp = bundle.join(format!("{STATE_FILE}.tmp"));
        std::fs::write(&tmp, serde_json::to_vec(self)?)?;
        std::fs::rename(tmp, path)
    }

    pub fn load(bundle: &Path) -> std::io::Result<Option<Self>> {
        match std::fs::read(bundle.join(STATE_FILE)) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Undoes what a crashed shim left for this task; fails naming each
    /// thing it could not undo. containerd also runs `shim delete` after
    /// ordinary deletes of a pod's containers, while the shim and its VM
    /// live on: then there is nothing to undo, and the live VM's share must
    /// not be touched.
    pub fn cleanup(&self) -> Result<(), CleanupError> {
        if crate::sandbox::is_alive(&self.sandbox_dir) {
            return Ok(());
        }
        let mut problems: Vec<String> = crate::rootfs::unmount_all(&self.container_dir)
            .into_iter()
            .map(|(path, e)| format!("cannot unmount {}: {e}", path.display()))
            .collect();
        if let Err(e) = crate::rootfs::remove_unmounted_tree(&self.container_dir) {
            problems.push(e.to_string());
        }
        if self.owns_sandbox {
            problems.extend(crate::sandbox::remove_sandbox_dir(&self.sandbox_dir));
            problems.extend(crate::cgroup::HostCgroup::remove(&self.cgroup_dirs));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(CleanupError(problems))
        }
    }
}

/// What `shim delete` could not undo.
#[derive(Debug, thiserror::Error)]
#[error("cleanup incomplete: {}", .0.join("; "))]
pub struct CleanupError(pub Vec<String>);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_tolerates_absence() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(TaskState::load(dir.path()).unwrap(), None);
        let state = TaskState {
            sandbox_dir: "/run/husk/default/c1".into(),
            container_dir: "/run/husk/default/c1/staging/c1".into(),
            owns_sandbox: true,
            cgroup_dirs: Vec::new(),
        };
        state.save(dir.path()).unwrap();
        assert_eq!(TaskState::load(dir.path()).unwrap(), Some(state));
        std::fs::write(dir.path().join(STATE_FILE), b"{").unwrap();
        assert!(TaskState::load(dir.path()).is_err());
    }

    #[test]
    fn cleanup_leaves_a_live_sandbox_alone() {
        let dir = tempfile::tempdir().unwrap();
        let sandbox = dir.path().join("sb");
        std::fs::create_dir_all(sandbox.join("staging/c1/rootfs")).unwrap();
        let _vmm =
            std::os::unix::net::UnixListener::bind(crate::sandbox::vsock_socket(&sandbox)).unwrap();
        TaskState {
            sandbox_dir: sandbox.clone(),
            container_dir: sandbox.join("staging/c1"),
            owns_sandbox: true,
            cgroup_dirs: Vec::new(),
        }
        .cleanup()
        .unwrap();
        assert!(sandbox.join("staging/c1/rootfs").exists());
    }

    #[test]
    fn cleanup_removes_the_sandbox_it_owns() {
        let dir = tempfile::tempdir().unwrap();
        let sandbox = dir.path().join("sb");
        let container = sandbox.join("staging/c1/rootfs");
        std::fs::create_dir_all(&container).unwrap();
        std::fs::write(sandbox.join("vsock.sock"), b"").unwrap();
        TaskState {
            sandbox_dir: sandbox.clone(),
            container_dir: sandbox.join("staging/c1"),
            owns_sandbox: true,
            cgroup_dirs: Vec::new(),
        }
        .cleanup()
        .unwrap();
        assert!(!sandbox.exists());
    }

    #[test]
    fn cleanup_that_cannot_undo_something_says_what() {
        let dir = tempfile::tempdir().unwrap();
        let sandbox = dir.path().join("sb");
        std::fs::create_dir_all(sandbox.join("staging/c1")).unwrap();
        // Not removable as a cgroup: a directory with a file in it.
        let cgroup = dir.path().join("cg");
        std::fs::create_dir_all(&cgroup).unwrap();
        std::fs::write(cgroup.join("stray"), b"").unwrap();
        let err = TaskState {
            sandbox_dir: sandbox.clone(),
            container_dir: sandbox.join("staging/c1"),
            owns_sandbox: true,
            cgroup_dirs: vec![cgroup.clone()],
        }
        .cleanup()
        .unwrap_err();
        assert!(
            err.to_string()
                .contains(&format!("cannot remove cgroup {}", cgroup.display())),
            "{err}"
        );
        assert!(!sandbox.exists(), "the rest was still cleaned up");
    }
}
