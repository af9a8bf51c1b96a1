//! `HUSK_GUEST_PROFILE=<dir>`: a sampling profile of each sandbox's guest
//! in `<dir>/<sandbox id>.<shim pid>.samples` (see husk_hypervisor::profile), for
//! finding where guest time goes. `scripts/guest-profile.py` reads it.
//!
//! A developer's switch, read from the shim's environment (containerd
//! passes its own to the shims it starts): unset, nothing runs.

use std::path::{Path, PathBuf};
use std::sync::Weak;

use husk_hypervisor::profile;

use crate::guest_vm::KvmVm;

/// The variable naming the directory profiles go to.
pub const PROFILE_DIR_VAR: &str = "HUSK_GUEST_PROFILE";

/// The profile file of sandbox `id`, if profiles were asked for.
pub fn requested(id: &str) -> Option<PathBuf> {
    let dir = std::env::var_os(PROFILE_DIR_VAR)?;
    Some(profile_path(Path::new(&dir), id, std::process::id()))
}

/// `<dir>/<id>.<shim pid>.samples`: the pid keeps two sandboxes of one id
/// (two containerds, or an id reused) from overwriting each other's profile.
fn profile_path(dir: &Path, id: &str, shim_pid: u32) -> PathBuf {
    dir.join(format!("{id}.{shim_pid}.samples"))
}

/// Samples `vm` into `out` until the VM is stopped or dropped.
pub fn start(vm: Weak<KvmVm>, out: PathBuf) {
    let spawned = std::thread::Builder::new()
        .name("husk-profile".into())
        .spawn(move || {
            let recorded = std::fs::File::create(&out).and_then(|file| {
                tracing::info!("sampling the guest into {}", out.display());
                let mut file = std::io::BufWriter::new(file);
                profile::record(&mut file, || {
                    vm.upgrade()
                        .and_then(|vm| vm.profile_sample(profile::SAMPLE_TIMEOUT))
                })
            });
            if let Err(e) = recorded {
                tracing::warn!("guest profile {}: {e}", out.display());
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("guest profile: no thread: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_of_one_sandbox_id_in_two_shims_do_not_collide() {
        let dir = Path::new("/profiles");
        assert_eq!(
            profile_path(dir, "pod-1", 41),
            Path::new("/profiles/pod-1.41.samples")
        );
        assert_ne!(
            profile_path(dir, "pod-1", 41),
            profile_path(dir, "pod-1", 42)
        );
    }
}
