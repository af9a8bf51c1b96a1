//! virtio-fs (device ID 26), served in-process by fuse-backend-rs's
//! `PassthroughFs`, the way Dragonball does it: no virtiofsd, no vhost-user.
//!
//! The shim mounts each container's rootfs (and volumes) under one per-pod
//! host directory; this device shares that directory with the guest under a
//! tag (`husk`), and the agent mounts it with `mount -t virtiofs husk <dir>`.
//! One hiprio queue and one request queue, no DAX window, no notification
//! queue. One worker thread (`husk-fs`) serves both queues, one request at a
//! time.
//!
//! # What keeps the guest inside the shared directory
//!
//! The guest is untrusted and this code runs in the shim process, as root.
//! What we rely on from `PassthroughFs` (fuse-backend-rs 0.14, read in its
//! source; the tests here check each point against a real directory):
//!
//! 1. **One component at a time.** Every inode is an `O_PATH` descriptor
//!    opened with `openat(parent, name, O_PATH | O_NOFOLLOW)`. LOOKUP refuses
//!    names containing `/`; the creating operations (and unlink, rename, link)
//!    also refuse `.` and `..`. No name the guest sends is resolved across
//!    more than one directory on the host.
//! 2. **Symlinks are never followed on the host.** A symlink is looked up as
//!    the link itself (`O_NOFOLLOW`); READLINK returns its text and the guest
//!    kernel resolves it in the guest. An absolute link such as
//!    `/etc/passwd` therefore names the guest's file, not the host's.
//! 3. **`..` stops at the root.** LOOKUP(root, `..`) is answered as `.`.
//!    `..` anywhere else yields the parent directory, which is inside the
//!    share; at the root of a mount inside the share (a rootfs or volume)
//!    Linux's own path walk goes to the mountpoint's parent, also inside.
//!    Any path that reaches the root directory again gets the root's node
//!    id, so its `..` is caught too.
//! 4. **Only regular files and directories are opened for I/O**, by
//!    reopening the `O_PATH` descriptor through `/proc/self/fd`. Device
//!    nodes, FIFOs and sockets in the share are never opened on the host
//!    (a FIFO would block the worker; a device node would be a host device).
//! 5. **Creations run as the guest's uid/gid** (per-thread `setresuid`/
//!    `setresgid` syscalls, so the shim's other threads keep root). Reads,
//!    opens and attribute changes run as root: the guest kernel does the
//!    permission checks (virtio-fs mounts use `default_permissions`), so the
//!    guest can read or change anything inside the share, whatever its mode.
//!
//! What husk adds on top (`guard.rs`): read-only shares refuse every change
//! with EROFS; block and character devices cannot be created (overlay
//! whiteouts, char 0:0, can); the host descriptors the guest can make us
//! hold are capped ([`FsOptions::max_host_fds`]), because they come out of
//! the shim's own descriptor table; sizes `PassthroughFs` would allocate
//! from (xattr and readdir buffers) are clamped; every chain is cut to
//! [`MAX_CHAIN_BYTES`] each way, so a guest aliasing its descriptors cannot
//! make the server allocate more than that.
//!
//! What the shim must guarantee (the guest cannot, and we cannot check):
//!
//! - Nothing on the host moves a directory out of the share while the VM
//!   runs: a guest holding that directory could then walk `..` outside.
//!   Mounting and unmounting inside the share is fine.
//! - The share and its ancestors are root-only (0700): the guest can create
//!   setuid-root files and world-writable files in it.
//! - Unmount a rootfs or volume with `umount2(MNT_DETACH)`: the device holds
//!   `O_PATH` descriptors for every inode the guest remembers, so a plain
//!   umount fails with EBUSY until the guest forgets them.
//! - The share directory itself is final when the device is created (a mount
//!   *on* it afterwards is not seen; mounts *inside* it are).
//!
//! Other properties:
//!
//! - `PassthroughFs` sets the umask to 0 when the guest's FUSE_INIT arrives
//!   (so guest modes are kept exactly). The umask is per process unless a
//!   thread unshares its fs context; the worker does (`unshare(CLONE_FS)`)
//!   before serving anything, so the shim's umask never changes.
//! - Mounts made inside the share after the device started are visible:
//!   every LOOKUP opens the name afresh, and `openat` crosses mount points.
//!   A name the guest never looked up shows the mount at once; a name it did
//!   look up shows it once the guest's entry expires (1 s with
//!   [`CachePolicy::Auto`]) and it looks the name up again.
//! - A request that blocks on the host (a hung network file system in a
//!   volume) stalls the device, and [`VirtioDevice::reset`] waits for it.
//! - `PassthroughFs` remembers an inode-number mapping for every distinct
//!   host file the guest ever looked up (tens of bytes each) until the guest
//!   unmounts (FUSE_DESTROY) or the device resets.
//!
//! # Why in-process rather than virtiofsd over vhost-user
//!
//! Measured on this project's development machine (a nested-virtualization
//! guest with 2 busy cores; environment.md), release builds, November 2026:
//!
//! | | in-process (this device) | virtiofsd 1.14 (crates.io) |
//! |---|---|---|
//! | creation to ready | `Fs::new` 4 µs, activation 50–65 µs, first FUSE_INIT answered 60–75 µs after `Fs::new` (medians; the process's first device: ~0.2 ms) | process start to socket listening 2.2–3.1 ms (median of 20), then the vhost-user handshake, with guest RAM as a shared memfd |
//! | memory, share mounted and walked | +0.34–0.40 MB RSS, all private dirty (worker stack and malloc arena, inode and handle maps), first device in the process; a later device reuses freed memory (+8 KiB) | default sandbox: 2 processes, 7.9 MB RSS, 3.2 MB PSS, 0.5 MB private dirty; `--sandbox none`: 1 process, ~4 MB RSS |
//! | per request | ~6 µs round trip on the host (590 requests in 3.5–4 ms) | not measured (no vhost-user frontend here): the same FUSE work in another process, plus eventfd kick and call |
//!
//! How: the in-process numbers are `fs::tests::measure_in_process_cost`
//! (`cargo test --release -p husk-hypervisor --lib measure_in_process_cost
//! -- --ignored --nocapture`): a tree of 201 files, the guest side played by
//! the test, RSS and Private_Dirty from /proc/self. virtiofsd's: started 20
//! times with `--cache auto` on the same tree, time until its socket exists,
//! RSS from /proc; and once under qemu (microvm, `vhost-user-fs-device`,
//! memfd guest RAM) with a busybox initramfs that mounts the share, lists
//! every file and reads four, /proc/<pid>/status and smaps_rollup after.
//!
//! Beyond the numbers: no second process (or two) per pod to start,
//! supervise, put in the pod's cgroup and clean up after a crash; no
//! vhost-user frontend in the VMM; guest RAM need not be a shared memfd. The
//! costs: the file server shares the shim's address space, descriptor table
//! and credentials (hence `guard.rs` and the `CLONE_FS` unshare above), a
//! panic in fuse-backend-rs would take the shim down (release builds abort;
//! fuzzing found none), and it has no mount namespace of its own the way
//! virtiofsd sandboxes itself; its thread does run under a seccomp filter
//! of its own (`crate::seccomp`, the file syscalls passthrough makes).

