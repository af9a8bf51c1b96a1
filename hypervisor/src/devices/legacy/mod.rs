//! Legacy platform devices: the COM1 serial console and the ports through
//! which the guest powers off or resets the machine.

#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzz;
pub mod power;
pub mod serial;
