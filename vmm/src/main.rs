//! husk-vmm: boots one microVM in the foreground, for debugging and
//! benchmarks. Exits with the guest (status 0 for poweroff/reboot/stop).
//!
//! ```text
//! husk-vmm --kernel vmlinux --initrd initrd.cpio --vcpus 1 --memory 256 \
//!          --vsock-uds /tmp/vm.vsock --console /tmp/console.log [--agent-check]
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use husk_config::{Console, HostProfile as ProfileChoice};
use husk_hypervisor::cpuid::CpuidPolicy;
use husk_hypervisor::{
    metrics, ConsoleOutput, ExitReason, HostProfile, HostProfileSetting, Vm, VmConfig, VsockConfig,
};
use husk_protocol::agent::{CheckRequest, ShutdownRequest};

#[derive(Parser, Debug)]
#[command(
    name = "husk-vmm",
    version,
    about = "Boot a husk microVM in the foreground"
)]
struct Args {
    /// Guest kernel: an uncompressed ELF vmlinux.
    #[arg(long)]
    kernel: PathBuf,
    /// Guest initramfs (uncompressed newc cpio).
    #[arg(long)]
    initrd: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    memory: u64,
    /// Hybrid vsock Unix socket (the guest gets CID --vsock-cid).
    #[arg(long)]
    vsock_uds: Option<PathBuf>,
    #[arg(long, default_value_t = 3)]
    vsock_cid: u64,
    /// Guest console: a file path, `log` (into this process's log) or `none`.
    #[arg(long, default_value = "none")]
    console: Console,
    /// Extra guest kernel arguments.
    #[arg(long, default_value = "")]
    cmdline: String,
    /// auto (detect), native or nested-pvm.
    #[arg(long, default_value = "auto")]
    host_profile: ProfileChoice,
    /// CPU features to hide from the guest (comma separated, e.g. avx512f,rdrand,invtsc).
    #[arg(long, value_delimiter = ',')]
    hide_cpuid: Vec<String>,
    /// Wait for the agent, print its health answer, then shut the VM down.
    #[arg(long, requires = "vsock_uds")]
    agent_check: bool,
    /// The most --agent-check waits for the agent, in seconds; it gives up
    /// sooner when the guest shows no progress for as long as husk's shim
    /// would. Default: the shim's boot cap for this host kind.
    #[arg(long)]
    agent_timeout: Option<u64>,
    /// With --agent-check: before the Shutdown, leave the guest idle this
    /// many seconds and report the host CPU the idle VM used meanwhile.
    #[arg(long, default_value_t = 0)]
    idle_secs: u64,
    /// With --agent-check: sample where the guest's vCPUs are until the
    /// check ends, into this file (read it with scripts/guest-profile.py).
    #[arg(long, requires = "agent_check")]
    profile: Option<PathBuf>,
    /// Write a JSON report of the VMM's own costs here on exit.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Run without seccomp filters (husk.toml's `[hypervisor] seccomp =
    /// false`): to debug a filter, never to measure.
    #[arg(long)]
    no_seccomp: bool,
}

/// The VMM's console for a `--console` value (the same words as
/// `hypervisor.console` in husk.toml).
fn console_output(console: &Console) -> ConsoleOutput {
    match console {
        Console::None => ConsoleOutput::Discard,
        Console::Log => ConsoleOutput::Log,
        Console::File(path) => ConsoleOutput::File(path.clone()),
    }
}

/// The VMM's profile setting for a `--host-profile` value (the same words
/// as `hypervisor.host_profile` in husk.toml).
fn host_profile(choice: ProfileChoice) -> HostProfileSetting {
    match choice {
        ProfileChoice::Auto => HostProfileSetting::Auto,
        ProfileChoice::Native => HostProfileSetting::Force(HostProfile::Native),
        ProfileChoice::NestedPvm => HostProfileSetting::Force(HostProfile::NestedPvm),
    }
}

/// Measurements taken while the VM runs, for --report.
#[derive(Default)]
struct Report {
    agent_ready_at: Option<Instant>,
    kernel_release: Option<String>,
    rss_at_ready: Option<u64>,
    cpu_at_ready: Option<Duration>,
    /// Host CPU of the whole process per second of an idle guest, percent.
    idle_cpu_percent: Option<f64>,
}

