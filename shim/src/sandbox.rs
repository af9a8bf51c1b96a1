//! One microVM and its agent: booted on the first task of a shim, shared by
//! every container of the pod, stopped at Shutdown. The VMM runs inside this
//! process (husk-hypervisor's threads); nothing else is spawned.
//!
//! Host layout under `<state_dir>/<hash of namespace and sandbox id>/`:
//! `staging/` (host-only: each container's rootfs and volumes),
//! `shared/` (the virtio-fs share, guest `/run/husk/shared`: a read-only view
//! of staging, see rootfs.rs), `vsock.sock` (hybrid vsock) and
//! `vsock.sock_1025` (the agent's log stream).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use husk_config::Config;
use husk_hypervisor::cpuid::CpuidPolicy;
use husk_hypervisor::vm::{NetConfig, SharedFsConfig};
use husk_hypervisor::{
    ConsoleOutput, HostProfile, HostProfileSetting, Vm, VmConfig, VmError, VsockConfig,
};
use husk_protocol::agent::{CreateSandboxRequest, Storage};

use crate::agent::{Agent, TtrpcAgent};
use crate::guest_vm::{GuestVm, KvmVm};

use crate::beneath::Beneath;
use crate::cgroup::HostCgroup;
use crate::network::{self, PodNetwork};
use crate::spec::{PodInfo, GUEST_SHARED_DIR};

