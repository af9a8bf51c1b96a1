//! Ending the VM. As PID 1 the agent must never exit (the kernel would
//! panic): every way out goes through [`power_off`].

use std::time::Duration;

use nix::sys::reboot::{reboot, RebootMode};

use crate::logging;

/// How long the host gets to receive our last log lines.
const LOG_FLUSH: Duration = Duration::from_secs(1);

/// Syncs filesystems and powers the VM off (the VMM sees ACPI S5).
pub fn power_off() -> ! {
    tracing::info!("powering off");
    if let Some(log) = logging::handle() {
        log.flush(LOG_FLUSH);
    }
    // reboot(2) does not sync by itself.
    nix::unistd::sync();
    let Err(err) = reboot(RebootMode::RB_POWER_OFF);
    // Only fails without CAP_SYS_BOOT, i.e. not really PID 1 of a VM: there
    // is nothing better to do than to stay put.
    tracing::error!("reboot(RB_POWER_OFF) failed: {err}; halting here");
    if let Some(log) = logging::handle() {
        log.flush(LOG_FLUSH);
    }
    loop {
        std::thread::park();
    }
}

/// As PID 1, a panic anywhere logs the panic and powers off instead of
/// killing init (with `panic = "abort"` the hook is the last code to run).
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        tracing::error!("agent panicked: {info}");
        power_off();
    }));
}
