//! In-memory stand-ins for a VM, its agent and containerd's event service:
//! the shim's lifecycle runs against them in tests, in milliseconds. The
//! fake guest keeps containers and processes as a real agent would (pids,
//! exits, stdio streams that end when the process does), records every
//! call, and can be told to fail, hang or die at any step.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use containerd_shim::protos::protobuf::MessageDyn;
use husk_config::Config;
use husk_hypervisor::ExitReason;
use husk_protocol::agent as pb;
use husk_util::sync::lock;
use husk_vsock::StdioKind;
use tokio::sync::watch;

use crate::agent::{Agent, NewContainer, ProcessRef};
use crate::beneath::Beneath;
use crate::errors::{internal, not_found, status};
use crate::events::Publisher;
use crate::guest_vm::GuestVm;
use crate::sandbox::{Launcher, Sandbox, SandboxError};
use crate::spec::PodInfo;

#[derive(Default)]
struct FakeProcess {
    pid: u32,
    exit: Option<i32>,
    /// The guest ends of attached stdio streams, closed at exit.
    streams: Vec<tokio::net::UnixStream>,
}

#[derive(Default)]
struct State {
    running: bool,
    /// Ended on its own (crash), as opposed to stopped by the host.
    crashed: bool,
    next_pid: u32,
    /// Container id → exec id ("" = init) → process.
    containers: HashMap<String, HashMap<String, FakeProcess>>,
    calls: Vec<String>,
    failing: HashSet<&'static str>,
    hanging: HashSet<&'static str>,
    ignore_signals: bool,
}

/// One fake guest: its VM and its agent share this state.
pub struct FakeGuest {
    state: Mutex<State>,
    /// Bumped on every change; waiters re-check their condition.
    changed: watch::Sender<u64>,
}

