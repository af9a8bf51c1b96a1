//! Containers through the real agent on the host (see `common`): the same
//! generated ttrpc client and stdio streams the shim uses with a VM.

mod common;

use common::*;
use husk_protocol::stdio::StdioKind;

#[tokio::test(flavor = "current_thread")]
async fn runs_a_container_and_reports_its_output_and_exit_code() {
    let agent = TestAgent::start();
    let client = agent.client().await;
    let spec = spec(process(&["sh", "-c", "echo hello; echo oops >&2; exit 3"]));
    let req = create_request("c1", &agent.rootfs, &spec, stdio(false, true, true, false));
    let resp = client.create_container(ctx(), &req).await.unwrap();
    assert!(resp.pid > 1);
    let out = agent.attach("c1", None, StdioKind::Stdout).await;
    let err = agent.attach("c1", None, StdioKind::Stderr).await;
    start(&client, "c1").await;
    let (out, err, exit) = tokio::join!(read_all(out), read_all(err), wait(&client, "c1", ""));
    assert_eq!(out, "hello\n");
    assert_eq!(err, "oops\n");
    assert_eq!(exit.exit_status, 3);
    assert!(exit.exited_at_unix_nanos > 0);
    remove(&client, "c1").await;
    assert!(!agent.container_cgroup("c1").exists());
}

/// A container whose init sleeps, for exec tests.
async fn sleeping_container(
    agent: &TestAgent,
    client: &husk_protocol::AgentServiceClient,
    id: &str,
) {
    let spec = spec(process(&["sleep", "1000"]));
    let req = create_request(id, &agent.rootfs, &spec, stdio(false, false, false, false));
    client.create_container(ctx(), &req).await.unwrap();
    start(client, id).await;
}

#[tokio::test(flavor = "current_thread")]
async fn exec_stdin_close_stdin_signals_and_exit_statuses() {
    let agent = TestAgent::start();
    let client = agent.client().await;
    sleeping_container(&agent, &client, "c1").await;

    // stdin to EOF by shutting down the stream.
    let req = exec_request(
        "c1",
        "cat1",
        &process(&["cat"]),
        stdio(true, true, false, false),
    );
    client.exec_process(ctx(), &req).await.unwrap();
    let mut input = agent.attach("c1", Some("cat1"), StdioKind::Stdin).await;
    let out = agent.attach("c1", Some("cat1"), StdioKind::Stdout).await;
    use tokio::io::AsyncWriteExt;
    input.write_all(b"through stdin\n").await.unwrap();
    input.shutdown().await.unwrap();
    let (out, exit) = tokio::join!(read_all(out), wait(&client, "c1", "cat1"));
    assert_eq!((out.as_str(), exit.exit_status), ("through stdin\n", 0));

    // CloseStdin: what already arrived is still delivered.
    let req = exec_request(
        "c1",
        "cat2",
        &process(&["cat"]),
        stdio(true, true, false, false),
    );
    client.exec_process(ctx(), &req).await.unwrap();
    let mut input = agent.attach("c1", Some("cat2"), StdioKind::Stdin).await;
    let out = agent.attach("c1", Some("cat2"), StdioKind::Stdout).await;
    input.write_all(b"before close\n").await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let mut close = husk_protocol::agent::CloseStdinRequest::new();
    close.container_id = "c1".into();
    close.exec_id = "cat2".into();
    client.close_stdin(ctx(), &close).await.unwrap();
    let (out, exit) = tokio::join!(read_all(out), wait(&client, "c1", "cat2"));
    assert_eq!((out.as_str(), exit.exit_status), ("before close\n", 0));

    // One process by signal: 128 + N.
    let req = exec_request(
        "c1",
        "s1",
        &process(&["sleep", "1000"]),
        stdio(false, false, false, false),
    );
    client.exec_process(ctx(), &req).await.unwrap();
    signal(&client, "c1", "s1", libc::SIGTERM, false).await;
    assert_eq!(
        wait(&client, "c1", "s1").await.exit_status,
        128 + libc::SIGTERM
    );
    // Signalling it again after it exited is not an error.
    signal(&client, "c1", "s1", libc::SIGTERM, false).await;
    // Waiting again gives the same answer.
    assert_eq!(wait(&client, "c1", "s1").await.exit_status, 143);

    // Every process of the container.
    for id in ["s2", "s3"] {
        let req = exec_request(
            "c1",
            id,
            &process(&["sleep", "1000"]),
            stdio(false, false, false, false),
        );
        client.exec_process(ctx(), &req).await.unwrap();
    }
    let mut list = husk_protocol::agent::ListProcessesRequest::new();
    list.container_id = "c1".into();
    let procs = client.list_processes(ctx(), &list).await.unwrap().processes;
    assert_eq!(procs.len(), 3, "{procs:?}");
    assert!(procs.iter().any(|p| p.init));
    assert!(procs.iter().any(|p| p.exec_id == "s2"));
    signal(&client, "c1", "", libc::SIGKILL, true).await;
    for id in ["", "s2", "s3"] {
        assert_eq!(wait(&client, "c1", id).await.exit_status, 137, "{id}");
    }

    // Exec into the stopped container.
    let req = exec_request(
        "c1",
        "late",
        &process(&["true"]),
        stdio(false, false, false, false),
    );
    let (code, msg) = code(client.exec_process(ctx(), &req).await);
    assert_eq!(code, ttrpc::Code::FAILED_PRECONDITION, "{msg}");
    assert!(msg.contains("c1") && msg.contains("stopped"), "{msg}");

    // No zombies left under the agent.
    let agent_pid = agent.agent_pid();
    let children =
        std::fs::read_to_string(format!("/proc/{agent_pid}/task/{agent_pid}/children")).unwrap();
    for child in children.split_whitespace() {
        let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
        assert!(!stat.contains(") Z "), "zombie: {stat}");
    }
    remove(&client, "c1").await;
}

