//! Containers and their processes in the one VM this shim drives, and the
//! operations the task API maps onto the agent ([`crate::agent::Agent`]).
//! Kill is in kill.rs, the watchers of exits and OOM kills in watch.rs.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use containerd_shim::api::CreateTaskRequest;
use containerd_shim::ExitSignal;
use husk_config::Config;
use tokio::sync::OnceCell;

use crate::agent::{NewContainer, ProcessRef};
use crate::errors::*;
use crate::events::Events;
use crate::io::{self, Stdio};
use crate::kill::KILL_SIGNAL;
use crate::process::{Exit, Process, ProcessState};
use crate::rootfs::{self, ContainerDirs};
use crate::sandbox::{sandbox_dir, Launcher, Sandbox};
use crate::spec;
use crate::state::TaskState;
use husk_util::sync::lock;

pub struct Container {
    pub id: String,
    pub bundle: PathBuf,
    pub dirs: ContainerDirs,
    pub init: Arc<Process>,
    pub execs: Mutex<HashMap<String, Arc<Process>>>,
    pub paused: AtomicBool,
}

impl Container {
    /// The init process, or exec `exec_id` ("" means init).
    pub fn process(&self, exec_id: &str) -> ttrpc::Result<Arc<Process>> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        lock(&self.execs)
            .get(exec_id)
            .cloned()
            .ok_or_else(|| not_found(format!("exec {exec_id} of {} not found", self.id)))
    }

    /// Its execs, started or not.
    pub fn execs(&self) -> Vec<Arc<Process>> {
        lock(&self.execs).values().cloned().collect()
    }

    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }
}

/// A task id known to the shim: taken from the start of its Create (so two
/// Creates of one id cannot both run), a container once created.
enum Slot {
    Creating,
    Ready(Arc<Container>),
}

/// Everything one shim (one VM) knows.
pub struct Shim {
    pub namespace: String,
    /// The VM's id: the CRI sandbox id, or the task id for `ctr run`.
    pub sandbox_id: String,
    pub events: Events,
    pub exit: Arc<ExitSignal>,
    launcher: Arc<dyn Launcher>,
    config: Mutex<Option<Config>>,
    sandbox: OnceCell<Arc<Sandbox>>,
    containers: Mutex<HashMap<String, Slot>>,
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !id.starts_with('.')
}

/// Holds a task id for its Create; released unless the container was
/// created (also when the Create is cancelled).
struct Reservation<'a> {
    shim: &'a Shim,
    id: String,
}

impl Reservation<'_> {
    fn commit(self, container: Arc<Container>) {
        lock(&self.shim.containers).insert(self.id.clone(), Slot::Ready(container));
        std::mem::forget(self);
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        let mut containers = lock(&self.shim.containers);
        if matches!(containers.get(&self.id), Some(Slot::Creating)) {
            containers.remove(&self.id);
        }
    }
}

/// A container's host files while its Create runs: removed if the Create
/// fails or is cancelled at any step, kept once it succeeded.
struct FilesRollback<'a> {
    dirs: &'a ContainerDirs,
    armed: bool,
}

impl FilesRollback<'_> {
    fn keep(mut self) {
        self.armed = false;
    }
}

impl Drop for FilesRollback<'_> {
    fn drop(&mut self) {
        if self.armed {
            if let Err(e) = rootfs::remove_container(self.dirs) {
                tracing::warn!("rolling back a failed create: {e}");
            }
        }
    }
}

impl Shim {
    pub fn new(
        namespace: &str,
        sandbox_id: &str,
        events: Events,
        exit: Arc<ExitSignal>,
        launcher: Arc<dyn Launcher>,
    ) -> Self {
        Self {
            namespace: namespace.to_string(),
            sandbox_id: sandbox_id.to_string(),
            events,
            exit,
            launcher,
            config: Mutex::new(None),
            sandbox: OnceCell::new(),
            containers: Mutex::new(HashMap::new()),
        }
    }

    pub fn container(&self, id: &str) -> ttrpc::Result<Arc<Container>> {
        match lock(&self.containers).get(id) {
            Some(Slot::Ready(c)) => Ok(c.clone()),
            _ => Err(not_found(format!("container {id} not found"))),
        }
    }

    /// Every created container.
    pub fn containers(&self) -> Vec<Arc<Container>> {
        lock(&self.containers)
            .values()
            .filter_map(|slot| match slot {
                Slot::Ready(c) => Some(c.clone()),
                Slot::Creating => None,
            })
            .collect()
    }

