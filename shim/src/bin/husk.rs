//! `husk`: the admin's tool. `husk check` verifies that this node can run
//! husk microVMs, one PASS/FAIL line per requirement.

use std::process::{Command, ExitCode};

use clap::{Parser, Subcommand};
use husk_hypervisor::calibrate;
use husk_hypervisor::host::{check_kvm, HostProfile};
use husk_hypervisor::{HostProfileSetting, Vm, VmConfig, VsockConfig};
use husk_protocol::agent::{CheckRequest, ShutdownRequest};

#[derive(Parser)]
#[command(
    name = "husk",
    version,
    about = "husk: containerd runtime on KVM microVMs"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Check KVM, the guest assets and containerd on this node.
    Check {
        /// Also boot a guest with the config's kernel and initramfs, and
        /// report its boot time and the clocks its kernel chose.
        #[arg(long)]
        boot: bool,
    },
}

struct Report {
    failed: bool,
}

impl Report {
    fn line(&mut self, ok: bool, what: &str, detail: impl std::fmt::Display) {
        self.failed |= !ok;
        println!("{}  {what}: {detail}", if ok { "PASS" } else { "FAIL" });
    }

    fn info(&self, what: &str, detail: impl std::fmt::Display) {
        println!("INFO  {what}: {detail}");
    }
}

/// containerd's version from `containerd --version` (third word).
fn containerd_version() -> Result<String, String> {
    let out = Command::new("containerd")
        .arg("--version")
        .output()
        .map_err(|e| format!("cannot run containerd: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .nth(2)
        .map(str::to_string)
        .ok_or_else(|| format!("unexpected output {text:?}"))
}

/// containerd 1.6 or newer speaks the task API v2 the shim serves.
fn containerd_supported(version: &str) -> bool {
    let mut parts = version.trim_start_matches('v').split(['.', '~', '-', '+']);
    let major: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    (major, minor) >= (1, 6)
}

fn on_path(binary: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(binary))
            .find(|p| p.is_file())
    })
}