#[tokio::test(flavor = "current_thread")]
async fn terminal_resize_and_tty_exec() {
    let agent = TestAgent::start();
    let client = agent.client().await;
    sleeping_container(&agent, &client, "c1").await;
    let mut p = process(&["sh", "-c", "read line; stty size; tty; exit 5"]);
    p["terminal"] = true.into();
    let req = exec_request("c1", "t1", &p, stdio(false, false, false, true));
    client.exec_process(ctx(), &req).await.unwrap();
    let mut resize = husk_protocol::agent::TtyWinResizeRequest::new();
    resize.container_id = "c1".into();
    resize.exec_id = "t1".into();
    resize.rows = 33;
    resize.columns = 77;
    client.tty_win_resize(ctx(), &resize).await.unwrap();
    let mut term = agent.attach("c1", Some("t1"), StdioKind::Terminal).await;
    use tokio::io::AsyncWriteExt;
    term.write_all(b"go\r").await.unwrap();
    let (out, exit) = tokio::join!(read_all(term), wait(&client, "c1", "t1"));
    assert!(out.contains("33 77"), "{out:?}");
    assert!(out.contains("/dev/pts/"), "{out:?}");
    assert_eq!(exit.exit_status, 5);

    // Resizing a process without a terminal is refused.
    let req = exec_request(
        "c1",
        "n1",
        &process(&["true"]),
        stdio(false, false, false, false),
    );
    client.exec_process(ctx(), &req).await.unwrap();
    resize.exec_id = "n1".into();
    let (code, _) = code(client.tty_win_resize(ctx(), &resize).await);
    assert_eq!(code, ttrpc::Code::FAILED_PRECONDITION);
    remove(&client, "c1").await;
}

