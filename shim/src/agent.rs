//! What the shim asks of the guest agent, as typed calls: [`Agent`] is the
//! seam the lifecycle code (container.rs, kill.rs, service.rs) is written
//! against; [`TtrpcAgent`] is the real one, over ttrpc on the VM's hybrid
//! vsock. It builds the requests, applies the request timeout and maps every
//! failure to a task-API status whose message names the call (guest text
//! sanitized, a timeout explained with what the guest was doing).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use husk_protocol::agent as pb;
use husk_protocol::AgentServiceClient;
use husk_vsock::StdioKind;

use crate::errors::from_agent;

/// A process in the guest: `exec_id` "" is the container's init.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessRef<'a> {
    pub container_id: &'a str,
    pub exec_id: &'a str,
}

impl ProcessRef<'_> {
    pub fn exec(&self) -> Option<&str> {
        (!self.exec_id.is_empty()).then_some(self.exec_id)
    }
}

/// A container for the agent to create.
#[derive(Debug, Clone)]
pub struct NewContainer {
    pub id: String,
    /// The guest's OCI spec (JSON), see spec.rs.
    pub spec_json: Vec<u8>,
    /// Where the rootfs is in the guest.
    pub rootfs_path: String,
    pub stdio: pb::Stdio,
}

/// Everything the shim asks of a guest agent. Each call fails with a
/// task-API status (see [`crate::errors`]).
#[async_trait]
pub trait Agent: Send + Sync {
    async fn create_sandbox(&self, req: pb::CreateSandboxRequest) -> ttrpc::Result<()>;
    async fn update_interface(&self, interface: pb::Interface) -> ttrpc::Result<()>;
    async fn update_routes(&self, routes: Vec<pb::Route>) -> ttrpc::Result<()>;
    /// Bounded by `timeout`: it runs while the VM is being stopped.
    async fn destroy_sandbox(&self, timeout: Duration) -> ttrpc::Result<()>;

    /// Returns the init process's pid.
    async fn create_container(&self, container: NewContainer) -> ttrpc::Result<u32>;
    async fn start_container(&self, id: &str) -> ttrpc::Result<()>;
    async fn remove_container(&self, id: &str) -> ttrpc::Result<()>;
    async fn set_paused(&self, id: &str, paused: bool) -> ttrpc::Result<()>;
    async fn update_container(&self, id: &str, resources_json: Vec<u8>) -> ttrpc::Result<()>;
    async fn stats_container(&self, id: &str) -> ttrpc::Result<pb::ContainerStats>;
    async fn list_processes(&self, id: &str) -> ttrpc::Result<Vec<u32>>;

    /// Starts exec `process.exec_id`; returns its pid.
    async fn exec_process(
        &self,
        process: ProcessRef<'_>,
        process_json: Vec<u8>,
        stdio: pb::Stdio,
    ) -> ttrpc::Result<u32>;
    /// `timeout`: None for the request timeout.
    async fn signal_process(
        &self,
        process: ProcessRef<'_>,
        signal: u32,
        all: bool,
        timeout: Option<Duration>,
    ) -> ttrpc::Result<()>;
    /// Waits (without a timeout) for the process to end; its exit status.
    async fn wait_process(&self, process: ProcessRef<'_>) -> ttrpc::Result<i32>;
    async fn resize_tty(
        &self,
        process: ProcessRef<'_>,
        rows: u32,
        columns: u32,
    ) -> ttrpc::Result<()>;
    /// One of the process's stdio streams, connected.
    async fn connect_stdio(
        &self,
        process: ProcessRef<'_>,
        kind: StdioKind,
    ) -> Result<tokio::net::UnixStream, husk_vsock::AttachError>;

    /// Waits (without a timeout) for the next OOM kill; the container's id.
    async fn next_oom_event(&self) -> ttrpc::Result<String>;
}

/// Says what the guest is doing, for the message of a timed-out call.
pub type Diagnose = Arc<dyn Fn() -> Option<String> + Send + Sync>;

/// The agent of a real VM: ttrpc over its hybrid vsock.
pub struct TtrpcAgent {
    client: AgentServiceClient,
    vsock_uds: PathBuf,
    request_timeout: Duration,
    diagnose: Diagnose,
}

impl TtrpcAgent {
    pub fn new(
        client: AgentServiceClient,
        vsock_uds: PathBuf,
        request_timeout: Duration,
        diagnose: Diagnose,
    ) -> Self {
        Self {
            client,
            vsock_uds,
            request_timeout,
            diagnose,
        }
    }

