//! `ctr run --runtime io.containerd.husk.v2` through a real containerd: each
//! task is a real microVM. Run one at a time (`make test-vm`).
//!
//! Each test starts its own containerd and imports a locally built busybox
//! image. VM boots dominate the time (30-300 s each on nested KVM hosts), so
//! checks that need no VM of their own share one, and tasks restore the
//! suite's template where a boot is not what is tested.

use std::io::{BufRead, Read, Write};
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
    let deadline = std::time::Instant::now() + op_timeout();
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

/// Bytes the one-shot task writes after its text lines (4 MiB: on nested
/// hosts every byte is copied by emulated guest kernel code several times;
/// the shim's side of a 100 MiB stream is tested in shim/src/io.rs).
const LARGE_OUTPUT: usize = 4 << 20;

/// A one-shot `ctr run` of task `id` whose guest boots (its shape's
/// template is gone): stdout and stderr, stdin reaching the container,
/// large output byte-exact through the guest's pipe, the agent, vsock, the
/// shim and containerd's FIFO, the exit code, the guest kernel, and the
/// logs of the shim and the agent in containerd's log.
fn one_shot_run_output_stdin_and_exit_code(c: &Containerd, id: &str) {
    use sha2::{Digest, Sha256};
    // `seq` gives a position-revealing pattern rather than zeros.
    let script = format!(
        "uname -r; echo to-stdout; echo to-stderr >&2; tr a-z A-Z; \
         seq 1 2000000 | head -c {LARGE_OUTPUT}; exit 3"
    );
    let mut child = c
        .ctr_command(&run_args(&[], id, &["sh", "-c", &script]))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // ctr 1.6 always attaches stdin to an attached `ctr run` (it has no -i).
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"hello from the host\n").unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(3),
        "stderr: {stderr}\n{}",
        c.diagnostics()
    );
    let text_len = out
        .stdout
        .iter()
        .enumerate()
        .filter(|(_, b)| **b == b'\n')
        .nth(2)
        .map_or(0, |(i, _)| i + 1);
    let text = String::from_utf8_lossy(&out.stdout[..text_len]);
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some(guest_kernel_release().as_str()),
        "uname -r in the container is the guest's"
    );
    assert_ne!(guest_kernel_release(), host_kernel_release());
    assert_eq!(lines.next(), Some("to-stdout"));
    assert_eq!(
        lines.next(),
        Some("HELLO FROM THE HOST"),
        "stdin reached tr"
    );
    assert!(stderr.contains("to-stderr"), "{stderr}");

    let large = &out.stdout[text_len..];
    let mut expected = Vec::with_capacity(LARGE_OUTPUT + 16);
    for i in 1.. {
        expected.extend_from_slice(format!("{i}\n").as_bytes());
        if expected.len() >= LARGE_OUTPUT {
            break;
        }
    }
    expected.truncate(LARGE_OUTPUT);
    assert_eq!(large.len(), LARGE_OUTPUT, "bytes received");
    assert_eq!(
        Sha256::digest(large),
        Sha256::digest(&expected),
        "content differs"
    );

    // The shim's own logs and the agent's reach containerd's log.
    let log = c.log();
    assert!(log.contains("husk shim serving"), "shim log missing");
    assert!(log.contains("husk::guest"), "agent log lines missing");
    assert!(log.contains("agent ready"), "sandbox lifecycle missing");
    assert!(
        log.contains("after the VM started"),
        "the guest was booted, not restored"
    );
}

