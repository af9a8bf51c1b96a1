//! VM snapshots: a stopped guest's vCPUs, interrupt controller, clock,
//! devices and memory, written to a directory and restored into a new VM
//! ([`crate::Vm::snapshot`], [`crate::Vm::restore`]).
//!
//! A snapshot directory holds `vmstate` (a header line with the format
//! version and the SHA-256 of the rest, then the state as JSON) and
//! `memory` (guest RAM, sparse). The state names the shape it fits
//! ([`SnapshotShape`]: husk's version, the host, the caller's identity of
//! kernel and initramfs, vCPUs, memory, command line, devices); a restore
//! whose VM differs in any of them is refused, naming the difference, before
//! anything is built. Only quiesced templates are snapshotted (no tenant
//! code has run in them), but the files are still checked like input.

pub mod memory;
pub mod vcpu;

use std::path::{Path, PathBuf};

use kvm_bindings::{kvm_clock_data, kvm_irqchip};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::devices::legacy::serial::SerialRegisters;
use crate::devices::virtio::mmio::TransportState;
pub use memory::MemoryRegion;
pub use vcpu::VcpuState;

/// Bumped whenever what a snapshot holds, or how it is read, changes.
pub const FORMAT_VERSION: u32 = 1;
const MAGIC: &str = "husk-vm-snapshot";
/// The state file in a snapshot directory.
pub const STATE_FILE: &str = "vmstate";
/// The guest memory file in a snapshot directory.
pub const MEMORY_FILE: &str = "memory";
/// A state file is kilobytes; anything far larger is not one.
const MAX_STATE_BYTES: u64 = 16 << 20;

/// Errors taking or restoring a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("KVM {what} failed: {source}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("MSRs: {0}")]
    Msrs(String),
    #[error("guest memory: {0}")]
    Layout(String),
    #[error("{} is not a usable husk snapshot: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: String },
    #[error("the snapshot does not fit this VM: {0}")]
    Mismatch(String),
    #[error("vCPU {0} did not stop for the snapshot (the guest ended first?)")]
    VcpuNotParked(u8),
    #[error("device {device}: {reason}")]
    Device { device: String, reason: String },
}

/// What a snapshot fits: a restore needs all of it equal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotShape {
    /// husk's version and the snapshot format.
    pub husk: String,
    /// The host profile, CPU model and host kernel release.
    pub host: String,
    /// The caller's name for the guest's inputs (kernel, initramfs, …).
    pub identity: String,
    pub vcpus: u8,
    pub memory_mib: u64,
    pub cmdline: String,
    /// Virtio devices, in MMIO-slot order ("vsock", "fs", "net").
    pub devices: Vec<String>,
}

impl SnapshotShape {
    /// The first field in which `self` (the snapshot) and `other` (this
    /// VM) differ, said for an error.
    pub fn difference(&self, other: &SnapshotShape) -> Option<String> {
        let fields: [(&str, String, String); 7] = [
            ("husk version", self.husk.clone(), other.husk.clone()),
            ("host", self.host.clone(), other.host.clone()),
            (
                "guest inputs",
                self.identity.clone(),
                other.identity.clone(),
            ),
            ("vCPUs", self.vcpus.to_string(), other.vcpus.to_string()),
            (
                "memory MiB",
                self.memory_mib.to_string(),
                other.memory_mib.to_string(),
            ),
            (
                "kernel command line",
                self.cmdline.clone(),
                other.cmdline.clone(),
            ),
            ("devices", self.devices.join(","), other.devices.join(",")),
        ];
        fields
            .into_iter()
            .find(|(_, a, b)| a != b)
            .map(|(what, a, b)| format!("{what}: {a:?} in the snapshot, {b:?} here"))
    }
}

/// husk's version and the snapshot format, for [`SnapshotShape::husk`].
pub fn husk_version() -> String {
    format!("{} format {FORMAT_VERSION}", env!("CARGO_PKG_VERSION"))
}

/// The host, for [`SnapshotShape::host`]: a snapshot's CPU state is only
/// good on the CPU model and KVM it was taken on.
pub fn host_identity(profile: crate::HostProfile) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, model)| model.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|r| r.trim().to_string())
        .unwrap_or_else(|_| "unknown kernel".into());
    format!("{}; {cpu}; Linux {kernel}", profile.name())
}

