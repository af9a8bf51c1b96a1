//! The containerd-shim bootstrap: `start` (spawn or join the shim that owns
//! the pod's VM), `delete` (clean up after a dead shim) and serving the task
//! API.
//!
//! Grouping: all containers of a CRI pod share one shim and one VM. `start`
//! for a pod's container finds the sandbox id in the spec's annotations and
//! returns the address of the shim that sandbox started.

use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::asynchronous::{spawn, ExitSignal, Shim};
use containerd_shim::{Config, DeleteResponse, Error, Flags, StartOpts};

use crate::container;
use crate::events::{timestamp, Events};
use crate::service::TaskService;
use crate::state::TaskState;

/// CRI's annotation naming the pod sandbox a container belongs to.
pub const SANDBOX_ID_ANNOTATION: &str = "io.kubernetes.cri.sandbox-id";
/// Exit status reported for tasks of a shim that died.
const DEAD_SHIM_EXIT_STATUS: u32 = 128 + 9;

pub struct HuskShim {
    namespace: String,
    id: String,
    debug: bool,
    exit: Arc<ExitSignal>,
}

/// The shim id to group a task under: its pod's sandbox id, else its own.
fn grouping(id: &str, annotations: Option<&std::collections::HashMap<String, String>>) -> String {
    annotations
        .and_then(|a| a.get(SANDBOX_ID_ANNOTATION))
        .filter(|s| !s.is_empty())
        .cloned()
        .unwrap_or_else(|| id.to_string())
}

#[async_trait]
impl Shim for HuskShim {
    type T = TaskService;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        HuskShim {
            namespace: args.namespace.clone(),
            id: args.id.clone(),
            debug: args.debug,
            exit: Arc::new(ExitSignal::default()),
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> containerd_shim::Result<String> {
        // containerd runs `start` in the task's bundle directory.
        let spec = containerd_shim::util::read_spec(".").await?;
        let group = grouping(&opts.id, spec.annotations().as_ref());
        let address = spawn(opts, &group, Vec::new()).await?;
        containerd_shim::util::write_str_to_file("address", &address).await?;
        Ok(address)
    }

    async fn delete_shim(&mut self) -> containerd_shim::Result<DeleteResponse> {
        let bundle = std::env::current_dir().map_err(|e| Error::Other(format!("cwd: {e}")))?;
        // No log subscriber runs in `shim delete`: what went wrong goes to
        // stderr and into the error, which containerd reports.
        let cleaned = match TaskState::load(&bundle) {
            Ok(Some(state)) => state.cleanup().map_err(|e| e.to_string()),
            Ok(None) => Ok(()),
            Err(e) => Err(format!("unreadable state in {}: {e}", bundle.display())),
        };
        if let Err(problem) = cleaned {
            eprintln!("husk: {problem}");
            return Err(Error::Other(problem));
        }
        Ok(DeleteResponse {
            exit_status: DEAD_SHIM_EXIT_STATUS,
            exited_at: Some(timestamp(std::time::SystemTime::now())).into(),
            ..Default::default()
        })
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> TaskService {
        let level = husk_config::Config::discover()
            .map(|c| c.runtime.log_level)
            .unwrap_or_else(|_| "info".into());
        crate::logging::init(self.debug, &level);
        tracing::info!(
            namespace = self.namespace,
            id = self.id,
            "husk shim serving"
        );
        let events = Events::new(Box::new(publisher), &self.namespace);
        let shim = Arc::new(container::Shim::new(
            &self.namespace,
            &self.id,
            events,
            self.exit.clone(),
            Arc::new(crate::sandbox::KvmLauncher),
        ));
        spawn_stop_on_signal(shim.clone());
        TaskService { shim }
    }
}

/// SIGTERM or SIGINT end the shim cleanly: the VM stopped, its state and
/// cgroup removed, then the shim exits. (containerd-shim's own handler only
/// logs them: a shim that ignores TERM outlives its pod with a VM running.)
fn spawn_stop_on_signal(shim: Arc<container::Shim>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (term, int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(term), Ok(int)) => (term, int),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!("cannot watch for SIGTERM/SIGINT: {e}");
            return;
        }
    };
    tokio::spawn(async move {
        let (mut term, mut int) = (term, int);
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::warn!("{name}: stopping the VM and exiting");
        shim.shutdown().await;
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_group_by_sandbox_id() {
        let mut a = std::collections::HashMap::new();
        assert_eq!(grouping("c1", None), "c1");
        assert_eq!(grouping("c1", Some(&a)), "c1");
        a.insert(SANDBOX_ID_ANNOTATION.to_string(), "pod1".to_string());
        assert_eq!(grouping("c1", Some(&a)), "pod1");
    }
}
