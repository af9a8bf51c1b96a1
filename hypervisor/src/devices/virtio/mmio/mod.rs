//! The virtio-mmio transport, version 2 ("modern", virtio 1.x §4.2.2).
//!
//! The driver negotiates features and describes its queues through 32-bit
//! registers; the transport keeps that configuration as plain values and only
//! turns it into `Queue`s, validated against guest memory, when the driver
//! sets DRIVER_OK. Everything here is guest-controlled: bad accesses are
//! logged and ignored, never trusted and never a panic.

use std::io;
use std::sync::Arc;

use tracing::{debug, warn};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::control::ControlHandle;
use super::{
    ActivateContext, ActivateError, ActiveQueue, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1,
};
use crate::bus::BusDevice;

/// "virt" in little endian.
/// The low 32 bits of a 64-bit feature word (the registers show it in two
/// halves, selected by DeviceFeaturesSel).
#[allow(clippy::cast_possible_truncation)]
fn low_half(features: u64) -> u32 {
    features as u32
}

const MAGIC_VALUE: u32 = 0x7472_6976;
const MMIO_VERSION: u32 = 2;
/// "HUSK" in little endian; drivers do not interpret it.
const VENDOR_ID: u32 = 0x4b53_5548;

/// Register offsets (virtio 1.2 §4.2.2, table "MMIO Device Register Layout").
mod reg {
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_SEL: u64 = 0x0ac;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Device status bits (virtio 1.2 §2.1).
pub const STATUS_ACKNOWLEDGE: u32 = 0x01;
pub const STATUS_DRIVER: u32 = 0x02;
pub const STATUS_DRIVER_OK: u32 = 0x04;
pub const STATUS_FEATURES_OK: u32 = 0x08;
pub const STATUS_DEVICE_NEEDS_RESET: u32 = 0x40;
pub const STATUS_FAILED: u32 = 0x80;

/// Why the transport could not start the device at DRIVER_OK.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// Queue {ready} is ready but queue {unready} before it is not; devices
    /// get their queues as a dense list, so a hole cannot be expressed.
    #[error("queue {ready} is ready but queue {unready} before it is not")]
    QueueGap { ready: usize, unready: usize },
    /// The driver configured queue {index} with size {size} (max {max}).
    #[error("queue {index}: size {size} is zero, not a power of two, or above {max}")]
    QueueSize { index: usize, size: u16, max: u16 },
    /// The driver gave queue {index} a misaligned ring address.
    #[error("queue {index}: misaligned {ring} address {addr:#x}")]
    QueueAlign {
        index: usize,
        ring: &'static str,
        addr: u64,
    },
    /// Queue {index}'s rings do not lie inside guest memory.
    #[error("queue {index}: rings are outside guest memory")]
    QueueRange { index: usize },
    /// Duplicating queue {index}'s notify eventfd failed.
    #[error("queue {index}: cloning notify eventfd: {source}")]
    Eventfd {
        index: usize,
        #[source]
        source: io::Error,
    },
    /// The device refused to start.
    #[error("device activation failed: {0}")]
    Activate(#[from] ActivateError),
    /// The device's activation panicked on the control thread; the device
    /// is gone.
    #[error("device activation panicked; the device is gone")]
    Lost,
    /// A snapshot's transport state does not fit this device.
    #[error("snapshot does not fit the device: {0}")]
    Restore(String),
}

/// One queue as the driver described it, before validation.
#[derive(Clone, Copy, Debug, Default)]
struct QueueConfig {
    max_size: u16,
    size: u16,
    ready: bool,
    desc: u64,
    driver: u64,
    device: u64,
    /// Where the device resumes in the rings (0 unless restored: then the
    /// used index the snapshot found, see `state.rs`).
    next_index: u16,
}

impl QueueConfig {
    fn new(max_size: u16) -> Self {
        Self {
            max_size,
            // virtio-mmio: the size defaults to the maximum until the driver writes QueueNum.
            size: max_size,
            ..Self::default()
        }
    }