    fn ctx(&self) -> ttrpc::context::Context {
        with_timeout(self.request_timeout)
    }

    /// The task-API error for a failed call `rpc`; a call that timed out
    /// also says what the guest was doing (logged, and in the message).
    fn error(&self, rpc: &str, e: ttrpc::Error) -> ttrpc::Error {
        let timed_out = e.to_string().to_ascii_lowercase().contains("timeout");
        let err = from_agent(rpc, e);
        if !timed_out {
            return err;
        }
        let Some(diagnosis) = (self.diagnose)() else {
            return err;
        };
        tracing::warn!("agent {rpc} timed out; {diagnosis}");
        match err {
            ttrpc::Error::RpcStatus(mut s) => {
                s.message = format!(
                    "{} (after {:.0} s; raise [agent] request_timeout_secs if the host is just slow); {diagnosis}",
                    s.message,
                    self.request_timeout.as_secs_f64()
                );
                ttrpc::Error::RpcStatus(s)
            }
            other => other,
        }
    }
}

/// A ttrpc context with `timeout` (saturating: ttrpc counts nanoseconds).
fn with_timeout(timeout: Duration) -> ttrpc::context::Context {
    ttrpc::context::with_timeout(i64::try_from(timeout.as_nanos()).unwrap_or(i64::MAX))
}

/// A call with the request timeout, its failure mapped.
macro_rules! call {
    ($self:ident, $rpc:ident, $name:literal, $req:expr) => {
        $self
            .client
            .$rpc($self.ctx(), &$req)
            .await
            .map_err(|e| $self.error($name, e))
    };
}

#[async_trait]
impl Agent for TtrpcAgent {
    async fn create_sandbox(&self, req: pb::CreateSandboxRequest) -> ttrpc::Result<()> {
        call!(self, create_sandbox, "CreateSandbox", req).map(drop)
    }

    async fn update_interface(&self, interface: pb::Interface) -> ttrpc::Result<()> {
        let mut req = pb::UpdateInterfaceRequest::new();
        req.interface = Some(interface).into();
        call!(self, update_interface, "UpdateInterface", req).map(drop)
    }

    async fn update_routes(&self, routes: Vec<pb::Route>) -> ttrpc::Result<()> {
        let mut req = pb::UpdateRoutesRequest::new();
        req.routes = routes;
        call!(self, update_routes, "UpdateRoutes", req).map(drop)
    }

    async fn destroy_sandbox(&self, timeout: Duration) -> ttrpc::Result<()> {
        self.client
            .destroy_sandbox(with_timeout(timeout), &pb::DestroySandboxRequest::new())
            .await
            .map(drop)
            .map_err(|e| self.error("DestroySandbox", e))
    }

    async fn create_container(&self, container: NewContainer) -> ttrpc::Result<u32> {
        let mut req = pb::CreateContainerRequest::new();
        req.container_id = container.id;
        req.spec_json = container.spec_json;
        req.rootfs_path = container.rootfs_path;
        req.stdio = Some(container.stdio).into();
        call!(self, create_container, "CreateContainer", req).map(|r| r.pid)
    }

    async fn start_container(&self, id: &str) -> ttrpc::Result<()> {
        let mut req = pb::StartContainerRequest::new();
        req.container_id = id.into();
        call!(self, start_container, "StartContainer", req).map(drop)
    }

    async fn remove_container(&self, id: &str) -> ttrpc::Result<()> {
        let mut req = pb::RemoveContainerRequest::new();
        req.container_id = id.into();
        call!(self, remove_container, "RemoveContainer", req).map(drop)
    }

