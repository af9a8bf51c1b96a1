//! What the agent does to a running container besides create and remove:
//! signals, pause and resume, resource updates, statistics and its
//! process list.

use std::collections::HashMap;
use std::path::PathBuf;

use husk_protocol::agent::{ContainerStats, ProcessInfo};
use husk_util::sync::lock;
use libcontainer::oci_spec::runtime::LinuxResources;
use nix::sys::signal::Signal;
use nix::unistd::Pid;

use super::{blocking, lc_error, Containers, Status, CGROUP_PARENT};
use crate::cgroup;
use crate::error::{Error, Result};
use crate::spec;

impl Containers {
    pub fn signal(&self, id: &str, exec_id: Option<&str>, signal: u32, all: bool) -> Result<()> {
        let signal = i32::try_from(signal)
            .ok()
            .and_then(|s| Signal::try_from(s).ok())
            .ok_or_else(|| Error::InvalidArgument(format!("unknown signal {signal}")))?;
        let c = self.get(id)?;
        if all {
            return match cgroup::signal_all(&c.cgroup, signal) {
                Ok(()) => Ok(()),
                // Everything exited and the cgroup went with it.
                Err(_) if c.init.has_exited() => Ok(()),
                Err(e) => Err(Error::Internal(format!(
                    "signal {signal} to every process of container {id}: {e}"
                ))),
            };
        }
        let process = c.process(exec_id)?;
        process
            .signal(signal)
            .map_err(|e| Error::Internal(format!("signal {signal} to pid {}: {e}", process.pid)))
    }

    pub async fn pause(&self, id: &str) -> Result<()> {
        let c = self.get(id)?;
        let status = c.status();
        if status != Status::Running {
            return Err(Error::FailedPrecondition(format!(
                "container {id} is {status}; only a running container can be paused"
            )));
        }
        let lc = c.lc.clone();
        blocking(move || lock(&lc).pause())
            .await?
            .map_err(|e| lc_error(&format!("pause container {id}"), &e))?;
        let mut status = lock(&c.status);
        if *status == Status::Running {
            *status = Status::Paused;
        }
        Ok(())
    }

    pub async fn resume(&self, id: &str) -> Result<()> {
        let c = self.get(id)?;
        let status = c.status();
        if status != Status::Paused {
            return Err(Error::FailedPrecondition(format!(
                "container {id} is {status}; only a paused container can be resumed"
            )));
        }
        let lc = c.lc.clone();
        blocking(move || lock(&lc).resume())
            .await?
            .map_err(|e| lc_error(&format!("resume container {id}"), &e))?;
        let mut status = lock(&c.status);
        if *status == Status::Paused {
            *status = Status::Running;
        }
        Ok(())
    }

    pub fn update(&self, id: &str, resources_json: &[u8]) -> Result<()> {
        use libcgroups::common::{CgroupManager, ControllerOpt};
        // Known and not being removed.
        self.get(id)?;
        let resources: LinuxResources = serde_json::from_slice(resources_json)
            .map_err(|e| Error::InvalidArgument(format!("container {id}: resources JSON: {e}")))?;
        let manager = libcgroups::v2::manager::Manager::new(
            PathBuf::from(cgroup::CGROUP_MOUNT),
            spec::cgroups_path(CGROUP_PARENT, id),
        )
        .map_err(|e| Error::internal(format!("container {id}: cgroup"), &e))?;
        manager
            .apply(&ControllerOpt {
                resources: &resources,
                disable_oom_killer: false,
                oom_score_adj: None,
                freezer_state: None,
            })
            .map_err(|e| Error::internal(format!("update resources of container {id}"), &e))
    }

    pub fn stats(&self, id: &str) -> Result<ContainerStats> {
        let c = self.get(id)?;
        cgroup::stats(&c.cgroup).ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "container {id} has no cgroup any more ({} is gone)",
                c.cgroup.display()
            ))
        })
    }

    pub fn list_processes(&self, id: &str) -> Result<Vec<ProcessInfo>> {
        let c = self.get(id)?;
        let known: HashMap<Pid, Option<String>> = c
            .processes()
            .into_iter()
            .filter(|p| !p.has_exited())
            .map(|p| (p.pid, p.exec_id.clone()))
            .collect();
        let pids = match cgroup::procs(&c.cgroup) {
            Ok(pids) => pids,
            Err(_) if c.init.has_exited() => Vec::new(),
            Err(e) => {
                return Err(Error::Internal(format!(
                    "list processes of container {id}: {}: {e}",
                    c.cgroup.display()
                )))
            }
        };
        Ok(pids
            .into_iter()
            .map(|pid| {
                let mut info = ProcessInfo::new();
                info.pid = u32::try_from(pid.as_raw()).unwrap_or(0);
                match known.get(&pid) {
                    Some(Some(exec_id)) => info.exec_id = exec_id.clone(),
                    Some(None) => info.init = true,
                    None => {}
                }
                info
            })
            .collect())
    }
}