    fn to_queue(self, index: usize, mem: &GuestMemoryMmap) -> Result<Queue, MmioError> {
        let size_err = || MmioError::QueueSize {
            index,
            size: self.size,
            max: self.max_size,
        };
        let mut q = Queue::new(self.max_size).map_err(|_| size_err())?;
        q.try_set_size(self.size).map_err(|_| size_err())?;
        let align = |ring, addr| MmioError::QueueAlign { index, ring, addr };
        q.try_set_desc_table_address(GuestAddress(self.desc))
            .map_err(|_| align("descriptor table", self.desc))?;
        q.try_set_avail_ring_address(GuestAddress(self.driver))
            .map_err(|_| align("driver (avail) ring", self.driver))?;
        q.try_set_used_ring_address(GuestAddress(self.device))
            .map_err(|_| align("device (used) ring", self.device))?;
        q.set_ready(true);
        q.set_next_avail(self.next_index);
        q.set_next_used(self.next_index);
        if !q.is_valid(mem) {
            return Err(MmioError::QueueRange { index });
        }
        Ok(q)
    }
}

/// A virtio device behind a virtio-mmio register window.
pub struct MmioTransport {
    mem: GuestMemoryMmap,
    device: Box<dyn VirtioDevice>,
    interrupt: Arc<Interrupt>,
    queue_evts: Vec<EventFd>,
    queues: Vec<QueueConfig>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    /// Where activations and guest resets run (None: on the caller).
    control: Option<ControlHandle>,
    /// Whether the device's worker confines itself ([`ActivateContext::seccomp`]).
    seccomp: bool,
}

/// Stands in for a device while it is activated or reset on the control
/// thread (the vCPU holds the transport's lock meanwhile, so nothing sees
/// it), and for good if that panicked.
struct Detached;

impl VirtioDevice for Detached {
    fn device_type(&self) -> u32 {
        0
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[]
    }
    fn avail_features(&self) -> u64 {
        0
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn is_active(&self) -> bool {
        false
    }
    fn start(&mut self, _ctx: ActivateContext) -> Result<(), ActivateError> {
        Err(ActivateError::AlreadyActive)
    }
    fn reset(&mut self) {}
}

impl MmioTransport {
    /// `interrupt` carries the irqfd the device manager registered with KVM for this device's GSI.
    pub fn new(
        mem: GuestMemoryMmap,
        device: Box<dyn VirtioDevice>,
        interrupt: Arc<Interrupt>,
    ) -> io::Result<Self> {
        let queue_evts = device
            .queue_max_sizes()
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<io::Result<Vec<_>>>()?;
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| QueueConfig::new(max))
            .collect();
        Ok(Self {
            mem,
            device,
            interrupt,
            queue_evts,
            queues,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            control: None,
            seccomp: true,
        })
    }

    /// Runs activations and guest resets on `control` (not on the vCPU
    /// that asks for them); `seccomp` says whether the device's worker
    /// installs its filter.
    pub fn set_control(&mut self, control: ControlHandle, seccomp: bool) {
        self.control = Some(control);
        self.seccomp = seccomp;
    }

    /// Runs `f` on the device, on the control thread if there is one.
    fn with_device<R: Send + 'static>(
        &mut self,
        f: impl FnOnce(&mut Box<dyn VirtioDevice>) -> R + Send + 'static,
    ) -> Option<R> {
        let Some(control) = &self.control else {
            return Some(f(&mut self.device));
        };
        let device = std::mem::replace(&mut self.device, Box::new(Detached));
        let (device, result) = control.run(device, f)?;
        self.device = device;
        Some(result)
    }

    /// One eventfd per queue (index = queue index). The device manager registers each with KVM
    /// as an ioeventfd on MMIO address base+0x50 (QueueNotify) with datamatch = queue index.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// Stops the device (calls VirtioDevice::reset); used at VM teardown.
    pub fn shutdown(&mut self) {
        self.reset();
    }

    fn reset(&mut self) {
        if self.with_device(|d| d.reset()).is_none() {
            warn!("virtio-mmio: device reset panicked; the device is gone");
        }
        for q in &mut self.queues {
            *q = QueueConfig::new(q.max_size);
        }
        // A kick left over from before the reset must not look like a new one.
        for evt in &self.queue_evts {
            let _ = evt.read();
        }
        self.interrupt.ack(u32::MAX);
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.status = 0;
    }

