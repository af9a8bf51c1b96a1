//! husk-agent: PID 1 of every husk microVM.
//!
//! - [`init`]: PID-1 setup (mounts, console, cgroups), host isolation
//! - [`reaper`]: reaps children, delivers exit statuses to registered waiters
//! - [`logging`]: `tracing` → bounded queue → host vsock port 1025
//! - [`service`]: the agent protocol over ttrpc
//! - [`container`]: containers via libcontainer; [`process`], [`spec`],
//!   [`workload`], [`exec_seccomp`], [`exec_wait`], [`cgroup`] and [`mounts`]
//!   serve it
//! - [`stdio`], [`io_server`]: process stdio as vsock streams (port 1026)
//! - [`sandbox`]: the pod (hostname, DNS files, storages, guest details)
//! - [`network`]: interfaces and routes over netlink
//! - [`sysctl`]: pod sysctls of the namespaces containers share with the VM
//! - [`vsock_peer`]: only the host's CID is served, on every port
//! - [`error`]: RPC errors as ttrpc statuses
//! - [`power`]: power-off, and the panic hook that uses it
//! - [`clocks`]: the clocksource and clockevent the guest kernel chose
//! - [`args`]: command line

pub mod args;
pub mod cgroup;
pub mod clocks;
pub mod container;
pub mod error;
pub mod exec_seccomp;
pub mod exec_wait;
pub mod host_sync;
pub mod init;
pub mod io_server;
pub mod logging;
pub mod mounts;
pub mod network;
pub mod power;
pub mod process;
pub mod reaper;
pub mod sandbox;
pub mod service;
pub mod spec;
pub mod stdio;
pub mod sysctl;
pub mod vsock_peer;
pub mod workload;

/// Where the agent keeps its state in the guest (a tmpfs).
pub const RUN_DIR: &str = "/run/husk";

/// What the agent is doing in this process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// PID 1 of a guest: mounts, reaping of orphans, power-off on Shutdown.
    Init,
    /// `--listen` on a host, for tests: none of the PID-1 duties.
    Host,
}

impl Mode {
    /// `--listen` always means host mode (nothing system-wide is touched);
    /// otherwise only PID 1 may act as init. `None`: refuse to run.
    pub fn detect(is_pid1: bool, listen: Option<&str>) -> Option<Mode> {
        match (listen, is_pid1) {
            (Some(_), _) => Some(Mode::Host),
            (None, true) => Some(Mode::Init),
            (None, false) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_duties_need_pid_1_and_no_listen() {
        assert_eq!(Mode::detect(true, None), Some(Mode::Init));
        assert_eq!(Mode::detect(true, Some("unix:///s")), Some(Mode::Host));
        assert_eq!(Mode::detect(false, Some("unix:///s")), Some(Mode::Host));
        assert_eq!(Mode::detect(false, None), None);
    }
}
