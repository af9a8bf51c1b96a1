//! The hybrid-vsock handshake, both sides: the same bytes as what a host
//! client sends the VMM (`CONNECT <port>\n`, parsed by the vsock device's
//! handshake) and as what a VMM answers the host (`OK <port>\n`, parsed by
//! husk-vsock's client). See `hypervisor/src/devices/virtio/vsock/fuzz.rs`
//! and `crates/husk-vsock/src/fuzzing.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    husk_hypervisor::devices::virtio::vsock::fuzz::fuzz_handshake(data);
    husk_vsock::fuzzing::fuzz_connect_reply(data);
});
