//! Host path operations under a sandbox directory that cannot be steered.
//! Every path is resolved from an open directory with openat2(2)'s
//! RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS: a symlink
//! (or `..`) anywhere on the way is an error, never a way out. Mounts are
//! made by file descriptor (open_tree/move_mount, or mount(2) on a verified
//! `/proc/self/fd/N`), with their attributes set recursively
//! (mount_setattr) before or right after they appear, and unmounted with
//! UMOUNT_NOFOLLOW. This is the class of Kata's CVE-2020-2026: the guest
//! writes to parts of the share, and the shim must never follow what it
//! planted there.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

const RESOLVE: u64 =
    libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;

// From <linux/mount.h> (the libc crate does not export them for glibc).
const MOUNT_ATTR_RDONLY: u64 = 0x1;
const MOUNT_ATTR_NOSUID: u64 = 0x2;
const MOUNT_ATTR_NODEV: u64 = 0x4;
const OPEN_TREE_CLONE: libc::c_uint = 0x1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
const MOVE_MOUNT_T_EMPTY_PATH: libc::c_uint = 0x40;

/// struct open_how of <linux/openat2.h> (libc's is non-exhaustive).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// struct mount_attr of <linux/mount.h>.
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

fn cstring(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path has a NUL byte"))
}

fn check(rc: libc::c_long) -> io::Result<libc::c_long> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// A descriptor a syscall returned as a long.
fn new_fd(rc: libc::c_long) -> io::Result<RawFd> {
    RawFd::try_from(rc).map_err(|_| io::Error::other(format!("descriptor {rc} out of range")))
}

/// `rel` must be relative and plain (no `..`, no `.`, not empty).
fn plain_relative(rel: &Path) -> io::Result<()> {
    let plain =
        rel.components().count() > 0 && rel.components().all(|c| matches!(c, Component::Normal(_)));
    if plain {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a plain relative path", rel.display()),
        ))
    }
}

/// openat2(dir, rel, flags, mode) resolving beneath `dir` without symlinks.
fn openat2(dir: BorrowedFd<'_>, rel: &Path, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    let path = cstring(rel)?;
    let how = OpenHow {
        flags: u64::try_from(flags | libc::O_CLOEXEC)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?,
        mode: u64::from(mode),
        resolve: RESOLVE,
    };
    // SAFETY: `path` is a NUL-terminated string and `how` a valid open_how of
    // the size passed; both outlive the call. The result is a new fd we own.
    let fd = check(unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            path.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    })?;
    // SAFETY: openat2 returned a new descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(new_fd(fd)?) })
}

/// The path that names `fd` itself: mount(2) given it acts on exactly the
/// inode the fd was opened on, whatever happened to the names since.
pub fn fd_path(fd: &impl AsRawFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// A directory the shim resolves paths beneath.
#[derive(Debug)]
pub struct Beneath {
    fd: OwnedFd,
    path: PathBuf,
}

impl Beneath {
    /// Opens `dir`, which must be a real directory (not a symlink to one).
    pub fn open(dir: &Path) -> io::Result<Self> {
        let path = cstring(dir)?;
        // SAFETY: `path` is NUL-terminated and outlives the call.
        let fd = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            // SAFETY: open returned a new descriptor nothing else owns.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            path: dir.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens `rel` (O_PATH) beneath this directory.
    pub fn open_path(&self, rel: &Path) -> io::Result<OwnedFd> {
        plain_relative(rel)?;
        openat2(self.fd.as_fd(), rel, libc::O_PATH, 0)
    }

    /// Creates the directories of `rel` (0700) that are missing, one at a
    /// time, each beneath the one before; returns the last one (O_PATH).
    pub fn mkdir_all(&self, rel: &Path) -> io::Result<OwnedFd> {
        plain_relative(rel)?;
        let mut dir = openat2(self.fd.as_fd(), Path::new("."), libc::O_PATH, 0)?;
        for name in rel.components() {
            let name = Path::new(name.as_os_str());
            let cname = cstring(name)?;
            // SAFETY: `dir` is an open directory fd and `cname` a
            // NUL-terminated single component; both outlive the call.
            let rc = unsafe { libc::mkdirat(dir.as_raw_fd(), cname.as_ptr(), 0o700) };
            if rc != 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EEXIST) {
                    return Err(e);
                }
            }
            // Whatever is there now must be a directory reached without a
            // symlink.
            dir = openat2(dir.as_fd(), name, libc::O_PATH | libc::O_DIRECTORY, 0)?;
        }
        Ok(dir)
    }

    /// Creates the empty file `rel` (0600) if missing, never truncating or
    /// following a symlink; returns it (O_PATH).
    pub fn create_file(&self, rel: &Path) -> io::Result<OwnedFd> {
        plain_relative(rel)?;
        let parent = match rel.parent().filter(|p| !p.as_os_str().is_empty()) {
            Some(p) => self.mkdir_all(p)?,
            None => openat2(self.fd.as_fd(), Path::new("."), libc::O_PATH, 0)?,
        };
        let name = Path::new(rel.file_name().unwrap_or_default());
        let file = openat2(
            parent.as_fd(),
            name,
            libc::O_CREAT | libc::O_RDONLY | libc::O_NOFOLLOW,
            0o600,
        )?;
        let meta = std::fs::File::from(file.try_clone()?).metadata()?;
        if !meta.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a regular file", rel.display()),
            ));
        }
        Ok(file)
    }
}

