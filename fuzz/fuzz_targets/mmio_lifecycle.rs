//! Driver-shaped sequences (resets, status steps, feature pages, queue
//! select/size/addresses/ready, notifies, whole bring-ups) against the real
//! vsock device behind the virtio-mmio transport: the device runs exactly
//! when the status says so, a reset really resets, only valid queues reach
//! it, and a driver can always bring it up again (see
//! `hypervisor/src/devices/virtio/mmio/fuzz.rs`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    husk_hypervisor::devices::virtio::mmio::fuzz::fuzz_lifecycle(data);
});