#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzz;
mod guard;
mod worker;

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fuse_backend_rs::passthrough::{self, PassthroughFs};
use tracing::debug;
use virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;

use super::{
    read_config_bytes, take_queues, ActivateContext, ActivateError, DeviceWorker, VirtioDevice,
    VIRTIO_F_VERSION_1,
};
use guard::GuardedFs;
use worker::{SharedFs, Worker};

pub use worker::MAX_CHAIN_BYTES;

/// Virtio device ID of virtio-fs.
pub const VIRTIO_ID_FS: u32 = 26;
/// Longest tag the config space holds.
pub const TAG_MAX_LEN: usize = 36;
/// hiprio, request. 1024: a 1 MiB request is ~260 descriptors when the
/// driver does not use indirect ones, and Linux 6.1 does not shrink its
/// requests to fit a smaller ring.
const QUEUE_SIZES: [u16; 2] = [1024; 2];
const CONFIG_LEN: usize = TAG_MAX_LEN + 4;
/// Request queues the device has (config field `num_request_queues`).
const NUM_REQUEST_QUEUES: u32 = 1;

/// How much the guest may cache (FUSE open flags and entry/attribute timeouts).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CachePolicy {
    /// No data caching, no entry/attribute caching: every access asks the host.
    Never,
    /// No data caching; entries and attributes are cached (1 day).
    Metadata,
    /// Close-to-open: cached data is revalidated at each open (kept if the
    /// host file is unchanged since the guest's last open), entries and
    /// attributes for 1 s. Coherent with host-side changes (kubelet updating
    /// a configmap volume, the shim mounting a rootfs) within a second.
    #[default]
    Auto,
    /// Data, entries and attributes cached (1 day): only for directories
    /// nothing on the host changes while the guest uses them.
    Always,
}

