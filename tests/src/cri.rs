//! Kubernetes' view of husk for tests: a private containerd (see
//! [`crate::containerd`]) with its CRI plugin on, runtime handlers `runc` and
//! `husk`, a locally built pause image and Debian's CNI plugins (bridge +
//! host-local), all of it inside a network namespace the test creates and
//! deletes, so pod networks never touch the host's. [`Cri`] is a blocking CRI
//! client over containerd's socket (gRPC, `k8s-cri`), with exec through
//! containerd's streaming server (WebSocket, `v4.channel.k8s.io`), and the
//! checks that a removed pod left nothing behind.

use std::collections::HashMap;
use std::future::Future;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    AttachRequest, ContainerConfig, ContainerMetadata, ContainerState, ContainerStats,
    ContainerStatsRequest, ContainerStatus, ContainerStatusRequest, CreateContainerRequest,
    ExecRequest, ExecSyncRequest, ExecSyncResponse, ImageSpec, LinuxContainerConfig,
    LinuxContainerResources, LinuxContainerSecurityContext, LinuxPodSandboxConfig,
    LinuxSandboxSecurityContext, ListContainersRequest, ListPodSandboxRequest, Mount,
    NamespaceMode, NamespaceOption, PodSandboxConfig, PodSandboxMetadata, PodSandboxStatusRequest,
    PodSandboxStatusResponse, PortForwardRequest, RemoveContainerRequest, RemovePodSandboxRequest,
    ReopenContainerLogRequest, RunPodSandboxRequest, StartContainerRequest, StatusRequest,
    StopContainerRequest, StopPodSandboxRequest, UpdateContainerResourcesRequest,
};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::containerd::{Containerd, ContainerdOptions, TEST_IMAGE};
use crate::image::build_busybox_image_with_cmd;

/// The runtime handler (RuntimeClass `handler:`) that runs pods in husk VMs.
pub const HUSK_HANDLER: &str = "husk";
/// The runc handler, for checking the harness itself.
pub const RUNC_HANDLER: &str = "runc";
/// The sandbox (pause) image: busybox sleeping forever. CRI looks images up
/// by normalised names, so it is imported fully qualified.
pub const PAUSE_IMAGE: &str = "docker.io/library/husk-pause:test";
/// The containerd namespace of CRI's images and containers.
pub const CRI_NAMESPACE: &str = "k8s.io";
/// The pods' subnet. It exists only inside the test's network namespace.
pub const POD_SUBNET_PREFIX: &str = "10.88.0.";
const POD_SUBNET: &str = "10.88.0.0/24";
/// The CNI bridge in the test's network namespace.
pub const BRIDGE: &str = "huskbr0";
/// The streaming server's port on 127.0.0.1 of the test's own network
/// namespace, where nothing else listens, so any fixed port is free.
const STREAM_PORT: u16 = 10010;
/// How long RunPodSandbox may take: a whole guest boot, within husk's own
/// bounds for this host (see [`crate::boot_timeout`]).
fn pod_timeout() -> Duration {
    crate::boot_timeout()
}

/// How long any other CRI call may take: one guest operation.
fn call_timeout() -> Duration {
    crate::op_timeout()
}

/// A network namespace created with `ip netns add`, deleted on drop.
pub struct NetNs {
    pub name: String,
    pub path: PathBuf,
}

