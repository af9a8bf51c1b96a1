//! What one container create + start costs the agent, measured on the host
//! agent (see `common`): wall time of each RPC, page faults and CPU of the
//! agent and its reaped children (`/proc/<pid>/stat`), and, in a second run
//! under `strace -f -c`, the syscalls by type and the clones. Prints, never
//! asserts: timings are not test material.
//!
//! ```sh
//! cargo test -p husk-agent --test measure -- --ignored --nocapture
//! # the guest's optimised build instead of the debug one:
//! HUSK_AGENT_BIN=target/x86_64-unknown-linux-gnu/agent/husk-agent \
//!     cargo test -p husk-agent --test measure -- --ignored --nocapture
//! ```
//!
//! Needs root and strace. At `--log-level=debug` the agent itself logs
//! the wall time and page faults of each create and start ("create cost",
//! "start cost").

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// The agent's counters (its threads and its waited-for children).
#[derive(Clone, Copy, Debug, Default)]
struct Stat {
    minflt: u64,
    majflt: u64,
    /// utime + stime, clock ticks.
    cpu: u64,
}

fn stat(pid: i32) -> Stat {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after "(comm)": state is field 3, minflt 10, cminflt 11,
    // majflt 12, cmajflt 13, utime 14, stime 15, cutime 16, cstime 17.
    let rest = &text[text.rfind(')').unwrap() + 2..];
    let f: Vec<u64> = rest
        .split(' ')
        .skip(1)
        .take(15)
        .map(|s| s.parse().unwrap_or(0))
        .collect();
    let at = |n: usize| f[n - 4];
    Stat {
        minflt: at(10) + at(11),
        majflt: at(12) + at(13),
        cpu: at(14) + at(15) + at(16) + at(17),
    }
}

/// Creates and starts a container running `true`; returns the wall times
/// of the two RPCs.
async fn create_and_start(
    agent: &TestAgent,
    client: &husk_protocol::AgentServiceClient,
    id: &str,
) -> (Duration, Duration) {
    let spec = spec(process(&["true"]));
    let req = create_request(id, &agent.rootfs, &spec, stdio(false, false, false, false));
    let t0 = Instant::now();
    client.create_container(ctx(), &req).await.unwrap();
    let t1 = Instant::now();
    start(client, id).await;
    (t1 - t0, t1.elapsed())
}

async fn wait_and_remove(client: &husk_protocol::AgentServiceClient, id: &str) {
    assert_eq!(wait(client, id, "").await.exit_status, 0);
    remove(client, id).await;
}

#[tokio::test(flavor = "current_thread")]
#[ignore = "measurement: run by hand with --ignored --nocapture, as root"]
async fn cost_of_one_container_create_and_start() {
    // The guest's default level: what libcontainer logs at debug is not
    // formatted or written.
    let agent = TestAgent::start_logging("info");
    let client = agent.client().await;
    let pid = agent.agent_pid();
    // The first container warms the agent (lazy statics, page cache).
    create_and_start(&agent, &client, "warm").await;
    wait_and_remove(&client, "warm").await;

    for n in 0..5 {
        let id = format!("m{n}");
        // Apart, as real creates are: back to back, the kernel's RCU state
        // from the last one would still make a cgroup migration cheap.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let before = stat(pid);
        let (create, start) = create_and_start(&agent, &client, &id).await;
        // Waited for: the container's init is reaped, its counts are in.
        assert_eq!(wait(&client, &id, "").await.exit_status, 0);
        let after = stat(pid);
        remove(&client, &id).await;
        println!(
            "run {n}: create {create:?} start {start:?}; agent+children: \
             minflt {} majflt {} cpu {} ticks",
            after.minflt - before.minflt,
            after.majflt - before.majflt,
            after.cpu - before.cpu,
        );
    }

    // What a fork of the agent copies (page tables of its resident memory).
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let memory: Vec<&str> = status
        .lines()
        .filter(|l| {
            ["VmRSS", "RssAnon", "RssFile", "VmPTE", "Threads"]
                .iter()
                .any(|k| l.starts_with(k))
        })
        .collect();
    println!(
        "agent before the traced run: {}",
        memory.join(", ").replace('\t', " ")
    );

    // HUSK_MEASURE_TOOL: another command to attach instead, `{pid}` for the
    // agent's pid, stopped with SIGINT (e.g. `strace -ff -tt -o /tmp/t -p
    // {pid}` for a trace per process, `perf record -e page-faults -c 1 -g
    // -o /tmp/pf.data -p {pid}` for where the page faults are).
    let out = agent.sock.with_file_name("strace.txt");
    let tool = std::env::var("HUSK_MEASURE_TOOL").ok();
    let argv: Vec<String> = match &tool {
        Some(cmd) => cmd
            .split_whitespace()
            .map(|a| a.replace("{pid}", &pid.to_string()))
            .collect(),
        None => [
            "strace",
            "-f",
            "-c",
            "-S",
            "calls",
            "-U",
            "name,calls,errors",
            "-o",
        ]
        .into_iter()
        .map(String::from)
        .chain([out.display().to_string(), "-p".into(), pid.to_string()])
        .collect(),
    };
    let mut strace = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e} (apt-get install strace)", argv[0]));
    // Time to attach to the agent's threads.
    std::thread::sleep(Duration::from_millis(500));
    create_and_start(&agent, &client, "traced").await;
    assert_eq!(wait(&client, "traced", "").await.exit_status, 0);
    // SIGINT: strace (perf) detaches and writes its summary.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(strace.id()).unwrap()),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    strace.wait().unwrap();
    remove(&client, "traced").await;
    if tool.is_none() {
        println!(
            "strace -f -c of create+start+wait (agent threads and every child):\n{}",
            std::fs::read_to_string(&out).unwrap()
        );
    }
}
