//! Host side of the virtio-fs share. The shim builds each container's tree
//! in host-only staging, `<sandbox>/staging/<container>/`: its rootfs at
//! `rootfs`, each host path its spec binds at `mounts/<n>`. The guest sees
//! `<sandbox>/shared/`, a read-only (nosuid, nodev) bind of staging that
//! receives its mounts (a slave): writable only inside a container's rootfs
//! and its read-write volumes, so guest root can neither plant links where
//! the shim works nor fill the host's disk through the share's top level.
//! Every shared mount is nosuid and nodev; read-only binds are read-only all
//! the way down (mount_setattr, AT_RECURSIVE). Paths in staging are
//! resolved without symlinks and mounts made by fd ([`crate::beneath`]).

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use containerd_shim::protos::api::Mount;
use nix::mount::{mount, MsFlags};

use crate::beneath::{self, Beneath, ShareAttrs};
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
    #[error("cannot share {host_path} with the guest (bind mount at {target}): {source}")]
    Bind {
        host_path: PathBuf,
        target: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot unmount {path}: {errno}")]
    Unmount { path: PathBuf, errno: nix::Error },
    #[error("{path} still has mounts below it ({mounts:?}): not removed")]
    StillMounted { path: PathBuf, mounts: Vec<PathBuf> },
    #[error("cannot prepare {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Makes `staging` (host-only) and `shared` (what the VMM serves): staging
/// becomes a mount of its own peer group, shared a read-only, nosuid, nodev
/// slave bind of it, so mounts made in staging appear in shared with their
/// own flags, and nothing made in shared (there is nothing: it is
/// read-only) flows back. Both directories must be new and empty.
pub fn prepare_share(staging: &Path, shared: &Path) -> Result<(), RootfsError> {
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |errno: nix::Error| RootfsError::Io {
            path,
            source: std::io::Error::from(errno),
        }
    };
    let none = None::<&str>;
    mount(Some(staging), staging, none, MsFlags::MS_BIND, none).map_err(err(staging))?;
    // Private first: a bind in /run joins /run's peer group otherwise, and
    // would propagate to every namespace that shares it.
    mount(none, staging, none, MsFlags::MS_PRIVATE, none).map_err(err(staging))?;
    mount(none, staging, none, MsFlags::MS_SHARED, none).map_err(err(staging))?;
    mount(Some(staging), shared, none, MsFlags::MS_BIND, none).map_err(err(shared))?;
    mount(none, shared, none, MsFlags::MS_SLAVE, none).map_err(err(shared))?;
    let ro = MsFlags::MS_BIND
        | MsFlags::MS_REMOUNT
        | MsFlags::MS_RDONLY
        | MsFlags::MS_NOSUID
        | MsFlags::MS_NODEV;
    mount(none, shared, none, ro, none).map_err(err(shared))?;
    Ok(())
}

/// The host directories of one container in staging.
pub struct ContainerDirs {
    pub root: PathBuf,
    pub rootfs: PathBuf,
    pub mounts: PathBuf,
    /// `root` relative to staging.
    rel: PathBuf,
}

impl ContainerDirs {
    pub fn new(staging_dir: &Path, container_id: &str) -> Self {
        let root = staging_dir.join(container_id);
        Self {
            rootfs: root.join("rootfs"),
            mounts: root.join("mounts"),
            root,
            rel: PathBuf::from(container_id),
        }
    }
}

