//! The boot ledger: when `$HUSK_BOOT_LEDGER` names a file, every VM start
//! and every agent that came up is appended to it as one line, from
//! whichever process did it (tests, shims started by containerd, husk-vmm).
//! The test suite reads it to say how many guests it booted and how long
//! booting took (`scripts/boot-summary.sh`); without the variable nothing is
//! written.
//!
//! Lines: `start <pid>` and `ready <pid> <seconds>` for boots, `restore
//! <pid>` and `restored <pid> <seconds>` for VMs restored from snapshots. Each is one `write` to
//! a file opened with O_APPEND, so lines from concurrent processes do not
//! interleave.

use std::io::Write;
use std::time::Duration;

/// The environment variable naming the ledger file.
pub const LEDGER_ENV: &str = "HUSK_BOOT_LEDGER";

fn append(line: &str) {
    let Some(path) = std::env::var_os(LEDGER_ENV).filter(|p| !p.is_empty()) else {
        return;
    };
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = written {
        tracing::warn!("cannot append to the boot ledger {path:?}: {e}");
    }
}

/// A guest boot began (called by [`crate::Vm::start`]).
pub fn record_start() {
    append(&format!("start {}\n", std::process::id()));
}

/// A guest's agent answered `boot_time` after its VM started.
pub fn record_ready(boot_time: Duration) {
    append(&format!(
        "ready {} {:.3}\n",
        std::process::id(),
        boot_time.as_secs_f64()
    ));
}

/// A VM was restored from a snapshot (called by [`crate::Vm::restore`]).
pub fn record_restore() {
    append(&format!("restore {}\n", std::process::id()));
}

/// A restored guest's agent answered `time` after its restore began.
pub fn record_restored_ready(time: Duration) {
    append(&format!(
        "restored {} {:.3}\n",
        std::process::id(),
        time.as_secs_f64()
    ));
}
