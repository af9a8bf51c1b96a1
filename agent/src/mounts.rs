//! Storages (agent.proto `Storage`): filesystems the host asks the guest to
//! mount for the sandbox or a container, e.g. the virtio-fs share.

use std::path::{Path, PathBuf};

use husk_protocol::agent::Storage;
use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::error::{Error, Result};

/// mount(8) option words → flags; others are passed on as data.
fn parse_options(options: &[String]) -> (MsFlags, Option<String>) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for opt in options {
        let (set, clear) = match opt.as_str() {
            "ro" => (MsFlags::MS_RDONLY, MsFlags::empty()),
            "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY),
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty()),
            "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty()),
            "dev" => (MsFlags::empty(), MsFlags::MS_NODEV),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty()),
            "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
            "async" => (MsFlags::empty(), MsFlags::MS_SYNCHRONOUS),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty()),
            "nodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty()),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty()),
            "strictatime" => (MsFlags::MS_STRICTATIME, MsFlags::empty()),
            "bind" => (MsFlags::MS_BIND, MsFlags::empty()),
            "rbind" => (MsFlags::MS_BIND | MsFlags::MS_REC, MsFlags::empty()),
            "defaults" => (MsFlags::empty(), MsFlags::empty()),
            other => {
                data.push(other.to_owned());
                continue;
            }
        };
        flags = (flags | set) & !clear;
    }
    let data = (!data.is_empty()).then(|| data.join(","));
    (flags, data)
}

/// Mounts `storage`, creating its mount point; returns the mount point.
pub fn mount_storage(storage: &Storage) -> Result<PathBuf> {
    let target = Path::new(&storage.mount_point);
    if !target.is_absolute() {
        return Err(Error::InvalidArgument(format!(
            "storage mount point {:?} is not an absolute path",
            storage.mount_point
        )));
    }
    if storage.source.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "storage for {}: empty source",
            storage.mount_point
        )));
    }
    let (mut flags, data) = parse_options(&storage.options);
    if storage.fstype == "bind" {
        flags |= MsFlags::MS_BIND;
    }
    let bind = flags.contains(MsFlags::MS_BIND);
    if bind && !Path::new(&storage.source).is_dir() {
        // A file bind mount needs a file to mount on.
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(|e| mkdir_error(parent, &e))?;
        }
        if !target.exists() {
            std::fs::write(target, b"").map_err(|e| mkdir_error(target, &e))?;
        }
    } else {
        std::fs::create_dir_all(target).map_err(|e| mkdir_error(target, &e))?;
    }
    let fstype = (!bind).then_some(storage.fstype.as_str());
    // A bind mount ignores most flags: they need a remount.
    let first = if bind {
        flags & (MsFlags::MS_BIND | MsFlags::MS_REC)
    } else {
        flags
    };
    mount(
        Some(storage.source.as_str()),
        target,
        fstype,
        first,
        data.as_deref(),
    )
    .map_err(|e| {
        Error::Internal(format!(
            "mount {} ({}) on {}: {e}",
            storage.source, storage.fstype, storage.mount_point
        ))
    })?;
    let rest = flags & !(MsFlags::MS_BIND | MsFlags::MS_REC);
    if bind && !rest.is_empty() {
        if let Err(e) = mount(
            None::<&str>,
            target,
            None::<&str>,
            rest | MsFlags::MS_BIND | MsFlags::MS_REMOUNT,
            None::<&str>,
        ) {
            let _ = umount2(target, MntFlags::MNT_DETACH);
            return Err(Error::Internal(format!(
                "remount bind {} with {:?}: {e}",
                storage.mount_point, storage.options
            )));
        }
    }
    Ok(target.to_path_buf())
}

fn mkdir_error(path: &Path, e: &std::io::Error) -> Error {
    Error::Internal(format!("create mount point {}: {e}", path.display()))
}

/// Mounts all of `storages` in order; on failure unmounts those done.
pub fn mount_all(storages: &[Storage]) -> Result<Vec<PathBuf>> {
    let mut done = Vec::new();
    for storage in storages {
        match mount_storage(storage) {
            Ok(target) => done.push(target),
            Err(e) => {
                unmount_all(&done);
                return Err(e);
            }
        }
    }
    Ok(done)
}

/// Unmounts in reverse order (lazily: a process still using one must not
/// keep the rest mounted). Failures are logged.
pub fn unmount_all(targets: &[PathBuf]) {
    for target in targets.iter().rev() {
        if let Err(e) = umount2(target.as_path(), MntFlags::MNT_DETACH) {
            tracing::warn!("unmount {}: {e}", target.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(o: &[&str]) -> Vec<String> {
        o.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn options_become_flags_and_data() {
        let (flags, data) = parse_options(&opts(&["ro", "nosuid", "size=64m", "mode=755"]));
        assert_eq!(flags, MsFlags::MS_RDONLY | MsFlags::MS_NOSUID);
        assert_eq!(data.as_deref(), Some("size=64m,mode=755"));
        let (flags, data) = parse_options(&opts(&["ro", "rw", "rbind"]));
        assert_eq!(flags, MsFlags::MS_BIND | MsFlags::MS_REC);
        assert_eq!(data, None);
    }

    #[test]
    fn relative_mount_points_are_refused() {
        let mut s = Storage::new();
        s.source = "tmpfs".into();
        s.fstype = "tmpfs".into();
        s.mount_point = "run/x".into();
        assert!(matches!(mount_storage(&s), Err(Error::InvalidArgument(_))));
    }
}