/// Two tasks whose guests were restored from one template (the suite's:
/// `template_dir`) are each their own: different random UUIDs, boot ids
/// and getrandom bytes, and the host's wall clock (within a second), not
/// the template's; and each guest kernel reseeded its RNG on its new VM
/// generation ID (checked where the CPU has RDRAND: there the template's
/// RNG was ready when saved, so the kernel logs the reseed). Then the
/// template is damaged, and a one-shot task boots its guest instead (the
/// cold path, see
/// [`one_shot_run_output_stdin_and_exit_code`]).
#[test]
fn restored_guests_are_each_their_own() {
    let c = ctrd();
    let script = "cat /proc/sys/kernel/random/uuid /proc/sys/kernel/random/boot_id; \
                  head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; date +%s; \
                  grep -q -w rdrand /proc/cpuinfo && echo rdrand || echo no-rdrand; \
                  dmesg | grep -c 'crng reseeded due to virtual machine fork' || true";
    let mut seen = Vec::new();
    for id in ["clone1", "clone2"] {
        let before = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let out = c.ctr(&run_args(&["--rm"], id, &["sh", "-c", script]));
        let after = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{text}\n{}", c.diagnostics());
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        assert_eq!(lines.len(), 6, "{text}");
        let guest_time: u64 = lines[3].parse().unwrap();
        assert!(
            before.saturating_sub(1) <= guest_time && guest_time <= after + 1,
            "the guest's clock {guest_time} is not the host's ({before}..{after})"
        );
        if lines[4] == "rdrand" {
            assert_eq!(
                lines[5],
                "1",
                "restored guest {id} did not reseed on its new VM generation ID\n{}",
                c.diagnostics()
            );
        }
        seen.push(lines);
    }
    for (what, i) in [("random uuid", 0), ("boot id", 1), ("getrandom bytes", 2)] {
        assert_ne!(
            seen[0][i], seen[1][i],
            "two restored guests share their {what}"
        );
    }
    let log = c.log();
    assert_eq!(
        log.matches("after the VM was restored").count(),
        2,
        "both guests were restored from the template\n{}",
        c.diagnostics()
    );

    // A damaged template (here its memory file cut short) is not restored:
    // the task boots instead, the log says why, and the template is
    // discarded for the next task to rebuild. (Last of this file's tests,
    // which run in name order: none after it needs the template.) That
    // task is the suite's one `ctr run` whose guest boots: the cold path
    // end to end (with templates off it is the same path; the shim killed
    // mid-boot runs with them off).
    // The suite's template dir holds a template per shape (the CRI tests'
    // too): damage the one the clones were restored from, named in the log.
    let template = restored_from(&log).expect("the log names the template the clones came from");
    assert!(
        template.starts_with(template_dir()) && template.join("memory").is_file(),
        "{} is not a template of the suite's",
        template.display()
    );
    std::fs::OpenOptions::new()
        .write(true)
        .open(template.join("memory"))
        .unwrap()
        .set_len(4096)
        .unwrap();
    one_shot_run_output_stdin_and_exit_code(&c, "clone3");
    let log = c.log();
    assert!(
        log.contains("too short") && log.contains("discarding it and booting instead"),
        "{}",
        c.diagnostics()
    );
    assert!(!template.exists(), "the damaged template was discarded");
    assert_clean(&c);
}

/// The template directory of the last "VM restored from <dir> in …" line.
fn restored_from(log: &str) -> Option<std::path::PathBuf> {
    let (_, rest) = log
        .lines()
        .rev()
        .find_map(|l| l.split_once("VM restored from "))?;
    Some(std::path::PathBuf::from(rest.rsplit_once(" in ")?.0))
}

/// A create that fails in the guest (the command does not exist) is a
/// clear error naming the command, and tears its VM down: nothing is left.
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

/// Reads what is buffered on a pty master without blocking.
fn drain_pty(master: &mut std::fs::File) -> String {
    nix::fcntl::fcntl(
        &*master,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )
    .unwrap();
    let mut output = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n @ 1..) = master.read(&mut buf) {
        output.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&output).into_owned()
}

