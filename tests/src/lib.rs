//! Shared helpers for husk's real-VM tests and benchmarks: where the guest
//! image is, and how to tell whether a VM left anything behind.

pub mod containerd;
pub mod cri;
pub mod image;
pub mod pod_cgroup;

use std::path::{Path, PathBuf};
use std::time::Duration;

/// The workspace root (this crate lives in `<root>/tests`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn guest_artifact(env: &str, file: &str) -> PathBuf {
    let path = std::env::var_os(env)
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("build/guest").join(file));
    assert!(
        path.is_file(),
        "guest artifact {} is missing: run `make guest` first (or set {env})",
        path.display()
    );
    path
}

/// The guest kernel (`make guest`, or $HUSK_KERNEL).
pub fn guest_kernel() -> PathBuf {
    guest_artifact("HUSK_KERNEL", "vmlinux")
}

/// The guest initramfs with the agent as /init (`make guest`, or $HUSK_INITRD).
pub fn guest_initrd() -> PathBuf {
    guest_artifact("HUSK_INITRD", "initrd.cpio")
}

/// The husk-vmm binary (`make vmm`, or $HUSK_VMM).
pub fn husk_vmm_binary() -> PathBuf {
    let path = std::env::var_os("HUSK_VMM")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/release/husk-vmm"));
    assert!(
        path.is_file(),
        "{} is missing: run `make vmm` first (or set HUSK_VMM)",
        path.display()
    );
    path
}

/// The release of the guest kernel that `make guest` built.
pub fn guest_kernel_release() -> String {
    let path = guest_kernel().with_file_name("kernel-release");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
        .trim()
        .to_string()
}

/// The host's kernel release.
pub fn host_kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The agent timeouts husk uses on this host (configs/husk.toml: they
/// follow the host kind when unset, as in the tests' configs).
pub fn host_timeouts() -> husk_config::AgentTimeouts {
    use husk_hypervisor::HostProfile;
    husk_config::AgentConfig::default().timeouts(HostProfile::detect() == HostProfile::NestedPvm)
}

/// How long a test waits for something that includes a guest boot: longer
/// than husk's own bounds, so that a failure shows husk's error (which says
/// what the guest did) rather than the test's.
pub fn boot_timeout() -> Duration {
    let t = host_timeouts();
    t.boot_max + t.request
}

/// How long a test waits for one operation in a running guest (a create,
/// an exec): longer than husk's request timeout, for the same reason.
pub fn op_timeout() -> Duration {
    host_timeouts().request + Duration::from_secs(60)
}

/// Waits for the agent of `vm` (hybrid vsock at `uds`) within husk's own
/// boot bounds, records the boot in the ledger, and returns the client.
pub async fn wait_for_agent(
    uds: &Path,
    vm: &husk_hypervisor::Vm,
) -> Result<husk_protocol::AgentServiceClient, String> {
    let (client, time) = agent_within_bounds(uds, vm).await?;
    husk_hypervisor::ledger::record_ready(time);
    eprintln!(
        "agent answered {:.1} s after the VM started",
        time.as_secs_f64()
    );
    Ok(client)
}

/// [`wait_for_agent`] for a VM restored from a snapshot: recorded in the
/// ledger as a restore, not a boot.
pub async fn wait_for_restored_agent(
    uds: &Path,
    vm: &husk_hypervisor::Vm,
) -> Result<husk_protocol::AgentServiceClient, String> {
    let (client, time) = agent_within_bounds(uds, vm).await?;
    husk_hypervisor::ledger::record_restored_ready(time);
    eprintln!(
        "restored agent answered {:.3} s after the restore began",
        time.as_secs_f64()
    );
    Ok(client)
}

/// The agent's client and how long it took to answer, within husk's boot
/// bounds for this host.
async fn agent_within_bounds(
    uds: &Path,
    vm: &husk_hypervisor::Vm,
) -> Result<(husk_protocol::AgentServiceClient, Duration), String> {
    let t = host_timeouts();
    let limits = husk_vsock::BootLimits {
        stall: t.boot_stall,
        max: t.boot_max,
    };
    husk_vsock::wait_for_agent(uds, vm, limits)
        .await
        .map_err(|e| e.to_string())
}

/// Where the shims of every test keep their templates: one per VM shape
/// for the whole suite, so each shape costs one boot
/// (`$HUSK_TEST_TEMPLATES`, which `make test-vm` empties first; default
/// `target/husk-templates`).
pub fn template_dir() -> PathBuf {
    std::env::var_os("HUSK_TEST_TEMPLATES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/husk-templates"))
}

