//! The containers of the guest: creation and exec through youki's
//! libcontainer, and the lifecycle around them (start, signals, waits,
//! pause, resources, statistics, removal).
//!
//! libcontainer is synchronous and forks (creating a container takes
//! seconds in a nested-KVM guest), so its calls run on blocking threads;
//! those that fork hold [`Reaper::lock`] until the new pid is registered
//! (see [`crate::reaper`]) and log through
//! [`crate::logging::fork_safe_dispatch`].
//!
//! Layout: bundles in `<run>/containers/<id>/` (config.json, exec-*.json),
//! libcontainer's state in `<run>/libcontainer/`, console sockets in
//! `<run>/tty/`, each container's cgroup at `/sys/fs/cgroup/husk/<id>`.
//! Signals, pause/resume, updates and statistics are in control.rs.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use husk_protocol::agent::{CreateContainerRequest, ExecProcessRequest, Stdio};
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::Container as LcContainer;
use libcontainer::error::LibcontainerError;
use libcontainer::oci_spec::runtime::LinuxSeccomp;
use libcontainer::syscall::syscall::SyscallType;
use nix::sys::resource::{getrusage, Usage, UsageWho};
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::sync::oneshot;

use crate::cgroup::{self, OomEvents};
use crate::error::{chain, check_id, Error, Result};
use crate::exec_seccomp;
use crate::exec_wait;
use crate::mounts;
use crate::process::{Exit, Process};
use crate::reaper::{ExitStatus, Reaper};
use crate::spec;
use crate::stdio::{self, ChildStdio, PendingIo, ProcessIo, Requested};
use crate::workload::HuskExecutor;
use husk_util::sync::lock;

mod control;

/// cgroup (under the cgroup2 root) that holds every container's cgroup.
pub const CGROUP_PARENT: &str = "husk";
/// How long RemoveContainer waits for a SIGKILLed init to be reaped.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest Start waits for the container's process to exec its program
/// (see crate::exec_wait); the start has succeeded either way.
const EXEC_WAIT_BOUND: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Created,
    Running,
    Paused,
    Stopped,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Status::Created => "created",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Stopped => "stopped",
        })
    }
}

/// Where the agent keeps its files (`/run/husk` in a guest).
#[derive(Clone, Debug)]
pub struct Layout {
    pub run: PathBuf,
}

impl Layout {
    fn bundle(&self, id: &str) -> PathBuf {
        self.run.join("containers").join(id)
    }
    fn libcontainer_root(&self) -> PathBuf {
        self.run.join("libcontainer")
    }
    fn tty_dir(&self) -> PathBuf {
        self.run.join("tty")
    }
}

enum Slot<T> {
    /// Being created or removed.
    Busy,
    Ready(Arc<T>),
}

pub struct Container {
    pub id: String,
    bundle: PathBuf,
    rootfs: PathBuf,
    cgroup: PathBuf,
    lc: Arc<Mutex<LcContainer>>,
    status: Arc<Mutex<Status>>,
    pub init: Arc<Process>,
    execs: Mutex<HashMap<String, Slot<Process>>>,
    storages: Vec<PathBuf>,
    /// The spec's filter, for exec'd processes ([`crate::exec_seccomp`]).
    seccomp: Option<LinuxSeccomp>,
    oom_watch: tokio::task::JoinHandle<()>,
}

impl Container {
    pub fn status(&self) -> Status {
        *lock(&self.status)
    }

    /// `None` exec id: the init process.
    pub fn process(&self, exec_id: Option<&str>) -> Result<Arc<Process>> {
        let Some(exec_id) = exec_id else {
            return Ok(self.init.clone());
        };
        match lock(&self.execs).get(exec_id) {
            Some(Slot::Ready(p)) => Ok(p.clone()),
            Some(Slot::Busy) => Err(Error::FailedPrecondition(format!(
                "exec {exec_id} in container {} is still being created",
                self.id
            ))),
            None => Err(Error::NotFound(format!(
                "exec {exec_id} not found in container {}",
                self.id
            ))),
        }
    }

