//! Containers inside a real microVM: the agent as PID 1 runs them through
//! libcontainer, the host drives it over hybrid vsock with the generated
//! ttrpc client and reads stdio through `husk_vsock::attach_stdio`; then the
//! guest powers off and the VMM leaves nothing behind. One boot, one
//! combined scenario (a boot costs 30-300 s on nested KVM hosts).
//! Needs `make guest-test` (build/guest/initrd-test.cpio).

use std::time::{Duration, Instant};

use husk_hypervisor::{ConsoleOutput, ExitReason, Vm, VmConfig, VsockConfig};
use husk_protocol::agent::*;
use husk_protocol::AgentServiceClient;
use husk_tests::*;
use husk_vsock::StdioKind;
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;

/// Container work in the guest is emulated kernel work on nested hosts:
/// as patient as husk itself is there.
fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(i64::try_from(op_timeout().as_nanos()).unwrap_or(i64::MAX))
}

fn console(dir: &std::path::Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(format!("console-{name}.log"))).unwrap_or_default()
}

fn process(args: &[&str]) -> Value {
    json!({
        "terminal": false,
        "user": {"uid": 0, "gid": 0},
        "args": args,
        "env": ["PATH=/bin"],
        "cwd": "/",
        "capabilities": {"bounding": ["CAP_KILL"], "effective": ["CAP_KILL"], "permitted": ["CAP_KILL"]},
        "noNewPrivileges": true
    })
}

fn spec(process: Value) -> Value {
    json!({
        "ociVersion": "1.0.2",
        "process": process,
        "root": {"path": "rootfs"},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]}
        ],
        "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "ipc"}]}
    })
}

fn stdio(stdout: bool) -> husk_protocol::agent::Stdio {
    let mut s = husk_protocol::agent::Stdio::new();
    s.stdout = stdout;
    s
}

async fn read_stream(uds: &std::path::Path, id: &str, exec: Option<&str>) -> String {
    let mut stream = husk_vsock::attach_stdio(uds, id, exec, StdioKind::Stdout, op_timeout())
        .await
        .unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).await.unwrap();
    out
}

async fn wait(client: &AgentServiceClient, id: &str, exec: &str) -> i32 {
    let mut req = WaitProcessRequest::new();
    req.container_id = id.into();
    req.exec_id = exec.into();
    client.wait_process(ctx(), &req).await.unwrap().exit_status
}

async fn exec(client: &AgentServiceClient, id: &str, exec_id: &str, args: &[&str], out: bool) {
    let mut req = ExecProcessRequest::new();
    req.container_id = id.into();
    req.exec_id = exec_id.into();
    req.process_json = serde_json::to_vec(&process(args)).unwrap();
    req.stdio = Some(stdio(out)).into();
    client.exec_process(ctx(), &req).await.unwrap();
}

