//! `HUSK_GUEST_PROFILE=<dir>`: a sampling profile of each sandbox's guest
//! in `<dir>/<sandbox id>.samples` (see husk_hypervisor::profile), for
//! finding where guest time goes. `scripts/guest-profile.py` reads it.
//!
//! A developer's switch, read from the shim's environment (containerd
//! passes its own to the shims it starts): unset, nothing runs.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Weak;
use std::time::Duration;

use crate::guest_vm::KvmVm;

/// The variable naming the directory profiles go to.
pub const PROFILE_DIR_VAR: &str = "HUSK_GUEST_PROFILE";
/// Time between samples. Each one stops every vCPU briefly; this keeps the
/// guest running ~99 % of the time on a nested host.
const INTERVAL: Duration = Duration::from_millis(3);
/// How long a sample waits for the vCPUs to answer.
const SAMPLE_TIMEOUT: Duration = Duration::from_millis(50);

/// The profile file of sandbox `id`, if profiles were asked for.
pub fn requested(id: &str) -> Option<PathBuf> {
    let dir = std::env::var_os(PROFILE_DIR_VAR)?;
    Some(Path::new(&dir).join(format!("{id}.samples")))
}

/// Samples `vm` into `out` until the VM is dropped.
pub fn start(vm: Weak<KvmVm>, out: PathBuf) {
    let spawned = std::thread::Builder::new()
        .name("husk-profile".into())
        .spawn(move || {
            let file = match std::fs::File::create(&out) {
                Ok(f) => f,
                Err(e) => {
                    tracing::warn!("guest profile {}: {e}", out.display());
                    return;
                }
            };
            tracing::info!("sampling the guest into {}", out.display());
            let mut file = std::io::BufWriter::new(file);
            while let Some(vm) = vm.upgrade() {
                for sample in vm.profile_sample(SAMPLE_TIMEOUT) {
                    if let Err(e) = writeln!(file, "{sample}") {
                        tracing::warn!("guest profile {}: {e}", out.display());
                        return;
                    }
                }
                drop(vm);
                std::thread::sleep(INTERVAL);
            }
            let _ = file.flush();
        });
    if let Err(e) = spawned {
        tracing::warn!("guest profile: no thread: {e}");
    }
}
