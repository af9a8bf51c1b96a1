//! How fast this host runs guest kernel-mode code, measured in a throwaway
//! VM that runs a counting loop at CPL0 (no guest kernel, a few pages of
//! memory, well under a second). On bare-metal KVM the loop runs at native
//! speed; on a nested PVM host guest kernel code goes through KVM's
//! instruction emulator and runs three orders of magnitude slower, and how
//! much slower differs from host to host. A guest boot is dominated by that
//! code there, so the rate predicts the boot time (`husk check` says both).

use std::time::{Duration, Instant};

use kvm_ioctls::{Kvm, VcpuExit};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::boot::{self, regs};
use crate::host::HostProfile;
use crate::{cpuid, memory};

/// Errors measuring.
#[derive(Debug, thiserror::Error)]
pub enum CalibrateError {
    #[error("cannot open /dev/kvm: {0}")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("KVM {what} failed: {source}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot set up the calibration VM: {0}")]
    Setup(String),
    #[error("the calibration loop ended unexpectedly: {0}")]
    UnexpectedExit(String),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> CalibrateError {
    move |source| CalibrateError::Kvm { what, source }
}

/// Iterations of the loop between two port writes.
const BATCH: u32 = 100_000;
/// Measuring stops after this long or [`MAX_BATCHES`] batches.
const MEASURE_FOR: Duration = Duration::from_millis(300);
const MAX_BATCHES: u32 = 2_000;
const CODE_START: u64 = 0x1_0000;
const CALIBRATION_PORT: u16 = 0x80;
/// Enough for the boot GDT, page tables and the code (anonymous, sparse).
const MEMORY_MIB: u64 = 64;

/// `start: mov ecx, BATCH; l: dec ecx; jnz l; out 0x80, al; jmp start`
// Machine code: the port is an 8-bit immediate (0x80) and the jump back a
// negative rel8 of a 13-byte loop, both written as their bytes.
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]
fn loop_code() -> Vec<u8> {
    let mut code = vec![0xb9];
    code.extend_from_slice(&BATCH.to_le_bytes());
    code.extend_from_slice(&[0xff, 0xc9, 0x75, 0xfc, 0xe6, CALIBRATION_PORT as u8]);
    // jmp rel8 back to start: the offset counts from the next instruction.
    let back = -(code.len() as i8 + 2);
    code.extend_from_slice(&[0xeb, back as u8]);
    code
}

/// What the measurement found.
#[derive(Debug, Clone, Copy)]
pub struct KernelSpeed {
    /// Loop iterations per second at guest CPL0.
    pub iterations_per_sec: f64,
}

/// Loop iterations a husk guest boot is worth: measured on a nested PVM
/// host (2026-12-02, Intel Xeon, kvm_pvm) where the loop ran at
/// 2.0 M iterations/s (1.8-2.0 over three runs) and a cold boot to
/// agent-ready took 28.6 s.
const BOOT_COST_ITERATIONS: f64 = 57.0e6;
/// Below this rate guest kernel code is emulated, not run natively.
const EMULATED_BELOW: f64 = 100.0e6;
/// A boot never takes less than this, however fast the loop (bare metal).
const MIN_BOOT: Duration = Duration::from_millis(100);

impl KernelSpeed {
    /// Whether guest kernel code runs through an emulator here.
    pub fn is_emulated(&self) -> bool {
        self.iterations_per_sec < EMULATED_BELOW
    }

    /// Roughly how long a cold boot of the husk guest takes on this host.
    pub fn estimated_boot(&self) -> Duration {
        if self.iterations_per_sec <= 0.0 {
            return Duration::MAX;
        }
        Duration::from_secs_f64(BOOT_COST_ITERATIONS / self.iterations_per_sec).max(MIN_BOOT)
    }
}

/// Runs the loop in a fresh VM and measures it.
pub fn measure_kernel_speed(profile: HostProfile) -> Result<KernelSpeed, CalibrateError> {
    let kvm = Kvm::new().map_err(CalibrateError::OpenKvm)?;
    let vm = kvm.create_vm().map_err(kvm_err("create VM"))?;
    vm.create_irq_chip().map_err(kvm_err("create irqchip"))?;
    let mem: GuestMemoryMmap =
        memory::create(MEMORY_MIB).map_err(|e| CalibrateError::Setup(e.to_string()))?;
    memory::register(&vm, &mem).map_err(|e| CalibrateError::Setup(e.to_string()))?;
    boot::loader::write_gdt_and_page_tables(&mem)
        .map_err(|e| CalibrateError::Setup(e.to_string()))?;
    mem.write_slice(&loop_code(), GuestAddress(CODE_START))
        .map_err(|e| CalibrateError::Setup(e.to_string()))?;

    let mut vcpu = vm.create_vcpu(0).map_err(kvm_err("create vCPU"))?;
    let template = cpuid::base(
        &kvm,
        &cpuid::CpuidPolicy::default(),
        profile.hidden_features(),
    )
    .map_err(|e| CalibrateError::Setup(e.to_string()))?;
    vcpu.set_cpuid2(&cpuid::for_vcpu(&template, 0, 1))
        .map_err(kvm_err("set CPUID"))?;
    regs::setup_vcpu(&vcpu, 0, CODE_START).map_err(|e| CalibrateError::Setup(e.to_string()))?;

    let mut run_batch = || match vcpu.run() {
        Ok(VcpuExit::IoOut(CALIBRATION_PORT, _)) => Ok(()),
        Ok(other) => Err(CalibrateError::UnexpectedExit(format!("{other:?}"))),
        Err(e) => Err(CalibrateError::UnexpectedExit(e.to_string())),
    };
    // The first batch pays for entering the guest; time the ones after it.
    run_batch()?;
    let started = Instant::now();
    let mut batches = 0u32;
    while batches < MAX_BATCHES && started.elapsed() < MEASURE_FOR {
        run_batch()?;
        batches += 1;
    }
    let secs = started.elapsed().as_secs_f64();
    Ok(KernelSpeed {
        iterations_per_sec: f64::from(batches) * f64::from(BATCH) / secs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loop_jumps_back_to_its_start() {
        let code = loop_code();
        assert_eq!(code.len(), 13);
        // The jmp's target is offset 0.
        let after_jmp = i64::try_from(code.len()).unwrap();
        let rel8 = |b: u8| i64::from(i8::from_ne_bytes([b]));
        assert_eq!(after_jmp + rel8(code[12]), 0);
        // The jnz's target is the dec at offset 5.
        assert_eq!(9 + rel8(code[8]), 5);
    }

    #[test]
    fn estimates_are_bounded() {
        let native = KernelSpeed {
            iterations_per_sec: 2.0e9,
        };
        assert!(!native.is_emulated());
        assert_eq!(native.estimated_boot(), MIN_BOOT);
        let nested = KernelSpeed {
            iterations_per_sec: 1.9e6,
        };
        assert!(nested.is_emulated());
        let secs = nested.estimated_boot().as_secs_f64();
        assert!((25.0..35.0).contains(&secs), "{secs}");
    }

    #[test]
    fn measures_this_host() {
        if !std::path::Path::new("/dev/kvm").exists() {
            assert!(std::env::var_os("CI").is_none(), "CI must have /dev/kvm");
            eprintln!("skipped: no /dev/kvm");
            return;
        }
        let speed = measure_kernel_speed(HostProfile::detect()).unwrap();
        assert!(speed.iterations_per_sec > 0.0, "{speed:?}");
        assert_eq!(
            speed.is_emulated(),
            HostProfile::detect() == HostProfile::NestedPvm,
            "{speed:?}"
        );
    }
}
