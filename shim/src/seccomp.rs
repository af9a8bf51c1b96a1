//! The shim process's seccomp deny list (the list itself is husk-hypervisor's
//! `seccomp::install_process_deny_list`; each VMM thread adds its own
//! allow-list on top).

/// Installs the deny list on the calling thread, which must be `main`
/// before any other thread exists: every thread inherits it. Skipped when
/// the configuration found at startup (`$HUSK_CONFIG`, `/etc/husk/husk.toml`,
/// the installed default) says `[hypervisor] seccomp = false`; a config
/// named later by a runtime option cannot undo it, which is the safe way
/// round. A kernel without seccomp is reported on stderr (containerd's log)
/// and the shim goes on: its VMs then fail to start, naming the filter.
pub fn confine_process() {
    let enabled = husk_config::Config::discover()
        .map(|c| c.hypervisor.seccomp)
        .unwrap_or(true);
    if !enabled {
        return;
    }
    if let Err(e) = husk_hypervisor::seccomp::install_process_deny_list() {
        eprintln!("containerd-shim-husk-v2: {e}");
    }
}
