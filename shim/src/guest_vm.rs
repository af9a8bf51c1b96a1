//! What the shim needs of a running VM ([`GuestVm`]), and the real one: the
//! in-process KVM VMM of husk-hypervisor ([`KvmVm`]). How a VM comes to run
//! (a cold boot today) is [`crate::sandbox::Launcher`]'s business.

use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::Mutex;

use async_trait::async_trait;
use husk_hypervisor::{ExitReason, Vm};
use husk_util::sync::lock;
use tokio::io::unix::AsyncFd;

#[async_trait]
pub trait GuestVm: Send + Sync {
    /// Whether the VM runs (it is not stopped, stopping, or ended).
    fn is_running(&self) -> bool;
    /// Resolves when the VM ended on its own (guest poweroff or crash).
    async fn exited(&self) -> ExitReason;
    /// Stops the VMM: every open agent call then fails instead of hanging.
    /// Idempotent.
    async fn stop(&self);
    /// What the guest was doing (for errors about a guest that does not
    /// answer); None once the VM is gone.
    fn describe(&self) -> Option<String>;
    /// The guest's last lines of output (console and agent log), escaped;
    /// None once the VM is gone.
    fn last_output(&self) -> Option<String>;
}

/// A VM of the in-process VMM.
pub struct KvmVm {
    vm: Mutex<Option<Vm>>,
    exit_fd: OwnedFd,
}

impl KvmVm {
    pub fn new(vm: Vm) -> std::io::Result<Self> {
        // SAFETY: the fd is the VM's exit eventfd, open while `vm` lives; it
        // is only duplicated here.
        let exit_fd = unsafe { BorrowedFd::borrow_raw(vm.exit_fd()) }.try_clone_to_owned()?;
        Ok(Self {
            vm: Mutex::new(Some(vm)),
            exit_fd,
        })
    }
}

impl KvmVm {
    /// One profile sample of every vCPU; none once the VM is gone.
    pub fn profile_sample(
        &self,
        timeout: std::time::Duration,
    ) -> Option<Vec<husk_hypervisor::profile::ProfileSample>> {
        lock(&self.vm).as_ref().map(|vm| vm.profile_sample(timeout))
    }
}

#[async_trait]
impl GuestVm for KvmVm {
    fn is_running(&self) -> bool {
        lock(&self.vm)
            .as_ref()
            .is_some_and(|vm| vm.exit_reason().is_none())
    }

    async fn exited(&self) -> ExitReason {
        let registered = self.exit_fd.try_clone().and_then(|fd| {
            // SAFETY: `fd` is an owned duplicate of the VM's exit eventfd;
            // AsyncFd owns it and nothing else closes or replaces it.
            unsafe { AsyncFd::register(fd) }.map_err(std::io::Error::from)
        });
        match registered {
            Ok(fd) => {
                let _ = fd.readable().await;
            }
            Err(e) => {
                tracing::error!("cannot watch the VM's exit: {e}");
                std::future::pending::<()>().await;
            }
        }
        lock(&self.vm)
            .as_ref()
            .and_then(Vm::exit_reason)
            .unwrap_or(ExitReason::Stopped)
    }

    async fn stop(&self) {
        let Some(mut vm) = lock(&self.vm).take() else {
            return;
        };
        let reason = tokio::task::spawn_blocking(move || vm.stop()).await;
        tracing::info!("VM stopped: {reason:?}");
    }

    fn describe(&self) -> Option<String> {
        lock(&self.vm).as_ref().map(Vm::describe_guest)
    }

    fn last_output(&self) -> Option<String> {
        lock(&self.vm).as_ref().map(|vm| {
            let tail = vm.last_output().join(" | ");
            match vm.panic_line() {
                Some(panic) if !tail.contains(&panic) => format!("{panic} | ... | {tail}"),
                _ => tail,
            }
        })
    }
}
