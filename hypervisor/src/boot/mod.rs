//! Direct 64-bit Linux boot: what goes into guest memory before the first
//! instruction (`loader`), and the vCPU state the kernel is entered with
//! (`regs`).

pub mod loader;
pub mod regs;

pub use loader::{load, BootError, BootInputs, LoadedImage};