    fn processes(&self) -> Vec<Arc<Process>> {
        let mut all = vec![self.init.clone()];
        all.extend(lock(&self.execs).values().filter_map(|s| match s {
            Slot::Ready(p) => Some(p.clone()),
            Slot::Busy => None,
        }));
        all
    }
}

/// Every container of the guest.
pub struct Containers {
    table: Mutex<HashMap<String, Slot<Container>>>,
    reaper: Reaper,
    pub oom: Arc<OomEvents>,
    layout: Layout,
    consoles: AtomicU64,
    /// libcontainer's state root and the console socket directory exist
    /// (made once: four syscalls fewer per create, two per exec).
    dirs_made: AtomicBool,
}

/// Runs libcontainer work on a blocking thread.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Internal(format!("blocking task failed: {e}")))
}

/// A libcontainer error as an RPC error: what the client got wrong is
/// INVALID_ARGUMENT, a wrong state FAILED_PRECONDITION, the rest INTERNAL.
fn lc_error(what: &str, e: &LibcontainerError) -> Error {
    let text = match e {
        LibcontainerError::InvalidInput(s) => format!("{what}: invalid input: {s}"),
        e => format!("{what}: {}", chain(e)),
    };
    match e {
        LibcontainerError::Exist => Error::AlreadyExists(text),
        LibcontainerError::IncorrectStatus(_) => Error::FailedPrecondition(text),
        LibcontainerError::InvalidID(_)
        | LibcontainerError::InvalidInput(_)
        | LibcontainerError::MissingSpec(_)
        | LibcontainerError::InvalidSpec(_)
        | LibcontainerError::Spec(_) => Error::InvalidArgument(text),
        _ => Error::Internal(text),
    }
}

fn requested(stdio: Option<&Stdio>) -> Requested {
    stdio.map_or_else(Requested::default, |s| Requested {
        stdin: s.stdin,
        stdout: s.stdout,
        stderr: s.stderr,
        terminal: s.terminal,
    })
}

fn with_stdio(builder: ContainerBuilder, child: ChildStdio) -> ContainerBuilder {
    match child {
        ChildStdio::Pipes {
            stdin,
            stdout,
            stderr,
        } => builder
            .with_stdin(stdin)
            .with_stdout(stdout)
            .with_stderr(stderr),
        ChildStdio::Console { socket } => builder.with_console_socket(Some(socket)),
    }
}

/// What a libcontainer build on a blocking thread hands back.
struct Built {
    pid: Pid,
    status: oneshot::Receiver<ExitStatus>,
    io: ProcessIo,
}

/// Runs `build` (which forks the process and returns its pid) under the
/// reaper lock and the fork-safe log dispatcher, registers the pid, then
/// takes the process's pty master if it has one. If that last step fails
/// the process is killed.
fn build_process(
    reaper: &Reaper,
    pending: PendingIo,
    build: impl FnOnce() -> Result<Pid>,
) -> Result<Built> {
    let (pid, status) =
        tracing::dispatcher::with_default(&crate::logging::fork_safe_dispatch(), || {
            let mut guard = reaper.lock();
            let pid = build()?;
            Ok::<_, Error>((pid, guard.register(pid)))
        })?;
    match pending.finish() {
        Ok(io) => Ok(Built { pid, status, io }),
        Err(e) => {
            let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
            Err(Error::Internal(format!("process {pid}: stdio: {e}")))
        }
    }
}

fn set_oom_score_adj(pid: Pid, value: Option<i32>) -> Result<()> {
    let Some(value) = value else { return Ok(()) };
    std::fs::write(format!("/proc/{pid}/oom_score_adj"), value.to_string())
        .map_err(|e| Error::Internal(format!("set oom_score_adj {value} of pid {pid}: {e}")))
}

/// What one step cost the agent (all its threads) and its waited-for
/// children (for a create: libcontainer's intermediate process; the
/// container's init counts once it is reaped), for the debug log. Nothing
/// is measured at other levels. `agent/tests/measure.rs` measures a whole
/// create + start from outside.
struct Cost {
    started: Instant,
    agent: Usage,
    children: Usage,
}

