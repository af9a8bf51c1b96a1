//! Running the real `husk-agent` on the host, isolated, for container tests:
//! PID 1 of its own mount, pid, UTS, network and cgroup namespaces (via
//! util-linux `unshare`), in a fresh cgroup v2 of its own, with `--isolated`
//! so it mounts a private cgroup2 and /run/husk. It cannot touch the host's
//! mounts, processes, hostname, network or other cgroups.

#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use husk_protocol::agent::*;
use husk_protocol::stdio::StdioKind;
use husk_protocol::AgentServiceClient;
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;
use ttrpc::asynchronous::Client;

pub const RPC_TIMEOUT: Duration = Duration::from_secs(60);

pub fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(i64::try_from(RPC_TIMEOUT.as_nanos()).unwrap())
}

/// The host's cgroup2 mount (`/sys/fs/cgroup/unified` on hybrid hosts).
fn cgroup2_mount() -> PathBuf {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    mountinfo
        .lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let point = left.split(' ').nth(4)?;
            right.starts_with("cgroup2 ").then(|| PathBuf::from(point))
        })
        .expect("the host has no cgroup2 mount")
}

/// Builds the busybox rootfs once per test binary.
pub fn busybox_rootfs() -> PathBuf {
    static ROOTFS: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    ROOTFS
        .get_or_init(|| {
            let dir =
                std::env::temp_dir().join(format!("husk-agent-test-rootfs-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/busybox-rootfs.sh");
            let status = Command::new(script).arg(&dir).status().unwrap();
            assert!(status.success(), "busybox-rootfs.sh failed");
            dir
        })
        .clone()
}

pub struct TestAgent {
    child: Child,
    pub sock: PathBuf,
    pub io_sock: PathBuf,
    pub cgroup: PathBuf,
    pub rootfs: PathBuf,
    dir: tempfile::TempDir,
}

impl TestAgent {
    pub fn start() -> TestAgent {
        TestAgent::start_logging("debug")
    }

    /// With another `--log-level` (a guest's default is info).
    pub fn start_logging(level: &str) -> TestAgent {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("agent.sock");
        let io_sock = dir.path().join("agent.sock.io");
        let cgroup = cgroup2_mount().join(format!(
            "husk-agent-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&cgroup).unwrap();
        let log = std::fs::File::create(dir.path().join("agent.log")).unwrap();
        let child = Command::new("sh")
            .arg("-c")
            .arg(r#"echo $$ > "$1/cgroup.procs" && shift && exec "$@""#)
            .arg("sh")
            .arg(&cgroup)
            .args([
                "unshare",
                "--mount",
                "--pid",
                "--fork",
                "--kill-child",
                "--mount-proc",
                "--uts",
                "--net",
                "--ipc",
                "--cgroup",
                "--",
            ])
            // Another build of the agent (agent/tests/measure.rs).
            .arg(
                std::env::var_os("HUSK_AGENT_BIN")
                    .unwrap_or(env!("CARGO_BIN_EXE_husk-agent").into()),
            )
            .arg("--listen")
            .arg(format!("unix://{}", sock.display()))
            .arg("--isolated")
            .arg(format!("--log-level={level}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut agent = TestAgent {
            child,
            sock,
            io_sock,
            cgroup,
            rootfs: busybox_rootfs(),
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !agent.io_sock.exists() || !agent.sock.exists() {
            if let Some(status) = agent.child.try_wait().unwrap() {
                panic!("agent exited: {status}\n{}", agent.log());
            }
            assert!(
                Instant::now() < deadline,
                "agent never bound\n{}",
                agent.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        agent
    }

    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(self.dir.path().join("agent.log")) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// The agent's pid on the host (unshare's only child).
    pub fn agent_pid(&self) -> i32 {
        let unshare = self.child.id();
        let children =
            std::fs::read_to_string(format!("/proc/{unshare}/task/{unshare}/children")).unwrap();
        children.split_whitespace().next().unwrap().parse().unwrap()
    }

    pub async fn client(&self) -> AgentServiceClient {
        let client = Client::connect(&format!("unix://{}", self.sock.display()))
            .await
            .unwrap();
        AgentServiceClient::new(client)
    }

    pub async fn attach(
        &self,
        container: &str,
        exec: Option<&str>,
        kind: StdioKind,
    ) -> tokio::net::UnixStream {
        let mut stream = tokio::net::UnixStream::connect(&self.io_sock)
            .await
            .unwrap();
        husk_vsock::send_stdio_header(&mut stream, container, exec, kind)
            .await
            .unwrap();
        stream
    }

    /// The container's cgroup as the host sees it.
    pub fn container_cgroup(&self, id: &str) -> PathBuf {
        self.cgroup.join("husk").join(id)
    }

    /// Runs `cmd` in the agent's network namespace.
    pub fn in_netns(&self, cmd: &[&str]) {
        let status = Command::new("nsenter")
            .arg("--target")
            .arg(self.agent_pid().to_string())
            .arg("--net")
            .args(cmd)
            .status()
            .unwrap();
        assert!(status.success(), "{cmd:?} failed");
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        // unshare --kill-child takes the agent, and its pid namespace, along.
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Leaf cgroups first; they empty as soon as their processes died.
        for _ in 0..50 {
            if remove_cgroup_tree(&self.cgroup) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if std::thread::panicking() {
            eprintln!("--- agent log ---\n{}", self.log());
        }
    }
}

fn remove_cgroup_tree(dir: &Path) -> bool {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    std::fs::remove_dir(dir).is_ok() || !dir.exists()
}

const CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// An OCI process running `args` as root, Docker's default capabilities.
pub fn process(args: &[&str]) -> Value {
    json!({
        "terminal": false,
        "user": {"uid": 0, "gid": 0},
        "args": args,
        "env": ["PATH=/bin", "TERM=xterm"],
        "cwd": "/",
        "capabilities": {"bounding": CAPS, "effective": CAPS, "permitted": CAPS},
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
        "noNewPrivileges": true
    })
}

/// A spec like `runc spec`'s: its own pid/ipc/uts/mount namespaces, the
/// usual pseudo filesystems.
pub fn spec(process: Value) -> Value {
    json!({
        "ociVersion": "1.0.2",
        "process": process,
        "root": {"path": "rootfs", "readonly": false},
        "hostname": "ctr",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]}
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
        }
    })
}

pub fn stdio(stdin: bool, stdout: bool, stderr: bool, terminal: bool) -> Stdio_ {
    let mut s = husk_protocol::agent::Stdio::new();
    s.stdin = stdin;
    s.stdout = stdout;
    s.stderr = stderr;
    s.terminal = terminal;
    s
}
pub type Stdio_ = husk_protocol::agent::Stdio;

pub fn create_request(
    id: &str,
    rootfs: &Path,
    spec: &Value,
    stdio: Stdio_,
) -> CreateContainerRequest {
    let mut req = CreateContainerRequest::new();
    req.container_id = id.into();
    req.spec_json = serde_json::to_vec(spec).unwrap();
    req.rootfs_path = rootfs.display().to_string();
    req.stdio = Some(stdio).into();
    req
}

pub fn exec_request(id: &str, exec: &str, process: &Value, stdio: Stdio_) -> ExecProcessRequest {
    let mut req = ExecProcessRequest::new();
    req.container_id = id.into();
    req.exec_id = exec.into();
    req.process_json = serde_json::to_vec(process).unwrap();
    req.stdio = Some(stdio).into();
    req
}

pub async fn start(client: &AgentServiceClient, id: &str) {
    let mut req = StartContainerRequest::new();
    req.container_id = id.into();
    client.start_container(ctx(), &req).await.unwrap();
}

pub async fn wait(client: &AgentServiceClient, id: &str, exec: &str) -> WaitProcessResponse {
    let mut req = WaitProcessRequest::new();
    req.container_id = id.into();
    req.exec_id = exec.into();
    client.wait_process(ctx(), &req).await.unwrap()
}

pub async fn signal(client: &AgentServiceClient, id: &str, exec: &str, sig: i32, all: bool) {
    let mut req = SignalProcessRequest::new();
    req.container_id = id.into();
    req.exec_id = exec.into();
    req.signal = u32::try_from(sig).unwrap();
    req.all = all;
    client.signal_process(ctx(), &req).await.unwrap();
}

pub async fn remove(client: &AgentServiceClient, id: &str) {
    let mut req = RemoveContainerRequest::new();
    req.container_id = id.into();
    client.remove_container(ctx(), &req).await.unwrap();
}

pub async fn read_all(mut s: tokio::net::UnixStream) -> String {
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

/// The status code of a failed RPC.
pub fn code<T: std::fmt::Debug>(r: ttrpc::Result<T>) -> (ttrpc::Code, String) {
    match r {
        Err(ttrpc::Error::RpcStatus(s)) => (s.code(), s.message().to_owned()),
        other => panic!("expected an RPC status, got {other:?}"),
    }
}
