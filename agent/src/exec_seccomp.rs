//! The container's seccomp filter on processes exec'd into it (ExecSync,
//! `kubectl exec`, `ctr task exec`).
//!
//! libcontainer 0.7's tenant builder rebuilds the spec's `linux` section for
//! an exec and leaves `seccomp` out, so an exec'd process would run with no
//! filter at all. The agent loads the filter itself, in the exec'd process,
//! from [`crate::workload::HuskExecutor`] right before the exec.
//!
//! Without no_new_privs, loading a filter needs CAP_SYS_ADMIN, and by the
//! time the executor runs libcontainer has already dropped to the process's
//! capabilities. So, as runc does (filter first, then the capability drop),
//! libcontainer is given the process's capabilities plus CAP_SYS_ADMIN and
//! CAP_SETPCAP ([`prepare`]), and the executor loads the filter and then
//! drops to exactly the process's own ([`ExecSeccomp::apply`]). Nothing runs
//! the process's program in between: if either step fails, the executor
//! returns the error and nothing is exec'd.

use libcontainer::oci_spec::runtime::{
    Capabilities, Capability, LinuxCapabilities, LinuxSeccomp, Process,
};

use crate::error::{Error, Result};

/// What the executor does for an exec'd process of a container that has a
/// seccomp filter.
#[derive(Clone, Debug)]
pub struct ExecSeccomp {
    seccomp: LinuxSeccomp,
    /// The process's own capabilities, to drop to once the filter is
    /// loaded; `None`: libcontainer drops nothing either.
    capabilities: Option<LinuxCapabilities>,
}

/// The two capabilities the executor needs to load the filter
/// (CAP_SYS_ADMIN) and then shrink the bounding set (CAP_SETPCAP).
const FOR_THE_LOAD: [Capability; 2] = [Capability::SysAdmin, Capability::Setpcap];

/// Readies `process` (an exec into a container whose spec has `seccomp`):
/// widens its capabilities for libcontainer and returns what the executor
/// must do. `None` when the container has no filter.
pub fn prepare(
    process: &mut Process,
    seccomp: Option<&LinuxSeccomp>,
    what: &str,
) -> Result<Option<ExecSeccomp>> {
    let Some(seccomp) = seccomp else {
        return Ok(None);
    };
    if libcontainer::seccomp::is_notify(seccomp) {
        // The notify fd would have to reach a listener (listenerPath) that
        // nothing in the guest serves.
        return Err(Error::InvalidArgument(format!(
            "{what}: the container's seccomp profile uses SCMP_ACT_NOTIFY, which husk does not support"
        )));
    }
    let capabilities = process.capabilities().clone();
    if let Some(own) = &capabilities {
        process.set_capabilities(Some(widened(own)));
    }
    Ok(Some(ExecSeccomp {
        seccomp: seccomp.clone(),
        capabilities,
    }))
}

/// `own` plus [`FOR_THE_LOAD`] in the sets libcontainer's drop restricts:
/// bounding (absent means empty), effective and permitted (absent means
/// left alone, i.e. kept whole).
fn widened(own: &LinuxCapabilities) -> LinuxCapabilities {
    let plus = |set: &Option<Capabilities>| -> Capabilities {
        let mut set = set.clone().unwrap_or_default();
        set.extend(FOR_THE_LOAD);
        set
    };
    let mut caps = own.clone();
    caps.set_bounding(Some(plus(own.bounding())));
    if own.effective().is_some() {
        caps.set_effective(Some(plus(own.effective())));
    }
    if own.permitted().is_some() {
        caps.set_permitted(Some(plus(own.permitted())));
    }
    caps
}

