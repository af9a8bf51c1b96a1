//! Register accesses on the virtio-mmio transport: an optional driver
//! prologue with fuzzed values, then arbitrary accesses. The device checks
//! what the transport promises it: only valid queues, only accepted features,
//! never two activations without a reset (see
//! `hypervisor/src/devices/virtio/mmio/fuzz.rs`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    husk_hypervisor::devices::virtio::mmio::fuzz::fuzz_registers(data);
});
