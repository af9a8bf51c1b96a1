//! The shim's task lifecycle against a fake VM and agent (fakes.rs): the
//! orderings, the failure at each step and the races of create, start,
//! exec, kill, wait and delete, in milliseconds. The host side is real: each
//! container's rootfs is bind-mounted into a temporary staging tree, and the
//! tests check that nothing is left there.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use containerd_shim::api::CreateTaskRequest;
use containerd_shim::ExitSignal;
use ttrpc::Code;

use crate::container::Shim;
use crate::events::Events;
use crate::fakes::{FakeGuest, FakeLauncher, RecordingPublisher};
use crate::io::Stdio;

/// Bound on any one step; the fakes answer in microseconds.
const STEP: Duration = Duration::from_secs(10);

struct Rig {
    shim: Arc<Shim>,
    guest: Arc<FakeGuest>,
    events: RecordingPublisher,
    launcher: Arc<FakeLauncher>,
    dir: tempfile::TempDir,
}

/// A shim for sandbox `sandbox_id` on a fake guest; None (skipped) when not
/// root, since rootfs binds are real mounts. Under CI, not root fails.
fn rig(sandbox_id: &str) -> Option<Rig> {
    if !nix::unistd::geteuid().is_root() {
        assert!(
            std::env::var_os("CI").is_none(),
            "lifecycle tests need root (bind mounts) and CI must run them"
        );
        eprintln!("skipped: lifecycle tests need root");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let launcher = Arc::new(FakeLauncher::new(dir.path()));
    let events = RecordingPublisher::default();
    let shim = Arc::new(Shim::new(
        "default",
        sandbox_id,
        Events::new(Box::new(events.clone()), "default"),
        Arc::new(ExitSignal::default()),
        launcher.clone(),
    ));
    let mut config = husk_config::Config::default();
    config.runtime.state_dir = dir.path().join("state");
    shim.preset_config(config);
    Some(Rig {
        guest: launcher.guest.clone(),
        shim,
        events,
        launcher,
        dir,
    })
}

fn code(e: &ttrpc::Error) -> Code {
    match e {
        ttrpc::Error::RpcStatus(s) => s.code(),
        _ => Code::UNKNOWN,
    }
}

async fn step<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(STEP, f).await.expect("step hung")
}

impl Rig {
    /// A bundle for task `id` (with a rootfs unless `rootfs` is false).
    fn bundle(&self, id: &str, rootfs: bool) -> PathBuf {
        let bundle = self.dir.path().join("bundles").join(id);
        std::fs::create_dir_all(&bundle).unwrap();
        if rootfs {
            std::fs::create_dir_all(bundle.join("rootfs/bin")).unwrap();
        }
        let spec = serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"user": {"uid": 0, "gid": 0}, "args": ["sh"], "cwd": "/"},
            "root": {"path": "rootfs"},
            "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}]}
        });
        std::fs::write(bundle.join("config.json"), spec.to_string()).unwrap();
        bundle
    }

    fn request(&self, id: &str, bundle: &Path, stdio: &Stdio) -> CreateTaskRequest {
        CreateTaskRequest {
            id: id.into(),
            bundle: bundle.display().to_string(),
            stdin: stdio.stdin.clone(),
            stdout: stdio.stdout.clone(),
            stderr: stdio.stderr.clone(),
            terminal: stdio.terminal,
            ..Default::default()
        }
    }

    async fn create(&self, id: &str) -> ttrpc::Result<u32> {
        let bundle = self.bundle(id, true);
        let req = self.request(id, &bundle, &Stdio::default());
        step(self.shim.create(&req)).await
    }

    async fn run(&self, id: &str) {
        self.create(id).await.unwrap();
        step(self.shim.start(id, "")).await.unwrap();
    }

    /// Adds exec `exec_id` to `id` with stdio `stdio`.
    async fn exec(&self, id: &str, exec_id: &str, stdio: Stdio) -> ttrpc::Result<()> {
        let spec = br#"{"args": ["true"], "cwd": "/", "user": {"uid": 0, "gid": 0}}"#;
        step(self.shim.exec(id, exec_id, stdio, spec)).await
    }

    /// Adds exec `exec_id` to `id` with its stdout on a FIFO; its reader.
    async fn exec_with_stdout(&self, id: &str, exec_id: &str) -> std::fs::File {
        let (stdout, reader) = self.fifo(&format!("{id}-{exec_id}.out"));
        let stdio = Stdio {
            stdout,
            ..Stdio::default()
        };
        self.exec(id, exec_id, stdio).await.unwrap();
        reader
    }

    async fn wait(&self, id: &str, exec_id: &str) -> u32 {
        let process = self.shim.container(id).unwrap().process(exec_id).unwrap();
        step(process.wait()).await.status
    }

    /// The container's directory in the fake sandbox's staging tree.
    fn staged(&self, id: &str) -> PathBuf {
        self.dir.path().join("sandbox/staging").join(id)
    }

    /// A FIFO for a process's stdout, with a non-blocking reader on it.
    fn fifo(&self, name: &str) -> (String, std::fs::File) {
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.dir.path().join(name);
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let reader = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .unwrap();
        (path.display().to_string(), reader)
    }
}

