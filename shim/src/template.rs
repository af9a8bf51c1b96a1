//! Templates: each VM shape (vCPUs, memory, NICs, kernel, initramfs, the
//! shim binary) is booted once up to its agent, snapshotted, and every new
//! sandbox of that shape restores the snapshot instead of booting.
//!
//! Layout under `<state_dir>/templates/` (`[hypervisor] template_dir`): `<key>/` (a finished snapshot:
//! `vmstate`, `memory`), `<key>.lock` (held by whoever builds that key:
//! a shim that finds it held waits, then restores what the other built),
//! `.build-<key>-<pid>/` (work in progress, renamed into place when done,
//! so a shim never sees half a template). The key hashes the snapshot's
//! shape, which names the inputs by path, size, mtime and inode: a rebuilt
//! kernel, initramfs or shim makes a new key, and so a new template.
//!
//! A template guest never runs tenant code: it is booted, its agent
//! answers one Check, and it is saved. Its NICs are taps in a network
//! namespace of its own with MACs of [`template_mac`]; the restored guest
//! renames its NICs' MACs to the pod's (UpdateInterface's
//! `previous_hw_addr`).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use husk_config::Config;
use husk_hypervisor::snapshot::STATE_FILE;
use husk_hypervisor::{HostProfile, Vm, VmConfig};
use sha2::{Digest, Sha256};

/// Errors making or finding a template (the sandbox then boots).
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the template VM: {0}")]
    Vm(#[from] husk_hypervisor::VmError),
    #[error("the template guest: {0}")]
    Guest(String),
    #[error("saving the template: {0}")]
    Snapshot(#[from] husk_hypervisor::snapshot::SnapshotError),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TemplateError + '_ {
    move |source| TemplateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A finished template: restore with `Vm::restore(config, &dir, &identity)`.
#[derive(Debug, Clone)]
pub struct Template {
    pub dir: PathBuf,
    pub identity: String,
}

impl Template {
    /// Removes a template a restore found unusable, so the next sandbox of
    /// its shape builds a new one. VMs restored from it keep their mapping.
    pub fn discard(&self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            tracing::warn!("cannot remove template {}: {e}", self.dir.display());
        }
    }
}

/// The MAC of a template guest's NIC `index` (02:68:75:73:6b = "husk",
/// locally administered).
pub fn template_mac(index: usize) -> [u8; 6] {
    [
        0x02,
        0x68,
        0x75,
        0x73,
        0x6b,
        u8::try_from(index).unwrap_or(u8::MAX),
    ]
}

/// Path, size, mtime and inode of `path`: changes whenever the file does.
fn fingerprint(path: &Path) -> Result<String, TemplateError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).map_err(io_err(path))?;
    Ok(format!(
        "{} {} {}.{} {}",
        path.display(),
        meta.size(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ino()
    ))
}

/// What the guest a template holds is made of, beyond its shape: kernel,
/// initramfs, this shim (its device model), CPUID policy, share options
/// and NIC MTUs (they change the features the devices offer).
fn identity(vm: &VmConfig) -> Result<String, TemplateError> {
    let exe = std::env::current_exe().map_err(io_err(Path::new("/proc/self/exe")))?;
    let initrd = match &vm.initrd {
        Some(initrd) => fingerprint(initrd)?,
        None => "no initramfs".into(),
    };
    let share = vm
        .shared_fs
        .as_ref()
        .map(|s| format!("{:?} xattr={}", s.cache, s.xattr));
    let mtus: Vec<Option<u16>> = vm.net.iter().map(|n| n.mtu).collect();
    Ok(format!(
        "{}; cpuid hide {:?}; share {share:?}; mtus {mtus:?}",
        inputs(&fingerprint(&vm.kernel)?, &initrd, &fingerprint(&exe)?),
        vm.cpuid.hide,
    ))
}

/// The part of an identity that names the files (see [`prune_stale`]).
fn inputs(kernel: &str, initrd: &str, shim: &str) -> String {
    format!("kernel {kernel}; initramfs {initrd}; shim {shim}")
}

/// Removes the templates under `root` made from other files than `current`
/// (the inputs part of an identity): an upgraded kernel, initramfs or shim
/// leaves its old templates behind otherwise. Templates of other shapes of
/// the same inputs stay. A VM restored from a removed one keeps its mapping.
fn prune_stale(root: &Path, current: &str, keep: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        let name = entry.file_name();
        if dir == keep || name.to_string_lossy().starts_with('.') || !dir.is_dir() {
            continue;
        }
        let stale = match husk_hypervisor::snapshot::read_state(&dir) {
            Ok(state) => !state.shape.identity.starts_with(current),
            Err(_) => true,
        };
        if stale {
            tracing::info!("removing the stale template {}", dir.display());
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                tracing::warn!("cannot remove {}: {e}", dir.display());
            }
            let _ = std::fs::remove_file(root.join(format!("{}.lock", name.to_string_lossy())));
        }
    }
}

