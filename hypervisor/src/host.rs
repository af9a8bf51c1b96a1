//! What kind of KVM host this is, and what that means for the guest.
//!
//! On bare-metal KVM the guest runs as it is. On a *nested PVM* host (the
//! `kvm_pvm` module; guest kernel code goes through KVM's instruction
//! emulator) some instructions cannot be emulated, so the VMM hides or
//! disables them and turns on the guest kernel's `husk.pvm_quirks`.
//! See shared/design/environment.md for the measurements behind this.

use std::path::Path;

/// Which platform profile to apply to guests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostProfile {
    /// Bare-metal (or ordinary nested) KVM: nothing special.
    Native,
    /// Nested PVM: hide CMPXCHG16B, disable XSAVE, POPCNT and SMAP in the
    /// guest kernel, and enable the guest patch for misrouted syscalls.
    NestedPvm,
}

/// How the profile is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HostProfileSetting {
    /// Detect from the host (the default).
    #[default]
    Auto,
    /// Force a profile, e.g. to test one on the other kind of host.
    Force(HostProfile),
}

const KVM_PVM_MODULE: &str = "/sys/module/kvm_pvm";

impl HostProfile {
    /// Detects the host: a loaded `kvm_pvm` module means nested PVM.
    pub fn detect() -> Self {
        Self::detect_at(Path::new(KVM_PVM_MODULE))
    }

    fn detect_at(module: &Path) -> Self {
        if module.exists() {
            HostProfile::NestedPvm
        } else {
            HostProfile::Native
        }
    }

    pub fn resolve(setting: HostProfileSetting) -> Self {
        match setting {
            HostProfileSetting::Auto => Self::detect(),
            HostProfileSetting::Force(p) => p,
        }
    }

    /// Guest kernel arguments this profile needs.
    pub fn kernel_args(self) -> &'static str {
        match self {
            HostProfile::Native => "",
            // xrstor, popcnt and clac/stac cannot be emulated; CPUID bits for
            // them are forced on by the host, so the guest is told on the
            // command line. husk.pvm_quirks is our guest patch's switch.
            //
            // The rest cuts guest kernel work, which is emulated here
            // (measured with HUSK_GUEST_PROFILE on a restored `ctr run`: the
            // timer interrupt took 30 % of the guest's time, a percpu chunk
            // 12 %): `percpu_alloc=page` makes percpu units 4 KiB-page sized,
            // so a new chunk (made as cgroups come and go) zeroes ~0.3 MiB of
            // memcg bookkeeping instead of 4 MiB; `psi=0` drops pressure
            // accounting from every tick and context switch (no
            // /proc/pressure in the guest); `highres=off` serves timers
            // from the tick instead of an interrupt each (timer resolution
            // 10 ms). The guest runs ~1000x slower than its clock, so
            // `husk.pvm_clock_stretch=16` (our second guest patch) makes the
            // busy tick come every 160 ms, CFS slices 16x longer and the
            // PELT clock 16x slower. The same profile put RCU's
            // grace-period kthread at 7 %: forcing quiescent states every 16
            // jiffies instead of every one scans less, and expedited grace
            // periods (cheap with one vCPU) keep synchronize_rcu() from
            // waiting out the stretched tick.
            HostProfile::NestedPvm => {
                "noxsave clearcpuid=popcnt,smap husk.pvm_quirks \
                 husk.pvm_clock_stretch=16 percpu_alloc=page psi=0 highres=off \
                 rcupdate.rcu_expedited=1 rcutree.jiffies_till_first_fqs=16 \
                 rcutree.jiffies_till_next_fqs=16"
            }
        }
    }

    /// CPU features this profile hides through CPUID.
    pub fn hidden_features(self) -> &'static [&'static str] {
        match self {
            HostProfile::Native => &[],
            // `lock cmpxchg16b` (SLUB) is not emulated; hiding CX16 sticks.
            HostProfile::NestedPvm => &["cx16"],
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            HostProfile::Native => "native",
            HostProfile::NestedPvm => "nested-pvm",
        }
    }
}

/// KVM capabilities the VMM relies on, by name.
const REQUIRED_CAPS: &[(&str, kvm_ioctls::Cap)] = &[
    ("IRQCHIP", kvm_ioctls::Cap::Irqchip),
    ("IRQFD", kvm_ioctls::Cap::Irqfd),
    ("IOEVENTFD", kvm_ioctls::Cap::Ioeventfd),
    ("USER_MEMORY", kvm_ioctls::Cap::UserMemory),
    ("SET_TSS_ADDR", kvm_ioctls::Cap::SetTssAddr),
    ("EXT_CPUID", kvm_ioctls::Cap::ExtCpuid),
    ("IMMEDIATE_EXIT", kvm_ioctls::Cap::ImmediateExit),
];

/// What `husk check` reports about KVM.
#[derive(Debug)]
pub struct KvmReport {
    pub api_version: i32,
    /// (capability, present)
    pub capabilities: Vec<(&'static str, bool)>,
    pub max_vcpus: usize,
}

/// Opens /dev/kvm and lists the capabilities husk needs.
pub fn check_kvm() -> Result<KvmReport, kvm_ioctls::Error> {
    let kvm = kvm_ioctls::Kvm::new()?;
    Ok(KvmReport {
        api_version: kvm.get_api_version(),
        capabilities: REQUIRED_CAPS
            .iter()
            .map(|(name, cap)| (*name, kvm.check_extension(*cap)))
            .collect(),
        max_vcpus: kvm.get_max_vcpus(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_by_module_presence() {
        let dir = std::env::temp_dir().join(format!("husk-host-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(HostProfile::detect_at(&dir), HostProfile::NestedPvm);
        assert_eq!(
            HostProfile::detect_at(&dir.join("absent")),
            HostProfile::Native
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn native_profile_changes_nothing() {
        assert_eq!(HostProfile::Native.kernel_args(), "");
        assert!(HostProfile::Native.hidden_features().is_empty());
        assert!(HostProfile::NestedPvm
            .kernel_args()
            .contains("husk.pvm_quirks"));
    }

    #[test]
    fn nested_profile_arguments_are_single_spaced_words() {
        let args = HostProfile::NestedPvm.kernel_args();
        let words: Vec<&str> = args.split_whitespace().collect();
        assert_eq!(words.join(" "), args, "one space between arguments");
        for arg in [
            "noxsave",
            "husk.pvm_clock_stretch=16",
            "percpu_alloc=page",
            "psi=0",
            "highres=off",
            "rcupdate.rcu_expedited=1",
        ] {
            assert!(words.contains(&arg), "{arg} missing from {args:?}");
        }
    }
}