#[tokio::test(flavor = "current_thread")]
async fn pause_and_resume_freeze_the_cgroup() {
    let agent = TestAgent::start();
    let client = agent.client().await;
    sleeping_container(&agent, &client, "c1").await;
    let events = agent.container_cgroup("c1").join("cgroup.events");
    let frozen = || {
        std::fs::read_to_string(&events)
            .unwrap()
            .contains("frozen 1")
    };
    assert!(!frozen());
    let mut pause = husk_protocol::agent::PauseContainerRequest::new();
    pause.container_id = "c1".into();
    client.pause_container(ctx(), &pause).await.unwrap();
    assert!(frozen());
    // No exec into a paused container; a second pause is refused.
    let req = exec_request(
        "c1",
        "e",
        &process(&["true"]),
        stdio(false, false, false, false),
    );
    assert_eq!(
        code(client.exec_process(ctx(), &req).await).0,
        ttrpc::Code::FAILED_PRECONDITION
    );
    assert_eq!(
        code(client.pause_container(ctx(), &pause).await).0,
        ttrpc::Code::FAILED_PRECONDITION
    );
    let mut resume = husk_protocol::agent::ResumeContainerRequest::new();
    resume.container_id = "c1".into();
    client.resume_container(ctx(), &resume).await.unwrap();
    assert!(!frozen());
    let req = exec_request(
        "c1",
        "e",
        &process(&["true"]),
        stdio(false, false, false, false),
    );
    client.exec_process(ctx(), &req).await.unwrap();
    assert_eq!(wait(&client, "c1", "e").await.exit_status, 0);
    // A paused container can still be removed.
    client.pause_container(ctx(), &pause).await.unwrap();
    remove(&client, "c1").await;
    assert!(!agent.container_cgroup("c1").exists());
}

#[tokio::test(flavor = "current_thread")]
async fn bad_input_gets_clear_errors_and_the_agent_keeps_serving() {
    use ttrpc::Code;
    let agent = TestAgent::start();
    let client = agent.client().await;
    let good = spec(process(&["sleep", "1000"]));
    let none = stdio(false, false, false, false);

    let mut req = create_request("c1", &agent.rootfs, &good, none.clone());
    req.spec_json = b"{\"ociVersion\": 1.0.2".to_vec();
    let (c, m) = code(client.create_container(ctx(), &req).await);
    assert_eq!(c, Code::INVALID_ARGUMENT, "{m}");
    assert!(m.contains("c1") && m.contains("spec JSON"), "{m}");

    let req = create_request("../evil", &agent.rootfs, &good, none.clone());
    let (c, m) = code(client.create_container(ctx(), &req).await);
    assert_eq!(c, Code::INVALID_ARGUMENT, "{m}");

    let missing = agent.rootfs.join("does-not-exist");
    let req = create_request("c1", &missing, &good, none.clone());
    let (c, m) = code(client.create_container(ctx(), &req).await);
    assert_eq!(c, Code::INVALID_ARGUMENT, "{m}");
    assert!(m.contains("does-not-exist"), "{m}");

    // A spec libcontainer rejects: process.args missing.
    let mut no_args = good.clone();
    no_args["process"].as_object_mut().unwrap().remove("args");
    let req = create_request("c1", &agent.rootfs, &no_args, none.clone());
    let (c, m) = code(client.create_container(ctx(), &req).await);
    assert_eq!(c, Code::INVALID_ARGUMENT, "{m}");
    assert!(m.contains("no args"), "{m}");

    // Terminal mismatch.
    let req = create_request("c1", &agent.rootfs, &good, stdio(false, false, false, true));
    assert_eq!(
        code(client.create_container(ctx(), &req).await).0,
        Code::INVALID_ARGUMENT
    );

    // Unknown ids.
    let mut start_req = husk_protocol::agent::StartContainerRequest::new();
    start_req.container_id = "nope".into();
    let (c, m) = code(client.start_container(ctx(), &start_req).await);
    assert_eq!(c, Code::NOT_FOUND);
    assert!(m.contains("nope"), "{m}");
    let mut w = husk_protocol::agent::WaitProcessRequest::new();
    w.container_id = "nope".into();
    assert_eq!(
        code(client.wait_process(ctx(), &w).await).0,
        Code::NOT_FOUND
    );

    // After all that, a good container still works; duplicates are refused.
    let req = create_request("c1", &agent.rootfs, &good, none.clone());
    client.create_container(ctx(), &req).await.unwrap();
    let (c, m) = code(client.create_container(ctx(), &req).await);
    assert_eq!(c, Code::ALREADY_EXISTS, "{m}");
    // Exec into a created (not started) container.
    let e = exec_request("c1", "e1", &process(&["true"]), none.clone());
    assert_eq!(
        code(client.exec_process(ctx(), &e).await).0,
        Code::FAILED_PRECONDITION
    );
    start(&client, "c1").await;
    assert_eq!(
        code(client.start_container(ctx(), &start_req).await).0,
        Code::NOT_FOUND
    );
    client.exec_process(ctx(), &e).await.unwrap();
    let (c, m) = code(client.exec_process(ctx(), &e).await);
    assert_eq!(c, Code::ALREADY_EXISTS, "{m}");
    let bad = exec_request("c1", "e2", &process(&["/no/such/binary"]), none.clone());
    let (c, m) = code(client.exec_process(ctx(), &bad).await);
    assert_ne!(c, Code::OK, "{m}");
    let mut bad_json = exec_request("c1", "e3", &process(&["true"]), none.clone());
    bad_json.process_json = b"nonsense".to_vec();
    assert_eq!(
        code(client.exec_process(ctx(), &bad_json).await).0,
        Code::INVALID_ARGUMENT
    );
    w.container_id = "c1".into();
    w.exec_id = "unknown".into();
    let (c, m) = code(client.wait_process(ctx(), &w).await);
    assert_eq!(c, Code::NOT_FOUND);
    assert!(m.contains("unknown"), "{m}");
    let mut s = husk_protocol::agent::SignalProcessRequest::new();
    s.container_id = "c1".into();
    s.signal = 4242;
    assert_eq!(
        code(client.signal_process(ctx(), &s).await).0,
        Code::INVALID_ARGUMENT
    );
    let mut u = husk_protocol::agent::UpdateContainerRequest::new();
    u.container_id = "c1".into();
    u.resources_json = b"{\"memory\": 5}".to_vec();
    assert_eq!(
        code(client.update_container(ctx(), &u).await).0,
        Code::INVALID_ARGUMENT
    );

    // Bad stdio headers are closed without an answer; good ones still work.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    for header in [
        "c1 - stdwhat\n",
        "nope - stdout\n",
        "c1 - stdout\n",
        "garbage",
    ] {
        let mut s = tokio::net::UnixStream::connect(&agent.io_sock)
            .await
            .unwrap();
        s.write_all(header.as_bytes()).await.unwrap();
        s.shutdown().await.unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.unwrap();
        assert!(buf.is_empty(), "{header:?}");
    }
    let check = client
        .check(ctx(), &husk_protocol::agent::CheckRequest::new())
        .await
        .unwrap();
    assert_eq!(check.agent_version, env!("CARGO_PKG_VERSION"));
    remove(&client, "c1").await;
}

