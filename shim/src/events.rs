//! Task events to containerd (`/tasks/create`, `/tasks/exit`, ...).

use std::time::SystemTime;

use async_trait::async_trait;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::protos::events::task::*;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::protos::topics::*;

use crate::process::Exit;

pub fn timestamp(t: SystemTime) -> Timestamp {
    Timestamp::from(t)
}

/// Where events go: containerd ([`RemotePublisher`]), or a test's record.
#[async_trait]
pub trait Publisher: Send + Sync {
    async fn publish(
        &self,
        topic: &str,
        namespace: &str,
        event: Box<dyn MessageDyn>,
    ) -> Result<(), String>;
}

#[async_trait]
impl Publisher for RemotePublisher {
    async fn publish(
        &self,
        topic: &str,
        namespace: &str,
        event: Box<dyn MessageDyn>,
    ) -> Result<(), String> {
        let ctx = ttrpc::context::Context::default();
        RemotePublisher::publish(self, ctx, topic, namespace, event)
            .await
            .map_err(|e| e.to_string())
    }
}

/// Publishes events for one namespace; a failed publish is logged, never
/// fatal (containerd also learns of exits through Wait).
pub struct Events {
    publisher: Box<dyn Publisher>,
    namespace: String,
}

impl Events {
    pub fn new(publisher: Box<dyn Publisher>, namespace: &str) -> Self {
        Self {
            publisher,
            namespace: namespace.to_string(),
        }
    }

    async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        if let Err(e) = self.publisher.publish(topic, &self.namespace, event).await {
            tracing::warn!("cannot publish {topic}: {e}");
        }
    }

    pub async fn create(
        &self,
        container_id: &str,
        bundle: &str,
        stdio: &crate::io::Stdio,
        pid: u32,
    ) {
        let mut io = TaskIO::new();
        io.stdin = stdio.stdin.clone();
        io.stdout = stdio.stdout.clone();
        io.stderr = stdio.stderr.clone();
        io.terminal = stdio.terminal;
        let mut e = TaskCreate::new();
        e.container_id = container_id.into();
        e.bundle = bundle.into();
        e.io = Some(io).into();
        e.pid = pid;
        self.publish(TASK_CREATE_EVENT_TOPIC, Box::new(e)).await;
    }

    pub async fn start(&self, container_id: &str, pid: u32) {
        let mut e = TaskStart::new();
        e.container_id = container_id.into();
        e.pid = pid;
        self.publish(TASK_START_EVENT_TOPIC, Box::new(e)).await;
    }

    pub async fn exit(&self, container_id: &str, id: &str, pid: u32, exit: Exit) {
        let mut e = TaskExit::new();
        e.container_id = container_id.into();
        e.id = id.into();
        e.pid = pid;
        e.exit_status = exit.status;
        e.exited_at = Some(timestamp(exit.at)).into();
        self.publish(TASK_EXIT_EVENT_TOPIC, Box::new(e)).await;
    }

    pub async fn delete(&self, container_id: &str, id: &str, pid: u32, exit: Option<Exit>) {
        let mut e = TaskDelete::new();
        e.container_id = container_id.into();
        e.id = id.into();
        e.pid = pid;
        if let Some(exit) = exit {
            e.exit_status = exit.status;
            e.exited_at = Some(timestamp(exit.at)).into();
        }
        self.publish(TASK_DELETE_EVENT_TOPIC, Box::new(e)).await;
    }

    pub async fn oom(&self, container_id: &str) {
        let mut e = TaskOOM::new();
        e.container_id = container_id.into();
        self.publish(TASK_OOM_EVENT_TOPIC, Box::new(e)).await;
    }

    pub async fn exec_added(&self, container_id: &str, exec_id: &str) {
        let mut e = TaskExecAdded::new();
        e.container_id = container_id.into();
        e.exec_id = exec_id.into();
        self.publish(TASK_EXEC_ADDED_EVENT_TOPIC, Box::new(e)).await;
    }

    pub async fn exec_started(&self, container_id: &str, exec_id: &str, pid: u32) {
        let mut e = TaskExecStarted::new();
        e.container_id = container_id.into();
        e.exec_id = exec_id.into();
        e.pid = pid;
        self.publish(TASK_EXEC_STARTED_EVENT_TOPIC, Box::new(e))
            .await;
    }

    pub async fn paused(&self, container_id: &str) {
        let mut e = TaskPaused::new();
        e.container_id = container_id.into();
        self.publish(TASK_PAUSED_EVENT_TOPIC, Box::new(e)).await;
    }

    pub async fn resumed(&self, container_id: &str) {
        let mut e = TaskResumed::new();
        e.container_id = container_id.into();
        self.publish(TASK_RESUMED_EVENT_TOPIC, Box::new(e)).await;
    }
}