#[tokio::test]
async fn a_task_runs_exits_and_is_deleted_with_its_events_in_order() {
    let Some(rig) = rig("c1") else { return };
    let pid = rig.create("c1").await.unwrap();
    assert!(rig.staged("c1").join("rootfs/bin").exists(), "rootfs bound");
    assert_eq!(step(rig.shim.start("c1", "")).await.unwrap(), pid);
    rig.guest.exit("c1", "", 3);
    assert_eq!(rig.wait("c1", "").await, 3);
    let (deleted_pid, exit) = step(rig.shim.delete("c1", "")).await.unwrap();
    assert_eq!((deleted_pid, exit.map(|e| e.status)), (pid, Some(3)));
    assert_eq!(
        rig.events.topics(),
        [
            "/tasks/create",
            "/tasks/start",
            "/tasks/exit",
            "/tasks/delete"
        ]
    );
    assert!(!rig.guest.has_container("c1"), "removed in the guest");
    assert!(!rig.staged("c1").exists(), "host files removed");
    assert_eq!(rig.launcher.launches.load(Ordering::SeqCst), 1);
    rig.shim.shutdown().await;
    assert!(!rig.guest.is_running(), "Shutdown stops the VM");
    assert!(!rig.dir.path().join("sandbox").exists());
}

#[tokio::test]
async fn two_creates_of_one_id_do_not_both_run() {
    let Some(rig) = rig("c1") else { return };
    let bundle = rig.bundle("c1", true);
    let req = rig.request("c1", &bundle, &Stdio::default());
    let (a, b) = step(async { tokio::join!(rig.shim.create(&req), rig.shim.create(&req)) }).await;
    let codes = [a.as_ref().err().map(code), b.as_ref().err().map(code)];
    assert!(
        codes.contains(&None) && codes.contains(&Some(Code::ALREADY_EXISTS)),
        "{a:?} {b:?}"
    );
    assert_eq!(rig.guest.count("CreateContainer"), 1);
    assert_eq!(rig.events.topics(), ["/tasks/create"]);
}

#[tokio::test]
async fn a_second_start_is_refused_and_a_running_task_is_not_deleted() {
    let Some(rig) = rig("c1") else { return };
    rig.create("c1").await.unwrap();
    let (a, b) =
        step(async { tokio::join!(rig.shim.start("c1", ""), rig.shim.start("c1", "")) }).await;
    assert!(a.is_ok() != b.is_ok(), "{a:?} {b:?}");
    assert_eq!(rig.guest.count("StartContainer"), 1);
    let refused = step(rig.shim.delete("c1", "")).await.unwrap_err();
    assert_eq!(code(&refused), Code::FAILED_PRECONDITION);
    assert!(rig.shim.container("c1").is_ok());
}

#[tokio::test]
async fn a_failed_start_can_be_retried() {
    let Some(rig) = rig("pod") else { return };
    rig.create("c1").await.unwrap();
    rig.guest.fail("StartContainer");
    let e = step(rig.shim.start("c1", "")).await.unwrap_err();
    assert!(e.to_string().contains("StartContainer"), "{e}");
    let process = rig.shim.container("c1").unwrap().process("").unwrap();
    assert_eq!(process.status(false), containerd_shim::api::Status::CREATED);
}