    async fn set_paused(&self, id: &str, paused: bool) -> ttrpc::Result<()> {
        if paused {
            let mut req = pb::PauseContainerRequest::new();
            req.container_id = id.into();
            call!(self, pause_container, "PauseContainer", req).map(drop)
        } else {
            let mut req = pb::ResumeContainerRequest::new();
            req.container_id = id.into();
            call!(self, resume_container, "ResumeContainer", req).map(drop)
        }
    }

    async fn update_container(&self, id: &str, resources_json: Vec<u8>) -> ttrpc::Result<()> {
        let mut req = pb::UpdateContainerRequest::new();
        req.container_id = id.into();
        req.resources_json = resources_json;
        call!(self, update_container, "UpdateContainer", req).map(drop)
    }

    async fn stats_container(&self, id: &str) -> ttrpc::Result<pb::ContainerStats> {
        let mut req = pb::StatsContainerRequest::new();
        req.container_id = id.into();
        call!(self, stats_container, "StatsContainer", req)
    }

    async fn list_processes(&self, id: &str) -> ttrpc::Result<Vec<u32>> {
        let mut req = pb::ListProcessesRequest::new();
        req.container_id = id.into();
        call!(self, list_processes, "ListProcesses", req)
            .map(|r| r.processes.iter().map(|p| p.pid).collect())
    }

    async fn exec_process(
        &self,
        process: ProcessRef<'_>,
        process_json: Vec<u8>,
        stdio: pb::Stdio,
    ) -> ttrpc::Result<u32> {
        let mut req = pb::ExecProcessRequest::new();
        req.container_id = process.container_id.into();
        req.exec_id = process.exec_id.into();
        req.process_json = process_json;
        req.stdio = Some(stdio).into();
        call!(self, exec_process, "ExecProcess", req).map(|r| r.pid)
    }

    async fn signal_process(
        &self,
        process: ProcessRef<'_>,
        signal: u32,
        all: bool,
        timeout: Option<Duration>,
    ) -> ttrpc::Result<()> {
        let mut req = pb::SignalProcessRequest::new();
        req.container_id = process.container_id.into();
        req.exec_id = process.exec_id.into();
        req.signal = signal;
        req.all = all;
        let ctx = timeout.map_or_else(|| self.ctx(), with_timeout);
        self.client
            .signal_process(ctx, &req)
            .await
            .map(drop)
            .map_err(|e| self.error("SignalProcess", e))
    }

    async fn wait_process(&self, process: ProcessRef<'_>) -> ttrpc::Result<i32> {
        let mut req = pb::WaitProcessRequest::new();
        req.container_id = process.container_id.into();
        req.exec_id = process.exec_id.into();
        // No timeout: processes run as long as they like.
        self.client
            .wait_process(ttrpc::context::Context::default(), &req)
            .await
            .map(|r| r.exit_status)
            .map_err(|e| from_agent("WaitProcess", e))
    }

    async fn resize_tty(
        &self,
        process: ProcessRef<'_>,
        rows: u32,
        columns: u32,
    ) -> ttrpc::Result<()> {
        let mut req = pb::TtyWinResizeRequest::new();
        req.container_id = process.container_id.into();
        req.exec_id = process.exec_id.into();
        req.rows = rows;
        req.columns = columns;
        call!(self, tty_win_resize, "TtyWinResize", req).map(drop)
    }

    async fn connect_stdio(
        &self,
        process: ProcessRef<'_>,
        kind: StdioKind,
    ) -> Result<tokio::net::UnixStream, husk_vsock::AttachError> {
        husk_vsock::attach_stdio(
            &self.vsock_uds,
            process.container_id,
            process.exec(),
            kind,
            self.request_timeout,
        )
        .await
    }

    async fn next_oom_event(&self) -> ttrpc::Result<String> {
        self.client
            .get_oom_event(
                ttrpc::context::Context::default(),
                &pb::GetOomEventRequest::new(),
            )
            .await
            .map(|ev| ev.container_id)
            .map_err(|e| from_agent("GetOomEvent", e))
    }
}
