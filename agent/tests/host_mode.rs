//! The real `husk-agent` binary in host mode (`--listen unix://...`), driven
//! through the generated ttrpc client, as the shim will drive it in a VM.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use husk_protocol::agent::{CheckRequest, ShutdownRequest};
use husk_protocol::logline::{self, LogLevel};
use husk_protocol::AgentServiceClient;
use ttrpc::asynchronous::Client;

const RPC_TIMEOUT_NS: i64 = 10_000_000_000;

/// The agent as a child process; killed if the test fails half-way.
struct Agent {
    child: Child,
    sock: PathBuf,
    _dir: tempfile::TempDir,
}

impl Agent {
    fn start() -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("agent.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_husk-agent"))
            .arg("--listen")
            .arg(format!("unix://{}", sock.display()))
            .arg("--log-level=debug")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let agent = Agent {
            child,
            sock,
            _dir: dir,
        };
        agent.wait_for_socket();
        agent
    }

    fn wait_for_socket(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.sock.exists() {
            assert!(
                Instant::now() < deadline,
                "agent never bound {}",
                self.sock.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    async fn client(&self) -> AgentServiceClient {
        let client = Client::connect(&format!("unix://{}", self.sock.display()))
            .await
            .unwrap();
        AgentServiceClient::new(client)
    }

    /// Waits for the agent to exit by itself; returns its status and stderr.
    fn wait_exit(&mut self) -> (std::process::ExitStatus, String) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "agent did not exit");
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut stderr = String::new();
        if let Some(mut pipe) = self.child.stderr.take() {
            pipe.read_to_string(&mut stderr).unwrap();
        }
        (status, stderr)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn host_kernel_release() -> String {
    let out = Command::new("uname").arg("-r").output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn parsed_lines(stderr: &str) -> Vec<logline::LogLine> {
    stderr.lines().map(logline::parse).collect()
}

fn assert_socket_removed(sock: &Path) {
    assert!(!sock.exists(), "{} left behind", sock.display());
}

#[tokio::test(flavor = "current_thread")]
async fn check_then_shutdown() {
    let mut agent = Agent::start();
    let client = agent.client().await;

    let ctx = || ttrpc::context::with_timeout(RPC_TIMEOUT_NS);
    let resp = client.check(ctx(), &CheckRequest::new()).await.unwrap();
    assert_eq!(resp.agent_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(resp.kernel_release, host_kernel_release());

    client
        .shutdown(ctx(), &ShutdownRequest::new())
        .await
        .unwrap();
    let (status, stderr) = agent.wait_exit();
    assert!(status.success(), "{status:?}\n{stderr}");
    assert_socket_removed(&agent.sock);

    // Its log went to stderr in the documented line format.
    let lines = parsed_lines(&stderr);
    let has = |level: LogLevel, needle: &str| {
        lines.iter().any(|l| {
            l.level == level && l.target.starts_with("husk_agent") && l.message.contains(needle)
        })
    };
    assert!(has(LogLevel::Info, "agent serving"), "{stderr}");
    assert!(has(LogLevel::Info, "shutdown requested"), "{stderr}");
}

#[tokio::test(flavor = "current_thread")]
async fn sigterm_stops_the_host_mode_agent() {
    let mut agent = Agent::start();
    // Served at least once, so the runtime and signal handlers are up.
    let client = agent.client().await;
    let ctx = ttrpc::context::with_timeout(RPC_TIMEOUT_NS);
    client.check(ctx, &CheckRequest::new()).await.unwrap();

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(agent.child.id()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let (status, stderr) = agent.wait_exit();
    assert!(status.success(), "{status:?}\n{stderr}");
    assert_socket_removed(&agent.sock);
}

#[test]
fn rejects_unknown_arguments_on_the_host() {
    let out = Command::new(env!("CARGO_BIN_EXE_husk-agent"))
        .args(["--listen", "unix:///nonexistent/x.sock", "--bogus"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