    pub fn sandbox(&self) -> ttrpc::Result<Arc<Sandbox>> {
        self.sandbox
            .get()
            .cloned()
            .ok_or_else(|| precondition("the VM is not running"))
    }

    /// Uses `config` instead of loading one (tests).
    #[cfg(test)]
    pub fn preset_config(&self, config: Config) {
        *lock(&self.config) = Some(config);
    }

    /// The config: from the first task's runtime options, else discovered.
    fn config(&self, req: &CreateTaskRequest) -> ttrpc::Result<Config> {
        let mut cached = lock(&self.config);
        if let Some(config) = cached.as_ref() {
            return Ok(config.clone());
        }
        let path = crate::options::config_path(req.options.as_ref())?;
        let config = match path {
            Some(path) => Config::load(std::path::Path::new(&path)),
            None => Config::discover(),
        }
        .map_err(|e| from_config(&e))?;
        *cached = Some(config.clone());
        Ok(config)
    }

    /// Boots the VM on the first task (`pod` describes that task).
    async fn boot(
        self: &Arc<Self>,
        config: &Config,
        pod: &spec::PodInfo,
    ) -> ttrpc::Result<Arc<Sandbox>> {
        let sandbox = self
            .sandbox
            .get_or_try_init(|| async {
                let sandbox = self
                    .launcher
                    .launch(config, &self.namespace, &self.sandbox_id, pod)
                    .await?;
                let sandbox = Arc::new(sandbox);
                self.spawn_watchers(&sandbox);
                Ok::<_, ttrpc::Error>(sandbox)
            })
            .await?;
        Ok(sandbox.clone())
    }

