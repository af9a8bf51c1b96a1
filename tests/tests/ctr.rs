//! `ctr run --runtime io.containerd.husk.v2` through a real containerd: each
//! task is a real microVM. Run one at a time (`make test-vm`).
//!
//! Each test starts its own containerd and imports a locally built busybox
//! image; VM boots dominate the time (~30-60 s each on nested KVM).

use std::io::{Read, Write};
use std::process::Stdio;
use std::time::Duration;

use husk_tests::containerd::*;
use husk_tests::*;

fn ctrd() -> Containerd {
    let c = Containerd::start("");
    c.import_test_image("default");
    c
}

fn assert_clean(c: &Containerd) {
    // The shim exits after Shutdown; give it a moment.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !c.shim_processes().is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        c.shim_processes(),
        Vec::<u32>::new(),
        "shims left running\n{}",
        c.diagnostics()
    );
    assert_eq!(c.husk_mounts(), Vec::<String>::new(), "mounts left behind");
    // One directory per sandbox directly under husk's state dir.
    let left: Vec<_> = std::fs::read_dir(&c.husk_state)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "sandbox directories left behind: {left:?}");
}

fn run_args<'a>(extra: &[&'a str], id: &'a str, cmd: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["run", "--rm", "--runtime", HUSK_RUNTIME];
    args.extend_from_slice(extra);
    args.push(TEST_IMAGE);
    args.push(id);
    args.extend_from_slice(cmd);
    args
}

/// Output, exit code, a container that exits at once, the guest kernel, and
/// logs reaching containerd.
#[test]
fn output_exit_code_and_guest_kernel() {
    let c = ctrd();
    let out = c.ctr(&run_args(
        &[],
        "out",
        &[
            "sh",
            "-c",
            "uname -r; echo to-stdout; echo to-stderr >&2; exit 3",
        ],
    ));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(3),
        "stdout: {stdout}\nstderr: {stderr}\n{}",
        c.diagnostics()
    );
    let mut lines = stdout.lines();
    assert_eq!(
        lines.next(),
        Some(guest_kernel_release().as_str()),
        "uname -r in the container is the guest's"
    );
    assert_ne!(guest_kernel_release(), host_kernel_release());
    assert_eq!(lines.next(), Some("to-stdout"));
    assert!(stderr.contains("to-stderr"), "{stderr}");
    // The shim's own logs and the agent's reach containerd's log.
    let log = c.log();
    assert!(log.contains("husk shim serving"), "shim log missing");
    assert!(log.contains("husk::guest"), "agent log lines missing");
    assert!(log.contains("agent ready"), "sandbox lifecycle missing");
    assert_clean(&c);
}

/// ctr 1.6 always attaches stdin to an attached `ctr run` (it has no `-i`).
#[test]
fn stdin_reaches_the_container() {
    let c = ctrd();
    let mut child = c
        .ctr_command(&run_args(
            &[],
            "stdin",
            &["sh", "-c", "tr a-z A-Z; echo done"],
        ))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"hello from the host\n").unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        c.diagnostics()
    );
    assert_eq!(stdout, "HELLO FROM THE HOST\ndone\n");
    assert_clean(&c);
}

#[test]
fn terminal_gets_a_tty() {
    let c = ctrd();
    let pty = nix::pty::openpty(None, None).unwrap();
    let slave = std::fs::File::from(pty.slave);
    let mut child = c
        .ctr_command(&run_args(
            &["-t"],
            "tty",
            &["sh", "-c", "tty; [ -t 0 ] && echo stdin-is-a-tty"],
        ))
        .stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(slave)
        .spawn()
        .unwrap();
    let status = child.wait().unwrap();
    let mut master = std::fs::File::from(pty.master);
    let mut output = Vec::new();
    // Everything the container wrote is buffered in the pty; read what's there.
    nix::fcntl::fcntl(
        &master,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )
    .unwrap();
    let mut buf = [0u8; 4096];
    while let Ok(n) = master.read(&mut buf) {
        if n == 0 {
            break;
        }
        output.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&output);
    assert!(status.success(), "{text}\n{}", c.diagnostics());
    assert!(
        text.contains("/dev/pts/"),
        "tty inside the container: {text}"
    );
    assert!(text.contains("stdin-is-a-tty"), "{text}");
    assert_clean(&c);
}