fn main() -> ExitCode {
    let process_start = Instant::now();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HUSK_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    match run(&args, process_start) {
        Ok(reason @ ExitReason::Crashed(_)) => {
            eprintln!("husk-vmm: guest {reason}");
            ExitCode::FAILURE
        }
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("husk-vmm: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args, process_start: Instant) -> Result<ExitReason, String> {
    // Block SIGINT/SIGTERM before any thread exists, so every thread
    // inherits the mask and only the watcher thread receives them.
    let signals = block_stop_signals()?;
    if !args.no_seccomp {
        // Before any thread exists, so every thread inherits it.
        husk_hypervisor::seccomp::install_process_deny_list().map_err(|e| e.to_string())?;
    }
    let mut config = VmConfig::new(&args.kernel);
    config.seccomp = !args.no_seccomp;
    config.initrd = args.initrd.clone();
    config.vcpus = args.vcpus;
    config.memory_mib = args.memory;
    config.console = console_output(&args.console);
    config.extra_cmdline = args.cmdline.clone();
    config.host_profile = host_profile(args.host_profile);
    config.cpuid = CpuidPolicy {
        hide: args.hide_cpuid.clone(),
    };
    config.vsock = args.vsock_uds.as_ref().map(|uds| VsockConfig {
        guest_cid: args.vsock_cid,
        uds_path: uds.clone(),
    });

    // The agent connects out to the host's log port as soon as it starts:
    // listen before the guest boots.
    let _guest_log = match &args.vsock_uds {
        Some(uds) => {
            let confine = husk_hypervisor::seccomp::guest_log_confinement(config.seccomp)
                .map_err(|e| e.to_string())?;
            Some(
                husk_vsock::GuestLogReceiver::bind_confined(uds, |_| {}, confine).map_err(|e| {
                    format!(
                        "cannot listen for guest logs next to {}: {e}",
                        uds.display()
                    )
                })?,
            )
        }
        None => None,
    };

    let mut vm = Vm::start(&config).map_err(|e| e.to_string())?;
    let signals = spawn_signal_watcher(signals, vm.stop_handle())?;

    let mut report = Report::default();
    let reason = if args.agent_check {
        let uds = args.vsock_uds.clone().unwrap_or_default();
        let mut timeouts = husk_config::AgentConfig::default()
            .timeouts(vm.host_profile() == HostProfile::NestedPvm);
        if let Some(secs) = args.agent_timeout {
            timeouts.boot_max = Duration::from_secs(secs);
            timeouts.boot_stall = timeouts.boot_stall.min(timeouts.boot_max);
        }
        let idle = Duration::from_secs(args.idle_secs);
        let result = match &args.profile {
            Some(path) => profiled(&vm, path, || {
                agent_check(&uds, &vm, &timeouts, idle, &mut report)
            })?,
            None => agent_check(&uds, &vm, &timeouts, idle, &mut report),
        };
        report.rss_at_ready = metrics::rss_excluding(&vm.guest_memory_host_ranges()).ok();
        report.cpu_at_ready = Some(vmm_cpu(&vm));
        match result {
            Ok(()) => match vm.wait_timeout(Some(Duration::from_secs(60))) {
                Some(reason) => reason,
                None => {
                    let _ = vm.stop();
                    return Err("the guest did not power off within 60 s of Shutdown".into());
                }
            },
            Err(e) => {
                let reason = vm.stop();
                return Err(format!("agent check failed: {e} (VM: {reason})"));
            }
        }
    } else {
        vm.wait()
    };
    drop(signals);
    tracing::info!("VM ended: {reason}");

    if let Some(path) = &args.report {
        write_report(path, &vm, &reason, &report, process_start)?;
    }
    Ok(reason)
}

fn vmm_cpu(vm: &Vm) -> Duration {
    metrics::non_vcpu_thread_cpu() + vm.vmm_stats().exit_cpu
}

/// Runs `f` while a thread samples `vm` into `path`.
fn profiled<T>(vm: &Vm, path: &std::path::Path, f: impl FnOnce() -> T) -> Result<T, String> {
    let file = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        let sampler = scope.spawn(|| {
            let mut out = std::io::BufWriter::new(file);
            husk_hypervisor::profile::record(&mut out, || {
                (!done.load(std::sync::atomic::Ordering::SeqCst))
                    .then(|| vm.profile_sample(husk_hypervisor::profile::SAMPLE_TIMEOUT))
            })
        });
        let result = f();
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        match sampler.join() {
            Ok(Ok(())) => Ok(result),
            Ok(Err(e)) => Err(format!("profile {}: {e}", path.display())),
            Err(_) => Err("the profile thread panicked".into()),
        }
    })
}

