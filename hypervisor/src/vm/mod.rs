//! A running microVM: built from a [`VmConfig`], owned by a [`Vm`] whose
//! drop (or [`Vm::stop`]) tears everything down: vCPU threads, device
//! workers, sockets and memory.

use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::activity::GuestActivity;
use crate::boot::{self, BootInputs};
use crate::bus::Bus;
use crate::cpuid;
use crate::device_manager::DeviceManager;
use crate::devices::legacy::power::{AcpiPowerPorts, I8042};
use crate::devices::legacy::serial::SerialRegisters;
use crate::devices::legacy::serial::{ConsoleSink, SerialDevice};
use crate::devices::virtio::control::ControlThread;
use crate::devices::virtio::fs::{Fs, FsOptions};
use crate::devices::virtio::net::{open_tap, Net};
use crate::devices::virtio::vsock::Vsock;
use crate::exit::{ExitReason, ExitSignal};
use crate::host::HostProfile;
use crate::layout::*;
use crate::seccomp::ThreadKind;
use crate::snapshot::SnapshotShape;
use crate::vcpu::{self, Vcpu, VcpuParking, VcpuSample, VcpuSampler, VcpuStats};
use crate::{acpi, memory};

mod config;
mod snapshot;
pub use config::*;

/// Errors starting a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("invalid VM configuration: {0}")]
    Config(String),
    #[error("cannot open /dev/kvm (is KVM enabled, and may this user use it?): {0}")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("KVM {what} failed: {source}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Regs(#[from] boot::regs::RegsError),
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    #[error(transparent)]
    VmGenId(#[from] crate::vmgenid::VmGenIdError),
    #[error(transparent)]
    Cpuid(#[from] cpuid::CpuidError),
    #[error(transparent)]
    Devices(#[from] crate::device_manager::DeviceManagerError),
    #[error("cannot set up vsock at {path}: {source}")]
    Vsock {
        path: PathBuf,
        #[source]
        source: crate::devices::virtio::vsock::VsockError,
    },
    #[error("cannot set up the shared directory: {0}")]
    SharedFs(#[from] crate::devices::virtio::fs::FsError),
    #[error("cannot open tap {name}: {source}")]
    Tap {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set up the NIC: {0}")]
    Net(#[from] crate::devices::virtio::net::NetError),
    #[error(transparent)]
    Bus(#[from] crate::bus::BusError),
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    #[error("cannot restore the snapshot in {}: {source}", dir.display())]
    Restore {
        dir: PathBuf,
        #[source]
        source: crate::snapshot::SnapshotError,
    },
    #[error("cannot open console output: {0}")]
    Console(#[source] std::io::Error),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

fn io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> VmError {
    move |source| VmError::Io { what, source }
}

/// What the VMM itself cost, as opposed to the guest.
#[derive(Debug, Clone)]
pub struct VmmStats {
    /// From the start of [`Vm::start`] to the first KVM_RUN.
    pub start_to_first_run: Option<Duration>,
    /// When the first KVM_RUN was entered.
    pub first_run_at: Option<Instant>,
    /// Exits handled in user space, and the CPU time spent on them.
    pub exits: u64,
    pub exit_cpu: Duration,
}

/// Stops a VM from another thread.
#[derive(Clone)]
pub struct StopHandle(Arc<ExitSignal>);

impl StopHandle {
    pub fn stop(&self) {
        self.0.request(ExitReason::Stopped);
    }
}

/// A running VM.
pub struct Vm {
    profile: HostProfile,
    exit: Arc<ExitSignal>,
    stop: Arc<AtomicBool>,
    vcpu_threads: Vec<JoinHandle<()>>,
    devices: DeviceManager,
    stats: Arc<VcpuStats>,
    sampler: Arc<VcpuSampler>,
    parking: Arc<VcpuParking>,
    serial: Arc<Mutex<SerialDevice>>,
    /// What a snapshot of this VM fits (identity filled in by the caller).
    shape: SnapshotShape,
    activity: Arc<GuestActivity>,
    started: Instant,
    mem: GuestMemoryMmap,
    // Dropped after the vCPU threads are joined (fields drop in order).
    vm_fd: VmFd,
}

impl Vm {
    /// Builds the VM and starts its vCPUs.
    pub fn start(config: &VmConfig) -> Result<Vm, VmError> {
        let started = Instant::now();
        validate(config)?;
        let profile = HostProfile::resolve(config.host_profile);
        if profile != HostProfile::Native {
            tracing::info!(
                "host profile {}: hiding {:?}, guest args {:?}",
                profile.name(),
                profile.hidden_features(),
                profile.kernel_args()
            );
        }

        let mem = memory::create(config.memory_mib)?;
        crate::ledger::record_start();
        let cmdline = guest_cmdline(profile, &config.extra_cmdline);
        let inputs = BootInputs {
            kernel: &config.kernel,
            initrd: config.initrd.as_deref(),
            cmdline: &cmdline,
            // acpi::write_tables puts the RSDP first in the ACPI area.
            rsdp: GuestAddress(ACPI_START),
        };
        std::thread::scope(|scope| {
            // Copying the kernel and initramfs in does not depend on the KVM
            // and device setup below: overlap the two (each takes
            // milliseconds, the better part of the VMM's start).
            let loader = std::thread::Builder::new()
                .name("husk-loader".into())
                .spawn_scoped(scope, || boot::load(&mem, &inputs))
                .map_err(io_err("spawn loader thread"))?;
            Self::build(config, profile, started, mem.clone(), &cmdline, loader)
        })
    }

    /// Everything after guest memory exists; `loader` fills it meanwhile.
    fn build(
        config: &VmConfig,
        profile: HostProfile,
        started: Instant,
        mem: GuestMemoryMmap,
        cmdline: &str,
        loader: std::thread::ScopedJoinHandle<'_, Result<boot::LoadedImage, boot::BootError>>,
    ) -> Result<Vm, VmError> {
        let machine = Machine::assemble(config, &mem, None)?;
        acpi::write_tables(&mem, config.vcpus, machine.devices.acpi_devices())?;
        crate::vmgenid::write_new_id(&mem)?;
        let image = loader
            .join()
            .map_err(|_| VmError::Config("the kernel loader thread panicked".into()))??;
        let vcpus = machine.create_vcpus(config, profile, |fd, id| {
            Ok(boot::regs::setup_vcpu(fd, id, image.entry.0)?)
        })?;
        let vm = machine.launch(config, profile, started, mem, vcpus)?;
        tracing::info!(
            vcpus = config.vcpus,
            memory_mib = config.memory_mib,
            "VM started: {cmdline}"
        );
        Ok(vm)
    }

    /// A handle other threads can use to stop the VM (e.g. on SIGTERM):
    /// [`Vm::wait`] then returns [`ExitReason::Stopped`].
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle(self.exit.clone())
    }

    pub fn host_profile(&self) -> HostProfile {
        self.profile
    }

    /// Readable once the VM wants to stop (guest poweroff, reset, crash).
    pub fn exit_fd(&self) -> RawFd {
        self.exit.eventfd().as_raw_fd()
    }

    /// Why the VM stopped, if it did.
    pub fn exit_reason(&self) -> Option<ExitReason> {
        self.exit.reason()
    }

    /// Blocks until the guest ends the VM (or `timeout` passes: then the VM
    /// keeps running and `None` is returned).
    pub fn wait_timeout(&mut self, timeout: Option<Duration>) -> Option<ExitReason> {
        let deadline = timeout.map(|t| Instant::now() + t);
        while !self.exit.is_requested() {
            let remaining = match deadline {
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(r) => i32::try_from(r.as_millis()).unwrap_or(i32::MAX),
                    None => return None,
                },
                None => -1,
            };
            let mut pfd = libc::pollfd {
                fd: self.exit_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: pfd is a valid pollfd for the duration of the call.
            unsafe { libc::poll(&mut pfd, 1, remaining) };
        }
        self.teardown();
        self.exit.reason()
    }

    /// Blocks until the guest ends the VM, then tears it down.
    pub fn wait(&mut self) -> ExitReason {
        self.wait_timeout(None).unwrap_or(ExitReason::Crashed(
            "exit signalled without a reason".into(),
        ))
    }

    /// Stops the VM from the host and tears it down. Returns why it ended
    /// (a guest exit that raced with the stop wins).
    pub fn stop(&mut self) -> ExitReason {
        self.exit.request(ExitReason::Stopped);
        self.teardown();
        self.exit.reason().unwrap_or(ExitReason::Stopped)
    }

    /// What the VMM itself cost so far.
    pub fn vmm_stats(&self) -> VmmStats {
        VmmStats {
            start_to_first_run: self
                .stats
                .first_run
                .get()
                .map(|t| t.duration_since(self.started)),
            first_run_at: self.stats.first_run.get().copied(),
            exits: self.stats.exits.load(Ordering::Relaxed),
            exit_cpu: Duration::from_nanos(self.stats.exit_cpu_ns.load(Ordering::Relaxed)),
        }
    }

    /// Signs of life from the guest so far: exits the VMM handled, console
    /// lines, and whatever else was fed into the config's activity. Only
    /// ever grows; a guest that stops making progress stops moving it.
    pub fn progress(&self) -> u64 {
        self.stats.exits.load(Ordering::Relaxed) + self.activity.events()
    }

    /// The last lines the guest printed (console, agent log), oldest first.
    pub fn last_output(&self) -> Vec<String> {
        self.activity.tail()
    }

    /// The guest kernel's panic message, if it panicked.
    pub fn panic_line(&self) -> Option<String> {
        self.activity.panic_line()
    }

    /// Where each vCPU is now: kicks every vCPU out of the guest once and
    /// waits up to `timeout` for their answers.
    pub fn sample_vcpus(&self, timeout: Duration) -> Vec<VcpuSample> {
        let count = u8::try_from(self.vcpu_threads.len()).unwrap_or(u8::MAX);
        self.sampler.request(count);
        for handle in &self.vcpu_threads {
            vcpu::kick(handle);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let mut samples = self.sampler.samples();
            if samples.len() >= self.vcpu_threads.len() || Instant::now() >= deadline {
                samples.sort_by_key(|s| s.id);
                return samples;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// One [`profile`](crate::profile) sample of every vCPU.
    pub fn profile_sample(&self, timeout: Duration) -> Vec<crate::profile::ProfileSample> {
        self.sample_vcpus(timeout)
            .into_iter()
            .map(|s| crate::profile::ProfileSample {
                rip: s.rip,
                user_mode: s.user_mode,
                callers: if s.user_mode {
                    Vec::new()
                } else {
                    crate::profile::kernel_callers(&self.mem, s.rsp)
                },
            })
            .collect()
    }

    /// What the guest is doing, in one line for errors and logs: where its
    /// vCPUs are, how much it did, and the last lines it printed.
    pub fn describe_guest(&self) -> String {
        const SAMPLE_TIMEOUT: Duration = Duration::from_millis(200);
        let vcpus: Vec<String> = self
            .sample_vcpus(SAMPLE_TIMEOUT)
            .iter()
            .map(ToString::to_string)
            .collect();
        let output = self.last_output();
        format!(
            "guest: {} signs of life, {}; last guest output: {}",
            self.progress(),
            if vcpus.is_empty() {
                "vCPUs did not answer".to_string()
            } else {
                vcpus.join(", ")
            },
            if output.is_empty() {
                "(nothing)".to_string()
            } else {
                output.join(" | ")
            }
        )
    }

    /// Host address ranges of guest RAM (to tell VMM memory from guest memory).
    pub fn guest_memory_host_ranges(&self) -> Vec<(usize, usize)> {
        self.mem
            .iter()
            // A mapped region's length fits the address space.
            .map(|r| {
                let len = usize::try_from(r.len()).unwrap_or(usize::MAX);
                (r.as_ptr() as usize, len)
            })
            .collect()
    }

    fn teardown(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.exit.request(ExitReason::Stopped);
        // A vCPU may be blocked in KVM_RUN (guest idle) or about to enter
        // it: kick until every thread has finished.
        for handle in &self.vcpu_threads {
            while !handle.is_finished() {
                vcpu::kick(handle);
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        for handle in self.vcpu_threads.drain(..) {
            if handle.join().is_err() {
                tracing::error!("a vCPU thread panicked");
            }
        }
        self.devices.shutdown();
    }
}

impl husk_util::guest::GuestWatch for Vm {
    fn progress(&self) -> u64 {
        Vm::progress(self)
    }
    fn ended(&self) -> Option<String> {
        self.exit_reason().map(|r| r.to_string())
    }
    fn describe(&self) -> String {
        self.describe_guest()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// What a booted and a restored VM are both made of, before their vCPUs
/// run: the KVM VM with its interrupt controller and memory, the legacy
/// devices and the virtio devices (in the order a snapshot expects).
struct Machine {
    kvm: Kvm,
    vm_fd: VmFd,
    exit: Arc<ExitSignal>,
    pio: Bus,
    mmio: Bus,
    serial: Arc<Mutex<SerialDevice>>,
    devices: DeviceManager,
}

impl Machine {
    /// `restored`: the serial state a snapshot left; its vsock then tells
    /// the guest, once started, that its old connections are gone.
    fn assemble(
        config: &VmConfig,
        mem: &GuestMemoryMmap,
        restored: Option<&SerialRegisters>,
    ) -> Result<Machine, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let vm_fd = kvm.create_vm().map_err(kvm_err("create VM"))?;
        vm_fd
            .set_tss_address(KVM_TSS_ADDRESS)
            .map_err(kvm_err("set TSS address"))?;
        vm_fd.create_irq_chip().map_err(kvm_err("create irqchip"))?;
        memory::register(&vm_fd, mem)?;

        let exit = Arc::new(ExitSignal::new().map_err(io_err("create exit eventfd"))?);
        let (pio, serial) = legacy_devices(&vm_fd, config, &exit, restored)?;

        let mut mmio = Bus::new();
        // Activations run on the control thread, started here (before any
        // vCPU, from a thread without a VMM filter) so the device workers
        // it starts inherit no vCPU filter.
        let control = ControlThread::start().map_err(io_err("spawn the device control thread"))?;
        let mut devices = DeviceManager::new(control, config.seccomp);
        if let Some(vsock) = &config.vsock {
            let mut device =
                Vsock::new(vsock.guest_cid, vsock.uds_path.clone()).map_err(|source| {
                    VmError::Vsock {
                        path: vsock.uds_path.clone(),
                        source,
                    }
                })?;
            if restored.is_some() {
                device.announce_transport_reset();
            }
            devices.add_virtio(&vm_fd, mem, &mut mmio, "vsock", Box::new(device))?;
        }
        if let Some(share) = &config.shared_fs {
            let options = FsOptions {
                cache: share.cache,
                xattr: share.xattr,
                max_host_fds: Some(MAX_SHARE_FDS),
                ..FsOptions::default()
            };
            let device = Fs::new(&share.tag, &share.dir, options)?;
            devices.add_virtio(&vm_fd, mem, &mut mmio, "fs", Box::new(device))?;
        }
        for nic in &config.net {
            let tap =
                open_tap(&nic.tap_name, nic.netns.as_deref()).map_err(|source| VmError::Tap {
                    name: nic.tap_name.clone(),
                    source,
                })?;
            let device = Net::new(tap, nic.mac, nic.mtu)?;
            devices.add_virtio(&vm_fd, mem, &mut mmio, "net", Box::new(device))?;
        }
        Ok(Machine {
            kvm,
            vm_fd,
            exit,
            pio,
            mmio,
            serial,
            devices,
        })
    }

    /// The vCPUs, CPUID set and `init` run on each (boot registers, or a
    /// snapshot's state); not running yet.
    fn create_vcpus(
        &self,
        config: &VmConfig,
        profile: HostProfile,
        mut init: impl FnMut(&kvm_ioctls::VcpuFd, u8) -> Result<(), VmError>,
    ) -> Result<Vec<kvm_ioctls::VcpuFd>, VmError> {
        let cpuid_template = cpuid::base(&self.kvm, &config.cpuid, profile.hidden_features())?;
        let mut fds = Vec::with_capacity(config.vcpus.into());
        for id in 0..config.vcpus {
            let fd = self
                .vm_fd
                .create_vcpu(u64::from(id))
                .map_err(kvm_err("create vCPU"))?;
            fd.set_cpuid2(&cpuid::for_vcpu(&cpuid_template, id, config.vcpus))
                .map_err(kvm_err("set CPUID"))?;
            init(&fd, id)?;
            fds.push(fd);
        }
        Ok(fds)
    }

    /// Starts the vCPU threads: from here on the guest runs.
    fn launch(
        self,
        config: &VmConfig,
        profile: HostProfile,
        started: Instant,
        mem: GuestMemoryMmap,
        fds: Vec<kvm_ioctls::VcpuFd>,
    ) -> Result<Vm, VmError> {
        vcpu::install_kick_handler().map_err(io_err("install vCPU kick handler"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let vcpu_filter = match config.seccomp {
            true => Some(Arc::new(ThreadKind::Vcpu.filter()?)),
            false => {
                tracing::warn!("seccomp filters are off ([hypervisor] seccomp = false)");
                None
            }
        };
        let stats = Arc::new(VcpuStats::default());
        let sampler = Arc::new(VcpuSampler::default());
        let parking = Arc::new(VcpuParking::default());
        let vcpus: Vec<Vcpu> = (0u8..)
            .zip(fds)
            .map(|(id, fd)| Vcpu {
                fd,
                id,
                mmio: self.mmio.clone(),
                pio: self.pio.clone(),
                exit: self.exit.clone(),
                stop: stop.clone(),
                stats: stats.clone(),
                sampler: sampler.clone(),
                parking: parking.clone(),
                seccomp: vcpu_filter.clone(),
            })
            .collect();
        let mut vm = Vm {
            profile,
            exit: self.exit,
            stop,
            vcpu_threads: Vec::new(),
            devices: self.devices,
            stats,
            sampler,
            parking,
            serial: self.serial,
            shape: shape_of(config, profile, ""),
            activity: config.activity.clone(),
            started,
            mem,
            vm_fd: self.vm_fd,
        };
        for vcpu in vcpus {
            // On failure `vm` drops here and tears down the threads started.
            let handle = vcpu.spawn().map_err(io_err("spawn vCPU thread"))?;
            vm.vcpu_threads.push(handle);
        }
        Ok(vm)
    }
}

/// What a snapshot of a VM of `config` fits (`identity` names its inputs).
pub fn shape_of(config: &VmConfig, profile: HostProfile, identity: &str) -> SnapshotShape {
    let mut devices = Vec::new();
    if config.vsock.is_some() {
        devices.push("vsock".to_string());
    }
    if config.shared_fs.is_some() {
        devices.push("fs".to_string());
    }
    devices.extend(config.net.iter().map(|_| "net".to_string()));
    SnapshotShape {
        husk: crate::snapshot::husk_version(),
        host: crate::snapshot::host_identity(profile),
        identity: identity.to_string(),
        vcpus: config.vcpus,
        memory_mib: config.memory_mib,
        cmdline: guest_cmdline(profile, &config.extra_cmdline),
        devices,
    }
}

/// COM1, the i8042 reset line and the ACPI power ports on the PIO bus.
fn legacy_devices(
    vm_fd: &VmFd,
    config: &VmConfig,
    exit: &Arc<ExitSignal>,
    restored: Option<&SerialRegisters>,
) -> Result<(Bus, Arc<Mutex<SerialDevice>>), VmError> {
    let mut pio = Bus::new();
    let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(io_err("create serial eventfd"))?;
    vm_fd
        .register_irqfd(&serial_irq, SERIAL_GSI)
        .map_err(kvm_err("register serial irqfd"))?;
    let sink =
        ConsoleSink::open(&config.console, config.activity.clone()).map_err(VmError::Console)?;
    let serial = match restored {
        Some(state) => {
            SerialDevice::from_state(serial_irq, sink, state).map_err(io_err("restore COM1"))?
        }
        None => SerialDevice::new(serial_irq, sink),
    };
    let serial = Arc::new(Mutex::new(serial));
    pio.insert(serial.clone(), COM1_PORT.into(), COM1_PORT_LEN.into())?;
    pio.insert(
        Arc::new(Mutex::new(I8042::new(exit.clone()))),
        I8042_PORT.into(),
        I8042_PORT_LEN.into(),
    )?;
    pio.insert(
        Arc::new(Mutex::new(AcpiPowerPorts::new(exit.clone()))),
        ACPI_SLEEP_CONTROL_PORT.into(),
        ACPI_PORTS_LEN.into(),
    )?;
    Ok((pio, serial))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_configs_are_named() {
        let mut c = VmConfig::new("/nonexistent/vmlinux");
        let e = validate(&c).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/vmlinux"), "{e}");
        c.kernel = "/proc/self/exe".into();
        c.vcpus = 0;
        assert!(validate(&c).unwrap_err().to_string().contains("vcpus"));
        c.vcpus = 1;
        c.vsock = Some(VsockConfig {
            guest_cid: 2,
            uds_path: "/tmp/x".into(),
        });
        assert!(validate(&c).unwrap_err().to_string().contains("CID"));
        c.vsock = None;
        c.initrd = Some("/nonexistent/initrd".into());
        assert!(validate(&c).unwrap_err().to_string().contains("initramfs"));
    }
}