fn run_ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {args:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ip {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl NetNs {
    /// Creates namespace `name` with its loopback up (the streaming server
    /// listens there).
    pub fn create(name: &str) -> NetNs {
        // One left by a killed run of a process with the same pid (names
        // carry the pid, so no live test uses it).
        let _ = run_ip(&["netns", "delete", name]);
        run_ip(&["netns", "add", name]).unwrap_or_else(|e| panic!("{e}"));
        let ns = NetNs {
            name: name.to_string(),
            path: Path::new("/var/run/netns").join(name),
        };
        run_ip(&["-n", name, "link", "set", "lo", "up"]).unwrap_or_else(|e| panic!("{e}"));
        ns
    }

    /// Names of the network interfaces in the namespace.
    pub fn links(&self) -> Vec<String> {
        let out = run_ip(&["-n", &self.name, "-o", "link", "show"]).unwrap_or_default();
        out.lines()
            .filter_map(|l| l.split(": ").nth(1))
            // veths show as "name@peer".
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .collect()
    }

    /// Opens a TCP connection to `addr` from inside the namespace: a socket
    /// stays in the namespace it was created in, so a thread that entered it
    /// creates and connects the socket and hands it back.
    pub fn connect_tcp(&self, addr: &str) -> std::io::Result<std::net::TcpStream> {
        let ns = std::fs::File::open(&self.path)?;
        let addr = addr.to_string();
        std::thread::spawn(move || {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
            std::net::TcpStream::connect(addr)
        })
        .join()
        .map_err(|_| std::io::Error::other("connecting thread panicked"))?
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = run_ip(&["netns", "delete", &self.name]) {
            eprintln!("{e}");
        }
    }
}

/// A pod sandbox as the tests track it.
#[derive(Clone, Debug)]
pub struct Pod {
    pub id: String,
    pub handler: String,
    pub config: PodSandboxConfig,
    /// How long RunPodSandbox took (for husk: the VM's boot).
    pub start_time: Duration,
    /// The pod's network namespace file (CRI's netns mount).
    pub netns: Option<PathBuf>,
    /// The inode of that namespace, to find processes still inside it.
    pub netns_inode: Option<u64>,
}

/// What an exec through the streaming server produced.
#[derive(Clone, Debug, Default)]
pub struct ExecOutput {
    pub stdout: String,
    pub stderr: String,
    /// The error channel (stream 3): a JSON `Status` with the v4 protocol.
    pub error: String,
    /// The exit code, from the error channel's status.
    pub exit_code: Option<i32>,
    /// The subprotocol the server chose.
    pub protocol: String,
    /// What the server sent on channel 0 (port-forward's data channel).
    pub stdin_channel: String,
}

/// The paths kubelet masks in every unprivileged container.
const KUBELET_MASKED_PATHS: &[&str] = &[
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
];
/// The paths kubelet makes read-only in every unprivileged container.
const KUBELET_READONLY_PATHS: &[&str] = &[
    "/proc/asound",
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// The namespaces kubelet asks for by default: the pod's network and IPC,
/// a PID namespace per container.
fn namespace_options() -> NamespaceOption {
    NamespaceOption {
        network: NamespaceMode::Pod as i32,
        pid: NamespaceMode::Container as i32,
        ipc: NamespaceMode::Pod as i32,
        ..Default::default()
    }
}

/// A CRI volume: `host` bound at `container`.
pub fn mount(host: &Path, container: &str, readonly: bool) -> Mount {
    Mount {
        container_path: container.to_string(),
        host_path: host.display().to_string(),
        readonly,
        ..Default::default()
    }
}

/// Memory and CPU limits as kubelet puts them in CRI requests.
pub fn resources(memory_bytes: i64, cpu_quota: i64, cpu_period: i64) -> LinuxContainerResources {
    LinuxContainerResources {
        memory_limit_in_bytes: memory_bytes,
        cpu_quota,
        cpu_period,
        ..Default::default()
    }
}

/// Reads the exit code out of a v4 error-channel status
/// (`{"status":"Success"}`, or `NonZeroExitCode` with an `ExitCode` cause).
pub fn exit_code_of_status(status: &str) -> Option<i32> {
    let v: serde_json::Value = serde_json::from_str(status).ok()?;
    if v["status"] == "Success" {
        return Some(0);
    }
    if v["reason"] != "NonZeroExitCode" {
        return None;
    }
    v["details"]["causes"]
        .as_array()?
        .iter()
        .find(|c| c["reason"] == "ExitCode")?["message"]
        .as_str()?
        .parse()
        .ok()
}

fn conflist(name: &str, ipam_dir: &Path) -> String {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": name,
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": true,
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_SUBNET}]],
                    // The subnet's own route too, a common config: the pod
                    // netns then has it via the gateway beside the kernel's
                    // connected route.
                    "routes": [{"dst": "0.0.0.0/0"}, {"dst": POD_SUBNET}],
                    // Leases stay in the test's temp dir, not /var/lib/cni.
                    "dataDir": ipam_dir,
                }
            },
            // Host ports (hostPort in a pod spec) as DNAT rules.
            {"type": "portmap", "capabilities": {"portMappings": true}},
            {"type": "loopback"}
        ]
    })
    .to_string()
}

fn cri_config(conf_dir: &Path) -> String {
    format!(
        r#"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "{STREAM_PORT}"
  enable_tls_streaming = false
  # Lowering oom_score_adj (CRI gives sandboxes -998) is denied on the test
  # machines; husk must never depend on it.
  restrict_oom_score_adj = true
  # Pod netns mounts under containerd's own state dir, not /var/run/netns.
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    # Declaring any runtime requires declaring runc too, or CRI does not load.
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{HUSK_HANDLER}]
      runtime_type = "io.containerd.husk.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = {conf_dir:?}
    max_conf_num = 1
"#
    )
}

/// containerd with CRI in a private network namespace, and a CRI client.
pub struct Cri {
    pub containerd: Containerd,
    pub netns: NetNs,
    /// CNI config and IPAM state, pod logs, volumes.
    pub dir: tempfile::TempDir,
    client: RuntimeServiceClient<Channel>,
    rt: tokio::runtime::Runtime,
}

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT_ID.fetch_add(1, Ordering::Relaxed)
    )
}