/// Three long-running tasks (three VMs) at once. `long1` runs on a terminal
/// (`ctr run -t`) and gets execs (output, exit codes, a missing binary, a
/// SIGKILLed exec, a SIGTERM its trap turns into exit 42, a vsock probe),
/// pause/resume, metrics and ps; then its shim gets SIGTERM and must end
/// cleanly. `long2`'s shim is killed with SIGKILL, taking its VM with it;
/// containerd then runs `containerd-shim-husk-v2 delete`, which must remove
/// the mounts and the sandbox directory from the state the shim persisted.
/// `long3`'s agent is made unresponsive, and a SIGKILL still ends it.
#[test]
fn long_running_tasks_tty_exec_pause_metrics_signals_and_a_crashed_shim() {
    let mut c = ctrd();
    let pty = nix::pty::openpty(None, None).unwrap();
    let slave = std::fs::File::from(pty.slave);
    let mut master = std::fs::File::from(pty.master);
    // Waiting in `wait` (not a sleep loop: every fork is slow where guest
    // kernel code is emulated), so the trap runs as soon as TERM arrives.
    let script = "tty; [ -t 0 ] && echo stdin-is-a-tty; trap 'exit 42' TERM; \
                  sleep 2147483647 & wait";
    let long1 = c
        .ctr_command(&run_args(&["-t"], "long1", &["sh", "-c", script]))
        .stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(slave)
        .spawn()
        .unwrap();
    let [long2, long3] = ["long2", "long3"].map(|id| {
        c.ctr_command(&run_args(&[], id, &["sleep", "3600"]))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    });
    for id in ["long1", "long2", "long3"] {
        wait_running(&c, id, boot_timeout());
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
    let missing = c.ctr(&[
        "tasks",
        "exec",
        "--exec-id",
        "e3",
        "long1",
        "/no/such/binary",
    ]);
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(!missing.status.success());
    assert!(
        stderr.contains("/no/such/binary"),
        "an exec of a missing binary names it: {stderr}"
    );
    // An exec killed with SIGKILL exits 128 + 9. It says when it runs.
    signal_exec(&c, "e4", "echo ready; exec sleep 3600", "SIGKILL", 137);

    // A container cannot reach the agent (or any guest listener) over
    // vsock: not through loopback (CID 1), not through the guest's own CID
    // (3), and the host's CID (2) leads to the host, where nothing listens
    // on the agent's ports.
    let probe = c.ctr(&[
        "tasks",
        "exec",
        "--exec-id",
        "probe",
        "long1",
        "husk-probe",
        "vsock-connect",
        "1:1024",
        "3:1024",
        "2:1024",
        "1:1026",
        "3:1026",
        "2:1026",
    ]);
    let report = String::from_utf8_lossy(&probe.stdout);
    assert_eq!(
        probe.status.code(),
        Some(0),
        "a container reached a vsock port:\n{report}{}",
        String::from_utf8_lossy(&probe.stderr)
    );
    assert_eq!(report.matches("refused").count(), 6, "{report}");

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

    // SIGTERM reaches a process and runs its trap: exit 42.
    // (The sleep must not hold the exec's stdout: an exit is reported once
    // all of the process's output is delivered.)
    signal_exec(
        &c,
        "e5",
        "trap 'exit 42' TERM; echo ready; sleep 2147483647 >/dev/null 2>&1 & wait",
        "SIGTERM",
        42,
    );

    // SIGTERM to long1's shim ends it cleanly and promptly (VM stopped,
    // state removed): a shim must not outlive a TERM with its VM running.
    let pid = shim_pid("containerd-shim-husk-v2", "long1").expect("shim process");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid fits pid_t")),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let mut long1 = long1;
    let status = long1.wait().unwrap();
    assert!(!status.success());
    let deadline = std::time::Instant::now() + op_timeout();
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the shim ignored SIGTERM\n{}",
            c.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        c.log().contains("SIGTERM: stopping the VM and exiting"),
        "{}",
        c.diagnostics()
    );
    let text = drain_pty(&mut master);
    assert!(
        text.contains("/dev/pts/"),
        "tty inside the container: {text}"
    );
    assert!(text.contains("stdin-is-a-tty"), "{text}");

    // containerd restarts while long2 and long3 run: the shims live on,
    // containerd finds them again, their task API serves, and exits still
    // reach containerd (the shim's event publisher reconnects).
    c.restart();
    let events = EventWatch::start(&c);
    let tasks = c.ctr_ok(&["tasks", "ls"]);
    for id in ["long2", "long3"] {
        assert!(
            tasks
                .lines()
                .any(|l| l.starts_with(id) && l.contains("RUNNING")),
            "{id} after containerd restarted:\n{tasks}"
        );
    }
    let after = c.ctr_ok(&[
        "tasks",
        "exec",
        "--exec-id",
        "after-restart",
        "long2",
        "echo",
        "still-serving",
    ]);
    assert_eq!(after, "still-serving\n");

    // long2: its shim dies with SIGKILL.
    assert!(
        !c.husk_mounts().is_empty(),
        "the running container has its rootfs mounted"
    );
    let pid = shim_pid("containerd-shim-husk-v2", "long2").expect("shim process");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid fits pid_t")),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // ctr's own Wait broke with containerd's restart; containerd notices
    // the dead shim, runs `shim delete` and marks the task stopped.
    let out = long2.wait_with_output().unwrap();
    assert!(!out.status.success());
    let deadline = std::time::Instant::now() + op_timeout();
    while c
        .ctr_ok(&["tasks", "ls"])
        .lines()
        .any(|l| l.starts_with("long2") && l.contains("RUNNING"))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "task still running after its shim died\n{}",
            c.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    // long3: its agent stops answering (its only vCPU stopped from the
    // host). A SIGKILL must still end the task: after the kill grace the
    // VM is stopped and the exit reported (137).
    let pid = shim_pid("containerd-shim-husk-v2", "long3").expect("shim process");
    let vcpu = thread_named(pid, "husk-vcpu0").expect("vCPU thread");
    let frozen = nix::unistd::Pid::from_raw(i32::try_from(vcpu).expect("tid fits pid_t"));
    nix::sys::ptrace::seize(frozen, nix::sys::ptrace::Options::empty()).unwrap();
    nix::sys::ptrace::interrupt(frozen).unwrap();
    nix::sys::wait::waitpid(frozen, Some(nix::sys::wait::WaitPidFlag::__WALL)).unwrap();
    c.ctr_ok(&["tasks", "kill", "-s", "SIGKILL", "long3"]);
    // Its `ctr run` lost containerd at the restart: the exit is seen as the
    // event the shim published to the new containerd.
    let exit = events.wait_for(host_timeouts().kill_grace + op_timeout(), |e| {
        e.contains("/tasks/exit") && e.contains("\"container_id\":\"long3\"")
    });
    assert!(
        exit.as_deref()
            .is_some_and(|e| e.contains("\"exit_status\":137")),
        "long3's exit (137) after containerd restarted: {exit:?}\n{}",
        c.diagnostics()
    );
    let _ = long3.wait_with_output();
    assert!(
        c.log().contains("the guest does not answer"),
        "the exit came from the kill boundary\n{}",
        c.diagnostics()
    );
    // Let the vCPU thread go, so the VM's teardown can finish.
    nix::sys::ptrace::detach(frozen, None).unwrap();

    // `ctr run --rm` may already have removed them.
    for id in ["long2", "long3"] {
        let _ = c.ctr(&["tasks", "rm", "-f", id]);
        let _ = c.ctr(&["containers", "rm", id]);
    }
    assert_clean(&c);
}