#[test]
fn missing_command_is_a_clear_error() {
    let c = ctrd();
    let out = c.ctr(&run_args(&[], "nocmd", &["/no/such/binary"]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("/no/such/binary"),
        "error should name the command: {stderr}\n{}",
        c.diagnostics()
    );
    // The failed create leaves nothing behind once ctr cleaned up.
    let _ = c.ctr(&["containers", "rm", "nocmd"]);
    assert_clean(&c);
}

/// Two long-running containers (two VMs) at once: exec, pause/resume,
/// metrics, ps, signals. Each runs attached (`ctr run --rm` in the
/// background), so ctr's exit status is the task's.
#[test]
fn exec_pause_metrics_and_signals_on_two_containers() {
    let c = ctrd();
    let script = "trap 'exit 42' TERM; while true; do sleep 1; done";
    let mut runs: Vec<_> = ["long1", "long2"]
        .iter()
        .map(|id| {
            c.ctr_command(&run_args(&[], id, &["sh", "-c", script]))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(600);
    loop {
        let tasks = c.ctr_ok(&["tasks", "ls"]);
        if tasks.matches("RUNNING").count() == 2 {
            break;
        }
        for run in &mut runs {
            if let Ok(Some(status)) = run.try_wait() {
                panic!("a container ended early ({status}):\n{}", c.diagnostics());
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "tasks did not start: {tasks}\n{}",
            c.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    let exec = c.ctr_ok(&[
        "tasks",
        "exec",
        "--exec-id",
        "e1",
        "long1",
        "sh",
        "-c",
        "echo exec-output",
    ]);
    assert_eq!(exec, "exec-output\n");
    let exec_status = c.ctr(&[
        "tasks",
        "exec",
        "--exec-id",
        "e2",
        "long1",
        "sh",
        "-c",
        "exit 7",
    ]);
    assert_eq!(exec_status.status.code(), Some(7));

    c.ctr_ok(&["tasks", "pause", "long1"]);
    assert!(c
        .ctr_ok(&["tasks", "ls"])
        .lines()
        .any(|l| l.starts_with("long1") && l.contains("PAUSED")));
    c.ctr_ok(&["tasks", "resume", "long1"]);
    assert!(c
        .ctr_ok(&["tasks", "ls"])
        .lines()
        .any(|l| l.starts_with("long1") && l.contains("RUNNING")));

    let metrics = c.ctr_ok(&["tasks", "metrics", "long1"]);
    let usage: u64 = metrics
        .lines()
        .find(|l| l.trim_start().starts_with("memory.usage"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(usage > 0, "real memory usage expected in:\n{metrics}");
    let ps = c.ctr_ok(&["tasks", "ps", "long1"]);
    assert!(ps.lines().count() >= 2, "{ps}");

    // SIGTERM runs the trap: exit 42. SIGKILL: 128 + 9.
    c.ctr_ok(&["tasks", "kill", "-s", "SIGTERM", "long1"]);
    c.ctr_ok(&["tasks", "kill", "-s", "SIGKILL", "long2"]);
    let codes: Vec<_> = runs
        .into_iter()
        .map(|run| run.wait_with_output().unwrap().status.code())
        .collect();
    assert_eq!(codes, [Some(42), Some(137)], "{}", c.diagnostics());
    assert_clean(&c);
}

/// Waits until task `id` runs; panics with diagnostics after `timeout`.
fn wait_running(c: &Containerd, id: &str, timeout: Duration) {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let ls = c.ctr_ok(&["tasks", "ls"]);
        if ls
            .lines()
            .any(|l| l.starts_with(id) && l.contains("RUNNING"))
        {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{id} did not start: {ls}\n{}",
            c.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// A shim killed with SIGKILL takes its VM with it; containerd then runs
/// `containerd-shim-husk-v2 delete`, which must remove the mounts and the
/// sandbox directory from the state the shim persisted.
#[test]
fn delete_after_a_crashed_shim_cleans_up() {
    let c = ctrd();
    let run = c
        .ctr_command(&run_args(&[], "crash", &["sleep", "3600"]))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_running(&c, "crash", Duration::from_secs(600));
    assert!(
        !c.husk_mounts().is_empty(),
        "the running container has its rootfs mounted"
    );
    let pid = shim_pid("containerd-shim-husk-v2", "crash").expect("shim process");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // ctr's own Wait breaks with the connection; containerd notices the dead
    // shim, runs `shim delete` and marks the task stopped.
    let out = run.wait_with_output().unwrap();
    assert!(!out.status.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while c
        .ctr_ok(&["tasks", "ls"])
        .lines()
        .any(|l| l.starts_with("crash") && l.contains("RUNNING"))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "task still running after its shim died\n{}",
            c.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    // `ctr run --rm` may already have removed them.
    let _ = c.ctr(&["tasks", "rm", "-f", "crash"]);
    let _ = c.ctr(&["containers", "rm", "crash"]);
    assert_clean(&c);
}

/// Bad configuration and options fail at create with an error naming the
/// problem, and leave nothing behind.
#[test]
fn missing_kernel_and_unknown_runtime_options_are_clear_errors() {
    let missing = std::path::Path::new("/nonexistent/husk/vmlinux");
    let c = Containerd::start_with("", missing);
    c.import_test_image("default");
    let out = c.ctr(&run_args(&[], "nokernel", &["true"]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("/nonexistent/husk/vmlinux"),
        "error should name the kernel: {stderr}"
    );
    let _ = c.ctr(&["containers", "rm", "nokernel"]);

    // The runtime option ctr can send for husk (ConfigPath): a missing file
    // and a file with an unknown key are both named.
    let out = c.ctr(&run_args(
        &["--runtime-config-path", "/nonexistent/husk.toml"],
        "noconfig",
        &["true"],
    ));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("/nonexistent/husk.toml"),
        "error should name the config: {stderr}"
    );
    let _ = c.ctr(&["containers", "rm", "noconfig"]);
    let typo = c.dir.path().join("typo.toml");
    std::fs::write(&typo, "[hypervisor]\nvcpu = 2\n").unwrap();
    let out = c.ctr(&run_args(
        &["--runtime-config-path", typo.to_str().unwrap()],
        "typo",
        &["true"],
    ));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("vcpu"),
        "error should name the unknown key: {stderr}"
    );
    let _ = c.ctr(&["containers", "rm", "typo"]);
    assert_clean(&c);
}

/// `husk check` passes on this machine with containerd and the shim on PATH.
#[test]
fn husk_check_passes() {
    let c = Containerd::start("");
    let husk = shim_dir().join("husk");
    let path = format!(
        "{}:{}",
        shim_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = std::process::Command::new(&husk)
        .arg("check")
        .env("PATH", path)
        .env("HUSK_CONFIG", c.dir.path().join("husk.toml"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    for what in [
        "/dev/kvm",
        "KVM capabilities",
        "config",
        "guest kernel",
        "guest initramfs",
        "shim on PATH",
        "containerd",
    ] {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with("PASS") && l.contains(what)),
            "no PASS for {what}:\n{stdout}"
        );
    }
    assert!(stdout.contains("host profile"), "{stdout}");
}

/// Large output arrives byte-exact through the whole path: the guest's
/// pipe, the agent, vsock, the shim and containerd's FIFO. (4 MiB: on nested
/// hosts every byte is copied by emulated guest kernel code several times;
/// the shim's side of a 100 MiB stream is tested in shim/src/io.rs.)
#[test]
fn large_output_arrives_byte_exact() {
    use sha2::{Digest, Sha256};
    const SIZE: usize = 4 << 20;
    let c = ctrd();
    // A position-revealing pattern rather than zeros.
    let script = format!("seq 1 2000000 | head -c {SIZE}");
    let out = c.ctr(&run_args(&[], "big", &["sh", "-c", &script]));
    assert!(out.status.success(), "{}", c.diagnostics());
    let mut expected = Vec::with_capacity(SIZE + 16);
    for i in 1.. {
        expected.extend_from_slice(format!("{i}\n").as_bytes());
        if expected.len() >= SIZE {
            break;
        }
    }
    expected.truncate(SIZE);
    assert_eq!(out.stdout.len(), SIZE, "bytes received");
    assert_eq!(
        Sha256::digest(&out.stdout),
        Sha256::digest(&expected),
        "content differs"
    );
    assert_clean(&c);
}