/// Connects to the agent, prints its health answer and asks it to power off.
fn agent_check(
    uds: &std::path::Path,
    vm: &Vm,
    timeouts: &husk_config::AgentTimeouts,
    idle: Duration,
    report: &mut Report,
) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start async runtime: {e}"))?;
    runtime.block_on(async {
        let limits = husk_vsock::BootLimits {
            stall: timeouts.boot_stall,
            max: timeouts.boot_max,
        };
        let (client, boot_time) = husk_vsock::wait_for_agent(uds, vm, limits)
            .await
            .map_err(|e| e.to_string())?;
        let nanos = i64::try_from(timeouts.request.as_nanos())
            .map_err(|_| format!("request timeout {:?} is too long", timeouts.request))?;
        let rpc_timeout = ttrpc::context::with_timeout(nanos);
        let health = client
            .check(rpc_timeout.clone(), &CheckRequest::new())
            .await
            .map_err(|e| format!("Check RPC: {e}"))?;
        report.agent_ready_at = Some(Instant::now());
        report.kernel_release = Some(health.kernel_release.clone());
        husk_hypervisor::ledger::record_ready(boot_time);
        println!(
            "agent ready after {:.1} s: guest kernel {}, husk-agent {}, clocksource {} (of {}), \
             clockevent {}, guest uptime {:.1} s",
            boot_time.as_secs_f64(),
            health.kernel_release,
            health.agent_version,
            health.clocksource,
            health.available_clocksources,
            health.clockevent,
            health.uptime_secs,
        );
        if !idle.is_zero() {
            let before = metrics::process_cpu(std::process::id());
            tokio::time::sleep(idle).await;
            let after = metrics::process_cpu(std::process::id());
            if let (Some(a), Some(b)) = (before, after) {
                report.idle_cpu_percent =
                    Some(b.saturating_sub(a).as_secs_f64() / idle.as_secs_f64() * 100.0);
            }
        }
        client
            .shutdown(rpc_timeout, &ShutdownRequest::new())
            .await
            .map_err(|e| format!("Shutdown RPC: {e}"))?;
        Ok(())
    })
}

fn write_report(
    path: &std::path::Path,
    vm: &Vm,
    reason: &ExitReason,
    report: &Report,
    process_start: Instant,
) -> Result<(), String> {
    let stats = vm.vmm_stats();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    // Vm::start began right after argument parsing; the difference to
    // process start is this binary's own startup.
    let json = serde_json::json!({
        "exit_reason": reason.to_string(),
        "host_profile": vm.host_profile().name(),
        "vm_start_to_first_kvm_run_ms": stats.start_to_first_run.map(ms),
        "process_start_to_first_kvm_run_ms": stats
            .first_run_at
            .map(|t| ms(t.duration_since(process_start))),
        "process_uptime_ms": ms(process_start.elapsed()),
        "process_start_to_agent_ready_ms": report
            .agent_ready_at
            .map(|t| ms(t.duration_since(process_start))),
        "guest_kernel_release": report.kernel_release,
        "vmm_rss_excluding_guest_bytes_at_ready": report.rss_at_ready,
        "vmm_cpu_ms_at_ready": report.cpu_at_ready.map(ms),
        "vmm_cpu_ms_total": ms(vmm_cpu(vm)),
        "idle_guest_host_cpu_percent": report.idle_cpu_percent,
        "exits": stats.exits,
        "exit_handling_cpu_ms": ms(stats.exit_cpu),
    });
    std::fs::write(path, format!("{json:#}\n"))
        .map_err(|e| format!("cannot write report {}: {e}", path.display()))
}

fn block_stop_signals() -> Result<nix::sys::signal::SigSet, String> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.thread_block()
        .map_err(|e| format!("cannot block signals: {e}"))?;
    Ok(set)
}

/// Stops the VM on SIGINT/SIGTERM so the guest is torn down cleanly.
fn spawn_signal_watcher(
    set: nix::sys::signal::SigSet,
    stop: husk_hypervisor::vm::StopHandle,
) -> Result<std::thread::JoinHandle<()>, String> {
    std::thread::Builder::new()
        .name("husk-signals".into())
        .spawn(move || {
            if let Ok(sig) = set.wait() {
                tracing::info!("{sig}: stopping the VM");
                stop.stop();
            }
        })
        .map_err(|e| format!("cannot start signal thread: {e}"))
}