/// The template for `vm` (a sandbox's VM config), built first if there is
/// none yet. Building boots a guest: seconds on bare metal, a boot's time
/// on a nested host.
pub async fn ensure(config: &Config, vm: &VmConfig) -> Result<Template, TemplateError> {
    let identity = identity(vm)?;
    let profile = HostProfile::resolve(vm.host_profile);
    let shape = husk_hypervisor::vm::shape_of(vm, profile, &identity);
    let digest = Sha256::digest(format!("{shape:?}").as_bytes());
    let key: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    let root = config.template_dir();
    let dir = root.join(&key);
    let template = Template {
        dir: dir.clone(),
        identity,
    };
    if dir.join(STATE_FILE).is_file() {
        return Ok(template);
    }
    crate::sandbox::create_private_dir(&root).map_err(|e| TemplateError::Guest(e.to_string()))?;
    let lock_path = root.join(format!("{key}.lock"));
    let _lock = tokio::task::spawn_blocking(move || lock_exclusive(&lock_path))
        .await
        .map_err(|e| TemplateError::Guest(format!("template lock task: {e}")))??;
    if dir.join(STATE_FILE).is_file() {
        // Another shim built it while this one waited.
        return Ok(template);
    }
    // Holding the key's lock, any build dir of this key is a dead builder's.
    let prefix = format!(".build-{key}-");
    if let Ok(entries) = std::fs::read_dir(&root) {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(&prefix) {
                tracing::info!(
                    "removing {}, left by a shim that died building it",
                    entry.path().display()
                );
                remove_work_dir(&entry.path());
            }
        }
    }
    let work = root.join(format!("{prefix}{}", std::process::id()));
    let built = build(config, vm, &template, &work).await;
    remove_work_dir(&work);
    built?;
    if let Some((current, _)) = template.identity.split_once("; cpuid hide") {
        prune_stale(&root, current, &dir);
    }
    Ok(template)
}

/// An exclusive flock on `path` (created if missing), held while the
/// returned file is open.
fn lock_exclusive(path: &Path) -> Result<File, TemplateError> {
    let file = File::create(path).map_err(io_err(path))?;
    // SAFETY: flock on a descriptor this function owns.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
    if rc != 0 {
        return Err(io_err(path)(std::io::Error::last_os_error()));
    }
    Ok(file)
}

fn remove_work_dir(work: &Path) {
    let netns = work.join("netns");
    if netns.exists() {
        let _ = nix::mount::umount2(&netns, nix::mount::MntFlags::MNT_DETACH);
    }
    if work.exists() {
        if let Err(e) = std::fs::remove_dir_all(work) {
            tracing::warn!("cannot remove {}: {e}", work.display());
        }
    }
}

/// A new network namespace, kept alive by a bind mount at `path`.
fn private_netns(path: &Path) -> Result<(), TemplateError> {
    File::create(path).map_err(io_err(path))?;
    let target = path.to_path_buf();
    std::thread::Builder::new()
        .name("husk-netns".into())
        .spawn(move || -> Result<(), nix::Error> {
            // Only this short-lived thread moves into the new namespace.
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)?;
            nix::mount::mount(
                Some("/proc/thread-self/ns/net"),
                &target,
                None::<&str>,
                nix::mount::MsFlags::MS_BIND,
                None::<&str>,
            )
        })
        .map_err(io_err(path))?
        .join()
        .map_err(|_| TemplateError::Guest("the netns thread panicked".into()))?
        .map_err(|e| io_err(path)(std::io::Error::from(e)))
}

