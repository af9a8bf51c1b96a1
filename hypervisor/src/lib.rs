//! husk's VMM: boots a Linux guest on KVM with virtio-mmio devices.
//!
//! Layout follows Firecracker's `src/vmm`: one module per concern, every
//! virtio device behind [`devices::virtio::VirtioDevice`], one `thiserror`
//! enum per module. [`vm::Vm`] is the entry point.

pub mod acpi;
pub mod activity;
pub mod boot;
pub mod bus;
pub mod calibrate;
pub mod confine;
pub mod cpuid;
pub mod device_manager;
pub mod devices;
pub mod exit;
pub mod host;
pub mod layout;
pub mod ledger;
pub mod memory;
pub mod metrics;
pub mod profile;
pub mod rate_limit;
pub mod seccomp;
pub mod snapshot;
pub mod vcpu;
pub mod vm;
pub mod vmgenid;

pub use activity::GuestActivity;
pub use devices::legacy::serial::ConsoleOutput;
pub use devices::virtio::fs::CachePolicy;
pub use exit::ExitReason;
pub use host::{HostProfile, HostProfileSetting};
pub use vm::{Vm, VmConfig, VmError, VsockConfig};
