//! The transport as a snapshot keeps it: the registers the driver wrote
//! and, per queue, where the device stands in its rings.
//!
//! Snapshots are taken of quiesced templates only (vCPUs stopped, the
//! device's worker stopped after finishing its batch). Then every chain the
//! device popped was also returned, so the used ring's index is where the
//! device resumes in both rings: no device has to hand back queue state.

use serde::{Deserialize, Serialize};
use vm_memory::{Address, Bytes, GuestAddress};

use super::{
    MmioError, MmioTransport, QueueConfig, STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER_OK,
    STATUS_FAILED,
};

/// One queue of a snapshotted transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    pub size: u16,
    pub ready: bool,
    pub desc: u64,
    pub driver: u64,
    pub device: u64,
    /// The used ring's index when the device stopped.
    pub next_index: u16,
}

/// A snapshotted virtio-mmio transport.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    pub device_type: u32,
    pub status: u32,
    pub driver_features: u64,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub queue_sel: u32,
    pub interrupt_status: u32,
    pub queues: Vec<QueueState>,
}

/// Offset of `idx` in the used ring (virtio 1.2 §2.7.8).
const USED_IDX_OFFSET: u64 = 2;

impl MmioTransport {
    /// Stops the device's worker and returns the transport's state. The
    /// device stays stopped: a snapshot ends its VM.
    pub fn save(&mut self) -> TransportState {
        if self.with_device(|d| d.reset()).is_none() {
            tracing::warn!("virtio-mmio: device reset panicked while snapshotting");
        }
        let active = self.status & STATUS_DRIVER_OK != 0;
        let queues = self
            .queues
            .iter()
            .map(|q| QueueState {
                size: q.size,
                ready: q.ready,
                desc: q.desc,
                driver: q.driver,
                device: q.device,
                next_index: if active && q.ready {
                    self.used_index(q.device)
                } else {
                    0
                },
            })
            .collect();
        TransportState {
            device_type: self.device.device_type(),
            status: self.status,
            driver_features: self.driver_features,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt.status(),
            queues,
        }
    }

    fn used_index(&self, used_ring: u64) -> u16 {
        let at = GuestAddress(used_ring).checked_add(USED_IDX_OFFSET);
        at.and_then(|at| self.mem.read_obj::<u16>(at).ok())
            .map_or(0, u16::from_le)
    }

    /// Takes back a saved state on a new transport of the same device, and
    /// starts the device if the driver had. Checked against the device: a
    /// state that does not fit is refused before anything changes.
    pub fn restore(&mut self, state: &TransportState) -> Result<(), MmioError> {
        let device_type = self.device.device_type();
        if state.device_type != device_type {
            return Err(MmioError::Restore(format!(
                "device type {} in the snapshot, {device_type} here",
                state.device_type
            )));
        }
        if state.queues.len() != self.queues.len() {
            return Err(MmioError::Restore(format!(
                "{} queues in the snapshot, {} here",
                state.queues.len(),
                self.queues.len()
            )));
        }
        let offered = self.device.avail_features();
        if state.driver_features & !offered != 0 {
            return Err(MmioError::Restore(format!(
                "features {:#x} acked in the snapshot, {offered:#x} offered here",
                state.driver_features
            )));
        }
        for (index, (saved, q)) in state.queues.iter().zip(&self.queues).enumerate() {
            if saved.size > q.max_size {
                return Err(MmioError::Restore(format!(
                    "queue {index}: size {} above {}",
                    saved.size, q.max_size
                )));
            }
        }
        for (saved, q) in state.queues.iter().zip(self.queues.iter_mut()) {
            *q = QueueConfig {
                max_size: q.max_size,
                size: saved.size,
                ready: saved.ready,
                desc: saved.desc,
                driver: saved.driver,
                device: saved.device,
                next_index: saved.next_index,
            };
        }
        self.status = state.status;
        self.driver_features = state.driver_features;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.queue_sel = state.queue_sel;
        self.interrupt.restore_status(state.interrupt_status);
        let broken = STATUS_FAILED | STATUS_DEVICE_NEEDS_RESET;
        if self.status & STATUS_DRIVER_OK != 0 && self.status & broken == 0 {
            self.activate()?;
        }
        Ok(())
    }
}