impl ExecSeccomp {
    /// Loads the filter into the calling process, then drops to the
    /// process's own capabilities. Runs in the exec'd process, after
    /// libcontainer's setup, right before the exec.
    pub fn apply(&self) -> std::result::Result<(), String> {
        match libcontainer::seccomp::initialize_seccomp(&self.seccomp) {
            Ok(None) => {}
            Ok(Some(fd)) => {
                // prepare() refused notify profiles; never exec with a
                // filter whose notifications nobody answers.
                let _ = nix::unistd::close(fd);
                return Err("seccomp filter returned a notify fd".into());
            }
            Err(e) => return Err(format!("load the container's seccomp filter: {e}")),
        }
        if let Some(caps) = &self.capabilities {
            let syscall = libcontainer::syscall::syscall::create_syscall();
            libcontainer::capabilities::drop_privileges(caps, syscall.as_ref())
                .map_err(|e| format!("drop capabilities after seccomp: {e}"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libcontainer::oci_spec::runtime::{
        LinuxCapabilitiesBuilder, LinuxSeccompAction, LinuxSeccompBuilder, LinuxSyscallBuilder,
        ProcessBuilder,
    };

    fn seccomp(action: LinuxSeccompAction) -> LinuxSeccomp {
        LinuxSeccompBuilder::default()
            .default_action(LinuxSeccompAction::ScmpActAllow)
            .syscalls(vec![LinuxSyscallBuilder::default()
                .names(vec!["sethostname".to_string()])
                .action(action)
                .build()
                .unwrap()])
            .build()
            .unwrap()
    }

    /// `prepare` for a container whose filter denies sethostname.
    fn filtered(process: &mut Process) -> ExecSeccomp {
        prepare(
            process,
            Some(&seccomp(LinuxSeccompAction::ScmpActErrno)),
            "exec e1",
        )
        .unwrap()
        .unwrap()
    }

    fn set(caps: &[Capability]) -> Capabilities {
        caps.iter().copied().collect()
    }

    #[test]
    fn no_filter_changes_nothing() {
        let mut process = Process::default();
        let before = process.clone();
        assert!(prepare(&mut process, None, "exec e1").unwrap().is_none());
        assert_eq!(process, before);
    }

    #[test]
    fn libcontainer_gets_the_load_capabilities_and_the_executor_the_real_ones() {
        let own = LinuxCapabilitiesBuilder::default()
            .bounding(set(&[Capability::Chown, Capability::NetRaw]))
            .effective(set(&[Capability::Chown]))
            .permitted(set(&[Capability::Chown]))
            .inheritable(set(&[]))
            .build()
            .unwrap();
        let mut process = ProcessBuilder::default()
            .capabilities(own.clone())
            .build()
            .unwrap();
        let filter = filtered(&mut process);
        assert_eq!(filter.capabilities.as_ref(), Some(&own));
        let given = process.capabilities().clone().unwrap();
        assert_eq!(
            given.bounding().clone().unwrap(),
            set(&[
                Capability::Chown,
                Capability::NetRaw,
                Capability::SysAdmin,
                Capability::Setpcap
            ])
        );
        let load = set(&[Capability::Chown, Capability::SysAdmin, Capability::Setpcap]);
        assert_eq!(given.effective().clone().unwrap(), load);
        assert_eq!(given.permitted().clone().unwrap(), load);
        // Sets the drop leaves alone stay as they were.
        assert_eq!(given.inheritable(), own.inheritable());
        assert_eq!(given.ambient(), own.ambient());
    }

    #[test]
    fn absent_sets_keep_their_meaning() {
        // No bounding set means an empty one to libcontainer: only the two
        // load capabilities survive its drop; absent effective/permitted
        // mean "keep", and stay absent.
        let mut own = LinuxCapabilities::default();
        own.set_bounding(None);
        own.set_effective(None);
        own.set_permitted(None);
        let mut process = ProcessBuilder::default().capabilities(own).build().unwrap();
        filtered(&mut process);
        let given = process.capabilities().clone().unwrap();
        assert_eq!(given.bounding().clone().unwrap(), set(&FOR_THE_LOAD));
        assert_eq!(given.effective(), &None);
        assert_eq!(given.permitted(), &None);
    }

    #[test]
    fn a_process_without_capabilities_is_left_so() {
        let mut process = ProcessBuilder::default().build().unwrap();
        process.set_capabilities(None);
        let filter = filtered(&mut process);
        assert!(filter.capabilities.is_none());
        assert!(process.capabilities().is_none());
    }

    #[test]
    fn notify_profiles_are_refused_by_name() {
        let mut process = Process::default();
        let err = prepare(
            &mut process,
            Some(&seccomp(LinuxSeccompAction::ScmpActNotify)),
            "exec e1 in container c1",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("exec e1 in container c1"), "{err}");
        assert!(err.contains("SCMP_ACT_NOTIFY"), "{err}");
    }
}
