//! containerd-shim-husk-v2: the containerd task API (v2) on husk microVMs.
//! The VMM runs inside this process; each pod (or `ctr run` task) is one VM.

pub mod agent;
#[cfg(test)]
mod alloc_probe;
pub mod beneath;
pub mod cgroup;
pub mod container;
pub mod errors;
pub mod events;
#[cfg(test)]
mod fakes;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod guest_profile;
pub mod guest_vm;
pub mod io;
pub mod kill;
#[cfg(test)]
mod lifecycle_tests;
pub mod logging;
pub mod metrics;
pub mod network;
pub mod options;
pub mod port_forward;
pub mod process;
pub mod rootfs;
pub mod sandbox;
pub mod seccomp;
pub mod service;
pub mod shim;
pub mod spec;
pub mod state;
pub mod template;
pub mod watch;

/// The runtime name containerd knows husk by.
pub const RUNTIME_ID: &str = "io.containerd.husk.v2";
