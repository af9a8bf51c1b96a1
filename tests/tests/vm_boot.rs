//! Real microVMs: boot the guest with husk's VMM, talk to the agent over
//! hybrid vsock, stop it from the host, and check that nothing is left
//! behind; the husk-vmm binary end to end. (A guest-initiated poweroff with
//! the same checks ends tests/tests/agent_vm.rs.) Run one at a time
//! (`make test-vm` passes --test-threads=1).

use std::time::Duration;

use husk_hypervisor::{ConsoleOutput, ExitReason, Vm, VmConfig, VsockConfig};
use husk_protocol::agent::CheckRequest;
use husk_tests::*;

fn vm_config(dir: &std::path::Path) -> VmConfig {
    let mut config = VmConfig::new(guest_kernel());
    config.initrd = Some(guest_initrd());
    config.memory_mib = 256;
    config.console = ConsoleOutput::File(dir.join("console.log"));
    config.vsock = Some(VsockConfig {
        guest_cid: 3,
        uds_path: dir.join("vsock"),
    });
    config
}

fn rpc_context() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(i64::try_from(op_timeout().as_nanos()).unwrap_or(i64::MAX))
}

fn console(dir: &std::path::Path) -> String {
    std::fs::read_to_string(dir.join("console.log")).unwrap_or_default()
}

/// A current-thread runtime for the agent client. Create it before taking
/// an fd snapshot: tokio's process-wide signal socketpair is made with the
/// first runtime and lives as long as the process.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn host_stop_tears_down_a_running_vm_with_open_connections() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime();
    let fds_before = open_fds();
    let uds = dir.path().join("vsock");

    let mut vm = Vm::start(&vm_config(dir.path())).unwrap();
    // Keep a live connection to the agent open while the host stops the VM.
    let client = runtime
        .block_on(async {
            let client = wait_for_agent(&uds, &vm).await?;
            client
                .check(rpc_context(), &CheckRequest::new())
                .await
                .map_err(|e| format!("RPC: {e}"))?;
            Ok::<_, String>(client)
        })
        .unwrap_or_else(|e| {
            panic!(
                "agent did not answer: {e}\nconsole:\n{}",
                console(dir.path())
            )
        });

    assert_eq!(vm.stop(), ExitReason::Stopped);
    drop(vm);
    // The agent's side is gone: the connection fails instead of hanging.
    let after = runtime.block_on(client.check(rpc_context(), &CheckRequest::new()));
    assert!(after.is_err(), "agent answered after the VM stopped");
    drop(client);

    assert_eq!(
        husk_threads(),
        Vec::<String>::new(),
        "husk threads left running"
    );
    assert_fds_settle(&fds_before, &runtime, Duration::from_secs(5));
    assert!(!uds.exists(), "vsock socket left behind");
}

#[test]
fn husk_vmm_binary_runs_the_agent_check_and_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let vmm = husk_vmm_binary();
    let output = std::process::Command::new(vmm)
        .arg("--kernel")
        .arg(guest_kernel())
        .arg("--initrd")
        .arg(guest_initrd())
        .arg("--vsock-uds")
        .arg(dir.path().join("vsock"))
        .arg("--console")
        .arg(dir.path().join("console.log"))
        .arg("--report")
        .arg(dir.path().join("report.json"))
        .arg("--agent-check")
        .arg("--agent-timeout")
        .arg(boot_timeout().as_secs().to_string())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "husk-vmm failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}\nconsole:\n{}",
        output.status,
        console(dir.path())
    );
    assert!(stdout.contains(&guest_kernel_release()), "{stdout}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("report.json")).unwrap())
            .unwrap();
    assert_eq!(report["exit_reason"], "guest powered off");
    assert!(report["vm_start_to_first_kvm_run_ms"].as_f64().is_some());
    assert!(report["process_start_to_first_kvm_run_ms"]
        .as_f64()
        .is_some());
    assert!(
        report["vmm_rss_excluding_guest_bytes_at_ready"]
            .as_u64()
            .unwrap()
            > 0
    );
    // Guest logs arrived through the log port and were re-emitted.
    assert!(
        stderr.contains("husk::guest"),
        "no guest log lines in:\n{stderr}"
    );
}