/// Everything but memory.
#[derive(Serialize, Deserialize)]
pub struct VmState {
    pub shape: SnapshotShape,
    pub vcpus: Vec<VcpuState>,
    /// PIC master, PIC slave, IOAPIC (KVM_GET_IRQCHIP chip ids 0-2).
    pub irqchips: Vec<kvm_irqchip>,
    pub clock: kvm_clock_data,
    pub serial: SerialRegisters,
    pub transports: Vec<TransportState>,
    pub memory: Vec<MemoryRegion>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `state` to `dir`'s state file.
pub fn write_state(dir: &Path, state: &VmState) -> Result<(), SnapshotError> {
    let path = dir.join(STATE_FILE);
    let body = serde_json::to_vec(state).map_err(|e| SnapshotError::Corrupt {
        path: path.clone(),
        reason: format!("cannot encode the state: {e}"),
    })?;
    let digest = hex(&Sha256::digest(&body));
    let mut bytes = format!("{MAGIC} {FORMAT_VERSION} {digest}\n").into_bytes();
    bytes.extend_from_slice(&body);
    std::fs::write(&path, bytes).map_err(io(&path))?;
    std::fs::File::open(&path)
        .and_then(|f| f.sync_all())
        .map_err(io(&path))
}

/// Reads and checks `dir`'s state file: a wrong format, a digest that does
/// not match or JSON that does not parse is an error naming the file.
pub fn read_state(dir: &Path) -> Result<VmState, SnapshotError> {
    use std::io::Read;
    let path = dir.join(STATE_FILE);
    let corrupt = |reason: String| SnapshotError::Corrupt {
        path: path.clone(),
        reason,
    };
    let mut bytes = Vec::new();
    std::fs::File::open(&path)
        .map_err(io(&path))?
        .take(MAX_STATE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io(&path))?;
    if bytes.len() as u64 > MAX_STATE_BYTES {
        return Err(corrupt(format!("larger than {MAX_STATE_BYTES} bytes")));
    }
    let newline = bytes
        .iter()
        .position(|&b| b == b'\n')
        .ok_or_else(|| corrupt("no header line".into()))?;
    let header = std::str::from_utf8(&bytes[..newline])
        .map_err(|_| corrupt("the header is not text".into()))?;
    let body = &bytes[newline + 1..];
    let fields: Vec<&str> = header.split(' ').collect();
    let [magic, version, digest] = fields[..] else {
        return Err(corrupt(format!("header {header:?}")));
    };
    if magic != MAGIC {
        return Err(corrupt(format!("header {header:?}")));
    }
    if version != FORMAT_VERSION.to_string() {
        return Err(corrupt(format!(
            "snapshot format {version}; this husk reads format {FORMAT_VERSION}"
        )));
    }
    if digest != hex(&Sha256::digest(body)) {
        return Err(corrupt("its contents do not match their digest".into()));
    }
    serde_json::from_slice(body).map_err(|e| corrupt(format!("cannot decode the state: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> SnapshotShape {
        SnapshotShape {
            husk: husk_version(),
            host: "native; test CPU; Linux 6.1".into(),
            identity: "kernel k; initramfs i".into(),
            vcpus: 1,
            memory_mib: 256,
            cmdline: "console=ttyS0".into(),
            devices: vec!["vsock".into(), "fs".into()],
        }
    }

    fn state() -> VmState {
        VmState {
            shape: shape(),
            vcpus: Vec::new(),
            irqchips: vec![kvm_irqchip::default(); 3],
            clock: kvm_clock_data::default(),
            serial: SerialRegisters {
                baud_divisor_low: 12,
                baud_divisor_high: 0,
                interrupt_enable: 0,
                interrupt_identification: 1,
                line_control: 3,
                line_status: 0x60,
                modem_control: 8,
                modem_status: 0xb0,
                scratch: 0,
            },
            transports: Vec::new(),
            memory: vec![MemoryRegion {
                guest_addr: 0,
                len: 256 << 20,
                file_offset: 0,
            }],
        }
    }

    #[test]
    fn a_state_file_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        write_state(dir.path(), &state()).unwrap();
        let back = read_state(dir.path()).unwrap();
        assert_eq!(back.shape, shape());
        assert_eq!(back.serial, state().serial);
        assert_eq!(back.memory, state().memory);
        assert_eq!(back.irqchips.len(), 3);
    }

    #[test]
    fn damaged_state_files_are_named_and_refused() {
        let dir = tempfile::tempdir().unwrap();
        write_state(dir.path(), &state()).unwrap();
        let path = dir.path().join(STATE_FILE);
        let good = std::fs::read(&path).unwrap();
        let newline = good.iter().position(|&b| b == b'\n').unwrap();
        let mut flipped = good.clone();
        let last = flipped.len() - 2;
        flipped[last] ^= 0x01;
        let mut wrong_version = b"husk-vm-snapshot 999 ".to_vec();
        wrong_version.extend_from_slice(&good[newline - 64..]);
        for (bytes, says) in [
            (flipped, "do not match their digest"),
            (wrong_version, "format 999"),
            (b"not a snapshot".to_vec(), "no header line"),
            (b"elf binary\n{}".to_vec(), "header"),
            (Vec::new(), "no header line"),
        ] {
            std::fs::write(&path, &bytes).unwrap();
            let e = read_state(dir.path()).err().unwrap().to_string();
            assert!(e.contains(says), "{e}");
            assert!(e.contains(STATE_FILE), "names the file: {e}");
        }
        // A valid digest over JSON that is not a state.
        let body = b"{\"shape\": 1}";
        let mut forged =
            format!("{MAGIC} {FORMAT_VERSION} {}\n", hex(&Sha256::digest(body))).into_bytes();
        forged.extend_from_slice(body);
        std::fs::write(&path, forged).unwrap();
        let e = read_state(dir.path()).err().unwrap().to_string();
        assert!(e.contains("cannot decode"), "{e}");
        std::fs::remove_file(&path).unwrap();
        assert!(read_state(dir.path()).is_err());
    }

    #[test]
    fn a_shape_difference_names_the_first_field() {
        assert_eq!(shape().difference(&shape()), None);
        let mut other = shape();
        other.memory_mib = 512;
        let d = shape().difference(&other).unwrap();
        assert!(
            d.contains("memory MiB") && d.contains("256") && d.contains("512"),
            "{d}"
        );
        let mut other = shape();
        other.devices.push("net".into());
        assert!(shape().difference(&other).unwrap().contains("devices"));
        let mut other = shape();
        other.host = "nested-pvm; other CPU".into();
        assert!(shape().difference(&other).unwrap().contains("host"));
    }
}
