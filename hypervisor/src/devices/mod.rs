//! Devices the VMM emulates: legacy platform devices and virtio devices.

pub mod legacy;
pub mod virtio;
