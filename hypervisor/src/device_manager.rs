//! Places virtio-mmio devices: a window and a GSI each, an irqfd for the
//! interrupt, an ioeventfd per queue, a slot on the MMIO bus, and an entry
//! for the DSDT.

use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, VmFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::acpi::MmioDeviceAcpi;
use crate::bus::{lock, Bus, BusError};
use crate::devices::virtio::control::ControlThread;
use crate::devices::virtio::mmio::{MmioTransport, TransportState};
use crate::devices::virtio::{Interrupt, VirtioDevice};
use crate::layout::*;
use crate::snapshot::SnapshotError;

/// QueueNotify register offset in the virtio-mmio window.
const QUEUE_NOTIFY_OFFSET: u64 = 0x50;

/// Errors adding a device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceManagerError {
    /// All MMIO windows or GSIs are taken.
    #[error("no room for another virtio device (at most {0})")]
    Full(u64),
    /// An eventfd could not be created.
    #[error("cannot create eventfd for {device}: {source}")]
    EventFd {
        device: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// KVM refused the irqfd or an ioeventfd.
    #[error("cannot register {what} for {device} with KVM: {source}")]
    Kvm {
        device: &'static str,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The transport could not be created.
    #[error("cannot create virtio-mmio transport for {device}: {source}")]
    Transport {
        device: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// The virtio devices of one VM.
pub struct DeviceManager {
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    names: Vec<&'static str>,
    acpi: Vec<MmioDeviceAcpi>,
    // After the transports: they are dropped first, then the thread joined.
    control: ControlThread,
    seccomp: bool,
}

impl DeviceManager {
    /// Devices whose activations and resets run on `control`, and whose
    /// workers install their seccomp filters if `seccomp`.
    pub fn new(control: ControlThread, seccomp: bool) -> Self {
        Self {
            transports: Vec::new(),
            names: Vec::new(),
            acpi: Vec::new(),
            control,
            seccomp,
        }
    }

    /// Adds `device` (named `name` in errors and logs) to the VM.
    pub fn add_virtio(
        &mut self,
        vm: &VmFd,
        mem: &GuestMemoryMmap,
        mmio_bus: &mut Bus,
        name: &'static str,
        device: Box<dyn VirtioDevice>,
    ) -> Result<(), DeviceManagerError> {
        let max_by_gsi = LAST_DEVICE_GSI - FIRST_DEVICE_GSI + 1;
        let max = VIRTIO_MMIO_MAX_DEVICES.min(u64::from(max_by_gsi));
        let full = || DeviceManagerError::Full(max);
        let index = u32::try_from(self.transports.len())
            .ok()
            .filter(|i| u64::from(*i) < max)
            .ok_or_else(full)?;
        let base = VIRTIO_MMIO_START + u64::from(index) * VIRTIO_MMIO_SIZE;
        // The windows sit in the 32-bit MMIO gap, as the DSDT describes them.
        let acpi = MmioDeviceAcpi {
            base: u32::try_from(base).map_err(|_| full())?,
            len: u32::try_from(VIRTIO_MMIO_SIZE).map_err(|_| full())?,
            gsi: FIRST_DEVICE_GSI + index,
        };
        let gsi = acpi.gsi;

        let irqfd = EventFd::new(EFD_NONBLOCK).map_err(|source| DeviceManagerError::EventFd {
            device: name,
            source,
        })?;
        vm.register_irqfd(&irqfd, gsi)
            .map_err(|source| DeviceManagerError::Kvm {
                device: name,
                what: "irqfd",
                source,
            })?;
        let interrupt = Arc::new(Interrupt::new(irqfd));
        let mut transport =
            MmioTransport::new(mem.clone(), device, interrupt).map_err(|source| {
                DeviceManagerError::Transport {
                    device: name,
                    source,
                }
            })?;
        transport.set_control(self.control.handle(), self.seccomp);
        for (queue, evt) in (0u32..).zip(transport.queue_events()) {
            vm.register_ioevent(
                evt,
                &IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET),
                queue,
            )
            .map_err(|source| DeviceManagerError::Kvm {
                device: name,
                what: "queue ioeventfd",
                source,
            })?;
        }
        let transport = Arc::new(Mutex::new(transport));
        mmio_bus.insert(transport.clone(), base, VIRTIO_MMIO_SIZE)?;
        tracing::debug!("virtio {name} at {base:#x}, gsi {gsi}");
        self.transports.push(transport);
        self.names.push(name);
        self.acpi.push(acpi);
        Ok(())
    }

    /// The devices as the DSDT describes them.
    pub fn acpi_devices(&self) -> &[MmioDeviceAcpi] {
        &self.acpi
    }

    /// Stops every device and returns its transport's state, in slot order
    /// (for a snapshot: the devices stay stopped).
    pub fn save(&self) -> Vec<TransportState> {
        self.transports.iter().map(|t| lock(t).save()).collect()
    }

    /// Gives every device its state from a snapshot (in slot order) and
    /// starts those the driver had started.
    pub fn restore(&self, states: &[TransportState]) -> Result<(), SnapshotError> {
        if states.len() != self.transports.len() {
            return Err(SnapshotError::Mismatch(format!(
                "{} devices in the snapshot, {} here",
                states.len(),
                self.transports.len()
            )));
        }
        for ((transport, state), name) in self.transports.iter().zip(states).zip(&self.names) {
            lock(transport)
                .restore(state)
                .map_err(|e| SnapshotError::Device {
                    device: (*name).to_string(),
                    reason: e.to_string(),
                })?;
        }
        Ok(())
    }

    /// Stops every device's worker. Idempotent.
    pub fn shutdown(&self) {
        for transport in &self.transports {
            lock(transport).shutdown();
        }
    }
}