/// Every step of a pod's life in one VM: the agent's health and the clocks
/// the guest kernel chose, sandbox, container create/start, stdout through
/// vsock streams, exec, resources and real cgroup v2 statistics, an OOM kill
/// reported both as an event and as exit 137, removal; then Shutdown: the
/// guest powers off and no thread, descriptor or socket of the VM is left.
#[test]
fn containers_run_in_a_microvm_then_it_powers_off_leaving_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // Before the first runtime: tokio's signal socketpair lives as long as
    // the process, and must not count as a leak.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let fds_before = open_fds();
    let config_at = |name: &str| {
        let mut config = VmConfig::new(guest_kernel());
        config.initrd = Some(guest_test_initrd());
        config.memory_mib = 256;
        // HUSK_TEST_VCPUS: to try the scenario on a multi-vCPU guest.
        config.vcpus = std::env::var("HUSK_TEST_VCPUS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1);
        config.console = ConsoleOutput::File(dir.path().join(format!("console-{name}.log")));
        config.vsock = Some(VsockConfig {
            guest_cid: 3,
            uds_path: dir.path().join(format!("vsock-{name}")),
        });
        config
    };

    // The one boot: up to its agent, then saved and stopped.
    let booted = config_at("booted");
    let uds = booted.vsock.as_ref().unwrap().uds_path.clone();
    let guest_log = husk_vsock::GuestLogReceiver::bind(&uds).unwrap();
    let mut vm = Vm::start(&booted).unwrap();
    let checked = runtime.block_on(async {
        let client = wait_for_agent(&uds, &vm).await?;
        client
            .check(ctx(), &CheckRequest::new())
            .await
            .map_err(|e| format!("agent did not answer: {e}"))
    });
    if let Err(e) = &checked {
        let _ = vm.stop();
        panic!("{e}\nconsole:\n{}", console(dir.path(), "booted"));
    }
    let snapshot = dir.path().join("snapshot");
    std::fs::create_dir(&snapshot).unwrap();
    vm.snapshot(&snapshot, "agent_vm").unwrap();
    drop(vm);
    drop(guest_log);

    // The scenario runs in a VM restored from it.
    let restored = config_at("restored");
    let uds = restored.vsock.as_ref().unwrap().uds_path.clone();
    let guest_log = husk_vsock::GuestLogReceiver::bind(&uds).unwrap();
    let mut vm = Vm::restore(&restored, &snapshot, "agent_vm").unwrap();
    let result = runtime.block_on(async {
        let client = wait_for_restored_agent(&uds, &vm).await?;
        scenario(&uds, &client).await
    });
    if let Err(e) = &result {
        let _ = vm.stop();
        panic!("{e}\nconsole:\n{}", console(dir.path(), "restored"));
    }
    let reason = vm.wait_timeout(Some(op_timeout()));
    assert_eq!(
        reason,
        Some(ExitReason::PowerOff),
        "console:\n{}",
        console(dir.path(), "restored")
    );
    drop(vm);
    drop(guest_log);

    // A snapshot restores any number of times, and only into its shape.
    let mut other = config_at("other");
    other.memory_mib = 512;
    let refused = Vm::restore(&other, &snapshot, "agent_vm").err().unwrap();
    assert!(refused.to_string().contains("memory MiB"), "{refused}");
    other.memory_mib = 256;
    let refused = Vm::restore(&other, &snapshot, "another kernel")
        .err()
        .unwrap();
    assert!(refused.to_string().contains("guest inputs"), "{refused}");
    let uds = other.vsock.as_ref().unwrap().uds_path.clone();
    let mut vm = Vm::restore(&other, &snapshot, "agent_vm").unwrap();
    let again = runtime.block_on(async {
        let client = wait_for_restored_agent(&uds, &vm).await?;
        client
            .check(ctx(), &CheckRequest::new())
            .await
            .map_err(|e| format!("agent did not answer: {e}"))?;
        Ok::<_, String>(client)
    });
    // The host stops it with a connection to its agent open: the VM ends,
    // and the connection fails instead of hanging.
    let stopped = vm.stop();
    drop(vm);
    let client = match again {
        Ok(client) => client,
        Err(e) => panic!("{e}\nconsole:\n{}", console(dir.path(), "other")),
    };
    assert_eq!(stopped, ExitReason::Stopped);
    let after = runtime.block_on(client.check(ctx(), &CheckRequest::new()));
    assert!(after.is_err(), "agent answered after the VM stopped");
    drop(client);

    assert_eq!(
        husk_threads(),
        Vec::<String>::new(),
        "husk threads left running"
    );
    assert_fds_settle(&fds_before, &runtime, Duration::from_secs(5));
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with("console-") && n != "snapshot")
        .collect();
    assert!(left.is_empty(), "sockets left behind: {left:?}");
    assert!(!uds.exists(), "vsock socket left behind");
}