/// virtio-fs tag of the share.
pub const SHARED_FS_TAG: &str = "husk";
/// Guest CID: each VM has its own vsock device, so one value serves all.
const GUEST_CID: u64 = 3;
/// How long Shutdown gives the agent to tear down before the VM stops.
const DESTROY_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors booting or talking to the VM.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(transparent)]
    Config(#[from] husk_config::ConfigError),
    #[error("invalid configuration {path}: {message}")]
    BadConfig { path: PathBuf, message: String },
    #[error("cannot prepare {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the VM: {0}")]
    Vm(#[from] husk_hypervisor::VmError),
    #[error("the guest agent did not come up: {0}")]
    Agent(String),
    #[error("{0}")]
    Rpc(#[source] ttrpc::Error),
    #[error("pod network: {0}")]
    Network(#[from] network::NetworkError),
    #[error("cannot prepare the share: {0}")]
    Share(String),
    #[error("cannot put the VM in its host cgroup: {0}")]
    Cgroup(#[from] crate::cgroup::CgroupError),
}

/// A running VM with its agent.
pub struct Sandbox {
    pub id: String,
    pub dir: PathBuf,
    /// Where the shim builds containers' trees (host-only).
    pub staging: Beneath,
    pub agent: Arc<dyn Agent>,
    pub vm: Arc<dyn GuestVm>,
    /// See [`husk_config::AgentTimeouts::kill_grace`].
    pub kill_grace: Duration,
    /// The host cgroup the VM runs in (the booting task's).
    pub cgroup: Option<HostCgroup>,
    /// The guest was restored from a template (its NICs have the
    /// template's MACs until CreateSandbox renames them).
    pub restored: bool,
    /// Keeps the agent's log stream open while the VM lives.
    _guest_log: Option<husk_vsock::GuestLogReceiver>,
    /// Carries port-forwards from the pod's namespace to the guest.
    _port_forward: Option<crate::port_forward::PortForwarder>,
}

/// How a shim gets its running VM ([`KvmLauncher`]; fakes in tests).
#[async_trait]
pub trait Launcher: Send + Sync {
    /// A running sandbox for the shim's first task (`pod` describes it).
    async fn launch(
        &self,
        config: &Config,
        namespace: &str,
        id: &str,
        pod: &PodInfo,
    ) -> Result<Sandbox, SandboxError>;
}

/// Starts the VM on KVM: restored from its shape's template
/// ([`crate::template`]) unless `[hypervisor] template = "off"`, booted
/// from the configured kernel and initramfs otherwise, or when there is no
/// usable template (the log says why).
pub struct KvmLauncher;

#[async_trait]
impl Launcher for KvmLauncher {
    async fn launch(
        &self,
        config: &Config,
        namespace: &str,
        id: &str,
        pod: &PodInfo,
    ) -> Result<Sandbox, SandboxError> {
        Sandbox::boot(config, namespace, id, pod).await
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SandboxError + '_ {
    move |source| SandboxError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Directory of sandbox `id` in namespace `namespace`: named by a short
/// hash, because Unix socket paths (vsock.sock_<port> inside it) must fit in
/// 108 bytes and CRI ids alone are 64 characters. A `sandbox` file inside
/// names the namespace and id for people.
pub fn sandbox_dir(config: &Config, namespace: &str, id: &str) -> PathBuf {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!("{namespace}/{id}").as_bytes());
    let short: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    config.runtime.state_dir.join(short)
}

/// The hybrid vsock socket of a sandbox directory.
pub fn vsock_socket(dir: &Path) -> PathBuf {
    dir.join("vsock.sock")
}

/// Whether the shim owning a sandbox directory is alive: its VMM accepts
/// on the vsock socket until the VM is torn down.
pub fn is_alive(dir: &Path) -> bool {
    std::os::unix::net::UnixStream::connect(vsock_socket(dir)).is_ok()
}

/// The VM's size: the configured defaults plus the pod's limits (CRI
/// passes them as sandbox annotations), capped at what a VM can have.
fn vm_size(config: &Config, pod: &PodInfo) -> (u8, u64) {
    let extra_mib = pod.memory_limit.map_or(0, |bytes| bytes.div_ceil(1 << 20));
    let vcpus = config
        .hypervisor
        .vcpus
        .saturating_add(pod.cpus.unwrap_or(0))
        .min(husk_hypervisor::vm::MAX_VCPUS);
    (
        vcpus,
        config.hypervisor.memory_mib.saturating_add(extra_mib),
    )
}

fn vm_config(
    config: &Config,
    dir: &Path,
    shared_dir: &Path,
    pod: &PodInfo,
    net: Option<&PodNetwork>,
) -> Result<VmConfig, SandboxError> {
    config.check_guest_assets()?;
    let hv = &config.hypervisor;
    let mut vm = VmConfig::new(&hv.kernel);
    vm.initrd = Some(hv.initrd.clone());
    vm.seccomp = hv.seccomp;
    (vm.vcpus, vm.memory_mib) = vm_size(config, pod);
    vm.net = net
        .map(|n| {
            n.interfaces
                .iter()
                .map(|i| NetConfig {
                    tap_name: i.tap_name.clone(),
                    netns: Some(n.netns.clone()),
                    mac: i.mac,
                    mtu: u16::try_from(i.mtu).ok(),
                })
                .collect()
        })
        .unwrap_or_default();
    vm.cpuid = CpuidPolicy {
        hide: hv.cpuid_hide.clone(),
    };
    vm.host_profile = match hv.host_profile {
        husk_config::HostProfile::Auto => HostProfileSetting::Auto,
        husk_config::HostProfile::Native => HostProfileSetting::Force(HostProfile::Native),
        husk_config::HostProfile::NestedPvm => HostProfileSetting::Force(HostProfile::NestedPvm),
    };
    vm.console = match &hv.console {
        husk_config::Console::Log => ConsoleOutput::Log,
        husk_config::Console::None => ConsoleOutput::Discard,
        husk_config::Console::File(path) => ConsoleOutput::File(path.clone()),
    };
    vm.extra_cmdline = guest_args(config);
    vm.vsock = Some(VsockConfig {
        guest_cid: GUEST_CID,
        uds_path: vsock_socket(dir),
    });
    vm.shared_fs = Some(SharedFsConfig {
        tag: SHARED_FS_TAG.into(),
        dir: shared_dir.to_path_buf(),
        cache: match config.shared_fs.cache {
            husk_config::CachePolicy::Never => husk_hypervisor::CachePolicy::Never,
            husk_config::CachePolicy::Metadata => husk_hypervisor::CachePolicy::Metadata,
            husk_config::CachePolicy::Auto => husk_hypervisor::CachePolicy::Auto,
            husk_config::CachePolicy::Always => husk_hypervisor::CachePolicy::Always,
        },
        xattr: config.shared_fs.xattr,
    });
    Ok(vm)
}

/// Kernel arguments the config adds: the guest's console log level (when
/// not the default `quiet`), the admin's own, and the agent's log level.
fn guest_args(config: &Config) -> String {
    let hv = &config.hypervisor;
    let loglevel = (hv.guest_loglevel != husk_config::DEFAULT_GUEST_LOGLEVEL)
        .then(|| format!("loglevel={}", hv.guest_loglevel));
    [
        loglevel.as_deref().unwrap_or(""),
        hv.kernel_args.as_str(),
        &format!("HUSK_AGENT_LOG={}", config.agent.log_level),
    ]
    .iter()
    .filter(|a| !a.is_empty())
    .copied()
    .collect::<Vec<_>>()
    .join(" ")
}

/// Which setting a failed boot would need raised, if the host is just slow.
fn boot_hint(e: &husk_vsock::BootError, config: &Path) -> String {
    let setting = match e {
        husk_vsock::BootError::Stalled { .. } => "boot_timeout_secs",
        husk_vsock::BootError::TooLong { .. } => "boot_max_secs",
        husk_vsock::BootError::Ended { .. } | husk_vsock::BootError::Connect { .. } => {
            return String::new()
        }
    };
    format!(
        "; if the host is just slow, raise [agent] {setting} in {}",
        config.display()
    )
}

/// Stops a VM that never became a sandbox; returns why it ended.
async fn stop_in_background(vm: Vm) -> String {
    tokio::task::spawn_blocking(move || {
        let mut vm = vm;
        vm.stop()
    })
    .await
    .map(|r| r.to_string())
    .unwrap_or_default()
}

impl Sandbox {
    /// A sandbox of an already running VM and its agent, with its
    /// directory `dir` and staging tree `staging` made.
    pub fn new(
        id: &str,
        dir: PathBuf,
        staging: Beneath,
        agent: Arc<dyn Agent>,
        vm: Arc<dyn GuestVm>,
        kill_grace: Duration,
    ) -> Self {
        Self {
            id: id.to_string(),
            dir,
            staging,
            agent,
            vm,
            kill_grace,
            cgroup: None,
            restored: false,
            _guest_log: None,
            _port_forward: None,
        }
    }

    /// Boots the VM and waits for its agent.
    pub async fn boot(
        config: &Config,
        namespace: &str,
        id: &str,
        pod: &PodInfo,
    ) -> Result<Sandbox, SandboxError> {
        let dir = sandbox_dir(config, namespace, id);
        let staging_dir = dir.join("staging");
        let shared_dir = dir.join("shared");
        let net = match &pod.netns {
            Some(netns) => Some(network::discover(netns).await?),
            None => None,
        };
        // Validate before creating anything on the host.
        let vm_config = vm_config(config, &dir, &shared_dir, pod, net.as_ref())?;
        create_private_dir(&dir)?;
        let prepared = (|| {
            create_private_dir(&staging_dir)?;
            create_private_dir(&shared_dir)?;
            std::fs::write(dir.join("sandbox"), format!("{namespace}/{id}\n"))
                .map_err(io_err(&dir))?;
            crate::rootfs::prepare_share(&staging_dir, &shared_dir)
                .map_err(|e| SandboxError::Share(e.to_string()))?;
            Beneath::open(&staging_dir).map_err(io_err(&staging_dir))
        })();
        let booted = async {
            let staging = prepared?;
            // The template of this shape, built first if there is none,
            // before joining the pod's cgroup: a template is the node's,
            // shared by every pod of its shape, and its boot must not run
            // under one pod's CPU limit.
            let template = match config.hypervisor.template {
                husk_config::TemplatePolicy::Auto => {
                    Some(crate::template::ensure(config, &vm_config).await)
                }
                husk_config::TemplatePolicy::Off => None,
            };
            // Before the VM exists, so all of it (threads, guest RAM) is
            // charged to the pod.
            let cgroup = match &pod.cgroups_path {
                Some(path) => Some(HostCgroup::join(path)?),
                None => None,
            };
            let launch = Launch {
                dir: dir.clone(),
                staging,
                vm_config,
                template,
            };
            match Self::boot_in(config, id, launch, pod, net).await {
                Ok(mut sandbox) => {
                    sandbox.cgroup = cgroup;
                    Ok(sandbox)
                }
                Err(e) => {
                    if let Some(cgroup) = cgroup {
                        cgroup.leave_and_remove();
                    }
                    Err(e)
                }
            }
        }
        .await;
        if booted.is_err() {
            remove_sandbox_dir_logged(&dir);
        }
        booted
    }

    async fn boot_in(
        config: &Config,
        id: &str,
        launch: Launch,
        pod: &PodInfo,
        net: Option<PodNetwork>,
    ) -> Result<Sandbox, SandboxError> {
        let Launch {
            dir,
            staging,
            vm_config,
            template,
        } = launch;
        let vsock_uds = vsock_socket(&dir);
        // A previous shim of this sandbox that crashed may have left these.
        for stale in [
            vsock_uds.clone(),
            husk_vsock::host_port_path(&vsock_uds, husk_protocol::LOG_VSOCK_PORT),
        ] {
            let _ = std::fs::remove_file(stale);
        }
        let activity = vm_config.activity.clone();
        let confine = husk_hypervisor::seccomp::guest_log_confinement(vm_config.seccomp)
            .map_err(VmError::from)?;
        let guest_log = husk_vsock::GuestLogReceiver::bind_confined(
            &vsock_uds,
            move |line| activity.note_line("agent", &line.message),
            confine,
        )
        .map_err(io_err(&vsock_uds))?;

        let (vm, restored) = start_vm(id, vm_config, template).await?;
        let stats = vm.vmm_stats();
        let timeouts = config
            .agent
            .timeouts(vm.host_profile() == HostProfile::NestedPvm);
        tracing::info!(
            sandbox = id,
            profile = vm.host_profile().name(),
            "VM started ({stats:?}); waiting for the agent ({timeouts:?})"
        );
        // The VMM created the taps; mirror them to the pod's interfaces while
        // the guest boots.
        if let Some(net) = &net {
            if let Err(e) = network::connect(net).await {
                stop_in_background(vm).await;
                return Err(e.into());
            }
        }

        let limits = husk_vsock::BootLimits {
            stall: timeouts.boot_stall,
            max: timeouts.boot_max,
        };
        let client = match husk_vsock::wait_for_agent(&vsock_uds, &vm, limits).await {
            Ok((client, boot_time)) => {
                if restored {
                    husk_hypervisor::ledger::record_restored_ready(boot_time);
                } else {
                    husk_hypervisor::ledger::record_ready(boot_time);
                }
                tracing::info!(
                    sandbox = id,
                    "guest agent answered {:.3} s after the VM {}",
                    boot_time.as_secs_f64(),
                    if restored { "was restored" } else { "started" }
                );
                client
            }
            Err(e) => {
                let hint = boot_hint(&e, &config.source);
                let reason = stop_in_background(vm).await;
                return Err(SandboxError::Agent(format!("{e} (VM: {reason}){hint}")));
            }
        };
        // kubectl port-forward dials the pod's namespace: carry it to the
        // guest. Without it the pod still runs; only port-forward fails.
        let port_forward = match &net {
            Some(net) => {
                let dialer = crate::port_forward::GuestDialer {
                    vsock_uds: vsock_uds.clone(),
                    timeout: timeouts.request,
                };
                match crate::port_forward::start(&net.netns, dialer).await {
                    Ok(forwarder) => Some(forwarder),
                    Err(e) => {
                        tracing::warn!(sandbox = id, "port-forward unavailable: {e}");
                        None
                    }
                }
            }
            None => None,
        };
        let vm = Arc::new(KvmVm::new(vm).map_err(io_err(&dir))?);
        if let Some(out) = crate::guest_profile::requested(id) {
            crate::guest_profile::start(Arc::downgrade(&vm), out);
        }
        let vm: Arc<dyn GuestVm> = vm;
        let diagnosed = Arc::downgrade(&vm);
        let agent = TtrpcAgent::new(
            client,
            vsock_uds,
            timeouts.request,
            Arc::new(move || diagnosed.upgrade().and_then(|vm| vm.describe())),
        );
        let mut sandbox = Sandbox::new(id, dir, staging, Arc::new(agent), vm, timeouts.kill_grace);
        sandbox._guest_log = Some(guest_log);
        sandbox._port_forward = port_forward;
        sandbox.restored = restored;
        if let Err(e) = sandbox.create_guest_sandbox(pod, net.as_ref()).await {
            sandbox.stop_vm().await;
            return Err(e);
        }
        tracing::info!(sandbox = id, "agent ready");
        Ok(sandbox)
    }

    /// Mounts the share in the guest, sets the hostname and gives the guest
    /// NIC(s) the pod's addresses and routes.
    async fn create_guest_sandbox(
        &self,
        pod: &PodInfo,
        net: Option<&PodNetwork>,
    ) -> Result<(), SandboxError> {
        let mut share = Storage::new();
        share.source = SHARED_FS_TAG.into();
        share.fstype = "virtiofs".into();
        share.mount_point = GUEST_SHARED_DIR.into();
        let mut req = CreateSandboxRequest::new();
        req.sandbox_id = self.id.clone();
        req.hostname = pod.hostname.clone().unwrap_or_default();
        req.storages.push(share);
        // Every guest gets the host's clock and fresh randomness; for a
        // restored one they replace its template's.
        req.wall_clock_unix_nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()
            .and_then(|t| i64::try_from(t.as_nanos()).ok())
            .unwrap_or(0);
        req.entropy = host_entropy().map_err(io_err(Path::new("/dev/urandom")))?;
        self.agent
            .create_sandbox(req)
            .await
            .map_err(SandboxError::Rpc)?;
        let Some(net) = net else { return Ok(()) };
        for (index, iface) in net.interfaces.iter().enumerate() {
            let mut guest = network::guest_interface(iface);
            if self.restored {
                guest.previous_hw_addr =
                    husk_util::netlink::mac_string(&crate::template::template_mac(index));
            }
            self.agent
                .update_interface(guest)
                .await
                .map_err(SandboxError::Rpc)?;
        }
        if !net.routes.is_empty() {
            self.agent
                .update_routes(net.routes.clone())
                .await
                .map_err(SandboxError::Rpc)?;
        }
        tracing::info!(
            sandbox = self.id,
            "guest network configured: {:?}",
            net.interfaces
        );
        Ok(())
    }

    /// Whether the VM runs (it is not stopped, stopping, or ended).
    pub fn is_running(&self) -> bool {
        self.vm.is_running()
    }

    /// Stops the VMM (after the guest ended on its own): every open agent
    /// call then fails instead of hanging. Idempotent.
    pub async fn stop_vm(&self) {
        self.vm.stop().await;
        tracing::info!(sandbox = self.id, "VM stopped");
    }

    /// Tells the agent to tear down, stops the VM, unmounts the share and
    /// removes the sandbox directory. Idempotent.
    pub async fn shutdown(&self) {
        if self.is_running() {
            if let Err(e) = self.agent.destroy_sandbox(DESTROY_TIMEOUT).await {
                tracing::warn!(sandbox = self.id, "{e}");
            }
        }
        self.stop_vm().await;
        remove_sandbox_dir_logged(&self.dir);
        if let Some(cgroup) = &self.cgroup {
            cgroup.leave_and_remove();
        }
    }
}

/// 64 bytes from the host's RNG, for the guest to reseed from.
fn host_entropy() -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = vec![0u8; 64];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes)
}

/// A shape's template, or why there is none (`None` in its place: templates
/// are off).
type TemplateLookup = Result<crate::template::Template, crate::template::TemplateError>;

/// What a sandbox's VM is started from.
struct Launch {
    dir: PathBuf,
    staging: Beneath,
    vm_config: VmConfig,
    template: Option<TemplateLookup>,
}

/// The VM for a sandbox: restored from its shape's template when there is
/// one, booted otherwise (or when the restore is refused). Says which;
/// `true` if restored.
async fn start_vm(
    id: &str,
    vm_config: VmConfig,
    template: Option<TemplateLookup>,
) -> Result<(Vm, bool), SandboxError> {
    match template {
        Some(Ok(template)) => {
            let (restore_config, from) = (vm_config.clone(), template.clone());
            let restored = tokio::task::spawn_blocking(move || {
                Vm::restore(&restore_config, &from.dir, &from.identity)
            })
            .await
            .map_err(|e| SandboxError::Agent(format!("VM restore task failed: {e}")))?;
            match restored {
                Ok(vm) => return Ok((vm, true)),
                Err(e @ VmError::Restore { .. }) => {
                    tracing::warn!(sandbox = id, "{e}; discarding it and booting instead");
                    template.discard();
                }
                Err(e) => return Err(e.into()),
            }
        }
        Some(Err(e)) => {
            tracing::warn!(
                sandbox = id,
                "no template for this VM shape ({e}); booting it"
            );
        }
        None => {}
    }
    let vm = tokio::task::spawn_blocking(move || Vm::start(&vm_config))
        .await
        .map_err(|e| SandboxError::Agent(format!("VM start task failed: {e}")))??;
    Ok((vm, false))
}

/// Creates `dir` (and its parents) readable by root only: the share holds
/// container root filesystems and the guest must not be reachable from
/// other users through the sockets.
pub(crate) fn create_private_dir(dir: &Path) -> Result<(), SandboxError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err(dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io_err(dir))
}

/// Unmounts whatever is left under a sandbox directory and removes it;
/// what could not be undone, each said in a line.
pub fn remove_sandbox_dir(dir: &Path) -> Vec<String> {
    let mut problems: Vec<String> = crate::rootfs::unmount_all(dir)
        .into_iter()
        .map(|(path, e)| format!("cannot unmount {}: {e}", path.display()))
        .collect();
    if let Err(e) = crate::rootfs::remove_unmounted_tree(dir) {
        problems.push(format!("cannot remove {}: {e}", dir.display()));
    }
    problems
}

/// [`remove_sandbox_dir`], its problems logged.
fn remove_sandbox_dir_logged(dir: &Path) {
    for problem in remove_sandbox_dir(dir) {
        tracing::warn!("{problem}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_sockets_fit_whatever_the_id() {
        let config = Config::default();
        let long_id = "f".repeat(64);
        let dir = sandbox_dir(&config, &"n".repeat(76), &long_id);
        let log_socket = husk_vsock::host_port_path(&vsock_socket(&dir), 1025);
        assert!(
            log_socket.as_os_str().len() < 60,
            "{}",
            log_socket.display()
        );
        assert_ne!(dir, sandbox_dir(&config, "k8s.io", "other"));
        assert_eq!(
            dir,
            sandbox_dir(&config, &"n".repeat(76), &long_id),
            "stable"
        );
    }

    #[test]
    fn a_sandbox_without_a_listening_vmm_is_dead() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!is_alive(dir.path()));
        let listener = std::os::unix::net::UnixListener::bind(vsock_socket(dir.path())).unwrap();
        assert!(is_alive(dir.path()));
        drop(listener);
        // The socket file stays behind a crashed VMM; nobody accepts on it.
        assert!(!is_alive(dir.path()));
    }

    #[test]
    fn guest_args_carry_the_loglevel_only_when_not_quiet() {
        let mut config = Config::default();
        assert_eq!(guest_args(&config), "HUSK_AGENT_LOG=info");
        config.hypervisor.guest_loglevel = 7;
        config.hypervisor.kernel_args = "foo=1".into();
        config.agent.log_level = "debug".into();
        assert_eq!(guest_args(&config), "loglevel=7 foo=1 HUSK_AGENT_LOG=debug");
    }

    #[test]
    fn vm_is_sized_from_defaults_plus_pod_limits() {
        let config = Config::default();
        assert_eq!(vm_size(&config, &PodInfo::default()), (1, 256));
        let pod = PodInfo {
            memory_limit: Some((200 << 20) + 1),
            cpus: Some(2),
            ..PodInfo::default()
        };
        assert_eq!(vm_size(&config, &pod), (3, 256 + 201));
        let huge = PodInfo {
            cpus: Some(200),
            ..PodInfo::default()
        };
        assert_eq!(vm_size(&config, &huge).0, husk_hypervisor::vm::MAX_VCPUS);
    }
}