/// Create fails at each of its steps: the error names the step, nothing of
/// the container is left on the host or in the guest, its id is free again.
#[tokio::test]
async fn a_create_failing_at_any_step_leaves_nothing_behind() {
    let Some(rig) = rig("pod") else { return };
    rig.run("pod").await;

    let bundle = rig.bundle("no-rootfs", false);
    let req = rig.request("no-rootfs", &bundle, &Stdio::default());
    let e = step(rig.shim.create(&req)).await.unwrap_err();
    assert!(e.to_string().contains("rootfs"), "{e}");
    assert!(!rig.staged("no-rootfs").exists());

    rig.guest.fail("CreateContainer");
    let e = rig.create("refused").await.unwrap_err();
    assert!(e.to_string().contains("CreateContainer"), "{e}");
    assert!(!rig.staged("refused").exists());
    assert!(!rig.guest.has_container("refused"));

    // The agent creates it, but its stdout cannot be attached.
    rig.guest.heal("CreateContainer");
    rig.guest.fail("ConnectStdio");
    let (stdout, _reader) = rig.fifo("attach-out");
    let stdio = Stdio {
        stdout,
        ..Stdio::default()
    };
    let bundle = rig.bundle("unattached", true);
    let req = rig.request("unattached", &bundle, &stdio);
    let e = step(rig.shim.create(&req)).await.unwrap_err();
    assert!(e.to_string().contains("unattached"), "{e}");
    assert!(
        !rig.guest.has_container("unattached"),
        "removed in the guest"
    );
    assert!(!rig.staged("unattached").exists());

    for id in ["no-rootfs", "refused", "unattached"] {
        assert_eq!(
            code(&rig.shim.container(id).err().unwrap()),
            Code::NOT_FOUND
        );
    }
    assert!(rig.guest.is_running(), "the pod's VM serves on");
    assert_eq!(rig.shim.container_count(), 1);
    assert_eq!(rig.events.topics(), ["/tasks/create", "/tasks/start"]);
}

#[tokio::test]
async fn a_failed_create_of_the_task_that_booted_the_vm_stops_the_vm() {
    let Some(rig) = rig("c1") else { return };
    rig.guest.fail("CreateContainer");
    rig.create("c1").await.unwrap_err();
    assert!(!rig.guest.is_running());
    assert!(!rig.dir.path().join("sandbox").exists());
}

/// A Create cancelled midway (containerd gave up at its deadline) releases
/// its id and its files.
#[tokio::test]
async fn a_cancelled_create_releases_its_id_and_files() {
    let Some(rig) = rig("pod") else { return };
    rig.run("pod").await;
    rig.guest.hang("CreateContainer");
    let bundle = rig.bundle("slow", true);
    let req = rig.request("slow", &bundle, &Stdio::default());
    let cancelled = tokio::time::timeout(Duration::from_millis(100), rig.shim.create(&req)).await;
    assert!(cancelled.is_err(), "the create hangs");
    assert!(!rig.staged("slow").exists(), "files rolled back");
    assert_eq!(rig.shim.container_count(), 1, "id released");
}

#[tokio::test]
async fn an_exec_whose_stdio_cannot_attach_is_not_left_running() {
    let Some(rig) = rig("c1") else { return };
    rig.run("c1").await;
    let _reader = rig.exec_with_stdout("c1", "e1").await;
    rig.guest.fail("ConnectStdio");
    let e = step(rig.shim.start("c1", "e1")).await.unwrap_err();
    assert!(e.to_string().contains("e1"), "{e}");
    assert_eq!(rig.guest.live_processes(), ["c1/"], "the exec was killed");
    // containerd deletes the exec that did not start.
    step(rig.shim.delete("c1", "e1")).await.unwrap();
}

#[tokio::test]
async fn exec_output_reaches_its_fifo_before_its_exit() {
    use std::io::Read;
    let Some(rig) = rig("c1") else { return };
    rig.run("c1").await;
    let mut reader = rig.exec_with_stdout("c1", "e1").await;
    step(rig.shim.start("c1", "e1")).await.unwrap();
    assert!(rig
        .guest
        .write_output("c1", "e1", b"hello from the guest\n"));
    rig.guest.exit("c1", "e1", 0);
    assert_eq!(rig.wait("c1", "e1").await, 0);
    let mut out = String::new();
    let _ = reader.read_to_string(&mut out);
    assert_eq!(out, "hello from the guest\n");
    let topics = rig.events.topics();
    assert_eq!(
        &topics[2..],
        ["/tasks/exec-added", "/tasks/exec-started", "/tasks/exit"]
    );
}

