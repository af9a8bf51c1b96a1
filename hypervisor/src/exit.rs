//! Why a VM stopped, and how the part that notices tells the rest.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::bus::lock;

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered off (ACPI S5).
    PowerOff,
    /// The guest rebooted (ACPI reset register or i8042 reset). husk VMs do
    /// not reboot: a reboot ends the VM like a poweroff.
    Reset,
    /// The host asked the VM to stop.
    Stopped,
    /// The guest or KVM failed: triple fault, emulation failure, an
    /// unexpected exit. The string says which.
    Crashed(String),
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::PowerOff => f.write_str("guest powered off"),
            ExitReason::Reset => f.write_str("guest rebooted"),
            ExitReason::Stopped => f.write_str("stopped by the host"),
            ExitReason::Crashed(why) => write!(f, "crashed: {why}"),
        }
    }
}

/// Shared by vCPUs, devices and the VM's owner: the first reason recorded
/// wins, and the eventfd becomes readable so the owner can tear down.
#[derive(Debug)]
pub struct ExitSignal {
    /// Lock-free copy of `reason.is_some()` for the vCPU exit hot path.
    requested: AtomicBool,
    reason: Mutex<Option<ExitReason>>,
    evt: EventFd,
}

impl ExitSignal {
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            requested: AtomicBool::new(false),
            reason: Mutex::new(None),
            evt: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Records `reason` unless one is already set, and wakes the owner.
    pub fn request(&self, reason: ExitReason) {
        let mut current = lock(&self.reason);
        if current.is_none() {
            *current = Some(reason);
            self.requested.store(true, Ordering::SeqCst);
            // An eventfd write only fails when the counter would overflow,
            // in which case it is already readable.
            let _ = self.evt.write(1);
        }
    }

    pub fn reason(&self) -> Option<ExitReason> {
        lock(&self.reason).clone()
    }

    pub fn is_requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    /// Readable once an exit was requested.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins_and_wakes() {
        let s = ExitSignal::new().unwrap();
        assert!(s.eventfd().read().is_err(), "not readable before a request");
        s.request(ExitReason::PowerOff);
        s.request(ExitReason::Stopped);
        assert_eq!(s.reason(), Some(ExitReason::PowerOff));
        assert_eq!(s.eventfd().read().unwrap(), 1);
    }
}