impl Cri {
    /// Starts containerd with CRI in a new network namespace, imports the
    /// test and pause images into `k8s.io` and waits until CRI reports its
    /// runtime and network ready.
    pub fn start() -> Cri {
        let dir = tempfile::Builder::new()
            .prefix("husk-cri")
            .tempdir()
            .unwrap();
        let conf_dir = dir.path().join("net.d");
        std::fs::create_dir_all(&conf_dir).unwrap();
        let net_name = unique("husk-cri");
        std::fs::write(
            conf_dir.join("10-husk.conflist"),
            conflist(&net_name, &dir.path().join("ipam")),
        )
        .unwrap();
        let netns = NetNs::create(&net_name);
        let containerd = Containerd::start_with_options(&ContainerdOptions {
            netns: Some(netns.path.clone()),
            husk_state_parent: Some(PathBuf::from("/run")),
            ..ContainerdOptions::new(&cri_config(&conf_dir))
        });
        containerd.import_test_image(CRI_NAMESPACE);
        let pause = build_busybox_image_with_cmd(
            &dir.path().join("pause-image"),
            PAUSE_IMAGE,
            &["sleep", "2147483647"],
        );
        containerd.ctr_ok(&[
            "-n",
            CRI_NAMESPACE,
            "images",
            "import",
            &pause.display().to_string(),
        ]);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let socket = containerd.socket.clone();
        let channel = rt
            .block_on(async {
                Endpoint::try_from("http://[::]:50051")?
                    .connect_with_connector(tower::service_fn(move |_: Uri| {
                        let socket = socket.clone();
                        async move {
                            let stream = tokio::net::UnixStream::connect(socket).await?;
                            Ok::<_, std::io::Error>(TokioIo::new(stream))
                        }
                    }))
                    .await
            })
            .unwrap_or_else(|e| panic!("cannot connect to CRI: {e}\n{}", containerd.diagnostics()));
        let cri = Cri {
            containerd,
            netns,
            dir,
            client: RuntimeServiceClient::new(channel),
            rt,
        };
        cri.wait_ready();
        cri
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = String::new();
        while Instant::now() < deadline {
            let mut c = self.client.clone();
            match self.rt.block_on(c.status(StatusRequest { verbose: false })) {
                Ok(resp) => {
                    let conditions = resp
                        .into_inner()
                        .status
                        .map(|s| s.conditions)
                        .unwrap_or_default();
                    if conditions.len() >= 2 && conditions.iter().all(|c| c.status) {
                        return;
                    }
                    last = format!("{conditions:?}");
                }
                Err(e) => last = e.to_string(),
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("CRI not ready: {last}\n{}", self.diagnostics());
    }

    /// Runs `f` on the harness's runtime (for raw client calls).
    pub fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// The raw CRI runtime client, for requests the helpers do not cover.
    pub fn client(&self) -> RuntimeServiceClient<Channel> {
        self.client.clone()
    }

    /// Runs one CRI call with `timeout`, panicking with diagnostics on error.
    fn call<T, F>(&self, what: &str, timeout: Duration, f: F) -> T
    where
        F: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        match self.try_call(timeout, f) {
            Ok(v) => v,
            Err(e) => panic!("CRI {what} failed: {e}\n{}", self.diagnostics()),
        }
    }

    fn try_call<T, F>(&self, timeout: Duration, f: F) -> Result<T, tonic::Status>
    where
        F: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        // The timer must be made inside the runtime.
        match self
            .rt
            .block_on(async move { tokio::time::timeout(timeout, f).await })
        {
            Ok(r) => r.map(tonic::Response::into_inner),
            Err(_) => Err(tonic::Status::deadline_exceeded(format!(
                "no answer within {timeout:?}"
            ))),
        }
    }

