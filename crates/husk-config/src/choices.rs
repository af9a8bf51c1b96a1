//! The settings that take one of a few words (`hypervisor.host_profile`,
//! `hypervisor.console`, `shared_fs.cache`), parsed once at load with an
//! error naming the key and the allowed words.

use std::path::PathBuf;

use serde::Deserialize;

/// One of a fixed set of words: `Ok` with the variant, or an error naming
/// the value and the allowed words.
fn choice<T: Copy>(value: &str, allowed: &[(&str, T)]) -> Result<T, String> {
    allowed
        .iter()
        .find(|(name, _)| *name == value)
        .map(|(_, v)| *v)
        .ok_or_else(|| {
            let names: Vec<&str> = allowed.iter().map(|(name, _)| *name).collect();
            format!("{value:?} is not one of {}", names.join(", "))
        })
}

/// `hypervisor.host_profile`: which platform profile guests get.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(try_from = "String")]
pub enum HostProfile {
    /// Detect the host kind (a nested PVM host has `/sys/module/kvm_pvm`).
    #[default]
    Auto,
    /// Bare-metal KVM: nothing special.
    Native,
    /// Nested PVM (README.md: nested PVM hosts).
    NestedPvm,
}

impl HostProfile {
    const NAMES: &[(&str, HostProfile)] = &[
        ("auto", HostProfile::Auto),
        ("native", HostProfile::Native),
        ("nested-pvm", HostProfile::NestedPvm),
    ];
}

impl TryFrom<String> for HostProfile {
    type Error = String;
    fn try_from(value: String) -> Result<Self, String> {
        value
            .parse()
            .map_err(|e| format!("hypervisor.host_profile: {e}"))
    }
}

/// The words of `hypervisor.host_profile` (also husk-vmm's `--host-profile`).
impl std::str::FromStr for HostProfile {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        choice(s, Self::NAMES)
    }
}

/// `hypervisor.console`: where the guest's serial console goes.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum Console {
    /// `"log"`: into the host process's log.
    Log,
    /// `"none"`: discarded.
    None,
    /// Any other value: appended to this file (relative to the config's
    /// directory after [`Config::load`]).
    File(PathBuf),
}

impl TryFrom<String> for Console {
    type Error = String;
    fn try_from(value: String) -> Result<Self, String> {
        value
            .parse()
            .map_err(|e| format!("hypervisor.console: {e}"))
    }
}

/// The words of `hypervisor.console` (also husk-vmm's `--console`).
impl std::str::FromStr for Console {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "log" => Ok(Console::Log),
            "none" => Ok(Console::None),
            "" => Err("empty; expected \"log\", \"none\" or a file path".into()),
            path => Ok(Console::File(path.into())),
        }
    }
}

/// `shared_fs.cache`: how much the guest may cache of a virtio-fs share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(try_from = "String")]
pub enum CachePolicy {
    /// Every access asks the host.
    Never,
    /// Entries and attributes cached, data not.
    Metadata,
    /// Close-to-open: coherent with host changes within a second.
    #[default]
    Auto,
    /// Everything cached: only for shares nothing on the host changes.
    Always,
}

impl CachePolicy {
    const NAMES: &[(&str, CachePolicy)] = &[
        ("never", CachePolicy::Never),
        ("metadata", CachePolicy::Metadata),
        ("auto", CachePolicy::Auto),
        ("always", CachePolicy::Always),
    ];
}

impl TryFrom<String> for CachePolicy {
    type Error = String;
    fn try_from(value: String) -> Result<Self, String> {
        choice(&value, Self::NAMES).map_err(|e| format!("shared_fs.cache: {e}"))
    }
}

/// `hypervisor.template`: whether sandboxes start from a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(try_from = "String")]
pub enum TemplatePolicy {
    /// Each VM shape (vCPUs, memory, NICs, kernel, initramfs) is booted
    /// once up to its agent and snapshotted; its sandboxes restore it.
    #[default]
    Auto,
    /// Every sandbox boots its guest.
    Off,
}

impl TemplatePolicy {
    const NAMES: &[(&str, TemplatePolicy)] =
        &[("auto", TemplatePolicy::Auto), ("off", TemplatePolicy::Off)];
}

impl TryFrom<String> for TemplatePolicy {
    type Error = String;
    fn try_from(value: String) -> Result<Self, String> {
        choice(&value, Self::NAMES).map_err(|e| format!("hypervisor.template: {e}"))
    }
}
