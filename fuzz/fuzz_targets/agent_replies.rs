//! What a hostile guest agent answers the shim: ttrpc frames and protobuf
//! payloads read by the shim's real ttrpc client and typed agent, then the
//! shim's own conversions (metrics, pids, exit status, OOM ids) and error
//! mapping (see `shim/src/fuzzing.rs`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    husk_shim::fuzzing::fuzz_agent_replies(data);
});