/// `ctr events` of a containerd, read on a thread.
struct EventWatch {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl EventWatch {
    fn start(c: &Containerd) -> EventWatch {
        let mut child = c
            .ctr_command(&["events"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        EventWatch { child, lines }
    }

    /// The first event line `matches` accepts, within `timeout`.
    fn wait_for(&self, timeout: Duration, matches: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if matches(&line) => return Some(line),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }
}

impl Drop for EventWatch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `script` as exec `exec_id` of long1, waits for it to print
/// "ready", sends it `signal` and checks that it exits with `code`.
fn signal_exec(c: &Containerd, exec_id: &str, script: &str, signal: &str, code: i32) {
    let mut exec = c
        .ctr_command(&[
            "tasks",
            "exec",
            "--exec-id",
            exec_id,
            "long1",
            "sh",
            "-c",
            script,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    std::io::BufReader::new(exec.stdout.as_mut().unwrap())
        .read_line(&mut ready)
        .unwrap();
    assert_eq!(ready, "ready\n", "{}", c.diagnostics());
    c.ctr_ok(&["tasks", "kill", "-s", signal, "--exec-id", exec_id, "long1"]);
    let out = exec.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(code),
        "{exec_id}: {}",
        c.diagnostics()
    );
}

/// The thread of process `pid` named `name`.
fn thread_named(pid: u32, name: &str) -> Option<u32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
        .find(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == name))
        .and_then(|t| t.file_name().to_str()?.parse().ok())
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

    // The filesystem under husk's state dir is full: a clear error, and
    // no half-made sandbox left in it.
    let full = c.dir.path().join("full");
    std::fs::create_dir(&full).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &full,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=64k"),
    )
    .unwrap();
    let unmount = Unmount(full.clone());
    let filler = full.join("filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    while f.write_all(&[0u8; 4096]).is_ok() {}
    drop(f);
    let full_config = c.dir.path().join("full.toml");
    std::fs::write(
        &full_config,
        format!(
            "[hypervisor]\nkernel = {:?}\ninitrd = {:?}\n[runtime]\nstate_dir = {:?}\n",
            guest_kernel(),
            guest_initrd(),
            full.join("state")
        ),
    )
    .unwrap();
    let out = c.ctr(&run_args(
        &["--runtime-config-path", full_config.to_str().unwrap()],
        "nospace",
        &["true"],
    ));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("No space left on device") && stderr.contains(full.to_str().unwrap()),
        "error should say the disk under the state dir is full: {stderr}\n{}",
        c.diagnostics()
    );
    let _ = c.ctr(&["containers", "rm", "nospace"]);
    let left: Vec<_> = walk(&full.join("state"));
    assert!(left.is_empty(), "a half-made sandbox is left: {left:?}");
    drop(unmount);
    assert_clean(&c);
}

/// Unmounts its path when dropped.
struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Every file (not directory) below `dir`.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .flat_map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => walk(&e.path()),
            _ => vec![e.path()],
        })
        .collect()
}