/// Names of this process's threads that husk started (`husk-*`).
pub fn husk_threads() -> Vec<String> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .map(|c| c.trim().to_string())
        .filter(|c| c.starts_with("husk-"))
        .collect()
}

/// Unix socket inode -> path (or "unnamed"), from /proc/net/unix.
fn unix_socket_paths() -> std::collections::HashMap<String, String> {
    let table = std::fs::read_to_string("/proc/net/unix").unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let inode = fields.get(6)?.to_string();
            let path = fields.get(7).map_or("unnamed", |p| p).to_string();
            Some((inode, path))
        })
        .collect()
}

/// What this process's open file descriptors point at (Unix sockets with
/// their path, so a leak names its socket).
pub fn open_fds() -> Vec<String> {
    let Ok(fds) = std::fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    let sockets = unix_socket_paths();
    let mut targets: Vec<String> = fds
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .map(|t| t.to_string_lossy().into_owned())
        // read_dir's own descriptor.
        .filter(|t| !t.starts_with("/proc/"))
        .map(|t| {
            let inode = t.strip_prefix("socket:[").and_then(|i| i.strip_suffix(']'));
            match inode.and_then(|i| sockets.get(i)) {
                Some(path) => format!("{t} unix:{path}"),
                None => t,
            }
        })
        .collect();
    targets.sort();
    targets
}

/// Asserts that this process's descriptors return to `before` within
/// `timeout`, driving `runtime` meanwhile: connection tasks an RPC client
/// spawned only notice their peer is gone (and close) when polled.
pub fn assert_fds_settle(before: &[String], runtime: &tokio::runtime::Runtime, timeout: Duration) {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let now = open_fds();
        if now == before {
            return;
        }
        if std::time::Instant::now() > deadline {
            assert_eq!(now, before, "file descriptors left open after {timeout:?}");
        }
        runtime.block_on(async { tokio::time::sleep(Duration::from_millis(20)).await });
    }
}

/// The test initramfs: the guest initramfs plus a busybox rootfs at
/// [`TEST_ROOTFS`] (`make guest-test`, or $HUSK_TEST_INITRD).
pub fn guest_test_initrd() -> PathBuf {
    let path = std::env::var_os("HUSK_TEST_INITRD")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("build/guest/initrd-test.cpio"));
    assert!(
        path.is_file(),
        "test initramfs {} is missing: run `make guest-test` first (or set HUSK_TEST_INITRD)",
        path.display()
    );
    path
}

/// Where the test initramfs has its busybox container rootfs.
pub const TEST_ROOTFS: &str = "/testdata/busybox";

/// A live process: its pid and its command line, one argument each.
pub struct HostProcess {
    pub pid: u32,
    pub args: Vec<String>,
}

impl HostProcess {
    /// The command line joined with spaces.
    pub fn command_line(&self) -> String {
        self.args.join(" ")
    }
}

/// Every process on the host that can still be read in /proc.
pub fn host_processes() -> Vec<HostProcess> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|p| {
            let pid: u32 = p.file_name().to_str()?.parse().ok()?;
            let args = process_args(pid)?;
            Some(HostProcess { pid, args })
        })
        .collect()
}

/// Resident memory of process `pid` in KiB (0 once it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The command line of process `pid` ("" once it is gone).
pub fn command_line_of(pid: u32) -> String {
    process_args(pid).unwrap_or_default().join(" ")
}

fn process_args(pid: u32) -> Option<Vec<String>> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}