async fn scenario(uds: &std::path::Path, client: &AgentServiceClient) -> Result<(), String> {
    let health = client
        .check(ctx(), &CheckRequest::new())
        .await
        .map_err(|e| format!("agent did not answer: {e}"))?;
    assert_eq!(health.kernel_release, guest_kernel_release());
    assert_ne!(health.kernel_release, host_kernel_release());
    assert_eq!(health.agent_version, env!("CARGO_PKG_VERSION"));
    // The timer design (configs/guest/kernel.config): the LAPIC in
    // TSC-deadline mode drives the tick; time comes from the TSC or kvm-clock.
    assert_eq!(health.clockevent, "lapic-deadline", "{health:?}");
    assert!(
        ["tsc", "kvm-clock"].contains(&health.clocksource.as_str()),
        "{health:?}"
    );
    assert!(health.uptime_secs > 0.0, "{health:?}");
    let client = client.clone();

    let mut sb = CreateSandboxRequest::new();
    sb.sandbox_id = "pod".into();
    sb.hostname = "vmpod".into();
    client.create_sandbox(ctx(), &sb).await.unwrap();
    let details = client
        .get_guest_details(ctx(), &GetGuestDetailsRequest::new())
        .await
        .unwrap();
    assert_eq!(details.kernel_release, guest_kernel_release());
    for c in ["cpu", "memory", "pids"] {
        assert!(
            details.cgroup_controllers.iter().any(|x| x == c),
            "{details:?}"
        );
    }
    let lo = client
        .list_interfaces(ctx(), &ListInterfacesRequest::new())
        .await
        .unwrap();
    assert!(
        lo.interfaces.iter().any(|i| i.name == "lo" && i.up),
        "{lo:?}"
    );

    // Create + start, stdout over a vsock stream.
    let mut req = CreateContainerRequest::new();
    req.container_id = "c1".into();
    let init = spec(process(&["sh", "-c", "echo init says hi; exec sleep 1000"]));
    req.spec_json = serde_json::to_vec(&init).unwrap();
    req.rootfs_path = TEST_ROOTFS.into();
    req.stdio = Some(stdio(true)).into();
    let t = Instant::now();
    client.create_container(ctx(), &req).await.unwrap();
    let created = t.elapsed();
    let t = Instant::now();
    let mut st = StartContainerRequest::new();
    st.container_id = "c1".into();
    client.start_container(ctx(), &st).await.unwrap();
    let started = t.elapsed();
    eprintln!("in the VM: CreateContainer {created:?}, StartContainer {started:?}");
    let mut init_out = husk_vsock::attach_stdio(uds, "c1", None, StdioKind::Stdout, op_timeout())
        .await
        .unwrap();
    let mut first = vec![0u8; 64];
    let n = init_out.read(&mut first).await.unwrap();
    assert_eq!(&first[..n], b"init says hi\n");

    // Exec with stdout.
    let t = Instant::now();
    exec(
        &client,
        "c1",
        "e1",
        &["sh", "-c", "echo exec says hi; cat /proc/1/cmdline"],
        true,
    )
    .await;
    let (out, code) = tokio::join!(
        read_stream(uds, "c1", Some("e1")),
        wait(&client, "c1", "e1")
    );
    eprintln!("in the VM: exec to exit {:?}", t.elapsed());
    assert_eq!(code, 0);
    assert_eq!(out, "exec says hi\nsleep\x001000\x00");

    // Resources and real statistics.
    let limit: u64 = 24 << 20;
    let mut up = UpdateContainerRequest::new();
    up.container_id = "c1".into();
    up.resources_json =
        serde_json::to_vec(&json!({"memory": {"limit": limit}, "pids": {"limit": 64}})).unwrap();
    client.update_container(ctx(), &up).await.unwrap();
    let mut sreq = StatsContainerRequest::new();
    sreq.container_id = "c1".into();
    let stats = client.stats_container(ctx(), &sreq).await.unwrap();
    let mem = stats.memory.clone().unwrap();
    assert_eq!(mem.limit, limit, "{stats:?}");
    assert!(mem.usage > 0 && mem.usage < limit, "{stats:?}");
    let pids = stats.pids.clone().unwrap();
    assert_eq!(pids.limit, 64);
    assert!(pids.current >= 1, "{stats:?}");
    assert!(stats.cpu.usage_usec > 0, "{stats:?}");
    eprintln!(
        "stats: memory {} of {} bytes, {} pids",
        mem.usage, mem.limit, pids.current
    );

    // An OOM kill: the event and the exit status.
    let oom = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .get_oom_event(ctx(), &GetOomEventRequest::new())
                .await
        }
    });
    exec(
        &client,
        "c1",
        "hog",
        &[
            "awk",
            "BEGIN { s = \"xxxxxxxxxxxxxxxx\"; while (1) s = s s }",
        ],
        false,
    )
    .await;
    assert_eq!(wait(&client, "c1", "hog").await, 137);
    let event = tokio::time::timeout(Duration::from_secs(120), oom)
        .await
        .map_err(|_| "no OOM event".to_string())?
        .unwrap()
        .unwrap();
    assert_eq!(event.container_id, "c1");
    let stats = client.stats_container(ctx(), &sreq).await.unwrap();
    assert!(stats.memory.oom_kill_events >= 1, "{stats:?}");
    assert!(stats.memory.max_usage >= limit / 2, "{stats:?}");

    // Removal kills the init (not a zombie: its exit is reported).
    let mut rm = RemoveContainerRequest::new();
    rm.container_id = "c1".into();
    client.remove_container(ctx(), &rm).await.unwrap();
    let mut rest = Vec::new();
    init_out.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    client
        .destroy_sandbox(ctx(), &DestroySandboxRequest::new())
        .await
        .unwrap();
    client
        .shutdown(ctx(), &ShutdownRequest::new())
        .await
        .map_err(|e| format!("Shutdown: {e}"))?;
    Ok(())
}