/// Mounts the rootfs containerd prepared: its mounts (e.g. an overlay
/// snapshot), or `<bundle>/rootfs` when containerd mounted it already.
pub async fn mount_rootfs(
    container_id: &str,
    bundle: &Path,
    mounts: &[Mount],
    staging: &Beneath,
    dirs: &ContainerDirs,
) -> Result<(), RootfsError> {
    let rel = dirs.rel.join("rootfs");
    let fail = |message: String| RootfsError::Rootfs {
        container: container_id.to_string(),
        target: dirs.rootfs.clone(),
        message,
    };
    staging
        .mkdir_all(&rel)
        .map_err(|e| fail(format!("creating it: {e}")))?;
    let rw = ShareAttrs { read_only: false };
    if mounts.is_empty() {
        let source = bundle.join("rootfs");
        let target = staging.open_path(&rel).map_err(|e| fail(e.to_string()))?;
        return beneath::bind_by_fd(&source, target.as_fd(), rw).map_err(|e| fail(e.to_string()));
    }
    for m in mounts {
        // Each mount goes on whatever is at the target now (the one before).
        let target = staging.open_path(&rel).map_err(|e| fail(e.to_string()))?;
        containerd_shim::util::mount_rootfs(m, beneath::fd_path(&target))
            .await
            .map_err(|e| fail(format!("{} mount of {}: {e}", m.type_, m.source)))?;
    }
    let mounted = staging.open_path(&rel).map_err(|e| fail(e.to_string()))?;
    beneath::set_attrs_recursive(mounted.as_fd(), rw)
        .map_err(|e| fail(format!("setting nosuid,nodev: {e}")))
}

/// Shares the host paths a spec binds.
pub fn share_binds(
    binds: &[SharedBind],
    staging: &Beneath,
    dirs: &ContainerDirs,
) -> Result<(), RootfsError> {
    for b in binds {
        let rel = dirs.rel.join("mounts").join(b.index.to_string());
        let target_path = staging.path().join(&rel);
        let err = |source: std::io::Error| RootfsError::Bind {
            host_path: b.host_source.clone(),
            target: target_path.clone(),
            source,
        };
        let meta = std::fs::metadata(&b.host_source).map_err(err)?;
        let target = if meta.is_dir() {
            staging.mkdir_all(&rel)
        } else {
            staging.create_file(&rel)
        }
        .map_err(err)?;
        let attrs = ShareAttrs {
            read_only: b.read_only,
        };
        beneath::bind_by_fd(&b.host_source, target.as_fd(), attrs).map_err(err)?;
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
        if let Err(e) = beneath::unmount(&target) {
            if e != nix::Error::EINVAL && e != nix::Error::ENOENT {
                failures.push((target, e));
            }
        }
    }
    failures
}

/// Removes `dir` and everything in it, but only once nothing is mounted
/// below it: removing through a mount would delete the files of a host
/// volume (or a snapshot) instead of the shim's own directories.
pub fn remove_unmounted_tree(dir: &Path) -> Result<(), RootfsError> {
    let left = mounts_under(dir);
    if !left.is_empty() {
        return Err(RootfsError::StillMounted {
            path: dir.to_path_buf(),
            mounts: left,
        });
    }
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(RootfsError::Io {
            path: dir.to_path_buf(),
            source: e,
        }),
    }
}