impl CachePolicy {
    fn timeout(self) -> Duration {
        match self {
            CachePolicy::Never => Duration::ZERO,
            CachePolicy::Auto => Duration::from_secs(1),
            CachePolicy::Metadata | CachePolicy::Always => Duration::from_secs(86_400),
        }
    }

    fn passthrough(self) -> passthrough::CachePolicy {
        match self {
            CachePolicy::Never => passthrough::CachePolicy::Never,
            CachePolicy::Metadata => passthrough::CachePolicy::Metadata,
            CachePolicy::Auto => passthrough::CachePolicy::Auto,
            CachePolicy::Always => passthrough::CachePolicy::Always,
        }
    }
}

/// How the share behaves.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FsOptions {
    pub cache: CachePolicy,
    /// Extended attributes (file capabilities, security labels). Off by
    /// default: with xattrs the guest asks for `security.capability` on
    /// every write. Turn on for images whose binaries carry file capabilities.
    pub xattr: bool,
    /// Refuse every change to the share (EROFS), whatever the host allows.
    pub read_only: bool,
    /// Most host descriptors (one per inode the guest remembers, one per open
    /// file) the device holds for the guest; past it, lookups and opens of
    /// new things fail with ENFILE. `None`: half of RLIMIT_NOFILE's soft
    /// limit when the driver starts the device — the shim should raise its
    /// soft limit to the hard one at startup.
    pub max_host_fds: Option<u64>,
}

/// Errors creating a virtio-fs device.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The tag is empty, longer than 36 bytes, or has characters other than
    /// ASCII letters, digits, `.`, `_`, `-`.
    #[error("virtio-fs tag {tag:?} is invalid: {reason}")]
    InvalidTag { tag: String, reason: &'static str },
    /// The shared directory cannot be resolved.
    #[error("virtio-fs shared directory {}: {source}", path.display())]
    SharedDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The shared path is not a directory.
    #[error("virtio-fs shared path {} is not a directory", .0.display())]
    NotADirectory(PathBuf),
    /// fuse-backend-rs takes the root as a UTF-8 string.
    #[error("virtio-fs shared directory {} is not valid UTF-8", .0.display())]
    NonUtf8Path(PathBuf),
}

/// The virtio-fs device. Dropping it stops the worker.
pub struct Fs {
    tag: String,
    /// Canonical (absolute, no symlinks) path of the shared directory.
    shared_dir: PathBuf,
    options: FsOptions,
    config: [u8; CONFIG_LEN],
    worker: Option<DeviceWorker>,
}

fn validate_tag(tag: &str) -> Result<(), &'static str> {
    if tag.is_empty() {
        return Err("empty");
    }
    if tag.len() > TAG_MAX_LEN {
        return Err("longer than 36 bytes");
    }
    if !tag
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err("only ASCII letters, digits, '.', '_' and '-' are allowed");
    }
    Ok(())
}

impl Fs {
    /// Creates the device sharing `shared_dir` (which must exist) under `tag`.
    /// Nothing is opened until the driver starts the device.
    pub fn new(tag: &str, shared_dir: &Path, options: FsOptions) -> Result<Fs, FsError> {
        validate_tag(tag).map_err(|reason| FsError::InvalidTag {
            tag: tag.to_owned(),
            reason,
        })?;
        let canonical = shared_dir
            .canonicalize()
            .map_err(|source| FsError::SharedDir {
                path: shared_dir.to_owned(),
                source,
            })?;
        if !canonical.is_dir() {
            return Err(FsError::NotADirectory(shared_dir.to_owned()));
        }
        if canonical.to_str().is_none() {
            return Err(FsError::NonUtf8Path(shared_dir.to_owned()));
        }
        let mut config = [0u8; CONFIG_LEN];
        config[..tag.len()].copy_from_slice(tag.as_bytes());
        config[TAG_MAX_LEN..].copy_from_slice(&NUM_REQUEST_QUEUES.to_le_bytes());
        Ok(Fs {
            tag: tag.to_owned(),
            shared_dir: canonical,
            options,
            config,
            worker: None,
        })
    }

    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The shared directory, canonicalized.
    pub fn shared_dir(&self) -> &Path {
        &self.shared_dir
    }

