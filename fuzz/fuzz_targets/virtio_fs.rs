//! Arbitrary guest memory (descriptor tables, rings, FUSE requests) through
//! the virtio-fs worker and fuse-backend-rs's server, against a real
//! directory on a private tmpfs.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    husk_hypervisor::devices::virtio::fs::fuzz::fuzz_requests(data);
});