impl FakeGuest {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State {
                running: true,
                next_pid: 100,
                ..State::default()
            }),
            changed: watch::channel(0).0,
        })
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    /// Calls of `rpc` fail from now on.
    pub fn fail(&self, rpc: &'static str) {
        lock(&self.state).failing.insert(rpc);
    }

    /// Calls of `rpc` succeed again.
    pub fn heal(&self, rpc: &'static str) {
        lock(&self.state).failing.remove(rpc);
    }

    /// Calls of `rpc` never answer (until their timeout or the VM's end).
    pub fn hang(&self, rpc: &'static str) {
        lock(&self.state).hanging.insert(rpc);
    }

    /// Signals are accepted and do nothing (a stuck or lying agent).
    pub fn ignore_signals(&self) {
        lock(&self.state).ignore_signals = true;
    }

    /// The process exits with `status` on its own.
    pub fn exit(&self, container_id: &str, exec_id: &str, status: i32) {
        if let Some(p) = lock(&self.state)
            .containers
            .get_mut(container_id)
            .and_then(|c| c.get_mut(exec_id))
        {
            p.exit = Some(status);
            p.streams.clear();
        }
        self.bump();
    }

    /// Writes `data` (small: one socket buffer) on the process's first
    /// attached stream; false if it has none.
    pub fn write_output(&self, container_id: &str, exec_id: &str, data: &[u8]) -> bool {
        let written = lock(&self.state)
            .containers
            .get_mut(container_id)
            .and_then(|c| c.get_mut(exec_id))
            .and_then(|p| p.streams.first_mut())
            .map(|s| s.try_write(data));
        matches!(written, Some(Ok(n)) if n == data.len())
    }

    /// The guest dies (e.g. a kernel panic).
    pub fn crash(&self) {
        let mut state = lock(&self.state);
        state.running = false;
        state.crashed = true;
        drop(state);
        self.bump();
    }

    pub fn is_running(&self) -> bool {
        lock(&self.state).running
    }

    /// Every call so far, as "Rpc args".
    pub fn calls(&self) -> Vec<String> {
        lock(&self.state).calls.clone()
    }

    pub fn count(&self, call: &str) -> usize {
        self.calls().iter().filter(|c| c.starts_with(call)).count()
    }

    /// Processes the guest still has (not exited), as "container/exec".
    pub fn live_processes(&self) -> Vec<String> {
        let state = lock(&self.state);
        let mut live: Vec<String> = state
            .containers
            .iter()
            .flat_map(|(c, procs)| {
                procs
                    .iter()
                    .filter(|(_, p)| p.exit.is_none())
                    .map(move |(e, _)| format!("{c}/{e}"))
            })
            .collect();
        live.sort();
        live
    }

    pub fn has_container(&self, id: &str) -> bool {
        lock(&self.state).containers.contains_key(id)
    }

    /// Records the call; fails it, or hangs it (until `timeout`, or the VM
    /// ends), as configured. Fails every call once the VM is gone.
    async fn enter(
        &self,
        rpc: &'static str,
        args: &str,
        timeout: Option<Duration>,
    ) -> ttrpc::Result<()> {
        let hang = {
            let mut state = lock(&self.state);
            state
                .calls
                .push(format!("{rpc} {args}").trim_end().to_string());
            if !state.running {
                return Err(internal(format!("guest agent {rpc}: the VM is gone")));
            }
            if state.failing.contains(rpc) {
                return Err(internal(format!("guest agent {rpc}: injected failure")));
            }
            state.hanging.contains(rpc)
        };
        if hang {
            let gone = self.until(|s| !s.running);
            match timeout {
                Some(t) => {
                    let _ = tokio::time::timeout(t, gone).await;
                }
                None => gone.await,
            }
            return Err(internal(format!(
                "guest agent {rpc}: Receive packet timeout"
            )));
        }
        Ok(())
    }

    /// Waits until `done` holds for the state.
    async fn until(&self, done: impl Fn(&State) -> bool) {
        let mut rx = self.changed.subscribe();
        loop {
            if done(&lock(&self.state)) {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    fn with_process<T>(
        &self,
        process: ProcessRef<'_>,
        f: impl FnOnce(&mut FakeProcess) -> T,
    ) -> ttrpc::Result<T> {
        lock(&self.state)
            .containers
            .get_mut(process.container_id)
            .and_then(|c| c.get_mut(process.exec_id))
            .map(f)
            .ok_or_else(|| not_found(format!("guest agent: no process {process:?}")))
    }

    fn spawn(&self, container_id: &str, exec_id: &str) -> ttrpc::Result<u32> {
        let mut state = lock(&self.state);
        state.next_pid += 1;
        let pid = state.next_pid;
        let container = state
            .containers
            .entry(container_id.to_string())
            .or_default();
        if container.contains_key(exec_id) {
            return Err(status(
                ttrpc::Code::ALREADY_EXISTS,
                format!("guest agent: {container_id}/{exec_id} exists"),
            ));
        }
        container.insert(
            exec_id.to_string(),
            FakeProcess {
                pid,
                ..FakeProcess::default()
            },
        );
        Ok(pid)
    }
}

/// The agent of a [`FakeGuest`].
pub struct FakeAgent(pub Arc<FakeGuest>);

#[async_trait]
impl Agent for FakeAgent {
    async fn create_sandbox(&self, req: pb::CreateSandboxRequest) -> ttrpc::Result<()> {
        self.0.enter("CreateSandbox", &req.sandbox_id, None).await
    }

    async fn update_interface(&self, interface: pb::Interface) -> ttrpc::Result<()> {
        self.0.enter("UpdateInterface", &interface.name, None).await
    }

    async fn update_routes(&self, routes: Vec<pb::Route>) -> ttrpc::Result<()> {
        let args = format!("{}", routes.len());
        self.0.enter("UpdateRoutes", &args, None).await
    }

    async fn destroy_sandbox(&self, timeout: Duration) -> ttrpc::Result<()> {
        self.0.enter("DestroySandbox", "", Some(timeout)).await
    }

    async fn create_container(&self, container: NewContainer) -> ttrpc::Result<u32> {
        self.0.enter("CreateContainer", &container.id, None).await?;
        self.0.spawn(&container.id, "")
    }

    async fn start_container(&self, id: &str) -> ttrpc::Result<()> {
        self.0.enter("StartContainer", id, None).await?;
        self.0.with_process(
            ProcessRef {
                container_id: id,
                exec_id: "",
            },
            |_| (),
        )
    }

    async fn remove_container(&self, id: &str) -> ttrpc::Result<()> {
        self.0.enter("RemoveContainer", id, None).await?;
        lock(&self.0.state).containers.remove(id);
        self.0.bump();
        Ok(())
    }

    async fn set_paused(&self, id: &str, paused: bool) -> ttrpc::Result<()> {
        let rpc = if paused {
            "PauseContainer"
        } else {
            "ResumeContainer"
        };
        self.0.enter(rpc, id, None).await
    }

    async fn update_container(&self, id: &str, _resources_json: Vec<u8>) -> ttrpc::Result<()> {
        self.0.enter("UpdateContainer", id, None).await
    }

    async fn stats_container(&self, id: &str) -> ttrpc::Result<pb::ContainerStats> {
        self.0.enter("StatsContainer", id, None).await?;
        Ok(pb::ContainerStats::new())
    }

    async fn list_processes(&self, id: &str) -> ttrpc::Result<Vec<u32>> {
        self.0.enter("ListProcesses", id, None).await?;
        let state = lock(&self.0.state);
        Ok(state
            .containers
            .get(id)
            .map(|c| {
                c.values()
                    .filter(|p| p.exit.is_none())
                    .map(|p| p.pid)
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn exec_process(
        &self,
        process: ProcessRef<'_>,
        _process_json: Vec<u8>,
        _stdio: pb::Stdio,
    ) -> ttrpc::Result<u32> {
        let args = format!("{}/{}", process.container_id, process.exec_id);
        self.0.enter("ExecProcess", &args, None).await?;
        self.0.spawn(process.container_id, process.exec_id)
    }

    async fn signal_process(
        &self,
        process: ProcessRef<'_>,
        signal: u32,
        _all: bool,
        timeout: Option<Duration>,
    ) -> ttrpc::Result<()> {
        let args = format!("{}/{} {signal}", process.container_id, process.exec_id);
        self.0.enter("SignalProcess", &args, timeout).await?;
        if lock(&self.0.state).ignore_signals || signal == 0 {
            return Ok(());
        }
        let status = 128 + i32::try_from(signal).unwrap_or(0);
        self.0.with_process(process, |p| {
            p.exit.get_or_insert(status);
            p.streams.clear();
        })?;
        self.0.bump();
        Ok(())
    }

    async fn wait_process(&self, process: ProcessRef<'_>) -> ttrpc::Result<i32> {
        let args = format!("{}/{}", process.container_id, process.exec_id);
        self.0.enter("WaitProcess", &args, None).await?;
        let exited = |s: &State| {
            !s.running
                || s.containers
                    .get(process.container_id)
                    .and_then(|c| c.get(process.exec_id))
                    .is_none_or(|p| p.exit.is_some())
        };
        self.0.until(exited).await;
        let status = self.0.with_process(process, |p| p.exit)?;
        status.ok_or_else(|| internal("guest agent WaitProcess: the VM is gone"))
    }

    async fn resize_tty(
        &self,
        process: ProcessRef<'_>,
        rows: u32,
        columns: u32,
    ) -> ttrpc::Result<()> {
        let args = format!(
            "{}/{} {rows}x{columns}",
            process.container_id, process.exec_id
        );
        self.0.enter("TtyWinResize", &args, None).await
    }

    async fn connect_stdio(
        &self,
        process: ProcessRef<'_>,
        kind: StdioKind,
    ) -> Result<tokio::net::UnixStream, husk_vsock::AttachError> {
        let args = format!(
            "{}/{} {}",
            process.container_id,
            process.exec_id,
            kind.as_str()
        );
        let refused = || {
            husk_vsock::AttachError::Io(std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                "the agent closed the stream",
            ))
        };
        self.0
            .enter("ConnectStdio", &args, None)
            .await
            .map_err(|_| refused())?;
        let (host, guest) = tokio::net::UnixStream::pair()?;
        self.0
            .with_process(process, |p| p.streams.push(guest))
            .map_err(|_| refused())?;
        Ok(host)
    }

    async fn next_oom_event(&self) -> ttrpc::Result<String> {
        self.0.until(|s| !s.running).await;
        Err(internal("guest agent GetOomEvent: the VM is gone"))
    }
}

/// The VM of a [`FakeGuest`].
pub struct FakeVm(pub Arc<FakeGuest>);

#[async_trait]
impl GuestVm for FakeVm {
    fn is_running(&self) -> bool {
        self.0.is_running()
    }

    async fn exited(&self) -> ExitReason {
        self.0.until(|s| s.crashed).await;
        ExitReason::Stopped
    }

    async fn stop(&self) {
        lock(&self.0.state).running = false;
        self.0.bump();
    }

    fn describe(&self) -> Option<String> {
        Some("fake guest".into())
    }

    fn last_output(&self) -> Option<String> {
        Some("fake guest output".into())
    }
}

/// Launches [`FakeGuest`]s with sandbox directories under `root`.
pub struct FakeLauncher {
    pub guest: Arc<FakeGuest>,
    pub root: PathBuf,
    pub kill_grace: Duration,
    pub launches: AtomicUsize,
}

impl FakeLauncher {
    pub fn new(root: &Path) -> Self {
        Self {
            guest: FakeGuest::new(),
            root: root.to_path_buf(),
            kill_grace: Duration::from_millis(200),
            launches: AtomicUsize::new(0),
        }
    }
}

#[async_trait]
impl Launcher for FakeLauncher {
    async fn launch(
        &self,
        _config: &Config,
        _namespace: &str,
        id: &str,
        _pod: &PodInfo,
    ) -> Result<Sandbox, SandboxError> {
        self.launches.fetch_add(1, Ordering::SeqCst);
        // A real boot takes a while: let concurrent requests run meanwhile.
        tokio::task::yield_now().await;
        let dir = self.root.join("sandbox");
        let staging_dir = dir.join("staging");
        let io = |source| SandboxError::Io {
            path: staging_dir.clone(),
            source,
        };
        std::fs::create_dir_all(&staging_dir).map_err(io)?;
        let staging = Beneath::open(&staging_dir).map_err(io)?;
        let agent = Arc::new(FakeAgent(self.guest.clone()));
        let vm = Arc::new(FakeVm(self.guest.clone()));
        Ok(Sandbox::new(id, dir, staging, agent, vm, self.kill_grace))
    }
}

/// Keeps every event published, as "topic text-format".
#[derive(Clone, Default)]
pub struct RecordingPublisher(pub Arc<Mutex<Vec<String>>>);

impl RecordingPublisher {
    pub fn events(&self) -> Vec<String> {
        lock(&self.0).clone()
    }

    /// How many events of `topic` were published.
    pub fn count(&self, topic: &str) -> usize {
        self.topics().iter().filter(|t| *t == topic).count()
    }

    /// The published events' topics, in order.
    pub fn topics(&self) -> Vec<String> {
        self.events()
            .iter()
            .map(|e| e.split(' ').next().unwrap_or_default().to_string())
            .collect()
    }
}

#[async_trait]
impl Publisher for RecordingPublisher {
    async fn publish(
        &self,
        topic: &str,
        _namespace: &str,
        event: Box<dyn MessageDyn>,
    ) -> Result<(), String> {
        let text = containerd_shim::protos::protobuf::text_format::print_to_string(&*event);
        lock(&self.0).push(format!("{topic} {text}"));
        Ok(())
    }
}
