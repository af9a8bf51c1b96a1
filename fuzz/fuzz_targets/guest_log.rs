//! The agent's log stream (guest → host vsock port 1025) through the host's
//! receiver: framing into bounded lines, parsing, escaping, level capping,
//! the `tracing` events they become; the same lines however the stream is
//! cut (see `crates/husk-vsock/src/fuzzing.rs`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    husk_vsock::fuzzing::fuzz_guest_log(data);
});
