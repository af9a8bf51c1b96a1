//! What a VM is made of ([`VmConfig`]) and the checks it passes before
//! anything is built.

use std::path::PathBuf;
use std::sync::Arc;

use crate::activity::GuestActivity;
use crate::cpuid::CpuidPolicy;
use crate::devices::legacy::serial::ConsoleOutput;
use crate::devices::virtio::fs::CachePolicy;
use crate::host::{HostProfile, HostProfileSetting};

use super::VmError;

/// Kernel arguments every husk guest gets. `quiet` because every console
/// byte is a port I/O exit; `panic=-1` so a guest panic ends the VM at once;
/// `pci=off` because all devices are virtio-mmio (PCI is built in for ACPI);
/// `random.trust_cpu=on` credits the CPU's RDRAND/RDSEED (as distribution
/// kernels do, CONFIG_RANDOM_TRUST_CPU), so the guest's RNG is ready at
/// boot: a template's RNG is then ready when it is saved, and the new VM
/// generation ID of each restore reseeds it at once (crate::vmgenid; an RNG
/// not yet ready only mixes the ID in). Without RDRAND it changes nothing,
/// and the host entropy CreateSandbox carries still seeds the guest.
pub const BASE_CMDLINE: &str = "console=ttyS0 panic=-1 quiet pci=off random.trust_cpu=on";

/// The full guest kernel command line for a host profile.
pub fn guest_cmdline(profile: HostProfile, extra: &str) -> String {
    [BASE_CMDLINE, profile.kernel_args(), extra]
        .iter()
        .filter(|s| !s.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join(" ")
}

/// The guest's vsock device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's context ID (3 or more).
    pub guest_cid: u64,
    /// Host side: the Unix socket the VMM listens on (`CONNECT <port>`),
    /// and the prefix of `<path>_<port>` for guest-initiated connections.
    pub uds_path: PathBuf,
}

/// A host directory shared with the guest over virtio-fs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedFsConfig {
    /// The tag the guest mounts (`mount -t virtiofs <tag> <dir>`).
    pub tag: String,
    pub dir: PathBuf,
    pub cache: CachePolicy,
    pub xattr: bool,
}

/// A guest NIC backed by a tap device on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// The tap's name (created if missing, removed with the VM).
    pub tap_name: String,
    /// The network namespace to create the tap in (e.g. a pod's netns).
    pub netns: Option<PathBuf>,
    pub mac: [u8; 6],
    pub mtu: Option<u16>,
}

/// Everything needed to start a VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Uncompressed ELF vmlinux.
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// Extra kernel arguments, appended to [`BASE_CMDLINE`] and the host
    /// profile's arguments.
    pub extra_cmdline: String,
    pub vcpus: u8,
    pub memory_mib: u64,
    pub cpuid: CpuidPolicy,
    pub host_profile: HostProfileSetting,
    pub console: ConsoleOutput,
    pub vsock: Option<VsockConfig>,
    pub shared_fs: Option<SharedFsConfig>,
    pub net: Vec<NetConfig>,
    /// Where the VM records the guest's signs of life (see
    /// [`Vm::progress`]); share it to feed other sources in, such as the
    /// agent's log stream.
    pub activity: Arc<GuestActivity>,
    /// Each vCPU and device worker thread installs its seccomp filter
    /// ([`crate::seccomp`]) before it serves the guest. Off only to debug.
    pub seccomp: bool,
}

impl VmConfig {
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            kernel: kernel.into(),
            initrd: None,
            extra_cmdline: String::new(),
            vcpus: 1,
            memory_mib: 256,
            cpuid: CpuidPolicy::default(),
            host_profile: HostProfileSetting::Auto,
            console: ConsoleOutput::Discard,
            vsock: None,
            shared_fs: None,
            net: Vec::new(),
            activity: Arc::default(),
            seccomp: true,
        }
    }
}

/// Most host descriptors a guest's virtio-fs share may hold (one per inode
/// it remembers and per open file): each VM's own cap, whatever the shim's
/// descriptor limit.
pub const MAX_SHARE_FDS: u64 = 16_384;

/// Most vCPUs a guest can have (the guest kernel is built with NR_CPUS=8).
pub const MAX_VCPUS: u8 = 8;
/// vsock CIDs 0-2 are reserved (hypervisor, local, host).
const MIN_GUEST_CID: u64 = 3;

pub(super) fn validate(config: &VmConfig) -> Result<(), VmError> {
    if !(1..=MAX_VCPUS).contains(&config.vcpus) {
        return Err(VmError::Config(format!(
            "vcpus = {} (must be 1 to {MAX_VCPUS})",
            config.vcpus
        )));
    }
    if !config.kernel.is_file() {
        return Err(VmError::Config(format!(
            "guest kernel {} does not exist or is not a file",
            config.kernel.display()
        )));
    }
    if let Some(initrd) = &config.initrd {
        if !initrd.is_file() {
            return Err(VmError::Config(format!(
                "guest initramfs {} does not exist or is not a file",
                initrd.display()
            )));
        }
    }
    if let Some(vsock) = &config.vsock {
        if vsock.guest_cid < MIN_GUEST_CID || vsock.guest_cid > u64::from(u32::MAX) {
            return Err(VmError::Config(format!(
                "vsock guest CID {} is reserved or out of range",
                vsock.guest_cid
            )));
        }
    }
    config.cpuid.validate()?;
    Ok(())
}
