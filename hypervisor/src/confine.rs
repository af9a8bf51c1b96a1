//! Least privilege for the threads that serve a guest, beyond their seccomp
//! filters (seccomp.rs): a thread can give up the capabilities it does not
//! need ([`keep_only_capabilities`]: Linux keeps capability sets per
//! thread), and the virtio-fs worker confines its file access to the share
//! with Landlock ([`restrict_files_to`]: also per thread). Both are
//! one-way: nothing the thread runs later gets them back.

use std::path::{Path, PathBuf};

use caps::{CapSet, Capability, CapsHashSet};
use landlock::{
    Access, AccessFs, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus,
    ABI,
};

/// Errors confining a thread.
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    #[error("cannot set this thread's {set:?} capabilities: {source}")]
    Capabilities {
        set: CapSet,
        #[source]
        source: caps::errors::CapsError,
    },
    #[error("cannot confine file access to {path}: {source}")]
    Landlock {
        path: PathBuf,
        #[source]
        source: landlock::RulesetError,
    },
    #[error("cannot open {path} for Landlock: {source}")]
    LandlockPath {
        path: PathBuf,
        #[source]
        source: landlock::PathFdError,
    },
}

/// How far [`restrict_files_to`] could go on this kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileConfinement {
    /// Every file access right this build knows is confined.
    Full,
    /// The kernel knows only some of them (an older Landlock ABI).
    Partial,
    /// No Landlock (kernel before 5.13, or not enabled): not confined.
    Unavailable,
}

/// The Landlock ABI this build asks for (newer kernels' extra rights are
/// used when there; older ones degrade to [`FileConfinement::Partial`]).
const LANDLOCK_ABI: ABI = ABI::V3;

/// Confines the calling thread's file system access to `dir` and below:
/// opening, creating, renaming, linking, truncating anything else fails
/// with EACCES. Descriptors opened before keep working.
pub fn restrict_files_to(dir: &Path) -> Result<FileConfinement, ConfineError> {
    let all = AccessFs::from_all(LANDLOCK_ABI);
    let landlock = |source| ConfineError::Landlock {
        path: dir.to_path_buf(),
        source,
    };
    let beneath = PathFd::new(dir).map_err(|source| ConfineError::LandlockPath {
        path: dir.to_path_buf(),
        source,
    })?;
    let status = Ruleset::default()
        .handle_access(all)
        .map_err(landlock)?
        .create()
        .map_err(landlock)?
        .add_rule(PathBeneath::new(beneath, all))
        .map_err(landlock)?
        .restrict_self()
        .map_err(landlock)?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => FileConfinement::Full,
        RulesetStatus::PartiallyEnforced => FileConfinement::Partial,
        RulesetStatus::NotEnforced => FileConfinement::Unavailable,
    })
}

/// Drops every capability of the calling thread but `keep`, from its
/// effective, permitted and inheritable sets (the bounding set is left to
/// the process: dropping from it needs CAP_SETPCAP, which a thread that
/// kept nothing no longer has, and nothing here execs).
pub fn keep_only_capabilities(keep: &[Capability]) -> Result<(), ConfineError> {
    let keep: CapsHashSet = keep.iter().copied().collect();
    // Effective first: it must stay a subset of permitted.
    for set in [CapSet::Effective, CapSet::Inheritable, CapSet::Permitted] {
        let current =
            caps::read(None, set).map_err(|source| ConfineError::Capabilities { set, source })?;
        let wanted: CapsHashSet = current.intersection(&keep).copied().collect();
        caps::set(None, set, &wanted)
            .map_err(|source| ConfineError::Capabilities { set, source })?;
    }
    Ok(())
}

/// What the virtio-fs worker needs to serve a guest's root on the host's
/// files: its own file ownership and permission rules are enforced by the
/// worker acting for the guest, so it keeps the capabilities that let a
/// root-owned process create, chown and chmod any file of the share, and
/// switch its credentials per request.
pub const FS_WORKER_CAPABILITIES: &[Capability] = &[
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_DAC_READ_SEARCH,
    Capability::CAP_FOWNER,
    Capability::CAP_FSETID,
    Capability::CAP_MKNOD,
    Capability::CAP_SETGID,
    Capability::CAP_SETUID,
    Capability::CAP_SETFCAP,
    Capability::CAP_LINUX_IMMUTABLE,
];