    /// A pod config as kubelet would send it: metadata, hostname (= name),
    /// a log directory, the default namespaces.
    pub fn pod_config(&self, name: &str) -> PodSandboxConfig {
        let log_dir = self.dir.path().join("logs").join(name);
        std::fs::create_dir_all(&log_dir).unwrap();
        PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.to_string(),
                uid: unique(name),
                namespace: "husk-test".to_string(),
                attempt: 0,
            }),
            hostname: name.to_string(),
            log_directory: log_dir.display().to_string(),
            linux: Some(LinuxPodSandboxConfig {
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(namespace_options()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// RunPodSandbox with `handler`.
    pub fn run_pod(&self, config: &PodSandboxConfig, handler: &str) -> Pod {
        let started = Instant::now();
        let mut c = self.client.clone();
        let resp = self.call(
            "RunPodSandbox",
            pod_timeout(),
            c.run_pod_sandbox(RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: handler.to_string(),
            }),
        );
        let mut pod = Pod {
            id: resp.pod_sandbox_id,
            handler: handler.to_string(),
            config: config.clone(),
            start_time: started.elapsed(),
            netns: None,
            netns_inode: None,
        };
        pod.netns = self.pod_netns(&pod);
        pod.netns_inode = pod
            .netns
            .as_ref()
            .and_then(|p| std::fs::metadata(p).ok())
            .map(|m| m.ino());
        pod
    }

    /// PodSandboxStatus, verbose (its `info` has the runtime spec).
    pub fn pod_status(&self, pod: &Pod) -> PodSandboxStatusResponse {
        let mut c = self.client.clone();
        self.call(
            "PodSandboxStatus",
            call_timeout(),
            c.pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: pod.id.clone(),
                verbose: true,
            }),
        )
    }

    /// The pod's IP address.
    pub fn pod_ip(&self, pod: &Pod) -> String {
        self.pod_status(pod)
            .status
            .and_then(|s| s.network)
            .map(|n| n.ip)
            .unwrap_or_default()
    }

    /// containerd's verbose sandbox info (JSON): runtime spec, CNI result...
    pub fn pod_info(&self, pod: &Pod) -> serde_json::Value {
        let status = self.pod_status(pod);
        status
            .info
            .get("info")
            .and_then(|i| serde_json::from_str(i).ok())
            .unwrap_or_default()
    }

    /// The annotations of the sandbox's OCI spec (what the shim sees).
    pub fn pod_spec_annotations(&self, pod: &Pod) -> HashMap<String, String> {
        let info = self.pod_info(pod);
        serde_json::from_value(info["runtimeSpec"]["annotations"].clone()).unwrap_or_default()
    }

    fn pod_netns(&self, pod: &Pod) -> Option<PathBuf> {
        let info = self.pod_info(pod);
        info["runtimeSpec"]["linux"]["namespaces"]
            .as_array()?
            .iter()
            .find(|n| n["type"] == "network")?["path"]
            .as_str()
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
    }

    /// Interfaces in the pod's network namespace (`nsenter ... ip link`).
    pub fn pod_links(&self, pod: &Pod) -> Vec<String> {
        let Some(ns) = &pod.netns else {
            return Vec::new();
        };
        let out = Command::new("nsenter")
            .arg(format!("--net={}", ns.display()))
            .args(["ip", "-o", "link", "show"])
            .output();
        let Ok(out) = out else {
            return Vec::new();
        };
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .collect()
    }

    /// A container config: `command` in the busybox test image, its log at
    /// `<pod log dir>/<name>.log`, the default namespaces, masked and
    /// read-only paths.
    pub fn container_config(&self, name: &str, command: &[&str]) -> ContainerConfig {
        ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: name.to_string(),
                attempt: 0,
            }),
            image: Some(ImageSpec {
                image: TEST_IMAGE.to_string(),
                ..Default::default()
            }),
            command: command.iter().map(|s| s.to_string()).collect(),
            log_path: format!("{name}.log"),
            linux: Some(LinuxContainerConfig {
                resources: None,
                security_context: Some(LinuxContainerSecurityContext {
                    namespace_options: Some(namespace_options()),
                    // kubelet always sends its defaults (containerd applies
                    // none of its own when the lists are empty).
                    masked_paths: KUBELET_MASKED_PATHS.iter().map(|p| p.to_string()).collect(),
                    readonly_paths: KUBELET_READONLY_PATHS
                        .iter()
                        .map(|p| p.to_string())
                        .collect(),
                    ..Default::default()
                }),
            }),
            ..Default::default()
        }
    }

    /// CreateContainer in `pod`.
    pub fn create_container(&self, pod: &Pod, config: &ContainerConfig) -> String {
        let mut c = self.client.clone();
        self.call(
            "CreateContainer",
            call_timeout(),
            c.create_container(CreateContainerRequest {
                pod_sandbox_id: pod.id.clone(),
                config: Some(config.clone()),
                sandbox_config: Some(pod.config.clone()),
            }),
        )
        .container_id
    }

    pub fn start_container(&self, id: &str) {
        let mut c = self.client.clone();
        self.call(
            "StartContainer",
            call_timeout(),
            c.start_container(StartContainerRequest {
                container_id: id.to_string(),
            }),
        );
    }

    /// CreateContainer + StartContainer.
    pub fn run_container(&self, pod: &Pod, config: &ContainerConfig) -> String {
        let id = self.create_container(pod, config);
        self.start_container(&id);
        id
    }

    /// ExecSync, errors returned.
    pub fn try_exec_sync(&self, id: &str, cmd: &[&str]) -> Result<ExecSyncResponse, tonic::Status> {
        let mut c = self.client.clone();
        self.try_call(
            call_timeout(),
            c.exec_sync(ExecSyncRequest {
                container_id: id.to_string(),
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                timeout: i64::try_from(call_timeout().as_secs()).unwrap_or(i64::MAX),
            }),
        )
    }

    /// ExecSync; panics if the call fails (a non-zero exit is not a failure).
    pub fn exec_sync(&self, id: &str, cmd: &[&str]) -> ExecSyncResponse {
        self.try_exec_sync(id, cmd).unwrap_or_else(|e| {
            panic!(
                "ExecSync {cmd:?} in {id} failed: {e}\n{}",
                self.diagnostics()
            )
        })
    }

    /// ExecSync that must exit 0; returns stdout.
    pub fn exec_ok(&self, id: &str, cmd: &[&str]) -> String {
        let r = self.exec_sync(id, cmd);
        assert_eq!(
            r.exit_code,
            0,
            "{cmd:?} in {id}: stdout {:?} stderr {:?}\n{}",
            String::from_utf8_lossy(&r.stdout),
            String::from_utf8_lossy(&r.stderr),
            self.diagnostics()
        );
        String::from_utf8_lossy(&r.stdout).into_owned()
    }

    /// `Exec` through the CRI streaming server: the RPC returns a URL, which
    /// is served as WebSocket with the `v4.channel.k8s.io` subprotocol (each
    /// frame starts with its stream: 0 stdin, 1 stdout, 2 stderr, 3 error).
    /// `stdin`, if given, is sent once; v4 cannot close stdin, so the command
    /// must end by itself.
    pub fn exec(&self, id: &str, cmd: &[&str], stdin: Option<&[u8]>) -> ExecOutput {
        let url = self.exec_url(id, cmd, false, stdin.is_some());
        self.streamed(&url, stdin, None, &format!("exec {cmd:?}"))
    }

    /// Exec on a terminal (`kubectl exec -t -i`): stdin is attached but
    /// nothing is sent on it; the output is the terminal's.
    pub fn exec_tty(&self, id: &str, cmd: &[&str]) -> ExecOutput {
        let url = self.exec_url(id, cmd, true, true);
        self.streamed(&url, None, None, &format!("exec -t {cmd:?}"))
    }

    /// The streaming URL of an `Exec` (with a terminal, no separate stderr).
    fn exec_url(&self, id: &str, cmd: &[&str], tty: bool, stdin: bool) -> String {
        let mut c = self.client.clone();
        self.call(
            "Exec",
            call_timeout(),
            c.exec(ExecRequest {
                container_id: id.to_string(),
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                tty,
                stdin,
                stdout: true,
                stderr: !tty,
            }),
        )
        .url
    }

    /// Attach (`kubectl attach -i`) to a container created with stdin:
    /// sends `stdin` once and hangs up when the output holds `until`.
    pub fn attach(&self, id: &str, stdin: &[u8], until: &str) -> ExecOutput {
        let mut c = self.client.clone();
        let url = self
            .call(
                "Attach",
                call_timeout(),
                c.attach(AttachRequest {
                    container_id: id.to_string(),
                    stdin: true,
                    tty: false,
                    stdout: true,
                    stderr: true,
                }),
            )
            .url;
        self.streamed(&url, Some(stdin), Some(until), &format!("attach {id}"))
    }

    /// PortForward (`kubectl port-forward`) to `port` of `pod`, over the
    /// streaming server's WebSocket protocol (`?port=`, channel 0 data, 1
    /// errors, each opened by the port as two little-endian bytes): sends
    /// `request` and hangs up when the reply holds `until` (or the server
    /// ends it). The reply, and what came on the error channel.
    pub fn port_forward(
        &self,
        pod: &Pod,
        port: u16,
        request: &[u8],
        until: &str,
    ) -> (String, String) {
        let mut c = self.client.clone();
        let url = self
            .call(
                "PortForward",
                call_timeout(),
                c.port_forward(PortForwardRequest {
                    pod_sandbox_id: pod.id.clone(),
                    port: vec![i32::from(port)],
                }),
            )
            .url;
        let url = format!("{url}?port={port}");
        let out = self.streamed(
            &url,
            Some(request),
            Some(until),
            &format!("port-forward {port}"),
        );
        let strip = |s: &str| {
            let prefix = String::from_utf8_lossy(&port.to_le_bytes()).into_owned();
            s.strip_prefix(prefix.as_str()).unwrap_or(s).to_string()
        };
        // Channel 0 is the data (read as "stdin" by the exec framing), 1 the
        // errors ("stdout").
        (strip(&out.stdin_channel), strip(&out.stdout))
    }

    /// ReopenContainerLog: containerd reopens the container's log file.
    pub fn reopen_log(&self, id: &str) {
        let mut c = self.client.clone();
        self.call(
            "ReopenContainerLog",
            call_timeout(),
            c.reopen_container_log(ReopenContainerLogRequest {
                container_id: id.to_string(),
            }),
        );
    }

    fn streamed(
        &self,
        url: &str,
        stdin: Option<&[u8]>,
        until: Option<&str>,
        what: &str,
    ) -> ExecOutput {
        let streamed = self.rt.block_on(async {
            tokio::time::timeout(call_timeout(), self.stream(url, stdin, until)).await
        });
        match streamed {
            Ok(Ok(out)) => out,
            Ok(Err(e)) => panic!("{what} via {url}: {e}\n{}", self.diagnostics()),
            Err(_) => panic!(
                "{what} via {url}: no end within {:?}\n{}",
                call_timeout(),
                self.diagnostics()
            ),
        }
    }

    /// A streaming-server request as WebSocket with `v4.channel.k8s.io`:
    /// `stdin` sent once on channel 0; frames collected per channel until
    /// the server ends the stream, or channels 0 or 1 hold `until`.
    async fn stream(
        &self,
        url: &str,
        stdin: Option<&[u8]>,
        until: Option<&str>,
    ) -> Result<ExecOutput, String> {
        let uri: Uri = url.parse().map_err(|e| format!("bad URL {url}: {e}"))?;
        let authority = uri
            .authority()
            .ok_or_else(|| format!("no host in {url}"))?
            .to_string();
        // The streaming server listens in containerd's network namespace.
        let tcp = self
            .netns
            .connect_tcp(&authority)
            .map_err(|e| format!("connect {authority}: {e}"))?;
        tcp.set_nonblocking(true).map_err(|e| e.to_string())?;
        let tcp = tokio::net::TcpStream::from_std(tcp).map_err(|e| e.to_string())?;
        let ws_url = url.replacen("http://", "ws://", 1);
        let mut request = ws_url.into_client_request().map_err(|e| e.to_string())?;
        request.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_static("v4.channel.k8s.io"),
        );
        let (mut ws, response) = tokio_tungstenite::client_async(request, tcp)
            .await
            .map_err(|e| format!("WebSocket handshake: {e}"))?;
        let mut out = ExecOutput {
            protocol: response
                .headers()
                .get("Sec-WebSocket-Protocol")
                .and_then(|p| p.to_str().ok())
                .unwrap_or_default()
                .to_string(),
            ..Default::default()
        };
        if let Some(data) = stdin {
            let mut frame = vec![0u8];
            frame.extend_from_slice(data);
            ws.send(Message::Binary(frame.into()))
                .await
                .map_err(|e| format!("stdin: {e}"))?;
        }
        while let Some(msg) = ws.next().await {
            let data = match msg {
                Ok(Message::Binary(b)) => b.to_vec(),
                Ok(Message::Text(t)) => t.as_bytes().to_vec(),
                Ok(Message::Close(_)) => break,
                Ok(_) => continue,
                // The server may drop the connection without a close frame
                // once the process ended.
                Err(e) => {
                    use tokio_tungstenite::tungstenite::error::{Error, ProtocolError};
                    match e {
                        Error::ConnectionClosed
                        | Error::AlreadyClosed
                        | Error::Protocol(ProtocolError::ResetWithoutClosingHandshake) => break,
                        e => return Err(format!("WebSocket: {e}")),
                    }
                }
            };
            let Some((&stream, payload)) = data.split_first() else {
                continue;
            };
            let text = String::from_utf8_lossy(payload);
            match stream {
                0 => out.stdin_channel.push_str(&text),
                1 => out.stdout.push_str(&text),
                2 => out.stderr.push_str(&text),
                3 => out.error.push_str(&text),
                _ => {}
            }
            if until.is_some_and(|u| out.stdout.contains(u) || out.stdin_channel.contains(u)) {
                let _ = ws.close(None).await;
                break;
            }
        }
        out.exit_code = exit_code_of_status(&out.error);
        Ok(out)
    }

    pub fn container_stats(&self, id: &str) -> ContainerStats {
        let mut c = self.client.clone();
        self.call(
            "ContainerStats",
            call_timeout(),
            c.container_stats(ContainerStatsRequest {
                container_id: id.to_string(),
            }),
        )
        .stats
        .unwrap_or_default()
    }

    pub fn container_status(&self, id: &str) -> ContainerStatus {
        let mut c = self.client.clone();
        self.call(
            "ContainerStatus",
            call_timeout(),
            c.container_status(ContainerStatusRequest {
                container_id: id.to_string(),
                verbose: false,
            }),
        )
        .status
        .unwrap_or_default()
    }

    /// Polls ContainerStatus until the container has exited.
    pub fn wait_exited(&self, id: &str, timeout: Duration) -> ContainerStatus {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.container_status(id);
            if status.state == ContainerState::ContainerExited as i32 {
                return status;
            }
            if Instant::now() > deadline {
                panic!(
                    "container {id} did not exit within {timeout:?}: {status:?}\n{}",
                    self.diagnostics()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    pub fn update_resources(&self, id: &str, linux: LinuxContainerResources) {
        let mut c = self.client.clone();
        self.call(
            "UpdateContainerResources",
            call_timeout(),
            c.update_container_resources(UpdateContainerResourcesRequest {
                container_id: id.to_string(),
                linux: Some(linux),
                ..Default::default()
            }),
        );
    }

    /// StopContainer: SIGTERM, SIGKILL after `grace_secs`.
    pub fn stop_container(&self, id: &str, grace_secs: i64) {
        let mut c = self.client.clone();
        self.call(
            "StopContainer",
            call_timeout(),
            c.stop_container(StopContainerRequest {
                container_id: id.to_string(),
                timeout: grace_secs,
            }),
        );
    }

    pub fn remove_container(&self, id: &str) {
        let mut c = self.client.clone();
        self.call(
            "RemoveContainer",
            call_timeout(),
            c.remove_container(RemoveContainerRequest {
                container_id: id.to_string(),
            }),
        );
    }

    pub fn stop_pod(&self, pod: &Pod) {
        let mut c = self.client.clone();
        self.call(
            "StopPodSandbox",
            call_timeout(),
            c.stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: pod.id.clone(),
            }),
        );
    }

    pub fn remove_pod(&self, pod: &Pod) {
        let mut c = self.client.clone();
        self.call(
            "RemovePodSandbox",
            call_timeout(),
            c.remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: pod.id.clone(),
            }),
        );
    }

    /// Ids of the pod sandboxes CRI knows.
    pub fn pod_ids(&self) -> Vec<String> {
        let mut c = self.client.clone();
        self.try_call(
            call_timeout(),
            c.list_pod_sandbox(ListPodSandboxRequest { filter: None }),
        )
        .map(|r| r.items.into_iter().map(|p| p.id).collect())
        .unwrap_or_default()
    }

    /// Ids of the containers CRI knows.
    pub fn container_ids(&self) -> Vec<String> {
        let mut c = self.client.clone();
        self.try_call(
            call_timeout(),
            c.list_containers(ListContainersRequest { filter: None }),
        )
        .map(|r| r.containers.into_iter().map(|c| c.id).collect())
        .unwrap_or_default()
    }

    /// A container's log file (CRI's format: `<time> <stream> <tag> <line>`).
    pub fn container_log(&self, pod: &Pod, name: &str) -> String {
        let path = Path::new(&pod.config.log_directory).join(format!("{name}.log"));
        std::fs::read_to_string(path).unwrap_or_default()
    }

    /// What `pods` (removed by now) and this containerd's runtimes left
    /// behind: shim (VM) processes, processes in a pod's network namespace
    /// or naming a pod, mounts under containerd's dir (snapshots, netns, shm,
    /// husk's shares), husk's sandbox dirs, sockets, netns files, links in
    /// the test's namespace other than lo and the bridge, pods or containers
    /// CRI still lists. Empty if clean.
    pub fn leftovers(&self, pods: &[&Pod]) -> Vec<String> {
        let mut left = Vec::new();
        for pid in self.containerd.shim_processes() {
            left.push(format!(
                "shim process {pid}: {}",
                crate::command_line_of(pid)
            ));
        }
        for m in self.containerd.mounts() {
            left.push(format!("mount {m}"));
        }
        // One directory per sandbox directly under husk's state dir.
        let sandboxes = std::fs::read_dir(&self.containerd.husk_state)
            .into_iter()
            .flatten()
            .flatten();
        for s in sandboxes {
            left.push(format!("husk state {}", s.path().display()));
        }
        for path in self.unix_socket_paths() {
            left.push(format!("unix socket {path}"));
        }
        for pod in pods {
            if let Some(ns) = pod.netns.as_ref().filter(|p| p.exists()) {
                left.push(format!("pod {} netns file {}", pod.id, ns.display()));
            }
            for pid in processes_of(pod) {
                left.push(format!(
                    "pod {} process {pid}: {}",
                    pod.id,
                    crate::command_line_of(pid)
                ));
            }
        }
        for link in self.netns.links() {
            if link != "lo" && link != BRIDGE {
                left.push(format!("link {link} in {}", self.netns.name));
            }
        }
        for id in self.pod_ids() {
            left.push(format!("CRI pod {id}"));
        }
        for id in self.container_ids() {
            left.push(format!("CRI container {id}"));
        }
        left
    }

    /// Unix sockets bound under containerd's dir or husk's state, except
    /// containerd's own:
    /// read from containerd's network namespace (where the shims run, and
    /// /proc/net/unix lists a namespace's sockets only) and the test's.
    fn unix_socket_paths(&self) -> Vec<String> {
        let root = self.containerd.dir.path();
        let own = [
            self.containerd.socket.clone(),
            root.join("containerd.ttrpc.sock"),
        ];
        let mut paths: Vec<String> = [
            format!("/proc/{}/net/unix", self.containerd.pid()),
            "/proc/self/net/unix".to_string(),
        ]
        .iter()
        .flat_map(|table| {
            std::fs::read_to_string(table)
                .unwrap_or_default()
                .lines()
                .skip(1)
                .filter_map(|l| l.split_whitespace().nth(7).map(str::to_string))
                .collect::<Vec<_>>()
        })
        .filter(|p| {
            self.containerd.owns_path(Path::new(p)) && !own.iter().any(|o| o == Path::new(p))
        })
        .collect();
        paths.sort();
        paths.dedup();
        paths
    }

    /// Counts of what pods use on the host, to compare before and after a
    /// churn of pods: nothing may grow. Only what is this test's own, so
    /// that other work on the machine does not count: cgroups named as CRI
    /// names pods and containers (64 hex digits), links in the CRI network
    /// namespace, mounts under containerd's and husk's dirs or of pod
    /// network namespaces, containerd's descriptors, shims.
    pub fn host_snapshot(&self) -> HostSnapshot {
        let count = |path: String| std::fs::read_dir(path).map_or(0, |d| d.count());
        let root = self.containerd.dir.path().to_string_lossy().into_owned();
        let husk = self.containerd.husk_state.to_string_lossy().into_owned();
        HostSnapshot {
            mounts: std::fs::read_to_string("/proc/self/mountinfo").map_or(0, |t| {
                t.lines()
                    .filter(|l| l.contains(&root) || l.contains(&husk) || l.contains("/netns/cni-"))
                    .count()
            }),
            cgroups: cri_cgroups(Path::new("/sys/fs/cgroup"), 6),
            // The CNI bridge comes with the first pod and stays.
            links: self
                .netns
                .links()
                .iter()
                .filter(|l| *l != "lo" && *l != BRIDGE)
                .count(),
            containerd_fds: count(format!("/proc/{}/fd", self.containerd.pid())),
            shims: self.containerd.shim_processes().len(),
        }
    }

    /// Waits up to `timeout` for [`Cri::leftovers`] to be empty (shims exit
    /// after their last task), then asserts it is.
    pub fn assert_clean(&self, pods: &[&Pod], timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let left = self.leftovers(pods);
            if left.is_empty() {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "left behind after {timeout:?}:\n  {}\n{}",
                    left.join("\n  "),
                    self.diagnostics()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Warnings and errors from containerd's log (shim and guest lines
    /// included), then its tail and the guest console's.
    pub fn diagnostics(&self) -> String {
        let log = self.containerd.log();
        let problems: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("level=error") || l.contains("level=warning"))
            .collect();
        let skip = problems.len().saturating_sub(40);
        format!(
            "--- containerd warnings and errors (last 40) ---\n{}\n{}",
            problems[skip..].join("\n"),
            self.containerd.diagnostics()
        )
    }

    /// Copies containerd's log (with the shims' and the guests' lines) and
    /// the guest console out of the temp dir, which is about to go, when the
    /// test failed or $HUSK_KEEP_LOGS is set.
    fn keep_logs_if_failed(&self) {
        if !std::thread::panicking() && std::env::var_os("HUSK_KEEP_LOGS").is_none() {
            return;
        }
        let dest = std::env::temp_dir()
            .join("husk-cri-logs")
            .join(&self.netns.name);
        if let Err(e) = std::fs::create_dir_all(&dest) {
            eprintln!("cannot keep logs in {}: {e}", dest.display());
            return;
        }
        let root = self.containerd.dir.path();
        for file in ["containerd.log", "console.log"] {
            if root.join(file).exists() {
                if let Err(e) = std::fs::copy(root.join(file), dest.join(file)) {
                    eprintln!("cannot keep {file}: {e}");
                }
            }
        }
        eprintln!(
            "containerd log and guest console kept in {}",
            dest.display()
        );
    }

    /// Stops and removes every pod CRI still has, best effort (a failed test
    /// must not leave VMs running).
    fn remove_all_pods(&self) {
        for id in self.pod_ids() {
            let mut c = self.client.clone();
            let stop = self.try_call(
                call_timeout(),
                c.stop_pod_sandbox(StopPodSandboxRequest {
                    pod_sandbox_id: id.clone(),
                }),
            );
            let removed = self.try_call(
                call_timeout(),
                c.remove_pod_sandbox(RemovePodSandboxRequest {
                    pod_sandbox_id: id.clone(),
                }),
            );
            if let Err(e) = stop.and(removed) {
                eprintln!("cleanup of pod {id}: {e}");
            }
        }
    }
}