    /// Takes `id` for a Create.
    fn reserve(&self, id: &str) -> ttrpc::Result<Reservation<'_>> {
        let mut containers = lock(&self.containers);
        if containers.contains_key(id) {
            return Err(already_exists(format!("task {id} already exists")));
        }
        containers.insert(id.to_string(), Slot::Creating);
        Ok(Reservation {
            shim: self,
            id: id.to_string(),
        })
    }

    pub async fn create(self: &Arc<Self>, req: &CreateTaskRequest) -> ttrpc::Result<u32> {
        let id = req.id.as_str();
        if !valid_id(id) {
            return Err(invalid(format!("invalid task id {id:?}")));
        }
        if !req.checkpoint.is_empty() {
            return Err(status(
                ttrpc::Code::UNIMPLEMENTED,
                "husk cannot restore checkpoints",
            ));
        }
        let reservation = self.reserve(id)?;
        let config = self.config(req)?;
        let bundle = PathBuf::from(&req.bundle);
        let spec_json = spec::load(&bundle)?;
        let pod = spec::pod_info(&spec_json);
        // The pod's sandbox container, when this is another of its pod's.
        let sandbox_pid = (id != self.sandbox_id)
            .then(|| self.container(&self.sandbox_id).ok())
            .flatten()
            .map(|sandbox| sandbox.init.pid());
        let guest = spec::for_guest(spec_json, id, pod.is_sandbox, sandbox_pid)?;
        let stdio = Stdio {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        if stdio.terminal != guest.terminal {
            return Err(invalid(format!(
                "task {id}: terminal={} but the spec's process.terminal={}",
                stdio.terminal, guest.terminal
            )));
        }

        if self.sandbox.get().is_none() {
            self.record_before_boot(&config, &bundle, id, &pod)?;
        }
        let sandbox = self.boot(&config, &pod).await?;
        let created = self
            .create_in_vm(&sandbox, req, &config, bundle, guest, stdio.clone())
            .await;
        match created {
            Ok((container, pid)) => {
                reservation.commit(container);
                self.events.create(id, &req.bundle, &stdio, pid).await;
                Ok(pid)
            }
            Err(e) => {
                if id == self.sandbox_id && self.containers().is_empty() {
                    // The task that booted the VM failed: nothing else runs
                    // in it, and a VM left running would burn a core until
                    // Shutdown.
                    tracing::warn!(sandbox = self.sandbox_id, "create failed: stopping the VM");
                    // On a task of its own, so a Create cancelled at its
                    // deadline still stops it; otherwise the error returns
                    // once it is down.
                    let sandbox = sandbox.clone();
                    let _ = tokio::spawn(async move { sandbox.shutdown().await }).await;
                }
                Err(e)
            }
        }
    }

    /// What `shim delete` must undo if this shim dies while the VM boots:
    /// the sandbox directory (its share is mounted before the VM starts)
    /// and the host cgroup the VM is about to join.
    fn record_before_boot(
        &self,
        config: &Config,
        bundle: &std::path::Path,
        id: &str,
        pod: &spec::PodInfo,
    ) -> ttrpc::Result<()> {
        let sandbox_dir = sandbox_dir(config, &self.namespace, &self.sandbox_id);
        let cgroup_dirs = match &pod.cgroups_path {
            Some(path) => crate::cgroup::HostCgroup::planned_dirs(path)
                .map_err(|e| internal(with_causes(&e)))?,
            None => Vec::new(),
        };
        TaskState {
            container_dir: ContainerDirs::new(&sandbox_dir.join("staging"), id).root,
            sandbox_dir,
            owns_sandbox: id == self.sandbox_id,
            cgroup_dirs,
        }
        .save(bundle)
        .map_err(|e| internal(format!("cannot write state into {}: {e}", bundle.display())))
    }

    /// Create's part inside the running VM: files shared, the container
    /// created by the agent, its stdio attached.
    async fn create_in_vm(
        self: &Arc<Self>,
        sandbox: &Arc<Sandbox>,
        req: &CreateTaskRequest,
        config: &Config,
        bundle: PathBuf,
        guest: spec::GuestSpec,
        stdio: Stdio,
    ) -> ttrpc::Result<(Arc<Container>, u32)> {
        let id = req.id.as_str();
        let dirs = ContainerDirs::new(sandbox.staging.path(), id);
        TaskState {
            sandbox_dir: sandbox_dir(config, &self.namespace, &self.sandbox_id),
            container_dir: dirs.root.clone(),
            owns_sandbox: id == self.sandbox_id,
            cgroup_dirs: sandbox
                .cgroup
                .as_ref()
                .map(|c| c.dirs.clone())
                .unwrap_or_default(),
        }
        .save(&bundle)
        .map_err(|e| internal(format!("cannot write state into {}: {e}", bundle.display())))?;

        let rollback = FilesRollback {
            dirs: &dirs,
            armed: true,
        };
        rootfs::mount_rootfs(id, &bundle, &req.rootfs, &sandbox.staging, &dirs)
            .await
            .and_then(|()| rootfs::share_binds(&guest.binds, &sandbox.staging, &dirs))?;

        let pid = sandbox
            .agent
            .create_container(NewContainer {
                id: id.into(),
                spec_json: guest.json,
                rootfs_path: spec::guest_rootfs(id),
                stdio: stdio.to_agent(),
            })
            .await?;
        let init = Arc::new(Process::new(id, None, stdio.clone()));
        init.set_pid(pid);
        let process = ProcessRef {
            container_id: id,
            exec_id: "",
        };
        match io::attach(sandbox.agent.as_ref(), process, &stdio).await {
            Ok(attached) => init.set_io(attached).await,
            Err(e) => {
                self.remove_in_guest(sandbox, id).await;
                return Err(internal(format!("task {id}: {e}")));
            }
        }
        rollback.keep();
        let container = Arc::new(Container {
            id: id.into(),
            bundle,
            dirs,
            init,
            execs: Mutex::new(HashMap::new()),
            paused: AtomicBool::new(false),
        });
        Ok((container, pid))
    }

    async fn remove_in_guest(&self, sandbox: &Sandbox, id: &str) {
        if !sandbox.is_running() {
            // Stopped or stopping: nobody would answer.
            return;
        }
        if let Err(e) = sandbox.agent.remove_container(id).await {
            tracing::warn!(container = id, "{e}");
        }
    }

    pub async fn start(self: &Arc<Self>, id: &str, exec_id: &str) -> ttrpc::Result<u32> {
        let container = self.container(id)?;
        let sandbox = self.sandbox()?;
        let process = container.process(exec_id)?;
        if !process.begin_start() {
            return Err(precondition(format!(
                "{} of {id} was already started",
                process.task_id()
            )));
        }
        let started = if exec_id.is_empty() {
            sandbox.agent.start_container(id).await
        } else {
            self.start_exec(&sandbox, &container, &process).await
        };
        if let Err(e) = started {
            process.abort_start();
            return Err(e);
        }
        process.set_running();
        self.spawn_exit_monitor(&sandbox, &process);
        let pid = process.pid();
        if exec_id.is_empty() {
            self.events.start(id, pid).await;
        } else {
            self.events.exec_started(id, exec_id, pid).await;
        }
        Ok(pid)
    }

    /// Runs an added exec in the guest and attaches its stdio.
    async fn start_exec(
        &self,
        sandbox: &Sandbox,
        container: &Container,
        process: &Process,
    ) -> ttrpc::Result<()> {
        let id = container.id.as_str();
        let exec_id = process.task_id();
        if container.init.state() != ProcessState::Running {
            return Err(precondition(format!("container {id} is not running")));
        }
        let target = ProcessRef {
            container_id: id,
            exec_id,
        };
        let spec = lock(&process.spec).clone().unwrap_or_default();
        let pid = sandbox
            .agent
            .exec_process(target, spec, process.stdio.to_agent())
            .await?;
        process.set_pid(pid);
        match io::attach(sandbox.agent.as_ref(), target, &process.stdio).await {
            Ok(attached) => {
                process.set_io(attached).await;
                Ok(())
            }
            Err(e) => {
                // The exec runs with nobody attached to it: kill it, and
                // reap it, rather than leave it behind in the guest.
                tracing::warn!(container = id, exec = exec_id, "stdio: {e}; killing it");
                if let Err(e) = sandbox
                    .agent
                    .signal_process(target, KILL_SIGNAL, false, None)
                    .await
                {
                    tracing::warn!(container = id, exec = exec_id, "{e}");
                }
                let _ = sandbox.agent.wait_process(target).await;
                Err(internal(format!("exec {exec_id} of {id}: {e}")))
            }
        }
    }

    pub async fn exec(
        &self,
        id: &str,
        exec_id: &str,
        stdio: Stdio,
        spec_json: &[u8],
    ) -> ttrpc::Result<()> {
        let container = self.container(id)?;
        if !valid_id(exec_id) {
            return Err(invalid(format!("invalid exec id {exec_id:?}")));
        }
        if container.init.state() != ProcessState::Running {
            return Err(precondition(format!("container {id} is not running")));
        }
        let json = spec::exec_process_for_guest(spec_json)?;
        let process = Arc::new(Process::new(id, Some(exec_id), stdio));
        *lock(&process.spec) = Some(json);
        {
            let mut execs = lock(&container.execs);
            if execs.contains_key(exec_id) {
                return Err(already_exists(format!(
                    "exec {exec_id} of {id} already exists"
                )));
            }
            execs.insert(exec_id.into(), process);
        }
        self.events.exec_added(id, exec_id).await;
        Ok(())
    }

    /// Deletes a stopped process: an exec, or the container with its files.
    pub async fn delete(&self, id: &str, exec_id: &str) -> ttrpc::Result<(u32, Option<Exit>)> {
        let container = self.container(id)?;
        let process = container.process(exec_id)?;
        if matches!(
            process.state(),
            ProcessState::Running | ProcessState::Starting
        ) {
            return Err(precondition(format!(
                "{} of {id} is still running",
                process.task_id()
            )));
        }
        let exit = process.exit();
        if !exec_id.is_empty() {
            lock(&container.execs).remove(exec_id);
            return Ok((process.pid(), exit));
        }
        if let Ok(sandbox) = self.sandbox() {
            self.remove_in_guest(&sandbox, id).await;
        }
        if let Err(e) = rootfs::remove_container(&container.dirs) {
            tracing::warn!(container = id, "cleanup: {e}");
        }
        lock(&self.containers).remove(id);
        self.events.delete(id, id, process.pid(), exit).await;
        Ok((process.pid(), exit))
    }

    pub async fn set_paused(&self, id: &str, paused: bool) -> ttrpc::Result<()> {
        let container = self.container(id)?;
        let sandbox = self.sandbox()?;
        sandbox.agent.set_paused(id, paused).await?;
        container.paused.store(paused, Ordering::SeqCst);
        if paused {
            self.events.paused(id).await;
        } else {
            self.events.resumed(id).await;
        }
        Ok(())
    }

    /// Tasks known (created, or being created).
    pub fn container_count(&self) -> usize {
        lock(&self.containers).len()
    }

    /// Stops the VM and lets the shim exit (Shutdown with no tasks left).
    pub async fn shutdown(&self) {
        if let Some(sandbox) = self.sandbox.get() {
            sandbox.shutdown().await;
        }
        self.exit.signal();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked() {
        for good in ["c1", "abc-DEF_0.9", &"a".repeat(128)] {
            assert!(valid_id(good), "{good}");
        }
        for bad in ["", ".hidden", "a/b", "../x", "a b", &"a".repeat(129)] {
            assert!(!valid_id(bad), "{bad}");
        }
    }
}
