//! Arbitrary guest memory (descriptor tables, rings, frames) through the
//! virtio-net worker's tx path into a real tap (in a private network
//! namespace), plus one tap frame delivered into the fuzzed rx buffers.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    husk_hypervisor::devices::virtio::net::fuzz::fuzz_queues(data);
});
