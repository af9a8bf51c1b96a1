//! The VM generation ID (Microsoft's "Virtual Machine Generation ID"
//! spec, which Linux's vmgenid driver implements): 16 random bytes at
//! [`VMGENID_START`] that change whenever a guest is started from a
//! snapshot. After a restore the VMM writes a new ID and raises the generic
//! event device's line ([`GED_GSI`]); the guest's `_EVT` notifies the VGEN
//! device, the driver sees a new ID and reseeds the guest's RNG at once
//! ("crng reseeded due to virtual machine fork"), so two guests restored
//! from one template do not share random state. The DSDT side is in
//! crate::acpi.

use std::io;

use kvm_ioctls::VmFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{GED_GSI, VMGENID_LEN, VMGENID_START};

/// Errors setting or announcing a generation ID.
#[derive(Debug, thiserror::Error)]
pub enum VmGenIdError {
    #[error("cannot read random bytes for the VM generation ID: {0}")]
    Random(#[source] io::Error),
    #[error("cannot write the VM generation ID into guest memory: {0}")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
    #[error("cannot raise the generation ID interrupt: {0}")]
    Interrupt(#[source] kvm_ioctls::Error),
}

/// A new random ID, from the host's kernel RNG.
fn random_id() -> Result<[u8; VMGENID_LEN], VmGenIdError> {
    let mut id = [0u8; VMGENID_LEN];
    let mut filled = 0;
    while filled < id.len() {
        let rest = &mut id[filled..];
        // SAFETY: getrandom writes at most `rest.len()` bytes into `rest`,
        // which is valid, writable memory of that length.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        match usize::try_from(n) {
            Ok(n) => filled += n,
            Err(_) => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(VmGenIdError::Random(e));
                }
            }
        }
    }
    Ok(id)
}

/// Writes a new generation ID into guest memory and returns it.
pub fn write_new_id(mem: &GuestMemoryMmap) -> Result<[u8; VMGENID_LEN], VmGenIdError> {
    let id = random_id()?;
    mem.write_slice(&id, GuestAddress(VMGENID_START))
        .map_err(VmGenIdError::GuestMemory)?;
    Ok(id)
}

/// Tells the guest the ID changed: an edge on the generic event device's
/// line (edge-triggered in its `_CRS`: raise, then lower).
pub fn announce(vm_fd: &VmFd) -> Result<(), VmGenIdError> {
    vm_fd
        .set_irq_line(GED_GSI, true)
        .and_then(|()| vm_fd.set_irq_line(GED_GSI, false))
        .map_err(VmGenIdError::Interrupt)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_id_is_new_and_lands_where_the_dsdt_points() {
        let mem = crate::memory::create(64).unwrap();
        let first = write_new_id(&mem).unwrap();
        let mut seen = [0u8; VMGENID_LEN];
        mem.read_slice(&mut seen, GuestAddress(VMGENID_START))
            .unwrap();
        assert_eq!(seen, first);
        let second = write_new_id(&mem).unwrap();
        assert_ne!(first, second, "two IDs of 128 random bits collided");
        mem.read_slice(&mut seen, GuestAddress(VMGENID_START))
            .unwrap();
        assert_eq!(seen, second);
    }
}
