//! What PID 1 sets up before serving: a root that containers can
//! pivot_root away from, the pseudo filesystems and cgroup v2 controllers;
//! and what an `--isolated` host-mode agent sets up instead.
//!
//! fds 0-2 are not our concern: Rust's runtime opens /dev/null on any of
//! them that is closed before `main`, and aborts if it cannot, which is why
//! the initramfs ships /dev/console and /dev/null nodes.
//!
//! Every syscall costs ~0.7 ms in a nested-KVM guest, so this does the
//! minimum: directories are only created when a mount reports ENOENT, and
//! nothing is probed twice. Failures are logged and setup goes on: a guest
//! with, say, no cgroup2 can still answer Check and Shutdown.

use nix::errno::Errno;
use nix::mount::{mount, MsFlags};
use nix::sys::stat::Mode;
use nix::unistd::mkdir;

struct MountSpec {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
}

const COMMON: MsFlags = MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV);
const NOEXEC: MsFlags = COMMON.union(MsFlags::MS_NOEXEC);

/// In order: later targets live inside earlier ones.
const MOUNTS: &[MountSpec] = &[
    MountSpec {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: MsFlags::MS_NOSUID,
        data: Some("mode=0755"),
    },
    MountSpec {
        source: "proc",
        target: "/proc",
        fstype: "proc",
        flags: NOEXEC,
        data: None,
    },
    MountSpec {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: NOEXEC,
        data: None,
    },
    MountSpec {
        source: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: Some("newinstance,ptmxmode=0666,mode=0620"),
    },
    MountSpec {
        source: "shm",
        target: "/dev/shm",
        fstype: "tmpfs",
        flags: COMMON,
        data: Some("mode=1777"),
    },
    MountSpec {
        source: "tmpfs",
        target: "/run",
        fstype: "tmpfs",
        flags: COMMON,
        data: Some("mode=0755"),
    },
    MountSpec {
        source: "tmpfs",
        target: "/tmp",
        fstype: "tmpfs",
        flags: COMMON,
        data: Some("mode=1777"),
    },
    MountSpec {
        source: "cgroup2",
        target: "/sys/fs/cgroup",
        fstype: "cgroup2",
        flags: NOEXEC,
        data: None,
    },
];

const CGROUP_ROOT: &str = "/sys/fs/cgroup";

fn mount_spec(m: &MountSpec) -> Result<(), Errno> {
    let attempt = || mount(Some(m.source), m.target, Some(m.fstype), m.flags, m.data);
    match attempt() {
        Err(Errno::ENOENT) => {
            match mkdir(m.target, Mode::from_bits_truncate(0o755)) {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(e),
            }
            attempt()
        }
        // Already mounted (e.g. devtmpfs automount): fine.
        Err(Errno::EBUSY) => Ok(()),
        other => other,
    }
}

/// PID 1's setup; problems are logged, not fatal.
pub fn setup() {
    if let Err(e) = root_on_a_mount() {
        tracing::warn!("cannot move / onto a bind mount: {e}; containers cannot pivot_root");
    }
    for m in MOUNTS {
        match mount_spec(m) {
            Ok(()) => tracing::debug!(path = m.target, fstype = m.fstype, "mounted"),
            Err(e) => tracing::warn!(path = m.target, fstype = m.fstype, "mount failed: {e}"),
        }
    }
    ensure_ptmx();
    enable_cgroup_controllers();
}

/// The initramfs is the kernel's rootfs, the one mount without a parent,
/// and pivot_root(2) refuses to move away from it (EINVAL) — which every
/// container does. Copying the initramfs into a tmpfs would cost seconds of
/// emulated kernel time on nested hosts; a bind mount of / moved onto /
/// costs five syscalls and gives a root that has a parent.
fn root_on_a_mount() -> Result<(), Errno> {
    // /run is empty in the initramfs and gets its tmpfs only later.
    mount(
        Some("/"),
        "/run",
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )?;
    nix::unistd::chdir("/run")?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)?;
    nix::unistd::chroot(".")?;
    nix::unistd::chdir("/")
}