impl Cost {
    fn begin() -> Option<Cost> {
        if !tracing::enabled!(tracing::Level::DEBUG) {
            return None;
        }
        Some(Cost {
            started: Instant::now(),
            agent: getrusage(UsageWho::RUSAGE_SELF).ok()?,
            children: getrusage(UsageWho::RUSAGE_CHILDREN).ok()?,
        })
    }

    fn log(self, container: &str, step: &str) {
        let (Ok(agent), Ok(children)) = (
            getrusage(UsageWho::RUSAGE_SELF),
            getrusage(UsageWho::RUSAGE_CHILDREN),
        ) else {
            return;
        };
        let faults = |now: &Usage, then: &Usage| {
            (
                now.minor_page_faults() - then.minor_page_faults(),
                now.major_page_faults() - then.major_page_faults(),
            )
        };
        let (agent_minflt, agent_majflt) = faults(&agent, &self.agent);
        let (children_minflt, children_majflt) = faults(&children, &self.children);
        tracing::debug!(
            container,
            wall_us = u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX),
            agent_minflt,
            agent_majflt,
            children_minflt,
            children_majflt,
            "{step} cost"
        );
    }
}

/// Unmounts what it holds when dropped, unless disarmed.
struct MountGuard(Vec<PathBuf>);

impl Drop for MountGuard {
    fn drop(&mut self) {
        mounts::unmount_all(&self.0);
    }
}

impl MountGuard {
    fn disarm(mut self) -> Vec<PathBuf> {
        std::mem::take(&mut self.0)
    }
}

impl Containers {
    pub fn new(layout: Layout, reaper: Reaper) -> Containers {
        Containers {
            table: Mutex::new(HashMap::new()),
            reaper,
            oom: Arc::new(OomEvents::default()),
            layout,
            consoles: AtomicU64::new(0),
            dirs_made: AtomicBool::new(false),
        }
    }

    pub fn get(&self, id: &str) -> Result<Arc<Container>> {
        check_id("container", id)?;
        match lock(&self.table).get(id) {
            Some(Slot::Ready(c)) => Ok(c.clone()),
            Some(Slot::Busy) => Err(Error::FailedPrecondition(format!(
                "container {id} is being created or removed"
            ))),
            None => Err(Error::NotFound(format!("container {id} not found"))),
        }
    }

    pub fn ids(&self) -> Vec<String> {
        lock(&self.table).keys().cloned().collect()
    }

    /// The process stdio streams attach to.
    pub fn process(&self, container_id: &str, exec_id: Option<&str>) -> Result<Arc<Process>> {
        self.get(container_id)?.process(exec_id)
    }

    /// Makes the agent's directories under `run` once.
    fn make_dirs(&self) -> Result<()> {
        if self.dirs_made.load(Ordering::Relaxed) {
            return Ok(());
        }
        for dir in [self.layout.libcontainer_root(), self.layout.tty_dir()] {
            std::fs::create_dir_all(&dir)
                .map_err(|e| Error::Internal(format!("create {}: {e}", dir.display())))?;
        }
        self.dirs_made.store(true, Ordering::Relaxed);
        Ok(())
    }

    fn console_socket(&self) -> Result<PathBuf> {
        self.make_dirs()?;
        let n = self.consoles.fetch_add(1, Ordering::Relaxed);
        Ok(self.layout.tty_dir().join(format!("{n}.sock")))
    }

    pub async fn create(&self, req: CreateContainerRequest) -> Result<Pid> {
        let id = req.container_id.clone();
        check_id("container", &id)?;
        {
            let mut table = lock(&self.table);
            if table.contains_key(&id) {
                return Err(Error::AlreadyExists(format!(
                    "container {id} already exists"
                )));
            }
            table.insert(id.clone(), Slot::Busy);
        }
        let result = self.create_reserved(req).await;
        let mut table = lock(&self.table);
        match result {
            Ok(container) => {
                let pid = container.init.pid;
                table.insert(id, Slot::Ready(container));
                Ok(pid)
            }
            Err(e) => {
                table.remove(&id);
                Err(e)
            }
        }
    }