impl Drop for Cri {
    fn drop(&mut self) {
        // A panic here while a failed test unwinds would abort the run and
        // lose its message.
        let cleanup =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.remove_all_pods()));
        if cleanup.is_err() {
            eprintln!("cleanup of the pods panicked");
        }
        // Shims that outlived their pods (a husk shim is the pod's VM) would
        // outlive containerd too: give them a moment to exit after their
        // last task, then end them, by pid, before containerd.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.containerd.shim_processes().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        for pid in self.containerd.shim_processes() {
            eprintln!(
                "killing leftover shim {pid}: {}",
                crate::command_line_of(pid)
            );
            if let Ok(pid) = i32::try_from(pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        self.keep_logs_if_failed();
    }
}

/// Processes inside `pod`'s network namespace, holding it open (which
/// keeps it, and a tap in it, alive after CRI removed its mount), or whose
/// command line names the pod's id (its shim, its VM).
/// What [`Cri::host_snapshot`] counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostSnapshot {
    /// Mounts of this containerd's and husk's dirs, and of pod netns.
    pub mounts: usize,
    /// cgroups of CRI pods and containers (every hierarchy).
    pub cgroups: usize,
    /// Links in the CRI network namespace but lo and the CNI bridge (taps
    /// and veths of pods).
    pub links: usize,
    /// containerd's open descriptors (FIFOs, sockets to shims).
    pub containerd_fds: usize,
    /// Shim processes of this containerd.
    pub shims: usize,
}