/// The virtio-fs worker's confinement: file access beneath `share` only
/// (Landlock; a kernel without it is logged once per worker and served
/// unconfined, since refusing would make husk unusable there) and only
/// [`FS_WORKER_CAPABILITIES`].
pub fn confine_fs_worker(share: &Path) -> std::io::Result<()> {
    match restrict_files_to(share).map_err(std::io::Error::other)? {
        FileConfinement::Full => {}
        FileConfinement::Partial => tracing::info!(
            "virtio-fs: Landlock confines {} partly (an older kernel ABI)",
            share.display()
        ),
        FileConfinement::Unavailable => tracing::warn!(
            "virtio-fs: no Landlock on this kernel: the worker's file access is \
             not confined to {}",
            share.display()
        ),
    }
    keep_only_capabilities(FS_WORKER_CAPABILITIES).map_err(std::io::Error::other)
}

/// A net or vsock worker's confinement: no capability (their tap and
/// sockets are open already; new host connections go to root-owned
/// sockets the process owns).
pub fn confine_device_worker() -> std::io::Result<()> {
    keep_only_capabilities(&[]).map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn in_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::spawn(f).join().unwrap()
    }

    #[test]
    fn a_thread_confined_to_a_dir_opens_nothing_outside_it() {
        let root = tempfile::tempdir().unwrap();
        let share = root.path().join("share");
        std::fs::create_dir(&share).unwrap();
        std::fs::write(root.path().join("outside"), b"secret").unwrap();
        let (share_in, outside) = (share.clone(), root.path().join("outside"));
        let (status, inside_ok, outside_err, escape_err) = in_thread(move || {
            let status = restrict_files_to(&share_in).unwrap();
            let inside = std::fs::write(share_in.join("file"), b"ok").is_ok()
                && std::fs::rename(share_in.join("file"), share_in.join("moved")).is_ok();
            let outside = std::fs::read(&outside).map(drop).unwrap_err();
            let escape = std::fs::write(share_in.join("../planted"), b"x").unwrap_err();
            (status, inside, outside.kind(), escape.kind())
        });
        if status == FileConfinement::Unavailable {
            assert!(
                std::env::var_os("CI").is_none(),
                "Landlock is not available on this kernel"
            );
            eprintln!("skipped: no Landlock");
            return;
        }
        assert!(inside_ok, "files beneath the share are served");
        assert_eq!(outside_err, std::io::ErrorKind::PermissionDenied);
        assert_eq!(escape_err, std::io::ErrorKind::PermissionDenied);
        // Other threads are not confined.
        assert_eq!(
            std::fs::read(root.path().join("outside")).unwrap(),
            b"secret"
        );
        assert!(!root.path().join("planted").exists());
    }

    #[test]
    fn a_thread_keeps_only_the_capabilities_it_names() {
        if !caps::has_cap(None, CapSet::Effective, Capability::CAP_SYS_ADMIN).unwrap_or(false) {
            assert!(std::env::var_os("CI").is_none(), "needs root");
            eprintln!("skipped: not root");
            return;
        }
        let (effective, permitted) = in_thread(|| {
            keep_only_capabilities(&[Capability::CAP_CHOWN]).unwrap();
            (
                caps::read(None, CapSet::Effective).unwrap(),
                caps::read(None, CapSet::Permitted).unwrap(),
            )
        });
        let only_chown: CapsHashSet = [Capability::CAP_CHOWN].into_iter().collect();
        assert_eq!(effective, only_chown);
        assert_eq!(permitted, only_chown);
        // This thread (and the process) keep theirs.
        assert!(caps::has_cap(None, CapSet::Effective, Capability::CAP_SYS_ADMIN).unwrap());
    }
}