/// The shim is killed (SIGKILL) while its task's VM boots: containerd's
/// `shim delete` then removes everything the shim had made on the host
/// (the sandbox directory with its mounted share, the task's cgroup).
#[test]
fn a_shim_killed_while_its_vm_boots_leaves_nothing_behind() {
    // A boot, not a restore (that takes milliseconds): the shim is killed
    // while its guest boots, before the agent answers.
    let c = Containerd::start_with_options(&ContainerdOptions {
        husk_hypervisor: "template = \"off\"".into(),
        ..ContainerdOptions::new("")
    });
    c.import_test_image("default");
    let run = c
        .ctr_command(&run_args(&[], "midcreate", &["true"]))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The VM is up (its vCPU thread runs) and the share is mounted.
    let deadline = std::time::Instant::now() + op_timeout();
    let pid = loop {
        let booting = shim_pid("containerd-shim-husk-v2", "midcreate")
            .filter(|pid| thread_named(*pid, "husk-vcpu0").is_some());
        if let (Some(pid), false) = (booting, c.husk_mounts().is_empty()) {
            break pid;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the VM did not start\n{}",
            c.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let cgroups: Vec<_> = cgroups_of(pid)
        .into_iter()
        .filter(|d| d.ends_with("midcreate"))
        .collect();
    assert!(!cgroups.is_empty(), "the VM runs in the task's cgroup");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid fits pid_t")),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let out = run.wait_with_output().unwrap();
    assert!(!out.status.success(), "the create cannot have succeeded");
    let _ = c.ctr(&["tasks", "rm", "-f", "midcreate"]);
    let _ = c.ctr(&["containers", "rm", "midcreate"]);
    assert_clean(&c);
    let left: Vec<_> = cgroups.iter().filter(|d| d.exists()).collect();
    assert!(left.is_empty(), "cgroups left behind: {left:?}");
}

/// The cgroup directories (every hierarchy) process `pid` is in, below
/// the hierarchies' roots.
fn cgroups_of(pid: u32) -> Vec<std::path::PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            if path == "/" {
                return None;
            }
            let hierarchy = match controllers {
                "" => "unified".to_string(),
                c => c.trim_start_matches("name=").to_string(),
            };
            let root = ["/sys/fs/cgroup", &hierarchy].join("/");
            let dir = if std::path::Path::new(&root).is_dir() {
                std::path::PathBuf::from(root)
            } else {
                std::path::PathBuf::from("/sys/fs/cgroup")
            };
            Some(dir.join(path.trim_start_matches('/')))
        })
        .filter(|d| d.is_dir())
        .collect()
}

/// `husk check` passes on this machine with containerd and the shim on PATH.
/// `husk check --boot` passes on this machine with containerd and the shim
/// on PATH: it says what kind of host this is and how fast guest kernel code
/// runs, boots a guest and reports the clocks its kernel chose.
#[test]
fn husk_check_passes_and_boots_a_guest() {
    let c = Containerd::start("");
    let husk = shim_dir().join("husk");
    let path = format!(
        "{}:{}",
        shim_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = std::process::Command::new(&husk)
        .args(["check", "--boot"])
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
        "guest boot",
        "guest clocks",
        "snapshot restore",
    ] {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with("PASS") && l.contains(what)),
            "no PASS for {what}:\n{stdout}"
        );
    }
    for what in ["host profile", "guest kernel speed", "agent timeouts"] {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with("INFO") && l.contains(what)),
            "no INFO for {what}:\n{stdout}"
        );
    }
    assert!(
        stdout.contains("clockevent lapic-deadline"),
        "the guest's tick comes from the LAPIC in TSC-deadline mode:\n{stdout}"
    );
    assert!(stdout.contains(&guest_kernel_release()), "{stdout}");
}
