//! Host side of the virtio-fs share: each container's rootfs is mounted at
//! `<share>/<container>/rootfs` and each host path its spec binds at
//! `<share>/<container>/mounts/<n>` (read-only binds remounted read-only, so
//! the host kernel enforces them whatever the guest does). The VMM's
//! virtio-fs device serves `<share>` to the guest.

use std::path::{Path, PathBuf};

use containerd_shim::protos::api::Mount;
use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::spec::SharedBind;

/// Errors preparing a container's files.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("cannot mount the rootfs of {container} at {target}: {message}")]
    Rootfs {
        container: String,
        target: PathBuf,
        message: String,
    },
    #[error("cannot share {host_path} with the guest (bind mount at {target}): {errno}")]
    Bind {
        host_path: PathBuf,
        target: PathBuf,
        errno: nix::Error,
    },
    #[error("cannot prepare {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> RootfsError + '_ {
    move |source| RootfsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The host directories of one container inside the share.
pub struct ContainerDirs {
    pub root: PathBuf,
    pub rootfs: PathBuf,
    pub mounts: PathBuf,
}

impl ContainerDirs {
    pub fn new(shared_dir: &Path, container_id: &str) -> Self {
        let root = shared_dir.join(container_id);
        Self {
            rootfs: root.join("rootfs"),
            mounts: root.join("mounts"),
            root,
        }
    }
}

/// Mounts the rootfs containerd prepared: its mounts (e.g. an overlay
/// snapshot), or `<bundle>/rootfs` when containerd mounted it already.
pub async fn mount_rootfs(
    container_id: &str,
    bundle: &Path,
    mounts: &[Mount],
    dirs: &ContainerDirs,
) -> Result<(), RootfsError> {
    std::fs::create_dir_all(&dirs.rootfs).map_err(io_err(&dirs.rootfs))?;
    let fail = |message: String| RootfsError::Rootfs {
        container: container_id.to_string(),
        target: dirs.rootfs.clone(),
        message,
    };
    if mounts.is_empty() {
        let source = bundle.join("rootfs");
        return bind(&source, &dirs.rootfs, false).map_err(|e| fail(e.to_string()));
    }
    for m in mounts {
        containerd_shim::util::mount_rootfs(m, &dirs.rootfs)
            .await
            .map_err(|e| fail(format!("{} mount of {}: {e}", m.type_, m.source)))?;
    }
    Ok(())
}

/// Shares the host paths a spec binds.
pub fn share_binds(binds: &[SharedBind], dirs: &ContainerDirs) -> Result<(), RootfsError> {
    if binds.is_empty() {
        return Ok(());
    }
    std::fs::create_dir_all(&dirs.mounts).map_err(io_err(&dirs.mounts))?;
    for b in binds {
        let target = dirs.mounts.join(b.index.to_string());
        bind(&b.host_source, &target, b.read_only)?;
    }
    Ok(())
}

/// Bind-mounts `source` (file or directory) at `target`, read-only if asked.
fn bind(source: &Path, target: &Path, read_only: bool) -> Result<(), RootfsError> {
    let meta = std::fs::metadata(source).map_err(io_err(source))?;
    if meta.is_dir() {
        std::fs::create_dir_all(target).map_err(io_err(target))?;
    } else {
        std::fs::File::create(target).map_err(io_err(target))?;
    }
    let err = |errno| RootfsError::Bind {
        host_path: source.to_path_buf(),
        target: target.to_path_buf(),
        errno,
    };
    let flags = MsFlags::MS_BIND | MsFlags::MS_REC;
    mount(Some(source), target, None::<&str>, flags, None::<&str>).map_err(err)?;
    // Private: mounts under the share must not propagate back to the host.
    mount(
        None::<&str>,
        target,
        None::<&str>,
        MsFlags::MS_PRIVATE | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(err)?;
    if read_only {
        let ro = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
        if let Err(e) = mount(None::<&str>, target, None::<&str>, ro, None::<&str>) {
            let _ = umount2(target, MntFlags::MNT_DETACH);
            return Err(err(e));
        }
    }
    Ok(())
}

/// Mount points at or below `dir`, deepest first, from /proc/self/mountinfo.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(unescape_mountinfo)
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    found
}

/// mountinfo escapes space, tab, newline and backslash as \ooo.
fn unescape_mountinfo(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut chars = field.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let code: String = chars.by_ref().take(3).collect();
            match u8::from_str_radix(&code, 8) {
                Ok(b) => out.push(b as char),
                Err(_) => {
                    out.push('\\');
                    out.push_str(&code);
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Unmounts everything at or below `dir` (lazily: a guest still holding a
/// file open must not keep the host from cleaning up).
pub fn unmount_all(dir: &Path) -> Vec<(PathBuf, nix::Error)> {
    let mut failures = Vec::new();
    for target in mounts_under(dir) {
        if let Err(e) = umount2(&target, MntFlags::MNT_DETACH) {
            if e != nix::Error::EINVAL && e != nix::Error::ENOENT {
                failures.push((target, e));
            }
        }
    }
    failures
}

/// Unmounts a container's files and removes its directories.
pub fn remove_container(dirs: &ContainerDirs) -> Result<(), RootfsError> {
    if let Some((path, e)) = unmount_all(&dirs.root).into_iter().next() {
        return Err(RootfsError::Bind {
            host_path: path.clone(),
            target: path,
            errno: e,
        });
    }
    match std::fs::remove_dir_all(&dirs.root) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(RootfsError::Io {
            path: dirs.root.clone(),
            source: e,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescapes_mountinfo_paths() {
        assert_eq!(unescape_mountinfo(r"/run/a\040b"), "/run/a b");
        assert_eq!(unescape_mountinfo(r"/x\134y"), r"/x\y");
        assert_eq!(unescape_mountinfo(r"/bad\9"), r"/bad\9");
    }

    /// Needs root (mount); the shim runs as root and so do these tests here.
    #[test]
    fn read_only_binds_are_enforced_and_cleaned_up() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("not root: skipping mount test");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("host");
        std::fs::create_dir_all(&host).unwrap();
        std::fs::write(host.join("file"), b"data").unwrap();
        let share = dir.path().join("share");
        let dirs = ContainerDirs::new(&share, "c1");
        let binds = [
            SharedBind {
                index: 0,
                host_source: host.clone(),
                read_only: true,
            },
            SharedBind {
                index: 1,
                host_source: host.join("file"),
                read_only: false,
            },
        ];
        share_binds(&binds, &dirs).unwrap();
        assert_eq!(std::fs::read(dirs.mounts.join("0/file")).unwrap(), b"data");
        let write = std::fs::write(dirs.mounts.join("0/new"), b"x").unwrap_err();
        assert_eq!(write.raw_os_error(), Some(libc::EROFS));
        std::fs::write(dirs.mounts.join("1"), b"changed").unwrap();
        assert_eq!(std::fs::read(host.join("file")).unwrap(), b"changed");

        assert_eq!(mounts_under(&share).len(), 2);
        remove_container(&dirs).unwrap();
        assert!(mounts_under(&share).is_empty());
        assert!(!dirs.root.exists());
        assert!(
            host.join("file").exists(),
            "the host's files survive cleanup"
        );
    }
}
