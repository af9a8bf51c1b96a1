//! The guest's CPUID: what KVM supports, with the topology filled in and the
//! features the policy hides taken out.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

/// Errors building the guest CPUID.
#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    /// KVM_GET_SUPPORTED_CPUID failed.
    #[error("cannot read the CPUID KVM supports: {0}")]
    Supported(#[source] kvm_ioctls::Error),
    /// The policy names a feature this VMM does not know.
    #[error("unknown CPU feature {0:?} in the CPUID policy (known: {known})", known = known_features())]
    UnknownFeature(String),
}

#[derive(Debug, Clone, Copy)]
enum Reg {
    Ebx,
    Ecx,
    Edx,
}

/// (name, leaf, subleaf, register, bit) of every feature the policy can hide.
const FEATURES: &[(&str, u32, u32, Reg, u32)] = &[
    ("sse3", 1, 0, Reg::Ecx, 0),
    ("pclmulqdq", 1, 0, Reg::Ecx, 1),
    ("ssse3", 1, 0, Reg::Ecx, 9),
    ("fma", 1, 0, Reg::Ecx, 12),
    ("cx16", 1, 0, Reg::Ecx, 13),
    ("pcid", 1, 0, Reg::Ecx, 17),
    ("sse4.1", 1, 0, Reg::Ecx, 19),
    ("sse4.2", 1, 0, Reg::Ecx, 20),
    ("x2apic", 1, 0, Reg::Ecx, 21),
    ("movbe", 1, 0, Reg::Ecx, 22),
    ("popcnt", 1, 0, Reg::Ecx, 23),
    ("tsc-deadline", 1, 0, Reg::Ecx, 24),
    ("aes", 1, 0, Reg::Ecx, 25),
    ("xsave", 1, 0, Reg::Ecx, 26),
    ("avx", 1, 0, Reg::Ecx, 28),
    ("f16c", 1, 0, Reg::Ecx, 29),
    ("rdrand", 1, 0, Reg::Ecx, 30),
    ("bmi1", 7, 0, Reg::Ebx, 3),
    ("avx2", 7, 0, Reg::Ebx, 5),
    ("smep", 7, 0, Reg::Ebx, 7),
    ("bmi2", 7, 0, Reg::Ebx, 8),
    ("erms", 7, 0, Reg::Ebx, 9),
    ("invpcid", 7, 0, Reg::Ebx, 10),
    ("avx512f", 7, 0, Reg::Ebx, 16),
    ("rdseed", 7, 0, Reg::Ebx, 18),
    ("adx", 7, 0, Reg::Ebx, 19),
    ("smap", 7, 0, Reg::Ebx, 20),
    ("sha", 7, 0, Reg::Ebx, 29),
    ("umip", 7, 0, Reg::Ecx, 2),
    ("pku", 7, 0, Reg::Ecx, 3),
    ("la57", 7, 0, Reg::Ecx, 16),
    ("rdpid", 7, 0, Reg::Ecx, 22),
    ("pdpe1gb", 0x8000_0001, 0, Reg::Edx, 26),
    ("rdtscp", 0x8000_0001, 0, Reg::Edx, 27),
    ("invtsc", 0x8000_0007, 0, Reg::Edx, 8),
    ("invtsc", 0x8000_0007, 0, Reg::Edx, 8),
];

fn known_features() -> String {
    FEATURES.iter().map(|f| f.0).collect::<Vec<_>>().join(", ")
}

/// Which CPU features to hide from the guest, by name (e.g. "cx16").
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CpuidPolicy {
    pub hide: Vec<String>,
}

impl CpuidPolicy {
    /// Checks that every name is known, so a typo fails at configuration time.
    pub fn validate(&self) -> Result<(), CpuidError> {
        for name in &self.hide {
            feature(name)?;
        }
        Ok(())
    }
}

fn feature(name: &str) -> Result<(u32, u32, Reg, u32), CpuidError> {
    FEATURES
        .iter()
        .find(|f| f.0 == name)
        .map(|f| (f.1, f.2, f.3, f.4))
        .ok_or_else(|| CpuidError::UnknownFeature(name.to_string()))
}

const LEAF_FEATURES: u32 = 0x1;
const LEAF_PMU: u32 = 0xa;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;

/// The CPUID template for all vCPUs; [`for_vcpu`] personalises it.
pub fn base(kvm: &Kvm, policy: &CpuidPolicy, extra_hidden: &[&str]) -> Result<CpuId, CpuidError> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(CpuidError::Supported)?;
    let hidden = policy
        .hide
        .iter()
        .map(String::as_str)
        .chain(extra_hidden.iter().copied());
    for name in hidden {
        let (leaf, subleaf, reg, bit) = feature(name)?;
        for e in cpuid.as_mut_slice() {
            if e.function == leaf && e.index == subleaf {
                *reg_mut(e, reg) &= !(1 << bit);
            }
        }
    }
    for e in cpuid.as_mut_slice() {
        match e.function {
            LEAF_FEATURES => e.ecx |= ECX_HYPERVISOR,
            // No virtual PMU: the guest would only probe MSRs that trap.
            LEAF_PMU => (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, 0, 0),
            _ => {}
        }
    }
    Ok(cpuid)
}

/// Per-vCPU CPUID: APIC IDs and the number of logical processors.
pub fn for_vcpu(template: &CpuId, vcpu_id: u8, vcpu_count: u8) -> CpuId {
    let mut cpuid = template.clone();
    for e in cpuid.as_mut_slice() {
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (e.ebx & 0x0000_ffff)
                    | (u32::from(vcpu_id) << 24)
                    | (u32::from(vcpu_count) << 16);
                if vcpu_count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => e.edx = u32::from(vcpu_id),
            _ => {}
        }
    }
    cpuid
}

fn reg_mut(e: &mut kvm_cpuid_entry2, reg: Reg) -> &mut u32 {
    match reg {
        Reg::Ebx => &mut e.ebx,
        Reg::Ecx => &mut e.ecx,
        Reg::Edx => &mut e.edx,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_feature_is_named() {
        let p = CpuidPolicy {
            hide: vec!["cx16".into(), "cx61".into()],
        };
        let err = p.validate().unwrap_err().to_string();
        assert!(err.contains("\"cx61\""), "{err}");
    }

    #[test]
    fn hides_features_and_sets_topology() {
        let Ok(kvm) = Kvm::new() else {
            assert!(std::env::var_os("CI").is_none(), "CI must have /dev/kvm");
            eprintln!("skipped: no /dev/kvm");
            return;
        };
        let policy = CpuidPolicy {
            hide: vec!["rdrand".into(), "invtsc".into()],
        };
        let template = base(&kvm, &policy, &["cx16"]).unwrap();
        let cpuid = for_vcpu(&template, 1, 2);
        let leaf1 = cpuid.as_slice().iter().find(|e| e.function == 1).unwrap();
        assert_eq!(leaf1.ecx & (1 << 13), 0, "cx16 hidden");
        assert_eq!(leaf1.ecx & (1 << 30), 0, "rdrand hidden");
        if let Some(power) = cpuid.as_slice().iter().find(|e| e.function == 0x8000_0007) {
            assert_eq!(power.edx & (1 << 8), 0, "invtsc hidden");
        }
        assert_ne!(leaf1.ecx & ECX_HYPERVISOR, 0);
        assert_eq!(leaf1.ebx >> 24, 1);
        assert_eq!((leaf1.ebx >> 16) & 0xff, 2);
    }
}
