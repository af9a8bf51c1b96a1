//! Containers and their processes in the one VM this shim drives, and the
//! operations the task API maps onto the agent protocol.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use containerd_shim::api::CreateTaskRequest;
use containerd_shim::ExitSignal;
use husk_config::Config;
use husk_protocol::agent as pb;
use tokio::sync::OnceCell;

use crate::errors::*;
use crate::events::Events;
use crate::io::{self, Stdio};
use crate::process::{lock, Exit, Process, ProcessState, LOST_EXIT_STATUS};

/// SIGKILL's number (the task API carries signals as numbers).
const KILL_SIGNAL: u32 = 9;
/// What a process killed by SIGKILL exits with.
const KILLED_EXIT_STATUS: u32 = 128 + KILL_SIGNAL;
use crate::rootfs::{self, ContainerDirs};
use crate::sandbox::{sandbox_dir, Sandbox};
use crate::spec;
use crate::state::TaskState;

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

    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }
}

/// Everything one shim (one VM) knows.
pub struct Shim {
    pub namespace: String,
    /// The VM's id: the CRI sandbox id, or the task id for `ctr run`.
    pub sandbox_id: String,
    pub events: Events,
    pub exit: Arc<ExitSignal>,
    config: Mutex<Option<Config>>,
    sandbox: OnceCell<Arc<Sandbox>>,
    containers: Mutex<HashMap<String, Arc<Container>>>,
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !id.starts_with('.')
}

impl Shim {
    pub fn new(namespace: &str, sandbox_id: &str, events: Events, exit: Arc<ExitSignal>) -> Self {
        Self {
            namespace: namespace.to_string(),
            sandbox_id: sandbox_id.to_string(),
            events,
            exit,
            config: Mutex::new(None),
            sandbox: OnceCell::new(),
            containers: Mutex::new(HashMap::new()),
        }
    }

    pub fn container(&self, id: &str) -> ttrpc::Result<Arc<Container>> {
        lock(&self.containers)
            .get(id)
            .cloned()
            .ok_or_else(|| not_found(format!("container {id} not found")))
    }

    pub fn sandbox(&self) -> ttrpc::Result<Arc<Sandbox>> {
        self.sandbox
            .get()
            .cloned()
            .ok_or_else(|| precondition("the VM is not running"))
    }

