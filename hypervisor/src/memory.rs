//! Guest memory: allocation and registration with KVM.

use kvm_ioctls::VmFd;
use vm_memory::{Address, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};

use crate::layout::{MMIO_GAP_END, MMIO_GAP_START};

/// Errors setting up guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The requested size is outside what the VMM supports.
    #[error("guest memory of {0} MiB is out of range (64 MiB to 1 TiB)")]
    InvalidSize(u64),
    /// mmap of guest memory failed.
    #[error("cannot allocate guest memory: {0}")]
    Allocate(#[source] vm_memory::mmap::FromRangesError),
    /// KVM refused a memory slot.
    #[error("cannot register guest memory region {slot} with KVM: {source}")]
    Register {
        slot: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// RAM ranges for `mem_bytes` of guest memory, leaving the MMIO gap free.
pub fn ram_ranges(mem_bytes: u64) -> Result<Vec<(GuestAddress, usize)>, MemoryError> {
    let size =
        |bytes: u64| usize::try_from(bytes).map_err(|_| MemoryError::InvalidSize(mem_bytes >> 20));
    Ok(if mem_bytes <= MMIO_GAP_START {
        vec![(GuestAddress(0), size(mem_bytes)?)]
    } else {
        vec![
            (GuestAddress(0), size(MMIO_GAP_START)?),
            (
                GuestAddress(MMIO_GAP_END),
                size(mem_bytes - MMIO_GAP_START)?,
            ),
        ]
    })
}

/// Allocates guest memory (anonymous, not populated: pages cost host memory
/// only once the guest touches them).
pub fn create(mem_mib: u64) -> Result<GuestMemoryMmap, MemoryError> {
    if !(64..=1 << 20).contains(&mem_mib) {
        return Err(MemoryError::InvalidSize(mem_mib));
    }
    GuestMemoryMmap::from_ranges(&ram_ranges(mem_mib << 20)?).map_err(MemoryError::Allocate)
}

/// Registers every region of `mem` with KVM, one slot each.
pub fn register(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), MemoryError> {
    for (slot, region) in (0u32..).zip(mem.iter()) {
        let userspace_addr = region.as_ptr() as u64;
        let region_desc = kvm_bindings::kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr,
        };
        // SAFETY: the region is a live mapping owned by `mem`, which the VM
        // keeps alive (and does not resize or unmap) for as long as the VmFd
        // exists; slots do not overlap since regions come from one collection.
        unsafe { vm.set_user_memory_region(region_desc) }
            .map_err(|source| MemoryError::Register { slot, source })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_region_below_the_gap() {
        assert_eq!(
            ram_ranges(256 << 20).unwrap(),
            vec![(GuestAddress(0), 256 << 20)]
        );
    }

    #[test]
    fn large_guest_skips_the_mmio_gap() {
        let r = ram_ranges(4 << 30).unwrap();
        assert_eq!(r[0], (GuestAddress(0), 0xc000_0000));
        assert_eq!(r[1], (GuestAddress(MMIO_GAP_END), 1 << 30));
    }

    #[test]
    fn rejects_tiny_and_huge_sizes() {
        assert!(create(1).is_err());
        assert!(create(2 << 20).is_err());
        assert!(create(64).is_ok());
    }
}