impl HostSnapshot {
    /// What grew from `before` to `self`, allowing containerd `fd_slack`
    /// more descriptors (it keeps a few connections of its own).
    pub fn growth_since(&self, before: &HostSnapshot, fd_slack: usize) -> Vec<String> {
        let mut grew = Vec::new();
        let checks = [
            ("mounts", before.mounts, self.mounts, 0),
            ("cgroups", before.cgroups, self.cgroups, 0),
            ("links", before.links, self.links, 0),
            (
                "containerd fds",
                before.containerd_fds,
                self.containerd_fds,
                fd_slack,
            ),
            ("shim processes", before.shims, self.shims, 0),
        ];
        for (what, was, now, slack) in checks {
            if now > was + slack {
                grew.push(format!("{what}: {was} -> {now}"));
            }
        }
        grew
    }
}

/// cgroup directories below `dir` (at most `depth` levels down) named as
/// CRI names pods and containers: 64 hex digits.
fn cri_cgroups(dir: &Path, depth: usize) -> usize {
    if depth == 0 {
        return 0;
    }
    let is_cri_id = |name: &str| name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit());
    std::fs::read_dir(dir).map_or(0, |entries| {
        entries
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| {
                let own = usize::from(e.file_name().to_str().is_some_and(is_cri_id));
                own + cri_cgroups(&e.path(), depth - 1)
            })
            .sum()
    })
}