#[tokio::test(flavor = "current_thread")]
async fn spec_user_env_cwd_rlimits_seccomp_and_mounts_apply() {
    let agent = TestAgent::start();
    let client = agent.client().await;
    let mut p = process(&[
        "sh",
        "-c",
        "id -u; id -g; echo HOME=$HOME; echo FOO=$FOO; pwd; ulimit -n; hostname; \
         grep NoNewPrivs /proc/self/status; mkdir /tmp/blocked || echo mkdir-denied; \
         grep -c ' /proc proc ' /proc/mounts; cat /proc/1/cmdline | tr '\\0' ' '; echo",
    ]);
    p["user"] = serde_json::json!({"uid": 1000, "gid": 1000});
    p["env"] = serde_json::json!(["PATH=/bin", "FOO=bar"]);
    p["cwd"] = "/tmp".into();
    let mut s = spec(p);
    s["linux"]["seccomp"] = serde_json::json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
    });
    let req = create_request("c1", &agent.rootfs, &s, stdio(false, true, true, false));
    client.create_container(ctx(), &req).await.unwrap();
    let out = agent.attach("c1", None, StdioKind::Stdout).await;
    let err = agent.attach("c1", None, StdioKind::Stderr).await;
    start(&client, "c1").await;
    let (out, err, exit) = tokio::join!(read_all(out), read_all(err), wait(&client, "c1", ""));
    assert_eq!(exit.exit_status, 0, "{out}\n{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        [
            "1000",
            "1000",
            "HOME=/home/user",
            "FOO=bar",
            "/tmp",
            "1024",
            "ctr",
            "NoNewPrivs:\t1",
            "mkdir-denied",
            "1",
            "sh -c id -u; id -g; echo HOME=$HOME; echo FOO=$FOO; pwd; ulimit -n; hostname; grep NoNewPrivs /proc/self/status; mkdir /tmp/blocked || echo mkdir-denied; grep -c ' /proc proc ' /proc/mounts; cat /proc/1/cmdline | tr '\\0' ' '; echo ",
        ],
        "{out}"
    );
    assert!(err.contains("mkdir"), "{err}");
    remove(&client, "c1").await;
}

