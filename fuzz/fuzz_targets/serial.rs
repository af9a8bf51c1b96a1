//! Port reads and writes to COM1 (the 8250/16550 serial console), checked
//! against a model: the console gets exactly the transmitted bytes, in
//! bounded lines, rate-limited with every drop announced (see
//! `hypervisor/src/devices/legacy/fuzz.rs`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    husk_hypervisor::devices::legacy::fuzz::fuzz_serial(data);
});
