//! The agent protocol: RPC handlers and the ttrpc server around them.
//!
//! Handlers only translate: the work lives in [`crate::container`],
//! [`crate::sandbox`] and [`crate::network`]. Every error is a ttrpc status
//! ([`crate::error::Error`]); nothing a request carries can panic the agent.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use husk_protocol::agent::*;
use husk_protocol::empty::Empty;
use husk_protocol::{create_agent_service, AgentService};
use tokio::sync::mpsc;
use ttrpc::asynchronous::{Server, TtrpcContext};

use crate::container::{Containers, Layout};
use crate::error::Error;
use crate::reaper::Reaper;
use crate::sandbox::{self, Sandbox};
use crate::{io_server, network, Mode};

/// How long in-flight requests get once shutdown has begun.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

pub struct Agent {
    mode: Mode,
    shutdown: mpsc::Sender<()>,
    containers: Arc<Containers>,
    sandbox: Sandbox,
}

type R<T> = ttrpc::Result<T>;

/// `""` → the init process.
fn exec_id(id: &str) -> Option<&str> {
    (!id.is_empty()).then_some(id)
}

fn pid(p: nix::unistd::Pid) -> u32 {
    u32::try_from(p.as_raw()).unwrap_or(0)
}

#[async_trait]
impl AgentService for Agent {
    async fn check(&self, _ctx: &TtrpcContext, _req: CheckRequest) -> R<CheckResponse> {
        let uts = nix::sys::utsname::uname().map_err(|e| Error::Internal(format!("uname: {e}")))?;
        let mut resp = CheckResponse::new();
        resp.kernel_release = uts.release().to_string_lossy().into_owned();
        resp.agent_version = env!("CARGO_PKG_VERSION").to_owned();
        let clocks = crate::clocks::GuestClocks::read();
        resp.clocksource = clocks.clocksource;
        resp.available_clocksources = clocks.available_clocksources;
        resp.clockevent = clocks.clockevent;
        resp.uptime_secs = clocks.uptime_secs;
        Ok(resp)
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> R<Empty> {
        tracing::info!("shutdown requested");
        if self.mode == Mode::Init {
            // Before replying, so an answered Shutdown means the data is on
            // disk. Blocks the runtime; nothing else matters by now.
            nix::unistd::sync();
        }
        // Capacity 1: a second Shutdown while the first is pending is moot.
        let _ = self.shutdown.try_send(());
        Ok(Empty::new())
    }

    async fn create_sandbox(&self, _ctx: &TtrpcContext, req: CreateSandboxRequest) -> R<Empty> {
        self.sandbox.create(&req).await?;
        Ok(Empty::new())
    }

    async fn destroy_sandbox(&self, _ctx: &TtrpcContext, _req: DestroySandboxRequest) -> R<Empty> {
        let mut first_error = None;
        for id in self.containers.ids() {
            if let Err(e) = self.containers.remove(&id).await {
                tracing::warn!(container = id, "destroying the sandbox: {e}");
                first_error.get_or_insert(e);
            }
        }
        self.sandbox.destroy();
        match first_error {
            Some(e) => Err(e.into()),
            None => Ok(Empty::new()),
        }
    }

    async fn get_guest_details(
        &self,
        _ctx: &TtrpcContext,
        _req: GetGuestDetailsRequest,
    ) -> R<GuestDetails> {
        Ok(sandbox::guest_details()?)
    }

    async fn create_container(
        &self,
        _ctx: &TtrpcContext,
        req: CreateContainerRequest,
    ) -> R<CreateContainerResponse> {
        let pid = self.containers.create(req).await?;
        let mut resp = CreateContainerResponse::new();
        resp.pid = self::pid(pid);
        Ok(resp)
    }

    async fn start_container(&self, _ctx: &TtrpcContext, req: StartContainerRequest) -> R<Empty> {
        self.containers.start(&req.container_id).await?;
        Ok(Empty::new())
    }

    async fn exec_process(
        &self,
        _ctx: &TtrpcContext,
        req: ExecProcessRequest,
    ) -> R<ExecProcessResponse> {
        let pid = self.containers.exec(req).await?;
        let mut resp = ExecProcessResponse::new();
        resp.pid = self::pid(pid);
        Ok(resp)
    }

    async fn signal_process(&self, _ctx: &TtrpcContext, req: SignalProcessRequest) -> R<Empty> {
        self.containers.signal(
            &req.container_id,
            exec_id(&req.exec_id),
            req.signal,
            req.all,
        )?;
        Ok(Empty::new())
    }

    async fn wait_process(
        &self,
        _ctx: &TtrpcContext,
        req: WaitProcessRequest,
    ) -> R<WaitProcessResponse> {
        let process = self
            .containers
            .process(&req.container_id, exec_id(&req.exec_id))?;
        let exit = process.wait().await;
        let mut resp = WaitProcessResponse::new();
        resp.exit_status = exit.status;
        resp.exited_at_unix_nanos = exit.unix_nanos();
        Ok(resp)
    }

    async fn close_stdin(&self, _ctx: &TtrpcContext, req: CloseStdinRequest) -> R<Empty> {
        let process = self
            .containers
            .process(&req.container_id, exec_id(&req.exec_id))?;
        process.io.close_stdin();
        Ok(Empty::new())
    }

    async fn tty_win_resize(&self, _ctx: &TtrpcContext, req: TtyWinResizeRequest) -> R<Empty> {
        let process = self
            .containers
            .process(&req.container_id, exec_id(&req.exec_id))?;
        let dim = |v: u32, what: &str| {
            u16::try_from(v).map_err(|_| Error::InvalidArgument(format!("{what} {v} is too large")))
        };
        process
            .io
            .resize(dim(req.rows, "rows")?, dim(req.columns, "columns")?)
            .map_err(|e| {
                Error::FailedPrecondition(format!(
                    "resize the terminal of {}/{}: {e}",
                    req.container_id, req.exec_id
                ))
            })?;
        Ok(Empty::new())
    }

    async fn pause_container(&self, _ctx: &TtrpcContext, req: PauseContainerRequest) -> R<Empty> {
        self.containers.pause(&req.container_id).await?;
        Ok(Empty::new())
    }

    async fn resume_container(&self, _ctx: &TtrpcContext, req: ResumeContainerRequest) -> R<Empty> {
        self.containers.resume(&req.container_id).await?;
        Ok(Empty::new())
    }

    async fn update_container(&self, _ctx: &TtrpcContext, req: UpdateContainerRequest) -> R<Empty> {
        self.containers
            .update(&req.container_id, &req.resources_json)?;
        Ok(Empty::new())
    }

    async fn stats_container(
        &self,
        _ctx: &TtrpcContext,
        req: StatsContainerRequest,
    ) -> R<ContainerStats> {
        Ok(self.containers.stats(&req.container_id)?)
    }

    async fn list_processes(
        &self,
        _ctx: &TtrpcContext,
        req: ListProcessesRequest,
    ) -> R<ListProcessesResponse> {
        let mut resp = ListProcessesResponse::new();
        resp.processes = self.containers.list_processes(&req.container_id)?;
        Ok(resp)
    }

    async fn get_oom_event(&self, _ctx: &TtrpcContext, _req: GetOomEventRequest) -> R<OomEvent> {
        let mut resp = OomEvent::new();
        resp.container_id = self.containers.oom.next().await;
        Ok(resp)
    }

    async fn remove_container(&self, _ctx: &TtrpcContext, req: RemoveContainerRequest) -> R<Empty> {
        self.containers.remove(&req.container_id).await?;
        Ok(Empty::new())
    }

    async fn update_interface(
        &self,
        _ctx: &TtrpcContext,
        req: UpdateInterfaceRequest,
    ) -> R<Interface> {
        let Some(want) = req.interface.as_ref() else {
            return Err(
                Error::InvalidArgument("UpdateInterface without an interface".into()).into(),
            );
        };
        Ok(network::update_interface(want).await?)
    }

    async fn update_routes(&self, _ctx: &TtrpcContext, req: UpdateRoutesRequest) -> R<Routes> {
        let mut resp = Routes::new();
        resp.routes = network::update_routes(&req.routes).await?;
        Ok(resp)
    }

    async fn list_interfaces(
        &self,
        _ctx: &TtrpcContext,
        _req: ListInterfacesRequest,
    ) -> R<Interfaces> {
        let mut resp = Interfaces::new();
        resp.interfaces = network::list_interfaces().await?;
        Ok(resp)
    }

    async fn list_routes(&self, _ctx: &TtrpcContext, _req: ListRoutesRequest) -> R<Routes> {
        let mut resp = Routes::new();
        resp.routes = network::list_routes().await?;
        Ok(resp)
    }
}

/// Where and how to serve.
pub struct Config {
    pub mode: Mode,
    /// ttrpc: `vsock://-1:1024`, `unix:///path`.
    pub address: String,
    /// stdio streams: `vsock://-1:1026`, `unix:///path`.
    pub io_address: String,
    pub layout: Layout,
}

/// Serves the protocol until a Shutdown RPC arrives or `stop` completes,
/// then stops the server.
pub async fn serve(
    config: Config,
    reaper: Reaper,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let Config {
        mode,
        address,
        io_address,
        layout,
    } = config;
    let (shutdown_tx, mut shutdown_rx) = mpsc::channel(1);
    let containers = Arc::new(Containers::new(layout.clone(), reaper));
    let io = io_server::serve(&io_address, containers.clone())?;
    let agent = Agent {
        mode,
        shutdown: shutdown_tx,
        containers,
        sandbox: Sandbox::new(layout.run.join("sandbox")),
    };
    let server = if address.starts_with("vsock://") {
        let addr = crate::vsock_peer::parse_address(&address)?;
        let listener = tokio_vsock::VsockListener::bind(addr)
            .map_err(|e| anyhow::anyhow!("bind {address}: {e}"))?;
        Server::new().add_listener(crate::vsock_peer::host_only_ttrpc(listener))
    } else {
        Server::new()
            .bind(&address)
            .map_err(|e| anyhow::anyhow!("bind {address}: {e}"))?
    };
    let mut server = server.register_service(create_agent_service(Arc::new(agent)));
    server
        .start()
        .await
        .map_err(|e| anyhow::anyhow!("start ttrpc server on {address}: {e}"))?;
    tracing::info!(
        address,
        version = env!("CARGO_PKG_VERSION"),
        "agent serving"
    );
    if mode == Mode::Init {
        // stderr is /dev/console for PID 1: one line, so that a host without
        // vsock (or a benchmark) can see readiness on the serial console.
        eprintln!("{}", husk_protocol::AGENT_READY_CONSOLE_LINE);
    }

    tokio::select! {
        _ = shutdown_rx.recv() => {}
        () = stop => tracing::info!("stop requested"),
        () = io => {}
    }
    // The Shutdown reply was queued to the connection's writer task before
    // we got here; stopping the server yields to it first.
    if tokio::time::timeout(SHUTDOWN_GRACE, server.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("in-flight requests still running after {SHUTDOWN_GRACE:?}; leaving them");
    }
    // ttrpc does not unlink the socket it bound.
    if let Some(path) = address.strip_prefix("unix://") {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}