#[tokio::test]
async fn concurrent_execs_each_run_and_exit_once() {
    let Some(rig) = rig("c1") else { return };
    rig.run("c1").await;
    let ids: Vec<String> = (0..8).map(|i| format!("e{i}")).collect();
    for id in &ids {
        rig.exec("c1", id, Stdio::default()).await.unwrap();
    }
    let starts = ids.iter().map(|id| rig.shim.start("c1", id));
    let pids: Vec<u32> = step(futures_util::future::join_all(starts))
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let mut unique = pids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), ids.len(), "{pids:?}");
    for (i, id) in ids.iter().enumerate() {
        rig.guest.exit("c1", id, i32::try_from(i).unwrap());
    }
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(rig.wait("c1", id).await, u32::try_from(i).unwrap());
    }
    let exits = rig.events.count("/tasks/exit");
    assert_eq!(exits, ids.len());
}

#[tokio::test]
async fn killing_an_exec_that_never_started_reports_its_exit() {
    let Some(rig) = rig("c1") else { return };
    rig.run("c1").await;
    rig.exec("c1", "e1", Stdio::default()).await.unwrap();
    step(rig.shim.kill("c1", "e1", 9, false)).await.unwrap();
    assert_eq!(rig.wait("c1", "e1").await, 137);
    assert!(rig
        .events
        .events()
        .iter()
        .any(|e| e.starts_with("/tasks/exit")
            && e.contains("id: \"e1\"")
            && e.contains("exit_status: 137")));
    assert_eq!(
        rig.guest.count("ExecProcess"),
        0,
        "nothing ran in the guest"
    );
    let again = step(rig.shim.kill("c1", "e1", 9, false)).await.unwrap_err();
    assert_eq!(code(&again), Code::NOT_FOUND);
}

#[tokio::test]
async fn sigkill_to_a_guest_that_ignores_it_stops_the_vm_and_reports_137() {
    let Some(rig) = rig("c1") else { return };
    rig.run("c1").await;
    rig.exec("c1", "e1", Stdio::default()).await.unwrap();
    step(rig.shim.start("c1", "e1")).await.unwrap();
    rig.guest.ignore_signals();
    step(rig.shim.kill("c1", "", 9, false)).await.unwrap();
    assert_eq!(rig.wait("c1", "").await, 137);
    assert_eq!(rig.wait("c1", "e1").await, 137);
    assert!(!rig.guest.is_running(), "the VM is the kill boundary");
    let exits = rig.events.count("/tasks/exit");
    assert_eq!(exits, 2, "one exit each");
}

#[tokio::test]
async fn a_stuck_signal_call_still_ends_at_the_kill_boundary() {
    let Some(rig) = rig("c1") else { return };
    rig.run("c1").await;
    rig.guest.hang("SignalProcess");
    step(rig.shim.kill("c1", "", 9, false)).await.unwrap();
    assert_eq!(rig.wait("c1", "").await, 137);
    // A signal other than SIGKILL to a stuck guest is an error, not a wait.
    let Some(rig) = self::rig("c2") else { return };
    rig.run("c2").await;
    rig.guest.fail("SignalProcess");
    let e = step(rig.shim.kill("c2", "", 15, false)).await.unwrap_err();
    assert!(e.to_string().contains("SignalProcess"), "{e}");
}

#[tokio::test]
async fn a_vm_that_dies_reports_its_processes_lost() {
    let Some(rig) = rig("c1") else { return };
    rig.run("c1").await;
    rig.guest.crash();
    assert_eq!(rig.wait("c1", "").await, crate::process::LOST_EXIT_STATUS);
    let e = step(rig.shim.start("c1", "")).await.unwrap_err();
    assert_eq!(code(&e), Code::FAILED_PRECONDITION);
    step(rig.shim.delete("c1", "")).await.unwrap();
    assert!(!rig.staged("c1").exists());
}

#[tokio::test]
async fn pause_resume_and_queries_reach_the_agent() {
    let Some(rig) = rig("c1") else { return };
    rig.run("c1").await;
    step(rig.shim.set_paused("c1", true)).await.unwrap();
    assert!(rig.shim.container("c1").unwrap().is_paused());
    step(rig.shim.set_paused("c1", false)).await.unwrap();
    let sandbox = rig.shim.sandbox().unwrap();
    let pids = step(sandbox.agent.list_processes("c1")).await.unwrap();
    assert_eq!(pids.len(), 1);
    rig.guest.fail("PauseContainer");
    let e = step(rig.shim.set_paused("c1", true)).await.unwrap_err();
    assert!(e.to_string().contains("PauseContainer"), "{e}");
    assert!(!rig.shim.container("c1").unwrap().is_paused());
    assert_eq!(
        rig.events.topics()[2..],
        ["/tasks/paused", "/tasks/resumed"]
    );
}