    pub fn options(&self) -> &FsOptions {
        &self.options
    }

    /// The worker thread's kernel thread id (tests check it is gone after reset).
    #[cfg(test)]
    fn worker_tid(&self) -> Option<i32> {
        self.worker.as_ref().map(DeviceWorker::tid)
    }
}

/// A fresh file system serving `dir`, for one activation: nothing the
/// previous driver instance opened survives a reset.
fn build_fs(dir: &Path, options: &FsOptions) -> io::Result<SharedFs> {
    let root_dir = dir
        .to_str()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "shared dir is not UTF-8"))?
        .to_owned();
    let timeout = options.cache.timeout();
    let cfg = passthrough::Config {
        root_dir,
        cache_policy: options.cache.passthrough(),
        entry_timeout: timeout,
        attr_timeout: timeout,
        xattr: options.xattr,
        // Coherence with the host matters more than write coalescing.
        writeback: false,
        // Inodes as O_PATH descriptors: overlayfs (every rootfs) has no file
        // handles unless mounted with nfs_export.
        inode_file_handles: false,
        // Host inode numbers would save a map entry per inode, but
        // fuse-backend-rs then tells only 255 (device, mount) pairs apart,
        // ever, and every container (re)start is a new overlay mount.
        use_host_ino: false,
        do_import: true,
        ..Default::default()
    };
    let fs = PassthroughFs::<()>::new(cfg)?;
    let max_fds = options.max_host_fds.unwrap_or_else(default_fd_budget);
    // Only close-to-open caching revalidates at open; `always` keeps every
    // page anyway and `never`/`metadata` cache no data.
    let keep_unchanged = options.cache == CachePolicy::Auto;
    Ok(GuardedFs::new(
        fs,
        options.read_only,
        max_fds,
        keep_unchanged,
    ))
}

/// Half the soft descriptor limit: the other half stays for the shim.
fn default_fd_budget() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only into `lim`, which is a valid rlimit.
    let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_cur
    } else {
        1024
    };
    (soft / 2).max(64)
}

/// Gives the calling thread its own umask, cwd and root, so that
/// `PassthroughFs` setting the umask does not change the shim's.
pub(crate) fn unshare_fs_context() -> io::Result<()> {
    // SAFETY: unshare takes no pointers; CLONE_FS only copies the calling
    // thread's fs_struct, which is allowed in a multithreaded process.
    if unsafe { libc::unshare(libc::CLONE_FS) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
    }

    fn name(&self) -> &'static str {
        "virtio-fs"
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_INDIRECT_DESC
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn is_active(&self) -> bool {
        self.worker.is_some()
    }

    fn start(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let queues = take_queues::<2>(ctx.queues)?;
        let fs = build_fs(&self.shared_dir, &self.options).map_err(ActivateError::Worker)?;
        let worker =
            Worker::new(ctx.mem, queues, ctx.interrupt, fs).map_err(ActivateError::Worker)?;
        // Serving without our own fs context would let the guest's FUSE_INIT
        // change the shim's umask: if unsharing fails, do not serve at all.
        let share = self.shared_dir.clone();
        let setup = move || {
            unshare_fs_context()?;
            crate::confine::confine_fs_worker(&share)
        };
        self.worker = Some(DeviceWorker::start("husk-fs", worker, setup, ctx.seccomp)?);
        debug!(tag = %self.tag, dir = %self.shared_dir.display(), "virtio-fs: activated");
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(worker) = self.worker.take() {
            worker.stop();
            debug!(tag = %self.tag, "virtio-fs: reset");
        }
    }
}

impl Drop for Fs {
    fn drop(&mut self) {
        self.reset();
    }
}

#[cfg(test)]
mod tests;
