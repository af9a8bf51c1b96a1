//! Arbitrary guest memory (descriptor tables, rings, buffers) through the
//! vsock device's tx and rx processing, against real Unix sockets.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    husk_hypervisor::devices::virtio::vsock::fuzz::fuzz_queues(data);
});
