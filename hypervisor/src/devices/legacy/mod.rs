//! Legacy platform devices: the COM1 serial console and the ports through
//! which the guest powers off or resets the machine.

pub mod power;
pub mod serial;