fn processes_of(pod: &Pod) -> Vec<u32> {
    let netns = pod.netns_inode.map(|ino| format!("net:[{ino}]"));
    let is_netns = |link: &Path| {
        netns.as_ref().is_some_and(|ns| {
            std::fs::read_link(link).is_ok_and(|l| l.to_string_lossy() == ns.as_str())
        })
    };
    crate::host_processes()
        .into_iter()
        .filter(|p| {
            let proc_dir = Path::new("/proc").join(p.pid.to_string());
            let in_netns = is_netns(&proc_dir.join("ns/net"));
            let holds_netns = netns.is_some()
                && std::fs::read_dir(proc_dir.join("fd"))
                    .into_iter()
                    .flatten()
                    .flatten()
                    .any(|fd| is_netns(&fd.path()));
            in_netns || holds_netns || p.command_line().contains(&pod.id)
        })
        .map(|p| p.pid)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_come_from_the_v4_status() {
        assert_eq!(
            exit_code_of_status(r#"{"metadata":{},"status":"Success"}"#),
            Some(0)
        );
        let failure = r#"{"metadata":{},"status":"Failure","message":"command terminated with non-zero exit code: error executing command [sh -c exit 5], exit code 5","reason":"NonZeroExitCode","details":{"causes":[{"reason":"ExitCode","message":"5"}]}}"#;
        assert_eq!(exit_code_of_status(failure), Some(5));
        let other =
            r#"{"metadata":{},"status":"Failure","message":"boom","reason":"InternalError"}"#;
        assert_eq!(exit_code_of_status(other), None);
        assert_eq!(exit_code_of_status(""), None);
        assert_eq!(exit_code_of_status("not json"), None);
    }

    #[test]
    fn conflist_is_a_bridge_with_host_local_leases_in_the_temp_dir() {
        let list: serde_json::Value =
            serde_json::from_str(&conflist("net", Path::new("/tmp/x/ipam"))).unwrap();
        assert_eq!(list["name"], "net");
        assert_eq!(list["plugins"][0]["type"], "bridge");
        assert_eq!(list["plugins"][0]["bridge"], BRIDGE);
        assert_eq!(list["plugins"][0]["ipam"]["dataDir"], "/tmp/x/ipam");
        assert_eq!(list["plugins"][1]["type"], "portmap");
        assert_eq!(list["plugins"][2]["type"], "loopback");
    }
}
