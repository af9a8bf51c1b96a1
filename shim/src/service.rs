//! The containerd task API (v2) on top of [`crate::container::Shim`]: one
//! method per request, translating messages and nothing else.

use std::sync::Arc;

use crate::agent::ProcessRef;
use crate::container::Shim;
use crate::errors::*;
use crate::events::timestamp;
use crate::io::Stdio;
use crate::metrics;
use crate::process::Exit;
use async_trait::async_trait;
use containerd_shim::api::*;
use containerd_shim::protos::api::ProcessInfo;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::protos::shim_async::Task;
use containerd_shim::TtrpcContext;

pub struct TaskService {
    pub shim: Arc<Shim>,
}

fn exited_at(
    exit: Option<Exit>,
) -> MessageField<containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp> {
    exit.map(|e| timestamp(e.at)).into()
}

#[async_trait]
impl Task for TaskService {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> ttrpc::Result<CreateTaskResponse> {
        tracing::info!(id = req.id, bundle = req.bundle, "create");
        let pid = self
            .shim
            .create(&req)
            .await
            .inspect_err(|e| tracing::error!(id = req.id, "create failed: {e}"))?;
        Ok(CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> ttrpc::Result<StartResponse> {
        tracing::info!(id = req.id, exec = req.exec_id, "start");
        let pid = self.shim.start(&req.id, &req.exec_id).await?;
        Ok(StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> ttrpc::Result<StateResponse> {
        let container = self.shim.container(&req.id)?;
        let process = container.process(&req.exec_id)?;
        let exit = process.exit();
        Ok(StateResponse {
            id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            bundle: container.bundle.display().to_string(),
            pid: process.pid(),
            status: process.status(container.is_paused()).into(),
            stdin: process.stdio.stdin.clone(),
            stdout: process.stdio.stdout.clone(),
            stderr: process.stdio.stderr.clone(),
            terminal: process.stdio.terminal,
            exit_status: exit.map_or(0, |e| e.status),
            exited_at: exited_at(exit),
            ..Default::default()
        })
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> ttrpc::Result<WaitResponse> {
        let process = self.shim.container(&req.id)?.process(&req.exec_id)?;
        let exit = process.wait().await;
        Ok(WaitResponse {
            exit_status: exit.status,
            exited_at: exited_at(Some(exit)),
            ..Default::default()
        })
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> ttrpc::Result<Empty> {
        tracing::info!(
            id = req.id,
            exec = req.exec_id,
            signal = req.signal,
            all = req.all,
            "kill"
        );
        self.shim
            .kill(&req.id, &req.exec_id, req.signal, req.all)
            .await?;
        Ok(Empty::new())
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: DeleteRequest,
    ) -> ttrpc::Result<DeleteResponse> {
        tracing::info!(id = req.id, exec = req.exec_id, "delete");
        let (pid, exit) = self.shim.delete(&req.id, &req.exec_id).await?;
        Ok(DeleteResponse {
            pid,
            exit_status: exit.map_or(0, |e| e.status),
            exited_at: exited_at(exit),
            ..Default::default()
        })
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> ttrpc::Result<Empty> {
        tracing::info!(id = req.id, exec = req.exec_id, "exec");
        let stdio = Stdio {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let spec = req
            .spec
            .as_ref()
            .map(|a| a.value.as_slice())
            .unwrap_or_default();
        self.shim.exec(&req.id, &req.exec_id, stdio, spec).await?;
        Ok(Empty::new())
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> ttrpc::Result<PidsResponse> {
        self.shim.container(&req.id)?;
        let sandbox = self.shim.sandbox()?;
        let pids = sandbox.agent.list_processes(&req.id).await?;
        let processes = pids
            .into_iter()
            .map(|pid| ProcessInfo {
                pid,
                ..Default::default()
            })
            .collect();
        Ok(PidsResponse {
            processes,
            ..Default::default()
        })
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: PauseRequest) -> ttrpc::Result<Empty> {
        self.shim.set_paused(&req.id, true).await?;
        Ok(Empty::new())
    }

    async fn resume(&self, _ctx: &TtrpcContext, req: ResumeRequest) -> ttrpc::Result<Empty> {
        self.shim.set_paused(&req.id, false).await?;
        Ok(Empty::new())
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: CheckpointTaskRequest,
    ) -> ttrpc::Result<Empty> {
        Err(status(
            ttrpc::Code::UNIMPLEMENTED,
            "checkpoint is not supported by husk",
        ))
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> ttrpc::Result<Empty> {
        self.shim.container(&req.id)?.process(&req.exec_id)?;
        let sandbox = self.shim.sandbox()?;
        let process = ProcessRef {
            container_id: &req.id,
            exec_id: &req.exec_id,
        };
        sandbox
            .agent
            .resize_tty(process, req.height, req.width)
            .await?;
        Ok(Empty::new())
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: CloseIORequest) -> ttrpc::Result<Empty> {
        let process = self.shim.container(&req.id)?.process(&req.exec_id)?;
        if req.stdin {
            process.close_stdin().await;
        }
        Ok(Empty::new())
    }

    async fn update(&self, _ctx: &TtrpcContext, req: UpdateTaskRequest) -> ttrpc::Result<Empty> {
        self.shim.container(&req.id)?;
        let sandbox = self.shim.sandbox()?;
        let resources: &Any = req
            .resources
            .as_ref()
            .ok_or_else(|| invalid("update without resources"))?;
        sandbox
            .agent
            .update_container(&req.id, resources.value.clone())
            .await?;
        Ok(Empty::new())
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> ttrpc::Result<StatsResponse> {
        self.shim.container(&req.id)?;
        let sandbox = self.shim.sandbox()?;
        let stats = sandbox.agent.stats_container(&req.id).await?;
        let any =
            metrics::to_any(&metrics::to_metrics(&stats)).map_err(|e| internal(e.to_string()))?;
        Ok(StatsResponse {
            stats: Some(any).into(),
            ..Default::default()
        })
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: ConnectRequest,
    ) -> ttrpc::Result<ConnectResponse> {
        let task_pid = self
            .shim
            .container(&req.id)
            .map(|c| c.init.pid())
            .unwrap_or(0);
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> ttrpc::Result<Empty> {
        // containerd calls Shutdown after each task's Delete; the VM serves
        // the whole pod, so it stops only when no container is left.
        if self.shim.container_count() == 0 {
            tracing::info!("shutdown: no tasks left, stopping the VM");
            // On a task of its own: the ttrpc server drops this handler at
            // the request's deadline (containerd gives Shutdown seconds),
            // and a teardown cut off there would leave the VM running and
            // the shim alive. It ends with the shim's exit.
            let shim = self.shim.clone();
            let _ = tokio::spawn(async move { shim.shutdown().await }).await;
        }
        Ok(Empty::new())
    }
}
