//! What a waiter can learn about a booting guest. The VM (husk-hypervisor)
//! implements it; husk-vsock's boot wait reads it. It lives here so the VMM
//! library does not depend on the async agent client to implement it.

/// What a waiter can learn about a booting guest (the VM implements it).
pub trait GuestWatch {
    /// A count of the guest's signs of life that only grows while the
    /// guest makes progress.
    fn progress(&self) -> u64;
    /// Why the VM ended, if it did.
    fn ended(&self) -> Option<String>;
    /// What the guest is doing now, for an error message.
    fn describe(&self) -> String;
}