/// `--isolated` host mode: the agent is PID 1 of its own pid namespace and
/// in its own mount namespace (the caller's `unshare`); it keeps every
/// mount it makes to itself, gets a private /run/husk (`run_dir`), and a
/// cgroup2 at /sys/fs/cgroup where the host has none there (cgroup v1 or
/// hybrid hosts). Under `unshare --cgroup` that cgroup2's root is the
/// agent's own cgroup, so container cgroups stay inside it.
pub fn isolate_host(run_dir: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context;
    if nix::unistd::getpid().as_raw() != 1 {
        anyhow::bail!(
            "--isolated: not PID 1 of a pid namespace; run under `unshare --mount --pid --fork --mount-proc`"
        );
    }
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .context("make / private")?;
    std::fs::create_dir_all(run_dir).with_context(|| format!("create {}", run_dir.display()))?;
    mount(
        Some("tmpfs"),
        run_dir,
        Some("tmpfs"),
        COMMON,
        Some("mode=0755"),
    )
    .with_context(|| format!("mount a tmpfs on {}", run_dir.display()))?;
    let fs = nix::sys::statfs::statfs(CGROUP_ROOT).context("statfs /sys/fs/cgroup")?;
    if fs.filesystem_type() != nix::sys::statfs::CGROUP2_SUPER_MAGIC {
        mount(
            Some("cgroup2"),
            CGROUP_ROOT,
            Some("cgroup2"),
            NOEXEC,
            None::<&str>,
        )
        .context("mount cgroup2 on /sys/fs/cgroup")?;
    }
    Ok(())
}

/// With devtmpfs /dev/ptmx is a device node that follows the devpts at
/// /dev/pts (kernel >= 4.7); without one, point it there.
fn ensure_ptmx() {
    if let Err(e) = std::fs::symlink_metadata("/dev/ptmx") {
        if e.kind() == std::io::ErrorKind::NotFound {
            if let Err(e) = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx") {
                tracing::warn!("symlink /dev/ptmx -> pts/ptmx: {e}");
            }
        }
    }
}

/// Delegates every controller the kernel offers to child cgroups, so
/// containers get cpu/memory/pids/... limits.
fn enable_cgroup_controllers() {
    let controllers_file = format!("{CGROUP_ROOT}/cgroup.controllers");
    let control_file = format!("{CGROUP_ROOT}/cgroup.subtree_control");
    let available = match std::fs::read_to_string(&controllers_file) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("read {controllers_file}: {e}");
            return;
        }
    };
    let Some(all) = subtree_control_line(&available) else {
        tracing::warn!("no cgroup v2 controllers offered");
        return;
    };
    // One write for all of them; one by one only if that fails, to learn
    // which controller refused.
    match std::fs::write(&control_file, &all) {
        Ok(()) => tracing::debug!(controllers = %all, "cgroup controllers enabled"),
        Err(e) => {
            tracing::warn!("enable {all:?} in {control_file}: {e}; trying one by one");
            for one in all.split(' ') {
                if let Err(e) = std::fs::write(&control_file, one) {
                    tracing::warn!("enable {one} in {control_file}: {e}");
                }
            }
        }
    }
}

/// `cpu memory pids\n` → `+cpu +memory +pids`; `None` if empty.
pub fn subtree_control_line(controllers: &str) -> Option<String> {
    let line = controllers
        .split_whitespace()
        .map(|c| format!("+{c}"))
        .collect::<Vec<_>>()
        .join(" ");
    (!line.is_empty()).then_some(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subtree_control_enables_every_offered_controller() {
        assert_eq!(
            subtree_control_line("cpuset cpu io memory hugetlb pids rdma misc\n").as_deref(),
            Some("+cpuset +cpu +io +memory +hugetlb +pids +rdma +misc")
        );
        assert_eq!(subtree_control_line("\n"), None);
    }

    #[test]
    fn mounts_nest_inside_earlier_ones() {
        let mut mounted = vec![];
        for m in MOUNTS {
            let parent = std::path::Path::new(m.target).parent().unwrap();
            let parent = parent.to_str().unwrap();
            assert!(
                parent == "/" || mounted.iter().any(|t| parent.starts_with(t)),
                "{} before its parent",
                m.target
            );
            mounted.push(m.target);
        }
    }
}