    async fn create_reserved(&self, req: CreateContainerRequest) -> Result<Arc<Container>> {
        let cost = Cost::begin();
        let id = req.container_id.clone();
        let requested = requested(req.stdio.as_ref());
        let mut mounted = MountGuard(Vec::new());
        let rootfs = match req.rootfs_storage.as_ref() {
            Some(storage) => {
                mounted.0.push(mounts::mount_storage(storage)?);
                if req.rootfs_path.is_empty() {
                    PathBuf::from(&storage.mount_point)
                } else {
                    PathBuf::from(&req.rootfs_path)
                }
            }
            None => PathBuf::from(&req.rootfs_path),
        };
        if !rootfs.is_absolute() {
            return Err(Error::InvalidArgument(format!(
                "container {id}: rootfs {:?} is not an absolute guest path",
                req.rootfs_path
            )));
        }
        if !rootfs.is_dir() {
            return Err(Error::InvalidArgument(format!(
                "container {id}: rootfs {} does not exist or is not a directory",
                rootfs.display()
            )));
        }
        mounted.0.extend(mounts::mount_all(&req.storages)?);

        let cgroups_path = spec::cgroups_path(CGROUP_PARENT, &id);
        let prepared = spec::container_spec(&id, &req.spec_json, &rootfs, &cgroups_path)?;
        if prepared.terminal != requested.terminal {
            return Err(Error::InvalidArgument(format!(
                "container {id}: process.terminal is {} but stdio.terminal is {}",
                prepared.terminal, requested.terminal
            )));
        }
        // The VM's namespaces are the pod's: its sysctls are set there.
        crate::sysctl::apply(std::path::Path::new("/proc/sys"), &prepared.vm_sysctls)
            .map_err(|e| Error::InvalidArgument(format!("container {id}: {e}")))?;
        let seccomp = prepared
            .spec
            .linux()
            .as_ref()
            .and_then(|l| l.seccomp().clone());
        let bundle = self.layout.bundle(&id);
        let json = serde_json::to_vec(&prepared.spec)
            .map_err(|e| Error::Internal(format!("serialize spec: {e}")))?;
        std::fs::create_dir_all(&bundle)
            .and_then(|()| std::fs::write(bundle.join("config.json"), json))
            .map_err(|e| Error::Internal(format!("write bundle {}: {e}", bundle.display())))?;
        let state_root = self.layout.libcontainer_root();
        let console = self.console_socket()?;
        let (child, pending) = stdio::prepare(requested, &console)
            .map_err(|e| Error::Internal(format!("container {id}: stdio: {e}")))?;
        let reaper = self.reaper.clone();
        let (lc_id, lc_bundle) = (id.clone(), bundle.clone());
        let built = blocking(move || {
            let mut made = None;
            let built = build_process(&reaper, pending, || {
                let builder = ContainerBuilder::new(lc_id.clone(), SyscallType::default())
                    .with_root_path(&state_root)
                    .map_err(|e| lc_error(&format!("container {lc_id}"), &e))?
                    .with_executor(HuskExecutor::default());
                let container = with_stdio(builder, child)
                    .as_init(&lc_bundle)
                    .with_systemd(false)
                    .with_detach(true)
                    .build()
                    .map_err(|e| lc_error(&format!("create container {lc_id}"), &e))?;
                let pid = container.pid().ok_or_else(|| {
                    Error::Internal(format!("container {lc_id}: libcontainer reported no pid"))
                })?;
                made = Some(container);
                // libcontainer's nix is another version than ours.
                Ok(Pid::from_raw(pid.as_raw()))
            });
            match (built, made) {
                (Ok(built), Some(container)) => Ok((built, container)),
                (Err(e), Some(mut container)) => {
                    let _ = container.delete(true);
                    Err(e)
                }
                (Err(e), None) => Err(e),
                (Ok(_), None) => Err(Error::Internal("libcontainer built nothing".into())),
            }
        })
        .await?;
        let (built, lc) = match built {
            Ok(b) => b,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&bundle);
                return Err(e);
            }
        };
        // Bound only for a terminal (stdio::prepare).
        if requested.terminal {
            let _ = std::fs::remove_file(&console);
        }
        if let Err(e) = set_oom_score_adj(built.pid, prepared.oom_score_adj) {
            tracing::warn!(container = id, "{e}");
        }

        let status = Arc::new(Mutex::new(Status::Created));
        let on_reaped = {
            let status = status.clone();
            move |_exit: Exit| *lock(&status) = Status::Stopped
        };
        let init = Process::start(built.pid, None, built.io, built.status, on_reaped);
        let cgroup = cgroup::dir(&cgroups_path);
        let oom_watch = tokio::spawn(cgroup::watch_oom(
            cgroup.clone(),
            id.clone(),
            self.oom.clone(),
        ));
        tracing::info!(
            container = id,
            pid = built.pid.as_raw(),
            "container created"
        );
        if let Some(cost) = cost {
            cost.log(&id, "create");
        }
        Ok(Arc::new(Container {
            id,
            bundle,
            rootfs,
            cgroup,
            lc: Arc::new(Mutex::new(lc)),
            status,
            init,
            execs: Mutex::new(HashMap::new()),
            storages: mounted.disarm(),
            seccomp,
            oom_watch,
        }))
    }

    pub async fn start(&self, id: &str) -> Result<()> {
        let c = self.get(id)?;
        let status = c.status();
        if status != Status::Created {
            return Err(Error::FailedPrecondition(format!(
                "container {id} is {status}; only a created container can be started"
            )));
        }
        let cost = Cost::begin();
        let lc = c.lc.clone();
        blocking(move || lock(&lc).start())
            .await?
            .map_err(|e| lc_error(&format!("start container {id}"), &e))?;
        if let Some(agent) = exec_wait::agent_identity() {
            if !exec_wait::wait_for_exec(c.init.pid, agent, EXEC_WAIT_BOUND).await {
                tracing::warn!(
                    container = id,
                    "the container's process has not exec'd its program after {EXEC_WAIT_BOUND:?}"
                );
            }
        }
        if let Some(cost) = cost {
            cost.log(id, "start");
        }
        let mut status = lock(&c.status);
        if *status == Status::Created {
            *status = Status::Running;
        }
        Ok(())
    }

    pub async fn exec(&self, req: ExecProcessRequest) -> Result<Pid> {
        let (cid, eid) = (req.container_id.as_str(), req.exec_id.as_str());
        check_id("exec", eid)?;
        let c = self.get(cid)?;
        let status = c.status();
        if status != Status::Running {
            return Err(Error::FailedPrecondition(format!(
                "container {cid} is {status}; exec needs a running container"
            )));
        }
        {
            let mut execs = lock(&c.execs);
            if execs.contains_key(eid) {
                return Err(Error::AlreadyExists(format!(
                    "exec {eid} already exists in container {cid}"
                )));
            }
            execs.insert(eid.to_owned(), Slot::Busy);
        }
        let result = self.exec_reserved(&c, &req).await;
        let mut execs = lock(&c.execs);
        match result {
            Ok(process) => {
                let pid = process.pid;
                execs.insert(eid.to_owned(), Slot::Ready(process));
                Ok(pid)
            }
            Err(e) => {
                execs.remove(eid);
                Err(e)
            }
        }
    }

    async fn exec_reserved(&self, c: &Container, req: &ExecProcessRequest) -> Result<Arc<Process>> {
        let (cid, eid) = (req.container_id.clone(), req.exec_id.clone());
        let requested = requested(req.stdio.as_ref());
        let mut prepared = spec::exec_process(&cid, &eid, &req.process_json, &c.rootfs)?;
        let exec_seccomp = exec_seccomp::prepare(
            &mut prepared.process,
            c.seccomp.as_ref(),
            &format!("exec {eid} in container {cid}"),
        )?;
        if prepared.terminal != requested.terminal {
            return Err(Error::InvalidArgument(format!(
                "exec {eid} in container {cid}: process.terminal is {} but stdio.terminal is {}",
                prepared.terminal, requested.terminal
            )));
        }
        let process_file = c.bundle.join(format!("exec-{eid}.json"));
        let json = serde_json::to_vec(&prepared.process)
            .map_err(|e| Error::Internal(format!("serialize process: {e}")))?;
        std::fs::write(&process_file, json)
            .map_err(|e| Error::Internal(format!("write {}: {e}", process_file.display())))?;
        let console = self.console_socket()?;
        let (child, pending) = stdio::prepare(requested, &console)
            .map_err(|e| Error::Internal(format!("exec {eid} in container {cid}: stdio: {e}")))?;
        let reaper = self.reaper.clone();
        let state_root = self.layout.libcontainer_root();
        let file = process_file.clone();
        let (lc_cid, lc_eid) = (cid.clone(), eid.clone());
        let built = blocking(move || {
            build_process(&reaper, pending, || {
                let what = format!("exec {lc_eid} in container {lc_cid}");
                let builder = ContainerBuilder::new(lc_cid.clone(), SyscallType::default())
                    .with_root_path(&state_root)
                    .map_err(|e| lc_error(&what, &e))?
                    .with_executor(HuskExecutor { exec_seccomp });
                with_stdio(builder, child)
                    .as_tenant()
                    .with_process(Some(&file))
                    .with_detach(true)
                    .build()
                    .map(|pid| Pid::from_raw(pid.as_raw()))
                    .map_err(|e| lc_error(&what, &e))
            })
        })
        .await;
        let _ = std::fs::remove_file(&process_file);
        if requested.terminal {
            let _ = std::fs::remove_file(&console);
        }
        let built = built??;
        if let Err(e) = set_oom_score_adj(built.pid, prepared.oom_score_adj) {
            tracing::warn!(container = cid, exec = eid, "{e}");
        }
        tracing::info!(
            container = cid,
            exec = eid,
            pid = built.pid.as_raw(),
            "process exec'd"
        );
        Ok(Process::start(
            built.pid,
            Some(eid),
            built.io,
            built.status,
            |_| {},
        ))
    }

    pub async fn remove(&self, id: &str) -> Result<()> {
        let c = self.get(id)?;
        lock(&self.table).insert(id.to_owned(), Slot::Busy);
        let result = self.remove_container(&c).await;
        let mut table = lock(&self.table);
        match result {
            Ok(()) => {
                table.remove(id);
                tracing::info!(container = id, "container removed");
                Ok(())
            }
            Err(e) => {
                table.insert(id.to_owned(), Slot::Ready(c));
                Err(e)
            }
        }
    }

    async fn remove_container(&self, c: &Arc<Container>) -> Result<()> {
        let id = c.id.clone();
        if !c.init.has_exited() {
            if let Err(e) = cgroup::signal_all(&c.cgroup, Signal::SIGKILL) {
                tracing::warn!(
                    container = id,
                    "kill via cgroup: {e}; killing the init process"
                );
                let _ = c.init.signal(Signal::SIGKILL);
            }
            if tokio::time::timeout(KILL_TIMEOUT, c.init.reaped())
                .await
                .is_err()
            {
                return Err(Error::Internal(format!(
                    "container {id}: init process {} still running {KILL_TIMEOUT:?} after SIGKILL",
                    c.init.pid
                )));
            }
        }
        let lc = c.lc.clone();
        blocking(move || lock(&lc).delete(true))
            .await?
            .map_err(|e| lc_error(&format!("delete container {id}"), &e))?;
        c.oom_watch.abort();
        for process in c.processes() {
            process.io.abandon();
        }
        mounts::unmount_all(&c.storages);
        if let Err(e) = std::fs::remove_dir_all(&c.bundle) {
            tracing::warn!(container = id, "remove {}: {e}", c.bundle.display());
        }
        Ok(())
    }
}