#[tokio::test(flavor = "current_thread")]
async fn hundred_mib_of_stdout_arrive_byte_exact() {
    use tokio::io::AsyncReadExt;
    const SIZE: usize = 100 << 20;
    const LINE: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ\n";
    let agent = TestAgent::start();
    let client = agent.client().await;
    let line = std::str::from_utf8(&LINE[..LINE.len() - 1]).unwrap();
    let script = format!("yes {line} | head -c {SIZE}");
    let spec = spec(process(&["sh", "-c", &script]));
    let req = create_request(
        "big",
        &agent.rootfs,
        &spec,
        stdio(false, true, false, false),
    );
    client.create_container(ctx(), &req).await.unwrap();
    let mut out = agent.attach("big", None, StdioKind::Stdout).await;
    let started = std::time::Instant::now();
    start(&client, "big").await;
    // Compared chunk by chunk against the pattern (memcmp, not per byte).
    let pattern: Vec<u8> = LINE
        .iter()
        .copied()
        .cycle()
        .take((1 << 20) + LINE.len())
        .collect();
    let reader = async {
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0usize;
        loop {
            let n = out.read(&mut buf).await.unwrap();
            if n == 0 {
                break total;
            }
            let at = total % LINE.len();
            assert!(
                buf[..n] == pattern[at..at + n],
                "bytes {total}..{} differ",
                total + n
            );
            total += n;
        }
    };
    let (total, exit) = tokio::join!(reader, wait(&client, "big", ""));
    let elapsed = started.elapsed();
    assert_eq!(total, SIZE);
    assert_eq!(exit.exit_status, 0);
    eprintln!(
        "100 MiB through stdout in {elapsed:?}: {:.0} MiB/s",
        100.0 / elapsed.as_secs_f64()
    );
    remove(&client, "big").await;
}

/// The exit is reported only once the output is all out, even when the
/// host attaches after the process exited: nothing written at the end is
/// lost, and WaitProcess does not answer early.
#[tokio::test(flavor = "current_thread")]
async fn output_written_just_before_exit_is_never_lost() {
    let agent = TestAgent::start();
    let client = agent.client().await;
    sleeping_container(&agent, &client, "c1").await;
    for i in 0..10 {
        let exec = format!("e{i}");
        let p = process(&[
            "sh",
            "-c",
            "head -c 300000 /dev/zero | tr '\\0' x; echo; echo last words",
        ]);
        let req = exec_request("c1", &exec, &p, stdio(false, true, false, false));
        client.exec_process(ctx(), &req).await.unwrap();
        let waiting = wait(&client, "c1", &exec);
        tokio::pin!(waiting);
        // Not attached yet: the exit must not be reported.
        let early = tokio::time::timeout(std::time::Duration::from_millis(300), &mut waiting).await;
        assert!(
            early.is_err(),
            "WaitProcess answered before stdout was read"
        );
        let out = read_all(agent.attach("c1", Some(&exec), StdioKind::Stdout).await);
        let (out, exit) = tokio::join!(out, waiting);
        assert_eq!(exit.exit_status, 0);
        assert_eq!(out.len(), 300000 + 1 + "last words\n".len());
        assert!(out.ends_with("\nlast words\n"));
    }
    remove(&client, "c1").await;
}

