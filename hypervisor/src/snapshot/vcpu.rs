//! One vCPU's architectural state, as KVM gives it and takes it back.

use kvm_bindings::{
    kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

use super::SnapshotError;

/// Most MSRs one KVM_SET_MSRS takes here (kvm-bindings' FAM limit).
const MSR_CHUNK: usize = 64;

/// A stopped vCPU's state (Firecracker keeps the same set).
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    /// None where KVM has no XCRs (no KVM_CAP_XCRS).
    pub xcrs: Option<kvm_xcrs>,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub vcpu_events: kvm_vcpu_events,
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> SnapshotError {
    move |source| SnapshotError::Kvm { what, source }
}

impl VcpuState {
    /// Reads the state of a vCPU that is not running (its thread parked it
    /// after completing any pending I/O). `msr_indices` are the MSRs KVM
    /// saves (KVM_GET_MSR_INDEX_LIST); those this vCPU cannot read are
    /// left out.
    pub fn capture(fd: &VcpuFd, msr_indices: &[u32]) -> Result<Self, SnapshotError> {
        let mut msrs = Vec::with_capacity(msr_indices.len());
        for &index in msr_indices {
            let entry = kvm_msr_entry {
                index,
                ..Default::default()
            };
            let mut one =
                Msrs::from_entries(&[entry]).map_err(|e| SnapshotError::Msrs(e.to_string()))?;
            if fd.get_msrs(&mut one).map_err(kvm("get MSRs"))? == 1 {
                msrs.extend_from_slice(one.as_slice());
            }
        }
        Ok(Self {
            mp_state: fd.get_mp_state().map_err(kvm("get MP state"))?,
            regs: fd.get_regs().map_err(kvm("get registers"))?,
            sregs: fd.get_sregs().map_err(kvm("get special registers"))?,
            xsave: fd.get_xsave().map_err(kvm("get XSAVE state"))?,
            xcrs: fd.get_xcrs().ok(),
            debugregs: fd.get_debug_regs().map_err(kvm("get debug registers"))?,
            lapic: fd.get_lapic().map_err(kvm("get local APIC"))?,
            msrs,
            vcpu_events: fd.get_vcpu_events().map_err(kvm("get vCPU events"))?,
        })
    }

    /// Puts the state into a new vCPU (CPUID already set), in the order
    /// Firecracker uses: the LAPIC after the special registers (APIC base),
    /// MSRs after the LAPIC (TSC deadline), events last.
    pub fn restore(&self, fd: &VcpuFd) -> Result<(), SnapshotError> {
        fd.set_mp_state(self.mp_state)
            .map_err(kvm("set MP state"))?;
        fd.set_regs(&self.regs).map_err(kvm("set registers"))?;
        fd.set_sregs(&self.sregs)
            .map_err(kvm("set special registers"))?;
        // SAFETY: the buffer is a whole kvm_xsave read by KVM_GET_XSAVE on a
        // host of the same identity (the snapshot's header says so); no
        // dynamically enabled XSAVE feature (AMX) is ever requested, so
        // KVM reads no more than the struct holds.
        unsafe { fd.set_xsave(&self.xsave) }.map_err(kvm("set XSAVE state"))?;
        if let Some(xcrs) = &self.xcrs {
            fd.set_xcrs(xcrs).map_err(kvm("set XCRs"))?;
        }
        fd.set_debug_regs(&self.debugregs)
            .map_err(kvm("set debug registers"))?;
        fd.set_lapic(&self.lapic).map_err(kvm("set local APIC"))?;
        for chunk in self.msrs.chunks(MSR_CHUNK) {
            let msrs = Msrs::from_entries(chunk).map_err(|e| SnapshotError::Msrs(e.to_string()))?;
            let set = fd.set_msrs(&msrs).map_err(kvm("set MSRs"))?;
            if set != chunk.len() {
                let refused = chunk.get(set).map_or(0, |m| m.index);
                return Err(SnapshotError::Msrs(format!(
                    "KVM refused MSR {refused:#x} ({set} of {} set)",
                    chunk.len()
                )));
            }
        }
        fd.set_vcpu_events(&self.vcpu_events)
            .map_err(kvm("set vCPU events"))?;
        Ok(())
    }
}
