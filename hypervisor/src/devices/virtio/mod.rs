//! Virtio devices: the one trait every device implements, and what the
//! transport hands a device when the driver starts it.
//!
//! A device's emulation lives in its own module; the virtio-mmio transport
//! (`mmio`) owns the registers and queue configuration, and calls
//! [`VirtioDevice::activate`] once the driver sets DRIVER_OK.

pub mod control;
pub mod fs;
pub mod mmio;
pub mod net;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod test_utils;
pub mod vsock;
pub mod worker;

pub use worker::DeviceWorker;

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};

use tracing::warn;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// Interrupt status bit: the device used a buffer in a queue.
pub const VIRTIO_MMIO_INT_VRING: u32 = 0x01;
/// Interrupt status bit: the device configuration changed.
pub const VIRTIO_MMIO_INT_CONFIG: u32 = 0x02;

/// The feature bit every modern (non-legacy) device offers.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// A device's interrupt line: the virtio-mmio InterruptStatus register plus
/// the irqfd that injects the (edge-triggered) interrupt into the guest.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl Interrupt {
    pub fn new(irqfd: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            irqfd,
        }
    }

    /// The eventfd KVM watches for this device's GSI.
    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }

    /// Tells the driver the device used buffers.
    pub fn signal_used_queue(&self) -> io::Result<()> {
        self.signal(VIRTIO_MMIO_INT_VRING)
    }

    /// Tells the driver the configuration space changed.
    pub fn signal_config_change(&self) -> io::Result<()> {
        self.signal(VIRTIO_MMIO_INT_CONFIG)
    }

    fn signal(&self, bits: u32) -> io::Result<()> {
        self.status.fetch_or(bits, Ordering::SeqCst);
        self.irqfd.write(1)
    }

    /// Current InterruptStatus register value.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Sets InterruptStatus as a snapshot left it (no interrupt is sent:
    /// the restored interrupt controller holds whatever was pending).
    pub fn restore_status(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
    }

    /// InterruptACK: the driver handled `bits`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }
}

/// A queue the driver configured, with the eventfd it kicks (QueueNotify,
/// delivered by KVM as an ioeventfd, or written by the transport).
pub struct ActiveQueue {
    pub queue: Queue,
    pub notify: EventFd,
}

/// What a device gets when the driver starts it.
pub struct ActivateContext {
    pub mem: GuestMemoryMmap,
    /// Feature bits both sides agreed on.
    pub acked_features: u64,
    /// One entry per queue, in queue-index order, all marked ready by the driver.
    pub queues: Vec<ActiveQueue>,
    pub interrupt: std::sync::Arc<Interrupt>,
    /// The worker installs its seccomp filter (`crate::seccomp`) before it
    /// serves the guest; false only to debug (`[hypervisor] seccomp = false`).
    pub seccomp: bool,
}

/// Errors starting a device.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver configured {got} queues; the device needs {want}.
    #[error("driver configured {got} queues, device needs {want}")]
    QueueCount { want: usize, got: usize },
    /// The device failed to start its worker.
    #[error("device worker failed to start: {0}")]
    Worker(#[source] io::Error),
    /// The device is already active.
    #[error("device already active")]
    AlreadyActive,
    /// The worker's seccomp filter could not be built or installed.
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
}

/// Copies the config-space bytes at `offset` into `data`; bytes past the
/// end (or at offsets that overflow) read as 0.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, byte) in data.iter_mut().enumerate() {
        let at = offset
            .checked_add(i as u64)
            .and_then(|o| usize::try_from(o).ok());
        *byte = at.and_then(|o| config.get(o)).copied().unwrap_or(0);
    }
}

/// The driver's queues as the fixed number a device has.
pub fn take_queues<const N: usize>(
    queues: Vec<ActiveQueue>,
) -> Result<[ActiveQueue; N], ActivateError> {
    let got = queues.len();
    queues
        .try_into()
        .map_err(|_| ActivateError::QueueCount { want: N, got })
}

/// The one trait every virtio device implements (Firecracker's shape).
pub trait VirtioDevice: Send {
    /// Virtio device ID (e.g. 19 for vsock).
    fn device_type(&self) -> u32;
    /// Prefix of the device's log lines ("virtio-net").
    fn name(&self) -> &'static str {
        "virtio"
    }
    /// Maximum size of each queue; the slice's length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits offered to the driver (VIRTIO_F_VERSION_1 included).
    fn avail_features(&self) -> u64;
    /// Reads the device-specific configuration space. Out-of-range bytes read as 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space. Out-of-range writes
    /// are ignored. By default the configuration space is read-only: the
    /// write is logged and dropped.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        warn!(
            offset,
            len = data.len(),
            "{}: guest wrote the read-only config space",
            self.name()
        );
    }
    /// Whether the device was started and not reset since.
    fn is_active(&self) -> bool;
    /// Starts the device; [`VirtioDevice::activate`] calls it only while
    /// the device is not active. Typically spawns the device's worker.
    fn start(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;
    /// Starts the device (DRIVER_OK), unless it is already active.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if self.is_active() {
            return Err(ActivateError::AlreadyActive);
        }
        self.start(ctx)
    }
    /// Stops the device's worker and drops the queues (driver reset or VM
    /// teardown). When it returns, no thread of the device is running.
    fn reset(&mut self);
}