#[tokio::test(flavor = "current_thread")]
async fn sandbox_and_network_configuration() {
    use husk_protocol::agent::*;
    let agent = TestAgent::start();
    let client = agent.client().await;
    let mut sb = CreateSandboxRequest::new();
    sb.sandbox_id = "pod1".into();
    sb.hostname = "podhost".into();
    sb.hosts = "127.0.0.1 localhost\n".into();
    sb.resolv_conf = "nameserver 10.0.0.53\n".into();
    let mut tmp = Storage::new();
    tmp.source = "tmpfs".into();
    tmp.fstype = "tmpfs".into();
    tmp.options = vec!["size=1m".into()];
    tmp.mount_point = "/run/husk/shared".into();
    sb.storages.push(tmp);
    client.create_sandbox(ctx(), &sb).await.unwrap();
    assert_eq!(
        code(client.create_sandbox(ctx(), &sb).await).0,
        ttrpc::Code::ALREADY_EXISTS
    );

    // The sandbox files and storage are there for containers to bind.
    let mut s = spec(process(&[
        "sh",
        "-c",
        "cat /etc/resolv.conf; hostname; grep -c ' /shared tmpfs ' /proc/mounts",
    ]));
    s["mounts"].as_array_mut().unwrap().extend([
        serde_json::json!({"destination": "/etc/resolv.conf", "type": "bind",
            "source": "/run/husk/sandbox/resolv.conf", "options": ["rbind", "ro"]}),
        serde_json::json!({"destination": "/shared", "type": "bind",
            "source": "/run/husk/shared", "options": ["rbind"]}),
    ]);
    // The pod's UTS namespace: no namespace of its own for the container.
    s["linux"]["namespaces"] = serde_json::json!([{"type": "pid"}, {"type": "mount"}]);
    s.as_object_mut().unwrap().remove("hostname");
    let req = create_request("c1", &agent.rootfs, &s, stdio(false, true, false, false));
    client.create_container(ctx(), &req).await.unwrap();
    let out = agent.attach("c1", None, StdioKind::Stdout).await;
    start(&client, "c1").await;
    let (out, exit) = tokio::join!(read_all(out), wait(&client, "c1", ""));
    assert_eq!(exit.exit_status, 0, "{out}");
    assert_eq!(out, "nameserver 10.0.0.53\npodhost\n1\n");

    let details = client
        .get_guest_details(ctx(), &GetGuestDetailsRequest::new())
        .await
        .unwrap();
    assert!(details.cpus >= 1 && details.memory_bytes > 0);
    assert_eq!(details.agent_version, env!("CARGO_PKG_VERSION"));

    // lo came up with the sandbox; a veth stands in for the guest NIC.
    let list = client
        .list_interfaces(ctx(), &ListInterfacesRequest::new())
        .await
        .unwrap();
    let lo = list.interfaces.iter().find(|i| i.name == "lo").unwrap();
    assert!(lo.up && lo.addresses.iter().any(|a| a.address == "127.0.0.1"));
    agent.in_netns(&[
        "ip", "link", "add", "veth0", "type", "veth", "peer", "name", "veth1",
    ]);
    agent.in_netns(&["ip", "link", "set", "veth1", "address", "02:00:00:00:00:09"]);
    let mut want = Interface::new();
    want.name = "eth0".into();
    want.hw_addr = "02:00:00:00:00:09".into();
    want.mtu = 1400;
    let mut ip = IpAddress::new();
    ip.address = "10.9.8.7".into();
    ip.prefix_len = 24;
    want.addresses.push(ip);
    want.up = true;
    let mut req = UpdateInterfaceRequest::new();
    req.interface = Some(want).into();
    let got = client.update_interface(ctx(), &req).await.unwrap();
    assert_eq!((got.name.as_str(), got.mtu), ("eth0", 1400));
    assert_eq!(got.hw_addr, "02:00:00:00:00:09");
    assert!(
        got.addresses
            .iter()
            .any(|a| a.address == "10.9.8.7" && a.prefix_len == 24),
        "{got:?}"
    );

    let mut routes = UpdateRoutesRequest::new();
    let mut r1 = Route::new();
    r1.dest = "10.1.0.0/16".into();
    r1.gateway = "10.9.8.1".into();
    r1.device = "eth0".into();
    let mut r2 = Route::new();
    r2.gateway = "10.9.8.1".into();
    r2.device = "eth0".into();
    routes.routes = vec![r1, r2];
    let got = client.update_routes(ctx(), &routes).await.unwrap().routes;
    assert!(
        got.iter()
            .any(|r| r.dest == "10.1.0.0/16" && r.gateway == "10.9.8.1" && r.device == "eth0"),
        "{got:?}"
    );
    assert!(
        got.iter()
            .any(|r| r.dest.is_empty() && r.gateway == "10.9.8.1"),
        "{got:?}"
    );
    // The kernel's connected route stays.
    assert!(got.iter().any(|r| r.dest == "10.9.8.0/24"), "{got:?}");

    let mut bad = UpdateInterfaceRequest::new();
    let mut missing = Interface::new();
    missing.hw_addr = "02:00:00:00:00:99".into();
    bad.interface = Some(missing).into();
    assert_eq!(
        code(client.update_interface(ctx(), &bad).await).0,
        ttrpc::Code::NOT_FOUND
    );

    client
        .destroy_sandbox(ctx(), &DestroySandboxRequest::new())
        .await
        .unwrap();
    let mut st = StartContainerRequest::new();
    st.container_id = "c1".into();
    assert_eq!(
        code(client.start_container(ctx(), &st).await).0,
        ttrpc::Code::NOT_FOUND
    );
}

