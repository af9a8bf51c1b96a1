//! `husk`: the admin's tool. `husk check` verifies that this node can run
//! husk microVMs, one PASS/FAIL line per requirement.

use std::process::{Command, ExitCode};

use clap::{Parser, Subcommand};
use husk_hypervisor::host::{check_kvm, HostProfile};

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
    Check,
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

fn check() -> ExitCode {
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
                "nested PVM detected: guests get {:?}",
                profile.kernel_args()
            ),
        },
    );
    match husk_config::Config::discover() {
        Ok(config) => {
            report.line(true, "config", config.source.display());
            for (what, path) in [
                ("guest kernel", &config.hypervisor.kernel),
                ("guest initramfs", &config.hypervisor.initrd),
            ] {
                report.line(path.is_file(), what, path.display());
            }
        }
        Err(e) => report.line(false, "config", e),
    }
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
    if report.failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Cmd::Check => check(),
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