fn check(boot: bool) -> ExitCode {
    let mut report = Report { failed: false };
    match check_kvm() {
        Ok(kvm) => {
            report.line(
                true,
                "/dev/kvm",
                format!("opened read/write, KVM API version {}", kvm.api_version),
            );
            let missing: Vec<_> = kvm
                .capabilities
                .iter()
                .filter(|(_, ok)| !ok)
                .map(|(n, _)| *n)
                .collect();
            let names: Vec<_> = kvm.capabilities.iter().map(|(n, _)| *n).collect();
            if missing.is_empty() {
                report.line(true, "KVM capabilities", names.join(", "));
            } else {
                report.line(
                    false,
                    "KVM capabilities",
                    format!("missing {}", missing.join(", ")),
                );
            }
            report.info("KVM max vCPUs", kvm.max_vcpus);
        }
        Err(e) => report.line(
            false,
            "/dev/kvm",
            format!("cannot open: {e} (is KVM enabled and may this user use it?)"),
        ),
    }
    let profile = HostProfile::detect();
    report.info(
        "host profile",
        match profile {
            HostProfile::Native => "native KVM".to_string(),
            HostProfile::NestedPvm => format!(
                "nested PVM detected (guest kernel code is emulated): guests get {:?}",
                profile.kernel_args()
            ),
        },
    );
    match calibrate::measure_kernel_speed(profile) {
        Ok(speed) => report.info(
            "guest kernel speed",
            format!(
                "{:.1} M loop iterations/s at guest CPL0 ({}); expect a cold guest boot to take ~{:.1} s",
                speed.iterations_per_sec / 1e6,
                if speed.is_emulated() {
                    "emulated: boots and container starts are slow here"
                } else {
                    "native"
                },
                speed.estimated_boot().as_secs_f64()
            ),
        ),
        Err(e) => report.line(false, "guest kernel speed", e),
    }
    let config = match husk_config::Config::discover() {
        Ok(config) => {
            report.line(true, "config", config.source.display());
            for (what, path) in [
                ("guest kernel", &config.hypervisor.kernel),
                ("guest initramfs", &config.hypervisor.initrd),
            ] {
                report.line(path.is_file(), what, path.display());
            }
            let t = config.agent.timeouts(profile == HostProfile::NestedPvm);
            report.info(
                "agent timeouts",
                format!(
                    "boot fails after {} s without progress or {} s in all; requests after {} s",
                    t.boot_stall.as_secs(),
                    t.boot_max.as_secs(),
                    t.request.as_secs()
                ),
            );
            Some(config)
        }
        Err(e) => {
            report.line(false, "config", e);
            None
        }
    };
    let seccomp_on = config.as_ref().is_none_or(|c| c.hypervisor.seccomp);
    let seccomp = husk_hypervisor::seccomp::available();
    report.line(
        seccomp.is_ok() || !seccomp_on,
        "seccomp",
        format!(
            "{} on this kernel; filters {} by the config",
            seccomp.map_or_else(|e| format!("not available ({e})"), |()| "available".into()),
            if seccomp_on { "enabled" } else { "disabled" }
        ),
    );
    match on_path("containerd-shim-husk-v2") {
        Some(p) => report.line(true, "shim on PATH", p.display()),
        None => report.line(
            false,
            "shim on PATH",
            "containerd-shim-husk-v2 not found: containerd will not find the runtime",
        ),
    }
    match containerd_version() {
        Ok(v) if containerd_supported(&v) => report.line(true, "containerd", v),
        Ok(v) => report.line(false, "containerd", format!("{v} is older than 1.6")),
        Err(e) => report.line(false, "containerd", e),
    }
    if boot {
        match config {
            Some(config) if config.check_guest_assets().is_ok() => {
                match boot_guest(&config, profile) {
                    Ok(lines) => {
                        for (what, detail) in lines {
                            report.line(true, what, detail);
                        }
                    }
                    Err(e) => report.line(false, "guest boot", e),
                }
            }
            _ => report.line(
                false,
                "guest boot",
                "not tried: the config or the guest kernel and initramfs are missing",
            ),
        }
    }
    if report.failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Boots one guest as a sandbox would (without devices but vsock), asks its
/// agent for its health and clocks, snapshots it, restores the snapshot
/// into a new VM (what templates do), and powers that one off.
fn boot_guest(
    config: &husk_config::Config,
    profile: HostProfile,
) -> Result<Vec<(&'static str, String)>, String> {
    let dir = tempfile::Builder::new()
        .prefix("husk-check")
        .tempdir()
        .map_err(|e| format!("cannot make a temp dir: {e}"))?;
    let uds = dir.path().join("vsock.sock");
    let mut vm_config = VmConfig::new(&config.hypervisor.kernel);
    vm_config.initrd = Some(config.hypervisor.initrd.clone());
    vm_config.vcpus = config.hypervisor.vcpus;
    vm_config.memory_mib = config.hypervisor.memory_mib;
    vm_config.seccomp = config.hypervisor.seccomp;
    vm_config.host_profile = HostProfileSetting::Force(profile);
    vm_config.vsock = Some(VsockConfig {
        guest_cid: 3,
        uds_path: uds.clone(),
    });
    let activity = vm_config.activity.clone();
    let _guest_log = husk_vsock::GuestLogReceiver::bind_with_sink(&uds, move |line| {
        activity.note_line("agent", &line.message)
    })
    .map_err(|e| format!("cannot listen for guest logs: {e}"))?;
    let timeouts = config.agent.timeouts(profile == HostProfile::NestedPvm);
    let mut vm = Vm::start(&vm_config).map_err(|e| e.to_string())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start async runtime: {e}"))?;
    let limits = husk_vsock::BootLimits {
        stall: timeouts.boot_stall,
        max: timeouts.boot_max,
    };
    let ctx = || {
        ttrpc::context::with_timeout(i64::try_from(timeouts.request.as_nanos()).unwrap_or(i64::MAX))
    };
    let answered = runtime.block_on(async {
        let (client, boot_time) = husk_vsock::wait_for_agent(&uds, &vm, limits)
            .await
            .map_err(|e| e.to_string())?;
        husk_hypervisor::ledger::record_ready(boot_time);
        let health = client
            .check(ctx(), &CheckRequest::new())
            .await
            .map_err(|e| format!("Check: {e}"))?;
        Ok::<_, String>((boot_time, health))
    });
    let (boot_time, health) = match answered {
        Ok(answer) => answer,
        Err(e) => {
            let reason = vm.stop();
            return Err(format!("{e} (VM: {reason})"));
        }
    };
    // What a template is: this guest saved, then restored into a new VM.
    let snapshot = dir.path().join("snapshot");
    let restore = std::fs::create_dir(&snapshot)
        .map_err(|e| e.to_string())
        .and_then(|()| {
            vm.snapshot(&snapshot, "husk check")
                .map_err(|e| e.to_string())
        });
    drop(vm);
    let restore = restore.and_then(|()| {
        let started = std::time::Instant::now();
        let mut vm = Vm::restore(&vm_config, &snapshot, "husk check").map_err(|e| e.to_string())?;
        let answered = runtime.block_on(async {
            let (client, _) = husk_vsock::wait_for_agent(&uds, &vm, limits)
                .await
                .map_err(|e| e.to_string())?;
            let answer = started.elapsed();
            husk_hypervisor::ledger::record_restored_ready(answer);
            client
                .check(ctx(), &CheckRequest::new())
                .await
                .map_err(|e| format!("Check after the restore: {e}"))?;
            client
                .shutdown(ctx(), &ShutdownRequest::new())
                .await
                .map_err(|e| format!("Shutdown: {e}"))?;
            Ok::<_, String>(answer)
        });
        let answer = match answered {
            Ok(answer) => answer,
            Err(e) => {
                let reason = vm.stop();
                return Err(format!("{e} (VM: {reason})"));
            }
        };
        if vm.wait_timeout(Some(timeouts.request)).is_none() {
            vm.stop();
            return Err("the restored guest did not power off after Shutdown".into());
        }
        Ok(answer)
    });
    let restored = restore.map_err(|e| format!("snapshot restore: {e}"))?;
    Ok(vec![
        (
            "snapshot restore",
            format!(
                "a restored guest's agent answered {:.0} ms after the restore began (templates: {})",
                restored.as_secs_f64() * 1000.0,
                match config.hypervisor.template {
                    husk_config::TemplatePolicy::Auto => "auto",
                    husk_config::TemplatePolicy::Off => "off",
                }
            ),
        ),
        (
            "guest boot",
            format!(
                "agent answered {:.1} s after the VM started (guest uptime {:.1} s), kernel {}",
                boot_time.as_secs_f64(),
                health.uptime_secs,
                health.kernel_release
            ),
        ),
        (
            "guest clocks",
            format!(
                "clocksource {} (available: {}), clockevent {}",
                health.clocksource, health.available_clocksources, health.clockevent
            ),
        ),
    ])
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Cmd::Check { boot } => check(boot),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containerd_versions() {
        assert!(containerd_supported("1.6.20~ds1"));
        assert!(containerd_supported("v2.0.0"));
        assert!(containerd_supported("1.7.3"));
        assert!(!containerd_supported("1.5.9"));
        assert!(!containerd_supported("garbage"));
    }
}
