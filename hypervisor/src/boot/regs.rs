//! vCPU state at kernel entry for the 64-bit boot protocol: long mode with
//! paging on, flat segments, rsi pointing at boot_params.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;

use super::loader::BOOT_GDT;
use crate::layout::*;

/// Errors setting a vCPU's boot state.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// A KVM register ioctl failed.
    #[error("cannot set vCPU {what}: {source}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM accepted only some of the boot MSRs.
    #[error("KVM accepted {set} of {want} boot MSRs")]
    Msrs { set: usize, want: usize },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RegsError {
    move |source| RegsError::Kvm { what, source }
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// Sets all boot state of the bootstrap processor. Application processors
/// only get FPU, MSRs and LAPIC: the kernel starts them with INIT/SIPI.
pub fn setup_vcpu(vcpu: &VcpuFd, id: u8, entry: u64) -> Result<(), RegsError> {
    setup_fpu(vcpu)?;
    setup_msrs(vcpu)?;
    setup_lapic(vcpu)?;
    if id == 0 {
        setup_regs(vcpu, entry)?;
        setup_sregs(vcpu)?;
    }
    Ok(())
}

fn setup_regs(vcpu: &VcpuFd, entry: u64) -> Result<(), RegsError> {
    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm_err("registers"))
}

/// kvm_segment for GDT entry `index` of [`BOOT_GDT`].
// Each `as` takes a masked bit field of the descriptor (at most 32 bits
// wide) or the selector of one of BOOT_GDT's few entries: none truncates.
#[allow(clippy::cast_possible_truncation)]
fn segment(index: usize) -> kvm_segment {
    let entry = BOOT_GDT[index];
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    let limit = ((entry >> 32) & 0x000f_0000) | (entry & 0x0000_ffff);
    let granular = bit(55) == 1;
    kvm_segment {
        base: ((entry >> 32) & 0xff00_0000) | ((entry >> 16) & 0x00ff_ffff),
        limit: if granular {
            ((limit << 12) | 0xfff) as u32
        } else {
            limit as u32
        },
        selector: (index * 8) as u16,
        type_: ((entry >> 40) & 0xf) as u8,
        present: bit(47),
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g: bit(55),
        avl: bit(52),
        unusable: u8::from(bit(47) == 0),
        padding: 0,
    }
}

/// The GDT's limit: its size in bytes less one (it has a few entries).
#[allow(clippy::cast_possible_truncation)]
const GDT_LIMIT: u16 = {
    assert!(BOOT_GDT.len() * 8 <= 1 << 16);
    (BOOT_GDT.len() * 8 - 1) as u16
};

fn setup_sregs(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(kvm_err("special registers"))?;
    let code = segment(1);
    let data = segment(2);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = GDT_LIMIT;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(3);
    sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
    sregs.cr3 = PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.efer |= EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).map_err(kvm_err("special registers"))
}

fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm_err("FPU"))
}

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default type write-back: without it guest RAM is uncached.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

fn setup_msrs(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let entries: Vec<kvm_msr_entry> = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect();
    let want = entries.len();
    let msrs = Msrs::from_entries(&entries).map_err(|_| RegsError::Msrs { set: 0, want })?;
    let set = vcpu.set_msrs(&msrs).map_err(kvm_err("MSRs"))?;
    if set != want {
        return Err(RegsError::Msrs { set, want });
    }
    Ok(())
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// LINT0 as ExtINT and LINT1 as NMI, as firmware would leave them.
fn setup_lapic(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut lapic = vcpu.get_lapic().map_err(kvm_err("LAPIC"))?;
    for (reg, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        // The register page is C chars (i8 here): the same bytes.
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[reg + i].to_ne_bytes()[0]);
        let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (i, b) in value.to_le_bytes().into_iter().enumerate() {
            lapic.regs[reg + i] = i8::from_ne_bytes([b]);
        }
    }
    vcpu.set_lapic(&lapic).map_err(kvm_err("LAPIC"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_segment_is_64_bit_flat() {
        let cs = segment(1);
        assert_eq!(
            (cs.selector, cs.l, cs.db, cs.present, cs.s, cs.type_),
            (8, 1, 0, 1, 1, 0xb)
        );
        assert_eq!((cs.base, cs.limit, cs.g), (0, 0xffff_ffff, 1));
        let tss = segment(3);
        assert_eq!((tss.selector, tss.type_, tss.s), (0x18, 0xb, 0));
    }
}
