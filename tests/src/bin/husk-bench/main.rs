//! husk-bench: side-by-side benchmarks, run interleaved in one process so
//! both sides see the same host noise; results are medians and ratios.
//!
//! `husk-bench boot`: boot-to-agent-ready of husk-vmm against
//! `qemu-system-x86_64 -M microvm` on the same kernel, initramfs and command
//! line. "Ready" is the same point for both: the agent's readiness line on
//! the serial console (qemu has no hybrid vsock to ask the agent over).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use husk_hypervisor::host::{HostProfile, HostProfileSetting};
use husk_hypervisor::vm::guest_cmdline;
use serde_json::{json, Value};

mod start;

/// The line husk-agent writes to /dev/console once it serves requests.
const READY_MARKER: &str = husk_protocol::AGENT_READY_CONSOLE_LINE;
/// Seconds each side's guest stays idle after it is ready, to measure the
/// host CPU an idle guest costs (its timer ticks, mostly).
const IDLE_SECS: u64 = 10;

#[derive(Parser)]
#[command(name = "husk-bench")]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// `ctr run --rm` latency, husk vs runc, and shim memory per idle container.
    Start {
        #[arg(long, default_value_t = 5)]
        runs: usize,
        #[arg(long)]
        out: PathBuf,
    },
    /// Host memory per idle pod restored from one template, for N pods.
    Density {
        #[arg(long, value_delimiter = ',', default_values_t = [1, 10])]
        pods: Vec<usize>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Boot to agent ready: husk-vmm vs qemu microvm.
    Boot {
        #[arg(long)]
        kernel: PathBuf,
        #[arg(long)]
        initrd: PathBuf,
        /// The husk-vmm binary.
        #[arg(long)]
        vmm: PathBuf,
        #[arg(long, default_value = "qemu-system-x86_64")]
        qemu: PathBuf,
        #[arg(long, default_value_t = 5)]
        runs: usize,
        #[arg(long, default_value_t = 256)]
        memory: u64,
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.bench {
        Bench::Start { runs, out } => start::bench_start(runs, &out),
        Bench::Density { pods, out } => start::bench_density(&pods, &out),
        Bench::Boot {
            kernel,
            initrd,
            vmm,
            qemu,
            runs,
            memory,
            out,
        } => bench_boot(&kernel, &initrd, &vmm, &qemu, runs, memory, &out),
    };
    if let Err(e) = result {
        eprintln!("husk-bench: {e}");
        std::process::exit(1);
    }
}

/// One boot's measurements (milliseconds, bytes).
#[derive(Default)]
struct Sample {
    ready_ms: f64,
    rss_bytes: Option<u64>,
    /// Host CPU of the VMM process while the guest idles, percent.
    idle_cpu_percent: Option<f64>,
    /// husk only, from husk-vmm --report.
    report: Option<Value>,
}

fn bench_boot(
    kernel: &Path,
    initrd: &Path,
    vmm: &Path,
    qemu: &Path,
    runs: usize,
    memory: u64,
    out: &Path,
) -> Result<(), String> {
    let profile = HostProfile::resolve(HostProfileSetting::Auto);
    let cmdline = guest_cmdline(profile, "");
    let qemu_cpu = qemu_cpu_model(qemu, profile)?;
    eprintln!("qemu runs with -cpu {qemu_cpu}");
    let mut husk = Vec::new();
    let mut qemu_samples = Vec::new();
    for run in 0..runs {
        // Alternate who goes first so neither always gets the warmer cache.
        let husk_first = run % 2 == 0;
        for side in if husk_first { [0, 1] } else { [1, 0] } {
            if side == 0 {
                let s = boot_husk(vmm, kernel, initrd, memory)?;
                eprintln!("run {run}: husk-vmm ready in {:.0} ms", s.ready_ms);
                husk.push(s);
            } else {
                let s = boot_qemu(qemu, kernel, initrd, memory, &cmdline, &qemu_cpu)?;
                eprintln!("run {run}: qemu ready in {:.0} ms", s.ready_ms);
                qemu_samples.push(s);
            }
        }
    }

    let husk_ready = median(husk.iter().map(|s| s.ready_ms).collect());
    let qemu_ready = median(qemu_samples.iter().map(|s| s.ready_ms).collect());
    let report_field = |name: &str| -> Vec<f64> {
        husk.iter()
            .filter_map(|s| s.report.as_ref()?.get(name)?.as_f64())
            .collect()
    };
    let rss = |samples: &[Sample]| -> Vec<f64> {
        samples
            .iter()
            .filter_map(|s| s.rss_bytes)
            .map(|b| b as f64 / f64::from(1 << 20))
            .collect()
    };
    let idle_cpu = |samples: &[Sample]| -> Vec<f64> {
        samples.iter().filter_map(|s| s.idle_cpu_percent).collect()
    };
    let result = json!({
        "benchmark": "boot-to-agent-ready",
        "host_profile": profile.name(),
        "kernel": kernel,
        "initrd": initrd,
        "guest_cmdline": cmdline,
        "memory_mib": memory,
        "vcpus": 1,
        "runs": runs,
        "ready_point": format!("agent's {READY_MARKER:?} line on the serial console"),
        "husk": {
            "boot_to_agent_ready_ms": summary(husk.iter().map(|s| s.ready_ms).collect()),
            "vm_start_to_first_kvm_run_ms": summary(report_field("vm_start_to_first_kvm_run_ms")),
            "process_start_to_first_kvm_run_ms": summary(report_field("process_start_to_first_kvm_run_ms")),
            "process_start_to_agent_rpc_ms": summary(report_field("process_start_to_agent_ready_ms")),
            "vmm_cpu_ms_at_ready": summary(report_field("vmm_cpu_ms_at_ready")),
            "vmm_rss_excluding_guest_mib": summary(rss(&husk)),
            "idle_guest_host_cpu_percent": summary(idle_cpu(&husk)),
        },
        "qemu": {
            "boot_to_agent_ready_ms": summary(qemu_samples.iter().map(|s| s.ready_ms).collect()),
            "vmm_rss_excluding_guest_mib": summary(rss(&qemu_samples)),
            "idle_guest_host_cpu_percent": summary(idle_cpu(&qemu_samples)),
        },
        "qemu_cpu_model": qemu_cpu,
        "ratio": husk_ready / qemu_ready,
        "goals": {
            "ratio_at_most": 0.9,
            "process_start_to_first_kvm_run_ms_under": 10.0,
            "vmm_rss_excluding_guest_mib_at_most": 8.0,
        },
    });
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    std::fs::write(out, format!("{result:#}\n")).map_err(|e| format!("{}: {e}", out.display()))?;
    println!("{result:#}");
    Ok(())
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let mid = v.len() / 2;
    if v.len() % 2 == 0 {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    }
}

pub(crate) fn summary(v: Vec<f64>) -> Value {
    if v.is_empty() {
        return Value::Null;
    }
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    json!({ "median": median(v.clone()), "min": min, "max": max, "samples": v })
}

/// Waits until `console` contains the readiness line; returns when it did.
fn wait_ready(child: &mut Child, console: &Path, started: Instant) -> Result<f64, String> {
    loop {
        if std::fs::read_to_string(console)
            .map(|c| c.contains(READY_MARKER))
            .unwrap_or(false)
        {
            return Ok(started.elapsed().as_secs_f64() * 1000.0);
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "VM exited ({status}) before the agent was ready; console:\n{}",
                std::fs::read_to_string(console).unwrap_or_default()
            ));
        }
        if started.elapsed() > husk_tests::boot_timeout() {
            let _ = child.kill();
            return Err(format!(
                "agent not ready within {:?}",
                husk_tests::boot_timeout()
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Host CPU process `pid` uses over [`IDLE_SECS`], percent of one core.
fn idle_cpu_percent(pid: u32) -> Option<f64> {
    use husk_hypervisor::metrics::process_cpu;
    let before = process_cpu(pid)?;
    std::thread::sleep(Duration::from_secs(IDLE_SECS));
    let after = process_cpu(pid)?;
    Some(after.saturating_sub(before).as_secs_f64() / IDLE_SECS as f64 * 100.0)
}

/// Resident memory of `pid` outside its guest-RAM mapping(s), i.e. outside
/// any mapping at least as large as guest memory.
fn rss_excluding_guest(pid: u32, memory_mib: u64) -> Option<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let guest_bytes = memory_mib << 20;
    let mut total_kib = 0;
    let mut counted = true;
    for line in smaps.lines() {
        if let Some(v) = line.strip_prefix("Rss:") {
            if counted {
                total_kib += v.trim().trim_end_matches("kB").trim().parse::<u64>().ok()?;
            }
        } else if let Some((range, _)) = line.split_once(' ') {
            if let Some((a, b)) = range.split_once('-') {
                if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                    counted = b - a < guest_bytes;
                }
            }
        }
    }
    Some(total_kib * 1024)
}

fn boot_husk(vmm: &Path, kernel: &Path, initrd: &Path, memory: u64) -> Result<Sample, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let console = dir.path().join("console.log");
    let report = dir.path().join("report.json");
    let started = Instant::now();
    let mut child = Command::new(vmm)
        .arg("--kernel")
        .arg(kernel)
        .arg("--initrd")
        .arg(initrd)
        .arg("--memory")
        .arg(memory.to_string())
        .arg("--vsock-uds")
        .arg(dir.path().join("vsock"))
        .arg("--console")
        .arg(&console)
        .arg("--report")
        .arg(&report)
        .arg("--agent-check")
        .arg("--idle-secs")
        .arg(IDLE_SECS.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", vmm.display()))?;
    let ready_ms = wait_ready(&mut child, &console, started)?;
    let status = child.wait().map_err(|e| e.to_string())?;
    if !status.success() {
        return Err(format!("husk-vmm failed: {status}"));
    }
    let report: Value = std::fs::read_to_string(&report)
        .ok()
        .and_then(|r| serde_json::from_str(&r).ok())
        .ok_or("husk-vmm wrote no report")?;
    let rss_bytes = report["vmm_rss_excluding_guest_bytes_at_ready"].as_u64();
    Ok(Sample {
        ready_ms,
        rss_bytes,
        idle_cpu_percent: report["idle_guest_host_cpu_percent"].as_f64(),
        report: Some(report),
    })
}

/// The first `-cpu` model qemu accepts on this host, most faithful first:
/// `host` as it is; then without the ARCH_CAPABILITIES MSR, which some
/// nested hosts refuse at vCPU reset ("failed to set MSR 0x10a", an abort).
/// CX16 is hidden where husk hides it (nested PVM). A model is accepted when
/// qemu, started paused, is still running after a moment.
fn qemu_cpu_model(qemu: &Path, profile: HostProfile) -> Result<String, String> {
    let base = if profile.hidden_features().contains(&"cx16") {
        "host,-cx16"
    } else {
        "host"
    };
    let mut refusals = Vec::new();
    for model in [base.to_string(), format!("{base},-arch-capabilities")] {
        let mut child = Command::new(qemu)
            .args(["-M", "microvm", "-enable-kvm", "-cpu", &model, "-m", "64"])
            .args(["-nodefaults", "-no-user-config", "-display", "none", "-S"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", qemu.display()))?;
        std::thread::sleep(Duration::from_secs(2));
        match child.try_wait() {
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Ok(model);
            }
            _ => {
                let out = child.wait_with_output().map_err(|e| e.to_string())?;
                let why = String::from_utf8_lossy(&out.stderr);
                refusals.push(format!("-cpu {model}: {}", why.trim()));
            }
        }
    }
    Err(format!(
        "qemu accepts none of the CPU models tried: {}",
        refusals.join("; ")
    ))
}

fn boot_qemu(
    qemu: &Path,
    kernel: &Path,
    initrd: &Path,
    memory: u64,
    cmdline: &str,
    cpu: &str,
) -> Result<Sample, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let console = dir.path().join("console.log");
    let started = Instant::now();
    let mut child = Command::new(qemu)
        .args(["-M", "microvm", "-enable-kvm", "-cpu", cpu, "-smp", "1"])
        .args(["-m", &memory.to_string()])
        .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", cmdline])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", qemu.display()))?;
    let ready = wait_ready(&mut child, &console, started);
    let rss_bytes = rss_excluding_guest(child.id(), memory);
    let idle_cpu_percent = ready.as_ref().ok().and(idle_cpu_percent(child.id()));
    let _ = child.kill();
    let _ = child.wait();
    Ok(Sample {
        ready_ms: ready?,
        rss_bytes,
        idle_cpu_percent,
        report: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A stand-in for qemu that aborts, as on the AMD host, when the CPU
    /// model keeps ARCH_CAPABILITIES, and otherwise runs until killed.
    fn fake_qemu(dir: &Path) -> PathBuf {
        let path = dir.join("qemu");
        std::fs::write(
            &path,
            "#!/bin/sh\ncase \"$*\" in *-arch-capabilities*) exec sleep 60;; esac\n\
             echo 'failed to set MSR 0x10a to 0x69' >&2; exit 134\n",
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[test]
    fn the_cpu_model_probe_falls_back_where_qemu_aborts() {
        let dir = tempfile::tempdir().unwrap();
        let qemu = fake_qemu(dir.path());
        assert_eq!(
            qemu_cpu_model(&qemu, HostProfile::NestedPvm).unwrap(),
            "host,-cx16,-arch-capabilities"
        );
        assert_eq!(
            qemu_cpu_model(&qemu, HostProfile::Native).unwrap(),
            "host,-arch-capabilities"
        );
        let never = dir.path().join("never");
        std::fs::write(&never, "#!/bin/sh\necho refused >&2; exit 1\n").unwrap();
        std::fs::set_permissions(&never, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = qemu_cpu_model(&never, HostProfile::Native).unwrap_err();
        assert!(e.contains("refused"), "{e}");
    }
}
