//! virtio-net (device ID 1) over a tap, for Kubernetes pods in the
//! tc-filter model: CNI puts veth `eth0` in the pod's network namespace, the
//! shim creates a tap next to it ([`open_tap`]) and mirrors the two with tc,
//! and this device moves frames between the tap and the guest.
//!
//! Queues: rx (0) and tx (1); no control queue. The 12-byte virtio-net
//! header goes through the tap unchanged (IFF_VNET_HDR, TUNSETVNETHDRSZ 12),
//! so checksum and TSO offloads cost nothing here: what the guest negotiates
//! for receiving is what the tap is told it may hand out (TUNSETOFFLOAD), and
//! frames the guest sends with offloads it did not negotiate are dropped.
//! Mergeable rx buffers are supported, so a guest with TSO does not have to
//! post 64 KiB buffers.
//!
//! Everything in a chain is guest-controlled: tx chains are copied into a
//! bounded buffer ([`MAX_TX_FRAME`]) before the tap sees them; malformed
//! chains are returned and counted, with at most one log line per second.

#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzz;
mod tap;
mod worker;

use std::sync::Arc;

use tracing::{debug, warn};
use virtio_bindings::bindings::virtio_net::*;
use virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;

use super::{
    read_config_bytes, take_queues, ActivateContext, ActivateError, DeviceWorker, VirtioDevice,
    VIRTIO_F_VERSION_1,
};
use worker::{Features, Worker};

pub use tap::{open_tap, Tap, VNET_HDR_LEN};
/// Also used by virtio-fs: both devices log what a guest does wrong.
pub(crate) use worker::LogLimiter;
pub use worker::{NetStats, MAX_TX_FRAME};

/// Virtio device ID of a network card.
pub const VIRTIO_ID_NET: u32 = 1;
/// rx, tx.
const QUEUE_SIZES: [u16; 2] = [256; 2];
/// mac (6), status (2), max_virtqueue_pairs (2), mtu (2).
const CONFIG_LEN: usize = 12;
/// The config space's 16-bit status field with the link up (bit 0).
#[allow(clippy::cast_possible_truncation)]
const LINK_UP_STATUS: u16 = VIRTIO_NET_S_LINK_UP as u16;
/// Smallest MTU the spec allows a device to report (IPv4's minimum).
pub const MIN_MTU: u16 = 68;

/// Errors creating a virtio-net device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A multicast or all-zero MAC cannot be a NIC's address.
    #[error("MAC address {} is multicast or zero", fmt_mac(.0))]
    InvalidMac([u8; 6]),
    /// The MTU is below 68.
    #[error("MTU {0} is below the minimum of 68")]
    InvalidMtu(u16),
}

fn fmt_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The virtio-net device. Holds the tap open for its whole life (a tap
/// [`open_tap`] created goes away when the device is dropped).
pub struct Net {
    tap: Arc<Tap>,
    mac: [u8; 6],
    mtu: Option<u16>,
    config: [u8; CONFIG_LEN],
    stats: Arc<NetStats>,
    worker: Option<DeviceWorker>,
}

impl Net {
    /// A NIC with address `mac` on `tap`. `mtu`, if given, is offered to the
    /// guest (VIRTIO_NET_F_MTU) — set it to the pod interface's MTU.
    pub fn new(tap: Tap, mac: [u8; 6], mtu: Option<u16>) -> Result<Net, NetError> {
        if mac[0] & 1 != 0 || mac == [0; 6] {
            return Err(NetError::InvalidMac(mac));
        }
        if let Some(m) = mtu {
            if m < MIN_MTU {
                return Err(NetError::InvalidMtu(m));
            }
        }
        let mut config = [0u8; CONFIG_LEN];
        config[..6].copy_from_slice(&mac);
        config[6..8].copy_from_slice(&LINK_UP_STATUS.to_le_bytes());
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        config[10..12].copy_from_slice(&mtu.unwrap_or(0).to_le_bytes());
        Ok(Net {
            tap: Arc::new(tap),
            mac,
            mtu,
            config,
            stats: Arc::default(),
            worker: None,
        })
    }

    pub fn tap(&self) -> &Tap {
        &self.tap
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    pub fn mtu(&self) -> Option<u16> {
        self.mtu
    }

    /// Frames moved and dropped since the device was created (a handle the
    /// VMM can keep after handing the device to the transport).
    pub fn stats(&self) -> Arc<NetStats> {
        self.stats.clone()
    }

    #[cfg(test)]
    fn worker_tid(&self) -> Option<i32> {
        self.worker.as_ref().map(DeviceWorker::tid)
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn name(&self) -> &'static str {
        "virtio-net"
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        let bits = [
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_NET_F_STATUS,
            VIRTIO_RING_F_INDIRECT_DESC,
        ];
        let mut features = bits.iter().fold(VIRTIO_F_VERSION_1, |f, &b| f | 1 << b);
        if self.mtu.is_some() {
            features |= 1 << VIRTIO_NET_F_MTU;
        }
        features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    // write_config: the default (read-only). The MAC is writable only with
    // VIRTIO_NET_F_CTRL_MAC_ADDR's legacy path, which is not offered.

    fn is_active(&self) -> bool {
        self.worker.is_some()
    }

    fn start(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let queues = take_queues::<2>(ctx.queues)?;
        let features = Features::from_acked(ctx.acked_features);
        if let Err(e) = self.tap.set_offload(features.tap_offload()) {
            // Without offloads the tap hands out plain frames, which every
            // guest accepts; only throughput suffers.
            warn!(
                tap = self.tap.name(),
                "virtio-net: {e}; continuing without offloads"
            );
            self.tap.set_offload(0).map_err(ActivateError::Worker)?;
        }
        let worker = Worker::new(
            ctx.mem,
            queues,
            ctx.interrupt,
            self.tap.clone(),
            features,
            self.stats.clone(),
        )
        .map_err(ActivateError::Worker)?;
        self.worker = Some(DeviceWorker::start(
            "husk-net",
            worker,
            crate::confine::confine_device_worker,
            ctx.seccomp,
        )?);
        debug!(tap = self.tap.name(), ?features, "virtio-net: activated");
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(worker) = self.worker.take() {
            worker.stop();
            debug!(tap = self.tap.name(), "virtio-net: reset");
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.reset();
    }
}

#[cfg(test)]
mod tests;