/// Mount attributes set on everything husk shares with a guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShareAttrs {
    pub read_only: bool,
}

impl ShareAttrs {
    /// nosuid and nodev always: the host never runs or opens devices from a
    /// guest's share, whatever the guest created there.
    fn mount_attr(self) -> MountAttr {
        let mut set = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV;
        if self.read_only {
            set |= MOUNT_ATTR_RDONLY;
        }
        MountAttr {
            attr_set: set,
            attr_clr: 0,
            propagation: 0,
            userns_fd: 0,
        }
    }
}

/// mount_setattr(fd, "", AT_EMPTY_PATH | AT_RECURSIVE): the mount at `fd`
/// and every mount below it get `attrs`.
pub fn set_attrs_recursive(fd: BorrowedFd<'_>, attrs: ShareAttrs) -> io::Result<()> {
    let attr = attrs.mount_attr();
    // SAFETY: `fd` is an open fd, the empty path is a static NUL-terminated
    // string and `attr` a valid mount_attr of the size passed.
    check(unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_RECURSIVE,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    })
    .map(drop)
}

/// Binds `source` (a host path the spec names; followed as given) onto
/// `target`, recursively, with `attrs` already applied when the mount
/// appears: the tree is cloned detached (open_tree), its attributes set,
/// then attached to the target fd (move_mount).
pub fn bind_by_fd(source: &Path, target: BorrowedFd<'_>, attrs: ShareAttrs) -> io::Result<()> {
    let src = cstring(source)?;
    // SAFETY: `src` is NUL-terminated and outlives the call; the result is a
    // new fd we own.
    let tree = check(unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            src.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | libc::AT_RECURSIVE as libc::c_uint,
        )
    })?;
    // SAFETY: open_tree returned a new descriptor nothing else owns.
    let tree = unsafe { OwnedFd::from_raw_fd(new_fd(tree)?) };
    set_attrs_recursive(tree.as_fd(), attrs)?;
    // SAFETY: both fds are open; the empty paths are static NUL-terminated
    // strings.
    check(unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            target.as_raw_fd(),
            c"".as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH,
        )
    })
    .map(drop)
}

/// Lazily unmounts the mount at `path`, not following a symlink there.
pub fn unmount(path: &Path) -> nix::Result<()> {
    nix::mount::umount2(
        path,
        nix::mount::MntFlags::MNT_DETACH | nix::mount::MntFlags::UMOUNT_NOFOLLOW,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_beneath_and_refuses_symlinks_and_dotdot() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let root = Beneath::open(dir.path()).unwrap();
        root.mkdir_all(Path::new("a/b/c")).unwrap();
        assert!(dir.path().join("a/b/c").is_dir());
        root.create_file(Path::new("a/f")).unwrap();
        std::fs::write(dir.path().join("a/f"), b"data").unwrap();
        root.create_file(Path::new("a/f")).unwrap();
        assert_eq!(
            std::fs::read(dir.path().join("a/f")).unwrap(),
            b"data",
            "not truncated"
        );

        std::os::unix::fs::symlink(outside.path(), dir.path().join("link")).unwrap();
        let target = outside.path().join("victim");
        std::fs::write(&target, b"host file").unwrap();
        std::os::unix::fs::symlink(&target, dir.path().join("flink")).unwrap();
        for bad in ["link/x", "link", "a/../link/x", "../x", "/etc"] {
            assert!(root.mkdir_all(Path::new(bad)).is_err(), "{bad}");
            assert!(root.create_file(Path::new(bad)).is_err(), "{bad}");
        }
        assert!(root.create_file(Path::new("flink")).is_err());
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 1);
        assert_eq!(std::fs::read(&target).unwrap(), b"host file");
        assert!(
            Beneath::open(&dir.path().join("link")).is_err(),
            "root itself a symlink"
        );
    }
}
