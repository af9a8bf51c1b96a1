//! The sandbox (the pod): what CreateSandbox sets up once per VM and
//! DestroySandbox takes down, and what GetGuestDetails reports.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use husk_protocol::agent::{CreateSandboxRequest, GuestDetails};

use crate::error::{check_id, Error, Result};
use crate::{cgroup, host_sync, mounts, network};
use husk_util::sync::lock;

struct Created {
    id: String,
    storages: Vec<PathBuf>,
}

/// At most one sandbox per agent.
pub struct Sandbox {
    dir: PathBuf,
    created: Mutex<Option<Created>>,
}

impl Sandbox {
    /// `dir`: where hostname, hosts and resolv.conf are written
    /// (`/run/husk/sandbox` in a guest).
    pub fn new(dir: PathBuf) -> Sandbox {
        Sandbox {
            dir,
            created: Mutex::new(None),
        }
    }

    pub async fn create(&self, req: &CreateSandboxRequest) -> Result<()> {
        check_id("sandbox", &req.sandbox_id)?;
        {
            let created = lock(&self.created);
            if let Some(c) = created.as_ref() {
                return Err(Error::AlreadyExists(format!(
                    "sandbox {} already exists; cannot create {}",
                    c.id, req.sandbox_id
                )));
            }
        }
        if req.wall_clock_unix_nanos != 0 {
            host_sync::set_wall_clock(req.wall_clock_unix_nanos)?;
        }
        if !req.entropy.is_empty() {
            host_sync::reseed(&req.entropy)?;
        }
        if !req.hostname.is_empty() {
            nix::unistd::sethostname(&req.hostname)
                .map_err(|e| Error::InvalidArgument(format!("hostname {:?}: {e}", req.hostname)))?;
        }
        let hostname = if req.hostname.is_empty() {
            nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default()
        } else {
            req.hostname.clone()
        };
        let write = |name: &str, text: &str| -> Result<()> {
            let path = self.dir.join(name);
            std::fs::write(&path, text)
                .map_err(|e| Error::Internal(format!("write {}: {e}", path.display())))
        };
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| Error::Internal(format!("create {}: {e}", self.dir.display())))?;
        write("hostname", &format!("{hostname}\n"))?;
        write("hosts", &req.hosts)?;
        write("resolv.conf", &req.resolv_conf)?;
        let storages = mounts::mount_all(&req.storages)?;
        if let Err(e) = network::loopback_up().await {
            mounts::unmount_all(&storages);
            return Err(e);
        }
        let mut created = lock(&self.created);
        if created.is_some() {
            // A concurrent CreateSandbox won.
            mounts::unmount_all(&storages);
            return Err(Error::AlreadyExists("sandbox already exists".into()));
        }
        tracing::info!(sandbox = req.sandbox_id, "sandbox created");
        *created = Some(Created {
            id: req.sandbox_id.clone(),
            storages,
        });
        Ok(())
    }

    /// Unmounts the sandbox storages (the containers are gone by now).
    pub fn destroy(&self) {
        if let Some(c) = lock(&self.created).take() {
            mounts::unmount_all(&c.storages);
            tracing::info!(sandbox = c.id, "sandbox destroyed");
        }
    }
}

/// MemTotal of /proc/meminfo, in bytes.
fn mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

pub fn guest_details() -> Result<GuestDetails> {
    let uts = nix::sys::utsname::uname().map_err(|e| Error::Internal(format!("uname: {e}")))?;
    let mut d = GuestDetails::new();
    d.kernel_release = uts.release().to_string_lossy().into_owned();
    d.agent_version = env!("CARGO_PKG_VERSION").to_owned();
    d.cpus = std::thread::available_parallelism()
        .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
        .unwrap_or(1);
    d.memory_bytes = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| mem_total(&m))
        .unwrap_or(0);
    d.cgroup_controllers =
        std::fs::read_to_string(Path::new(cgroup::CGROUP_MOUNT).join("cgroup.controllers"))
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_owned)
            .collect();
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_mem_total() {
        assert_eq!(
            mem_total("MemTotal:         245760 kB\nMemFree: 1 kB\n"),
            Some(245760 * 1024)
        );
        assert_eq!(mem_total("MemFree: 1 kB\n"), None);
    }
}