    fn selected_queue(&mut self) -> Option<&mut QueueConfig> {
        let sel = self.queue_sel as usize;
        let q = self.queues.get_mut(sel);
        if q.is_none() {
            warn!(
                queue = sel,
                "virtio-mmio: access to a queue that does not exist"
            );
        }
        q
    }

    /// Queue registers may only change between FEATURES_OK and DRIVER_OK, and
    /// (except QueueReady) only while the queue is not ready.
    fn queue_for_config(&mut self, register: u64) -> Option<&mut QueueConfig> {
        let configuring = self.status & STATUS_FEATURES_OK != 0
            && self.status & (STATUS_DRIVER_OK | STATUS_FAILED | STATUS_DEVICE_NEEDS_RESET) == 0;
        if !configuring {
            warn!(
                register,
                status = self.status,
                "virtio-mmio: queue register written outside queue setup"
            );
            return None;
        }
        let q = self.selected_queue()?;
        if q.ready && register != reg::QUEUE_READY {
            warn!(
                register,
                "virtio-mmio: queue register written while queue is ready"
            );
            return None;
        }
        Some(q)
    }

    fn read_reg(&self, offset: u64) -> u32 {
        let queue = self.queues.get(self.queue_sel as usize);
        match offset {
            reg::MAGIC_VALUE => MAGIC_VALUE,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => low_half(self.device.avail_features()),
                1 => low_half(self.device.avail_features() >> 32),
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size)),
            reg::QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready)),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status,
            // No shared memory regions: their length and base read as all ones (§4.2.2).
            reg::SHM_LEN_LOW..=reg::SHM_BASE_HIGH => u32::MAX,
            // No device changes its configuration space while running.
            reg::CONFIG_GENERATION => 0,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES => self.write_driver_features(v),
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NUM => {
                if let Some(q) = self.queue_for_config(offset) {
                    match u16::try_from(v) {
                        Ok(size) if size.is_power_of_two() && size <= q.max_size => q.size = size,
                        _ => {
                            warn!(
                                size = v,
                                max = q.max_size,
                                "virtio-mmio: invalid queue size"
                            );
                            // Remembered as invalid (0) so that DRIVER_OK fails instead of
                            // running the queue with a size the driver did not choose.
                            q.size = 0;
                        }
                    }
                }
            }
            reg::QUEUE_READY => {
                if let Some(q) = self.queue_for_config(offset) {
                    q.ready = v == 1;
                }
            }
            reg::QUEUE_NOTIFY => match self.queue_evts.get(v as usize) {
                Some(evt) => {
                    if let Err(e) = evt.write(1) {
                        warn!(queue = v, "virtio-mmio: cannot signal queue eventfd: {e}");
                    }
                }
                None => warn!(
                    queue = v,
                    "virtio-mmio: notify for a queue that does not exist"
                ),
            },
            reg::INTERRUPT_ACK => self.interrupt.ack(v),
            reg::STATUS => self.write_status(v),
            reg::QUEUE_DESC_LOW..=reg::QUEUE_DEVICE_HIGH => self.write_queue_addr(offset, v),
            reg::SHM_SEL => {}
            _ => warn!(
                offset,
                "virtio-mmio: write to a read-only or undefined register"
            ),
        }
    }

    fn write_driver_features(&mut self, v: u32) {
        if self.status != STATUS_ACKNOWLEDGE | STATUS_DRIVER {
            warn!(
                status = self.status,
                "virtio-mmio: driver features written outside negotiation"
            );
            return;
        }
        let v = u64::from(v);
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v,
            1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (v << 32),
            sel => warn!(sel, "virtio-mmio: driver features page does not exist"),
        }
    }

    fn write_queue_addr(&mut self, offset: u64, v: u32) {
        let Some(q) = self.queue_for_config(offset) else {
            return;
        };
        let (field, high) = match offset {
            reg::QUEUE_DESC_LOW => (&mut q.desc, false),
            reg::QUEUE_DESC_HIGH => (&mut q.desc, true),
            reg::QUEUE_DRIVER_LOW => (&mut q.driver, false),
            reg::QUEUE_DRIVER_HIGH => (&mut q.driver, true),
            reg::QUEUE_DEVICE_LOW => (&mut q.device, false),
            reg::QUEUE_DEVICE_HIGH => (&mut q.device, true),
            _ => {
                warn!(offset, "virtio-mmio: write to an undefined register");
                return;
            }
        };
        let v = u64::from(v);
        *field = if high {
            (*field & 0xffff_ffff) | (v << 32)
        } else {
            (*field & !0xffff_ffff) | v
        };
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            debug!("virtio-mmio: driver reset the device");
            self.reset();
            return;
        }
        if v & STATUS_FAILED != 0 {
            warn!(status = v, "virtio-mmio: driver gave up on the device");
            self.status |= STATUS_FAILED;
            return;
        }
        let old = self.status;
        if v & old != old {
            warn!(
                old,
                new = v,
                "virtio-mmio: driver cleared status bits without a reset"
            );
            return;
        }
        const ACK: u32 = STATUS_ACKNOWLEDGE;
        const ACK_DRV: u32 = ACK | STATUS_DRIVER;
        const ACK_DRV_FEAT: u32 = ACK_DRV | STATUS_FEATURES_OK;
        match (old, v & !old) {
            (_, 0) => {}
            (0, ACK) | (ACK, STATUS_DRIVER) => self.status = v,
            (ACK_DRV, STATUS_FEATURES_OK) => {
                let offered = self.device.avail_features();
                let unknown = self.driver_features & !offered;
                if unknown != 0 || self.driver_features & VIRTIO_F_VERSION_1 == 0 {
                    // Leaving FEATURES_OK clear is how the device refuses (§3.1.1).
                    warn!(
                        acked = self.driver_features,
                        offered, "virtio-mmio: driver features refused"
                    );
                } else {
                    self.status = v;
                }
            }
            (ACK_DRV_FEAT, STATUS_DRIVER_OK) => {
                self.status = v;
                if let Err(e) = self.activate() {
                    warn!("virtio-mmio: {e}");
                    self.status |= STATUS_DEVICE_NEEDS_RESET;
                    if let Err(e) = self.interrupt.signal_config_change() {
                        warn!("virtio-mmio: cannot signal config change: {e}");
                    }
                }
            }
            _ => warn!(
                old,
                new = v,
                "virtio-mmio: invalid device status transition"
            ),
        }
    }

    fn activate(&mut self) -> Result<(), MmioError> {
        let mut queues = Vec::new();
        let mut first_unready = None;
        for (index, cfg) in self.queues.iter().enumerate() {
            if !cfg.ready {
                first_unready.get_or_insert(index);
                continue;
            }
            if let Some(unready) = first_unready {
                return Err(MmioError::QueueGap {
                    ready: index,
                    unready,
                });
            }
            let queue = cfg.to_queue(index, &self.mem)?;
            let notify = self.queue_evts[index]
                .try_clone()
                .map_err(|source| MmioError::Eventfd { index, source })?;
            queues.push(ActiveQueue { queue, notify });
        }
        debug!(
            device = self.device.device_type(),
            queues = queues.len(),
            "virtio-mmio: activating device"
        );
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            acked_features: self.driver_features,
            queues,
            interrupt: self.interrupt.clone(),
            seccomp: self.seccomp,
        };
        self.with_device(move |d| d.activate(ctx))
            .ok_or(MmioError::Lost)??;
        Ok(())
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= reg::CONFIG {
            self.device.read_config(offset - reg::CONFIG, data);
            return;
        }
        if data.len() != 4 || offset & 3 != 0 {
            warn!(
                offset,
                len = data.len(),
                "virtio-mmio: register read that is not 4 bytes wide and aligned"
            );
            return;
        }
        data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            self.device.write_config(offset - reg::CONFIG, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            warn!(
                offset,
                len = data.len(),
                "virtio-mmio: register write that is not 4 bytes wide"
            );
            return;
        };
        if offset & 3 != 0 {
            warn!(offset, "virtio-mmio: misaligned register write");
            return;
        }
        self.write_reg(offset, u32::from_le_bytes(bytes));
    }
}

mod state;
pub use state::{QueueState, TransportState};

#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzz;
#[cfg(test)]
mod tests;
