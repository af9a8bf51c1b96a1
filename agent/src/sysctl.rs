//! Pod sysctls that belong to the VM's own namespaces.
//!
//! The shim takes a pod's network, IPC and UTS namespaces out of its
//! containers' specs: in husk the VM *is* the pod, so its containers share
//! the guest's own. libcontainer (like runc) refuses a namespaced sysctl for
//! a namespace the container does not create ("not allowed in the host's
//! namespace"), which would fail every pod with `net.*`, `kernel.shm*` or
//! `fs.mqueue.*` sysctls. So the agent takes those out of the spec and
//! writes them itself, to the VM's namespaces, which are the pod's.
//! Sysctls of namespaces the container does create, and sysctls of no
//! namespace at all, are left for libcontainer to apply or refuse.

use std::collections::HashMap;
use std::path::Path;

use libcontainer::oci_spec::runtime::LinuxNamespaceType;

use crate::error::{Error, Result};

/// Namespaces a sysctl can belong to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SysctlNamespace {
    Ipc,
    Uts,
    Network,
}

impl SysctlNamespace {
    /// The spec's namespace type of this namespace.
    fn spec_type(self) -> LinuxNamespaceType {
        match self {
            SysctlNamespace::Ipc => LinuxNamespaceType::Ipc,
            SysctlNamespace::Uts => LinuxNamespaceType::Uts,
            SysctlNamespace::Network => LinuxNamespaceType::Network,
        }
    }
}

/// The IPC sysctls the kernel namespaces (as runc's validation lists them).
const IPC_SYSCTLS: &[&str] = &[
    "kernel.msgmax",
    "kernel.msgmnb",
    "kernel.msgmni",
    "kernel.sem",
    "kernel.shmall",
    "kernel.shmmax",
    "kernel.shmmni",
    "kernel.shm_rmid_forced",
];

/// The namespace `name` belongs to, or `None` for a sysctl of the whole
/// kernel.
pub fn namespace_of(name: &str) -> Option<SysctlNamespace> {
    if IPC_SYSCTLS.contains(&name) || name.starts_with("fs.mqueue.") {
        Some(SysctlNamespace::Ipc)
    } else if name == "kernel.hostname" || name == "kernel.domainname" {
        Some(SysctlNamespace::Uts)
    } else if name.starts_with("net.") {
        Some(SysctlNamespace::Network)
    } else {
        None
    }
}

/// Takes out of `sysctls` those of a namespace not in `own_namespaces`
/// (the namespaces the container creates): they are the VM's to set.
/// Returned sorted by name, so they are applied in a stable order.
pub fn take_vm_sysctls(
    sysctls: &mut HashMap<String, String>,
    own_namespaces: &[LinuxNamespaceType],
) -> Vec<(String, String)> {
    let vm_wide: Vec<String> = sysctls
        .keys()
        .filter(|name| {
            namespace_of(name).is_some_and(|ns| !own_namespaces.contains(&ns.spec_type()))
        })
        .cloned()
        .collect();
    let mut taken: Vec<(String, String)> = vm_wide
        .into_iter()
        .filter_map(|name| sysctls.remove_entry(&name))
        .collect();
    taken.sort();
    taken
}

/// The file under a `/proc/sys` root that holds `name`, refusing names that
/// are not dotted words (so none can name a path outside that root).
fn relative_path(name: &str) -> Result<String> {
    let valid = !name.is_empty()
        && name.split('.').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        });
    if !valid {
        return Err(Error::InvalidArgument(format!(
            "sysctl {name:?}: not a dotted sysctl name"
        )));
    }
    Ok(name.replace('.', "/"))
}

/// Writes each sysctl under `proc_sys` (`/proc/sys` in the guest).
pub fn apply(proc_sys: &Path, sysctls: &[(String, String)]) -> Result<()> {
    for (name, value) in sysctls {
        let path = proc_sys.join(relative_path(name)?);
        std::fs::write(&path, value.as_bytes()).map_err(|e| {
            Error::InvalidArgument(format!(
                "sysctl {name}={value:?}: write {}: {e}",
                path.display()
            ))
        })?;
        tracing::debug!(sysctl = %name, value = %value, "set in the VM's namespace");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sysctls(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn namespaces_as_the_kernel_has_them() {
        assert_eq!(
            namespace_of("kernel.shm_rmid_forced"),
            Some(SysctlNamespace::Ipc)
        );
        assert_eq!(
            namespace_of("fs.mqueue.msg_max"),
            Some(SysctlNamespace::Ipc)
        );
        assert_eq!(namespace_of("kernel.hostname"), Some(SysctlNamespace::Uts));
        assert_eq!(
            namespace_of("net.ipv4.ip_forward"),
            Some(SysctlNamespace::Network)
        );
        assert_eq!(namespace_of("kernel.panic"), None);
        assert_eq!(namespace_of("fs.file-max"), None);
        assert_eq!(namespace_of("kernel.shm_other"), None);
    }

    #[test]
    fn only_sysctls_of_shared_namespaces_are_taken() {
        let mut s = sysctls(&[
            ("net.ipv4.ip_unprivileged_port_start", "0"),
            ("kernel.shm_rmid_forced", "1"),
            ("fs.mqueue.msg_max", "100"),
            ("kernel.domainname", "example"),
            ("kernel.panic", "5"),
        ]);
        // The container has an IPC namespace of its own: its IPC sysctls
        // are libcontainer's; network and UTS are the VM's.
        let taken = take_vm_sysctls(
            &mut s,
            &[
                LinuxNamespaceType::Ipc,
                LinuxNamespaceType::Mount,
                LinuxNamespaceType::Pid,
            ],
        );
        assert_eq!(
            taken,
            [
                ("kernel.domainname".to_string(), "example".to_string()),
                ("net.ipv4.ip_unprivileged_port_start".into(), "0".into()),
            ]
        );
        let mut left: Vec<_> = s.keys().cloned().collect();
        left.sort();
        assert_eq!(
            left,
            [
                "fs.mqueue.msg_max",
                "kernel.panic",
                "kernel.shm_rmid_forced"
            ]
        );
    }

    #[test]
    fn applied_under_the_root_and_bad_names_refused() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("kernel")).unwrap();
        std::fs::create_dir_all(root.path().join("net/ipv4")).unwrap();
        apply(
            root.path(),
            &[
                ("kernel.shm_rmid_forced".into(), "1".into()),
                ("net.ipv4.ip_forward".into(), "0".into()),
            ],
        )
        .unwrap();
        assert_eq!(
            std::fs::read_to_string(root.path().join("kernel/shm_rmid_forced")).unwrap(),
            "1"
        );
        assert_eq!(
            std::fs::read_to_string(root.path().join("net/ipv4/ip_forward")).unwrap(),
            "0"
        );
        for bad in [
            "net..x",
            "net/../../etc",
            "",
            ".net",
            "net.ipv4.",
            "net.a b",
        ] {
            let err = apply(root.path(), &[(bad.into(), "1".into())]).unwrap_err();
            assert!(
                matches!(&err, Error::InvalidArgument(m) if m.contains("not a dotted sysctl name")),
                "{bad:?}: {err}"
            );
        }
        // A sysctl the kernel does not have is an error naming it.
        let err = apply(root.path(), &[("net.nope.x".into(), "1".into())]).unwrap_err();
        assert!(err.to_string().contains("sysctl net.nope.x"), "{err}");
    }
}