/// Boots the template guest in `work`, waits for its agent, saves it and
/// moves the snapshot to `template.dir`.
async fn build(
    config: &Config,
    vm: &VmConfig,
    template: &Template,
    work: &Path,
) -> Result<(), TemplateError> {
    remove_work_dir(work);
    let share = work.join("share");
    let snapshot = work.join("snapshot");
    for dir in [work, &share, &snapshot] {
        crate::sandbox::create_private_dir(dir).map_err(|e| TemplateError::Guest(e.to_string()))?;
    }
    let mut guest = vm.clone();
    guest.activity = Arc::default();
    let uds = work.join("vsock.sock");
    if let Some(vsock) = guest.vsock.as_mut() {
        vsock.uds_path = uds.clone();
    }
    if let Some(fs) = guest.shared_fs.as_mut() {
        fs.dir = share;
    }
    if !guest.net.is_empty() {
        let netns = work.join("netns");
        private_netns(&netns)?;
        for (index, nic) in guest.net.iter_mut().enumerate() {
            nic.tap_name = format!("husktpl{index}");
            nic.netns = Some(netns.clone());
            nic.mac = template_mac(index);
        }
    }
    let activity = guest.activity.clone();
    let _guest_log = husk_vsock::GuestLogReceiver::bind_with_sink(&uds, move |line| {
        activity.note_line("agent", &line.message)
    })
    .map_err(io_err(&uds))?;

    tracing::info!(
        "building the template {} (a guest boot: {} vCPUs, {} MiB, {} NICs)",
        template.dir.display(),
        guest.vcpus,
        guest.memory_mib,
        guest.net.len()
    );
    let start_config = guest.clone();
    let mut booted = tokio::task::spawn_blocking(move || Vm::start(&start_config))
        .await
        .map_err(|e| TemplateError::Guest(format!("VM start task: {e}")))??;
    let timeouts = config
        .agent
        .timeouts(booted.host_profile() == HostProfile::NestedPvm);
    let limits = husk_vsock::BootLimits {
        stall: timeouts.boot_stall,
        max: timeouts.boot_max,
    };
    let answered = match husk_vsock::wait_for_agent(&uds, &booted, limits).await {
        Ok((client, boot_time)) => {
            husk_hypervisor::ledger::record_ready(boot_time);
            let ctx = ttrpc::context::with_timeout(
                i64::try_from(timeouts.request.as_nanos()).unwrap_or(i64::MAX),
            );
            client
                .check(ctx, &husk_protocol::agent::CheckRequest::new())
                .await
                .map(|_| boot_time)
                .map_err(|e| format!("its agent did not answer Check: {e}"))
        }
        Err(e) => Err(e.to_string()),
    };
    let boot_time = match answered {
        Ok(t) => t,
        Err(e) => {
            tokio::task::spawn_blocking(move || booted.stop())
                .await
                .ok();
            return Err(TemplateError::Guest(e));
        }
    };
    let identity = template.identity.clone();
    let into = snapshot.clone();
    tokio::task::spawn_blocking(move || booted.snapshot(&into, &identity))
        .await
        .map_err(|e| TemplateError::Guest(format!("snapshot task: {e}")))??;
    std::fs::rename(&snapshot, &template.dir).map_err(io_err(&template.dir))?;
    if let Some(root) = template.dir.parent() {
        File::open(root)
            .and_then(|d| d.sync_all())
            .map_err(io_err(root))?;
    }
    tracing::info!(
        "template {} ready (its guest booted in {:.1} s)",
        template.dir.display(),
        boot_time.as_secs_f64()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_macs_are_local_unicast_and_distinct() {
        let (a, b) = (template_mac(0), template_mac(1));
        assert_ne!(a, b);
        assert_eq!(a[0] & 0b11, 0b10, "locally administered, unicast");
    }

    #[test]
    fn the_identity_changes_with_the_kernel_file() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinux");
        std::fs::write(&kernel, b"one").unwrap();
        let vm = VmConfig::new(&kernel);
        let before = identity(&vm).unwrap();
        assert_eq!(before, identity(&vm).unwrap(), "stable");
        std::fs::write(&kernel, b"other contents").unwrap();
        assert_ne!(before, identity(&vm).unwrap());
        let missing = VmConfig::new(dir.path().join("gone"));
        assert!(identity(&missing).unwrap_err().to_string().contains("gone"));
    }

    #[test]
    fn templates_of_other_inputs_are_pruned_and_the_rest_kept() {
        use husk_hypervisor::snapshot::{write_state, VmState};
        let root = tempfile::tempdir().unwrap();
        let make = |name: &str, identity: &str| {
            let dir = root.path().join(name);
            std::fs::create_dir(&dir).unwrap();
            let state: VmState = serde_json::from_value(serde_json::json!({
                "shape": {"husk": "v", "host": "h", "identity": identity, "vcpus": 1,
                          "memory_mib": 256, "cmdline": "", "devices": []},
                "vcpus": [], "irqchips": [], "clock": serde_json::to_value(
                    kvm_bindings::kvm_clock_data::default()).unwrap(),
                "serial": {"baud_divisor_low": 0, "baud_divisor_high": 0,
                           "interrupt_enable": 0, "interrupt_identification": 0,
                           "line_control": 0, "line_status": 0, "modem_control": 0,
                           "modem_status": 0, "scratch": 0},
                "transports": [], "memory": [],
            }))
            .unwrap();
            write_state(&dir, &state).unwrap();
            dir
        };
        let current = inputs("k1", "i1", "s1");
        let keep = make("new", &format!("{current}; cpuid hide []"));
        let other_shape = make("shape2", &format!("{current}; cpuid hide [\"x\"]"));
        let old = make(
            "old",
            &format!("{}; cpuid hide []", inputs("k0", "i1", "s1")),
        );
        let junk = root.path().join("junk");
        std::fs::create_dir(&junk).unwrap();
        let building = root.path().join(".build-x-1");
        std::fs::create_dir(&building).unwrap();
        prune_stale(root.path(), &current, &keep);
        assert!(keep.exists() && other_shape.exists() && building.exists());
        assert!(!old.exists() && !junk.exists());
    }

    #[test]
    fn a_held_lock_makes_the_next_taker_wait() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.lock");
        let held = lock_exclusive(&path).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter_path = path.clone();
        let waiter = std::thread::spawn(move || {
            let lock = lock_exclusive(&waiter_path).unwrap();
            tx.send(()).unwrap();
            drop(lock);
        });
        assert!(rx
            .recv_timeout(std::time::Duration::from_millis(200))
            .is_err());
        drop(held);
        rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap();
        waiter.join().unwrap();
    }
}