/// A pod sandbox shares the VM's IPC, UTS and network namespaces (the shim
/// takes them out of its spec): its namespaced sysctls are set there by the
/// agent, not refused. And a `forward <port>` stream reaches a server a
/// container runs on the VM's loopback; a port nothing listens on closes
/// the stream without a byte.
#[tokio::test(flavor = "current_thread")]
async fn pod_sysctls_land_in_the_vms_namespaces_and_port_forward_reaches_a_container() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let agent = TestAgent::start();
    agent.in_netns(&["ip", "link", "set", "lo", "up"]);
    let client = agent.client().await;
    let script = "cat /proc/sys/kernel/shm_rmid_forced /proc/sys/fs/mqueue/msg_max \
                  /proc/sys/net/ipv4/ip_unprivileged_port_start; \
                  exec httpd -f -p 127.0.0.1:7777 -h /etc";
    let mut pod = spec(process(&["sh", "-c", script]));
    pod["linux"]["namespaces"] = serde_json::json!([{"type": "pid"}, {"type": "mount"}]);
    // The VM's UTS namespace: the shim drops the hostname too.
    pod.as_object_mut().unwrap().remove("hostname");
    pod["linux"]["sysctl"] = serde_json::json!({
        "kernel.shm_rmid_forced": "1",
        "fs.mqueue.msg_max": "64",
        "net.ipv4.ip_unprivileged_port_start": "2000",
    });
    let req = create_request("pod", &agent.rootfs, &pod, stdio(false, true, false, false));
    client.create_container(ctx(), &req).await.unwrap();
    let mut out = agent.attach("pod", None, StdioKind::Stdout).await;
    start(&client, "pod").await;
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while seen.iter().filter(|b| **b == b'\n').count() < 3 {
        let n = out.read(&mut buf).await.unwrap();
        assert!(
            n > 0,
            "the container ended early: {:?}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    assert_eq!(String::from_utf8_lossy(&seen), "1\n64\n2000\n");

    // httpd may take a moment to listen: retry until it answers.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let response = loop {
        let mut stream = tokio::net::UnixStream::connect(&agent.io_sock)
            .await
            .unwrap();
        stream
            .write_all(husk_protocol::forward::encode(7777).as_bytes())
            .await
            .unwrap();
        stream
            .write_all(b"GET /passwd HTTP/1.0\r\n\r\n")
            .await
            .unwrap();
        let response = read_all(stream).await;
        if !response.is_empty() || std::time::Instant::now() > deadline {
            break response;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert!(
        response.starts_with("HTTP/1.") && response.contains("200"),
        "{response:?}"
    );
    assert!(response.contains("root:x:0:0:"), "{response:?}");

    let mut closed = tokio::net::UnixStream::connect(&agent.io_sock)
        .await
        .unwrap();
    closed
        .write_all(husk_protocol::forward::encode(7778).as_bytes())
        .await
        .unwrap();
    assert_eq!(read_all(closed).await, "", "nothing listens on 7778");

    signal(&client, "pod", "", libc::SIGKILL, true).await;
    wait(&client, "pod", "").await;
    remove(&client, "pod").await;
}