    /// The config: from the first task's runtime options, else discovered.
    fn config(&self, req: &CreateTaskRequest) -> ttrpc::Result<Config> {
        let mut cached = lock(&self.config);
        if let Some(config) = cached.as_ref() {
            return Ok(config.clone());
        }
        let path = crate::options::config_path(req.options.as_ref())
            .map_err(|e| invalid(e.to_string()))?;
        let config = match path {
            Some(path) => Config::load(std::path::Path::new(&path)),
            None => Config::discover(),
        }
        .map_err(|e| invalid(e.to_string()))?;
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
                let sandbox = Sandbox::boot(config, &self.namespace, &self.sandbox_id, pod)
                    .await
                    .map_err(|e| internal(e.to_string()))?;
                let sandbox = Arc::new(sandbox);
                self.spawn_watchers(&sandbox);
                Ok::<_, ttrpc::Error>(sandbox)
            })
            .await?;
        Ok(sandbox.clone())
    }

    /// OOM events (a long poll kept open on the agent) and the VM's own exit.
    fn spawn_watchers(self: &Arc<Self>, sandbox: &Arc<Sandbox>) {
        let (shim, sb) = (self.clone(), sandbox.clone());
        tokio::spawn(async move {
            let mut oom_gate = OomGate::default();
            loop {
                let req = pb::GetOomEventRequest::new();
                match sb
                    .agent
                    .get_oom_event(ttrpc::context::Context::default(), &req)
                    .await
                {
                    Ok(ev) => {
                        // Only this shim's containers, and one event per
                        // container and second: the guest sends these.
                        let id = ev.container_id;
                        if lock(&shim.containers).contains_key(&id) && oom_gate.admit(&id) {
                            tracing::info!(container = id, "OOM kill in the guest");
                            shim.events.oom(&id).await;
                        }
                    }
                    Err(e) => {
                        tracing::debug!("OOM event stream ended: {e}");
                        break;
                    }
                }
            }
        });
        let sb = sandbox.clone();
        tokio::spawn(async move {
            let reason = sb.vm_exited().await;
            tracing::warn!(sandbox = sb.id, "VM ended: {reason}");
            // Tear the VMM down so every open agent call fails instead of
            // hanging; processes still running are reported as lost.
            sb.stop_vm().await;
        });
    }

    pub async fn create(self: &Arc<Self>, req: &CreateTaskRequest) -> ttrpc::Result<u32> {
        let id = req.id.as_str();
        if !valid_id(id) {
            return Err(invalid(format!("invalid task id {id:?}")));
        }
        if lock(&self.containers).contains_key(id) {
            return Err(already_exists(format!("task {id} already exists")));
        }
        if !req.checkpoint.is_empty() {
            return Err(status(
                ttrpc::Code::UNIMPLEMENTED,
                "husk cannot restore checkpoints",
            ));
        }
        let config = self.config(req)?;
        let bundle = PathBuf::from(&req.bundle);
        let spec_json = spec::load(&bundle).map_err(|e| invalid(e.to_string()))?;
        let pod = spec::pod_info(&spec_json);
        let guest =
            spec::for_guest(spec_json, id, pod.is_sandbox).map_err(|e| invalid(e.to_string()))?;
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

        let sandbox = self.boot(&config, &pod).await?;
        let created = self
            .create_in_vm(&sandbox, req, &config, bundle, guest, stdio)
            .await;
        if created.is_err() && id == self.sandbox_id && self.container_count() == 0 {
            // The task that booted the VM failed: nothing else runs in it,
            // and a VM left running would burn a core until Shutdown.
            tracing::warn!(sandbox = self.sandbox_id, "create failed: stopping the VM");
            // On a task of its own, so a Create cancelled at its deadline
            // still stops it; otherwise the error returns once it is down.
            let sandbox = sandbox.clone();
            let _ = tokio::spawn(async move { sandbox.shutdown().await }).await;
        }
        created
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
    ) -> ttrpc::Result<u32> {
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

        let prepared = async {
            rootfs::mount_rootfs(id, &bundle, &req.rootfs, &sandbox.staging, &dirs).await?;
            rootfs::share_binds(&guest.binds, &sandbox.staging, &dirs)
        };
        if let Err(e) = prepared.await {
            let _ = rootfs::remove_container(&dirs);
            return Err(internal(e.to_string()));
        }

        let mut create = pb::CreateContainerRequest::new();
        create.container_id = id.into();
        create.spec_json = guest.json;
        create.rootfs_path = spec::guest_rootfs(id);
        create.stdio = Some(stdio.to_agent()).into();
        let created = sandbox.agent.create_container(sandbox.ctx(), &create).await;
        let pid = match created {
            Ok(resp) => resp.pid,
            Err(e) => {
                let _ = rootfs::remove_container(&dirs);
                return Err(sandbox.agent_error("CreateContainer", e));
            }
        };

        let init = Arc::new(Process::new(id, None, stdio.clone()));
        init.set_pid(pid);
        match io::attach(
            &sandbox.vsock_uds,
            id,
            None,
            &stdio,
            sandbox.request_timeout,
        )
        .await
        {
            Ok(attached) => init.set_io(attached).await,
            Err(e) => {
                self.remove_in_guest(sandbox, id).await;
                let _ = rootfs::remove_container(&dirs);
                return Err(internal(format!("task {id}: {e}")));
            }
        }
        let container = Arc::new(Container {
            id: id.into(),
            bundle,
            dirs,
            init,
            execs: Mutex::new(HashMap::new()),
            paused: AtomicBool::new(false),
        });
        lock(&self.containers).insert(id.into(), container);
        self.events.create(id, &req.bundle, &stdio, pid).await;
        Ok(pid)
    }

    async fn remove_in_guest(&self, sandbox: &Sandbox, id: &str) {
        if !sandbox.is_running() {
            // Stopped or stopping: nobody would answer.
            return;
        }
        let mut req = pb::RemoveContainerRequest::new();
        req.container_id = id.into();
        if let Err(e) = sandbox.agent.remove_container(sandbox.ctx(), &req).await {
            tracing::warn!(container = id, "RemoveContainer: {e}");
        }
    }

    pub async fn start(self: &Arc<Self>, id: &str, exec_id: &str) -> ttrpc::Result<u32> {
        let container = self.container(id)?;
        let sandbox = self.sandbox()?;
        let process = container.process(exec_id)?;
        if process.state() != ProcessState::Created {
            return Err(precondition(format!(
                "{} of {id} was already started",
                process.task_id()
            )));
        }
        if exec_id.is_empty() {
            let mut req = pb::StartContainerRequest::new();
            req.container_id = id.into();
            sandbox
                .agent
                .start_container(sandbox.ctx(), &req)
                .await
                .map_err(|e| sandbox.agent_error("StartContainer", e))?;
        } else {
            if container.init.state() != ProcessState::Running {
                return Err(precondition(format!("container {id} is not running")));
            }
            let spec = lock(&process.spec).take().unwrap_or_default();
            let mut req = pb::ExecProcessRequest::new();
            req.container_id = id.into();
            req.exec_id = exec_id.into();
            req.process_json = spec;
            req.stdio = Some(process.stdio.to_agent()).into();
            let resp = sandbox
                .agent
                .exec_process(sandbox.ctx(), &req)
                .await
                .map_err(|e| sandbox.agent_error("ExecProcess", e))?;
            process.set_pid(resp.pid);
            let attached = io::attach(
                &sandbox.vsock_uds,
                id,
                Some(exec_id),
                &process.stdio,
                sandbox.request_timeout,
            )
            .await
            .map_err(|e| internal(format!("exec {exec_id} of {id}: {e}")))?;
            process.set_io(attached).await;
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

    /// Waits in the agent for the process to end, then records and
    /// publishes its exit (after its output is drained).
    fn spawn_exit_monitor(self: &Arc<Self>, sandbox: &Arc<Sandbox>, process: &Arc<Process>) {
        let (shim, sandbox, process) = (self.clone(), sandbox.clone(), process.clone());
        tokio::spawn(async move {
            let mut req = pb::WaitProcessRequest::new();
            req.container_id = process.container_id.clone();
            req.exec_id = process.exec_id.clone().unwrap_or_default();
            // No timeout: processes run as long as they like.
            let status = match sandbox
                .agent
                .wait_process(ttrpc::context::Context::default(), &req)
                .await
            {
                Ok(resp) => u32::try_from(resp.exit_status).unwrap_or(LOST_EXIT_STATUS),
                Err(e) => {
                    tracing::warn!(
                        container = process.container_id,
                        exec = process.task_id(),
                        "lost the process: {e}"
                    );
                    LOST_EXIT_STATUS
                }
            };
            let (exit, first) = process.finish(status).await;
            if first {
                shim.events
                    .exit(
                        &process.container_id,
                        process.task_id(),
                        process.pid(),
                        exit,
                    )
                    .await;
            }
        });
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
        let json = spec::exec_process_for_guest(spec_json).map_err(|e| invalid(e.to_string()))?;
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

    pub async fn kill(
        self: &Arc<Self>,
        id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> ttrpc::Result<()> {
        let container = self.container(id)?;
        let process = container.process(exec_id)?;
        match process.state() {
            ProcessState::Stopped(_) => {
                return Err(not_found(format!(
                    "{} of {id}: process already finished",
                    process.task_id()
                )))
            }
            // Not started: nothing in the guest runs yet (an exec only
            // exists here until Start).
            ProcessState::Created if !exec_id.is_empty() => {
                let (exit, first) = process.record_exit(128 + signal);
                if first {
                    self.events.exit(id, exec_id, 0, exit).await;
                }
                return Ok(());
            }
            _ => {}
        }
        let sandbox = self.sandbox()?;
        // SIGKILL to the last thing running in the VM: the VM is the kill
        // boundary. If the guest does not report the exit in time (a stuck
        // or lying agent), the VM is stopped and the exit reported anyway.
        let boundary = signal == KILL_SIGNAL && exec_id.is_empty() && self.is_last_running(id);
        if boundary {
            self.spawn_kill_boundary(&sandbox, &process);
        }
        let mut req = pb::SignalProcessRequest::new();
        req.container_id = id.into();
        req.exec_id = exec_id.into();
        req.signal = signal;
        req.all = all;
        let ctx = if boundary {
            ttrpc::context::with_timeout(sandbox.kill_grace.as_nanos() as i64)
        } else {
            sandbox.ctx()
        };
        match sandbox.agent.signal_process(ctx, &req).await {
            Ok(_) => Ok(()),
            Err(e) if boundary => {
                tracing::warn!(
                    container = id,
                    "SignalProcess(SIGKILL): {e}; the VM stops if no exit follows"
                );
                Ok(())
            }
            Err(e) => Err(sandbox.agent_error("SignalProcess", e)),
        }
    }

    /// Whether container `id` is what keeps the VM busy: the task that
    /// booted it, or the only container still running.
    fn is_last_running(&self, id: &str) -> bool {
        id == self.sandbox_id
            || lock(&self.containers)
                .values()
                .all(|c| c.id == id || c.init.state() != ProcessState::Running)
    }

    /// After a SIGKILL to `process`: unless it exits within the grace
    /// period, every process of the VM is reported killed (137) and the VM
    /// is stopped.
    fn spawn_kill_boundary(self: &Arc<Self>, sandbox: &Arc<Sandbox>, process: &Arc<Process>) {
        let (shim, sandbox, process) = (self.clone(), sandbox.clone(), process.clone());
        tokio::spawn(async move {
            let grace = sandbox.kill_grace;
            if tokio::time::timeout(grace, process.wait()).await.is_ok() {
                return;
            }
            tracing::warn!(
                sandbox = sandbox.id,
                "no exit {grace:?} after SIGKILL to {}: the guest does not answer; \
                 stopping the VM and reporting its processes killed",
                process.task_id()
            );
            let containers: Vec<Arc<Container>> =
                lock(&shim.containers).values().cloned().collect();
            for c in containers {
                let execs: Vec<Arc<Process>> = lock(&c.execs).values().cloned().collect();
                for p in std::iter::once(c.init.clone()).chain(execs) {
                    let (exit, first) = p.record_exit(KILLED_EXIT_STATUS);
                    if first && p.state() != ProcessState::Created {
                        shim.events
                            .exit(&p.container_id, p.task_id(), p.pid(), exit)
                            .await;
                    }
                }
            }
            sandbox.stop_vm().await;
        });
    }

    /// Deletes a stopped process: an exec, or the container with its files.
    pub async fn delete(&self, id: &str, exec_id: &str) -> ttrpc::Result<(u32, Option<Exit>)> {
        let container = self.container(id)?;
        let process = container.process(exec_id)?;
        if process.state() == ProcessState::Running {
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
        if paused {
            let mut req = pb::PauseContainerRequest::new();
            req.container_id = id.into();
            sandbox
                .agent
                .pause_container(sandbox.ctx(), &req)
                .await
                .map_err(|e| sandbox.agent_error("PauseContainer", e))?;
        } else {
            let mut req = pb::ResumeContainerRequest::new();
            req.container_id = id.into();
            sandbox
                .agent
                .resume_container(sandbox.ctx(), &req)
                .await
                .map_err(|e| sandbox.agent_error("ResumeContainer", e))?;
        }
        container.paused.store(paused, Ordering::SeqCst);
        if paused {
            self.events.paused(id).await;
        } else {
            self.events.resumed(id).await;
        }
        Ok(())
    }

    /// Number of containers left.
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

/// Coalesces OOM events: one per container per [`OomGate::WINDOW`].
#[derive(Default)]
struct OomGate {
    last: HashMap<String, std::time::Instant>,
}

impl OomGate {
    const WINDOW: std::time::Duration = std::time::Duration::from_secs(1);
    /// Containers remembered at most (ids come from the guest).
    const MAX_TRACKED: usize = 1024;

    fn admit(&mut self, id: &str) -> bool {
        self.admit_at(id, std::time::Instant::now())
    }

    fn admit_at(&mut self, id: &str, now: std::time::Instant) -> bool {
        if let Some(last) = self.last.get(id) {
            if now.saturating_duration_since(*last) < Self::WINDOW {
                return false;
            }
        }
        if self.last.len() >= Self::MAX_TRACKED {
            self.last.clear();
        }
        self.last.insert(id.to_string(), now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oom_events_are_coalesced_per_container() {
        let mut gate = OomGate::default();
        let t0 = std::time::Instant::now();
        assert!(gate.admit_at("c1", t0));
        assert!(!gate.admit_at("c1", t0 + std::time::Duration::from_millis(500)));
        assert!(gate.admit_at("c2", t0));
        assert!(gate.admit_at("c1", t0 + std::time::Duration::from_secs(2)));
    }

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
