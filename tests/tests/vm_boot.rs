//! The husk-vmm binary end to end: it boots the guest, checks its agent
//! over hybrid vsock and exits when the guest powers off. (The library's
//! VMs, a guest-initiated poweroff and a host stop with open connections,
//! each leaving nothing behind, are tests/tests/agent_vm.rs.) Run one at a
//! time (`make test-vm` passes --test-threads=1).

use husk_tests::*;

fn console(dir: &std::path::Path) -> String {
    std::fs::read_to_string(dir.join("console.log")).unwrap_or_default()
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