/// Unmounts a container's files and removes its directories.
pub fn remove_container(dirs: &ContainerDirs) -> Result<(), RootfsError> {
    if let Some((path, errno)) = unmount_all(&dirs.root).into_iter().next() {
        return Err(RootfsError::Unmount { path, errno });
    }
    remove_unmounted_tree(&dirs.root)
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

    /// Root is needed for mounts; the shim runs as root, and CI must too.
    fn root_or_skip() -> bool {
        if nix::unistd::geteuid().is_root() {
            return true;
        }
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run the mount tests as root"
        );
        eprintln!("skipped: not root");
        false
    }

    /// A sandbox directory with staging and shared as Sandbox::boot makes
    /// them; unmounts whatever is left on drop.
    struct Share {
        dir: tempfile::TempDir,
        staging: Beneath,
    }

    impl Share {
        fn new() -> Share {
            let dir = tempfile::tempdir().unwrap();
            for d in ["staging", "shared"] {
                std::fs::create_dir(dir.path().join(d)).unwrap();
            }
            prepare_share(&dir.path().join("staging"), &dir.path().join("shared")).unwrap();
            let staging = Beneath::open(&dir.path().join("staging")).unwrap();
            Share { dir, staging }
        }

        fn shared(&self, rel: &str) -> PathBuf {
            self.dir.path().join("shared").join(rel)
        }
    }

    impl Drop for Share {
        fn drop(&mut self) {
            unmount_all(self.dir.path());
        }
    }

    fn errno(r: std::io::Result<()>) -> Option<i32> {
        r.err().and_then(|e| e.raw_os_error())
    }

    /// Mounts that are not at or below `dir`, from mountinfo.
    fn mounts_outside(dir: &Path) -> Vec<PathBuf> {
        mounts_under(Path::new("/"))
            .into_iter()
            .filter(|m| !m.starts_with(dir))
            .collect()
    }

    /// What the guest sees: read-only everywhere but a container's rootfs
    /// and its read-write volumes; read-only volumes read-only all the way
    /// down (a submount too); no device opens through the share; cleanup
    /// takes every mount (and its propagated copy) away.
    #[tokio::test]
    async fn the_guests_view_is_read_only_but_rootfs_and_rw_volumes() {
        if !root_or_skip() {
            return;
        }
        let share = Share::new();
        let host = tempfile::tempdir().unwrap();
        let ro_dir = host.path().join("ro");
        std::fs::create_dir_all(ro_dir.join("sub")).unwrap();
        let none = None::<&str>;
        mount(
            Some("tmpfs"),
            &ro_dir.join("sub"),
            Some("tmpfs"),
            MsFlags::empty(),
            none,
        )
        .unwrap();
        std::fs::write(host.path().join("file"), b"data").unwrap();
        let bundle = host.path().join("bundle");
        std::fs::create_dir_all(bundle.join("rootfs")).unwrap();

        let dirs = ContainerDirs::new(share.staging.path(), "c1");
        mount_rootfs("c1", &bundle, &[], &share.staging, &dirs)
            .await
            .unwrap();
        let binds = [
            SharedBind {
                index: 0,
                host_source: ro_dir.clone(),
                read_only: true,
            },
            SharedBind {
                index: 1,
                host_source: host.path().join("file"),
                read_only: false,
            },
        ];
        share_binds(&binds, &share.staging, &dirs).unwrap();

        let erofs = Some(libc::EROFS);
        assert_eq!(errno(std::fs::write(share.shared("top"), b"x")), erofs);
        assert_eq!(errno(std::fs::create_dir(share.shared("c2"))), erofs);
        assert_eq!(errno(std::fs::create_dir(share.shared("c1/other"))), erofs);
        assert_eq!(
            errno(std::os::unix::fs::symlink(
                "/etc",
                share.shared("c1/mounts/2")
            )),
            erofs
        );
        std::fs::write(share.shared("c1/rootfs/written"), b"guest").unwrap();
        assert_eq!(
            std::fs::read(bundle.join("rootfs/written")).unwrap(),
            b"guest"
        );
        assert_eq!(
            errno(std::fs::write(share.shared("c1/mounts/0/new"), b"x")),
            erofs
        );
        assert_eq!(
            errno(std::fs::write(share.shared("c1/mounts/0/sub/new"), b"x")),
            erofs,
            "a submount of a read-only volume is read-only too"
        );
        std::fs::write(share.shared("c1/mounts/1"), b"changed").unwrap();
        assert_eq!(std::fs::read(host.path().join("file")).unwrap(), b"changed");
        // A device node the guest made in its rootfs does not open on the
        // host (nodev): /dev/null's numbers here.
        let node = share.shared("c1/rootfs/null");
        nix::sys::stat::mknod(
            &node,
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o666),
            nix::sys::stat::makedev(1, 3),
        )
        .unwrap();
        let opened = std::fs::File::open(&node).map(drop);
        assert_eq!(errno(opened), Some(libc::EACCES), "nodev");

        remove_container(&dirs).unwrap();
        assert!(!dirs.root.exists());
        assert!(!share.shared("c1").exists());
        assert_eq!(
            mounts_under(share.dir.path()).len(),
            2,
            "staging and shared only"
        );
        assert!(
            host.path().join("file").exists(),
            "the host's files survive"
        );
        nix::mount::umount2(&ro_dir.join("sub"), nix::mount::MntFlags::MNT_DETACH).unwrap();
    }

    /// Every path the shim creates, mounts or unmounts for a container,
    /// replaced beforehand by a symlink to a directory or a file outside the
    /// sandbox: each operation fails, and outside nothing is created,
    /// truncated or mounted.
    #[tokio::test]
    async fn planted_symlinks_never_lead_outside_the_sandbox() {
        if !root_or_skip() {
            return;
        }
        let outside = tempfile::tempdir().unwrap();
        let victim_dir = outside.path().join("dir");
        std::fs::create_dir(&victim_dir).unwrap();
        let victim_file = outside.path().join("file");
        std::fs::write(&victim_file, b"host data").unwrap();
        let host = tempfile::tempdir().unwrap();
        std::fs::create_dir(host.path().join("vol")).unwrap();
        std::fs::write(host.path().join("f"), b"volume").unwrap();
        let bundle = host.path().join("bundle");
        std::fs::create_dir_all(bundle.join("rootfs")).unwrap();
        let before = mounts_outside(Path::new("/nonexistent"));

        let planted = [
            ("c1", &victim_dir),
            ("c1/rootfs", &victim_dir),
            ("c1/mounts", &victim_dir),
            ("c1/mounts/0", &victim_dir),
            ("c1/mounts/1", &victim_file),
        ];
        for (at, to) in planted {
            let share = Share::new();
            let path = share.staging.path().join(at);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::os::unix::fs::symlink(to, &path).unwrap();
            let dirs = ContainerDirs::new(share.staging.path(), "c1");
            let rootfs = mount_rootfs("c1", &bundle, &[], &share.staging, &dirs).await;
            let binds = [
                SharedBind {
                    index: 0,
                    host_source: host.path().join("vol"),
                    read_only: false,
                },
                SharedBind {
                    index: 1,
                    host_source: host.path().join("f"),
                    read_only: false,
                },
            ];
            let shared = share_binds(&binds, &share.staging, &dirs);
            assert!(
                rootfs.is_err() || shared.is_err(),
                "a symlink at {at} was followed"
            );
            let _ = remove_container(&dirs);
            assert_eq!(
                mounts_outside(share.dir.path()),
                before,
                "a mount appeared outside the sandbox (symlink at {at})"
            );
        }
        assert_eq!(std::fs::read_dir(&victim_dir).unwrap().count(), 0);
        assert_eq!(std::fs::read(&victim_file).unwrap(), b"host data");
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 2);
    }

    /// A tree with a mount left in it is not removed: that would delete the
    /// mounted host files.
    #[test]
    fn a_tree_with_a_mount_left_is_not_removed() {
        if !root_or_skip() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let host = tempfile::tempdir().unwrap();
        std::fs::write(host.path().join("precious"), b"x").unwrap();
        let target = dir.path().join("tree/vol");
        std::fs::create_dir_all(&target).unwrap();
        let none = None::<&str>;
        mount(Some(host.path()), &target, none, MsFlags::MS_BIND, none).unwrap();
        let e = remove_unmounted_tree(&dir.path().join("tree")).unwrap_err();
        assert!(matches!(e, RootfsError::StillMounted { .. }), "{e}");
        assert!(host.path().join("precious").exists());
        nix::mount::umount2(&target, nix::mount::MntFlags::MNT_DETACH).unwrap();
        remove_unmounted_tree(&dir.path().join("tree")).unwrap();
    }
}
